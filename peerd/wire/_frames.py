"""Frame layer: the 5-byte header, message type numbers and per-type size limits.

Every message is ``type: u8`` + ``length: u32 BE`` + ``length`` body bytes.
The limits below are checked on the header alone, before a single body byte is
buffered for that frame, so a hostile length prefix costs us nothing.
"""

from __future__ import annotations

import enum
import struct

from peerd.errors import RemoteProtocolError

__all__ = [
    "DATA_HEADER",
    "DATA_HEADER_SIZE",
    "FRAME_HEADER",
    "FRAME_HEADER_SIZE",
    "MAX_BODY",
    "MAX_PAYLOAD",
    "FrameType",
    "check_header",
    "encode_data_header",
    "encode_frame",
    "frame_name",
]

KiB = 1024
MiB = 1024 * KiB

FRAME_HEADER = struct.Struct(">BI")
FRAME_HEADER_SIZE = FRAME_HEADER.size  # 5
DATA_HEADER = struct.Struct(">II")  # index, offset
DATA_HEADER_SIZE = DATA_HEADER.size  # 8

#: Largest DATA payload (the largest allowed chunk size).
MAX_PAYLOAD = 64 * MiB


class FrameType(enum.IntEnum):
    """Message type numbers (fixed by docs/PROTOCOL.md)."""

    # peer <-> peer
    HELLO = 1
    BITFIELD = 2
    HAVE = 3
    REQUEST = 4
    DATA = 5
    CANCEL = 6
    REJECT = 7
    MANIFEST_REQUEST = 8
    MANIFEST = 9
    GOODBYE = 10
    PROOF = 11
    KEEPALIVE = 12
    PEX = 13
    # client <-> tracker
    CHALLENGE = 32
    AUTH = 33
    ANNOUNCE = 34
    PEERS = 35
    PUBLISH = 36
    GET_MANIFEST = 37
    TRACKER_MANIFEST = 38
    RESOLVE = 39
    RESOLVED = 40
    SCRAPE = 41
    SCRAPE_RESULT = 42
    OK = 43
    ERROR = 44


_SMALL = 64 * KiB

#: Largest body accepted (and sent) for each frame type.
MAX_BODY: dict[int, int] = {
    FrameType.HELLO: _SMALL,
    # 2**20 chunks -> 128 KiB of bits, plus the msgpack map around them.
    FrameType.BITFIELD: 128 * KiB + 64,
    FrameType.HAVE: _SMALL,
    FrameType.REQUEST: _SMALL,
    FrameType.DATA: DATA_HEADER_SIZE + MAX_PAYLOAD,
    FrameType.CANCEL: _SMALL,
    FrameType.REJECT: _SMALL,
    FrameType.MANIFEST_REQUEST: _SMALL,
    # 2**20 chunk hashes are 32 MiB; the rest is name, signatures and framing.
    FrameType.MANIFEST: 40 * MiB,
    FrameType.GOODBYE: _SMALL,
    FrameType.PROOF: _SMALL,
    FrameType.KEEPALIVE: _SMALL,
    # 50 entries of at most 45 + 3 (ip) + 3 (port) + 1 (array) bytes, plus the map.
    FrameType.PEX: 4 * KiB,
    FrameType.CHALLENGE: _SMALL,
    FrameType.AUTH: _SMALL,
    FrameType.ANNOUNCE: 256 * KiB,
    FrameType.PEERS: 16 * MiB,
    FrameType.PUBLISH: 40 * MiB,
    FrameType.GET_MANIFEST: _SMALL,
    FrameType.TRACKER_MANIFEST: 40 * MiB,
    FrameType.RESOLVE: _SMALL,
    FrameType.RESOLVED: _SMALL,
    FrameType.SCRAPE: 1 * MiB,
    FrameType.SCRAPE_RESULT: 1 * MiB,
    FrameType.OK: _SMALL,
    FrameType.ERROR: _SMALL,
}


_NAMES = {int(t): t.name for t in FrameType}


def frame_name(ftype: int) -> str:
    """Return the protocol name of a frame type, e.g. ``"REQUEST"`` (or ``"type 99"``)."""
    name = _NAMES.get(ftype)
    return f"type {ftype}" if name is None else name


# A member looked up on the enum class costs ~0.1 us per use; hot paths compare
# with plain ints.
_DATA = int(FrameType.DATA)


def check_header(ftype: int, length: int) -> None:
    """Validate a received frame header against the per-type limits.

    Raises:
        RemoteProtocolError: unknown type, body over the limit, or a DATA frame
            too short to hold its 8-byte header and at least one payload byte.
    """
    limit = MAX_BODY.get(ftype)
    if limit is None:
        raise RemoteProtocolError(f"unknown frame type {ftype}")
    if length > limit:
        raise RemoteProtocolError(
            f"{frame_name(ftype)} frame body of {length} bytes exceeds the limit of {limit}"
        )
    if ftype == _DATA and length <= DATA_HEADER_SIZE:
        raise RemoteProtocolError(
            f"DATA frame body of {length} bytes is too short "
            f"(needs the {DATA_HEADER_SIZE}-byte header and at least 1 payload byte)"
        )


def encode_frame(ftype: int, body: bytes) -> bytes:
    """Return header + body for a control frame (the caller checked the size)."""
    return FRAME_HEADER.pack(ftype, len(body)) + body


def encode_data_header(index: int, offset: int, length: int) -> bytes:
    """Return the 13 bytes that precede a DATA payload of ``length`` bytes."""
    return FRAME_HEADER.pack(_DATA, DATA_HEADER_SIZE + length) + DATA_HEADER.pack(index, offset)
