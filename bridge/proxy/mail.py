"""The mail listener shell: IMAPS, POP3S and SMTP submission (465 and 587), beside HTTPS.

Every accepted connection first meets bridge.net.gate's ``Gate``, as on the HTTPS port: a source
outside ``--allow`` or banned is closed before TLS, past ``--max-connections`` (one total with HTTPS)
the client gets the protocol's goodbye (``* BYE``, ``-ERR``, ``421``) instead of a session. TLS is the
loop's own with the bridge's certificate context (the one ACME renews and SIGHUP reloads): from the
first byte (993, 995, 465), or on port 587 after the client's STARTTLS, which the protocol module
answers itself (a ``Step`` with ``start_tls``: the session runs the handshake right after the go-ahead,
then tells the watcher). Each protocol is a ``MailDialect`` (bridge.protocol.imap, .pop3, .smtp;
POP3's and SMTP's observers through bridge.protocol.observer's adapter). Then one ``MailSession``:

1. one upstream connection of its own to the protocol's server: ``implicit`` TLS, ``starttls`` (the
   protocol module's ``UpstreamStartTls`` runs first, then TLS, then the server's greeting goes to the
   client) or ``plain``; TLS 1.0 allowed, the certificate pinned or checked against a CA exactly as
   for HTTPS (bridge.net.upstream.LegacyPool);
2. until the logon, the protocol's sans-IO ``LogonWatcher`` reads both directions (bridge.protocol.imap
   for IMAP) and says what to forward, what to answer itself and how each logon attempt ended; a failed
   one counts in the ban list like an HTTP 401 (``record_failure(address, protocol)``) and a source
   banned by it is sent away at once;
3. once the watcher steps aside (a successful logon) bytes are relayed both ways as they come, with
   back-pressure (``Channel``: reading pauses above 256 KiB buffered, writing waits while the peer's
   buffer is full);
4. ``--idle-timeout`` (read live, so SIGHUP applies) ends a session when no byte has moved either way
   for that long; at the end one access-log line (``bridge.access``): client address, protocol, user
   when known, result, bytes each way, duration, upstream. Never a password or a SASL blob: the
   watcher keeps only user names.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.config import LegacyServer
from bridge.net.channel import Channel, ChannelClosed, ConnectionState
from bridge.net.gate import ConnectionGuard, Gate, peer_address
from bridge.net.tls import describe_ssl_error
from bridge.net.upstream import LegacyPool, UpstreamConnection, UpstreamError, connect_error
from bridge.protocol.mail import Logon, LogonWatcher, MailDialect, Step

log = logging.getLogger("bridge.mail")
access_log = logging.getLogger("bridge.access")

READ_SIZE = 256 * 1024
IDLE_CHECKS = 4  # activity checks per --idle-timeout (at most every 15 s)


@dataclass
class MailService:
    """One mail protocol's listener: the dialect and where its sessions go."""

    dialect: MailDialect
    server: LegacyServer
    tls_mode: str  # implicit, starttls, plain
    tls_context: ssl.SSLContext  # the legacy client context (bridge.net.tls.legacy_context)
    pinned_fingerprint: str | None = None
    verified_by_ca: bool = False
    front: str = "implicit"  # the client's side: implicit (TLS from the first byte) or starttls (the bridge answers STARTTLS)


class MailStats:
    """Per-protocol counters (the status page and /metrics read them; bridge.ops.status.mail_snapshot)."""

    def __init__(self) -> None:
        self.sessions: Counter[tuple[str, str]] = Counter()  # (protocol, result) of finished sessions
        self.logons: Counter[tuple[str, str]] = Counter()  # (protocol, ok | failed)
        self.bytes_in_done: Counter[str] = Counter()
        self.bytes_out_done: Counter[str] = Counter()
        self.active: set[MailSession] = set()

    def open_sessions(self) -> Counter[str]:
        return Counter(session.protocol for session in self.active)

    def bytes_in(self) -> Counter[str]:
        total = Counter(self.bytes_in_done)
        for session in self.active:
            total[session.protocol] += session.client.received
        return total

    def bytes_out(self) -> Counter[str]:
        total = Counter(self.bytes_out_done)
        for session in self.active:
            total[session.protocol] += session.client.sent
        return total


# --------------------------------------------------------------------------- the listener


