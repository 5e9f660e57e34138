"""The daemon's control socket, client side: one JSON request, one JSON reply.

Kept apart from the daemon (``peerd.app.daemon``) so that the commands that
only talk to a running daemon (``peer status``, ``pause``, ``stop``...) start
without importing Trio and the node.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from peerd.errors import PeerError

__all__ = ["MAX_CONTROL_LINE", "control_request", "socket_path"]

SOCKET_NAME = "control.sock"
MAX_CONTROL_LINE = 1 << 20


def socket_path(home: Path) -> Path:
    return home / SOCKET_NAME


def control_request(
    home: Path, request: dict[str, Any], timeout: float = 600.0
) -> dict[str, Any] | None:
    """Send one JSON request to the daemon of ``home``; None when no daemon runs.

    Raises:
        PeerError: the daemon answered with an error.
    """
    path = socket_path(home)
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a stale socket from a daemon that died
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n") and len(data) < MAX_CONTROL_LINE:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    except OSError as exc:
        raise PeerError(f"talking to the daemon at {path} failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise PeerError(f"the daemon at {path} sent a garbled reply") from None
    if not isinstance(reply, dict):
        raise PeerError(f"the daemon at {path} sent a garbled reply")
    if not reply.get("ok"):
        raise PeerError(str(reply.get("error", "the daemon refused the request")))
    return reply
