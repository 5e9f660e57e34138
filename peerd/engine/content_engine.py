"""Every decision about one content in one node, as pure code (sans-IO).

Events go in (a peer connected or left, a message arrived, a payload was
received, a chunk verified or failed its hash, the clock, a tracker answer);
actions come out (:class:`Send`, :class:`SendHave`, :class:`Close`,
:class:`Dial`). Time is passed in; nothing here reads a clock, a socket or a
file. The node (:mod:`peerd.node.driver`) executes the actions over real
sockets, the simulator (``sim/``) on a virtual clock: one engine, two drivers.
Why each rule: docs/ARCHITECTURE.md, "The content engine".
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from peerd.engine import pex
from peerd.engine.picker import PiecePicker, pipeline_depth, stream_depth, swarm_counts
from peerd.engine.scheduling import (
    BUSY_BACKOFF,
    QUEUE_WAIT,
    RemoteProgress,
    choose_dials,
    next_announce_delay,
    tracker_want,
)
from peerd.engine.upload_queue import UploadQueue
from peerd.errors import RemoteProtocolError
from peerd.wire import (
    MAX_PEX,
    Bitfield,
    Cancel,
    Event,
    Peers,
    Pex,
    Reject,
    Request,
    bits_from_flags,
    flags_from_bits,
    validate_bits,
)

__all__ = [
    "EVICTABLE_AFTER",
    "MAX_PEERS",
    "MAX_QUEUED_UPLOADS",
    "MAX_SESSIONS",
    "PROGRESS_EVERY",
    "RATE_WINDOW",
    "REQUEST_TIMEOUT",
    "STALL_TIMEOUT",
    "TICK",
    "Action",
    "Close",
    "ContentEngine",
    "Dial",
    "Send",
    "SendHave",
]

PROGRESS_EVERY = 2.0  # seconds between progress announces while chunks arrive
REQUEST_TIMEOUT = 15.0  # a request unanswered this long is cancelled and asked elsewhere
STALL_TIMEOUT = 20.0  # a peer that owes us chunks and sent nothing this long is dropped
TICK = 0.5  # seconds between calls of ContentEngine.tick (drivers keep to it)
RATE_WINDOW = 0.5  # seconds over which a peer's receive rate is measured
MAX_PEERS = 50  # connections a downloader aims for (it dials up to this many)
MAX_SESSIONS = 200  # connections one content takes in all (docs/PROTOCOL.md, "Limits")
EVICTABLE_AFTER = 10.0  # a session that moved no payload this long may make room
MAX_WANT = 200  # the most peers ANNOUNCE may ask for (docs/PROTOCOL.md)
MAX_QUEUED_UPLOADS = 64  # requests a remote may have queued with us
LONELY_RETRY_MAX = 30.0  # seconds: the longest wait between announces with no peer at all

Peer = Hashable  # the driver's handle for one connection
Route = tuple[bytes, str]  # (proven key, remote IP): sessions and bans are per route
Req = tuple[int, int, int]  # (index, offset, length), as on the wire
Address = pex.Address  # (ip, port): where a peer listens


@dataclass(frozen=True, slots=True)
class Send:
    """Send this message on this connection."""

    peer: Peer
    message: Event


@dataclass(frozen=True, slots=True)
class SendHave:
    """Tell this peer we hold chunk ``index`` (drivers may batch these into one HAVE)."""

    peer: Peer
    index: int


@dataclass(frozen=True, slots=True)
class Close:
    """End this connection: say GOODBYE ``reason`` first, unless ``abort``."""

    peer: Peer
    reason: str
    abort: bool = False


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect to ``ip:port`` about this content; call :meth:`ContentEngine.dial_ended` after."""

    route: Route
    ip: str
    port: int


Action = Send | SendHave | Close | Dial


