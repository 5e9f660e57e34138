"""Body codec: events <-> msgpack maps with a strict schema.

Decoding is deliberately unforgiving: the body must be exactly one msgpack
map with exactly the listed string keys, each value of exactly the listed
msgpack type (``bool`` is not an int, ``str`` is not ``bin``). Container sizes
are capped inside msgpack itself (``max_*_len``) so a hostile body cannot make
the unpacker build huge lists. Every failure becomes ``RemoteProtocolError``
naming the message and the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from peerd.errors import LocalProtocolError, RemoteProtocolError

from . import _events as ev
from ._frames import MAX_BODY, FrameType, frame_name

__all__ = ["EVENT_TYPES", "decode_body", "encode_body"]

_TYPE_NAMES = {int: "int", bytes: "bin", str: "str", list: "array"}


def _typename(value: object) -> str:
    if value is None:
        return "nil"
    return {
        bool: "bool",
        int: "int",
        float: "float",
        bytes: "bin",
        str: "str",
        list: "array",
        dict: "map",
    }.get(type(value), type(value).__name__)


class _Fields:
    """Typed access to a decoded map; errors name the message and the field."""

    __slots__ = ("_map", "_name")

    def __init__(self, name: str, mapping: dict[Any, Any]) -> None:
        self._name = name
        self._map = mapping

    def _get(self, key: str, typ: type) -> Any:
        value = self._map[key]
        if type(value) is not typ:
            raise RemoteProtocolError(
                f"{self._name}: field {key!r} must be {_TYPE_NAMES[typ]}, got {_typename(value)}"
            )
        return value

    def get_int(self, key: str) -> int:
        return self._get(key, int)  # type: ignore[no-any-return]

    def get_bin(self, key: str) -> bytes:
        return self._get(key, bytes)  # type: ignore[no-any-return]

    def get_str(self, key: str) -> str:
        return self._get(key, str)  # type: ignore[no-any-return]

    def get_str_or(self, key: str, default: str) -> str:
        """An optional str field: ``default`` when the key is left out."""
        return self.get_str(key) if key in self._map else default

    def get_list(self, key: str) -> list[Any]:
        return self._get(key, list)  # type: ignore[no-any-return]

    def items(self, key: str, typ: type, what: str) -> list[Any]:
        """A list whose items all have exactly ``typ``."""
        values = self.get_list(key)
        for i, value in enumerate(values):
            if type(value) is not typ:
                raise RemoteProtocolError(
                    f"{self._name}: field {key!r} item {i} must be {what}, got {_typename(value)}"
                )
        return values

    def tuples(self, key: str, types: tuple[type, ...]) -> list[list[Any]]:
        """A list of fixed-shape arrays, e.g. PEERS.peers."""
        rows = self.get_list(key)
        shape = ", ".join(_TYPE_NAMES[t] for t in types)
        for i, row in enumerate(rows):
            if (
                type(row) is not list
                or len(row) != len(types)
                or any(type(v) is not t for v, t in zip(row, types, strict=True))
            ):
                raise RemoteProtocolError(
                    f"{self._name}: field {key!r} item {i} must be [{shape}], got {row!r:.80}"
                )
        return rows


@dataclass(frozen=True, slots=True)
class _Spec:
    keys: tuple[str, ...]
    max_array: int
    encode: Callable[[Any], dict[str, Any]]
    decode: Callable[[_Fields], ev.Event]
    optional: tuple[str, ...] = ()  # keys that may be left out (listed after ``keys``)


def _range(e: Any) -> dict[str, Any]:
    return {"idx": e.index, "off": e.offset, "len": e.length}


_RANGE_KEYS = ("idx", "off", "len")

_SPECS: dict[int, _Spec] = {
    FrameType.HELLO: _Spec(
        ("v", "key", "port", "id", "nonce"),
        0,
        lambda e: {
            "v": e.version,
            "key": e.key,
            "port": e.port,
            "id": e.content_id,
            "nonce": e.nonce,
        },
        lambda f: ev.Hello(
            f.get_int("v"), f.get_bin("key"), f.get_int("port"), f.get_bin("id"), f.get_bin("nonce")
        ),
    ),
    FrameType.PROOF: _Spec(
        ("sig",), 0, lambda e: {"sig": e.signature}, lambda f: ev.Proof(f.get_bin("sig"))
    ),
    FrameType.BITFIELD: _Spec(
        ("bits",), 0, lambda e: {"bits": e.bits}, lambda f: ev.Bitfield(f.get_bin("bits"))
    ),
    FrameType.HAVE: _Spec(
        ("idx",),
        ev.MAX_HAVE,
        lambda e: {"idx": list(e.indices)},
        lambda f: ev.Have(tuple(f.items("idx", int, "int"))),
    ),
    FrameType.REQUEST: _Spec(
        _RANGE_KEYS,
        0,
        _range,
        lambda f: ev.Request(f.get_int("idx"), f.get_int("off"), f.get_int("len")),
    ),
    FrameType.CANCEL: _Spec(
        _RANGE_KEYS,
        0,
        _range,
        lambda f: ev.Cancel(f.get_int("idx"), f.get_int("off"), f.get_int("len")),
    ),
    FrameType.REJECT: _Spec(
        (*_RANGE_KEYS, "reason"),
        0,
        lambda e: {**_range(e), "reason": e.reason},
        lambda f: ev.Reject(
            f.get_int("idx"), f.get_int("off"), f.get_int("len"), f.get_str("reason")
        ),
    ),
    FrameType.MANIFEST_REQUEST: _Spec((), 0, lambda e: {}, lambda f: ev.ManifestRequest()),
    FrameType.KEEPALIVE: _Spec((), 0, lambda e: {}, lambda f: ev.KeepAlive()),
    FrameType.MANIFEST: _Spec(
        ("manifest",),
        0,
        lambda e: {"manifest": e.manifest},
        lambda f: ev.ManifestResponse(f.get_bin("manifest")),
    ),
    FrameType.GOODBYE: _Spec(
        ("reason",), 0, lambda e: {"reason": e.reason}, lambda f: ev.Goodbye(f.get_str("reason"))
    ),
    FrameType.PEX: _Spec(
        ("added",),
        ev.MAX_PEX,
        lambda e: {"added": [[ip, port] for ip, port in e.added]},
        lambda f: ev.Pex(tuple((ip, port) for ip, port in f.tuples("added", (str, int)))),
    ),
    FrameType.CHALLENGE: _Spec(
        ("v", "nonce"),
        0,
        lambda e: {"v": e.version, "nonce": e.nonce},
        lambda f: ev.Challenge(f.get_int("v"), f.get_bin("nonce")),
    ),
    FrameType.AUTH: _Spec(
        ("key", "sig"),
        0,
        lambda e: {"key": e.key, "sig": e.signature},
        lambda f: ev.Auth(f.get_bin("key"), f.get_bin("sig")),
    ),
    FrameType.ANNOUNCE: _Spec(
        ("id", "port", "event", "bits", "want"),
        0,
        lambda e: {
            "id": e.content_id,
            "port": e.port,
            "event": e.event,
            "bits": e.bits,
            "want": e.want,
            **({"ip": e.ip} if e.ip else {}),
        },
        lambda f: ev.Announce(
            f.get_bin("id"),
            f.get_int("port"),
            f.get_str("event"),
            f.get_bin("bits"),
            f.get_int("want"),
            f.get_str_or("ip", ""),
        ),
        optional=("ip",),
    ),
    FrameType.PEERS: _Spec(
        ("id", "interval", "peers", "avail"),
        ev.MAX_PEERS,
        lambda e: {
            "id": e.content_id,
            "interval": e.interval,
            "peers": [[p.ip, p.port, p.key, p.bits] for p in e.peers],
            "avail": e.availability,
        },
        lambda f: ev.Peers(
            f.get_bin("id"),
            f.get_int("interval"),
            tuple(ev.PeerEntry(*row) for row in f.tuples("peers", (str, int, bytes, bytes))),
            f.get_bin("avail"),
        ),
    ),
    FrameType.PUBLISH: _Spec(
        ("manifest",),
        0,
        lambda e: {"manifest": e.manifest},
        lambda f: ev.Publish(f.get_bin("manifest")),
    ),
    FrameType.GET_MANIFEST: _Spec(
        ("id",), 0, lambda e: {"id": e.content_id}, lambda f: ev.GetManifest(f.get_bin("id"))
    ),
    FrameType.TRACKER_MANIFEST: _Spec(
        ("manifest",),
        0,
        lambda e: {"manifest": e.manifest},
        lambda f: ev.TrackerManifest(f.get_bin("manifest")),
    ),
    FrameType.RESOLVE: _Spec(
        ("prefix",), 0, lambda e: {"prefix": e.prefix}, lambda f: ev.Resolve(f.get_str("prefix"))
    ),
    FrameType.RESOLVED: _Spec(
        ("id",), 0, lambda e: {"id": e.content_id}, lambda f: ev.Resolved(f.get_bin("id"))
    ),
    FrameType.SCRAPE: _Spec(
        ("ids",),
        ev.MAX_SCRAPE,
        lambda e: {"ids": list(e.content_ids)},
        lambda f: ev.Scrape(tuple(f.items("ids", bytes, "bin"))),
    ),
    FrameType.SCRAPE_RESULT: _Spec(
        ("stats",),
        ev.MAX_SCRAPE,
        lambda e: {"stats": [[s.content_id, s.seeders, s.leechers, s.completed] for s in e.stats]},
        lambda f: ev.ScrapeResult(
            tuple(ev.ScrapeStat(*row) for row in f.tuples("stats", (bytes, int, int, int)))
        ),
    ),
    FrameType.OK: _Spec((), 0, lambda e: {}, lambda f: ev.Ok()),
    FrameType.ERROR: _Spec(
        ("code", "message"),
        0,
        lambda e: {"code": e.code, "message": e.message},
        lambda f: ev.Error(f.get_str("code"), f.get_str("message")),
    ),
}
# The exact key set of each message body (a C-level comparison per decode),
# and for the few with optional keys, every key they may have.
_KEYSETS: dict[int, frozenset[str]] = {t: frozenset(spec.keys) for t, spec in _SPECS.items()}
_ALLKEYS: dict[int, frozenset[str]] = {
    t: frozenset(spec.keys + spec.optional) for t, spec in _SPECS.items() if spec.optional
}

#: Which frame type each sendable event class becomes (DATA is handled apart).
EVENT_TYPES: dict[type, int] = {
    ev.Hello: FrameType.HELLO,
    ev.Bitfield: FrameType.BITFIELD,
    ev.Have: FrameType.HAVE,
    ev.Request: FrameType.REQUEST,
    ev.DataHeader: FrameType.DATA,
    ev.Cancel: FrameType.CANCEL,
    ev.Reject: FrameType.REJECT,
    ev.ManifestRequest: FrameType.MANIFEST_REQUEST,
    ev.KeepAlive: FrameType.KEEPALIVE,
    ev.ManifestResponse: FrameType.MANIFEST,
    ev.Goodbye: FrameType.GOODBYE,
    ev.Proof: FrameType.PROOF,
    ev.Pex: FrameType.PEX,
    ev.Challenge: FrameType.CHALLENGE,
    ev.Auth: FrameType.AUTH,
    ev.Announce: FrameType.ANNOUNCE,
    ev.Peers: FrameType.PEERS,
    ev.Publish: FrameType.PUBLISH,
    ev.GetManifest: FrameType.GET_MANIFEST,
    ev.TrackerManifest: FrameType.TRACKER_MANIFEST,
    ev.Resolve: FrameType.RESOLVE,
    ev.Resolved: FrameType.RESOLVED,
    ev.Scrape: FrameType.SCRAPE,
    ev.ScrapeResult: FrameType.SCRAPE_RESULT,
    ev.Ok: FrameType.OK,
    ev.Error: FrameType.ERROR,
}


def encode_body(ftype: int, event: ev.Event) -> bytes:
    """Encode a (valid, self-checked) control event as its msgpack body.

    Raises:
        LocalProtocolError: the encoded body exceeds the frame type's limit
            (e.g. a PEERS list whose bitfields do not fit 16 MiB).
    """
    body: bytes = msgpack.packb(_SPECS[ftype].encode(event), use_bin_type=True)
    if len(body) > MAX_BODY[ftype]:
        raise LocalProtocolError(
            f"{frame_name(ftype)} body of {len(body)} bytes exceeds the limit of "
            f"{MAX_BODY[ftype]}; send less"
        )
    return body


# What msgpack can raise on hostile input: ValueError covers ExtraData,
# FormatError, StackError, UnicodeDecodeError and the max_*_len checks;
# TypeError covers unhashable map keys.
_UNPACK_ERRORS = (ValueError, TypeError, OverflowError, msgpack.UnpackException)


def decode_body(ftype: int, body: bytes | memoryview) -> ev.Event:
    """Decode and validate the body of a control frame of type ``ftype``.

    Raises:
        RemoteProtocolError: malformed msgpack, wrong keys, wrong field types,
            or field values outside their limits.
    """
    size = len(body)
    name = frame_name(ftype)
    spec = _SPECS[ftype]
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=spec.max_array,
            max_map_len=len(spec.keys) + len(spec.optional),
            max_ext_len=0,
        )
    except _UNPACK_ERRORS as exc:
        detail = str(exc) or "invalid encoding"
        raise RemoteProtocolError(
            f"{name}: malformed msgpack body ({type(exc).__name__}: {detail})"
        ) from None
    if type(obj) is not dict:
        raise RemoteProtocolError(f"{name}: body must be a msgpack map, got {_typename(obj)}")
    if obj.keys() != _KEYSETS[ftype] and not (
        ftype in _ALLKEYS and _KEYSETS[ftype] <= obj.keys() <= _ALLKEYS[ftype]
    ):
        got = sorted(repr(k) for k in obj)
        may = f" (and optionally {list(spec.optional)})" if spec.optional else ""
        raise RemoteProtocolError(
            f"{name}: body must have exactly the keys {list(spec.keys)}{may}, "
            f"got [{', '.join(got)}]"
        )
    try:
        return spec.decode(_Fields(name, obj))
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"{name}: {exc}") from None
