"""Events: frozen dataclasses that validate themselves on construction.

Constructing an event with a bad field raises ``LocalProtocolError`` (it is our
own bug); the decoder turns the same failure into ``RemoteProtocolError``.
Bytes-like fields are normalised to ``bytes`` and sequences to tuples, so
events are hashable and compare by value.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from typing import Any

from peerd.errors import LocalProtocolError

from ._frames import MAX_PAYLOAD

__all__ = [
    "ANNOUNCE_EVENTS",
    "PROTOCOL_VERSION",
    "REJECT_REASONS",
    "Announce",
    "Auth",
    "Bitfield",
    "Cancel",
    "Challenge",
    "Closed",
    "DataHeader",
    "DataPayload",
    "Error",
    "Event",
    "GetManifest",
    "Goodbye",
    "Have",
    "Hello",
    "KeepAlive",
    "ManifestRequest",
    "ManifestResponse",
    "Ok",
    "PeerEntry",
    "Peers",
    "Pex",
    "Publish",
    "Reject",
    "Request",
    "Resolve",
    "Resolved",
    "Scrape",
    "ScrapeResult",
    "ScrapeStat",
    "TrackerManifest",
]

PROTOCOL_VERSION = 2

U32_MAX = 2**32 - 1
MAX_VERSION = 0xFFFF
KEY_SIZE = 32
ID_SIZE = 32
NONCE_SIZE = 32
SIGNATURE_SIZE = 64
MAX_CHUNKS = 2**20
MAX_BITS_LEN = MAX_CHUNKS // 8  # a bitfield for the largest allowed manifest
MAX_AVAIL_LEN = 2 * MAX_CHUNKS  # u16 per chunk
MAX_HAVE = 4096
MAX_TEXT = 1024  # reason / message, in characters
MAX_CODE = 64
MAX_PEERS = 200
MAX_PEX = 50  # addresses in one PEX
MAX_WANT = 200
MAX_SCRAPE = 1000
MAX_INTERVAL = 86400
MAX_IP_TEXT = 45  # longest textual IPv6 address
# A manifest must fit a 40 MiB body together with its map key and bin header.
MAX_MANIFEST_SIZE = 40 * 1024 * 1024 - 32

REJECT_REASONS = frozenset({"busy", "missing", "invalid", "banned"})
ANNOUNCE_EVENTS = frozenset({"started", "progress", "completed", "stopped", "periodic"})

_HEX_PREFIX = re.compile(r"[0-9a-f]{16,64}")
_CODE = re.compile(r"[a-z0-9][a-z0-9-]*")


# --- validation helpers -------------------------------------------------------
def is_ip_text(ip: str) -> bool:
    """True if ``ip`` is a textual IPv4 (dotted quad) or IPv6 address.

    ``inet_pton`` is the C parser the socket layer itself uses: about 0.2 us
    against ~3 us for ``ipaddress.ip_address`` (a client decodes up to 200 of
    these per PEERS). It accepts the same forms except IPv6 zone ids
    (``fe80::1%eth0``), which mean nothing to another host anyway.
    """
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except (OSError, ValueError):  # ValueError: embedded NUL or non-ASCII text
        return False
    return True


def _where(obj: object, name: str) -> str:
    return f"{type(obj).__name__}.{name}"


def _int(obj: object, name: str, lo: int, hi: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise LocalProtocolError(f"{_where(obj, name)} must be int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise LocalProtocolError(f"{_where(obj, name)} must be in {lo}..{hi}, got {value}")


def _bytes(obj: object, name: str, lo: int, hi: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
        object.__setattr__(obj, name, value)
    if not isinstance(value, bytes):
        raise LocalProtocolError(f"{_where(obj, name)} must be bytes, got {type(value).__name__}")
    if not lo <= len(value) <= hi:
        want = f"exactly {lo}" if lo == hi else f"{lo}..{hi}"
        raise LocalProtocolError(f"{_where(obj, name)} must be {want} bytes, got {len(value)}")


def _str(obj: object, name: str, lo: int, hi: int) -> str:
    value = getattr(obj, name)
    if not isinstance(value, str):
        raise LocalProtocolError(f"{_where(obj, name)} must be str, got {type(value).__name__}")
    if not lo <= len(value) <= hi:
        raise LocalProtocolError(
            f"{_where(obj, name)} must be {lo}..{hi} characters, got {len(value)}"
        )
    return value


def _choice(obj: object, name: str, choices: frozenset[str]) -> None:
    value = _str(obj, name, 1, 64)
    if value not in choices:
        raise LocalProtocolError(
            f"{_where(obj, name)} must be one of {', '.join(sorted(choices))}, got {value!r}"
        )


def _tuple(obj: object, name: str, lo: int, hi: int, item: type | None = None) -> tuple[Any, ...]:
    value = getattr(obj, name)
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(obj, name, value)
    if not isinstance(value, tuple):
        raise LocalProtocolError(f"{_where(obj, name)} must be a tuple, got {type(value).__name__}")
    if not lo <= len(value) <= hi:
        raise LocalProtocolError(
            f"{_where(obj, name)} must hold {lo}..{hi} items, got {len(value)}"
        )
    if item is not None:
        for element in value:
            if not isinstance(element, item):
                raise LocalProtocolError(
                    f"{_where(obj, name)} items must be {item.__name__}, "
                    f"got {type(element).__name__}"
                )
    return value


def _range_fields(obj: object) -> None:
    _int(obj, "index", 0, U32_MAX)
    _int(obj, "offset", 0, U32_MAX)
    _int(obj, "length", 1, MAX_PAYLOAD)


# --- events -------------------------------------------------------------------
class Event:
    """Base class of every event a connection yields or sends."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """The remote side closed the connection cleanly, at a frame boundary."""


# peer <-> peer ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello(Event):
    """HELLO (1): first message each way; ``port`` 0 means "not listening".

    ``nonce`` is 32 fresh random bytes the other side must sign in its PROOF.
    """

    version: int
    key: bytes
    port: int
    content_id: bytes
    nonce: bytes

    def __post_init__(self) -> None:
        _int(self, "version", 1, MAX_VERSION)
        _bytes(self, "key", KEY_SIZE, KEY_SIZE)
        _int(self, "port", 0, 65535)
        _bytes(self, "content_id", ID_SIZE, ID_SIZE)
        _bytes(self, "nonce", NONCE_SIZE, NONCE_SIZE)


@dataclass(frozen=True, slots=True)
class Proof(Event):
    """PROOF (11): second message each way; proves the HELLO key is the sender's.

    ``signature`` is Ed25519 by the sender's HELLO key over
    ``b"peer-hello-v1\\0" + the other side's HELLO nonce + content_id``.
    """

    signature: bytes

    def __post_init__(self) -> None:
        _bytes(self, "signature", SIGNATURE_SIZE, SIGNATURE_SIZE)


@dataclass(frozen=True, slots=True)
class Bitfield(Event):
    """BITFIELD (2): which chunks the sender has (see ``validate_bits``)."""

    bits: bytes

    def __post_init__(self) -> None:
        _bytes(self, "bits", 0, MAX_BITS_LEN)


@dataclass(frozen=True, slots=True)
class Have(Event):
    """HAVE (3): the sender now has these chunks (1..4096 indices)."""

    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        for i in _tuple(self, "indices", 1, MAX_HAVE):  # one pass: type and range
            if type(i) is not int or not 0 <= i <= U32_MAX:
                if not isinstance(i, int) or isinstance(i, bool):
                    raise LocalProtocolError(
                        f"Have.indices items must be int, got {type(i).__name__}"
                    )
                if not 0 <= i <= U32_MAX:
                    raise LocalProtocolError(
                        f"Have.indices items must be in 0..{U32_MAX}, got {i!r}"
                    )


@dataclass(frozen=True, slots=True)
class Request(Event):
    """REQUEST (4): send me ``length`` bytes of chunk ``index`` from ``offset``."""

    index: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _range_fields(self)


@dataclass(frozen=True, slots=True)
class DataHeader(Event):
    """DATA (5) header: ``length`` payload bytes follow (1..64 MiB)."""

    index: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _range_fields(self)


@dataclass(frozen=True, slots=True)
class DataPayload(Event):
    """A piece of the current DATA payload (never more than what remains)."""

    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _bytes(self, "data", 1, MAX_PAYLOAD)


@dataclass(frozen=True, slots=True)
class Cancel(Event):
    """CANCEL (6): forget an earlier REQUEST with the same fields."""

    index: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _range_fields(self)


@dataclass(frozen=True, slots=True)
class Reject(Event):
    """REJECT (7): a REQUEST will not be served; reason in ``REJECT_REASONS``."""

    index: int
    offset: int
    length: int
    reason: str

    def __post_init__(self) -> None:
        _range_fields(self)
        _choice(self, "reason", REJECT_REASONS)


@dataclass(frozen=True, slots=True)
class ManifestRequest(Event):
    """MANIFEST_REQUEST (8): please send the signed manifest."""


@dataclass(frozen=True, slots=True)
class ManifestResponse(Event):
    """MANIFEST (9): an encoded signed manifest (``Manifest.decode`` checks it)."""

    manifest: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _bytes(self, "manifest", 1, MAX_MANIFEST_SIZE)


@dataclass(frozen=True, slots=True)
class KeepAlive(Event):
    """KEEPALIVE (12): nothing to say, but still here (resets the idle timer)."""


@dataclass(frozen=True, slots=True)
class Goodbye(Event):
    """GOODBYE (10): last message from the sender; it closes afterwards."""

    reason: str

    def __post_init__(self) -> None:
        _str(self, "reason", 0, MAX_TEXT)


@dataclass(frozen=True, slots=True)
class Pex(Event):
    """PEX (13): listen addresses ``(ip, port)`` of other peers of this content.

    1..50 entries; each ip is an address literal (no host names), each port
    1..65535. What the receiver does with them (and what it ignores) is the
    content engine's business (docs/PROTOCOL.md, "Peer exchange").
    """

    added: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        entries = _tuple(self, "added", 1, MAX_PEX)
        if any(type(e) is not tuple for e in entries):
            entries = tuple(tuple(e) if isinstance(e, list) else e for e in entries)
            object.__setattr__(self, "added", entries)
        for entry in entries:
            if type(entry) is not tuple or len(entry) != 2:
                raise LocalProtocolError(f"Pex.added items must be (ip, port), got {entry!r:.80}")
            ip, port = entry
            if not isinstance(ip, str) or not 2 <= len(ip) <= MAX_IP_TEXT or not is_ip_text(ip):
                raise LocalProtocolError(f"Pex.added ip is not an IP address: {ip!r:.80}")
            if type(port) is not int or not 1 <= port <= 65535:
                raise LocalProtocolError(f"Pex.added port must be in 1..65535, got {port!r}")


# client <-> tracker -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Challenge(Event):
    """CHALLENGE (32): the tracker's greeting; AUTH signs the nonce."""

    version: int
    nonce: bytes

    def __post_init__(self) -> None:
        _int(self, "version", 1, MAX_VERSION)
        _bytes(self, "nonce", NONCE_SIZE, NONCE_SIZE)


