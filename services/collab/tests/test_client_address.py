"""Client-address vectors: the peer, X-Forwarded-For and the trusted proxies in, the address counted out."""

from __future__ import annotations

import ipaddress

import pytest
from channels_collab.client_address import client_address, forwarded_hops, parse_address, scope_client_address


def nets(*specs):
    return tuple(ipaddress.ip_network(s, strict=False) for s in specs)


LOCAL = nets("127.0.0.1")
LB = nets("10.0.0.0/8", "fd00::/8")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.5", "203.0.113.5"),
        (" 203.0.113.5 ", "203.0.113.5"),
        ("203.0.113.5:4711", "203.0.113.5"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("", None),
        ("unknown", None),
        ("203.0.113", None),
        ("203.0.113.5:", None),
        ("203.0.113.5:http", None),
        ("[2001:db8::1", None),
        ("[2001:db8::1]x", None),
        ("[2001:db8::1]:", None),
        ("999.0.0.1", None),
        ("203.0.113.5 198.51.100.1", None),
        ("_hidden", None),
    ],
)
def test_parse_address(text, expected):
    address = parse_address(text)
    assert (str(address) if address is not None else None) == expected


@pytest.mark.parametrize(
    ("peer", "xff", "proxies", "expected"),
    [
        # No proxies trusted: the header is never read.
        ("203.0.113.5", "198.51.100.1", (), "203.0.113.5"),
        # Spoofed header from an untrusted peer: ignored.
        ("203.0.113.5", "198.51.100.1", LOCAL, "203.0.113.5"),
        ("203.0.113.5", "127.0.0.1", LOCAL, "203.0.113.5"),
        # A trusted peer: the rightmost hop.
        ("127.0.0.1", "198.51.100.1", LOCAL, "198.51.100.1"),
        # What the client wrote itself, left of the hop our proxy appended, is not believed.
        ("127.0.0.1", "1.1.1.1, 198.51.100.1", LOCAL, "198.51.100.1"),
        # A chain of trusted proxies (CIDR) is walked through, right to left.
        ("10.1.2.3", "1.1.1.1, 198.51.100.1, 10.9.9.9, 10.0.0.7", LB, "198.51.100.1"),
        # Every hop trusted: the leftmost one stands.
        ("10.1.2.3", "10.2.2.2, 10.3.3.3", LB, "10.2.2.2"),
        # No header from a trusted peer: the peer.
        ("127.0.0.1", None, LOCAL, "127.0.0.1"),
        # IPv6 peers and hops; CIDR in IPv6.
        ("fd00::1", "2001:db8::7", LB, "2001:db8::7"),
        ("fd00::1", "[2001:db8::7]:5555, fd12::3", LB, "2001:db8::7"),
        ("2001:db8::9", "198.51.100.1", LB, "2001:db8::9"),
        # An IPv4-mapped peer is its IPv4 address, trusted as such.
        ("::ffff:127.0.0.1", "198.51.100.1", LOCAL, "198.51.100.1"),
        # Ports on hops are dropped, so one client is one key.
        ("127.0.0.1", "198.51.100.1:1234", LOCAL, "198.51.100.1"),
        # Malformed hops: the last address believed stands, never the garbage.
        ("127.0.0.1", "garbage", LOCAL, "127.0.0.1"),
        ("127.0.0.1", "198.51.100.1, unknown", LOCAL, "127.0.0.1"),
        ("10.0.0.1", "198.51.100.1, , 10.0.0.2", LB, "10.0.0.2"),
        ("10.0.0.1", "bogus, 198.51.100.1", LB, "198.51.100.1"),
        ("127.0.0.1", "", LOCAL, "127.0.0.1"),
        # A peer that is no IP address (e.g. a Unix socket's name) is one key of its own.
        ("/run/collab.sock", "198.51.100.1", LOCAL, "/run/collab.sock"),
        (None, "198.51.100.1", LOCAL, None),
    ],
)
def test_client_address(peer, xff, proxies, expected):
    hops = xff.split(",") if xff is not None else []
    assert client_address(peer, hops, proxies) == expected


def test_a_long_chain_of_trusted_hops_is_walked_only_so_far():
    hops = ["198.51.100.1"] + [f"10.0.0.{i}" for i in range(1, 200)]
    assert client_address("10.1.1.1", hops, LB) == "10.0.0.184"  # the 16th hop from the right
    assert client_address("10.1.1.1", hops[-15:], LB) == "10.0.0.185"  # every hop trusted: the leftmost


def test_forwarded_hops_across_repeated_headers_in_order():
    headers = [(b"host", b"x"), (b"x-forwarded-for", b"1.1.1.1, 2.2.2.2"), (b"X-Forwarded-For", b"3.3.3.3")]
    assert [h.strip() for h in forwarded_hops(headers)] == ["1.1.1.1", "2.2.2.2", "3.3.3.3"]


def test_scope_client_address():
    scope = {"client": ("127.0.0.1", 5555), "headers": [(b"x-forwarded-for", b"198.51.100.1, 198.51.100.2")]}
    assert scope_client_address(scope, LOCAL) == "198.51.100.2"
    assert scope_client_address(scope, ()) == "127.0.0.1"
    assert scope_client_address({"client": None, "headers": []}, LOCAL) is None
