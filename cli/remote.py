"""The command line's side of a running daemon: hand a command to it, refuse
the flags that belong to it, follow a download it runs.

The daemon's control protocol is in docs/DAEMON.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer

from peerd.app.control import control_request
from peerd.errors import PeerError

__all__ = ["Failure", "daemon_status", "follow_download", "refuse_daemon_flags"]

POLL_EVERY = 0.25  # seconds between looks at the daemon's status while following

# Options that configure a node: a running daemon's node is already
# configured, so a command handed to it refuses them (name, what to say).
NODE_FLAGS = {
    "host": "--host",
    "port": "--port",
    "bind": "--bind",
    "transport": "--transport",
    "up_limit": "--up-limit",
    "down_limit": "--down-limit",
    "public_addr": "--public-addr",
}


class Failure(PeerError):
    """A failure with its exit code (1 failure, 130 interrupted)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def daemon_status(home: Path) -> dict[str, Any] | None:
    """The running daemon's ``status`` reply, or None when no daemon runs."""
    return control_request(home, {"cmd": "status"}, timeout=30)


def given(ctx: typer.Context, name: str) -> bool:
    """Was option ``name`` given on the command line (not a default or the config)?"""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def refuse_daemon_flags(
    ctx: typer.Context, daemon: dict[str, Any], tracker: tuple[str, int] | None
) -> None:
    """A command going to the daemon: refuse a flag the daemon's node decides.

    Raises:
        PeerError: one line naming the flag and what to do instead.
    """
    for name, flag in NODE_FLAGS.items():
        if name in ctx.params and given(ctx, name):
            if name in ("up_limit", "down_limit"):
                which = "--up" if name == "up_limit" else "--down"
                raise PeerError(
                    f"a daemon runs: {flag} belongs to it; change its limits with "
                    f"`peer limit {which} RATE`, or stop it (`peer stop`) or drop the flag"
                )
            raise PeerError(
                f"a daemon runs: it has its own {flag}; stop it (`peer stop`) or drop the flag"
            )
    if tracker is not None and "tracker" in ctx.params and given(ctx, "tracker"):
        from peerd.app.link import format_address

        ours = daemon.get("daemon", {}).get("tracker")
        if ours and format_address(*tracker) != ours:
            raise PeerError(
                f"a daemon runs with tracker {ours}, not {format_address(*tracker)}; "
                "stop it (`peer stop`) or drop --tracker"
            )


def follow_download(home: Path, cid: str, *, show: bool, stall_timeout: float) -> dict[str, Any]:
    """Show a download the daemon runs until it completes; its summary.

    Ctrl-C on a terminal asks whether to leave it running in the daemon;
    otherwise it is left running (and said so).

    Raises:
        Failure: it failed, was paused or removed, made no progress for
            ``stall_timeout`` s (it stays in the daemon), or Ctrl-C.
    """
    from peerd.app.progress import PolledProgress

    short = cid[:16]
    view = PolledProgress(enabled=show)
    started = time.monotonic()
    last_have, last_progress = -1, started
    try:
        while True:
            reply = control_request(home, {"cmd": "status", "id": cid}, timeout=30)
            if reply is None:
                raise Failure(f"the daemon stopped while downloading {short}")
            rows = reply.get("transfers", [])
            if not rows:
                raise Failure(f"{short} was removed from the daemon")
            row = rows[0]
            view.start(str(row["name"]), int(row["size"]))
            view.update(int(row["have"]), int(row["peers"]))
            state = str(row["state"])
            if state == "seeding":
                view.close()
                result: dict[str, Any] = {"id": cid, **row.get("result", {})}
                result.setdefault("path", row.get("path"))
                result.setdefault("bytes", row["size"])
                result.setdefault("seconds", round(time.monotonic() - started, 3))
                return result
            if state == "paused":
                raise Failure(f"{short} was paused in the daemon; `peer resume {short}` goes on")
            if state == "source changed" or state.startswith("failed: "):
                message = state.removeprefix("failed: ")
                raise Failure(f"{message} (the daemon keeps it listed: `peer rm {short}`)")
            now = time.monotonic()
            if row["have"] != last_have:
                last_have, last_progress = row["have"], now
            elif now - last_progress > stall_timeout:
                raise Failure(
                    f"no progress for {stall_timeout:.0f} s ({row['peers']} peer(s) connected); "
                    f"it stays in the daemon: `peer status {short}`, `peer rm {short}` cancels it"
                )
            time.sleep(POLL_EVERY)
    except KeyboardInterrupt:
        view.close()
        raise _interrupted(home, cid) from None
    finally:
        view.close()


def _interrupted(home: Path, cid: str) -> Failure:
    """Ctrl-C while following: leave it in the daemon (asked on a terminal) or cancel it."""
    short = cid[:16]
    leave = True
    if sys.stdin.isatty():
        # Asked on stderr, where the bar was (stdout may be a pipe).
        sys.stderr.write("leave it downloading in the daemon? [Y/n] ")
        sys.stderr.flush()
        try:
            answer = sys.stdin.readline().strip().lower()
        except KeyboardInterrupt:
            answer = ""
        leave = answer not in ("n", "no")
    if leave:
        return Failure(
            f"left downloading in the daemon: `peer status {short}` follows it, "
            f"`peer rm {short}` cancels it",
            130,
        )
    control_request(home, {"cmd": "rm", "id": cid}, timeout=30)
    return Failure(
        "cancelled; the verified chunks are kept beside the output: the same get resumes", 130
    )
