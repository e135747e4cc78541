"""Regression tests of what goes on the wire, one per defect found while moving HTTP/1.1 parsing into
bridge.protocol.http1: a bridge on its own loop in front of a scripted TLS upstream that records what
reaches it and answers byte for byte, and a raw TLS client. Self-contained (bridge.*, pytest and the
``ca`` fixture only)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from dataclasses import replace

import pytest

from bridge.certs.keys import cert_pem, new_private_key, write_pair
from bridge.config import BridgeConfig, LegacyServer
from bridge.runtime.app import start_bridge

FQDN = "bridge.wire.test"
HOST = f"Host: {FQDN}\r\n".encode()


class Upstream:
    """A TLS server on its own loop; each connection runs ``script(reader, writer, seen)``, where
    ``seen`` (a bytearray) collects every byte the bridge sent on that connection."""

    def __init__(self, script, directory, ca) -> None:
        key = new_private_key("ecdsa-p256")
        cert, key_path = write_pair(directory, ca.issue(["upstream.wire.test"], key), key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key_path))
        self.script = script
        self.received: list[bytearray] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        seen = bytearray()
        self.received.append(seen)

        class Recording:
            async def readuntil(self, separator=b"\n"):
                data = await reader.readuntil(separator)
                seen.extend(data)
                return data

            async def readexactly(self, count):
                data = await reader.readexactly(count)
                seen.extend(data)
                return data

            async def read(self, count=-1):
                data = await reader.read(count)
                seen.extend(data)
                return data

        try:
            await self.script(Recording(), writer)
            while data := await reader.read(65536):  # record the rest until the bridge closes the leg
                seen.extend(data)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    @property
    def everything(self) -> bytes:
        return b"".join(bytes(seen) for seen in self.received)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Bridge:
    def __init__(self, config: BridgeConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = asyncio.run_coroutine_threadsafe(start_bridge(config), self.loop).result(60)
        self.port = self.running.https_port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.close(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Client:
    def __init__(self, port: int, ca, timeout: float = 5.0) -> None:
        context = ssl.create_default_context(cadata=cert_pem(ca.cert).decode())
        context.check_hostname = False
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout))
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        self.buffer += data

    def read_head(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self.receive()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        return int(head.split(b" ", 2)[1]), head

    def read_body(self, length: int) -> bytes:
        while len(self.buffer) < length:
            self.receive()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return body

    def read_until_close(self, wait: float = 3.0) -> bytes:
        self.sock.settimeout(wait)
        try:
            while True:
                self.receive()
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        data, self.buffer = self.buffer, b""
        return data


@pytest.fixture
def wire(ca, tmp_path):
    """start(script, **config overrides) -> (upstream, client)."""
    started: list = []

    def start(script, **overrides):
        upstream = Upstream(script, tmp_path, ca)
        cert_dir = tmp_path / "front-cert"
        cert_dir.mkdir(exist_ok=True)
        key = new_private_key("ecdsa-p256")
        cert, key_path = write_pair(cert_dir, ca.issue([FQDN], key), key)
        config = BridgeConfig(
            fqdn=FQDN,
            legacy=[LegacyServer("127.0.0.1", upstream.port)],
            bind="127.0.0.1",
            https_port=0,
            http_port=0,
            cert=cert,
            key=key_path,
            state_dir=tmp_path / "state",
            status_bind="off",
        )
        bridge = Bridge(replace(config, **overrides))
        started.append((upstream, bridge))
        return upstream, Client(bridge.port, ca)

    yield start
    for upstream, bridge in started:
        try:
            bridge.close()
        finally:
            upstream.close()


async def answer_each(reader, writer, answer: bytes) -> None:
    while True:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()


def wait_for(condition, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ---- 1. chunk sizes: strict on both legs ---------------------------------------------------------


@pytest.mark.parametrize("size", [b"-1", b"0x5", b"+5", b"1_0", b"5 ", b"5;\x00"])
def test_malformed_upstream_chunk_size_is_not_relayed(wire, caplog, size):
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nhello\r\n0\r\n\r\n"
    _, client = wire(lambda r, w: answer_each(r, w, answer))
    caplog.set_level(logging.INFO)
    client.send(b"GET /owa/ HTTP/1.1\r\n" + HOST + b"\r\n")
    data = client.read_until_close()
    head, _, body = data.partition(b"\r\n\r\n")
    # The first chunk line is read before the head goes out: a 502, and never the body.
    assert head.startswith(b"HTTP/1.1 502") and b"hello" not in body
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("bridge")]
    assert len(errors) == 1 and "chunk" in errors[0].getMessage()


@pytest.mark.parametrize("size", [b"5;\x00", b"5 ", b"-5", b"0x5"])
def test_malformed_client_chunk_size_is_a_400_and_never_reaches_the_upstream(wire, size):
    async def wait_for_body(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # the body, until the bridge closes the leg

    upstream, client = wire(wait_for_body)
    client.send(b"POST /EWS/Exchange.asmx HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\nhello\r\n0\r\n\r\n")
    status, _ = client.read_head()
    assert status == 400
    client.read_until_close(1.0)
    assert wait_for(lambda: upstream.received and b"\r\n\r\n" in upstream.everything)
    time.sleep(0.2)
    assert b"hello" not in upstream.everything


# ---- 2. response framing and interim answers ---------------------------------------------------


def test_response_chunked_only_as_the_final_coding_else_a_502(wire):
    """chunked, gzip: the body runs to the close in gzip transfer coding, which the bridge does not
    relay (no client asked for it: TE is hop-by-hop): a 502, never the bytes as if chunked."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n"

    async def once(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    _, client = wire(once)
    client.send(b"GET /owa/ HTTP/1.1\r\n" + HOST + b"\r\n")
    status, head = client.read_head()
    assert status == 502
    assert b"hello" not in client.read_until_close(1.0)


def test_gzip_then_chunked_is_chunked(wire):
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    _, client = wire(lambda r, w: answer_each(r, w, answer))
    client.send(b"GET /owa/ HTTP/1.1\r\n" + HOST + b"\r\n")
    status, head = client.read_head()
    assert status == 502  # a transfer coding the client did not ask for: not relayed either
    client.read_until_close(1.0)


def test_interim_answers_carry_only_safe_lines(wire):
    answer = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </owa/a.css>; rel=preload\r\nSet-Cookie: sid=1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\nX-Secret: 1\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    _, client = wire(lambda r, w: answer_each(r, w, answer))
    client.send(b"GET /owa/ HTTP/1.1\r\n" + HOST + b"\r\n")
    status, head = client.read_head()
    assert status == 103
    assert head == b"HTTP/1.1 103 Early Hints\r\nLink: </owa/a.css>; rel=preload"
    status, head = client.read_head()
    assert status == 102 and head == b"HTTP/1.1 102 Processing"
    status, head = client.read_head()
    assert status == 200 and client.read_body(2) == b"ok"


# ---- 3. HTTP/1.0 without Host -------------------------------------------------------------------


def _upstream_heads(upstream) -> list[bytes]:
    return [part for part in upstream.everything.split(b"\r\n\r\n") if part]


@pytest.mark.parametrize("legacy_host_header", [None, "mail.contoso.local"])
def test_http10_request_without_host_gets_the_bridges_host_upstream(wire, legacy_host_header):
    upstream, client = wire(lambda r, w: answer_each(r, w, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), legacy_host_header=legacy_host_header)
    client.send(b"GET /owa/ HTTP/1.0\r\nUser-Agent: old\r\n\r\n")
    status, _ = client.read_head()
    assert status == 200
    head = _upstream_heads(upstream)[0]
    assert head.startswith(b"GET /owa/ HTTP/1.1\r\n")
    expected = legacy_host_header or f"{FQDN}:{client.sock.getpeername()[1]}"
    assert head.count(b"\r\nHost: ") == 1 and f"\r\nHost: {expected}\r\n".encode() in head + b"\r\n"


# ---- 4. raw bytes >= 0x80 in the target ----------------------------------------------------------


@pytest.mark.parametrize("target", [b"/owa/\xef\xbc\x8e\xef\xbc\x8e/certsrv/", b"/owa/\xff\xfe/", b"/owa/caf\xc3\xa9"])
def test_raw_non_ascii_target_is_a_400_and_never_reaches_the_upstream(wire, target):
    upstream, client = wire(lambda r, w: answer_each(r, w, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    client.send(b"GET " + target + b" HTTP/1.1\r\n" + HOST + b"\r\n")
    status, _ = client.read_head()
    assert status == 400
    time.sleep(0.2)
    assert b"GET" not in upstream.everything


# ---- 5. Connection: expect ----------------------------------------------------------------------


def test_expect_named_in_connection_does_not_wait_for_an_origin_continue(wire):
    async def read_body_then_answer(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"expect" not in head.lower()
        await reader.readexactly(5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    upstream, client = wire(read_body_then_answer)
    client.send(b"POST /EWS/Exchange.asmx HTTP/1.1\r\n" + HOST + b"Connection: expect\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    status, _ = client.read_head()  # the expectation was addressed to the bridge: it answers it
    assert status == 100
    client.send(b"hello")
    status, _ = client.read_head()
    assert status == 200 and client.read_body(2) == b"ok"
    assert upstream.everything.endswith(b"\r\n\r\nhello")


# ---- 6. segments Windows trims to dot-segments --------------------------------------------------


@pytest.mark.parametrize("target", [b"/owa/..%20/certsrv/", b"/owa/..%09/certsrv/", b"/owa/.%20./certsrv/", b"/owa/...%20%20/x", b"/owa/..%2e/x"])
def test_segments_windows_trims_to_dot_segments_are_refused(wire, target):
    upstream, client = wire(lambda r, w: answer_each(r, w, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    client.send(b"GET " + target + b" HTTP/1.1\r\n" + HOST + b"\r\n")
    status, _ = client.read_head()
    assert status == 400
    time.sleep(0.2)
    assert b"GET" not in upstream.everything


# ---- 7. the legacy server ends an RPC channel ---------------------------------------------------


def test_malformed_upstream_chunking_after_the_head_ends_the_connection(wire, caplog):
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"

    async def slow(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"-1\r\nworld\r\n0\r\n\r\n")
        await writer.drain()

    _, client = wire(slow)
    caplog.set_level(logging.INFO)
    client.send(b"GET /owa/ HTTP/1.1\r\n" + HOST + b"\r\n")
    status, _ = client.read_head()
    assert status == 200
    assert client.read_until_close() == b"5\r\nhello\r\n"  # no last chunk: the client sees the cut
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("bridge")]
    assert len(errors) == 1 and "chunk" in errors[0].getMessage() and "502" not in errors[0].getMessage()


def test_rpc_out_data_channel_end_is_logged_as_such_not_as_a_502(wire, caplog):
    async def channel(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 Success\r\nContent-Type: application/rpc\r\nContent-Length: 1073741824\r\n\r\n" + b"P" * 100)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()  # the session is over (its IN channel ended)

    caplog.set_level(logging.INFO)
    _, client = wire(channel)
    client.send(b"RPC_OUT_DATA /rpc/rpcproxy.dll?exch.lab.local:6001 HTTP/1.1\r\n" + HOST + b"Content-Length: 76\r\n\r\n" + b"R" * 76)
    status, _ = client.read_head()
    assert status == 200
    assert client.read_until_close() == b"P" * 100  # everything relayed, then the connection ends
    assert wait_for(lambda: any("channel" in r.getMessage() for r in caplog.records if r.name == "bridge.proxy"))
    proxy_records = [r for r in caplog.records if r.name == "bridge.proxy"]
    assert not [r for r in proxy_records if r.levelno >= logging.WARNING], [r.getMessage() for r in proxy_records]
    assert not any("502" in r.getMessage() for r in proxy_records)
