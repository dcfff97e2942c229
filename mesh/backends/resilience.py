"""Retry timing and circuit breaking — the mesh's resilience, kept out of the SDKs (their retries
are off) so that every attempt is visible, counted and bounded in one place."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from mesh.errors import BackendError, RateLimited


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per tier, and the exponential backoff with full jitter between them."""

    max_attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 20.0
    max_retry_after: float = 60.0  # a server asking for longer than this: give up on the tier now

    def delay(self, attempt: int, error: BackendError, rng: random.Random) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or ``None`` to stop retrying this tier.

        A server's ``Retry-After`` wins over the backoff (it knows when capacity returns); without
        one, full jitter — uniform in [0, min(cap, base·2^(attempt-1))] — spreads retrying clients.
        """
        if attempt >= self.max_attempts or not error.retryable:
            return None
        retry_after = getattr(error, "retry_after", None) if isinstance(error, RateLimited) else None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from ``retry-after-ms`` (OpenAI/Anthropic) or ``Retry-After`` (seconds or HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        return max(email.utils.mktime_tz(parsed) - time.time(), 0.0) if parsed else None


class CircuitState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 5  # consecutive retryable failures that open the circuit
    reset_after: float = 30.0  # seconds open before one probe call is let through


class CircuitBreaker:
    """Per endpoint: closed → (N consecutive failures) → open → (reset_after) → half-open, where one
    probe decides: success closes, failure re-opens. Only retryable failures count — a bad request
    says nothing about the endpoint's health."""

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at >= self.policy.reset_after:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def available(self) -> bool:
        """Whether a call would be let through now (no side effects; the router asks this)."""
        state = self.state
        return state is CircuitState.CLOSED or (state is CircuitState.HALF_OPEN and not self._probing)

    def acquire(self) -> bool:
        """Take permission for one call; in half-open only the first caller becomes the probe."""
        if not self.available():
            return False
        if self.state is CircuitState.HALF_OPEN:
            self._probing = True
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self.policy.failure_threshold:
            self._opened_at = self._clock()
        self._probing = False

    def release(self) -> None:
        """The permitted call ended without a verdict on the endpoint (e.g. a permanent error)."""
        self._probing = False
