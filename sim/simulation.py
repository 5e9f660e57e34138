"""A whole swarm in one process on a virtual clock: the scheduler at scale.

Theory of operation
-------------------
Real processes stop at a few dozen peers on one machine, but everything that
decides is pure code, so ``N`` peers can run here in memory through the very
same objects the node uses: a :class:`~peerd.wire.PeerConnection` per
connection end (every message is encoded, fed as bytes and parsed back), a
:class:`~peerd.engine.picker.PiecePicker` per leecher, a :class:`~peerd.engine.upload_queue.Choker`
per upload link, one :class:`tracker.index.SwarmIndex` for the tracker, and
real Ed25519 identities that sign and verify every handshake PROOF. The
Trio glue (``peerd.node.driver`` / ``peerd.node.session``) is mirrored decision by
decision -- top-up to ``pipeline_depth``, HAVE to every session on every
chunk, endgame cancels, the 0.5 s ticker, the tracker's progress batching --
reusing their constants; the few decisions that live inline there are marked
``# mirrors`` below.

This module lives outside the product package: ``peerd``, ``tracker`` and
``cli`` never import it. It sends every frame through ``conn.send`` and
feeds every byte to ``conn.receive_data`` (the connection keeps per-message
state), so the wire does all its encoding and decoding here as in the node;
the simulator keeps no frame cache of its own (a decoded-frame cache would
have to skip the connection's checks).

Time is a heap of ``(time, seq, callback)`` events, never steps, so an idle
peer costs nothing.

The link model (stated, because it decides the numbers):

* **Upload** is the only constraint (downloads are unconstrained, as in the
  textbook bound). A node sends one chunk at a time at its full upload rate;
  its choker picks which connection's queued request goes next. Throughput
  equals fair sharing of the link, with lower per-chunk latency.
* **Delay.** Each node has a one-way access delay; a message from A to B
  arrives ``delay_A + delay_B`` after it left A (after its last byte, for a
  chunk). A connection is in order, like TCP: control frames queued while an
  upload is on the wire go out right after it (one writer per connection).
* **Loss** ``p`` (TCP hides it): a chunk is sent at ``rate * (1 - p)``
  (retransmitted bytes cost upload), and any message of ``k`` segments of
  1448 bytes is, with probability ``1 - (1 - p) ** k``, held one extra
  round trip (a fast retransmit).
* **Payloads are not materialised.** The receiver takes the DATA header from
  the protocol object and reports the payload as read past it
  (``payload_consumed_externally``), the node's own zero-copy path; chunk
  hashing is not simulated (every sender is honest).
* **Connections.** A node dials while it has fewer than ``max_peers``
  connections and accepts while it has fewer than ``max_inbound``; a full
  node refuses by closing the connection.
"""

from __future__ import annotations

import gc
import heapq
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peerd.content.identity import Identity, verify_signature
from peerd.engine.picker import PiecePicker, pipeline_depth, swarm_counts
from peerd.engine.scheduling import (
    BUSY_BACKOFF,
    NEEDY_WINDOW,
    QUEUE_WAIT,
    RemoteProgress,
    choose_dials,
    next_announce_delay,
    tracker_want,
)
from peerd.engine.upload_queue import Choker
from peerd.errors import RemoteProtocolError
from peerd.node.driver import PROGRESS_EVERY, REQUEST_TIMEOUT, STALL_TIMEOUT
from peerd.node.node import PROTOCOL_VERSION
from peerd.node.session import MAX_HAVE_PER_FRAME, MAX_QUEUED_UPLOADS
from peerd.wire import (
    NEED_DATA,
    Bitfield,
    Cancel,
    Closed,
    DataHeader,
    Goodbye,
    Have,
    Hello,
    PeerConnection,
    Proof,
    Reject,
    Request,
    bits_from_flags,
    flags_from_bits,
)
from tracker.index import SwarmIndex

__all__ = ["MiB", "SimConfig", "SimResult", "Simulation", "leecher_rates", "run", "t_min"]

MiB = 1 << 20
TICK = 0.5  # mirrors Content._ticker's period
RATE_WINDOW = 0.5  # mirrors PeerSession._account's window
MSS = 1448


