"""A hostile test peer, written from docs/PROTOCOL.md alone.

It deliberately imports nothing of ``peerd`` (no wire, session or node code):
framing, msgpack bodies, the version 2 handshake (HELLO, PROOF over both HELLOs) and the tracker's
CHALLENGE / AUTH / ANNOUNCE are implemented here with ``msgpack`` and
``cryptography`` straight from the document, so the tests check the spec as
much as the reference peer.

Theory of operation: :class:`HostilePeer` is a plain-socket server run by
threads (one per connection) inside the test process. It answers the
handshake correctly and then misbehaves in one chosen way (``mode``):

* ``honest``   serves real bytes read from the file;
* ``corrupt``  serves wrong bytes for the chunks in ``corrupt`` (real bytes
  for the others);
* ``liar``     advertises every chunk but holds only those in ``holds``:
  the others are answered with REJECT ``missing``;
* ``silent``   accepts requests and never answers them;
* ``drip``     answers with a DATA header, then one payload byte per second
  (slowloris).

Everything it does is recorded (``served``, ``corrupted``, ``requests``,
``goodbyes``) so a test can assert what the real peer made of it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# Message types (PROTOCOL.md, "Peer messages" and "Tracker messages").
HELLO, BITFIELD, HAVE, REQUEST, DATA, CANCEL, REJECT = 1, 2, 3, 4, 5, 6, 7
MANIFEST_REQUEST, MANIFEST, GOODBYE, PROOF = 8, 9, 10, 11
CHALLENGE, AUTH, ANNOUNCE, PEERS, PUBLISH, GET_MANIFEST, T_MANIFEST = 32, 33, 34, 35, 36, 37, 38
OK, ERROR = 43, 44

KEEPALIVE = 12
VERSION = 2
PROOF_CONTEXT = b"peer-proof-v2\x00"
TRANSCRIPT_CONTEXT = b"peer-transcript-v2\x00"
AUTH_CONTEXT = b"peer-tracker-auth-v1\x00"
HEADER = struct.Struct(">BI")
DATA_HEADER = struct.Struct(">II")


# --- framing -----------------------------------------------------------------------
def frame(kind: int, body: bytes) -> bytes:
    """One frame: type u8, length u32 big-endian, body."""
    return HEADER.pack(kind, len(body)) + body


def message(kind: int, **fields: Any) -> bytes:
    """A control frame whose body is the msgpack map of ``fields`` (str keys, bin bytes)."""
    return frame(kind, msgpack.packb(fields, use_bin_type=True))


def data_frame(index: int, offset: int, payload: bytes) -> bytes:
    """A DATA frame: 8-byte index/offset header then the raw payload."""
    return frame(DATA, DATA_HEADER.pack(index, offset) + payload)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes; ConnectionError on EOF."""
    parts = bytearray()
    while len(parts) < n:
        got = sock.recv(n - len(parts))
        if not got:
            raise ConnectionError("EOF")
        parts += got
    return bytes(parts)


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """Read one frame: (type, body bytes)."""
    kind, length = HEADER.unpack(recv_exactly(sock, 5))
    return kind, recv_exactly(sock, length)


def read_raw_message(sock: socket.socket) -> tuple[int, dict[str, Any], bytes]:
    """Like ``read_message``, also returning the whole frame as received."""
    kind, body = read_frame(sock)
    return kind, msgpack.unpackb(body, raw=False), HEADER.pack(kind, len(body)) + body


def proof_payload(role: bytes, dialer_hello: bytes, acceptor_hello: bytes) -> bytes:
    """What PROOF signs: context, the signer's role (b"D" or b"A") and the
    SHA-256 transcript of both HELLO frames, the dialer's first."""
    transcript = hashlib.sha256(TRANSCRIPT_CONTEXT + dialer_hello + acceptor_hello).digest()
    return PROOF_CONTEXT + role + transcript


