"""The PROXY protocol version 2 header (HAProxy's spec), sans-IO: who the client was, for a backend
that reads it (nginx ``listen ... proxy_protocol``, HAProxy ``accept-proxy``) before the client's
own bytes. ``header()`` encodes; ``parse()`` decodes (the tests, and anything that wants to check).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_PROXY = 0x21  # version 2, command PROXY
VERSION_LOCAL = 0x20  # version 2, command LOCAL (health checks: no client)
TCP4 = 0x11
TCP6 = 0x21
UNSPEC = 0x00


@dataclass(frozen=True)
class ProxyHeader:
    source: tuple[str, int] | None  # None for LOCAL or an unknown family
    destination: tuple[str, int] | None
    length: int  # bytes of the header


def header(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """The v2 header for a TCP connection from ``source`` to ``destination`` ((address, port) pairs, as
    getpeername/getsockname give them); LOCAL when either is unknown. IPv4-mapped IPv6 addresses are
    sent as IPv4; a mix of families is sent as IPv6."""
    if source is None or destination is None:
        return SIGNATURE + bytes([VERSION_LOCAL, UNSPEC]) + b"\x00\x00"
    from_address = _address(source[0])
    to_address = _address(destination[0])
    if from_address.version == 4 and to_address.version == 4:
        family = TCP4
    else:
        family = TCP6
        from_address = _as_v6(from_address)
        to_address = _as_v6(to_address)
    body = from_address.packed + to_address.packed + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    return SIGNATURE + bytes([VERSION_PROXY, family]) + len(body).to_bytes(2, "big") + body


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address("::ffff:" + str(address))
    return address


class ProxyHeaderError(ValueError):
    pass


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while incomplete; ProxyHeaderError when it is not one."""
    if len(data) < 16:
        if not SIGNATURE.startswith(bytes(data[:12])):
            raise ProxyHeaderError("not a PROXY v2 signature")
        return None
    if data[:12] != SIGNATURE:
        raise ProxyHeaderError("not a PROXY v2 signature")
    command, family = data[12], data[13]
    if command >> 4 != 2 or command & 0x0F > 1:
        raise ProxyHeaderError(f"version/command byte 0x{command:02x}")
    length = int.from_bytes(data[14:16], "big")
    if len(data) < 16 + length:
        return None
    body = data[16 : 16 + length]
    total = 16 + length
    if command == VERSION_LOCAL or family == UNSPEC:
        return ProxyHeader(None, None, total)
    if family == TCP4 and length >= 12:
        source = socket.inet_ntop(socket.AF_INET, body[0:4])
        destination = socket.inet_ntop(socket.AF_INET, body[4:8])
        ports = body[8:12]
    elif family == TCP6 and length >= 36:
        source = socket.inet_ntop(socket.AF_INET6, body[0:16])
        destination = socket.inet_ntop(socket.AF_INET6, body[16:32])
        ports = body[32:36]
    else:
        raise ProxyHeaderError(f"family 0x{family:02x} with {length} bytes")
    return ProxyHeader((source, int.from_bytes(ports[0:2], "big")), (destination, int.from_bytes(ports[2:4], "big")), total)
