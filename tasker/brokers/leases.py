"""Leases of delivered messages, kept per broker (per process) and extended by a heartbeat.

A delivered message is invisible to other consumers until its visibility timeout (``vt``) passes.
The registry remembers every message this process holds, keyed by ``(pgmq queue, msg_id)`` with the
``read_ct`` of the delivery as fencing token, so that:

* the consumer can enforce Dramatiq's prefetch limit (messages held, not messages fetched);
* the :class:`LeaseKeeper` thread extends all held leases in one statement per queue;
* messages outlive a consumer that Dramatiq replaced after a connection error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["HeldMessage", "LeaseHook", "LeaseKeeper", "LeaseRegistry"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldMessage:
    """One delivery this process holds."""

    msg_id: int
    read_ct: int
    leased_at: float = field(default_factory=time.monotonic)


class LeaseRegistry:
    """Thread-safe record of the messages held by this process, per PGMQ queue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._held: dict[str, dict[int, HeldMessage]] = {}

    def hold(self, queue: str, msg_id: int, read_ct: int) -> None:
        with self._lock:
            self._held.setdefault(queue, {})[msg_id] = HeldMessage(msg_id, read_ct)

    def release(self, queue: str, msg_id: int, read_ct: int | None = None) -> bool:
        """Forget a delivery (acked, dead-lettered, requeued or lost); False if not held."""
        with self._lock:
            held = self._held.get(queue, {})
            current = held.get(msg_id)
            if current is None or (read_ct is not None and current.read_ct != read_ct):
                return False
            del held[msg_id]
            self._released.notify_all()
            return True

    def forget_queue(self, queue: str) -> None:
        with self._lock:
            self._held.pop(queue, None)
            self._released.notify_all()

    def count(self, queue: str) -> int:
        with self._lock:
            return len(self._held.get(queue, ()))

    def wait_for_room(self, queue: str, limit: int, timeout: float) -> bool:
        """Block until fewer than ``limit`` messages of ``queue`` are held, or ``timeout``."""
        with self._lock:
            return self._released.wait_for(
                lambda: len(self._held.get(queue, ())) < limit, timeout=timeout
            )

    def held(self) -> dict[str, list[HeldMessage]]:
        """Every held delivery, per queue."""
        with self._lock:
            return {queue: list(held.values()) for queue, held in self._held.items() if held}

    def to_extend(self, max_lease_s: float) -> dict[str, list[HeldMessage]]:
        """Held messages younger than ``max_lease_s``, per queue (older ones are let go)."""
        now = time.monotonic()
        with self._lock:
            return {
                queue: [m for m in held.values() if now - m.leased_at < max_lease_s]
                for queue, held in self._held.items()
                if held
            }


ExtendFn = Callable[[str, list[HeldMessage]], set[int]]


class LeaseHook(Protocol):
    """Other leases kept alive by the same heartbeat (the workflow engine's step claims)."""

    def extend(self) -> None:
        """Extend every lease this process holds (called on each heartbeat)."""
        ...

    def release(self) -> None:
        """Give every held lease up at once (a forced exit)."""
        ...


class LeaseKeeper(threading.Thread):
    """Extends every held lease each ``interval_s``; a message whose lease could not be extended
    (acked elsewhere, or delivered again after a lost lease) is dropped from the registry."""

    def __init__(
        self,
        registry: LeaseRegistry,
        extend: ExtendFn,
        *,
        interval_s: float,
        max_lease_s: float,
        periodic: Callable[[], object] | None = None,
        periodic_every_s: float = 300.0,
        hooks: Sequence[LeaseHook] = (),
    ) -> None:
        super().__init__(name="tasker-lease-keeper", daemon=True)
        self._registry = registry
        self._extend = extend
        self._interval_s = interval_s
        self._max_lease_s = max_lease_s
        self._periodic = periodic
        self._periodic_every_s = periodic_every_s
        self._hooks = hooks
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        next_periodic = time.monotonic() + self._periodic_every_s
        while not self._stop_event.wait(self._interval_s):
            self.beat()
            if self._periodic is not None and time.monotonic() >= next_periodic:
                next_periodic = time.monotonic() + self._periodic_every_s
                self._run_periodic()

    def beat(self) -> None:
        """Extend all leases once (also called directly by tests)."""
        for queue, held in self._registry.to_extend(self._max_lease_s).items():
            if not held:
                continue
            try:
                kept = self._extend(queue, held)
            except Exception:  # the next beat retries; the lease is still valid for a while
                logger.warning(
                    "Could not extend %d lease(s) on %s", len(held), queue, exc_info=True
                )
                continue
            for message in held:
                # Usually acked while this beat ran; a lost lease is reported by the late ack.
                if message.msg_id not in kept:
                    self._registry.release(queue, message.msg_id, message.read_ct)
        for hook in list(self._hooks):
            try:
                hook.extend()
            except Exception:  # the next beat retries
                logger.warning("Could not extend leases of %r", hook, exc_info=True)

    def _run_periodic(self) -> None:
        assert self._periodic is not None
        try:
            self._periodic()
        except Exception:
            logger.warning("Broker maintenance failed; it runs again later", exc_info=True)
