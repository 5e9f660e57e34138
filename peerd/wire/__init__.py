"""peer wire protocol, sans-IO: frames, events and per-role connection state machines.

Usage (h11 shape)::

    conn = PeerConnection(initiator=True)
    sock.send(conn.send(Hello(PROTOCOL_VERSION, key, port, content_id)))
    conn.receive_data(sock.recv(65536))        # b"" = EOF
    while (event := conn.next_event()) is not NEED_DATA:
        ...                                    # dispatch on type(event)

Any invalid input raises ``RemoteProtocolError``; misuse on our side raises
``LocalProtocolError``. This package never imports trio or touches a socket.
See docs/PROTOCOL.md for the byte-level specification.
"""

from ._bits import (
    bits_from_flags,
    bits_from_indices,
    bits_length,
    count_bits,
    decode_availability,
    encode_availability,
    flags_from_bits,
    has_bit,
    indices_from_bits,
    validate_bits,
)
from ._connection import (
    MAX_CANCELLED,
    MAX_OUTSTANDING,
    NEED_DATA,
    FrameConnection,
    PeerConnection,
    TrackerClientConnection,
    TrackerServerConnection,
    encode_message,
)
from ._events import (
    ANNOUNCE_EVENTS,
    PROTOCOL_VERSION,
    REJECT_REASONS,
    Announce,
    Auth,
    Bitfield,
    Cancel,
    Challenge,
    Closed,
    DataHeader,
    DataPayload,
    Error,
    Event,
    GetManifest,
    Goodbye,
    Have,
    Hello,
    KeepAlive,
    ManifestRequest,
    ManifestResponse,
    Ok,
    PeerEntry,
    Peers,
    Proof,
    Publish,
    Reject,
    Request,
    Resolve,
    Resolved,
    Scrape,
    ScrapeResult,
    ScrapeStat,
    TrackerManifest,
)
from ._frames import FRAME_HEADER, MAX_BODY, MAX_PAYLOAD, FrameType
from ._state import PeerState, TrackerState

__all__ = [
    "ANNOUNCE_EVENTS",
    "FRAME_HEADER",
    "MAX_BODY",
    "MAX_CANCELLED",
    "MAX_OUTSTANDING",
    "MAX_PAYLOAD",
    "NEED_DATA",
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
    "FrameConnection",
    "FrameType",
    "GetManifest",
    "Goodbye",
    "Have",
    "Hello",
    "KeepAlive",
    "ManifestRequest",
    "ManifestResponse",
    "Ok",
    "PeerConnection",
    "PeerEntry",
    "PeerState",
    "Peers",
    "Proof",
    "Publish",
    "Reject",
    "Request",
    "Resolve",
    "Resolved",
    "Scrape",
    "ScrapeResult",
    "ScrapeStat",
    "TrackerClientConnection",
    "TrackerManifest",
    "TrackerServerConnection",
    "TrackerState",
    "bits_from_flags",
    "bits_from_indices",
    "bits_length",
    "count_bits",
    "decode_availability",
    "encode_availability",
    "encode_message",
    "flags_from_bits",
    "has_bit",
    "indices_from_bits",
    "validate_bits",
]