@dataclass(frozen=True, slots=True)
class Auth(Event):
    """AUTH (33): Ed25519 signature over ``b"peer-tracker-auth-v1\\0" + nonce``."""

    key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _bytes(self, "key", KEY_SIZE, KEY_SIZE)
        _bytes(self, "signature", SIGNATURE_SIZE, SIGNATURE_SIZE)


@dataclass(frozen=True, slots=True)
class Announce(Event):
    """ANNOUNCE (34): join / update / leave a swarm and ask for up to ``want`` peers.

    ``ip``: the address others should dial (the node's ``--public-addr``), or
    "" for the address the announce comes from; the tracker decides whether
    to believe it (docs/PROTOCOL.md, ANNOUNCE).
    """

    content_id: bytes
    port: int
    event: str
    bits: bytes
    want: int
    ip: str = ""

    def __post_init__(self) -> None:
        _bytes(self, "content_id", ID_SIZE, ID_SIZE)
        _int(self, "port", 0, 65535)
        _choice(self, "event", ANNOUNCE_EVENTS)
        _bytes(self, "bits", 0, MAX_BITS_LEN)
        _int(self, "want", 0, MAX_WANT)
        ip = _str(self, "ip", 0, MAX_IP_TEXT)
        if ip and not is_ip_text(ip):
            raise LocalProtocolError(f"Announce.ip is not an IP address: {ip!r}")


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """One element of PEERS.peers (not a frame)."""

    ip: str
    port: int
    key: bytes
    bits: bytes

    def __post_init__(self) -> None:
        ip = _str(self, "ip", 2, MAX_IP_TEXT)
        if not is_ip_text(ip):
            raise LocalProtocolError(f"PeerEntry.ip is not an IP address: {ip!r}")
        _int(self, "port", 0, 65535)
        _bytes(self, "key", KEY_SIZE, KEY_SIZE)
        _bytes(self, "bits", 0, MAX_BITS_LEN)


