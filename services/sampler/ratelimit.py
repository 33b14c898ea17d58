"""Per-key sliding-window limits: at most `limit` acquisitions in any `window_s` seconds, and
several windows (per hour and per day) that must all have room before one is granted.

The windows live in memory; `restore` puts back grants made before a restart (the sampler reads
them from its own selections in the stream), so a restart does not hand out a fresh quota."""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Sequence

HOUR_S = 3600.0
DAY_S = 24 * HOUR_S


class SlidingWindowLimiter:
    def __init__(
        self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._granted: dict[str, deque[float]] = {}

    def _live(self, key: str, now: float) -> deque[float]:
        granted = self._granted.setdefault(key, deque())
        while granted and granted[0] <= now - self.window_s:
            granted.popleft()
        return granted

    def has_room(self, key: str) -> bool:
        return len(self._live(key, self.clock())) < self.limit

    def try_acquire(self, key: str) -> bool:
        now = self.clock()
        granted = self._live(key, now)
        if len(granted) >= self.limit:
            return False
        granted.append(now)
        return True

    def restore(self, key: str, age_s: float) -> None:
        """Counts a grant made `age_s` seconds ago (by wall clock: this clock may have
        restarted since) against `key`, whether or not there is room: it was granted then."""
        if age_s >= self.window_s:
            return
        at = self.clock() - max(age_s, 0.0)
        bisect.insort(self._granted.setdefault(key, deque()), at)


class RateLimits:
    """All windows or none: a grant refused by the daily limit does not use the hourly one."""

    def __init__(self, limiters: Sequence[SlidingWindowLimiter]) -> None:
        self.limiters = list(limiters)

    @classmethod
    def per_hour_and_day(
        cls, per_hour: int, per_day: int, clock: Callable[[], float] = time.monotonic
    ) -> RateLimits:
        return cls(
            [
                SlidingWindowLimiter(per_hour, HOUR_S, clock),
                SlidingWindowLimiter(per_day, DAY_S, clock),
            ]
        )

    def blocking(self, key: str) -> SlidingWindowLimiter | None:
        """The first limiter with no room for `key`, or None when every one has room."""
        return next((limiter for limiter in self.limiters if not limiter.has_room(key)), None)

    def try_acquire(self, key: str) -> bool:
        if self.blocking(key) is not None:
            return False
        for limiter in self.limiters:
            limiter.try_acquire(key)
        return True

    def restore(self, key: str, age_s: float) -> None:
        for limiter in self.limiters:
            limiter.restore(key, age_s)

    @property
    def longest_window_s(self) -> float:
        """How far back a grant can still count: what a restart has to restore."""
        return max((limiter.window_s for limiter in self.limiters), default=0.0)