def _known_share(s: Any) -> float:
    """The remote's progress as a session knows it (mirrors PeerSession.turn_progress)."""
    known = s.known
    return known.share if known is not None else 0.0


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
        chunk_size: bytes per chunk (the file is ``chunks * chunk_size``).
        seed_rate: the seeder's upload rate, bytes/s.
        heterogeneous: half the leechers upload at a quarter of ``seed_rate``.
        delay: one-way access delay of every node, seconds.
        loss: packet loss probability on every link.
        max_peers: connections a node dials up to (as ``swarm.MAX_PEERS``).
        max_inbound: connections a node accepts up to (as ``node.MAX_INBOUND``);
            larger than ``max_peers`` so a late or unlucky node still finds room.
        slots: the choker's upload slots (0 = fair round robin).
        fresh_first: the choker prefers requests for its least-uploaded chunks.
        super_seed: the seeder serves every chunk once before any twice
            (``Choker(super_seed=chunks)``; refusals answer REJECT ``busy``).
        suppress_haves: a HAVE goes only to peers not known to hold the chunk.
        spread: dial a random subset of a larger tracker answer
            (:func:`peerd.engine.scheduling.choose_dials`) instead of its first peers.
        busy_backoff: seconds a refused (peer, chunk) pair is not asked again
            (0: asked again at once, as before).
        needy_window: a leecher serves first the requesters within this
            share of the chunks of the least advanced one
            (``Choker(needy_window=...)``; 0 = plain round robin).
        verify: sign and verify the Ed25519 handshake PROOFs (a 1,000-peer
            swarm may skip the crypto to save wall time; every message still
            goes through PeerConnection).
        seed: randomness (identities are fresh; everything else is seeded).
        max_time: virtual seconds after which the run is abandoned
            (0 = 20 times the lower bound).
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
    slots: int = 0
    fresh_first: bool = True
    super_seed: bool = True
    suppress_haves: bool = True
    spread: bool = True
    busy_backoff: float = BUSY_BACKOFF
    backlog: int = 0
    stale_after: float = 0.0
    queue_wait: float = QUEUE_WAIT
    needy_window: float = NEEDY_WINDOW
    verify: bool = True
    seed: int = 1
    max_time: float = 0.0

    def __post_init__(self) -> None:
        if self.n < 1 or self.chunks < 1 or self.chunk_size < 1 or self.seed_rate <= 0:
            raise ValueError("n, chunks, chunk_size and seed_rate must be positive")
        if not 0 <= self.loss < 0.5 or self.delay < 0 or self.max_peers < 1:
            raise ValueError("need 0 <= loss < 0.5, delay >= 0 and max_peers >= 1")


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
    duplicates: int  # chunk payloads that arrived for a chunk already held
    events: int
    handshakes: int

    @property
    def ratio(self) -> float:
        return self.T / self.T_min


class _Session:
    """One end of one connection (mirrors PeerSession's state)."""

    __slots__ = (
        "arrive_after",
        "cancelled",
        "closing",
        "conn",
        "control",
        "depth",
        "haves",
        "kicked",
        "known",
        "last_payload_at",
        "node",
        "nonce",
        "open",
        "other",
        "rate",
        "remote",
        "requests",
        "sending",
        "window_bytes",
        "window_start",
    )

    def __init__(self, node: _Node, remote: _Node, now: float, *, initiator: bool) -> None:
        self.node, self.remote = node, remote
        self.other: _Session
        self.conn = PeerConnection(initiator=initiator)
        self.nonce = os.urandom(32)
        self.open = False
        self.closing = False
        self.requests: set[tuple[int, int, int]] = set()
        self.cancelled: deque[tuple[int, int, int]] = deque(maxlen=256)
        self.control: list[bytes] = []
        self.haves: list[int] = []
        self.kicked = False
        self.known: RemoteProgress | None = None  # the remote's chunks, as far as we know
        self.sending = False
        self.arrive_after = 0.0
        self.depth = pipeline_depth(0.0, 1)  # nothing measured yet (any chunk size)
        self.rate = 0.0
        self.window_start = now
        self.window_bytes = 0
        self.last_payload_at = now


