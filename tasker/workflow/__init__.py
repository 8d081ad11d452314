"""The pure workflow domain: definitions, DAG checks, state machines and retry policy.

Nothing here touches a database, settings or Dramatiq.
"""
