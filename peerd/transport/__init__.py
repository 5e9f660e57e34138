"""One stream contract, two backends: ``reactor`` (epoll) and ``proactor`` (io_uring).

A ``Stream`` is a ``trio.abc.HalfCloseableStream`` plus ``peer_address``,
``fileno``, ``recv_exactly_into`` and ``sendfile``. :func:`get_transport` is
the one place a backend is chosen.
"""

from __future__ import annotations

import os

from peerd.errors import TransportUnavailable

from ._base import (
    DEFAULT_BACKLOG,
    Listener,
    Mux,
    Stream,
    StreamBroken,
    StreamClosed,
    Transport,
    is_wildcard,
)

__all__ = [
    "DEFAULT_BACKLOG",
    "TRANSPORTS",
    "Listener",
    "Mux",
    "Stream",
    "StreamBroken",
    "StreamClosed",
    "Transport",
    "get_transport",
    "is_wildcard",
]

TRANSPORTS = ("reactor", "proactor")
ENV_VAR = "PEER_TRANSPORT"


def get_transport(name: str | None = None) -> Transport:
    """Return the transport called ``name`` (else ``$PEER_TRANSPORT``, else ``reactor``).

    Raises:
        TransportUnavailable: unknown name, or io_uring cannot be used here
            (the message says why in one line and suggests ``--transport reactor``).
    """
    chosen = name or os.environ.get(ENV_VAR) or "reactor"
    if chosen == "reactor":
        from .reactor import ReactorTransport

        return ReactorTransport()
    if chosen == "proactor":
        try:
            from .proactor import ProactorTransport, probe
        except ImportError as exc:
            raise TransportUnavailable(
                f"proactor transport unavailable: {exc}; `--transport reactor` works"
            ) from exc
        probe()
        return ProactorTransport()
    raise TransportUnavailable(
        f"unknown transport {chosen!r}: choose one of {', '.join(TRANSPORTS)}"
    )
