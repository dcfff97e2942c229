"""Retry timing and the circuit breaker's state machine (a manual clock, no sleeping)."""

from __future__ import annotations

import random

from mesh.backends.resilience import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitState,
    RetryPolicy,
    parse_retry_after,
)
from mesh.errors import BadRequest, RateLimited, ServerError


def test_full_jitter_backoff_is_bounded_and_grows() -> None:
    policy = RetryPolicy(max_attempts=6, base_delay=1.0, max_delay=5.0)
    rng = random.Random(1)
    for attempt, cap in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (5, 5.0)):
        delays = [policy.delay(attempt, ServerError("x"), rng) for _ in range(200)]
        assert all(d is not None and 0 <= d <= cap for d in delays)
        assert max(d for d in delays if d is not None) > cap * 0.8  # the whole range is used
    assert policy.delay(6, ServerError("x"), rng) is None  # attempts exhausted


def test_retry_after_wins_and_permanent_errors_stop() -> None:
    policy = RetryPolicy(max_attempts=3, max_retry_after=10)
    rng = random.Random(0)
    assert policy.delay(1, RateLimited("x", retry_after=2.5), rng) == 2.5
    assert policy.delay(1, RateLimited("x", retry_after=60), rng) is None  # too long: fall back instead
    assert policy.delay(1, BadRequest("x"), rng) is None


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_half_opens_and_closes() -> None:
    clock = Clock()
    cb = CircuitBreaker(BreakerPolicy(failure_threshold=3, reset_after=10), clock)
    for _ in range(2):
        assert cb.acquire()
        cb.record_failure()
    assert cb.state is CircuitState.CLOSED
    assert cb.acquire()
    cb.record_success()  # a success resets the count
    for _ in range(3):
        assert cb.acquire()
        cb.record_failure()
    assert cb.state is CircuitState.OPEN and not cb.available() and not cb.acquire()
    clock.now = 10
    assert cb.state is CircuitState.HALF_OPEN
    assert cb.acquire()  # the probe
    assert not cb.acquire()  # only one probe at a time
    cb.record_failure()  # probe failed: open again for another reset period
    assert cb.state is CircuitState.OPEN
    clock.now = 20
    assert cb.acquire()
    cb.record_success()
    assert cb.state is CircuitState.CLOSED and cb.available()


def test_released_probe_lets_the_next_caller_probe() -> None:
    clock = Clock()
    cb = CircuitBreaker(BreakerPolicy(failure_threshold=1, reset_after=1), clock)
    cb.acquire()
    cb.record_failure()
    clock.now = 1
    assert cb.acquire()
    cb.release()  # e.g. a permanent error: says nothing about the endpoint
    assert cb.acquire()
