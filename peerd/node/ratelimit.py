"""Token buckets for ``--up-limit`` / ``--down-limit`` (their values: ``peerd.units``).

The bucket itself is pure (:class:`TokenBucket` takes ``now``); the async
wrapper :class:`RateLimiter` sleeps on Trio's clock until enough tokens are
there. Limits apply to payload bytes, per process.
"""

from __future__ import annotations

import trio

__all__ = ["RateLimiter", "TokenBucket"]


class TokenBucket:
    """Pure token bucket: ``rate`` tokens per second, up to ``burst`` banked.

    Also the tracker's per-connection and per-address message limits.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens (may go into debt); return seconds to wait before going on."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class RateLimiter:
    """Async limiter around a :class:`TokenBucket`; ``None`` rate = unlimited."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self._bucket: TokenBucket | None = None

    def set_rate(self, rate: int | None) -> None:
        """Change the limit now (``peer limit``); sessions share this object,
        so every connection follows at its next chunk."""
        self.rate = rate
        self._bucket = None

    async def consume(self, amount: int) -> None:
        if self.rate is None:
            return
        now = trio.current_time()
        if self._bucket is None:
            # A small burst keeps the long-run rate exact and short-term smooth.
            self._bucket = TokenBucket(self.rate, max(self.rate / 10, 64 * 1024), now)
        delay = self._bucket.take(amount, now)
        if delay > 0:
            await trio.sleep(delay)
