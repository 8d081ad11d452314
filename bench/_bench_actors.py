"""Broker and actors of the broker benchmark, loaded by ``dramatiq bench._bench_actors``.

The worker side is configured only through environment variables set by
``bench/broker_throughput.py``:

* ``BENCH_BROKER``: ``pgmq``, ``rabbitmq`` or ``redis`` (without it, importing this module builds
  no broker, so the driver can import the helpers below);
* ``BENCH_DATABASE_URL``, ``BENCH_RABBITMQ_URL``, ``BENCH_REDIS_URL``: where the brokers live;
* ``BENCH_DONE_FILE``: completions of ``bench_noop`` (throughput phase);
* ``BENCH_LATENCY_FILE``: ``(seq, send_ns, start_ns)`` of ``bench_stamp`` (latency phase).

Both actors append one line per message with a single ``write()`` on an ``O_APPEND`` descriptor,
so lines written by several processes and threads never interleave and no shared service is
touched by the handlers (the broker under test is the only I/O a message causes). The handlers
return ``None``: without the Results middleware Dramatiq logs a WARNING for every non-None return
value, which would turn the benchmark into a logging benchmark.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import dramatiq
from dramatiq.broker import Broker

QUEUE = "bench"
REDIS_NAMESPACE = "tasker-bench"
DEFAULT_DATABASE_URL = "postgresql://root@127.0.0.1:5432/tasker_bench"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
BROKER_KINDS = ("pgmq", "rabbitmq", "redis")

DONE_FILE_ENV = "BENCH_DONE_FILE"
LATENCY_FILE_ENV = "BENCH_LATENCY_FILE"


def done_record(seq: int, finished_ns: int) -> bytes:
    """One fixed-width completion record: the driver counts completions from the file size."""
    return b"%09d %019d\n" % (seq, finished_ns)


DONE_RECORD_LEN = len(done_record(0, 0))


def make_broker(
    kind: str,
    *,
    database_url: str = DEFAULT_DATABASE_URL,
    rabbitmq_url: str = DEFAULT_RABBITMQ_URL,
    redis_url: str = DEFAULT_REDIS_URL,
) -> Broker:
    """The broker under test, configured identically in the driver and in the workers.

    Every broker keeps Dramatiq's default middleware.
    """
    if kind == "pgmq":
        from tasker.brokers.pgmq import PGMQBroker

        return PGMQBroker(url=database_url, visibility_timeout_ms=30_000)
    if kind == "rabbitmq":
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=rabbitmq_url, confirm_delivery=True)
    if kind == "redis":
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=redis_url, namespace=REDIS_NAMESPACE)
    raise ValueError(f"Unknown broker {kind!r}; choose from {', '.join(BROKER_KINDS)}.")


class AppendOnlyFile:
    """An ``O_APPEND`` descriptor opened lazily once per process (after the worker fork)."""

    def __init__(self, env_var: str) -> None:
        self.env_var = env_var
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = -1

    def write(self, record: bytes) -> None:
        fd = self._fd
        if fd is None or self._pid != os.getpid():
            with self._lock:
                if self._fd is None or self._pid != os.getpid():
                    path = os.environ[self.env_var]
                    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    self._pid = os.getpid()
                fd = self._fd
        os.write(fd, record)


def declare_actors(broker: Broker) -> tuple[Any, Any]:
    """Declare the two benchmark actors on ``broker`` (queue ``bench``, default options)."""
    done = AppendOnlyFile(DONE_FILE_ENV)
    latency = AppendOnlyFile(LATENCY_FILE_ENV)

    @dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name="bench_noop")
    def bench_noop(seq: int) -> None:
        done.write(done_record(seq, time.time_ns()))

    @dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name="bench_stamp")
    def bench_stamp(seq: int, send_ns: int) -> None:
        started_ns = time.time_ns()
        latency.write(b"%d %d %d\n" % (seq, send_ns, started_ns))

    return bench_noop, bench_stamp


broker: Broker | None = None
if os.environ.get("BENCH_BROKER"):
    broker = make_broker(
        os.environ["BENCH_BROKER"],
        database_url=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        rabbitmq_url=os.environ.get("BENCH_RABBITMQ_URL", DEFAULT_RABBITMQ_URL),
        redis_url=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
    )
    dramatiq.set_broker(broker)
    declare_actors(broker)
