"""Property-based fuzzing (hypothesis) of request-head handling over real sockets: a few dozen heads
through a bridge in front of the lab: every head gets an answer, and a head the guard refuses never
reaches the lab (its counters prove it). (tests/unit/test_fuzz_head.py fuzzes the parser in-process.)

Bounded for CI: FUZZ_SOCKET_EXAMPLES (default 30) raises the count.
"""

from __future__ import annotations

import os
import re
import ssl

import pytest
from hypothesis import HealthCheck, example, given, settings
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_config, bridge_session
from support.fuzz_heads import accepted, request_heads
from support.lab import LAB_PASSWORD, LAB_USER
from support.net import tls_connection

from bridge.certs.keys import LocalCA

SOCKET_EXAMPLES = int(os.environ.get("FUZZ_SOCKET_EXAMPLES", "30"))


@pytest.fixture(scope="module")
def bridge(lab, ca, tmp_path_factory):
    config = bridge_config(lab.port, tmp_path_factory.mktemp("bridge"), ca, status_bind="off", header_timeout=1.0, idle_timeout=3.0)
    with BackgroundBridge(config) as running:
        yield running


def exchange(bridge: BackgroundBridge, ca: LocalCA, data: bytes) -> bytes:
    sock = tls_connection(bridge.https_port, ca)
    answer = b""
    try:
        sock.sendall(data)
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        pass
    finally:
        sock.close()
    return answer


@settings(max_examples=SOCKET_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=request_heads())
# Heads refused only after they were parsed whole, so the property is exercised on every run.
@example(data=f"TRACE /EWS/Exchange.asmx HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\n\r\n".encode())
@example(data=f"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".encode())
@example(data=f"POST /EWS/Exchange.asmx HTTP/1.0\r\nHost: {BRIDGE_FQDN}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode())
@example(data=b"GET /EWS/Exchange.asmx#x HTTP/1.1\r\nHost: evil host\r\n\r\n")
@example(data=b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: evil host\r\n\r\n")
def test_every_head_is_answered_and_refused_ones_never_reach_the_lab(bridge, lab, ca, data):
    before = lab.counters.snapshot()["requests_total"]
    answer = exchange(bridge, ca, data)
    forwarded = lab.counters.snapshot()["requests_total"] - before
    assert re.match(rb"HTTP/1\.[01] \d{3} ", answer), (data[:200], answer[:200])
    if not accepted(data):
        assert forwarded == 0, data[:200]


def test_the_bridge_still_serves_after_the_fuzzing(bridge, ca):
    session = bridge_session(ca, auth=(LAB_USER, LAB_PASSWORD))
    assert session.get(bridge.url + "/EWS/Exchange.asmx").status_code == 200
    session.close()
