"""Retry policy: whether a failed step runs again, and when. Returns immutable decisions."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tasker.exceptions import WorkflowDefinitionError

__all__ = [
    "MAX_BACKOFF_S",
    "BackoffPolicy",
    "RetryDecision",
    "decide_retry",
    "final_failure_reason",
]

#: The longest delay a policy may ask for, in seconds (30 days): a retry further away is a
#: scheduling job, not a retry, and PostgreSQL's timestamps end at year 294276.
MAX_BACKOFF_S = 30 * 24 * 3600.0


@dataclass(frozen=True)
class BackoffPolicy:
    """``base * multiplier**attempts`` seconds, capped at ``max_seconds``, +/- jitter * delay.

    ``base_seconds`` and ``max_seconds`` are at most :data:`MAX_BACKOFF_S` (30 days);
    :class:`~tasker.exceptions.WorkflowDefinitionError` otherwise.
    """

    base_seconds: float = 1.0
    multiplier: float = 2.0
    max_seconds: float = 300.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        for name in ("base_seconds", "multiplier", "max_seconds", "jitter"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise WorkflowDefinitionError(
                    f"Backoff {name} must be a finite number, got {value!r}."
                )
        if self.base_seconds < 0 or self.multiplier < 1 or self.max_seconds < 0:
            raise WorkflowDefinitionError(
                "Backoff needs base_seconds >= 0, multiplier >= 1 and max_seconds >= 0, got "
                f"{self.base_seconds}, {self.multiplier} and {self.max_seconds}."
            )
        if self.base_seconds > MAX_BACKOFF_S or self.max_seconds > MAX_BACKOFF_S:
            raise WorkflowDefinitionError(
                f"Backoff base_seconds and max_seconds must be at most {MAX_BACKOFF_S:.0f} "
                f"(30 days), got {self.base_seconds} and {self.max_seconds}."
            )
        if not 0 <= self.jitter < 1:
            raise WorkflowDefinitionError(
                f"Backoff jitter must be in [0, 1), got {self.jitter}; 0.1 means +/-10%."
            )

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        try:
            growth = self.multiplier ** max(attempts, 0)
        except OverflowError:  # 10.0 ** 400: far past any cap
            growth = math.inf
        raw = min(self.base_seconds * growth, self.max_seconds) if self.base_seconds else 0.0
        if self.jitter and raw > 0:
            spread = raw * self.jitter
            raw += (rng or random).uniform(-spread, spread)
        return max(min(raw, self.max_seconds), 0.0)


@dataclass(frozen=True)
class RetryDecision:
    """What happens to a failed step."""

    retry: bool
    delay_seconds: float
    reason: str


def decide_retry(
    *,
    template_retryable: bool,
    error_retryable: bool,
    attempts: int,
    max_attempts: int,
    policy: BackoffPolicy,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> RetryDecision:
    """Retry only when the template allows it, the error is retryable and attempts remain.

    A handler's ``retry_after`` wins over the computed backoff (capped by the policy maximum).
    """
    reason = final_failure_reason(
        template_retryable=template_retryable,
        error_retryable=error_retryable,
        attempts=attempts,
        max_attempts=max_attempts,
    )
    if reason is not None:
        return RetryDecision(False, 0.0, reason)
    if retry_after is not None:
        return RetryDecision(True, min(max(retry_after, 0.0), policy.max_seconds), "retry_after")
    return RetryDecision(True, policy.delay(attempts, rng), "backoff")


def final_failure_reason(
    *, template_retryable: bool, error_retryable: bool, attempts: int, max_attempts: int
) -> str | None:
    """Why a failed attempt is the step's last (:func:`decide_retry` gives up for this reason),
    or None when the step runs again.

    Workers use it to tell, before the outcome is processed, whether a failure is final.
    """
    if not error_retryable:
        return "permanent error"
    if not template_retryable:
        return "step is not retryable"
    if attempts >= max_attempts:
        return f"attempts exhausted ({attempts}/{max_attempts})"
    return None
