"""The heads the proxy writes, from parsed heads (no sockets needed for these rules; tests/integration/
test_proxy.py puts the bridge in front of the lab)."""

from __future__ import annotations

from support.bridges import BRIDGE_FQDN


def _head_writer():
    from bridge.config import build_config
    from bridge.net.upstream import LegacyPool
    from bridge.proxy.relay import Proxy

    config = build_config({"fqdn": BRIDGE_FQDN, "legacy": ["127.0.0.1:9"]})
    return Proxy(config, LegacyPool(servers=config.legacy, tls_context=None, connect_timeout=5))


def test_forwarded_for_chain_leaves_out_empty_values():
    from bridge.protocol.http1 import parse_request_head

    request = parse_request_head(b"GET /owa/ HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For:\r\nX-Forwarded-For: 9.9.9.9\r\n\r\n")
    head = _head_writer().request_head(request, "10.0.0.1")
    assert b"\r\nX-Forwarded-For: 9.9.9.9, 10.0.0.1\r\n" in head and head.count(b"X-Forwarded-For") == 1


def test_a_security_header_the_origin_marks_hop_by_hop_is_replaced_by_the_bridges():
    from bridge.protocol.http1 import parse_request_head, parse_response_head

    request = parse_request_head(b"GET /owa/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
    origin = parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: x-frame-options\r\nX-Frame-Options: ALLOWALL\r\nContent-Length: 0\r\n\r\n")
    head = _head_writer().response_head(request, origin, 0, False, True)
    assert b"ALLOWALL" not in head and b"\r\nX-Frame-Options: SAMEORIGIN" in head and b"\r\nX-Content-Type-Options: nosniff" in head
