"""Dramatiq on RabbitMQ, the peer of the workflow benchmark, run by
``python -m dramatiq bench._bench_peers_dramatiq --processes 2 --threads 4``.

How the workloads map onto Dramatiq's composition primitives:

* ``w1`` and ``w5`` (chains of 4 and 200): ``dramatiq.pipeline`` of one message of ``wfb_step``
  per step (``pipe_ignore=True``: a step does not take its parent's return value);
* ``w2``, ``w3`` and ``w4`` (fan-outs of 2, 50 and 1,000): Dramatiq has no "message, then
  group" primitive, so the root actor ``wfb_fanout`` runs the no-op and then starts
  ``group(children)`` with a completion callback (the join step). That is the idiomatic way to
  express it. Group callbacks need the ``GroupCallbacks`` middleware and a rate-limiter backend
  for the barrier: Redis, with keys prefixed ``tasker-wfbench-dq:`` so the driver can delete
  exactly its own keys.

The broker is ``RabbitmqBroker(confirm_delivery=True)`` (durable queues, persistent messages,
publisher confirms) with Dramatiq's default middleware plus ``GroupCallbacks``. All messages use
the queue ``wfbench_dq``. Configured through environment variables: ``BENCH_DRAMATIQ_WORKER=1``
(build the broker at import, for the worker CLI), ``BENCH_RABBITMQ_URL``, ``BENCH_REDIS_URL``,
``BENCH_LEDGER``.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.broker import Broker
from dramatiq.middleware import GroupCallbacks, default_middleware
from dramatiq.rate_limits.backends import RedisBackend

from bench._bench_ledger import WORKLOADS, is_chain, noop_step

QUEUE = "wfbench_dq"
REDIS_PREFIX = "tasker-wfbench-dq:"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
BARRIER_TTL_MS = 3_600_000


class PrefixedRedisBackend(RedisBackend):
    """Dramatiq's Redis rate-limiter backend with every key under ``REDIS_PREFIX``."""

    def add(self, key: str, value: int, ttl: int) -> bool:
        return bool(super().add(REDIS_PREFIX + key, value, ttl))

    def incr(self, key: str, amount: int, maximum: int, ttl: int) -> bool:
        return bool(super().incr(REDIS_PREFIX + key, amount, maximum, ttl))

    def decr(self, key: str, amount: int, minimum: int, ttl: int) -> bool:
        return bool(super().decr(REDIS_PREFIX + key, amount, minimum, ttl))

    def incr_and_sum(self, key: str, keys: Any, amount: int, maximum: int, ttl: int) -> bool:
        def prefixed() -> list[str]:
            return [REDIS_PREFIX + k for k in keys()]

        return bool(super().incr_and_sum(REDIS_PREFIX + key, prefixed, amount, maximum, ttl))

    def wait(self, key: str, timeout: int | None) -> bool:
        return bool(super().wait(REDIS_PREFIX + key, timeout))

    def wait_notify(self, key: str, ttl: int) -> None:
        super().wait_notify(REDIS_PREFIX + key, ttl)


def make_broker(rabbitmq_url: str, redis_url: str) -> Broker:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    middleware = [m() for m in default_middleware]
    middleware.append(
        GroupCallbacks(PrefixedRedisBackend(url=redis_url), barrier_ttl=BARRIER_TTL_MS)
    )
    return RabbitmqBroker(url=rabbitmq_url, confirm_delivery=True, middleware=middleware)


class Actors:
    """The peer's actors on one broker, and how the driver starts each workload."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

        @dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name="wfb_step")
        def wfb_step(workflow_id: str, step: str) -> None:
            noop_step(workflow_id, step)

        @dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name="wfb_fanout")
        def wfb_fanout(workflow_id: str, workload: str) -> None:
            spec = WORKLOADS[workload]
            noop_step(workflow_id, spec.root)
            children = [name for name, parents in spec.parents.items() if parents == (spec.root,)]
            messages = [wfb_step.message(workflow_id, c) for c in children]
            fan = dramatiq.group(messages, broker=broker)
            fan.add_completion_callback(wfb_step.message(workflow_id, spec.final))
            fan.run()

        self.step = wfb_step
        self.fanout = wfb_fanout

    def submit(self, workload: str, workflow_id: str) -> None:
        if is_chain(WORKLOADS[workload]):
            steps = list(WORKLOADS[workload].parents)
            messages = [
                self.step.message_with_options(args=(workflow_id, s), pipe_ignore=True)
                for s in steps
            ]
            dramatiq.pipeline(messages, broker=self.broker).run()
        else:
            self.fanout.send(workflow_id, workload)


broker: Broker | None = None
if os.environ.get("BENCH_DRAMATIQ_WORKER"):
    broker = make_broker(
        os.environ.get("BENCH_RABBITMQ_URL", DEFAULT_RABBITMQ_URL),
        os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
    )
    dramatiq.set_broker(broker)
    Actors(broker)