@dataclass(frozen=True, slots=True)
class Peers(Event):
    """PEERS (35): the tracker's answer to ANNOUNCE; ``availability`` is u16 BE per chunk."""

    content_id: bytes
    interval: int
    peers: tuple[PeerEntry, ...]
    availability: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _bytes(self, "content_id", ID_SIZE, ID_SIZE)
        _int(self, "interval", 1, MAX_INTERVAL)
        _tuple(self, "peers", 0, MAX_PEERS, PeerEntry)
        _bytes(self, "availability", 0, MAX_AVAIL_LEN)
        if len(self.availability) % 2:
            raise LocalProtocolError(
                f"Peers.availability must be u16 per chunk (even length), "
                f"got {len(self.availability)} bytes"
            )


@dataclass(frozen=True, slots=True)
class Publish(Event):
    """PUBLISH (36): store this encoded signed manifest on the tracker."""

    manifest: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _bytes(self, "manifest", 1, MAX_MANIFEST_SIZE)


@dataclass(frozen=True, slots=True)
class GetManifest(Event):
    """GET_MANIFEST (37): ask the tracker for a manifest by content id."""

    content_id: bytes

    def __post_init__(self) -> None:
        _bytes(self, "content_id", ID_SIZE, ID_SIZE)


@dataclass(frozen=True, slots=True)
class TrackerManifest(Event):
    """MANIFEST (38): the tracker's answer to GET_MANIFEST."""

    manifest: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _bytes(self, "manifest", 1, MAX_MANIFEST_SIZE)


