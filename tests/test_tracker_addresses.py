"""Which address a swarm entry names: the source of the announce, or the one
it stated (ANNOUNCE ``ip``). The rule: tracker/_addresses.py; on real sockets
and two namespaces: tests/test_two_machines.py."""

from __future__ import annotations

import pytest

from peerd.wire import FRAME_HEADER, FrameType
from peerd.wire._codec import decode_body
from tracker._addresses import is_loopback, recorded_address
from tracker.index import SwarmIndex


@pytest.mark.parametrize(
    ("stated", "seen", "recorded"),
    [
        ("", "8.8.8.8", "8.8.8.8"),  # nothing stated: the source
        ("", "127.0.0.1", "127.0.0.1"),
        # Believed where the source means nothing to others.
        ("198.51.100.7", "127.0.0.1", "198.51.100.7"),  # beside the tracker
        ("198.51.100.7", "::1", "198.51.100.7"),
        ("198.51.100.7", "10.1.2.3", "198.51.100.7"),  # a private network
        ("198.51.100.7", "192.168.0.9", "198.51.100.7"),
        ("198.51.100.7", "100.64.3.4", "198.51.100.7"),  # carrier-grade NAT
        ("2001:db8::7", "fd00::5", "2001:db8::7"),  # unique-local IPv6
        ("10.77.0.1", "127.0.0.1", "10.77.0.1"),  # a LAN address from loopback
        ("198.51.100.7", "::ffff:10.1.2.3", "198.51.100.7"),  # mapped source
        ("::ffff:198.51.100.7", "127.0.0.1", "198.51.100.7"),  # mapped claim, canonical
        ("127.0.0.1", "127.0.0.1", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.1", "127.0.0.2"),
        # Not believed from a public source: it could aim a swarm at anyone.
        ("198.51.100.7", "8.8.8.8", "8.8.8.8"),
        ("10.1.2.3", "8.8.8.8", "8.8.8.8"),
        # Never an address nobody can dial, nor loopback from elsewhere.
        ("0.0.0.0", "127.0.0.1", "127.0.0.1"),
        ("::", "127.0.0.1", "127.0.0.1"),
        ("224.0.0.1", "10.1.2.3", "10.1.2.3"),
        ("255.255.255.255", "10.1.2.3", "10.1.2.3"),
        ("169.254.1.1", "10.1.2.3", "10.1.2.3"),
        ("fe80::1", "fd00::5", "fd00::5"),
        ("240.0.0.1", "10.1.2.3", "10.1.2.3"),
        ("127.0.0.1", "10.1.2.3", "10.1.2.3"),
        ("::1", "fd00::5", "fd00::5"),
        ("not-an-ip", "127.0.0.1", "127.0.0.1"),
        # A link-local source is no private network to trust.
        ("198.51.100.7", "169.254.9.9", "169.254.9.9"),
    ],
)
def test_recorded_address(stated: str, seen: str, recorded: str) -> None:
    assert recorded_address(stated, seen) == recorded


@pytest.mark.parametrize(
    ("public", "tracker", "stated"),
    [
        ("10.77.0.1", "127.0.0.1", "10.77.0.1"),
        ("10.77.0.1", "tracker.example.org", "10.77.0.1"),
        ("2001:db8::1", "::1", "2001:db8::1"),
        ("127.0.0.1", "127.0.0.1", "127.0.0.1"),  # a loopback swarm
        ("127.0.0.1", "localhost", "127.0.0.1"),
        ("127.0.0.1", "10.77.0.1", ""),  # never a loopback address to another machine
        ("::1", "tracker.example.org", ""),
        ("0.0.0.0", "127.0.0.1", ""),  # nobody can dial these
        ("::", "10.77.0.1", ""),
        ("224.0.0.1", "10.77.0.1", ""),
        ("seed.example.org", "10.77.0.1", ""),  # a name: the tracker takes what it sees
    ],
)
def test_what_a_node_states_in_announce(public: str, tracker: str, stated: str) -> None:
    from peerd.node.node import stated_ip

    assert stated_ip(public, tracker) == stated


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.77.0.1", False),
        ("::", False),
        ("0.0.0.0", False),
        ("2001:db8::1", False),
        ("not-an-ip", False),
    ],
)
def test_is_loopback(text: str, loopback: bool) -> None:
    assert is_loopback(text) is loopback


def _bits(n: int) -> bytes:
    return bytes([0xFF] * (n // 8))


def _swarm() -> SwarmIndex:
    """3 seeders beside the tracker (announced over loopback) and 6 on the LAN."""
    idx = SwarmIndex(ttl=100, interval=30)
    for n in range(3):
        idx.announce(CID, _key(n), "127.0.0.1", 7000 + n, "started", _bits(16), 16, 0, 0)
    for n in range(3, 9):
        idx.announce(CID, _key(n), f"10.77.0.{n}", 7000, "started", _bits(16), 16, 0, 0)
    return idx


def _key(n: int) -> bytes:
    return n.to_bytes(32, "big")


CID = bytes(range(32))


def _asked(idx: SwarmIndex, asker: int, ip: str, want: int, encoded: bool) -> list[str]:
    """The addresses an announce from ``ip`` is answered with (either path)."""
    args = (CID, _key(asker), ip, 7000, "periodic", bytes(2), 16, want, 1.0)
    if not encoded:
        peers, _avail = idx.announce(*args)
        return [p[0] for p in peers]
    frame = idx.announce_frame(*args, 30)
    assert frame is not None
    return [entry.ip for entry in decode_body(FrameType.PEERS, frame[FRAME_HEADER.size :]).peers]


@pytest.mark.parametrize("encoded", [False, True])
def test_loopback_entries_go_only_to_askers_on_loopback(encoded: bool) -> None:
    idx = _swarm()
    for _ in range(3):  # the third ask is answered from a cached ranking's frame
        remote = _asked(idx, 9, "10.77.0.9", 5, encoded)
        # Five usable peers, though the loopback seeders rank as high as any.
        assert len(remote) == 5 and not any(ip.startswith("127.") for ip in remote)
        every = _asked(idx, 9, "10.77.0.9", 50, encoded)
        assert sorted(every) == [f"10.77.0.{n}" for n in range(3, 9)]
        local = _asked(idx, 10, "127.0.0.1", 50, encoded)
        assert sorted(local) == [f"10.77.0.{n}" for n in range(3, 10)] + ["127.0.0.1"] * 3
    # A loopback entry that now states a LAN address is handed out again; one
    # that stops is gone from the count the answer makes room for.
    idx.announce(CID, _key(0), "127.0.0.1", 7000, "periodic", _bits(16), 16, 0, 2, at="10.77.0.1")
    idx.announce(CID, _key(1), "127.0.0.1", 7001, "stopped", _bits(16), 16, 0, 2)
    remote = _asked(idx, 9, "10.77.0.9", 50, encoded)
    assert sorted(remote) == ["10.77.0.1"] + [f"10.77.0.{n}" for n in range(3, 9)]
    # Entries learnt from a shared store (Redis) follow the same rule.
    idx.put_entry(CID, _key(20), "127.0.0.1", 7020, _bits(16), 16, 90.0, 2.0)
    assert "127.0.0.1" not in _asked(idx, 9, "10.77.0.9", 50, encoded)
    # (Keys 2, 10 and 20 are on loopback; so is the asker now, and it sees them.)
    assert _asked(idx, 9, "::ffff:127.0.0.1", 50, encoded).count("127.0.0.1") == 3
