"""The per-caller rate limit of the HTTP layer: a token bucket per API key (or client address)."""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """Token bucket per caller: ``per_minute`` requests, bursts up to ``per_minute``; 0 disables it.

    State lives in each ingress replica, so with R replicas a key may get up to R x the limit.
    """

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last time)
        self._lock = threading.Lock()

    def allow(self, caller: str) -> float:
        """0.0 when allowed (a token is taken), else the seconds to wait before the next request."""
        if self.capacity <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(caller, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[caller] = (tokens - 1.0, now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1.0 - tokens) / self.rate
