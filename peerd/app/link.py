"""Links: everything a getter needs in one line (docs/PROTOCOL.md, "Links").

``peer:<content id>?pk=<publisher key>&tr=<tracker>&x=<peer>``: the content
id (64 hex), the key whose signature the manifest must carry, and where to
look (trackers and peers, ``HOST:PORT`` or ``[IPv6]:PORT``, repeatable).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from peerd.errors import PeerError

__all__ = ["MAX_LINK", "Link", "format_address", "parse_address", "parse_link"]

SCHEME = "peer:"
MAX_LINK = 2048  # characters
MAX_TRACKERS = 8
MAX_PEERS = 16
_HEX = frozenset("0123456789abcdef")
# A DNS name, an IPv4 address or an IPv6 address (no zone index).
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:")

Address = tuple[str, int]


class LinkError(PeerError):
    """Text that is not a usable link; the message says what is wrong."""


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, or ``[IPv6]:PORT``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str, what: str) -> Address:
    """``HOST:PORT``, ``[IPv6]:PORT`` (port 1-65535).

    Raises:
        PeerError: anything else, with an example of what to write.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") != host.endswith("]"):
        host = ""
    host = host[1:-1] if host.startswith("[") else host
    ok = sep and host and port.isdigit() and 0 < int(port) < 65536
    if not ok or not set(host) <= _HOST_CHARS or len(host) > 253:
        raise PeerError(
            f"cannot read {what} address {text[:80]!r}: use HOST:PORT (port 1-65535), "
            "e.g. 192.0.2.7:7070 or [2001:db8::7]:7070"
        )
    return host, int(port)


def _hex32(text: str, what: str) -> bytes:
    cleaned = text.lower()
    if len(cleaned) != 64 or not set(cleaned) <= _HEX:
        raise LinkError(f"the link's {what} is not 64 hex characters: {text[:80]!r}")
    return bytes.fromhex(cleaned)


@dataclass(frozen=True)
class Link:
    """A parsed link."""

    content_id: bytes
    key: bytes | None = None
    trackers: tuple[Address, ...] = ()
    peers: tuple[Address, ...] = ()

    def __str__(self) -> str:
        params = []
        if self.key is not None:
            params.append(f"pk={self.key.hex()}")
        params += [f"tr={format_address(*a)}" for a in self.trackers]
        params += [f"x={format_address(*a)}" for a in self.peers]
        query = "?" + "&".join(params) if params else ""
        return f"{SCHEME}{self.content_id.hex()}{query}"


def is_link(text: str) -> bool:
    return text.strip().lower().startswith(SCHEME)


def parse_link(text: str) -> Link:
    """Read a link (surrounding blanks ignored; unknown parameters ignored).

    Raises:
        LinkError: not a link, or a part of it is malformed or over its limit.
    """
    text = text.strip()
    if len(text) > MAX_LINK:
        raise LinkError(f"the link is {len(text)} characters; at most {MAX_LINK}")
    if not text.lower().startswith(SCHEME):
        raise LinkError(f"not a peer link (they start with {SCHEME!r}): {text[:80]!r}")
    body = text[len(SCHEME) :]
    ident, _, query = body.partition("?")
    cid = _hex32(ident, "content id")
    key: bytes | None = None
    trackers: list[Address] = []
    peers: list[Address] = []
    for part in query.split("&") if query else ():
        name, eq, raw = part.partition("=")
        value = unquote(raw)
        if not eq:
            raise LinkError(f"the link's parameter {part[:80]!r} has no value (use name=value)")
        if name == "pk":
            if key is not None:
                raise LinkError("the link names two publisher keys (pk=)")
            key = _hex32(value, "publisher key (pk=)")
        elif name == "tr":
            trackers.append(parse_address(value, "the link's tracker (tr=)"))
        elif name == "x":
            peers.append(parse_address(value, "the link's peer (x=)"))
        # Other names: a later version's; ignored.
    if len(trackers) > MAX_TRACKERS or len(peers) > MAX_PEERS:
        raise LinkError(
            f"the link names {len(trackers)} trackers and {len(peers)} peers; "
            f"at most {MAX_TRACKERS} and {MAX_PEERS}"
        )
    return Link(cid, key, tuple(dict.fromkeys(trackers)), tuple(dict.fromkeys(peers)))
