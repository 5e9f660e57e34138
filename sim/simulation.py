"""A whole swarm in one process on a virtual clock: the second driver of the engine.

Every node is a :class:`~peerd.engine.content_engine.ContentEngine` (the very
object the real node runs for a content) plus what the node's I/O glue does
around it, done here on a virtual clock: a
:class:`~peerd.wire.PeerConnection` per connection end (every message is
encoded, fed as bytes and parsed back), an
:class:`~peerd.engine.scheduling.UploadTurns` per node (one upload at a time,
as in the node), one :class:`tracker.index.SwarmIndex` for the tracker, and
real Ed25519 identities that sign and verify every handshake PROOF. Nothing
the engine decides is written here; this module only carries out its actions.

Time is a heap of ``(time, seq, callback)`` events, never steps, so an idle
peer costs nothing; deliveries, nearly all events, go through a FIFO beside
the heap (same order, less work).

The link model (stated, because it decides the numbers):

* **Upload** is the only constraint (downloads are unconstrained, as in the
  textbook bound). A node sends one chunk at a time at its full upload rate;
  its upload turns pick which connection goes next, as in the node.
* **Delay.** Each node has a one-way access delay; a message from A to B
  arrives ``delay_A + delay_B`` after it left A (after its last byte, for a
  chunk). A connection is in order, like TCP: control frames queued while an
  upload is on the wire go out right after it (one writer per connection).
* **Loss** ``p`` (TCP hides it): a chunk is sent at ``rate * (1 - p)``
  (retransmitted bytes cost upload), and any message of ``k`` segments of
  1448 bytes is, with probability ``1 - (1 - p) ** k``, held one extra
  round trip (a fast retransmit).
* **Payloads are not materialised**: the receiver takes the DATA header and
  reports the payload as read past it (``payload_consumed_externally``), the
  node's own zero-copy path; chunk hashing is not simulated (every sender is
  honest), so every wanted payload is stored.
* **Connections.** A node dials what its engine says; it accepts while it has
  fewer than ``max_inbound`` connections (the node's inbound slots); a full
  node refuses by closing the connection.
* **Closing** is immediate at both ends (the GOODBYE's flight is not modelled).
* **No peer exchange**: the simulated tracker names every peer, and nodes
  attach connections without a listen address, so no engine sends PEX.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from peerd.content.identity import Identity, verify_signature
from peerd.engine.content_engine import (
    TICK,
    Action,
    Close,
    ContentEngine,
    Dial,
    Send,
    SendHave,
)
from peerd.engine.scheduling import NEEDY_WINDOW, UploadTurns
from peerd.errors import RemoteProtocolError
from peerd.wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Bitfield,
    Cancel,
    Closed,
    DataHeader,
    Event,
    Goodbye,
    Have,
    Hello,
    PeerConnection,
    PeerEntry,
    Peers,
    Pex,
    Proof,
    Reject,
    Request,
)
from tracker.index import SwarmIndex

__all__ = ["MiB", "SimConfig", "SimResult", "Simulation", "leecher_rates", "run", "t_min"]

MiB = 1 << 20
MSS = 1448
PORT = 6881
MAX_HAVE_PER_FRAME = 4096  # as the node's session batches HAVEs


def leecher_rates(n: int, rate: float, heterogeneous: bool) -> list[float]:
    """Upload rates of ``n`` leechers: all ``rate``, or half of them at ``rate / 4``."""
    if not heterogeneous:
        return [rate] * n
    return [rate / 4 if i % 2 else rate for i in range(n)]


def t_min(size: int, seed_rate: float, rates: list[float]) -> float:
    """The textbook lower bound: ``max(F / u_s, N F / (u_s + sum u_i))``."""
    return max(size / seed_rate, len(rates) * size / (seed_rate + sum(rates)))


@dataclass(frozen=True)
class SimConfig:
    """One simulated swarm: 1 seeder and ``n`` leechers, all starting at t = 0.

    Args:
        n: leechers.
        chunks: chunks in the file.
        chunk_size: bytes per chunk (the file is ``chunks * chunk_size``
            unless ``size`` says otherwise).
        seed_rate: the seeder's upload rate, bytes/s.
        heterogeneous: half the leechers upload at a quarter of ``seed_rate``.
        delay: one-way access delay of every node, seconds.
        loss: packet loss probability on every link.
        max_peers: connections a node's engine dials up to (the node's
            default is ``content_engine.MAX_PEERS``).
        max_inbound: connections a node accepts up to.
        verify: sign and verify the Ed25519 handshake PROOFs (a 1,000-peer
            swarm may skip the crypto to save wall time; every message still
            goes through PeerConnection).
        seed: randomness (identities and nonces included: a run is the same for a seed).
        max_time: virtual seconds after which the run is abandoned
            (0 = 20 times the lower bound).
        size: bytes in the file, if the last chunk is short (0: ``chunks *
            chunk_size``); it must make ``chunks`` chunks.
    """

    n: int = 10
    chunks: int = 256
    chunk_size: int = 256 * 1024
    seed_rate: float = 1.0 * MiB
    heterogeneous: bool = False
    delay: float = 0.025
    loss: float = 0.0
    max_peers: int = 16
    max_inbound: int = 64
    verify: bool = True
    seed: int = 1
    max_time: float = 0.0
    size: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.chunks < 1 or self.chunk_size < 1 or self.seed_rate <= 0:
            raise ValueError("n, chunks, chunk_size and seed_rate must be positive")
        if not 0 <= self.loss < 0.5 or self.delay < 0 or self.max_peers < 1:
            raise ValueError("need 0 <= loss < 0.5, delay >= 0 and max_peers >= 1")
        if self.size and -(-self.size // self.chunk_size) != self.chunks:
            raise ValueError("size must make exactly `chunks` chunks")


@dataclass
class SimResult:
    """What a run measured. Times are virtual seconds except ``wall``."""

    config: SimConfig
    size: int
    rates: list[float]
    T: float
    T_min: float
    client_server: float
    wall: float
    completed: list[float]  # per leecher (inf if it never finished)
    uploaded: list[int]  # per node, seeder first
    busy: list[float]  # seconds each node's upload link was sending
    received: list[int]  # chunks stored per leecher
    duplicates: int  # chunk payloads that arrived and were not stored
    events: int
    handshakes: int

    @property
    def ratio(self) -> float:
        return self.T / self.T_min


class _Session:
    """One end of one connection: what the node's PeerSession does around the engine."""

    __slots__ = (
        "arrive_after",
        "attached",
        "closing",
        "conn",
        "control",
        "dialled",
        "haves",
        "kicked",
        "node",
        "nonce",
        "open",
        "other",
        "remote",
        "route",
        "sending",
    )

    def __init__(self, node: _Node, remote: _Node, *, initiator: bool) -> None:
        self.node, self.remote = node, remote
        self.other: _Session
        self.conn = PeerConnection(initiator=initiator)
        self.nonce = node.nonce_rng.randbytes(32)
        self.route = (remote.key, remote.ip)
        self.dialled: tuple[bytes, str] | None = None  # the Dial's route (dialer end)
        self.open = False  # handshake done
        self.attached = False  # registered with the engine
        self.closing = False
        self.control: list[bytes] = []
        self.haves: list[int] = []
        self.kicked = False
        self.sending = False
        self.arrive_after = 0.0


