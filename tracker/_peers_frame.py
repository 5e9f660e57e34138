"""PEERS frames joined from pieces the tracker keeps encoded.

The tracker answers most announces from peers it stores half-encoded (each
peer's address and port as the start of its PEERS entry, see ``_peer_table``)
and from rankings whose frames it caches, so an answer is a concatenation,
not an encoding of ``Peers`` events. The pieces here make exactly the bytes
``peerd.wire.encode_message(Peers(...))`` makes for the same answer (the
layout is docs/PROTOCOL.md's PEERS; tests/test_tracker_index.py compares
the two). They do not validate entries: the index's are valid by
construction (canonical IP text, two-byte ports, authenticated 32-byte
keys, bitmaps checked on the way in).
"""

from __future__ import annotations

import msgpack

from peerd.wire import FRAME_HEADER, FrameType

__all__ = ["KEY_HEADER", "avail_field", "bin_header", "body_head", "entry_head", "frame_header"]

KEY_HEADER = b"\xc4\x20"  # msgpack bin 8 of a 32-byte key
_ID_SIZE = 32
# The PEERS body is a map of four keys in this order: id, interval, peers, avail.
_ID = b"\x84" + msgpack.packb("id") + b"\xc4" + bytes((_ID_SIZE,))
_INTERVAL = msgpack.packb("interval")
_PEERS = msgpack.packb("peers")
_AVAIL = msgpack.packb("avail")
_PEERS_TYPE = int(FrameType.PEERS)
_pack_header = FRAME_HEADER.pack


def bin_header(n: int) -> bytes:
    """msgpack bin header for ``n`` bytes (bin 8 / 16 / 32, as msgpack picks)."""
    if n < 256:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 65536:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def entry_head(ip: str, port: int) -> bytes:
    """The start of a PEERS entry ``[ip, port, key, bits]``: up to its key.

    The entry is ``entry_head(ip, port) + KEY_HEADER + key + bin_header(len(bits)) + bits``.
    """
    return b"\x94" + msgpack.packb(ip) + msgpack.packb(port)


def body_head(content_id: bytes, interval: int, count: int) -> bytes:
    """The bytes of a PEERS body before its ``count`` entries."""
    if len(content_id) != _ID_SIZE:  # behind a fixed bin 8 header
        raise ValueError(f"a content id is {_ID_SIZE} bytes, not {len(content_id)}")
    array = bytes((0x90 | count,)) if count < 16 else b"\xdc" + count.to_bytes(2, "big")
    return b"".join((_ID, content_id, _INTERVAL, msgpack.packb(interval), _PEERS, array))


def avail_field(availability: bytes) -> bytes:
    """The bytes of a PEERS body after its entries: the ``avail`` field."""
    return b"".join((_AVAIL, bin_header(len(availability)), availability))


def frame_header(body_size: int) -> bytes:
    """The 5-byte frame header of a PEERS body of ``body_size`` bytes."""
    return _pack_header(_PEERS_TYPE, body_size)
