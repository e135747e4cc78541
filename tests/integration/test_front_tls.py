"""Front-end TLS edge: a client whose first request rides in the same TCP segment as its TLS Finished.

Outlook and the migration service send the request the moment the handshake completes; the bridge's
gate starts TLS itself (loop.start_tls), so bytes that arrive before start_tls returns must not be lost.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
import uvloop
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_client_context, bridge_config


def handshake_then_request_in_one_write(port: int, context: ssl.SSLContext, request: bytes) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=BRIDGE_FQDN)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("the bridge closed the connection during the handshake") from None
                incoming.write(data)
        tls.write(request)
        sock.sendall(outgoing.read())  # client Finished and the encrypted request, one write
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            incoming.write(data)
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
        return answer


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_request_in_the_same_segment_as_the_client_finished(lab, ca, tmp_path, loop_factory):
    with BackgroundBridge(bridge_config(lab.port, tmp_path, ca), loop_factory) as running:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            context = bridge_client_context(ca, minimum_version=version, maximum_version=version)
            before = lab.counters.requests_total
            answer = handshake_then_request_in_one_write(running.https_port, context, f"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 401"), (version, answer[:80])
            assert lab.counters.requests_total == before + 1
