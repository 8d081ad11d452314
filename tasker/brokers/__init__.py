"""Dramatiq brokers. :class:`~tasker.brokers.pgmq.PGMQBroker` keeps every queue in PostgreSQL."""
