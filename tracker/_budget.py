"""What clients make the tracker hold, counted: byte budgets and the input gate.

The tracker has one memory budget and one disk budget (``TrackerLimits``).
The memory budget is split between the kinds of state a client can cause,
each a ``Budget`` with a cap for the whole tracker and one per owner (an
address): request frames being received (``Intake``), replies queued for
clients that do not read them, the swarm index, and the cache of encoded
manifests. Fixed costs no client controls (code, the answer cache, one
connection's small buffers) are outside it.

``Intake`` reads each frame's 5-byte header *before* the bytes reach the
sans-IO parser (which buffers a frame whole) and charges the frame's length
from it: a frame that would not fit is refused there, with not one byte of
its body buffered. The charge is given back once the request is answered
(its decoded copy lives that long; a PUBLISH's verification makes its own
copies in one worker thread, one manifest at a time).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from peerd.wire import FRAME_HEADER, MAX_BODY

__all__ = ["LARGE_FRAME", "Budget", "Intake"]

# Frames above this length are charged from their header and may be refused;
# smaller ones are bounded by one read (64 KiB) per connection anyway.
LARGE_FRAME = 64 * 1024
_HEADER = FRAME_HEADER.size


class Budget:
    """Bytes of one kind of state: a cap for everyone and one per owner.

    Args:
        total: bytes this kind of state may hold in the whole tracker.
        per_owner: bytes one owner (an address) may hold of it.
    """

    __slots__ = ("by_owner", "per_owner", "total", "used")

    def __init__(self, total: int, per_owner: int) -> None:
        self.total = total
        self.per_owner = per_owner
        self.used = 0
        self.by_owner: dict[Hashable, int] = {}

    def fits(self, n: int, owner: Hashable) -> bool:
        """Whether ``n`` more bytes for ``owner`` stay within both caps."""
        return self.used + n <= self.total and self.by_owner.get(owner, 0) + n <= self.per_owner

    def take(self, n: int, owner: Hashable) -> bool:
        """Charge ``n`` bytes to ``owner`` if they fit; returns whether they did."""
        if not self.fits(n, owner):
            return False
        self.force(n, owner)
        return True

    def force(self, n: int, owner: Hashable) -> None:
        """Charge ``n`` bytes whether or not they fit (bounded elsewhere)."""
        self.used += n
        self.by_owner[owner] = self.by_owner.get(owner, 0) + n

    def give(self, n: int, owner: Hashable) -> None:
        """Give back ``n`` bytes charged to ``owner``."""
        self.used -= n
        left = self.by_owner.get(owner, 0) - n
        if left > 0:
            self.by_owner[owner] = left
        else:
            self.by_owner.pop(owner, None)


class Intake:
    """One connection's input, followed frame by frame ahead of the parser.

    ``admit(data)`` returns the bytes of ``data`` that may go to the parser
    now. When ``budget`` refuses a frame's charge, those are the bytes before
    that frame; ``refused`` then holds its length, and the bytes after its
    header wait in ``rest`` until the caller has answered every earlier
    request and the refused one (ERROR ``limit``) and calls ``after_refusal``.
    The refused frame's body is then read and dropped as it arrives (it costs
    bandwidth, not memory), so the connection goes on.

    ``consumed()`` is called once per frame the parser decoded, oldest
    first, and returns that frame's charge, which the caller gives back
    (``release``) now or once the request is answered.
    """

    __slots__ = (
        "address",
        "budget",
        "charged",
        "frames",
        "head",
        "left",
        "refused",
        "rest",
        "skip",
    )

    def __init__(self, budget: Budget, address: str) -> None:
        self.budget = budget
        self.address = address
        self.head = b""  # a header split between reads
        self.left = 0  # body bytes of the current frame still to come
        self.skip = 0  # body bytes of a refused frame still to drop
        self.frames: deque[int] = deque()  # the charge of each frame not yet decoded
        self.charged = 0  # everything this connection holds charged
        self.refused = 0  # length of the frame refused and not yet answered (0: none)
        self.rest = b""  # input after a refused frame's header, held until it is answered

    def admit(self, data: bytes) -> bytes:
        """The bytes of ``data`` that may go to the parser now (see class doc).

        A frame header goes to the parser only once all of it is here and
        judged, so a refused frame never leaves part of itself behind.
        """
        if self.refused:
            self.rest += data
            return b""
        pos, end = 0, len(data)
        if self.skip:
            pos = min(self.skip, end)
            self.skip -= pos
        begin = pos
        prefix = b""  # the start of a header held from the last read, once judged
        stop = end
        while pos < end:
            if self.left:
                step = min(self.left, end - pos)
                self.left -= step
                pos += step
                continue
            held = self.head
            need = _HEADER - len(held)
            header = held + data[pos : pos + need]
            if len(header) < _HEADER:
                self.head = header
                stop = pos  # held back until the header is whole
                break
            self.head = b""
            ftype, length = FRAME_HEADER.unpack(header)
            if length > MAX_BODY.get(ftype, -1):
                # The parser refuses this header (bad-frame) before any body.
                prefix = prefix or held
                self.left = 1 << 62
                break
            charge = _HEADER + length
            if length > LARGE_FRAME:
                if not self.budget.take(charge, self.address):
                    self.refused = length
                    self.skip = length
                    self.rest = data[pos + need :]
                    stop = pos
                    break
            else:
                self.budget.force(charge, self.address)
            self.charged += charge
            self.frames.append(charge)
            self.left = length
            if held:
                prefix = held
            pos += need
        body = data[begin:stop] if begin or stop < end else data
        return prefix + body if prefix else body

    def after_refusal(self) -> bytes:
        """The refused frame was answered: what of the held input may go to the parser."""
        self.refused = 0
        rest, self.rest = self.rest, b""
        return self.admit(rest)

    def consumed(self) -> int:
        """The charge of the oldest frame not yet decoded (the parser just decoded it)."""
        return self.frames.popleft() if self.frames else 0

    def release(self, charge: int) -> None:
        """Give back a frame's charge."""
        if charge:
            self.charged -= charge
            self.budget.give(charge, self.address)

    def close(self) -> None:
        """Give back everything this connection still holds charged."""
        self.frames.clear()
        self.rest = b""
        self.release(self.charged)
