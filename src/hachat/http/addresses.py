"""Peer addresses as limits count them: loopback or not, and which client an address is."""

from __future__ import annotations

import ipaddress


def _parse(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address."""
    address = _parse(host)
    return address is not None and address.is_loopback


def client_key(host: str) -> str:
    """The client an address stands for, for per-client limits: an IPv4 address itself (an
    IPv4-mapped IPv6 one as IPv4), an IPv6 address by its /64 (the least one host is given,
    whose other 2^64 addresses it may use in turn). Text that is no address is kept as is."""
    address = _parse(host)
    if address is None:
        return host
    if address.version == 6:
        network = ipaddress.IPv6Network((int(address) >> 64 << 64, 64))
        return str(network)
    return str(address)
