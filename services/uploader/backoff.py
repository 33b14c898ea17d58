"""Exponential backoff with jitter for an object store that does not answer."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

# 2**60 times any sensible initial wait is past every cap; stops the float from overflowing.
_MAX_EXPONENT = 60


class Backoff:
    """One shared state for the store: after n consecutive failures the next attempt waits
    min(max_s, initial_s * 2**(n-1)), of which a random fraction up to `jitter` is taken off.
    A success resets it. Clock and randomness are injected so the schedule is testable."""

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        jitter: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(f"need 0 < initial_s ({initial_s}) <= max_s ({max_s})")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter {jitter} is not within [0, 1]")
        self.initial_s = initial_s
        self.max_s = max_s
        self.jitter = jitter
        self.clock = clock
        self.rand = rand
        self.failures = 0
        self._retry_at = 0.0

    def delay_s(self, failures: int) -> float:
        """The wait after `failures` consecutive failures, jitter included."""
        if failures <= 0:
            return 0.0
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(failures - 1, _MAX_EXPONENT))
        return ceiling * (1.0 - self.jitter * self.rand())

    def failed(self) -> float:
        """Record a failure; returns how long the next attempt waits."""
        self.failures += 1
        delay = self.delay_s(self.failures)
        self._retry_at = self.clock() + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self._retry_at = 0.0

    def wait_s(self) -> float:
        """Seconds left before the next attempt may run (0 when it may run now)."""
        return max(0.0, self._retry_at - self.clock()) if self.failures else 0.0