class MailListener:
    """One mail protocol's listener(s) and its open sessions."""

    def __init__(
        self, service: MailService, guard: ConnectionGuard, ssl_context: Any, config: Any, *, bans: Any = None, stats: MailStats | None = None, closed_message: Callable[[], str | None] | None = None
    ) -> None:
        self.service = service
        self.guard = guard
        self.ssl_context = ssl_context
        self.config = config  # BridgeConfig: idle_timeout and connect_timeout are read live (SIGHUP)
        self.bans = bans  # bridge.ops.bans.BanGuard (or a worker's view of it)
        self.stats = stats or MailStats()
        self.closed_message = closed_message or (lambda: None)
        self.connections: set[MailConnection] = set()
        self.listeners: list[asyncio.Server] = []
        self.pool = LegacyPool([service.server], service.tls_context, config.connect_timeout, service.pinned_fingerprint, service.verified_by_ca)

    @property
    def protocol(self) -> str:
        return self.service.dialect.name

    def is_banned(self, peer: str) -> bool:
        return self.bans is not None and self.bans.is_banned(peer)

    def busy(self, guard: ConnectionGuard, on_close: Callable[[], None]) -> asyncio.Protocol:
        return Goodbye(self.service.dialect.bye("The bridge has too many open connections; try again shortly."), guard, on_close)

    def new_connection(self) -> MailConnection:
        return MailConnection(self)

    async def listen(self, host: str | None, port: int, *, backlog: int = 1024) -> None:
        """Raises OSError when the port cannot be bound."""
        loop = asyncio.get_running_loop()
        implicit = self.service.front == "implicit"
        plain = self.service.dialect.bye(f"This port speaks TLS from the first byte; connect with TLS ({self.protocol.upper()}S).")
        context = self.ssl_context if implicit else None  # STARTTLS: the session upgrades the connection itself

        def gate() -> Gate:
            return Gate(self.guard, self.new_connection, context, banned=self.is_banned, busy_factory=self.busy, plain_answer=plain)

        self.listeners.append(await loop.create_server(gate, host, port, backlog=backlog, reuse_address=True))

    @property
    def port(self) -> int:
        for listener in self.listeners:
            if listener.sockets:
                return listener.sockets[0].getsockname()[1]
        raise RuntimeError("the mail listener has no listening socket")

    async def finish_requests(self, timeout: float) -> int:
        """The migration window closed: open sessions get ``timeout`` seconds, then are ended; the count ended."""
        tasks = [connection.task for connection in self.connections if connection.task is not None]
        if not tasks:
            return 0
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    async def cleanup(self) -> None:
        """Stop accepting and end every session (mail clients reconnect on their own)."""
        for listener in self.listeners:
            listener.close()
        tasks = [connection.task for connection in self.connections if connection.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for connection in list(self.connections):
            connection.abort()
        for listener in self.listeners:
            await listener.wait_closed()


class Goodbye(asyncio.Protocol):
    """Over --max-connections: the protocol's goodbye line after TLS, then the close."""

    def __init__(self, line: bytes, guard: ConnectionGuard, on_close: Callable[[], None]) -> None:
        self.line = line
        self.guard = guard
        self.on_close = on_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.guard.reject("max-connections")
        log.warning("mail session from %s refused: --max-connections %d reached", peer_address(transport), self.guard.max_connections)
        transport.write(self.line)  # type: ignore[attr-defined]  # a stream transport
        transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.on_close()


class MailConnection(Channel):
    """The client's side of one mail session (after TLS)."""

    def __init__(self, listener: MailListener) -> None:
        super().__init__()
        self.listener = listener
        self.state = ConnectionState(peer="")  # the Gate releases its --max-connections slot through it
        self.task: asyncio.Task | None = None
        self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.state.peer = peer_address(transport)
        self.listener.connections.add(self)
        self.task = self.loop.create_task(MailSession(self.listener, self).run())

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.listener.connections.discard(self)
        self.state.run_close_callbacks()

    def send(self, data: bytes) -> None:
        if data:
            self.write(data)
            self.sent += len(data)


# --------------------------------------------------------------------------- one session


class SessionEnd(Exception):
    """The session ends here: ``result`` for the access log."""

    def __init__(self, result: str) -> None:
        super().__init__(result)
        self.result = result


class MailSession:
    def __init__(self, listener: MailListener, client: MailConnection) -> None:
        self.listener = listener
        self.client = client
        self.protocol = listener.protocol
        self.dialect = listener.service.dialect
        self.peer = client.state.peer
        self.upstream: Channel | None = None
        self.user: str | None = None
        self.result = "no-logon"
        self.started = time.monotonic()

    async def run(self) -> None:
        stats = self.listener.stats
        stats.active.add(self)
        try:
            await self.serve()
        except SessionEnd as end:
            self.result = end.result
        except (ChannelClosed, ConnectionError):
            pass
        except asyncio.CancelledError:
            self.result = "ended-by-bridge" if self.result in ("no-logon", "logged-on", "logon-failed") else self.result
        except Exception:
            self.result = "error"
            log.exception("unexpected error in the %s session from %s", self.protocol, self.peer)
        finally:
            if self.upstream is not None:
                self.upstream.close()
            self.client.close()
            stats.active.discard(self)
            stats.sessions[(self.protocol, self.result)] += 1
            stats.bytes_in_done[self.protocol] += self.client.received
            stats.bytes_out_done[self.protocol] += self.client.sent
            self.log_access()

    def log_access(self) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        access_log.info(
            "%s %s user=%s %s in=%d out=%d %.3fs upstream=%s",
            self.peer or "-",
            self.protocol,
            self.user or "-",
            self.result,
            self.client.received,
            self.client.sent,
            time.monotonic() - self.started,
            self.listener.service.server,
        )

    def goodbye(self, sentence: str, result: str) -> SessionEnd:
        try:
            self.client.send(self.dialect.bye(sentence))
        except ChannelClosed:
            pass
        return SessionEnd(result)

    async def serve(self) -> None:
        closed = self.listener.closed_message()
        if closed:
            raise self.goodbye(closed, "window-closed")
        service = self.listener.service
        try:
            upstream, greeting = await self.connect()
        except UpstreamError as exc:
            log.warning("%s session from %s: %s", self.protocol, self.peer, exc)
            raise self.goodbye("The mail server cannot be reached through the bridge; try again later.", "upstream-error") from None
        self.upstream = upstream
        watcher = self.dialect.watcher(upstream_starttls=service.tls_mode == "starttls")
        if greeting:
            self.apply(watcher.from_server(greeting), upstream)  # (a greeting never asks for the client's TLS)
        tasks = [
            asyncio.ensure_future(self.pump_client(watcher, upstream)),
            asyncio.ensure_future(self.pump_server(watcher, upstream)),
            asyncio.ensure_future(self.watch_idle(upstream)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # checked just above

    # ---- both directions
    async def pump_client(self, watcher: LogonWatcher, upstream: Channel) -> None:
        client = self.client
        while True:
            data = await client.read_some(READ_SIZE)
            if not data:
                return
            if watcher.stepped_aside:
                upstream.write(data)
            elif self.apply(watcher.from_client(data), upstream):
                await self.client_tls(watcher)
            await upstream.drain()

    async def pump_server(self, watcher: LogonWatcher, upstream: Channel) -> None:
        client = self.client
        while True:
            data = await upstream.read_some(READ_SIZE)
            if not data:
                return
            if watcher.stepped_aside:
                client.send(data)
            elif self.apply(watcher.from_server(data), upstream):
                await self.client_tls(watcher)
            await client.drain()

    async def client_tls(self, watcher: LogonWatcher) -> None:
        """The bridge has answered the client's STARTTLS: TLS with the bridge's certificate on the same
        connection, right after the go-ahead (nothing else is read or written in between)."""
        client = self.client
        transport = client.transport
        assert transport is not None
        timeout = self.listener.guard.header_timeout
        try:
            tls = await asyncio.get_running_loop().start_tls(transport, client, self.listener.ssl_context, server_side=True, ssl_handshake_timeout=timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            log.info("%s session from %s: no TLS handshake after STARTTLS (%s)", self.protocol, self.peer, describe_ssl_error(exc) if isinstance(exc, ssl.SSLError) else exc or "timed out")
            raise SessionEnd("refused") from None
        if tls is None:
            raise SessionEnd("refused")
        client.transport = tls
        tls.set_write_buffer_limits(high=READ_SIZE)
        watcher.tls_started()

    def apply(self, step: Step, upstream: Channel) -> bool:
        """Carry out one step; True when the client's TLS handshake starts now (its STARTTLS was answered)."""
        banned = False
        for logon in step.logons:  # counted before the client hears the verdict
            banned = self.logon(logon) or banned
        if step.to_server:
            upstream.write(step.to_server)
        if step.to_client:
            self.client.send(step.to_client)
        if step.close:
            log.info("%s session from %s closed by the bridge: %s", self.protocol, self.peer, step.problem)
            raise SessionEnd("refused")
        if banned:
            raise self.goodbye("Too many failed logons from this address; it is banned for a while.", "banned")
        return step.start_tls

    def logon(self, logon: Logon) -> bool:
        """Count one logon attempt; True when it got the source banned."""
        stats = self.listener.stats
        if logon.user:
            self.user = logon.user
        if logon.ok:
            stats.logons[(self.protocol, "ok")] += 1
            self.result = "logged-on"
            return False
        stats.logons[(self.protocol, "failed")] += 1
        if self.result != "logged-on":
            self.result = "logon-failed"
        bans = self.listener.bans
        if bans is None:
            return False
        return bans.record_failure(self.peer, self.protocol) is not None

    async def watch_idle(self, upstream: Channel) -> None:
        loop = asyncio.get_running_loop()
        client = self.client
        moved, since = -1, loop.time()
        while True:
            timeout = self.listener.config.idle_timeout
            await asyncio.sleep(min(timeout / IDLE_CHECKS, 15.0))
            now, count = loop.time(), client.received + client.sent + upstream.received
            if count != moved:
                moved, since = count, now
            elif now - since >= self.listener.config.idle_timeout:
                log.info("%s session from %s idle for %g s (--idle-timeout): closed", self.protocol, self.peer, self.listener.config.idle_timeout)
                raise self.goodbye("The session was idle for too long.", "idle-timeout")

    # ---- the upstream connection
    async def connect(self) -> tuple[Channel, bytes]:
        """The session's upstream connection, and the greeting the client gets first (starttls only)."""
        listener = self.listener
        service = listener.service
        if service.tls_mode == "implicit":
            listener.pool.connect_timeout = listener.config.connect_timeout
            connection = await listener.pool.connect()
            return connection.channel, b""
        server, timeout = service.server, listener.config.connect_timeout
        transport, channel = await open_plain(server, timeout)
        if service.tls_mode == "plain":
            return channel, b""
        try:
            greeting = await self.starttls(channel, server, timeout)
            loop = asyncio.get_running_loop()
            tls = await asyncio.wait_for(loop.start_tls(transport, channel, service.tls_context, server_hostname=server.host, ssl_handshake_timeout=timeout), timeout)
        except TimeoutError:
            channel.abort()
            raise UpstreamError(f"the mail server {server} did not complete STARTTLS within {timeout:g} s") from None
        except ssl.SSLError as exc:
            channel.abort()
            raise UpstreamError(f"the mail server {server} refused TLS after STARTTLS: {describe_ssl_error(exc)}") from None
        except (UpstreamError, OSError):
            channel.abort()
            raise
        if tls is None:
            raise UpstreamError(f"the mail server {server} closed the connection during the TLS handshake after STARTTLS")
        channel.transport = tls  # the TLS transport over the same protocol
        tls.set_write_buffer_limits(high=READ_SIZE)
        listener.pool.verify(server, UpstreamConnection(server, channel))
        return channel, greeting

    async def starttls(self, channel: Channel, server: LegacyServer, timeout: float) -> bytes:
        negotiator = self.dialect.starttls()
        first = negotiator.start()
        if first:
            channel.write(first)
        async with asyncio.timeout(timeout):
            while True:
                data = await channel.read_some(READ_SIZE)
                if not data:
                    raise UpstreamError(f"the mail server {server} closed the connection before STARTTLS")
                step = negotiator.feed(data)
                if step.error:
                    raise UpstreamError(f"the mail server {server}: {step.error}")
                if step.send:
                    channel.write(step.send)
                if step.ready:
                    return step.greeting


async def open_plain(server: LegacyServer, timeout: float) -> tuple[asyncio.Transport, Channel]:
    """A TCP connection to ``server`` (no TLS yet), with the errors as one sentence each."""
    loop = asyncio.get_running_loop()
    try:
        transport, channel = await asyncio.wait_for(loop.create_connection(Channel, server.host, server.port), timeout)
    except OSError as exc:  # TimeoutError included
        raise connect_error(exc, "mail server", server, timeout, "the upstream setting") from None
    return transport, channel


def mail_listeners(config: Any, guard: ConnectionGuard, ssl_context: Any, bans: Any, closed_message: Callable[[], str | None], stats: MailStats) -> list[tuple[str, int, MailListener]]:
    """The configured mail listeners (not yet listening): (port flag, port, listener) each."""
    from bridge.net.tls import legacy_context
    from bridge.protocol.imap import ImapDialect
    from bridge.protocol.pop3 import Pop3Dialect
    from bridge.protocol.smtp import SmtpDialect

    ehlo_name = config.mail_fqdn or config.fqdn or "exchange-bridge"
    dialects: list[tuple[str, str, MailDialect, str]] = [  # (port flag, upstream protocol, dialect, front)
        ("--imaps-port", "imap", ImapDialect(), "implicit"),
        ("--pop3s-port", "pop3", Pop3Dialect(), "implicit"),
        ("--smtps-port", "smtp", SmtpDialect("smtp", front_starttls=False, ehlo_name=ehlo_name), "implicit"),
        ("--submission-port", "smtp", SmtpDialect("submission", front_starttls=True, ehlo_name=ehlo_name), "starttls"),
    ]
    found = []
    for flag, upstream, dialect, front in dialects:
        port = config.mail_ports.get(flag)
        if port is None:
            continue
        tls_mode = getattr(config, f"{upstream}_upstream_tls")
        service = MailService(dialect, config.mail_server(upstream), tls_mode, legacy_context(config.legacy_ca), config.legacy_fingerprint, config.legacy_ca is not None, front=front)
        found.append((flag, port, MailListener(service, guard, ssl_context, config, bans=bans, stats=stats, closed_message=closed_message)))
    return found
