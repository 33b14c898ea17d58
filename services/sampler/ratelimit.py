"""A per-key sliding-window limit: at most `limit` acquisitions in any `window_s` seconds."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class SlidingWindowLimiter:
    def __init__(
        self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._granted: dict[str, deque[float]] = {}

    def try_acquire(self, key: str) -> bool:
        now = self.clock()
        granted = self._granted.setdefault(key, deque())
        while granted and granted[0] <= now - self.window_s:
            granted.popleft()
        if len(granted) >= self.limit:
            return False
        granted.append(now)
        return True
