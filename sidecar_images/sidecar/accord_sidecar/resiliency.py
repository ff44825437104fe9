"""Retry, circuit breaker and retry budget: pure policy objects with an injected clock.

No I/O here; invoke.py asks these objects what to do and tells them what happened.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

import accord_wire as wire

Clock = Callable[[], float]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    initial_s: float = 0.1
    max_s: float = 2.0
    exponential: bool = True

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Delay before attempt number `attempt + 1` (attempt counts from 1): full jitter.

        Full jitter (AWS architecture blog) spreads retries of many clients evenly over
        [0, cap] instead of synchronising them on the same instant.
        """
        if not self.exponential:
            return min(self.initial_s, self.max_s)
        cap: float = min(self.max_s, self.initial_s * 2.0 ** (attempt - 1))
        return rng() * cap


def may_retry_request(method: str, headers: Mapping[str, str]) -> bool:
    """A POST/PATCH is retried only when it carries an idempotency key."""
    if method.upper() in IDEMPOTENT_METHODS:
        return True
    return any(k.lower() == wire.IDEMPOTENCY_KEY.lower() for k in headers)


def retryable_status(status: int) -> bool:
    """5xx, 408, 409, 429: the one rule (accord_wire.try_again) the operator uses too."""
    return wire.try_again(status)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Parse Retry-After: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class BreakerState(Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `cooldown_s` one probe is let
    through (half-open): success closes it, failure opens it again."""

    def __init__(self, failures: int, cooldown_s: float, clock: Clock = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self._probe_in_flight = False

    def allow(self) -> bool:
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self.clock() - self.opened_at >= self.cooldown_s:
            self.state = BreakerState.HALF_OPEN
            self._probe_in_flight = False
        if self.state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record(self, success: bool) -> None:
        if success:
            self.state = BreakerState.CLOSED
            self.consecutive_failures = 0
            self._probe_in_flight = False
            return
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or self.consecutive_failures >= self.threshold:
            self.state = BreakerState.OPEN
            self.opened_at = self.clock()
            self._probe_in_flight = False


class RetryBudget:
    """Retries may add at most `percent`% to the requests of the last `window_s` seconds
    (plus `min_retries` so that a quiet target can still be retried): retries can never
    multiply load on a failing target (Finagle/Linkerd retry budgets).

    Counted in one-second buckets, so its memory is the window's length in buckets,
    whatever the request rate, and nothing is kept per request.
    """

    def __init__(
        self,
        percent: int,
        window_s: float = 10.0,
        min_retries: int = 3,
        clock: Clock = time.monotonic,
    ) -> None:
        self.ratio = percent / 100.0
        self.window = max(1, int(window_s))
        self.min_retries = min_retries
        self.clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, requests, retries]

    def _now(self) -> list[int]:
        second = int(self.clock())
        buckets = self._buckets
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
            while buckets[0][0] <= second - self.window:
                buckets.popleft()
        return buckets[-1]

    def __len__(self) -> int:
        """Buckets held (for tests): never more than the window's seconds."""
        return len(self._buckets)

    def record_request(self) -> None:
        self._now()[1] += 1

    def try_spend(self) -> bool:
        bucket = self._now()
        requests = sum(b[1] for b in self._buckets)
        retries = sum(b[2] for b in self._buckets)
        if retries < self.min_retries + self.ratio * requests:
            bucket[2] += 1
            return True
        return False
