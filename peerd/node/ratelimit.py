"""Token buckets for ``--up-limit`` / ``--down-limit``, and rate parsing.

The bucket itself is pure (:class:`TokenBucket` takes ``now``); the async
wrapper :class:`RateLimiter` sleeps on Trio's clock until enough tokens are
there. Limits apply to payload bytes, per process.
"""

from __future__ import annotations

import re

import trio

__all__ = ["RateLimiter", "TokenBucket", "parse_rate", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"64MiB"`` -> 67108864; ``"10MB"`` -> 10000000; plain numbers are bytes.

    Raises:
        ValueError: with a message naming the accepted units.
    """
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if unit.endswith("/s"):
        unit = unit[:-2]
    if not m or unit not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as a size: use a number with B, KB, KiB, MB, MiB, GB or GiB"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def parse_rate(text: str | None) -> int | None:
    """Parse a per-second rate such as ``32MiB``; ``None``/``0``/``unlimited`` = no limit."""
    if text is None or text.strip().lower() in ("", "0", "unlimited", "none"):
        return None
    cleaned = text.strip()
    if cleaned.lower().endswith("/s"):
        cleaned = cleaned[:-2]
    rate = parse_size(cleaned)
    return rate or None


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
