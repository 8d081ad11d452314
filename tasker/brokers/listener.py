"""One LISTEN connection per process that wakes consumers up when messages arrive.

Notifications are a latency optimisation, never a correctness requirement: consumers also poll,
and after every (re)connection all consumers are woken up to read what arrived meanwhile.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
from psycopg import sql

__all__ = ["Listener"]

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 5.0


class Listener(threading.Thread):
    """Listens on the channels it was asked to watch and sets their events."""

    def __init__(self, url: str, connect_kwargs: dict[str, Any], *, tick_s: float = 0.25) -> None:
        super().__init__(name="tasker-listener", daemon=True)
        self._url = url
        self._connect_kwargs = connect_kwargs
        self._tick_s = tick_s
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._stop_event = threading.Event()
        self._started_once = False
        self.connected = threading.Event()

    def watch(self, channel: str) -> threading.Event:
        """The event set whenever ``channel`` is notified (or the connection was re-made)."""
        with self._lock:
            event = self._events.setdefault(channel, threading.Event())
            # Thread.start() is not safe to race: start once, under the lock.
            if not self._started_once and not self._stop_event.is_set():
                self._started_once = True
                self.start()
        return event

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        backoff = 0.1
        while not self._stop_event.is_set():
            try:
                self._listen_until_stopped()
            except Exception as exc:  # never let the wake-up thread die: consumers also poll
                self.connected.clear()
                logger.warning("LISTEN connection lost (%s); reconnecting in %.1fs", exc, backoff)
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            else:
                backoff = 0.1

    def _listen_until_stopped(self) -> None:
        with psycopg.connect(self._url, **self._connect_kwargs) as conn:
            listening: set[str] = set()
            while not self._stop_event.is_set():
                with self._lock:
                    channels = dict(self._events)
                for channel in channels.keys() - listening:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    listening.add(channel)
                    channels[channel].set()  # anything sent before LISTEN is read once
                if not self.connected.is_set():
                    self.connected.set()
                    for event in channels.values():
                        event.set()
                for note in conn.notifies(timeout=self._tick_s):
                    woken = channels.get(note.channel)
                    if woken is not None:
                        woken.set()
