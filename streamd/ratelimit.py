"""Token buckets: per socket, and per client IP in a bounded table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Bucket:
    rate: float  # tokens per second
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> Bucket:
        return cls(rate, burst, burst, now)

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class KeyedLimiter:
    """One bucket per key (a client IP), at most `max_keys` of them: the least
    recently seen key is forgotten first, which only ever errs towards allowing."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, Bucket] = {}

    def allow(self, key: str, now: float) -> bool:
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = Bucket.full(self.rate, self.burst, now)
            if len(self._buckets) >= self.max_keys:
                del self._buckets[next(iter(self._buckets))]
        self._buckets[key] = bucket  # re-inserted: dict order is recency
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