@dataclass(eq=False, slots=True)
class _Node:
    idx: int
    identity: Identity
    ip: str
    rate: float
    delay: float
    picker: PiecePicker | None
    have: bytearray
    choker: Choker
    sessions: dict[bytes, _Session] = field(default_factory=dict)
    connecting: set[bytes] = field(default_factory=set)
    uploading: bool = False
    uploaded: int = 0
    busy: float = 0.0
    completed_at: float = math.inf
    progress_pending: bool = False
    last_announce: float = -math.inf
    announce_at: float = math.inf  # the next scheduled announce
    received: int = 0
    lonely_retry: float = 1.0  # mirrors Content._tracker_loop's lonely_retry

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
        # Deliveries: nearly all events, and with equal delays every one is due
        # a fixed time after it was sent, so in the order sent. Those go to a
        # FIFO (O(1)) instead of the heap; one due earlier than the FIFO's tail
        # (loss, unequal delays) goes to the heap. The run loop takes the
        # earlier (time, seq) head of the two: the same order as one heap.
        # A FIFO entry names the receiving session and the bytes (every one
        # is an _on_bytes call).
        self._fifo: deque[tuple[float, int, _Session, bytes]] = deque()  # (.., to, bytes)
        self._seq = 0
        self._dirty: list[_Session] = []  # sessions whose writer has work
        self._messages: dict[tuple[Any, tuple[Any, ...]], Any] = {}  # see _message
        self.events = 0
        self.handshakes = 0
        self.duplicates = 0
        self.size = c.chunks * c.chunk_size
        self.content_id = self.rng.randbytes(32)
        self.index = SwarmIndex()
        self.rates = leecher_rates(c.n, c.seed_rate, c.heterogeneous)
        self.nodes: list[_Node] = []
        self.by_addr: dict[tuple[str, int], _Node] = {}
        # Node pairs with a connection (or an attempt): stands in for the
        # node's duplicate-connection rule (Content.attach keeps one of two).
        self.pairs: set[frozenset[int]] = set()
        for i, rate in enumerate([c.seed_rate, *self.rates]):
            seeder = i == 0
            picker = (
                None
                if seeder
                else PiecePicker(
                    c.chunks,
                    rng=random.Random(self.rng.random()),
                    stale_after=c.stale_after,
                )
            )
            node = _Node(
                idx=i,
                identity=Identity.generate(),
                ip=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                rate=rate,
                delay=c.delay,
                picker=picker,
                have=bytearray([1 if seeder else 0]) * c.chunks,
                choker=Choker(
                    slots=c.slots,
                    max_queued=MAX_QUEUED_UPLOADS,
                    fresh_first=c.fresh_first,
                    rng=random.Random(self.rng.random()),
                    super_seed=c.chunks if seeder and c.super_seed else 0,
                    max_backlog=0 if seeder else c.backlog,
                    max_wait=0.0 if seeder else c.queue_wait,
                    needy_window=0.0 if seeder else c.needy_window,
                    progress=_known_share,
                ),
            )
            self.nodes.append(node)
            self.by_addr[(node.ip, 6881)] = node
        self.leechers_left = c.n

    # --- the clock --------------------------------------------------------------
    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def run(self) -> SimResult:
        """Play the swarm until every leecher completes (or ``max_time``)."""
        started = time.perf_counter()
        self._announce(self.nodes[0], "started")
        for node in self.nodes[1:]:
            # A flash crowd: every leecher starts within the first 100 ms.
            self.at(self.rng.uniform(0.0, 0.1), self._announce, node, "started")
            self.at(self.rng.uniform(0.0, TICK), self._tick, node)
        heap, fifo = self._heap, self._fifo
        max_time = self.cfg.max_time or 20 * t_min(self.size, self.cfg.seed_rate, self.rates)
        dirty, writer = self._dirty, self._writer
        # Millions of short-lived frames and events, few reference cycles (a
        # session and its other end): the cyclic collector only costs time
        # here (N = 1000: ~5 % of the run), so it waits until the end.
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
        self._seq += 1  # self.at, inlined: one call per message
        fifo = self._fifo
        if not fifo or fifo[-1][0] <= arrive:
            fifo.append((arrive, self._seq, s.other, data))
        else:
            heapq.heappush(self._heap, (arrive, self._seq, self._on_bytes, (s.other, data)))

    def _kick(self, s: _Session) -> None:
        # The writer runs once the current event is done (same virtual
        # instant), so everything queued meanwhile goes out as one send --
        # like PeerSession._writer, which takes all queued frames per pass.
        if not s.kicked and not s.sending:
            s.kicked = True
            self._dirty.append(s)

    def _writer(self, s: _Session) -> None:
        """The session writer's control turn: HAVEs and control frames coalesced."""
        s.kicked = False
        if s.sending:
            return  # the upload on the wire finishes first; it kicks us again
        if s.haves and s.open and not s.closing:
            haves, s.haves = s.haves, []
            if len(haves) == 1:
                # The usual case: one new chunk, told to every neighbour
                # (one event per chunk serves every session).
                s.control.append(s.conn.send(self._message(Have, (haves[0],))))
            else:
                for k in range(0, len(haves), MAX_HAVE_PER_FRAME):
                    s.control.append(s.conn.send(Have(tuple(haves[k : k + MAX_HAVE_PER_FRAME]))))
        if s.control:
            frames, s.control = s.control, []
            self._deliver(s, b"".join(frames), self.now)

    def _message(self, kind: Callable[..., Any], *fields: Any) -> Any:
        """The event ``kind(*fields)``, made once per distinct value (events
        are immutable; a chunk's REQUEST is the same on every connection)."""
        key = (kind, fields)
        event = self._messages.get(key)
        if event is None:
            event = self._messages[key] = kind(*fields)
        return event

    def _send(self, s: _Session, event: Any) -> None:
        if not s.closing:
            s.control.append(s.conn.send(event))
            self._kick(s)

    # --- tracker (mirrors Content._tracker_loop) ------------------------------------
    def _announce(self, node: _Node, event: str) -> None:
        node.announce_at = math.inf
        node.progress_pending = False
        node.last_announce = self.now
        self.at(self.now + node.delay, self._tracker_answer, node, event)

    def _tracker_answer(self, node: _Node, event: str) -> None:
        peers, avail = self.index.announce(
            self.content_id,
            node.key,
            node.ip,
            6881,
            event,
            bits_from_flags(node.have),
            self.cfg.chunks,
            tracker_want(self.cfg.max_peers) if self.cfg.spread else self.cfg.max_peers,
            self.now,
        )
        self.at(self.now + node.delay, self._on_peers, node, peers, avail)

    def _on_peers(self, node: _Node, peers: list[Any], avail: bytes) -> None:
        if node.picker is not None and avail:
            node.picker.set_swarm_availability(swarm_counts(avail))
        room = self.cfg.max_peers - len(node.sessions) - len(node.connecting)
        if node.picker is not None and room > 0:  # mirrors _connect_to: seeders wait
            # for leechers, and a full node dials nobody (choose_dials: [] at once)
            cands = [
                (ip, port)
                for ip, port, key, _bits in peers
                if not (key == node.key or key in node.sessions or key in node.connecting)
                and port != 0
            ]
            chosen = choose_dials(cands, room, self.rng) if self.cfg.spread else cands[:room]
            for addr in chosen:
                self._dial(node, self.by_addr[addr])
        # Proposed for swarm.py: an under-connected leecher asks again soon.
        delay = next_announce_delay(
            len(node.sessions),
            self.cfg.max_peers,
            self.index.interval,
            downloading=node.picker is not None,
        )
        self._schedule_announce(node, self.now + delay)

    def _schedule_announce(self, node: _Node, t: float) -> None:
        t = max(t, self.now)
        if t < node.announce_at:
            node.announce_at = t
            self.at(t, self._announce_due, node, t)

    def _announce_due(self, node: _Node, t: float) -> None:
        if node.announce_at != t:
            return  # superseded by an earlier one
        event = "completed" if node.picker is None and node.completed_at == self.now else "periodic"
        if node.progress_pending and event == "periodic":
            event = "progress"
        self._announce(node, event)

    # --- connections ------------------------------------------------------------------
    def _dial(self, a: _Node, b: _Node) -> None:
        pair = frozenset((a.idx, b.idx))
        if pair in self.pairs:
            return
        self.pairs.add(pair)
        a.connecting.add(b.key)
        # TCP handshake (one round trip), then our HELLO goes out.
        rtt = 2 * (a.delay + b.delay)
        self.at(self.now + rtt, self._accept, a, b, self.now)

    def _accept(self, a: _Node, b: _Node, dialled: float) -> None:
        if len(b.sessions) + len(b.connecting) >= self.cfg.max_inbound:
            a.connecting.discard(b.key)  # refused: the stream just closes
            self.pairs.discard(frozenset((a.idx, b.idx)))
            self._check_alone(a)
            return
        sa, sb = _Session(a, b, dialled, initiator=True), _Session(b, a, dialled, initiator=False)
        sa.other, sb.other = sb, sa
        b.connecting.add(a.key)
        self._send(sa, Hello(PROTOCOL_VERSION, a.key, 6881, self.content_id, sa.nonce))

    def _on_handshake(self, s: _Session, event: Any) -> None:
        if isinstance(event, Hello):
            if event.key != s.remote.key or event.content_id != self.content_id:
                raise RemoteProtocolError("peer answered with another key or content")
            if not s.conn.initiator:  # inbound: answer HELLO + PROOF
                self._send(s, Hello(PROTOCOL_VERSION, s.node.key, 6881, self.content_id, s.nonce))
                self._send(s, Proof(self._sign(s)))
        elif isinstance(event, Proof):
            msg = s.conn.proof_message(ours=False)
            if self.cfg.verify and not verify_signature(s.remote.key, event.signature, msg):
                raise RemoteProtocolError("peer's PROOF does not verify")
            if s.conn.initiator:  # the dialer proves itself once the acceptor has
                self._send(s, Proof(self._sign(s)))
            self.handshakes += 1
            self._attach(s)

    def _sign(self, s: _Session) -> bytes:
        if self.cfg.verify:
            return s.node.identity.sign(s.conn.proof_message(ours=True))
        return bytes(64)  # stated in SimConfig: crypto skipped, framing kept

    def _attach(self, s: _Session) -> None:
        """Mirrors Content.attach: register, send our bitfield, tell the picker."""
        node, key = s.node, s.remote.key
        node.connecting.discard(key)
        s.open = True
        node.sessions[key] = s
        node.choker.add_peer(s)
        self._send(s, Bitfield(bits_from_flags(node.have)))
        if node.picker is not None:
            node.picker.add_peer(s)

    def _close(self, s: _Session) -> None:
        self.pairs.discard(frozenset((s.node.idx, s.remote.idx)))
        for end in (s, s.other):
            end.closing = True
            node = end.node
            node.connecting.discard(end.remote.key)
            if node.sessions.get(end.remote.key) is end:
                del node.sessions[end.remote.key]
            node.choker.remove_peer(end)
            if node.picker is not None:
                node.picker.remove_peer(end)
                end.requests.clear()
                self._fill_all(node)
                self._check_alone(node)

    def _check_alone(self, node: _Node) -> None:
        """Mirrors _tracker_loop: a downloader with no peer at all (none
        connected or connecting) asks the tracker again after ``lonely_retry``
        seconds, doubling up to 30 s, instead of waiting for its interval."""
        if node.picker is None or node.sessions or node.connecting:
            return
        self._schedule_announce(node, node.last_announce + node.lonely_retry)
        node.lonely_retry = min(node.lonely_retry * 2, float(self.index.interval), 30.0)

    # --- receiving ---------------------------------------------------------------------
    def _on_bytes(self, s: _Session, data: bytes) -> None:
        if s.closing:
            return
        conn = s.conn
        conn.receive_data(data)
        while not s.closing:
            event = conn.next_event()
            if event is NEED_DATA:
                return
            if not s.open:
                self._on_handshake(s, event)
            elif isinstance(event, Have):  # the most frequent message
                self._on_have(s, event.indices)
            elif isinstance(event, DataHeader):
                # The payload is never materialised: the node's zero-copy path.
                conn.payload_consumed_externally(event.length)
                self._on_data(s, event)
            elif isinstance(event, Request):
                self._on_request(s, (event.index, event.offset, event.length))
            elif isinstance(event, Cancel):
                s.node.choker.on_cancel(s, (event.index, event.offset, event.length))
            elif isinstance(event, Bitfield):
                self._on_bitfield(s, event.bits)
            elif isinstance(event, Reject):
                self._on_reject(s, event)
            elif isinstance(event, Closed | Goodbye):
                self._close(s)
            else:
                raise RemoteProtocolError(f"unexpected {type(event).__name__}")
            if conn.drained:
                return  # (next_event would say NEED_DATA)

    def _on_bitfield(self, s: _Session, bits: bytes) -> None:
        if s.node.choker.needy_window:  # mirrors Content.on_bitfield: session.remote
            s.known = RemoteProgress(self.cfg.chunks)
            s.known.set_bitfield(bits)
        picker = s.node.picker
        if picker is not None:
            picker.add_peer(s, flags_from_bits(bits, self.cfg.chunks))
            self._fill(s)

    def _on_have(self, s: _Session, indices: tuple[int, ...]) -> None:
        n = self.cfg.chunks
        if len(indices) == 1:  # the usual HAVE: one new chunk
            if not 0 <= indices[0] < n:
                indices = ()
        else:
            indices = tuple(i for i in indices if 0 <= i < n)
        known = s.known
        if known is not None:  # mirrors Content.on_have: session.remote
            known.add(indices)
        picker = s.node.picker
        if picker is None:
            return
        for i in indices:
            picker.peer_has(s, i)
        if s.depth > len(s.requests):  # (_fill's own first test, without the call)
            self._fill(s)

    def _on_reject(self, s: _Session, event: Reject) -> None:
        req = (event.index, event.offset, event.length)
        picker = s.node.picker
        if req not in s.requests or picker is None:
            return
        s.requests.discard(req)
        if event.reason == "busy" and self.cfg.busy_backoff > 0:
            # Mirrors swarm.on_reject: "retry later or elsewhere". Only the
            # connections to holders of the chunk (this one included) can ask
            # for something new because of it.
            index = event.index
            picker.refuse(s, index, self.now + self.cfg.busy_backoff)
            # (picker.holding, fused with _fill's room test into one pass: a
            # fill sends requests only, so no other session's room changes.)
            flags_of, fill = picker.peer_flags, self._fill
            for t in s.node.sessions.values():
                if (
                    t.depth > len(t.requests)
                    and (flags := flags_of(t)) is not None
                    and flags[index]
                ):
                    fill(t)
            return
        picker.cancel(s, event.index)
        self._fill_all(s.node)

    def _on_request(self, s: _Session, req: tuple[int, int, int]) -> None:
        """Mirrors PeerSession._on_request + Content.check_request."""
        node = s.node
        index, offset, length = req
        reason = None
        if not 0 <= index < self.cfg.chunks or offset + length > self.cfg.chunk_size:
            reason = "invalid"
        elif not node.have[index]:
            reason = "missing"
        elif not node.choker.on_request(s, req):
            reason = "busy"
        if reason is not None:
            self._send(s, self._message(Reject, index, offset, length, reason))
            return
        self._pump(node)

    def _on_data(self, s: _Session, header: DataHeader) -> None:
        """Mirrors PeerSession._receive_payload then Content.store_chunk."""
        req = (header.index, header.offset, header.length)
        node = s.node
        wanted = req in s.requests
        if not wanted and req not in s.cancelled:
            raise RemoteProtocolError(f"chunk {header.index} was not asked for")
        s.requests.discard(req)
        now = self.now
        s.last_payload_at = now
        s.window_bytes += header.length
        if now - s.window_start >= RATE_WINDOW:
            s.rate = s.window_bytes / (now - s.window_start)
            # Content._fill recomputes both on every top-up; they only change
            # with the rate, so here they are updated when it does.
            s.depth = pipeline_depth(s.rate, self.cfg.chunk_size)
            if node.picker is not None:
                node.picker.set_rate(s, s.rate)  # proposed for Content._fill
            s.window_bytes, s.window_start = 0, now
        picker = node.picker
        if not wanted or picker is None or node.have[header.index]:
            self.duplicates += 1
            return
        index = header.index
        node.have[index] = 1
        node.received += 1
        losers = picker.chunk_received(s, index)
        for other in losers:
            assert isinstance(other, _Session)
            other_req = (index, 0, header.length)
            if other_req in other.requests:
                other.requests.discard(other_req)
                other.cancelled.append(other_req)
                self._send(other, self._message(Cancel, *other_req))
        # Mirrors store_chunk: no HAVE to a peer that holds the chunk.
        tell = (
            picker.lacking(node.sessions.values(), index)
            if self.cfg.suppress_haves
            else node.sessions.values()
        )
        dirty = self._dirty
        for t in tell:
            assert isinstance(t, _Session)
            t.haves.append(index)
            if not t.kicked and not t.sending:  # self._kick(t), inlined
                t.kicked = True
                dirty.append(t)
        node.progress_pending = True
        if picker.complete:
            self._finish(node)
        else:
            if picker.in_tail:
                self._fill_all(node)
            else:
                # The node tops every session up here. Before the tail a stored
                # chunk frees only the depth of the sessions that had it in
                # flight (nobody else could ask for it): the same requests.
                self._fill(s)
                for other in losers:
                    assert isinstance(other, _Session)
                    self._fill(other)
            self._schedule_announce(node, node.last_announce + PROGRESS_EVERY)
        self._pump(node)  # we may now serve what was just stored

    def _finish(self, node: _Node) -> None:
        node.picker = None
        node.completed_at = self.now
        self.leechers_left -= 1
        for t in node.sessions.values():
            for req in list(t.requests):
                t.requests.discard(req)
                t.cancelled.append(req)
                self._send(t, self._message(Cancel, *req))
        self._schedule_announce(node, self.now)

    # --- requesting (mirrors Content._fill / _fill_all / _ticker) ---------------------
    def _fill(self, s: _Session) -> None:
        picker = s.node.picker
        if picker is None or s.closing or not s.open:
            return
        want = s.depth - len(s.requests)
        if want <= 0:
            return
        chunk = self.cfg.chunk_size
        for index in picker.pick(s, want, self.now, REQUEST_TIMEOUT):
            req = (index, 0, chunk)
            s.requests.add(req)
            self._send(s, self._message(Request, *req))

    def _fill_all(self, node: _Node) -> None:
        fill = self._fill
        for s in [s for s in node.sessions.values() if s.depth > len(s.requests)]:
            # (_fill's own first test, without the call; a fill sends
            # requests only, so no session's room changes meanwhile.)
            fill(s)

    def _tick(self, node: _Node) -> None:
        now = self.now
        for peer, req in node.choker.overdue(now):  # mirrors Content._ticker
            assert isinstance(peer, _Session)
            self._send(peer, self._message(Reject, *req, "busy"))
        picker = node.picker
        if picker is None:
            if node.choker.max_wait:
                self.at(now + TICK, self._tick, node)  # a seeding leecher's queue
            return
        if node.choker.slots:  # reciprocation: what each peer sends us
            node.choker.update(now, {s: s.rate for s in node.sessions.values()})
        expired = picker.expired(now, REQUEST_TIMEOUT)
        for peer, index in expired:
            picker.cancel(peer, index)
            assert isinstance(peer, _Session)
            req = (index, 0, self.cfg.chunk_size)
            if req in peer.requests:
                peer.requests.discard(req)
                peer.cancelled.append(req)
                self._send(peer, self._message(Cancel, *req))
        # (Closing one session tops up the others, which may give a silent
        # one requests: so whether it owes us anything is asked in turn.)
        for s in [s for s in node.sessions.values() if now - s.last_payload_at > STALL_TIMEOUT]:
            if s.requests:
                self._close(s)
        # The node tops every session up on each tick; every other event
        # that can offer a new request tops up on its own, so the simulator
        # skips the ticks where the picker says nothing new can be found
        # (same requests, far fewer calls at N = 1000).
        if expired or (node.picker is not None and node.picker.top_up_due(now)):
            self._fill_all(node)
        self.at(now + TICK, self._tick, node)

    # --- uploading ------------------------------------------------------------------
    def _pump(self, node: _Node) -> None:
        """Start the next upload if the link is free: the choker picks the connection."""
        if node.uploading:
            return
        while True:
            nxt = node.choker.next_request(self.now)
            if nxt is None:
                return
            s, req = nxt
            assert isinstance(s, _Session)
            if not s.closing:
                break
        node.uploading = True
        s.sending = True
        seconds = req[2] / (node.rate * (1.0 - self.cfg.loss))
        node.busy += seconds
        self.at(self.now + seconds, self._uploaded, s, req)

    def _uploaded(self, s: _Session, req: tuple[int, int, int]) -> None:
        node = s.node
        node.uploading = False
        s.sending = False
        if not s.closing:
            node.uploaded += req[2]
            if s.known is not None:  # it holds what we sent it
                s.known.add((req[0],))
            self._deliver(s, s.conn.send(self._message(DataHeader, *req)), self.now)
            self._kick(s)  # control frames that waited behind the payload
        self._pump(node)


def run(config: SimConfig) -> SimResult:
    """Build and run one simulated swarm."""
    return Simulation(config).run()