@dataclass(frozen=True, slots=True)
class Resolve(Event):
    """RESOLVE (39): expand a 16..64 lowercase hex prefix to a content id."""

    prefix: str

    def __post_init__(self) -> None:
        prefix = _str(self, "prefix", 16, 64)
        if not _HEX_PREFIX.fullmatch(prefix):
            raise LocalProtocolError(f"Resolve.prefix must be lowercase hex, got {prefix!r}")


@dataclass(frozen=True, slots=True)
class Resolved(Event):
    """RESOLVED (40): the unique content id matching a RESOLVE prefix."""

    content_id: bytes

    def __post_init__(self) -> None:
        _bytes(self, "content_id", ID_SIZE, ID_SIZE)


@dataclass(frozen=True, slots=True)
class Scrape(Event):
    """SCRAPE (41): ask for swarm statistics of 1..1000 content ids."""

    content_ids: tuple[bytes, ...]

    def __post_init__(self) -> None:
        for cid in _tuple(self, "content_ids", 1, MAX_SCRAPE, bytes):
            if len(cid) != ID_SIZE:
                raise LocalProtocolError(
                    f"Scrape.content_ids items must be {ID_SIZE} bytes, got {len(cid)}"
                )


@dataclass(frozen=True, slots=True)
class ScrapeStat:
    """One element of SCRAPE_RESULT.stats (not a frame)."""

    content_id: bytes
    seeders: int
    leechers: int
    completed: int

    def __post_init__(self) -> None:
        _bytes(self, "content_id", ID_SIZE, ID_SIZE)
        _int(self, "seeders", 0, U32_MAX)
        _int(self, "leechers", 0, U32_MAX)
        _int(self, "completed", 0, U32_MAX)


@dataclass(frozen=True, slots=True)
class ScrapeResult(Event):
    """SCRAPE_RESULT (42): one ScrapeStat per known content id asked for."""

    stats: tuple[ScrapeStat, ...]

    def __post_init__(self) -> None:
        _tuple(self, "stats", 0, MAX_SCRAPE, ScrapeStat)


@dataclass(frozen=True, slots=True)
class Ok(Event):
    """OK (43): success reply to AUTH, PUBLISH and ANNOUNCE(stopped)."""


@dataclass(frozen=True, slots=True)
class Error(Event):
    """ERROR (44): ``code`` is a short lowercase token (see docs/PROTOCOL.md)."""

    code: str
    message: str

    def __post_init__(self) -> None:
        code = _str(self, "code", 1, MAX_CODE)
        if not _CODE.fullmatch(code):
            raise LocalProtocolError(f"Error.code must be a lowercase token, got {code!r}")
        _str(self, "message", 0, MAX_TEXT)
