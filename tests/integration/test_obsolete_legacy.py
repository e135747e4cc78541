"""A legacy server that offers only RC4 (a Windows 2003 without KB948963): OpenSSL 3 has no suite in
common with it, and the bridge must say exactly that at start-up and in the 502 log line. The server
(support/legacy_tls.py, the ``rc4_server`` fixture) speaks the TLS record layer as such a Windows does
on the wire.
"""

from __future__ import annotations

import asyncio
import logging

from support.bridges import BackgroundBridge, bridge_config, bridge_session
from support.legacy_tls import AES128_SHA, no_rfc5746_server

from bridge.certs.keys import LocalCA
from bridge.net.upstream import probe_obsolete_suites


async def test_probe_names_the_suites_the_server_picks(rc4_server):
    assert await probe_obsolete_suites("127.0.0.1", rc4_server.port, 5) == ["RC4-SHA", "RC4-MD5"]


def test_bridge_explains_an_rc4_only_legacy_server(rc4_server, tmp_path, caplog):
    ca = LocalCA.create()
    with caplog.at_level(logging.WARNING, logger="bridge"), BackgroundBridge(bridge_config(rc4_server.port, tmp_path, ca)) as running:
        startup = caplog.text
        response = bridge_session(ca).get(f"{running.url}/EWS/Exchange.asmx", timeout=30)
    assert "offers only RC4-SHA, RC4-MD5, which this machine's OpenSSL no longer has" in startup
    assert response.status_code == 502
    assert "RC4-SHA" in response.text
    assert "502 for GET /EWS/Exchange.asmx" in caplog.text and "KB948963" in caplog.text


def test_probe_hello_is_well_formed_for_a_strict_openssl_server(lab):
    """OpenSSL (the lab) rejects a malformed ClientHello: the hand-built one must pass and get AES128-SHA."""
    from bridge.net.upstream import _server_choice

    chosen = asyncio.run(_server_choice("127.0.0.1", lab.port, [AES128_SHA], 5))
    assert chosen == AES128_SHA


# ---- a server without RFC 5746 (an unpatched Windows 2003/2008 before MS10-049) ----------------------


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
