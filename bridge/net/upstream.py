"""The legacy leg: TLS 1.0-1.2 connections to the Exchange 2007 servers and HTTP/1.1 framing on them.

A small HTTP/1.1 client of our own rather than aiohttp's: the bridge must send exactly the headers the
client sent (aiohttp's client adds Accept, Accept-Encoding and Content-Type), relay the origin's
``100 Continue`` instead of inventing one, keep ``Content-Length`` framing as is, and keep each
connection private to one client connection (NTLM authenticates the TCP connection).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from bridge.config import LegacyServer, is_ip_address
from bridge.net.channel import Channel, ChannelClosed
from bridge.net.tls import describe_ssl_error, fingerprint, pin_flag
from bridge.protocol.http1 import (
    Body,
    ChunkedDecoder,
    ChunkedError,
    Framing,
    ResponseHead,
    ResponseRefused,
    parse_response_head,
    response_head_length,
)
from bridge.protocol.http1 import response_has_body as response_has_body  # bridge.preflight.probe takes it from here

log = logging.getLogger("bridge.upstream")

READ_SIZE = 256 * 1024
DOWN_BACKOFF = 5.0  # seconds a server that refused a connection is skipped while others are up


class UpstreamError(Exception):
    """The legacy server could not be used; str() is one sentence for the log and the 502 body."""


class UpstreamProtocolError(UpstreamError):
    """The legacy server sent something that is not HTTP/1.x."""


class UpstreamClosedEarly(UpstreamError):
    """The legacy server closed the connection before the end of a Content-Length body (for the RPC
    channels, whose Content-Length is a placeholder, that is how a session ends)."""

    def __init__(self, message: str, remaining: int) -> None:
        super().__init__(message)
        self.remaining = remaining


@dataclass
class ServerHealth:
    server: LegacyServer
    down_until: float = 0.0
    last_error: str = ""
    warned_unpinned: bool = False
    suite_explanation: str | None = None


def connect_error(exc: OSError, what: str, server: LegacyServer, timeout: float, setting: str) -> UpstreamError:
    """The one-sentence UpstreamError for a connection to ``server`` (the ``what``) that failed."""
    if isinstance(exc, TimeoutError):
        return UpstreamError(f"the {what} {server} did not complete a connection within {timeout:g} s")
    if isinstance(exc, socket.gaierror):
        return UpstreamError(f"the {what} name {server.host} does not resolve; check {setting} and this machine's DNS")
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamError(f"the {what} {server} refused the connection (nothing listens on port {server.port})")
    return UpstreamError(f"the {what} {server} could not be reached ({exc.strerror or exc})")


class UpstreamConnection:
    """One TLS connection to a legacy server, owned by exactly one client connection."""

    __slots__ = ("server", "name", "channel", "reusable")

    def __init__(self, server: LegacyServer, channel: Channel) -> None:
        self.server = server
        self.name = str(server)
        self.channel = channel
        self.reusable = True

    @property
    def usable(self) -> bool:
        channel = self.channel
        return self.reusable and not channel.closing and not channel.eof

    def close(self) -> None:
        self.reusable = False
        self.channel.close()

    def get_extra_info(self, name: str) -> Any:
        transport = self.channel.transport
        return transport.get_extra_info(name) if transport is not None else None

    def write(self, data: bytes) -> None:
        try:
            self.channel.write(data)
        except ChannelClosed:
            raise UpstreamError(f"the legacy server {self.server} closed the connection") from None

    async def drain(self) -> None:
        try:
            await self.channel.drain()
        except ChannelClosed:
            raise UpstreamError(f"the legacy server {self.server} closed the connection") from None

    async def read_head(self) -> ResponseHead:
        channel = self.channel
        searched = 0
        while True:
            data = channel.peek_all()
            try:
                length = response_head_length(data, searched)
                if length:
                    channel.consume(length)
                    return parse_response_head(data if length == len(data) else data[:length])
            except ResponseRefused as exc:
                self.reusable = False
                raise UpstreamProtocolError(f"the legacy server {self.server} {exc}") from None
            if channel.eof:
                self.reusable = False
                if data:
                    raise UpstreamProtocolError(f"the legacy server {self.server} closed the connection in the middle of a response header")
                raise UpstreamError(f"the legacy server {self.server} closed the connection without answering")
            searched = max(0, len(data) - 3)
            await channel.wait_for_data()

    async def read_small_body(self, length: int) -> bytes:
        """A whole body of ``length`` bytes (a small one: it is held in memory)."""
        channel = self.channel
        while channel.buffered < length:
            if channel.eof:
                self.reusable = False
                raise UpstreamClosedEarly(
                    f"the legacy server {self.server} closed the connection {length - channel.buffered} bytes before the end of the response",
                    length - channel.buffered,
                )
            await channel.wait_for_data()
        data = channel.peek_all()
        channel.consume(length)
        return data[:length] if len(data) > length else data

    async def body(self, framing: Framing) -> AsyncIterator[bytes]:
        """Yield the response body as it arrives, honouring its ``framing`` (response_body_framing())."""
        kind = framing.kind
        if kind is Body.NONE:
            return
        if kind is Body.CHUNKED:
            async for chunk in self._chunked_body():
                yield chunk
            return
        read_some = self.channel.read_some
        if kind is Body.LENGTH:
            remaining = framing.length
            while remaining:
                data = await read_some(min(remaining, READ_SIZE))
                if not data:
                    self.reusable = False
                    raise UpstreamClosedEarly(f"the legacy server {self.server} closed the connection {remaining} bytes before the end of the response", remaining)
                remaining -= len(data)
                yield data
            return
        self.reusable = False  # body delimited by the connection's end
        while data := await read_some(READ_SIZE):
            yield data

    async def _chunked_body(self) -> AsyncIterator[bytes]:
        """The decoded pieces of a chunked body (ChunkedDecoder: strict, bounded); what follows the
        body in the buffer is put back for the next response."""
        channel = self.channel
        decoder = ChunkedDecoder()
        feed = decoder.feed
        while not decoder.done:
            data = await channel.read_some(READ_SIZE)
            if not data:
                self.reusable = False
                raise UpstreamError(f"the legacy server {self.server} broke off a chunked response")
            try:
                pieces = feed(data)
            except ChunkedError as exc:
                self.reusable = False
                raise UpstreamProtocolError(f"the legacy server {self.server} sent a malformed chunked body: {exc}") from None
            for piece in pieces:
                yield piece
        if decoder.leftover:
            channel.unread(decoder.leftover)


@dataclass
class LegacyPool:
    """The legacy servers: round robin among healthy ones, failover on connect failure."""

    servers: list[LegacyServer]
    tls_context: ssl.SSLContext
    connect_timeout: float
    pinned_fingerprint: str | None = None
    verified_by_ca: bool = False
    health: dict[LegacyServer, ServerHealth] = field(default_factory=dict)
    # Names the legacy servers call themselves (certificate CN/SANs): OWA writes them into redirects.
    certificate_names: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.health = {server: ServerHealth(server) for server in self.servers}
        self._turn = itertools.cycle(range(len(self.servers)))

    def _order(self) -> list[LegacyServer]:
        start = next(self._turn)
        ordered = self.servers[start:] + self.servers[:start]
        now = time.monotonic()
        healthy = [s for s in ordered if self.health[s].down_until <= now]
        resting = [s for s in ordered if self.health[s].down_until > now]
        # Resting servers are still tried last, so recovery is immediate when every server was down.
        return healthy + resting

    async def connect(self) -> UpstreamConnection:
        errors: list[str] = []
        for server in self._order():
            try:
                connection = await self._open(server)
            except UpstreamError as exc:
                state = self.health[server]
                state.down_until = time.monotonic() + DOWN_BACKOFF
                state.last_error = str(exc)
                log.warning("legacy %s unusable: %s", server, exc)
                errors.append(str(exc))
                continue
            self.health[server].down_until = 0.0
            self.health[server].last_error = ""
            return connection
        if len(errors) == 1:
            raise UpstreamError(errors[0])
        raise UpstreamError("no legacy server could be reached: " + "; ".join(errors))

    async def _open(self, server: LegacyServer) -> UpstreamConnection:
        try:
            transport, channel = await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(
                    Channel,
                    server.host,
                    server.port,
                    ssl=self.tls_context,
                    server_hostname=server.host,
                    ssl_handshake_timeout=self.connect_timeout,
                ),
                timeout=self.connect_timeout,
            )
        except ssl.SSLError as exc:
            explanation = await self._explain_handshake_failure(server, exc)
            raise UpstreamError(f"the legacy server {server} refused TLS: {explanation}") from None
        except OSError as exc:  # TimeoutError included
            raise connect_error(exc, "legacy server", server, self.connect_timeout, "--legacy") from None
        connection = UpstreamConnection(server, channel)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._check_identity(server, connection)
        return connection

    def verify(self, server: LegacyServer, connection: UpstreamConnection) -> None:
        """Check a connection upgraded to TLS elsewhere (a mail STARTTLS) as connect() checks its own:
        the pinned fingerprint or the CA; UpstreamError (and the connection closed) when it fails."""
        self._check_identity(server, connection)

    def _check_identity(self, server: LegacyServer, connection: UpstreamConnection) -> None:
        ssl_object = connection.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        observed = fingerprint(der) if der else ""
        if der:
            self.certificate_names.update(certificate_dns_names(der))
        if self.pinned_fingerprint:
            if observed != self.pinned_fingerprint:
                connection.close()
                raise UpstreamError(
                    f"the legacy server {server} presented a certificate with fingerprint sha256:{observed} instead of the pinned one; "
                    f"if the certificate was renewed on purpose, pin the new one with {pin_flag(observed)}"
                )
            return
        state = self.health[server]
        if not self.verified_by_ca and not state.warned_unpinned:
            state.warned_unpinned = True
            log.warning(
                "legacy %s is not verified: its certificate has fingerprint sha256:%s; pin it with %s",
                server,
                observed,
                pin_flag(observed),
            )

    async def _explain_handshake_failure(self, server: LegacyServer, exc: ssl.SSLError) -> str:
        state = self.health[server]
        reason = describe_ssl_error(exc)
        if "share no cipher" not in reason:
            return reason
        if state.suite_explanation is None:
            offered = await probe_obsolete_suites(server.host, server.port, self.connect_timeout)
            state.suite_explanation = (
                f"it offers only {', '.join(offered)}, which this machine's OpenSSL no longer has; enable AES suites on the legacy server (Windows 2003: KB948963)" if offered else ""
            )
        return state.suite_explanation or reason

    async def check_all(self) -> dict[LegacyServer, str]:
        """Connect to each server once (at startup) and report what was found."""
        results: dict[LegacyServer, str] = {}

        async def check(server: LegacyServer) -> None:
            try:
                connection = await self._open(server)
            except UpstreamError as exc:
                results[server] = str(exc)
                self.health[server].last_error = str(exc)
                return
            ssl_object = connection.get_extra_info("ssl_object")
            results[server] = f"ok ({ssl_object.version()}, {ssl_object.cipher()[0]})"
            connection.close()

        await asyncio.gather(*(check(server) for server in self.servers))
        return results


# Suites a Windows 2003 server without KB948963 offers and Debian's OpenSSL 3 lacks.
OBSOLETE_SUITES = {0x0005: "RC4-SHA", 0x0004: "RC4-MD5", 0x000A: "DES-CBC3-SHA", 0x0009: "DES-CBC-SHA", 0x0003: "EXP-RC4-MD5"}


def certificate_dns_names(der: bytes) -> set[str]:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return set()
    names = {a.value.lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str)}
    try:
        names.update(n.lower() for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return {n for n in names if n and "*" not in n}


async def probe_obsolete_suites(host: str, port: int, timeout: float) -> list[str]:
    """Offer each obsolete suite in a hand-built TLS 1.0 ClientHello; return those the server picks."""
    accepted: list[str] = []
    remaining = dict(OBSOLETE_SUITES)
    while remaining:
        chosen = await _server_choice(host, port, list(remaining), timeout)
        if chosen is None or chosen not in remaining:
            break
        accepted.append(remaining.pop(chosen))
    return accepted


async def _server_choice(host: str, port: int, suites: list[int], timeout: float) -> int | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (TimeoutError, OSError):
        return None
    try:
        writer.write(_client_hello(host, suites))
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(5), timeout)
        if header[0] != 0x16:  # not a handshake record: an alert
            return None
        body = await asyncio.wait_for(reader.readexactly(struct.unpack("!H", header[3:5])[0]), timeout)
        if body[0] != 0x02:  # not a ServerHello
            return None
        session_id_length = body[38]
        return struct.unpack("!H", body[39 + session_id_length : 41 + session_id_length])[0]
    except (TimeoutError, OSError, asyncio.IncompleteReadError, IndexError, struct.error):
        return None
    finally:
        writer.close()


def _client_hello(host: str, suites: list[int]) -> bytes:
    import os

    name = host.encode("idna") if not is_ip_address(host) else b""
    extensions = b""
    if name:
        server_name = struct.pack("!BH", 0, len(name)) + name
        server_name_list = struct.pack("!H", len(server_name)) + server_name
        extensions += struct.pack("!HH", 0x0000, len(server_name_list)) + server_name_list
    extensions += struct.pack("!HHB", 0xFF01, 1, 0)  # renegotiation_info, empty
    cipher_bytes = b"".join(struct.pack("!H", s) for s in suites)
    body = b"\x03\x01" + os.urandom(32) + b"\x00" + struct.pack("!H", len(cipher_bytes)) + cipher_bytes + b"\x01\x00" + struct.pack("!H", len(extensions)) + extensions
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake
