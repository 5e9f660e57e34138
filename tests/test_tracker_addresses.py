"""Which address a swarm entry names: the source of the announce, or the one
it stated (ANNOUNCE ``ip``). The rule: tracker/_addresses.py; on real sockets
and two namespaces: tests/test_two_machines.py."""

from __future__ import annotations

import pytest

from tracker._addresses import recorded_address


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
