"""Which address a connection attempt comes from, sans I/O: the socket's
peer, or, when that peer is a trusted proxy, the rightmost X-Forwarded-For
hop that is not itself a trusted proxy.

Invariant: a hop is believed only if every hop to its right (and the peer)
is trusted, so a client cannot choose its own address by sending the header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# No real chain of proxies is longer; a longer header costs no more to walk.
MAX_HOPS = 16


def parse_address(text: str) -> IPAddress | None:
    """An address as proxies write it (bare, `[v6]:port` or `v4:port`);
    None if it is anything else. IPv4-mapped IPv6 becomes IPv4."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        text = host
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
        text = host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, proxies: Sequence[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in proxies)


def forwarded_hops(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """Every X-Forwarded-For hop, left to right, across repeated headers."""
    hops: list[str] = []
    for name, value in headers:
        if name.lower() == b"x-forwarded-for":
            hops += value.decode("latin-1").split(",")
    return hops


def client_address(peer: str | None, hops: Sequence[str], proxies: Sequence[IPNetwork]) -> str | None:
    """The address to count attempts against, or None if the peer has none
    (a Unix socket). A malformed hop ends the walk: the last address
    believed (a trusted proxy's) stands, never a string the client chose."""
    if peer is None:
        return None
    address = parse_address(peer)
    if address is None:
        return peer  # not an IP (transport-specific): still one fixed key
    if not proxies:
        return str(address)
    for hop in reversed(hops[-MAX_HOPS:]):
        if not _trusted(address, proxies):
            break
        forwarded = parse_address(hop)
        if forwarded is None:
            break
        address = forwarded
    return str(address)


def scope_client_address(scope: dict, proxies: Sequence[IPNetwork]) -> str | None:
    """`client_address` of an ASGI scope."""
    client = scope.get("client")
    peer = client[0] if client else None
    return client_address(peer, forwarded_hops(scope.get("headers", ())) if proxies else (), proxies)
