"""``python -m tracker [--host H] [--port P] [--transport reactor|proactor] [--data DIR]
[--max-memory SIZE] [--max-disk SIZE]``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .server import DEFAULT_PORT, TrackerLimits, run_tracker

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_UNITS |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 1 << 10, "m": 1 << 20}
_UNITS |= {"g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"1GiB"``, ``"512MiB"``, ``"4GB"``, ``"1048576"`` -> bytes (argparse type)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and _UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 4GiB)")
    return int(float(match.group(1)) * unit)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the tracker in the foreground."""
    defaults = TrackerLimits()
    parser = argparse.ArgumentParser(prog="python -m tracker", description="Run a peer tracker.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 = any free port)")
    parser.add_argument(
        "--transport", choices=("reactor", "proactor"), default=None, help="I/O backend"
    )
    parser.add_argument("--data", type=Path, default=None, help="manifest database directory")
    parser.add_argument(
        "--max-memory",
        type=parse_size,
        default=defaults.max_memory,
        help="memory budget for what clients make the tracker hold (default 1GiB, min 64MiB)",
    )
    parser.add_argument(
        "--max-disk",
        type=parse_size,
        default=defaults.max_disk,
        help="disk budget for published manifests (default 4GiB)",
    )
    args = parser.parse_args(argv)
    try:
        limits = TrackerLimits(max_memory=args.max_memory, max_disk=args.max_disk)
    except ValueError as exc:
        parser.error(str(exc))
    return run_tracker(args.host, args.port, args.transport, args.data, limits)


if __name__ == "__main__":
    raise SystemExit(main())
