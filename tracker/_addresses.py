"""Which address a swarm entry names: the one the announce came from, or the
one the announcer stated (ANNOUNCE ``ip``, from its ``--public-addr``).

The classic tracker rule is to record the source address of the announce: a
peer cannot make the tracker send the swarm to dial someone else. A stated
address is believed only where the tracker cannot see the truth itself: the
announce came from this machine (loopback) or from a private network (RFC
1918, unique-local IPv6, shared 100.64.0.0/10), where the source address
means nothing to peers outside, or it merely repeats the source address. An
announce from a public address that names another address is recorded at
its source address, as if it named none. A stated address that nobody can
dial (unspecified, multicast, broadcast, link-local, reserved) is never
recorded, nor a loopback address stated from anywhere but loopback.

An entry recorded at a loopback address (a peer beside the tracker that
announced over loopback) is handed only to askers that are on loopback
themselves (``is_loopback`` of the asker's source address, applied by the
index where it builds PEERS answers): to anyone else it names their own
machine, which they will not dial, and it would take the place of a peer
they could use.
"""

from __future__ import annotations

import functools
import ipaddress

__all__ = ["is_loopback", "recorded_address"]

_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(text: str) -> IP | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _behind(address: IP) -> bool:
    """The source address means nothing outside: loopback or a private network."""
    if address.is_loopback:
        return True
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return True
    return address.is_private and not address.is_link_local


def _dialable(address: IP) -> bool:
    return not (
        address.is_unspecified
        or address.is_multicast
        or address.is_link_local
        or (address.is_reserved and not address.is_loopback)
        or address == _BROADCAST
    )


@functools.lru_cache(maxsize=4096)
def recorded_address(stated: str, seen: str) -> str:
    """The address to record for an announce from ``seen`` that stated
    ``stated`` ("" = none): ``stated`` if it may be believed, else ``seen``."""
    if not stated or stated == seen:
        return seen
    claim, source = _parse(stated), _parse(seen)
    if claim is None or source is None or claim == source:
        return seen
    if not _dialable(claim) or not _behind(source):
        return seen
    if claim.is_loopback and not source.is_loopback:
        return seen
    return str(claim)


@functools.lru_cache(maxsize=4096)
def is_loopback(text: str) -> bool:
    """Is ``text`` a loopback address (127.0.0.0/8, ::1, or IPv4-mapped 127/8)?
    False for anything that is not an IP address."""
    address = _parse(text)
    return address is not None and address.is_loopback
