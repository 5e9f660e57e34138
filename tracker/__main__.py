"""``python -m tracker [--host H] [--port P] [--transport reactor|proactor] [--data DIR]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .server import DEFAULT_PORT, run_tracker


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the tracker in the foreground."""
    parser = argparse.ArgumentParser(prog="python -m tracker", description="Run a peer tracker.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 = any free port)")
    parser.add_argument(
        "--transport", choices=("reactor", "proactor"), default=None, help="I/O backend"
    )
    parser.add_argument("--data", type=Path, default=None, help="manifest database directory")
    args = parser.parse_args(argv)
    return run_tracker(args.host, args.port, args.transport, args.data)


if __name__ == "__main__":
    raise SystemExit(main())
