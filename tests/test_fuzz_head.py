"""Property-based fuzzing (hypothesis) of request-head handling: bridge.front's head reader
(complete_head_length) and parser (parse_request_head).

1. In-process, a few hundred heads: the parser only ever raises HeadRefused (anything else would
   break the connection instead of answering), and every head it accepts leaves nothing ambiguous
   for the legacy server: one framing, clean names and values, a sane method and target.
2. Over real sockets, a few dozen heads through a bridge in front of the lab: every head gets an
   answer, and a head the guard refuses never reaches the lab (its counters prove it).

Bounded for CI: FUZZ_EXAMPLES (default 300) and FUZZ_SOCKET_EXAMPLES (default 30) raise the counts.
"""

from __future__ import annotations

import os
import re
import socket
import ssl

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge.certs.keys import LocalCA
from bridge.protocol.http1 import MAX_HEAD_BYTES, HeadRefused, RequestHead, complete_head_length, parse_request_head
from bridge_clients import BRIDGE_FQDN, BackgroundBridge, bridge_client_context, bridge_config, bridge_session
from lab_clients import LAB_PASSWORD, LAB_USER

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
SOCKET_EXAMPLES = int(os.environ.get("FUZZ_SOCKET_EXAMPLES", "30"))
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# A plausible head, then up to three hostile mutations: many heads get past the reader to the framing and Host checks.
METHODS = ["GET", "POST", "RPC_IN_DATA", "RPC_OUT_DATA", "PROPFIND"]
TARGETS = ["/EWS/Exchange.asmx", "/owa/", "/rpc/rpcproxy.dll?EXCH2007.lab.local:6001", "/Autodiscover/Autodiscover.xml", "/ecp/"]
NAMES = ["Content-Length", "Transfer-Encoding", "Connection", "Expect", "Authorization", "X-Forwarded-For", "Upgrade", "User-Agent", "Host"]
VALUES = ["5", "0", "chunked", "close", "keep-alive", "100-continue", "MSRPC", "203.0.113.9", BRIDGE_FQDN]
HOSTILE_METHODS = ["get", "CONNECT", "TRACE", "G(ET", "GE T", "", "X" * 40, "\x16\x03\x01", "GET\x00"]
HOSTILE_TARGETS = [
    "http://evil.example/owa/", "//evil.example/owa", "*", "/owa/../ecp/", "/owa/%2e%2e/ecp", "/owa/%252e%252e/", "/owa\\..\\x",
    "/owa/#frag", "/owa/ x", "/owa/\x00", "/" + "a" * 9000, "127.0.0.1:22",
]
HOSTILE_VERSIONS = ["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/11", "http/1.1", "HTTP/1.1 extra", "HTTP/0.9"]
HOSTILE_NAMES = ["X A", "X:A", " Host", "Host ", "Content-Length\t", "Content-Length ", "X\x00A", "Transfer-Encoding"]
HOSTILE_VALUES = [
    "evil host", "5, 5", "-1", "+5", "0x5", "99999999999999999999", "gzip, chunked", "chunked, gzip", "identity", " chunked",
    "CHUNKED", "chunked\x00", "keep-alive, Upgrade", "websocket", "a\rb", "a\nb", "\xe9t\xe9", "x" * 9000,
]
MUTATIONS = ["method", "target", "version", "name", "value", "random-value", "duplicate", "fold", "drop-host", "line-ending"]


