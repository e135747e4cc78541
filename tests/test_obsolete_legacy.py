"""A legacy server that offers only RC4 (a Windows 2003 without KB948963): OpenSSL 3 has no suite in
common with it, and the bridge must say exactly that at start-up and in the 502 log line.

The server below speaks the TLS record layer as such a Windows does on the wire: to a ClientHello
offering RC4 it answers with a ServerHello choosing RC4; to any other it answers handshake_failure.
"""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from bridge.certs.keys import LocalCA
from bridge.net.upstream import probe_obsolete_suites
from bridge_clients import BackgroundBridge, bridge_config, bridge_session

RC4_SUITES = (0x0005, 0x0004)
HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x01\x00\x02\x02\x28"


def offered_suites(client_hello: bytes) -> list[int]:
    body = client_hello[4:]  # handshake type + 24-bit length
    session_id_length = body[34]
    offset = 35 + session_id_length
    length = struct.unpack("!H", body[offset : offset + 2])[0]
    raw = body[offset + 2 : offset + 2 + length]
    return [struct.unpack("!H", raw[i : i + 2])[0] for i in range(0, len(raw), 2)]


def server_hello(suite: int) -> bytes:
    body = b"\x03\x01" + b"\x11" * 32 + b"\x00" + struct.pack("!H", suite) + b"\x00"
    handshake = b"\x02" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


async def rc4_only_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        header = await reader.readexactly(5)
        record = await reader.readexactly(struct.unpack("!H", header[3:5])[0])
        chosen = next((s for s in offered_suites(record) if s in RC4_SUITES), None)
        writer.write(server_hello(chosen) if chosen else HANDSHAKE_FAILURE_ALERT)
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def rc4_server():
    server = await asyncio.start_server(rc4_only_server, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_probe_names_the_suites_the_server_picks(rc4_server):
    assert await probe_obsolete_suites("127.0.0.1", rc4_server, 5) == ["RC4-SHA", "RC4-MD5"]


def test_bridge_explains_an_rc4_only_legacy_server(tmp_path, caplog):
    import threading

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(rc4_only_server, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = server.sockets[0].getsockname()[1]
    ca = LocalCA.create()
    try:
        with caplog.at_level(logging.WARNING, logger="bridge"):
            with BackgroundBridge(bridge_config(port, tmp_path, ca)) as running:
                startup = caplog.text
                response = bridge_session(ca).get(f"{running.url}/EWS/Exchange.asmx", timeout=30)
        assert "offers only RC4-SHA, RC4-MD5, which this machine's OpenSSL no longer has" in startup
        assert response.status_code == 502
        assert "RC4-SHA" in response.text
        assert "502 for GET /EWS/Exchange.asmx" in caplog.text and "KB948963" in caplog.text
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_probe_hello_is_well_formed_for_a_strict_openssl_server(tmp_path):
    """OpenSSL (the lab) rejects a malformed ClientHello: the hand-built one must pass and get AES128-SHA."""
    from bridge.lab.server import LabOptions
    from bridge.net.upstream import _server_choice
    from lab_clients import BackgroundLab

    with BackgroundLab(LabOptions(host="127.0.0.1", port=0, state_dir=tmp_path)) as lab:
        chosen = asyncio.run(_server_choice("127.0.0.1", lab.port, [0x002F], 5))
    assert chosen == 0x002F


# ---- a server without RFC 5746 (an unpatched Windows 2003/2008 before MS10-049) ----------------------


async def no_rfc5746_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers any ClientHello with a TLS 1.0 ServerHello choosing AES128-SHA and no extensions at all."""
    try:
        header = await reader.readexactly(5)
        await reader.readexactly(struct.unpack("!H", header[3:5])[0])
        writer.write(server_hello(0x002F))
        await writer.drain()
        await asyncio.sleep(0.2)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def handshake_failure(port: int, context) -> str:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="exch2007.lab.test")
    except Exception as exc:  # noqa: BLE001 - the reason is what the test looks at
        return f"{type(exc).__name__}: {exc}"
    writer.close()
    return "no failure"


async def test_bridge_accepts_a_server_without_secure_renegotiation():
    """OP_LEGACY_SERVER_CONNECT: without it OpenSSL 3 stops at the ServerHello; with it the handshake goes on."""
    import ssl

    from bridge.net.tls import legacy_context

    server = await asyncio.start_server(no_rfc5746_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        strict = legacy_context()
        strict.options &= ~getattr(ssl, "OP_LEGACY_SERVER_CONNECT", 0x4)  # Python 3.12 names it
        assert "UNSAFE_LEGACY_RENEGOTIATION" in (await handshake_failure(port, strict)).upper()
        bridge_side = await handshake_failure(port, legacy_context())
        assert "UNSAFE_LEGACY_RENEGOTIATION" not in bridge_side.upper()  # it got past the ServerHello
    finally:
        server.close()