def _address_route(ip: str, port: int) -> Route:
    """The stand-in route of a dial to an address whose key we do not know
    yet (a link's ``x=``, ``--peer``, a PEX address): one dial per address."""
    return (f"direct:{port}".encode(), ip)


def _dialable(ip: str, *, local_ok: bool) -> bool:
    """May a peer at ``ip`` be dialled? Never an unspecified address (0.0.0.0,
    ::) nor a text that is not an address; a loopback one only if
    ``local_ok`` (the tracker that named it is on this machine too)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    address = getattr(address, "ipv4_mapped", None) or address
    if address.is_unspecified or address.is_multicast:
        return False
    return local_ok or not address.is_loopback


class PeerState:
    """What the engine knows about one connection."""

    __slots__ = (
        "arriving",
        "closing",
        "depth",
        "in_swarm",
        "initiated",
        "last_payload_at",
        "last_useful_at",
        "listen",
        "pex_due",
        "pex_epoch",
        "pex_received_at",
        "pex_sent",
        "rate",
        "remote",
        "requests",
        "route",
        "timeouts",
        "window_bytes",
        "window_start",
    )

    def __init__(
        self,
        route: Route,
        num_chunks: int,
        now: float,
        *,
        initiated: bool,
        listen: Address | None = None,
    ) -> None:
        self.route = route
        self.initiated = initiated
        # Where the remote listens (the dialled address, or its IP and HELLO
        # port); None: it does not listen, or the driver does not say.
        self.listen = listen
        # Peer exchange (pex.py): what we told it, when we may tell more,
        # the swarm as we last looked for news for it, its last PEX to us.
        self.pex_sent: set[Address] = set()
        self.pex_due = now + pex.PEX_FIRST_DELAY
        self.pex_epoch = -1
        self.pex_received_at: float | None = None
        # It sent its BITFIELD: a member of the swarm, not a manifest fetch
        # (which closes after MANIFEST): only then is it told and told about.
        self.in_swarm = False
        self.requests: set[Req] = set()  # requests we sent it, unanswered
        self.arriving: set[Req] = set()  # answered by a DATA whose payload is on its way
        self.depth = pipeline_depth(0.0, 1)
        self.rate = 0.0  # payload bytes/s it sends us
        self.window_start = now
        self.window_bytes = 0
        self.last_payload_at = now
        # Last time it did something useful (payload either way, a request to
        # serve): who makes room when connections are short.
        self.last_useful_at = now
        self.timeouts = 0
        self.closing = False
        # What it holds as far as we know (its BITFIELD, its HAVEs, what we sent).
        self.remote = RemoteProgress(num_chunks)


class ContentEngine:
    """The decisions of one node about one content.

    Args:
        size / chunk_size: the content's layout (the last chunk may be short).
        have: one byte (0/1) per chunk we hold, owned by the driver (the store's
            flags); the driver sets a flag *before* :meth:`chunk_stored`.
        my_key: our public key (a connection to ourselves is refused).
        origin: we publish this content from a complete file (super-seeding:
            every chunk out once before any twice).
        now: the time of creation.
        rng: randomness for chunk picking and dial choice (seeded by the simulator).
        source_ready: ``source_ready()``, False while the bytes we hold cannot
            be served for now (a shared file whose size or mtime moved, until
            it is re-hashed): requests are then refused ``busy``, so they come
            back; default: always ready.
        max_peers: connections a downloader dials up to.
    """

    def __init__(
        self,
        *,
        size: int,
        chunk_size: int,
        have: bytearray,
        my_key: bytes,
        origin: bool,
        now: float,
        rng: random.Random | None = None,
        source_ready: Callable[[], bool] | None = None,
        max_peers: int = MAX_PEERS,
    ) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.num_chunks = n = -(-size // chunk_size)
        self.have = have
        self.my_key = my_key
        self.origin = origin
        self.max_peers = max_peers
        self._rng = rng or random.Random()
        self._source_ready = source_ready or (lambda: True)
        self.picker: PiecePicker | None = None
        if not all(have):
            self.picker = PiecePicker(n, have, rng=random.Random(self._rng.random()))
        # A leecher refuses (busy) what waited QUEUE_WAIT in its queue, so the
        # requester asks a neighbour that got the chunk since.
        self.uploads = UploadQueue(
            max_queued=MAX_QUEUED_UPLOADS,
            super_seed=n if origin else 0,
            max_wait=0.0 if origin else QUEUE_WAIT,
        )
        self.peers: dict[Peer, PeerState] = {}  # every attached connection
        self.by_route: dict[Route, Peer] = {}  # the one registered connection per route
        self.connecting: set[Route] = set()
        self.banned: set[Route] = set()
        # Peer exchange: where we listen (0: we do not), the local addresses
        # our connections use (so a PEX naming us is known for what it is),
        # the listen addresses of banned routes, what PEX taught us to dial.
        self.listen_port = 0
        self.local_ips: set[str] = set()
        self.banned_addresses: set[Address] = set()
        self.pex_candidates = pex.PexCandidates()
        self.pex_ignored = 0  # PEX that came too soon after the last one taken
        self._pex_epoch = 0  # grows with every listen address that joins
        self.down_limit: float | None = None  # the node's receive limit, bytes/s
        # The tracker is on this machine (a loopback address): only then may
        # it name peers at loopback addresses. A tracker elsewhere naming
        # 127.0.0.1 means this machine's own services, never a peer of ours.
        self.tracker_local = True
        self.hash_failures = 0
        self.uploaded = 0
        self.downloaded = 0
        self.tracker_peers = 0
        # Tracker announces (see announce_due).
        self._restart = True  # the next announce is "started"
        self._completed_sent = self.picker is None
        self._progress_pending = False
        self._last_announce = -math.inf
        self._interval = 30.0
        self._deadline = -math.inf
        self._lonely_retry = 1.0
        # Set when an announce may have become due sooner than the driver
        # planned (completion, progress, a peer lost): the driver looks again.
        self.announce_sooner = True
        self._out: list[Action] = []

    # --- state ------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.picker is None

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def bitfield(self) -> bytes:
        return bits_from_flags(self.have)

    def have_bytes(self) -> int:
        full = sum(self.have) * self.chunk_size
        if self.num_chunks and self.have[-1]:
            full -= self.num_chunks * self.chunk_size - self.size
        return full

    def remote_share(self, peer: Peer) -> float:
        """How far a remote is (share of the chunks it holds, as far as we
        know): upload turns go to the furthest behind first. The origin does
        not order by need (super-seeding decides there)."""
        st = self.peers.get(peer)
        return 0.0 if self.origin or st is None else st.remote.share

    def _take(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    # --- connections ------------------------------------------------------------
    def attach(
        self,
        peer: Peer,
        route: Route,
        *,
        initiated: bool,
        now: float,
        listen: Address | None = None,
        local_ip: str | None = None,
    ) -> tuple[str, list[Action]]:
        """A handshake completed: ``"ok"`` (registered), ``"refused"`` (banned
        route, ourselves, the losing duplicate: close it silently) or ``"full"``
        (a :class:`Close` saying why is among the actions).

        ``listen`` is where the remote listens (the address we dialled, or
        its IP and HELLO port; None if it does not listen): what PEX tells
        others. ``local_ip`` is our end's address (a PEX naming it at our
        :attr:`listen_port` names us)."""
        if local_ip is not None and (mine := pex.normal_ip(local_ip)) is not None:
            self.local_ips.add(str(mine))
        key = route[0]
        if route in self.banned or key == self.my_key:
            return "refused", []
        old = self.by_route.get(route)
        if old is not None:
            # Both sides connected to each other: keep the connection opened by
            # the smaller key, so both ends make the same choice; two opened by
            # the same side: the newer (the opener gave the old one up).
            opener_new = self.my_key if initiated else key
            opener_old = self.my_key if self.peers[old].initiated else key
            if opener_new > opener_old:
                return "refused", []
            self._close(old, "duplicate: a newer connection replaces this one")
        elif len(self.by_route) >= MAX_SESSIONS and not self._evict_idle(now):
            self._out.append(Close(peer, "too-many: this content has all the peers it can take"))
            return "full", self._take()
        if listen is not None:
            address = pex.normal_ip(listen[0])
            listen = None if address is None or not listen[1] else (str(address), listen[1])
        self.peers[peer] = PeerState(
            route, self.num_chunks, now, initiated=initiated, listen=listen
        )
        self.by_route[route] = peer
        if listen is not None:
            self.pex_candidates.discard(listen)
            if initiated:  # a dial by address (x=, --peer, PEX) is connected now
                self.connecting.discard(_address_route(*listen))
        self.connecting.discard(route)  # a dial that got here counts as connected
        self.uploads.add_peer(peer)
        self._out.append(Send(peer, Bitfield(self.bitfield())))
        return "ok", self._take()

    def _evict_idle(self, now: float) -> bool:
        idle = [
            (st.last_useful_at, p)
            for r, p in self.by_route.items()
            if now - (st := self.peers[p]).last_useful_at >= EVICTABLE_AFTER and not st.closing
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda item: item[0])[1]
        del self.by_route[self.peers[victim].route]
        self._close(victim, "too-many: evicted for a newcomer")
        return True

    def detach(self, peer: Peer, now: float) -> list[Action]:
        """The connection ended (either side): forget it, ask others for its chunks."""
        st = self.peers.pop(peer, None)
        if st is None:
            return []
        if self.by_route.get(st.route) is peer:
            del self.by_route[st.route]
        self.uploads.remove_peer(peer)
        if self.picker is not None:
            self.picker.remove_peer(peer)
            st.requests.clear()
            self._fill_all(now)
            self._dial_pex()
            if not self.by_route and not self.connecting:
                self.announce_sooner = True
        return self._take()

    def _close(self, peer: Peer, reason: str, *, abort: bool = False) -> None:
        st = self.peers.get(peer)
        if st is not None and not st.closing:
            st.closing = True
            self._out.append(Close(peer, reason, abort))

    def _protocol_error(self, peer: Peer, why: str) -> list[Action]:
        self._close(peer, f"protocol-error: {why}")
        return self._take()

    # --- what the remote tells us ---------------------------------------------
    def on_bitfield(self, peer: Peer, bits: bytes, now: float) -> list[Action]:
        """The remote's one BITFIELD (the wire refuses a second)."""
        st = self.peers.get(peer)
        if st is None or st.closing:
            return []  # a connection on its way out (or never attached)
        try:
            validate_bits(self.num_chunks, bits)
        except RemoteProtocolError as exc:
            return self._protocol_error(peer, str(exc))
        st.remote.set_bitfield(bits)
        st.in_swarm = True
        if st.listen is not None:
            self._pex_epoch += 1  # news for every other connection
        if self.picker is not None:
            self.picker.add_peer(peer, flags_from_bits(bits, self.num_chunks))
            self._fill(peer, st, now)
        return self._take()

    def on_have(self, peer: Peer, indices: Iterable[int], now: float) -> list[Action]:
        indices = tuple(indices)
        st = self.peers.get(peer)
        if st is None or st.closing:
            return []
        if max(indices) >= self.num_chunks:
            return self._protocol_error(
                peer, f"HAVE of chunk {max(indices)}, the content has {self.num_chunks}"
            )
        st.remote.add(indices)
        if self.picker is not None:
            for i in indices:
                self.picker.peer_has(peer, i)
            self._fill(peer, st, now)
        return self._take()

    def on_reject(self, peer: Peer, req: Req, reason: str, now: float) -> list[Action]:
        st = self.peers.get(peer)
        picker = self.picker
        if st is None or req not in st.requests:
            return []
        st.requests.discard(req)
        if picker is None:
            return []
        index = req[0]
        if reason == "busy":
            # Ask someone else now, this peer not again for a while. The
            # released chunk is news only to connections whose remote holds
            # it (this one included); the others top up on their own events.
            picker.refuse(peer, index, now + BUSY_BACKOFF)
            for p in picker.holding(list(self.by_route.values()), index):
                self._fill(p, self.peers[p], now)
            return self._take()
        picker.cancel(peer, index)
        flags = picker.peer_flags(peer)
        if reason == "missing" and flags is not None and flags[index]:
            # It advertised a chunk it does not have: stop asking it for that one.
            picker.remove_peer(peer)
            flags[index] = 0
            picker.add_peer(peer, flags)
        self._fill_all(now)
        return self._take()

    # --- serving ----------------------------------------------------------------
    def on_request(self, peer: Peer, req: Req, now: float) -> tuple[bool, list[Action]]:
        """A remote asks for bytes: (queued for upload, actions: a REJECT if not)."""
        st = self.peers.get(peer)
        if st is None or st.closing:
            return False, []
        st.last_useful_at = now
        reason = self._refusal(st, req)
        # The queue refuses past MAX_QUEUED_UPLOADS, and while super-seeding a
        # chunk that someone else already has or gets.
        if reason is None and not self.uploads.on_request(peer, req):
            reason = "busy"
        if reason is not None:
            self._out.append(Send(peer, Reject(*req, reason)))
            return False, self._take()
        return True, []

    def _refusal(self, st: PeerState, req: Req) -> str | None:
        index, offset, length = req
        if st.route in self.banned:
            return "banned"
        if not 0 <= index < self.num_chunks:
            return "invalid"
        if length < 1 or offset + length > self.chunk_length(index):
            return "invalid"
        return self.serve_refusal(index)

    def on_cancel(self, peer: Peer, req: Req) -> None:
        self.uploads.on_cancel(peer, req)

    def queued(self, peer: Peer) -> int:
        """Requests the peer has waiting for upload."""
        return self.uploads.queued(peer)

    def next_upload(self, peer: Peer) -> Req | None:
        """The request to upload next on this connection (its writer holds a turn)."""
        return self.uploads.next_request_for(peer)

    def serve_refusal(self, index: int) -> str | None:
        """Why chunk ``index`` (a valid index) cannot be sent now, or None:
        ``missing`` (we do not hold it) or ``busy`` (the source is being checked)."""
        if not self.have[index]:
            return "missing"
        if not self._source_ready():
            return "busy"
        return None

    def on_uploaded(self, peer: Peer, req: Req, now: float) -> None:
        """A chunk's bytes were handed to the connection."""
        self.uploaded += req[2]
        st = self.peers.get(peer)
        if st is not None:
            st.last_useful_at = now
            st.remote.add((req[0],))

    # --- receiving --------------------------------------------------------------
    def on_data_header(self, peer: Peer, req: Req) -> None:
        """A DATA header answering ``req`` arrived (the wire vouched that it
        answers a request of ours); its payload follows. From now on the
        request is being answered: nothing cancels it."""
        st = self.peers.get(peer)
        if st is not None and req in st.requests:
            st.requests.discard(req)
            st.arriving.add(req)

    def on_payload(self, peer: Peer, req: Req, now: float) -> bool:
        """The payload of that DATA arrived whole. True: verify it and report
        :meth:`chunk_stored` or :meth:`chunk_corrupt`."""
        st = self.peers.get(peer)
        if st is None:
            return False
        wanted = req in st.arriving
        st.arriving.discard(req)
        st.last_payload_at = st.last_useful_at = now
        st.window_bytes += req[2]
        span = now - st.window_start
        if span >= RATE_WINDOW:
            st.rate = st.window_bytes / span
            st.window_bytes, st.window_start = 0, now
        return wanted and self.picker is not None and not self.have[req[0]]

    def chunk_stored(self, peer: Peer, index: int, length: int, now: float) -> list[Action]:
        """Chunk ``index`` from ``peer`` verified and written (``have[index]`` is set)."""
        picker = self.picker
        if picker is None:
            return []
        self.downloaded += length
        for other in picker.chunk_received(peer, index):  # endgame copies in flight
            self._cancel_request(other, (index, 0, length))
        for p in picker.lacking(self.by_route.values(), index):  # no HAVE to a holder
            self._out.append(SendHave(p, index))
        if not self._progress_pending:
            self._progress_pending = True
            self.announce_sooner = True
        if picker.complete:
            self._finish()
        else:
            self._fill_all(now)
        return self._take()

    def chunk_corrupt(self, peer: Peer, route: Route, index: int, now: float) -> list[Action]:
        """A chunk from ``peer`` failed its hash: ban its route for this download."""
        self.hash_failures += 1
        self.banned.add(route)
        st = self.peers.get(peer)
        if st is not None and st.listen is not None:
            self.banned_addresses.add(st.listen)  # never dialled again, whoever names it
        if self.picker is not None:
            self.picker.cancel(peer, index)
            self.picker.remove_peer(peer)
        self._close(peer, f"bad-data: chunk {index} failed its hash")
        self._fill_all(now)
        return self._take()

    def _finish(self) -> None:
        self.picker = None
        for peer in list(self.peers):
            for req in list(self.peers[peer].requests):
                self._cancel_request(peer, req)
        self.announce_sooner = True

    def _cancel_request(self, peer: Peer, req: Req) -> None:
        st = self.peers.get(peer)
        if st is not None and req in st.requests:
            st.requests.discard(req)
            if not st.closing:
                self._out.append(Send(peer, Cancel(*req)))

    # --- requesting -------------------------------------------------------------
    def _timeout(self) -> float:
        limit = self.down_limit
        if limit is None:
            return REQUEST_TIMEOUT
        inflight = sum(len(st.requests) for st in self.peers.values()) * self.chunk_size
        return REQUEST_TIMEOUT + inflight / limit

    def _fill(self, peer: Peer, st: PeerState, now: float) -> None:
        picker = self.picker
        if picker is None or st.closing:
            return
        st.depth = pipeline_depth(st.rate, self.chunk_size)
        want = st.depth - len(st.requests)
        if want <= 0:
            return
        picker.set_rate(peer, st.rate)  # the tail prefers fast holders
        for index in picker.pick(peer, want, now, self._timeout()):
            req = (index, 0, self.chunk_length(index))
            st.requests.add(req)
            self._out.append(Send(peer, Request(*req)))

    def _fill_all(self, now: float) -> None:
        for peer in list(self.by_route.values()):
            self._fill(peer, self.peers[peer], now)

    def tick(self, now: float) -> list[Action]:
        """Every :data:`TICK` seconds: queue waits, request timeouts, stalled peers."""
        for peer, req in self.uploads.overdue(now):
            self._out.append(Send(peer, Reject(*req, "busy")))
        picker = self.picker
        if picker is not None:
            # A chunk only this peer has is not re-asked of it: renewed.
            for peer, index in picker.expired(now, self._timeout()):
                picker.cancel(peer, index)
                st = self.peers.get(peer)
                if st is not None:
                    st.timeouts += 1
                    self._cancel_request(peer, (index, 0, self.chunk_length(index)))
            for peer, st in list(self.peers.items()):
                if st.requests and now - st.last_payload_at > STALL_TIMEOUT:
                    self._close(peer, "stalled: no data", abort=True)
            self._fill_all(now)
            self._dial_pex()
        self._send_pex(now)
        return self._take()

    # --- streaming ----------------------------------------------------------------
    def read_ahead(self, first: int, window: int, now: float) -> list[Action]:
        """Ask for chunks ``first .. first + window - 1`` before any other, in
        order (a reader consumes the content from ``first`` on); outside the
        window, rarest first as always. ``window`` 0 turns it off."""
        if self.picker is None:
            return []
        self.picker.priority = range(first, min(self.num_chunks, first + window))
        self.picker.priority_depth = stream_depth(self.chunk_size)
        self._fill_all(now)
        return self._take()

    # --- tracker ------------------------------------------------------------------
    def tracker_changed(self) -> None:
        """A new tracker connection: announce ``started`` again (it may have forgotten us)."""
        self._restart = True
        self.announce_sooner = True

    def _alone(self) -> bool:
        return self.picker is not None and not self.by_route and not self.connecting

    def announce_due(self, now: float) -> str | None:
        """The announce to send now (``started``, ``completed``, ``progress``,
        ``periodic``), or None: then look again at :meth:`announce_wake`."""
        if self._restart:
            return "started"
        if self.picker is None and not self._completed_sent:
            return "completed"
        # (Times compared as announce_wake computes them: no rounding gap.)
        if self._progress_pending and now >= self._last_announce + PROGRESS_EVERY:
            return "progress"
        if now >= self._deadline:
            return "periodic"
        if self._alone():
            # Downloading with no peer at all (none known yet, or all gone):
            # ask again soon, backing off, instead of waiting a whole interval.
            if now >= self._last_announce + self._lonely_retry:
                self._lonely_retry = min(self._lonely_retry * 2, self._interval, LONELY_RETRY_MAX)
                return "periodic"
        else:
            self._lonely_retry = 1.0
        return None

    def announce_wake(self, now: float) -> float:
        """When :meth:`announce_due` may next say something (given no new event)."""
        self.announce_sooner = False
        if self._restart or (self.picker is None and not self._completed_sent):
            return now
        wake = self._deadline
        if self._progress_pending:
            wake = min(wake, self._last_announce + PROGRESS_EVERY)
        if self._alone():
            wake = min(wake, self._last_announce + self._lonely_retry)
        return wake

    def announce_want(self) -> int:
        """How many peers the announce asks for."""
        room = self.max_peers - len(self.by_route) - len(self.connecting)
        return min(MAX_WANT, tracker_want(max(room, 1)))

    def announced(self, event: str, now: float, answer: Peers | None) -> list[Action]:
        """The tracker took ``event``; ``answer`` lists peers (None: no answer body)."""
        if event == "started":
            self._restart = False
        if event == "completed":
            self._completed_sent = True
        self._last_announce = now
        self._progress_pending = False
        if answer is not None:
            self._interval = max(1.0, float(answer.interval))
            self.tracker_peers = len(answer.peers)
            if self.picker is not None and answer.availability:
                self.picker.set_swarm_availability(swarm_counts(answer.availability))
            self._connect_to(answer.peers)
        self._deadline = now + next_announce_delay(
            len(self.by_route), self.max_peers, self._interval, downloading=self.picker is not None
        )
        return self._take()

    def _connect_to(self, entries: Iterable) -> None:  # type: ignore[type-arg]
        if self.picker is None:
            return  # seeders wait for leechers to connect
        candidates = [
            entry
            for entry in entries
            if entry.key != self.my_key
            and (entry.key, entry.ip) not in self.by_route
            and (entry.key, entry.ip) not in self.connecting
            and (entry.key, entry.ip) not in self.banned
            and entry.port != 0
            and _dialable(entry.ip, local_ok=self.tracker_local)
        ]
        room = self.max_peers - len(self.by_route) - len(self.connecting)
        # A random subset: in a flash crowd everyone is told the same first
        # peers, and dialling them all would make a few hubs.
        for entry in choose_dials(candidates, room, self._rng):
            route = (entry.key, entry.ip)
            self.connecting.add(route)
            self._out.append(Dial(route, entry.ip, entry.port))

    def dial_direct(self, ip: str, port: int) -> list[Action]:
        """Connect to a peer the user named (``peer get --peer``), key unknown yet."""
        placeholder = _address_route(ip, port)
        if placeholder not in self.connecting:
            self.connecting.add(placeholder)
            self._out.append(Dial(placeholder, ip, port))
        return self._take()

    def dial_ended(self, route: Route, now: float) -> None:
        """A :class:`Dial` finished (its connection, if any, was attached and ended)."""
        self.connecting.discard(route)
        if self._alone():
            self.announce_sooner = True

    # --- peer exchange (pex.py; docs/PROTOCOL.md, "Peer exchange") ----------------------
    def _listening(self) -> dict[Address, PeerState]:
        """The listen addresses of the registered connections."""
        out: dict[Address, PeerState] = {}
        for p in self.by_route.values():
            st = self.peers[p]
            if st.listen is not None and st.in_swarm and not st.closing:
                out[st.listen] = st
        return out

    def _send_pex(self, now: float) -> None:
        """Tell each connection that is due the addresses it has not heard from us."""
        epoch = self._pex_epoch
        listening: dict[Address, PeerState] | None = None
        for peer in list(self.by_route.values()):
            st = self.peers[peer]
            if st.closing or not st.in_swarm or now < st.pex_due or st.pex_epoch == epoch:
                continue
            st.pex_epoch = epoch  # nothing new until another address joins
            if listening is None:
                listening = self._listening()
            conn_ip = st.route[1]
            if len(st.pex_sent) > 2 * MAX_SESSIONS:  # long-lived, much churn: forget the gone
                st.pex_sent.intersection_update(listening)
            news = [
                address
                for address, other in listening.items()
                if other is not st
                and address not in st.pex_sent
                and pex.rejected(address[0], conn_ip) is None
            ]
            if not news:
                continue
            batch = news[:MAX_PEX]
            if len(news) > MAX_PEX:
                st.pex_epoch = -1  # the rest at the next turn
            st.pex_sent.update(batch)
            st.pex_due = now + pex.PEX_INTERVAL
            self._out.append(Send(peer, Pex(tuple(batch))))

    def on_pex(self, peer: Peer, added: Iterable[Address], now: float) -> list[Action]:
        """A PEX from ``peer``: remember the addresses worth dialling (a
        downloader dials them, under its cap). One that comes too soon
        after the last one taken is ignored, not an error: an honest
        sender's PEX may wait behind a long DATA and arrive with its next."""
        st = self.peers.get(peer)
        if st is None or st.closing:
            return []
        last = st.pex_received_at
        if last is not None and now - last < pex.min_gap():
            self.pex_ignored += 1
            return []
        st.pex_received_at = now
        if self.picker is None:
            return []  # a seeder dials nobody: leechers come to it
        conn_ip = st.route[1]
        listening = self._listening()
        for ip, port in added:
            if pex.rejected(ip, conn_ip) is not None:
                continue
            address = (str(pex.normal_ip(ip)), port)
            if (
                (port == self.listen_port and address[0] in self.local_ips)
                or address in self.banned_addresses
                or address in listening
            ):
                continue
            self.pex_candidates.add(address)
        self._dial_pex()
        return self._take()

    def _dial_pex(self) -> None:
        """Dial PEX-learned addresses while there is room (:attr:`max_peers`)."""
        if self.picker is None or not len(self.pex_candidates):
            return
        room = self.max_peers - len(self.by_route) - len(self.connecting)
        if room <= 0:
            return
        listening = self._listening()
        while room > 0 and (address := self.pex_candidates.take()) is not None:
            route = _address_route(*address)
            if address in listening or address in self.banned_addresses or route in self.connecting:
                continue
            self.connecting.add(route)
            self._out.append(Dial(route, *address))
            room -= 1
