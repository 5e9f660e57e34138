"""Sizes and rates as users type them: ``64MiB``, ``10MB``, ``32MiB/s``.

Trio-free, so that the command line can parse its options without
importing the node.
"""

from __future__ import annotations

import re

__all__ = ["parse_rate", "parse_size"]

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
