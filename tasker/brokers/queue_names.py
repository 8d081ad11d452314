"""Map Dramatiq queue names onto PGMQ queue names.

Dramatiq accepts ``[a-zA-Z_][a-zA-Z0-9._-]*`` of any length; PGMQ lower-cases table names, allows
47 characters, and its NOTIFY channel breaks on upper case. A queue ``name`` in namespace ``ns``
becomes ``ns_name``; when that is not already lower-case ``[a-z0-9_]`` or does not fit, the
sanitised name is truncated and suffixed with a hash of the original, so two Dramatiq names never
share a PGMQ queue. The dead-letter queue is ``<pgmq name>__xq``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from psycopg import sql

from tasker.exceptions import QueueNameError

__all__ = ["DEAD_LETTER_SUFFIX", "MAX_PGMQ_NAME", "QueueNames", "map_queue_name"]

MAX_PGMQ_NAME = 47
DEAD_LETTER_SUFFIX = "__xq"
_DRAMATIQ_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9._-]*$")
_SAFE = re.compile(r"^[a-z0-9_]+$")
_NAMESPACE = re.compile(r"^[a-z][a-z0-9_]{0,15}$")
_HASH_LEN = 8


@dataclass(frozen=True)
class QueueNames:
    """The PGMQ names and SQL identifiers of one Dramatiq queue."""

    dramatiq: str
    main: str

    @property
    def dead(self) -> str:
        return self.main + DEAD_LETTER_SUFFIX

    @property
    def table(self) -> sql.Identifier:
        return sql.Identifier("pgmq", "q_" + self.main)

    @property
    def dead_table(self) -> sql.Identifier:
        return sql.Identifier("pgmq", "q_" + self.dead)

    @property
    def channel(self) -> str:
        """The NOTIFY channel PGMQ's own insert trigger would use, so PGMQ listeners work too."""
        return f"pgmq.q_{self.main}.INSERT"


def map_queue_name(name: str, namespace: str) -> QueueNames:
    """Map Dramatiq queue ``name`` to its PGMQ names; raise :class:`QueueNameError` if invalid."""
    if not _NAMESPACE.match(namespace):
        raise QueueNameError(
            f"Broker namespace {namespace!r} is invalid: use 1-16 lower-case letters, digits or "
            "underscores, starting with a letter (setting broker.namespace)."
        )
    if not _DRAMATIQ_NAME.match(name):
        raise QueueNameError(
            f"Queue name {name!r} is invalid: start with a letter or underscore and use only "
            "letters, digits, '.', '-' or '_'."
        )
    budget = MAX_PGMQ_NAME - len(DEAD_LETTER_SUFFIX)
    candidate = f"{namespace}_{name}"
    lossless = (
        _SAFE.match(candidate) is not None
        and len(candidate) <= budget
        and not candidate.endswith(DEAD_LETTER_SUFFIX)
    )
    if lossless:
        return QueueNames(name, candidate)
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LEN]
    sanitised = re.sub(r"[^a-z0-9_]", "_", candidate.lower())
    keep = budget - _HASH_LEN - 1
    return QueueNames(name, f"{sanitised[:keep].rstrip('_')}_{digest}")