def read_message(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """Read one control frame and decode its msgpack body (DATA bodies are returned raw)."""
    kind, body = read_frame(sock)
    if kind == DATA:
        return kind, {"raw": body}
    return kind, msgpack.unpackb(body, raw=False)


# --- keys ----------------------------------------------------------------------------
class Key:
    """An Ed25519 key pair with the raw 32-byte public key the protocol uses."""

    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def verify(public: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except Exception:
        return False
    return True


# --- manifests (PROTOCOL.md "Content ids, manifests and signatures") ----------------------
@dataclass
class ContentInfo:
    """What the hostile peer needs of a manifest: id, sizes, the encoded manifest."""

    content_id: bytes
    size: int
    chunk_size: int
    manifest: bytes

    @property
    def num_chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    @classmethod
    def from_manifest(cls, manifest: bytes) -> ContentInfo:
        outer = msgpack.unpackb(manifest, raw=False)
        info_bytes = outer["info"]
        info = msgpack.unpackb(info_bytes, raw=False)
        return cls(hashlib.sha256(info_bytes).digest(), info["size"], info["chunk_size"], manifest)


def bitfield(flags: list[bool]) -> bytes:
    """Most significant bit first, pad bits zero."""
    out = bytearray((len(flags) + 7) // 8)
    for i, v in enumerate(flags):
        if v:
            out[i // 8] |= 0x80 >> (i % 8)
    return bytes(out)


# --- tracker client ----------------------------------------------------------------------
class TrackerSession:
    """An authenticated tracker connection (CHALLENGE, AUTH, OK) for one key."""

    def __init__(self, port: int, key: Key, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        kind, body = read_message(self.sock)
        assert kind == CHALLENGE, (kind, body)
        sig = key.sign(AUTH_CONTEXT + body["nonce"])
        self.sock.sendall(message(AUTH, key=key.public, sig=sig))
        kind, body = read_message(self.sock)
        assert kind == OK, (kind, body)

    def request(self, data: bytes) -> tuple[int, dict[str, Any]]:
        self.sock.sendall(data)
        return read_message(self.sock)

    def get_manifest(self, content_id: bytes) -> bytes:
        kind, body = self.request(message(GET_MANIFEST, id=content_id))
        assert kind == T_MANIFEST, (kind, body)
        return bytes(body["manifest"])

    def announce(self, content_id: bytes, port: int, event: str, bits: bytes, want: int = 50):
        return self.request(
            message(ANNOUNCE, id=content_id, port=port, event=event, bits=bits, want=want)
        )

    def close(self) -> None:
        self.sock.close()


# --- the hostile peer --------------------------------------------------------------------
@dataclass
class HostilePeer:
    """A peer server that answers the handshake and then misbehaves (see module doc)."""

    content: ContentInfo
    source: Path
    mode: str = "honest"
    corrupt: set[int] = field(default_factory=set)
    holds: set[int] = field(default_factory=set)
    host: str = "127.0.0.1"
    key: Key = field(default_factory=Key)
    served: list[int] = field(default_factory=list)
    corrupted: list[int] = field(default_factory=list)
    requests: list[tuple[int, int, int]] = field(default_factory=list)
    goodbyes: list[str] = field(default_factory=list)
    handshakes: int = 0

    def __post_init__(self) -> None:
        assert self.mode in ("honest", "corrupt", "liar", "silent", "drip"), self.mode
        self._listener = socket.create_server((self.host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()
        self._tracker: TrackerSession | None = None

    @property
    def name(self) -> str:
        """How the reference peer names us in logs: 12 hex digits of the key."""
        return self.key.public.hex()[:12]

    def announce(self, tracker_port: int) -> None:
        """Join the swarm at the tracker with a full bitfield (whatever we really hold)."""
        self._tracker = TrackerSession(tracker_port, self.key)
        bits = bitfield([True] * self.content.num_chunks)
        kind, body = self._tracker.announce(self.content.content_id, self.port, "started", bits)
        assert kind == PEERS, (kind, body)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        if self._tracker is not None:
            self._tracker.close()

    # --- serving ---------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._socks.append(sock)
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._converse(sock)
        except (OSError, ConnectionError, ValueError, KeyError):
            pass
        finally:
            sock.close()

    def _converse(self, sock: socket.socket) -> None:
        content = self.content
        # The connecting side speaks first: its HELLO tells us the content.
        kind, hello, their_frame = read_raw_message(sock)
        assert kind == HELLO and hello["id"] == content.content_id, (kind, hello)
        nonce = os.urandom(32)
        our_frame = message(
            HELLO,
            v=VERSION,
            key=self.key.public,
            port=self.port,
            id=content.content_id,
            nonce=nonce,
        )
        sig = self.key.sign(proof_payload(b"A", their_frame, our_frame))
        sock.sendall(our_frame + message(PROOF, sig=sig))
        kind, proof = read_message(sock)
        assert kind == PROOF, (kind, proof)
        if not verify(hello["key"], proof["sig"], proof_payload(b"D", their_frame, our_frame)):
            return
        self.handshakes += 1
        sock.sendall(message(BITFIELD, bits=bitfield([True] * content.num_chunks)))
        fd = os.open(self.source, os.O_RDONLY)
        try:
            while not self._stop.is_set():
                kind, body = read_message(sock)
                if kind == GOODBYE:
                    self.goodbyes.append(body["reason"])
                    return
                if kind == MANIFEST_REQUEST:
                    sock.sendall(message(MANIFEST, manifest=content.manifest))
                elif kind == REQUEST:
                    self._on_request(sock, fd, body["idx"], body["off"], body["len"])
        finally:
            os.close(fd)

    def _on_request(self, sock: socket.socket, fd: int, index: int, off: int, length: int) -> None:
        self.requests.append((index, off, length))
        mode = self.mode
        if mode == "silent":
            return
        if mode == "liar" and index not in self.holds:
            sock.sendall(message(REJECT, idx=index, off=off, len=length, reason="missing"))
            return
        payload = os.pread(fd, length, index * self.content.chunk_size + off)
        if mode == "corrupt" and index in self.corrupt:
            payload = bytes(b ^ 0x5A for b in payload[:64]) + payload[64:]
            self.corrupted.append(index)
        if mode == "drip":
            sock.sendall(HEADER.pack(DATA, 8 + length) + DATA_HEADER.pack(index, off))
            for k in range(length):
                if self._stop.wait(1.0):
                    return
                sock.sendall(payload[k : k + 1])
            return
        sock.sendall(data_frame(index, off, payload))
        self.served.append(index)


def handshake(
    port: int,
    content_id: bytes,
    key: Key | None = None,
    host: str = "127.0.0.1",
    *,
    chunks: int | None = None,
) -> socket.socket:
    """Connect to a real peer and complete the handshake (HELLO; its HELLO +
    PROOF; our PROOF); returns the socket after our PROOF. With ``chunks``,
    also sends our (empty) BITFIELD for that many chunks, which must come
    before any HAVE or REQUEST.

    The peer's BITFIELD (and anything after) is left unread in the socket.
    """
    key = key or Key()
    sock = socket.create_connection((host, port), timeout=10)
    nonce = os.urandom(32)
    our_frame = message(HELLO, v=VERSION, key=key.public, port=0, id=content_id, nonce=nonce)
    sock.sendall(our_frame)
    kind, hello, their_frame = read_raw_message(sock)
    assert kind == HELLO, (kind, hello)
    kind, proof = read_message(sock)
    assert kind == PROOF, (kind, proof)
    assert verify(hello["key"], proof["sig"], proof_payload(b"A", our_frame, their_frame))
    proof = message(PROOF, sig=key.sign(proof_payload(b"D", our_frame, their_frame)))
    if chunks is not None:
        proof += message(BITFIELD, bits=bitfield([False] * chunks))
    sock.sendall(proof)
    return sock


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate()`` until true or fail with ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class HostileTracker:
    """A tracker that serves whatever manifest it is given (for hostile-manifest tests).

    It speaks the tracker conversation from PROTOCOL.md: CHALLENGE, then OK to
    any AUTH (it does not care who asks), MANIFEST (38) for every
    GET_MANIFEST, an empty PEERS for every ANNOUNCE, ERROR otherwise.
    """

    def __init__(self, manifest: bytes) -> None:
        self.manifest = manifest
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.served = 0
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.sendall(message(CHALLENGE, v=VERSION, nonce=os.urandom(32)))
            kind, _ = read_message(sock)
            assert kind == AUTH
            sock.sendall(message(OK))
            while True:
                kind, body = read_message(sock)
                if kind == GET_MANIFEST:
                    self.served += 1
                    sock.sendall(message(T_MANIFEST, manifest=self.manifest))
                elif kind == ANNOUNCE:
                    n = len(body["bits"]) * 8
                    sock.sendall(
                        message(PEERS, id=body["id"], interval=60, peers=[], avail=b"\0\0" * n)
                    )
                else:
                    sock.sendall(message(ERROR, code="bad-request", message="hostile tracker"))
        except (OSError, ConnectionError, AssertionError, ValueError):
            pass
        finally:
            sock.close()

    def close(self) -> None:
        self._listener.close()


def info_bytes(
    name: Any = "f.bin",
    size: Any = 100,
    chunk_size: Any = 16384,
    algo: Any = "sha256",
    hashes: Any = None,
    root: Any = None,
) -> bytes:
    """An info map in the canonical key order, with any field values at all."""
    if hashes is None:
        hashes = b"\x11" * 32
    if root is None:
        root = b"\x22" * 32
    return msgpack.packb(
        {
            "v": 1,
            "name": name,
            "size": size,
            "chunk_size": chunk_size,
            "algo": algo,
            "hashes": hashes,
            "root": root,
        },
        use_bin_type=True,
    )


def manifest_bytes(info: bytes, sigs: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A manifest map around ``info`` bytes; ``content_id`` is sha256(info)."""
    return msgpack.packb({"info": info, "sigs": [list(s) for s in sigs or []]}, use_bin_type=True)


def signed(info: bytes, key: Key) -> tuple[bytes, bytes]:
    """A real manifest signature by ``key`` over the content id of ``info``."""
    cid = hashlib.sha256(info).digest()
    return key.public, key.sign(b"peer-manifest-v1\x00" + cid)


# --- helpers for tests/test_hostile_network.py and scripts/soak_hostile.py ------------
class BoundTrackerSession(TrackerSession):
    """A :class:`TrackerSession` whose connection comes from ``source`` (an
    address of this host, e.g. 127.0.0.2): the tracker lists the key there."""

    def __init__(self, port: int, key: Key, source: str, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
        kind, body = read_message(self.sock)
        assert kind == CHALLENGE, (kind, body)
        sig = key.sign(AUTH_CONTEXT + body["nonce"])
        self.sock.sendall(message(AUTH, key=key.public, sig=sig))
        kind, body = read_message(self.sock)
        assert kind == OK, (kind, body)


def handshake_from(
    port: int, content_id: bytes, source: str, key: Key | None = None, host: str = "127.0.0.1"
) -> socket.socket:
    """Like :func:`handshake`, from the local address ``source``."""
    key = key or Key()
    sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    try:
        nonce = os.urandom(32)
        our_frame = message(HELLO, v=VERSION, key=key.public, port=0, id=content_id, nonce=nonce)
        sock.sendall(our_frame)
        kind, hello, their_frame = read_raw_message(sock)
        assert kind == HELLO, (kind, hello)
        kind, proof = read_message(sock)
        assert kind == PROOF, (kind, proof)
        assert verify(hello["key"], proof["sig"], proof_payload(b"A", our_frame, their_frame))
        sock.sendall(message(PROOF, sig=key.sign(proof_payload(b"D", our_frame, their_frame))))
    except BaseException:
        sock.close()
        raise
    return sock


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tcp_established(local_port: int, remote_port: int) -> bool:
    """Is there an ESTABLISHED TCP socket local_port -> remote_port (any
    loopback address)? Reads /proc/net/tcp and tcp6 (a listener on ``::``
    holds IPv4 connections there), so it sees the other process's end."""
    lines = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines += Path(table).read_text().splitlines()[1:]
        except OSError:
            pass
    for line in lines:
        parts = line.split()
        local, remote, state = parts[1], parts[2], parts[3]
        if (
            state == "01"
            and int(local.split(":")[1], 16) == local_port
            and int(remote.split(":")[1], 16) == remote_port
        ):
            return True
    return False


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[list[tuple[int, bytes]], bool]:
    """Read frames until the peer closes (EOF or reset) or ``timeout`` passes.

    Returns (frames read, closed?). A partial frame at the end is dropped."""
    frames: list[tuple[int, bytes]] = []
    buf = bytearray()
    deadline = time.monotonic() + timeout
    closed = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            got = sock.recv(1 << 20)
        except TimeoutError:
            break
        except OSError:
            closed = True
            break
        if not got:
            closed = True
            break
        buf += got
        while len(buf) >= 5:
            kind, length = HEADER.unpack_from(buf)
            if len(buf) < 5 + length:
                break
            frames.append((kind, bytes(buf[5 : 5 + length])))
            del buf[: 5 + length]
    return frames, closed


class PadBitsPeer(HostilePeer):
    """A seeder that answers the handshake correctly, then sends ``bits`` as
    its BITFIELD (e.g. with pad bits set); it records what it is asked."""

    bits: bytes = b""

    def _converse(self, sock: socket.socket) -> None:
        content = self.content
        kind, hello, their_frame = read_raw_message(sock)
        assert kind == HELLO and hello["id"] == content.content_id, (kind, hello)
        our_frame = message(
            HELLO,
            v=VERSION,
            key=self.key.public,
            port=self.port,
            id=content.content_id,
            nonce=os.urandom(32),
        )
        sig = self.key.sign(proof_payload(b"A", their_frame, our_frame))
        sock.sendall(our_frame + message(PROOF, sig=sig))
        kind, proof = read_message(sock)
        assert kind == PROOF, (kind, proof)
        if not verify(hello["key"], proof["sig"], proof_payload(b"D", their_frame, our_frame)):
            return
        self.handshakes += 1
        sock.sendall(message(BITFIELD, bits=self.bits))
        while not self._stop.is_set():
            kind, body = read_message(sock)
            if kind == GOODBYE:
                self.goodbyes.append(body["reason"])
                return
            if kind == REQUEST:
                self.requests.append((body["idx"], body["off"], body["len"]))
                req = {"idx": body["idx"], "off": body["off"], "len": body["len"]}
                sock.sendall(message(REJECT, **req, reason="busy"))


class RelayProxy:
    """M, a man in the middle: it listens on ``host`` and relays every
    connection, byte for byte, to ``target`` (dialing from ``host`` too), so
    the handshake the dialer sees is the target's genuine one. After that it
    flips bytes in every DATA payload going back to the dialer.

    ``relayed`` counts connections, ``corrupted`` lists the chunk indices
    whose payload it changed."""

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.2") -> None:
        self.target = target
        self.host = host
        self.key = Key()
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self.relayed = 0
        self.corrupted: list[int] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._tracker: TrackerSession | None = None
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def announce(self, tracker_port: int, content: ContentInfo) -> None:
        """Join the swarm from ``host`` under M's own key, as a full seeder."""
        self._tracker = BoundTrackerSession(tracker_port, self.key, source=self.host)
        bits = bitfield([True] * content.num_chunks)
        kind, body = self._tracker.announce(content.content_id, self.port, "started", bits)
        assert kind == PEERS, (kind, body)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        if self._tracker is not None:
            self._tracker.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(
                    self.target, timeout=10, source_address=(self.host, 0)
                )
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            with self._lock:
                self._socks += [down, up]
                self.relayed += 1
            threading.Thread(target=self._pipe, args=(down, up), daemon=True).start()
            threading.Thread(target=self._back, args=(up, down), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        """Dialer -> target: untouched."""
        try:
            while got := src.recv(65536):
                dst.sendall(got)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _back(self, src: socket.socket, dst: socket.socket) -> None:
        """Target -> dialer: frame by frame, DATA payloads changed."""
        try:
            while True:
                header = recv_exactly(src, 5)
                kind, length = HEADER.unpack(header)
                body = recv_exactly(src, length)
                if kind == DATA and length > 8:
                    index = DATA_HEADER.unpack_from(body)[0]
                    payload = bytes(b ^ 0xA5 for b in body[8:72]) + body[72:]
                    body = body[:8] + payload
                    self.corrupted.append(index)
                dst.sendall(header + body)
        except (OSError, ConnectionError):
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
