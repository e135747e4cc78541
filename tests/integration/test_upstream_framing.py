"""Framing edge cases a real IIS can produce, against a scripted upstream that answers byte for byte:
chunked answers to HTTP/1.0 clients, Content-Length with Transfer-Encoding, invalid lengths, early
final answers while the client still sends, malformed client bodies."""

from __future__ import annotations

import asyncio
import logging
import ssl

import pytest
from support.bridges import raw_bridge_connection
from support.upstreams import ANSWERS, answer_each_request


@pytest.fixture
def through_bridge(scripted_bridges, ca):
    """start(script, **config overrides) -> a RawHttpsConnection to a bridge in front of a scripted upstream."""

    def start(script, **overrides):
        _, bridge = scripted_bridges(script, **overrides)
        return raw_bridge_connection(bridge.https_port, ca, timeout=5)

    return start


def test_chunked_answer_to_an_http10_client_is_delivered_until_close(through_bridge):
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    connection = through_bridge(lambda r, w: answer_each_request(r, w, chunked))
    connection.send(b"GET /owa/ HTTP/1.0\r\nHost: bridge.lab.test\r\n\r\n")
    data = connection.read_until_close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    assert body == b"hello world"


def test_chunked_framing_wins_over_content_length(through_bridge):
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    connection = through_bridge(lambda r, w: answer_each_request(r, w, both))
    for _ in range(2):  # the connection stays in step: a second request gets its own answer
        connection.send(b"GET /owa/ HTTP/1.1\r\nHost: bridge.lab.test\r\n\r\n")
        status, headers = connection.read_head()
        assert status == 200 and headers.get("transfer-encoding") == "chunked" and "content-length" not in headers
        assert connection.read_body(len(b"5\r\nhello\r\n0\r\n\r\n")) == b"5\r\nhello\r\n0\r\n\r\n"


@pytest.mark.parametrize("length", [b"5, 6", b"-1", b"+5", b"\xc2\xb2"])
def test_invalid_upstream_content_length_is_a_502(through_bridge, length):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nhello"
    connection = through_bridge(lambda r, w: answer_each_request(r, w, answer))
    connection.send(b"GET /owa/ HTTP/1.1\r\nHost: bridge.lab.test\r\n\r\n")
    status, _ = connection.read_head()
    assert status == 502


def test_early_final_answer_reaches_the_client_whole(through_bridge):
    """The origin refuses a large upload at once and closes: its whole answer must arrive."""
    refusal_body = b"R" * 300_000

    async def refuse_early(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(refusal_body) + refusal_body)
        await writer.drain()

    connection = through_bridge(refuse_early)
    connection.send(b"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: bridge.lab.test\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000)
    status, headers = connection.read_head()
    assert status == 413
    for _ in range(20):  # the client goes on sending while it reads, as a real one would
        try:
            connection.send(b"x" * 1000)
        except (ConnectionError, ssl.SSLError):
            break
    assert connection.read_body(len(refusal_body)) == refusal_body


def test_malformed_client_body_closes_both_legs_without_a_traceback(through_bridge, caplog):
    async def answer_after_head(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # waits for the body until the bridge closes the leg

    caplog.set_level(logging.INFO)
    connection = through_bridge(answer_after_head)
    connection.send(b"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: bridge.lab.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    status, _ = connection.read_head()  # the answer is already on its way while the body flows
    assert status == 200
    connection.send(b"zz\r\n")  # not a chunk size
    connection.read_until_close()
    assert "malformed" in caplog.text
    assert "Traceback" not in caplog.text and "Unhandled exception" not in caplog.text


# ---- one keep-alive connection, every shape of answer in turn ------------------------------------
# After the first request, plain requests take the proxy's fast path (relayed in callbacks); each
# answer in ANSWERS (support/upstreams.py) that is not a small Content-Length one must be handed back to the general path
# without losing a byte or the order.


def test_every_answer_shape_in_turn_on_one_connection(through_bridge):
    connections = []

    async def script(reader, writer):
        for index, (answer, _, _) in enumerate(ANSWERS):
            await reader.readuntil(b"\r\n\r\n")
            if index == 0:
                connections.append(1)  # (the bridge's start-up check connects without a request)
            writer.write(answer)
            await writer.drain()
        await reader.read()

    connection = through_bridge(script)
    for index, (_, status, body) in enumerate(ANSWERS):
        connection.send_head("GET", "/EWS/Exchange.asmx", {})
        got_status, headers, got_body = connection.read_answer()
        assert (got_status, got_body) == (status, body), index
    assert headers.get("connection") == "close"
    assert connection.read_until_close(2.0) == b""  # the bridge ended the connection after the last answer
    assert connections == [1]  # one upstream connection served all of them


def test_a_silent_upstream_on_a_kept_connection_gets_504_after_the_idle_timeout(through_bridge):
    async def script(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)  # never answers the second request

    connection = through_bridge(script, idle_timeout=1.0)
    connection.send_head("GET", "/EWS/Exchange.asmx", {})
    assert connection.read_answer()[0] == 200
    connection.send_head("GET", "/EWS/Exchange.asmx", {})
    status, headers, _ = connection.read_answer()
    assert status == 504 and headers.get("connection") == "close"


HOP_LADEN = (
    b"HTTP/1.1 200 OK\r\nX-Before: 1\r\nKEEP-ALIVE: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nTE: trailers\r\n"
    b"Trailer: X-Sum\r\nProxy-Authenticate: Basic\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 42\r\nCONTENT-length: 5\r\n"
    b"x-frame-options: DENY\r\nContent-Location: https://upstream.lab.test/owa/x\r\nX-After: 2\r\n\r\nhello"
)


def test_hop_by_hop_response_lines_are_removed_on_both_paths(through_bridge):
    """The first answer goes through the general path, the second through the fast path: both drop
    every hop-by-hop line (whatever its case) and those the origin's Connection names, keep the
    origin's own X-Frame-Options, add the missing security header, and reframe the body."""
    connection = through_bridge(lambda r, w: answer_each_request(r, w, HOP_LADEN))
    for _ in range(2):
        connection.send_head("GET", "/EWS/Exchange.asmx", {})
        while b"\r\n\r\n" not in connection.buffer:
            connection._receive()
        head = connection.buffer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        connection.buffer = connection.buffer[len(head) + 4 :]
        lines = head.split("\r\n")
        names = [line.split(":", 1)[0].lower() for line in lines[1:]]
        assert lines[0] == "HTTP/1.1 200 OK"
        assert names[:2] == ["x-before", "x-frame-options"] and "x-after" in names, head
        for dropped in ("keep-alive", "proxy-connection", "upgrade", "te", "trailer", "proxy-authenticate", "connection", "x-secret"):
            assert dropped not in names, (dropped, head)
        assert names.count("content-length") == 1 and "Content-Length: 5" in lines
        assert "x-frame-options: DENY" in lines and names.count("x-frame-options") == 1
        assert "X-Content-Type-Options: nosniff" in lines
        assert any(line.lower().startswith("content-location: https://bridge.lab.test") for line in lines), head
        assert connection.read_body(5) == b"hello"
