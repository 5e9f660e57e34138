"""What clients make the tracker hold, counted: byte budgets and the input gate.

Theory of operation
-------------------
The tracker has one memory budget and one disk budget (``TrackerLimits``).
The memory budget is split between the kinds of state a client can cause,
each a ``Budget`` with a cap for the whole tracker and one per owner (an
address): request frames being received (``Intake``), replies queued for
clients that do not read them, the swarm index, and the cache of encoded
manifests. Fixed costs that no client controls (code, the answer cache,
one connection's small buffers) are outside it.

``Intake`` reads each frame's 5-byte header out of a connection's input
*before* the bytes go to the sans-IO parser (which buffers a frame whole
until it can decode it), and charges the frame's length from that header.
A frame that would not fit is refused there: not one byte of its body is
buffered. Charges are given back when the frame has been decoded (small
frames) or answered (large ones: a PUBLISH body is decoded and verified in
copies as large as itself).
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

    ``admit(data)`` returns how many leading bytes of ``data`` may be fed to
    the parser: all of them, or the bytes before the header of the first
    frame whose charge ``budget`` refuses (``refused`` then holds its
    length, and nothing more may be fed). ``consumed()`` is called once per
    frame the parser decoded, oldest first, and returns that frame's charge,
    which the caller gives back (``release``) now or once it is answered.
    """

    __slots__ = ("address", "budget", "charged", "frames", "head", "left", "refused")

    def __init__(self, budget: Budget, address: str) -> None:
        self.budget = budget
        self.address = address
        self.head = b""  # a header split between reads
        self.left = 0  # body bytes of the current frame still to come
        self.frames: deque[int] = deque()  # the charge of each frame not yet decoded
        self.charged = 0  # everything this connection holds charged
        self.refused = 0  # length of the frame refused (0: none)

    def admit(self, data: bytes) -> int:
        """How many bytes of ``data`` may go to the parser (see class doc)."""
        if self.refused:
            return 0
        pos, end = 0, len(data)
        while pos < end:
            if self.left:
                step = min(self.left, end - pos)
                self.left -= step
                pos += step
                continue
            start = pos - len(self.head)
            need = _HEADER - len(self.head)
            header = self.head + data[pos : pos + need]
            if len(header) < _HEADER:
                self.head = header
                return end
            self.head = b""
            ftype, length = FRAME_HEADER.unpack(header)
            if length > MAX_BODY.get(ftype, -1):
                # The parser refuses this header (bad-frame) before any body.
                self.refused = 0
                self.left = 1 << 62
                return end
            if length > LARGE_FRAME:
                # Decoded and verified in copies as large as itself.
                charge = 2 * length
                if not self.budget.take(charge, self.address):
                    self.refused = length
                    return max(start, 0)
            else:
                charge = _HEADER + length
                self.budget.force(charge, self.address)
            self.charged += charge
            self.frames.append(charge)
            self.left = length
            pos += need
        return end

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
        self.release(self.charged)