@st.composite
def request_heads(draw) -> bytes:
    method, target, version = draw(st.sampled_from(METHODS)), draw(st.sampled_from(TARGETS)), "HTTP/1.1"
    headers = [["Host", BRIDGE_FQDN]] + [list(pair) for pair in draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=3))]
    end, fold = "\r\n", None
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        if mutation == "method":
            method = draw(st.sampled_from(HOSTILE_METHODS))
        elif mutation == "target":
            target = draw(st.sampled_from(HOSTILE_TARGETS))
        elif mutation == "version":
            version = draw(st.sampled_from(HOSTILE_VERSIONS))
        elif mutation == "name":
            headers.append([draw(st.sampled_from(HOSTILE_NAMES)), draw(st.sampled_from(VALUES))])
        elif mutation == "value":
            headers.append([draw(st.sampled_from(NAMES)), draw(st.sampled_from(HOSTILE_VALUES))])
        elif mutation == "random-value":
            headers.append([draw(st.sampled_from(NAMES)), draw(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=12))])
        elif mutation == "duplicate" and headers:
            headers.append(list(draw(st.sampled_from(headers))))
        elif mutation == "fold" and headers:
            fold = draw(st.integers(0, len(headers) - 1)), draw(st.sampled_from([" folded", "\tfolded", " "]))
        elif mutation == "drop-host":
            headers = [pair for pair in headers if pair[0] != "Host"]
        elif mutation == "line-ending":
            end = draw(st.sampled_from(["\n", "\r", "\r\r\n"]))
    lines = [f"{method} {target} {version}"]
    for index, (name, value) in enumerate(headers):
        lines.append(f"{name}: {value}")
        if fold is not None and fold[0] == index:
            lines.append(fold[1])  # obsolete line folding
    head = (end.join(lines) + end + end).encode("utf-8", "surrogateescape")
    return head + body_for(headers)


def body_for(headers: list[list[str]]) -> bytes:
    """A body matching the framing the head announces, so accepted requests complete."""
    for name, value in headers:
        if name.lower() == "transfer-encoding":
            return b"5\r\nhello\r\n0\r\n\r\n"
    for name, value in headers:
        if name.lower() == "content-length" and value.strip().isdigit():
            return b"hello"[: int(value.strip()[:3])]
    return b""


def parse(data: bytes) -> RequestHead | None:
    """The head the bridge makes of data (None while it would wait for more); raises HeadRefused."""
    data = data.lstrip(b"\r\n")  # as the connection does before a request line
    length = complete_head_length(data)
    return parse_request_head(data[:length]) if length else None


def accepted(data: bytes) -> bool:
    """Would this head go on to the proxy?"""
    try:
        return parse(data) is not None
    except HeadRefused:
        return False


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(request_heads())
def test_whatever_passes_the_guard_is_unambiguous(data):
    try:
        message = parse(data)
    except HeadRefused as exc:
        assert exc.problem.status in (400, 405, 414, 431, 501, 505)
        return
    if message is None:
        return  # the head is not complete: the connection waits, then answers 408
    assert re.fullmatch(r"[A-Z][A-Z0-9_-]*", message.method) and message.method not in ("CONNECT", "TRACE", "TRACK")
    assert message.version in ((1, 0), (1, 1))
    assert not re.search(r"[\s\x00-\x1f\x7f#]", message.raw_path)
    names = [name.lower() for name, _ in message.raw_headers]
    lengths = [value for name, value in message.raw_headers if name.lower() == b"content-length"]
    codings = [value for name, value in message.raw_headers if name.lower() == b"transfer-encoding"]
    assert not (lengths and codings)
    assert len(lengths) <= 1 and all(value.isdigit() for value in lengths)
    assert codings == [] or [c.lower() for c in codings] == [b"chunked"]
    assert message.chunked == bool(codings) and message.content_length == (int(lengths[0]) if lengths else None)
    assert names.count(b"host") == (1 if message.version == (1, 1) else names.count(b"host")) <= 1
    for name, value in message.raw_headers:
        assert TOKEN.fullmatch(name.decode("latin-1")), name  # no folding, no whitespace in names
        assert not re.search(rb"[\r\n\x00]", value), value
    assert sum(len(line) + 2 for line in message.lines) <= MAX_HEAD_BYTES + 2


# --------------------------------------------------------------------------- over the socket


@pytest.fixture(scope="module")
def bridge(lab, ca, tmp_path_factory):
    config = bridge_config(lab.port, tmp_path_factory.mktemp("bridge"), ca, status_bind="off", header_timeout=1.0, idle_timeout=3.0)
    with BackgroundBridge(config) as running:
        yield running


def exchange(bridge: BackgroundBridge, ca: LocalCA, data: bytes) -> bytes:
    raw = socket.create_connection(("127.0.0.1", bridge.https_port), timeout=5)
    sock = bridge_client_context(ca).wrap_socket(raw, server_hostname=BRIDGE_FQDN)
    sock.settimeout(5)
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
