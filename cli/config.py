"""``$PEER_HOME/config.toml``: defaults a user sets once.

Precedence, highest first: a command-line flag, an environment variable
(``PEER_TRACKER``, ``PEER_TRANSPORT``), this file, the built-in default.
Every value is checked when the file is read; a bad one is one error naming
the file and the key.

    tracker = "tracker.example.org:7070"   # or a list: tried in order
    host = "::"
    port = 6881                            # the daemon's and `peer share`'s
    up_limit = "2MiB"
    down_limit = "10MB"
    download_dir = "~/Downloads"
    transport = "reactor"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerd.app.link import parse_address
from peerd.errors import PeerError
from peerd.units import parse_rate

__all__ = ["CONFIG_NAME", "Config", "load_config"]

CONFIG_NAME = "config.toml"
MAX_CONFIG_BYTES = 1 << 20
TRANSPORTS = ("reactor", "proactor")


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    tracker: str | None = None
    host: str | None = None
    port: int | None = None
    up_limit: str | None = None
    down_limit: str | None = None
    download_dir: Path | None = None
    transport: str | None = None

    def command_defaults(self) -> dict[str, dict[str, Any]]:
        """Click's ``default_map``: what this file sets for each networked command.

        ``port`` is for the long-running nodes (``daemon``, ``share``) only: a
        ``get -o -`` or ``stream`` beside a daemon must not try its port.
        """
        common = {
            k: v
            for k, v in (
                ("host", self.host),
                ("up_limit", self.up_limit),
                ("down_limit", self.down_limit),
            )
            if v is not None
        }
        port = {"port": self.port} if self.port is not None else {}
        return {
            "share": {**common, **port},
            "daemon": {**common, **port},
            "get": dict(common),
            "stream": dict(common),
        }


def load_config(home: Path) -> Config:
    """The config file of ``home``; an empty :class:`Config` if there is none.

    Raises:
        PeerError: unreadable, not TOML, an unknown key or a bad value
            (the message names the file and the key).
    """
    path = home / CONFIG_NAME
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise PeerError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise PeerError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is it the right file?")
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PeerError(f"{path}: not valid TOML: {exc}") from None

    def bad(key: str, why: str) -> PeerError:
        return PeerError(f"{path}: {key}: {why}")

    known = {"tracker", "host", "port", "up_limit", "down_limit", "download_dir", "transport"}
    for key in table:
        if key not in known:
            raise bad(key, f"unknown key (known: {', '.join(sorted(known))})")

    def text(key: str) -> str | None:
        value = table.get(key)
        if value is not None and not isinstance(value, str):
            raise bad(key, f"must be a string, not {type(value).__name__}")
        return value

    tracker = table.get("tracker")
    if isinstance(tracker, list):
        if not tracker or not all(isinstance(t, str) for t in tracker):
            raise bad("tracker", 'must be "HOST:PORT" or a non-empty list of them')
        names = tracker
    elif tracker is not None and not isinstance(tracker, str):
        raise bad("tracker", 'must be "HOST:PORT" or a non-empty list of them')
    else:
        names = [] if tracker is None else [tracker]
    for name in names:
        try:
            parse_address(name, "tracker")
        except PeerError as exc:
            raise bad("tracker", str(exc)) from None
    # Several: tried in order, one at a time (as --tracker A,B,C).
    tracker = ",".join(names) if names else None
    port = table.get("port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
    ):
        raise bad("port", f"{port!r} is not a port: use 1-65535, or 0 for any free port")
    limits: dict[str, str | None] = {}
    for key in ("up_limit", "down_limit"):
        value = table.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value is not None and not isinstance(value, str):
            raise bad(key, 'must be a rate such as "32MiB" (bytes per second)')
        try:
            parse_rate(value)
        except ValueError as exc:
            raise bad(key, str(exc)) from None
        limits[key] = value
    transport = text("transport")
    if transport is not None and transport not in TRANSPORTS:
        raise bad("transport", f"{transport!r}: use reactor or proactor")
    directory = text("download_dir")
    return Config(
        path=path,
        tracker=tracker,
        host=text("host"),
        port=port,
        up_limit=limits["up_limit"],
        down_limit=limits["down_limit"],
        download_dir=Path(directory).expanduser() if directory else None,
        transport=transport,
    )