@dataclass(eq=False, slots=True)
class _Node:
    idx: int
    identity: Identity
    ip: str
    rate: float
    delay: float
    have: bytearray
    engine: ContentEngine
    turns: UploadTurns
    inbound: int = 0  # accepted connections not yet closed
    uploading: _Session | None = None  # the session whose chunk is on the link
    uploaded: int = 0
    busy: float = 0.0
    completed_at: float = math.inf
    received: int = 0
    announcing: bool = False  # an announce is in flight
    announce_at: float = math.inf  # the next scheduled look at announce_due
    sessions: set[_Session] = field(default_factory=set)
    nonce_rng: random.Random = field(default_factory=random.Random)

    @property
    def key(self) -> bytes:
        return self.identity.public_key


class Simulation:
    """Build the swarm from a :class:`SimConfig`; :meth:`run` plays it to the end."""

    def __init__(self, config: SimConfig) -> None:
        self.cfg = c = config
        self.rng = random.Random(c.seed)
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        # Deliveries: with equal delays every one is due a fixed time after it
        # was sent, so in the order sent: those go to a FIFO (O(1)); one due
        # earlier than the FIFO's tail (loss) goes to the heap. The run loop
        # takes the earlier (time, seq) head of the two: the order of one heap.
        self._fifo: deque[tuple[float, int, _Session, bytes]] = deque()
        self._seq = 0
        self._dirty: list[_Session] = []  # sessions whose writer has work
        self.events = 0
        self.handshakes = 0
        self.duplicates = 0
        self.size = c.size or c.chunks * c.chunk_size
        self.content_id = self.rng.randbytes(32)
        self.index = SwarmIndex()
        self.rates = leecher_rates(c.n, c.seed_rate, c.heterogeneous)
        self.nodes: list[_Node] = []
        self.by_addr: dict[tuple[str, int], _Node] = {}
        for i, rate in enumerate([c.seed_rate, *self.rates]):
            seeder = i == 0
            # Keys decide duplicate connections (the smaller opener's wins):
            # drawn from the seed, so a run is the same for the same seed.
            identity = Identity.from_seed(self.rng.randbytes(32))
            have = bytearray([1 if seeder else 0]) * c.chunks
            engine = ContentEngine(
                size=self.size,
                chunk_size=c.chunk_size,
                have=have,
                my_key=identity.public_key,
                origin=seeder,
                now=0.0,
                rng=random.Random(self.rng.random()),
                max_peers=c.max_peers,
            )
            turns = UploadTurns(1, needy_window=NEEDY_WINDOW, progress=engine.remote_share)
            node = _Node(
                idx=i,
                identity=identity,
                ip=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                rate=rate,
                delay=c.delay,
                have=have,
                engine=engine,
                turns=turns,
                nonce_rng=random.Random(self.rng.random()),
            )
            self.nodes.append(node)
            self.by_addr[(node.ip, PORT)] = node
        self.leechers_left = c.n

    # --- the clock --------------------------------------------------------------
    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def run(self) -> SimResult:
        """Play the swarm until every leecher completes (or ``max_time``)."""
        started = time.perf_counter()
        self._schedule_announce(self.nodes[0], 0.0)
        self.at(self.rng.uniform(0.0, TICK), self._tick, self.nodes[0])
        for node in self.nodes[1:]:
            # A flash crowd: every leecher starts within the first 100 ms.
            self._schedule_announce(node, self.rng.uniform(0.0, 0.1))
            self.at(self.rng.uniform(0.0, TICK), self._tick, node)
        heap, fifo = self._heap, self._fifo
        max_time = self.cfg.max_time or 20 * t_min(self.size, self.cfg.seed_rate, self.rates)
        dirty, writer = self._dirty, self._writer
        # Millions of short-lived frames and events, few reference cycles: the
        # cyclic collector only costs time here, so it waits until the end.
        gc_was_on = gc.isenabled()
        gc.disable()
        pop, popleft, events = heapq.heappop, fifo.popleft, self.events
        on_bytes = self._on_bytes
        try:
            while self.leechers_left:
                # (time, seq) decide: seqs are unique, the rest is never compared
                if fifo and (not heap or fifo[0] < heap[0]):  # type: ignore[operator]
                    t, _seq, session, data = popleft()
                    if t > max_time:
                        break
                    self.now = t
                    events += 1
                    on_bytes(session, data)
                elif heap:
                    t, _seq, fn, args = pop(heap)
                    if t > max_time:
                        break
                    self.now = t
                    events += 1
                    fn(*args)
                else:
                    break
                while dirty:
                    writer(dirty.pop())
        finally:
            self.events = events
            if gc_was_on:
                gc.enable()
        wall = time.perf_counter() - started
        leechers = self.nodes[1:]
        done = [n.completed_at for n in leechers]
        return SimResult(
            config=self.cfg,
            size=self.size,
            rates=self.rates,
            T=max(done),
            T_min=t_min(self.size, self.cfg.seed_rate, self.rates),
            client_server=self.cfg.n * self.size / self.cfg.seed_rate,
            wall=wall,
            completed=done,
            uploaded=[n.uploaded for n in self.nodes],
            busy=[n.busy for n in self.nodes],
            received=[n.received for n in leechers],
            duplicates=self.duplicates,
            events=self.events,
            handshakes=self.handshakes,
        )

    # --- carrying out the engine's actions ---------------------------------------
    def _apply(self, node: _Node, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                s = action.peer
                assert isinstance(s, _Session)
                self._send(s, action.message)
            elif isinstance(action, SendHave):
                s = action.peer
                assert isinstance(s, _Session)
                if not s.closing:
                    s.haves.append(action.index)
                    self._kick(s)
            elif isinstance(action, Close):
                s = action.peer
                assert isinstance(s, _Session)
                self._close(s)
            elif isinstance(action, Dial):
                self._dial(node, action)
        engine = node.engine
        if engine.complete and node.completed_at == math.inf and node.idx:
            node.completed_at = self.now
            self.leechers_left -= 1
        if engine.announce_sooner and not node.announcing:
            self._schedule_announce(node, engine.announce_wake(self.now))

    def _tick(self, node: _Node) -> None:
        self._apply(node, node.engine.tick(self.now))
        self.at(self.now + TICK, self._tick, node)

    # --- links ----------------------------------------------------------------------
    def _lossy_delay(self, nbytes: int, a: _Node, b: _Node) -> float:
        one_way = a.delay + b.delay
        p = self.cfg.loss
        if p and self.rng.random() < 1 - (1 - p) ** math.ceil(nbytes / MSS):
            return 3 * one_way  # one extra round trip: fast retransmit
        return one_way

    def _deliver(self, s: _Session, data: bytes, leave: float) -> None:
        """Put bytes on the wire from session ``s`` to its other end, in order."""
        if self.cfg.loss:
            arrive = leave + self._lossy_delay(len(data), s.node, s.remote)
        else:
            arrive = leave + s.node.delay + s.remote.delay
        if arrive < s.arrive_after:
            arrive = s.arrive_after
        s.arrive_after = arrive
        self._seq += 1
        fifo = self._fifo
        if not fifo or fifo[-1][0] <= arrive:
            fifo.append((arrive, self._seq, s.other, data))
        else:
            heapq.heappush(self._heap, (arrive, self._seq, self._on_bytes, (s.other, data)))

    def _kick(self, s: _Session) -> None:
        # The writer runs once the current event is done (same virtual
        # instant), so everything queued meanwhile goes out as one send, as
        # the session's writer takes all queued frames per pass.
        if not s.kicked and not s.sending:
            s.kicked = True
            self._dirty.append(s)

    def _writer(self, s: _Session) -> None:
        """The session writer's control turn: HAVEs and control frames coalesced."""
        s.kicked = False
        if s.sending or s.closing:
            return  # the upload on the wire finishes first; it kicks us again
        if s.haves:
            haves, s.haves = s.haves, []
            for k in range(0, len(haves), MAX_HAVE_PER_FRAME):
                s.control.append(s.conn.send(Have(tuple(haves[k : k + MAX_HAVE_PER_FRAME]))))
        if s.control:
            frames, s.control = s.control, []
            self._deliver(s, b"".join(frames), self.now)

    def _send(self, s: _Session, event: Event) -> None:
        if not s.closing:
            s.control.append(s.conn.send(event))
            self._kick(s)

    # --- tracker ----------------------------------------------------------------------
    def _schedule_announce(self, node: _Node, t: float) -> None:
        t = max(t, self.now)
        if t < node.announce_at:
            node.announce_at = t
            self.at(t, self._announce_check, node, t)

    def _announce_check(self, node: _Node, t: float) -> None:
        if node.announce_at != t or node.announcing:
            return  # superseded by an earlier one
        node.announce_at = math.inf
        engine = node.engine
        event = engine.announce_due(self.now)
        if event is None:
            self._schedule_announce(node, engine.announce_wake(self.now))
            return
        node.announcing = True
        bits, want = engine.bitfield(), engine.announce_want()
        self.at(self.now + node.delay, self._tracker_answer, node, event, bits, want)

    def _tracker_answer(self, node: _Node, event: str, bits: bytes, want: int) -> None:
        peers, avail = self.index.announce(
            self.content_id, node.key, node.ip, PORT, event, bits, self.cfg.chunks, want, self.now
        )
        answer = Peers(
            self.content_id,
            int(self.index.interval),
            tuple(PeerEntry(ip, port, key, pbits) for ip, port, key, pbits in peers),
            avail,
        )
        self.at(self.now + node.delay, self._on_peers, node, event, answer)

    def _on_peers(self, node: _Node, event: str, answer: Peers) -> None:
        node.announcing = False
        self._apply(node, node.engine.announced(event, self.now, answer))
        self._schedule_announce(node, node.engine.announce_wake(self.now))

    # --- connections ------------------------------------------------------------------
    def _dial(self, a: _Node, dial: Dial) -> None:
        b = self.by_addr[(dial.ip, dial.port)]
        # TCP handshake (one round trip), then our HELLO goes out.
        rtt = 2 * (a.delay + b.delay)
        self.at(self.now + rtt, self._accept, a, b, dial.route)

    def _accept(self, a: _Node, b: _Node, route: tuple[bytes, str]) -> None:
        if b.inbound >= self.cfg.max_inbound:
            a.engine.dial_ended(route, self.now)  # refused: the stream just closes
            self._apply(a, ())
            return
        sa, sb = _Session(a, b, initiator=True), _Session(b, a, initiator=False)
        sa.other, sb.other = sb, sa
        sa.dialled = route
        b.inbound += 1
        a.sessions.add(sa)
        b.sessions.add(sb)
        self._send(sa, Hello(PROTOCOL_VERSION, a.key, PORT, self.content_id, sa.nonce))

    def _on_handshake(self, s: _Session, event: Any) -> None:
        if isinstance(event, Hello):
            if event.key != s.remote.key or event.content_id != self.content_id:
                raise RemoteProtocolError("peer answered with another key or content")
            if not s.conn.initiator:  # inbound: answer HELLO + PROOF
                self._send(s, Hello(PROTOCOL_VERSION, s.node.key, PORT, self.content_id, s.nonce))
                self._send(s, Proof(self._sign(s)))
        elif isinstance(event, Proof):
            msg = s.conn.proof_message(ours=False)
            if self.cfg.verify and not verify_signature(s.remote.key, event.signature, msg):
                raise RemoteProtocolError("peer's PROOF does not verify")
            if s.conn.initiator:  # the dialer proves itself once the acceptor has
                self._send(s, Proof(self._sign(s)))
            self.handshakes += 1
            s.open = True
            verdict, actions = s.node.engine.attach(
                s, s.route, initiated=s.conn.initiator, now=self.now
            )
            if verdict == "refused":
                self._close(s)
                return
            s.attached = verdict == "ok"
            self._apply(s.node, actions)

    def _sign(self, s: _Session) -> bytes:
        if self.cfg.verify:
            return s.node.identity.sign(s.conn.proof_message(ours=True))
        return bytes(64)  # stated in SimConfig: crypto skipped, framing kept

    def _close(self, s: _Session) -> None:
        """End the connection at both ends at once."""
        for end in (s, s.other):
            if end.closing:
                continue
            end.closing = True
            node = end.node
            node.sessions.discard(end)
            if not end.conn.initiator:
                node.inbound -= 1
            if node.uploading is not end:  # a chunk on the link releases on arrival
                self._grant(node, node.turns.release(end, self.now))
            actions = node.engine.detach(end, self.now) if end.attached else []
            if end.dialled is not None:
                node.engine.dial_ended(end.dialled, self.now)
            self._apply(node, actions)

    # --- receiving ---------------------------------------------------------------------
    def _on_bytes(self, s: _Session, data: bytes) -> None:
        if s.closing:
            return
        conn = s.conn
        conn.receive_data(data)
        node, engine, now = s.node, s.node.engine, self.now
        while not s.closing:
            event = conn.next_event()
            if event is NEED_DATA:
                return
            if not s.open:
                self._on_handshake(s, event)
                continue
            if not s.attached:
                continue  # runs only to deliver a GOODBYE (a full content)
            if isinstance(event, Have):
                self._apply(node, engine.on_have(s, event.indices, now))
            elif isinstance(event, DataHeader):
                conn.payload_consumed_externally(event.length)
                self._on_data(s, event)
            elif isinstance(event, Request):
                queued, actions = engine.on_request(
                    s, (event.index, event.offset, event.length), now
                )
                self._apply(node, actions)
                if queued:
                    self._want_upload(s)
            elif isinstance(event, Cancel):
                engine.on_cancel(s, (event.index, event.offset, event.length))
            elif isinstance(event, Bitfield):
                self._apply(node, engine.on_bitfield(s, event.bits, now))
            elif isinstance(event, Reject):
                req = (event.index, event.offset, event.length)
                self._apply(node, engine.on_reject(s, req, event.reason, now))
            elif isinstance(event, Pex):
                # Nobody here sends PEX (attach is given no listen address:
                # the simulated tracker names everyone); handled all the same.
                self._apply(node, engine.on_pex(s, event.added, now))
            elif isinstance(event, Closed | Goodbye):
                self._close(s)
            else:
                raise RemoteProtocolError(f"unexpected {type(event).__name__}")

    def _on_data(self, s: _Session, header: DataHeader) -> None:
        node, index = s.node, header.index
        req = (index, header.offset, header.length)
        node.engine.on_data_header(s, req)  # the payload is not modelled: it is here
        if not node.engine.on_payload(s, req, self.now):
            self.duplicates += 1
            return
        node.have[index] = 1  # every sender is honest: the hash would match
        node.received += 1
        self._apply(node, node.engine.chunk_stored(s, index, header.length, self.now))

    # --- uploading ------------------------------------------------------------------
    def _want_upload(self, s: _Session) -> None:
        """The session has a queued upload: ask for the node's upload turn."""
        node = s.node
        if node.uploading is not None:
            # The chunk on the link is progressing at full rate: not stalled.
            node.turns.touch(node.uploading, self.now)
        if node.turns.request(s, self.now) and node.uploading is None:
            self._start_upload(s)

    def _grant(self, node: _Node, granted: list[Any]) -> None:
        for s in granted:
            if node.uploading is None:
                self._start_upload(s)

    def _start_upload(self, s: _Session) -> None:
        node = s.node
        while True:
            req = None if s.closing else node.engine.next_upload(s)
            if req is None:
                self._grant(node, node.turns.release(s, self.now))
                return
            if s.conn.owes(*req):  # not cancelled long ago
                break
        node.uploading = s
        s.sending = True
        seconds = req[2] / (node.rate * (1.0 - self.cfg.loss))
        node.busy += seconds
        self.at(self.now + seconds, self._uploaded, s, req)

    def _uploaded(self, s: _Session, req: tuple[int, int, int]) -> None:
        node = s.node
        node.uploading = None
        s.sending = False
        if not s.closing:
            node.uploaded += req[2]
            node.engine.on_uploaded(s, req, self.now)
            self._deliver(s, s.conn.send(DataHeader(*req)), self.now)
            self._kick(s)  # control frames that waited behind the payload
        self._grant(node, node.turns.release(s, self.now))
        if not s.closing and node.engine.queued(s):
            self._want_upload(s)


def run(config: SimConfig) -> SimResult:
    """Build and run one simulated swarm."""
    return Simulation(config).run()
