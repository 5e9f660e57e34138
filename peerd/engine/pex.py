"""Peer exchange (PEX): which addresses to tell a peer, which to believe.

Theory of operation
-------------------
Each connection of a content may carry PEX messages both ways: the listen
addresses of the *other* peers the sender is connected to for that content
(docs/PROTOCOL.md, "Peer exchange"). The sender tells each address to each
peer once, first :data:`PEX_FIRST_DELAY` seconds after the handshake, then at
most once per :data:`PEX_INTERVAL`, at most :data:`~peerd.wire.MAX_PEX`
addresses a message.

What a remote tells us is hearsay, so it costs us little and can point us
nowhere harmful: an address must be of the family of the connection it came
on, a routable unicast address (never unspecified, multicast, broadcast,
link-local or reserved), loopback only when that connection is loopback, and
never our own listen address. What passes waits in :class:`PexCandidates`
(at most :data:`MAX_CANDIDATES` per content, oldest dropped) until the
engine's normal dial path takes it, under its cap on connections. A PEX
that comes sooner than half the interval after the last one taken is
ignored (not an error: an honest one may have waited in the sender's queue
behind a long DATA and arrive right before the next), so a remote gets at
most 50 addresses considered per half interval.

The constants are read at call time, so a test may patch them.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

__all__ = [
    "MAX_CANDIDATES",
    "PEX_FIRST_DELAY",
    "PEX_INTERVAL",
    "Address",
    "PexCandidates",
    "min_gap",
    "normal_ip",
    "rejected",
]

PEX_FIRST_DELAY = 3.0  # seconds after the handshake before our first PEX on a connection
PEX_INTERVAL = 60.0  # seconds between two PEX we send on one connection (at least)
MAX_CANDIDATES = 200  # PEX-learned addresses one content keeps to dial (oldest dropped)

Address = tuple[str, int]  # (ip, port): a listen address

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def min_gap() -> float:
    """The least time between two PEX a remote may send on one connection:
    half :data:`PEX_INTERVAL` (a message may wait in flight; the next need not)."""
    return PEX_INTERVAL / 2


def normal_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``ip`` names (an IPv4-mapped IPv6 one as IPv4), or None."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def rejected(ip: str, conn_ip: str) -> str | None:
    """Why a PEX address ``ip``, told over a connection with a remote at
    ``conn_ip``, is not worth dialling (None: it may be). The sender applies
    the same rule, so an honest peer never sends what this refuses."""
    address = normal_ip(ip)
    conn = normal_ip(conn_ip)
    if address is None or conn is None:
        return "not an IP address"
    if address.version != conn.version:
        return "another address family than the connection's"
    if address.is_loopback:  # (before is_reserved: ::1 lies in the reserved ::/8)
        return None if conn.is_loopback else "loopback, and the connection is not"
    if (
        address.is_unspecified
        or address.is_multicast
        or address.is_link_local
        or address.is_reserved
        or address == _BROADCAST
    ):
        return "not a unicast address one can dial"
    return None


class PexCandidates:
    """Addresses learned by PEX, waiting to be dialled: at most ``cap``, in
    the order learned (an address learned again moves to the end); when full,
    the oldest goes."""

    def __init__(self, cap: int | None = None) -> None:
        self._cap = cap
        self._items: OrderedDict[Address, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, address: object) -> bool:
        return address in self._items

    def add(self, address: Address) -> None:
        self._items[address] = None
        self._items.move_to_end(address)
        cap = MAX_CANDIDATES if self._cap is None else self._cap
        while len(self._items) > cap:
            self._items.popitem(last=False)

    def discard(self, address: Address) -> None:
        self._items.pop(address, None)

    def take(self) -> Address | None:
        """The oldest candidate, removed (None: there is none)."""
        if not self._items:
            return None
        return self._items.popitem(last=False)[0]
