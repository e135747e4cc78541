"""What reaches the proxy at all: the connection gate and request-head hygiene.

The gate sits under TLS. Each accepted TCP connection first meets ``Gate``: a source outside
``--allow`` is closed before a single TLS byte is sent; plain HTTP sent to the HTTPS port gets a
clear-text 400 saying so; bytes that are neither TLS nor HTTP close the connection; past
``--max-connections`` the client gets ``503`` with ``Retry-After``. Only then does TLS start, with
the running loop's own implementation (``loop.start_tls``: uvloop's C ``SSLProtocol`` under
``bridge up``, asyncio's otherwise), in front of the request handler.

With ``--passthrough`` routes (bridge.net.passthrough) the Gate first closes banned sources, then
reads the whole ClientHello without answering it (bounded by size and --header-timeout;
bridge.protocol.clienthello) and routes by its server name: the bridge's own names go on to TLS
as below, the bytes read replayed; a passthrough name is spliced to its backend; no route closes.
Port 80 routes the same way by the first request's Host header.

The connection then belongs to bridge.net.front, which parses and checks request heads with the
sans-IO core (bridge.protocol.http1). Port 80 (ACME challenges and redirects) passes the same gate,
without TLS and without an allow-list.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bridge.config import Network, plain_address
from bridge.net.passthrough import Route, Router, Splice
from bridge.protocol.clienthello import HelloReader, HelloRefused
from bridge.protocol.http1 import HeadRefused, complete_head_length, local_answer, parse_request_head

log = logging.getLogger("bridge.guard")


TLS_HANDSHAKE_RECORD = 0x16
BUSY_RETRY_AFTER = 10  # seconds a client is asked to wait when --max-connections is reached
BUSY_HEAD_LIMIT = 16 * 1024
ROUTED_HEAD_LIMIT = 64 * 1024  # port 80 with routes: the first request head, read to find its Host


# --------------------------------------------------------------------------- policy and counters


@dataclass
class ConnectionGuard:
    """Settings and live counters shared by the gate and the request handlers (one per listener)."""

    allow: tuple[Network, ...] = ()
    max_connections: int = 1000
    header_timeout: float = 15.0
    public_origin: str = ""
    open_connections: int = 0
    busy_connections: int = 0
    rejections: Counter = field(default_factory=Counter)  # reason -> count

    def allows(self, peer: str) -> bool:
        if not self.allow:
            return True
        try:
            address = ipaddress.ip_address(plain_address(peer))
        except ValueError:
            return False
        return any(address in network for network in self.allow)

    def reject(self, reason: str) -> None:
        self.rejections[reason] += 1

    def apply(self, allow: Iterable[Network], max_connections: int, header_timeout: float, public_origin: str | None = None) -> None:
        """New settings (SIGHUP); open connections keep going, new ones follow the new rules."""
        self.allow = tuple(allow)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        if public_origin is not None:
            self.public_origin = public_origin


def peer_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return peer[0] if peer else ""


# --------------------------------------------------------------------------- the gate under TLS


class Gate(asyncio.Protocol):
    """First protocol of every TCP connection: decides before TLS, then hands the transport over."""

    def __init__(
        self,
        guard: ConnectionGuard,
        app_factory: Any,
        ssl_context: Any,
        router: Router | None = None,
        splices: set[Splice] | None = None,
        *,
        banned: Any = None,
        busy_factory: Any = None,
        plain_answer: bytes | None = None,
    ) -> None:
        self.guard = guard
        self.app_factory = app_factory
        self.ssl_context = ssl_context
        # The mail listeners (bridge.proxy.mail): banned(peer) closes a banned source before TLS, a
        # session over --max-connections gets busy_factory(guard, on_close), plain text plain_answer.
        self.banned = banned
        self.busy_factory = busy_factory or BusyResponder
        self.plain_answer = plain_answer
        self.transport: asyncio.Transport | None = None
        self.counted = False
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.router = router
        self.splices = splices if splices is not None else set()
        self.hello: HelloReader | None = None  # routing on the HTTPS port: the ClientHello so far
        self.head: bytearray | None = None  # routing on port 80: the first request head so far

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # a stream server hands a Transport
        guard = self.guard
        peer = peer_address(transport)
        if not guard.allows(peer):
            guard.reject("allow-list")
            log.info("closed a connection from %s: not in --allow", peer)
            transport.abort()
            return
        router = self.router
        banned = self.banned if self.banned is not None else (router.banned if router is not None and self.ssl_context is not None else None)
        if banned is not None and banned(peer):
            guard.reject("banned")
            log.info("closed a connection from %s: banned", peer)
            transport.abort()
            return
        self.transport = transport
        if guard.open_connections >= guard.max_connections:
            if guard.busy_connections >= guard.max_connections:
                guard.reject("max-connections")
                transport.abort()
                return
            self.busy = True
            guard.busy_connections += 1
        else:
            self.counted = True
            guard.open_connections += 1
        if self.ssl_context is None and router is None:
            self.hand_over(b"")
            return
        if router is not None:
            if self.ssl_context is not None:
                self.hello = HelloReader()
            else:
                self.head = bytearray()
        self.timer = asyncio.get_running_loop().call_later(guard.header_timeout, self.timed_out)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or not data:
            return
        if self.head is not None:
            self.read_head(data)
            return
        if self.hello is not None and self.hello.buffer:
            self.read_hello(data)
            return
        if data[0] == TLS_HANDSHAKE_RECORD or (self.hello is not None and data[0] & 0x80):
            if self.hello is not None:
                self.read_hello(data)
            else:
                self.cancel_timer()
                self.hand_over(data)
        elif data[:1].isalpha():
            self.cancel_timer()
            self.guard.reject("plain-http")
            log.info("plain HTTP from %s on the HTTPS port: answered 400", peer_address(transport))
            transport.write(plain_http_answer(self.guard.public_origin) if self.plain_answer is None else self.plain_answer)
            transport.close()
        else:
            self.cancel_timer()
            self.guard.reject("not-tls")
            log.info("closed a connection from %s: neither TLS nor HTTP", peer_address(transport))
            transport.abort()

    # ---- routing (--passthrough) ---------------------------------------------------------------
    def read_hello(self, data: bytes) -> None:
        """HTTPS with routes: the ClientHello, read whole (over any number of records and segments), then routed."""
        assert self.hello is not None and self.router is not None and self.transport is not None
        try:
            hello = self.hello.feed(data)
        except HelloRefused as exc:
            self.cancel_timer()
            self.guard.reject(exc.reason)
            log.info("closed a connection from %s: %s", peer_address(self.transport), exc)
            self.transport.abort()
            return
        if hello is None:
            return  # more to come, within --header-timeout
        self.cancel_timer()
        first_bytes = bytes(self.hello.buffer)
        self.hello = None
        route = self.router.choose(hello.server_name)
        self.route(route, first_bytes, hello.server_name, "no SNI" if hello.server_name is None else f"SNI {hello.server_name}")

    def read_head(self, data: bytes) -> None:
        """Port 80 with routes: the first request head, to route by its Host header."""
        assert self.head is not None and self.router is not None and self.transport is not None
        self.head += data
        try:
            length = complete_head_length(bytes(self.head))
            if not length and len(self.head) <= ROUTED_HEAD_LIMIT:
                return
            host = parse_request_head(bytes(self.head[:length])).header("host") if length else None
        except HeadRefused:
            host = None
            length = 0
        self.cancel_timer()
        first_bytes = bytes(self.head)
        self.head = None
        if not length:  # oversized or malformed: the bridge's own handling answers it as without routes
            self.hand_over(first_bytes)
            return
        route = self.router.choose_host(host)
        self.route(route, first_bytes, host, f"Host {host}" if host else "no Host")

    def route(self, route: Route | None, first_bytes: bytes, name: str | None, what: str) -> None:
        transport = self.transport
        assert transport is not None and self.router is not None
        tls = self.ssl_context is not None
        if route is not None and route.terminated:
            route.counters.connections += 1
            self.hand_over(first_bytes)
            return
        if route is None:
            self.router.unrouted += 1
            self.guard.reject("no-route")
            log.info("closed a connection from %s: no route for its %s", peer_address(transport), what)
            if tls:
                transport.abort()
            else:
                transport.write(local_answer(404, "No site of that name is served here."))
                transport.close()
            return
        if self.busy:
            self.guard.reject("max-connections")
            log.warning("closed a passthrough connection from %s: --max-connections %d reached", peer_address(transport), self.guard.max_connections)
            transport.abort()
            return
        assert route.config is not None
        self.transport = None  # the splice releases the slot when it ends
        splice = Splice(self.router, route, transport, first_bytes, server_name=name, backend_port=route.config.port if tls else self.router.http_port, on_close=self.release, registry=self.splices)
        splice.start()

    def hand_over(self, first_bytes: bytes) -> None:
        transport = self.transport
        assert transport is not None
        on_close = self.release
        app = self.busy_factory(self.guard, on_close) if self.busy else self.app_factory()
        self.transport = None  # the Gate is done; the counted slot is released by the new protocol
        state = getattr(app, "state", None)  # a client connection (bridge.net.front)
        if state is not None:
            state.on_close(on_close)
        if self.ssl_context is None:
            transport.set_protocol(app)
            app.connection_made(transport)
            if first_bytes:  # port 80 with routes: the request head read to route it
                app.data_received(first_bytes)
            return
        transport.pause_reading()
        loop = asyncio.get_running_loop()
        task = loop.create_task(self.start_tls(transport, app))
        _handshakes.add(task)
        task.add_done_callback(_handshakes.discard)
        # Runs after the task's first step (start_tls has put its TLS protocol on the transport) and
        # before start_tls resumes reading: the ClientHello bytes the Gate read come first.
        loop.call_soon(give_first_bytes, transport, self, first_bytes)

    async def start_tls(self, transport: asyncio.Transport, app: asyncio.Protocol) -> None:
        """TLS by the loop itself, then the request handler (or the 503 responder) on top."""
        if transport.is_closing():  # gone between the first bytes and now (connection_lost released)
            return
        handshaking = Handshaking()
        try:
            tls_transport = await asyncio.get_running_loop().start_tls(transport, handshaking, self.ssl_context, server_side=True, ssl_handshake_timeout=self.guard.header_timeout)
        except Exception:
            self.guard.reject("tls-handshake")
            self.release()
            return
        except BaseException:  # cancelled (the loop is shutting down)
            self.release()
            raise
        if tls_transport is None or handshaking.lost:
            self.guard.reject("tls-handshake")
            self.release()
            return
        handshaking.hand_over(tls_transport, app)

    def timed_out(self) -> None:
        self.timer = None
        if self.transport is not None:
            if self.head is not None:  # port 80 with routes: as the bridge answers a head that drags on
                self.guard.reject("header-timeout")
                self.transport.write(local_answer(408, "The request head did not arrive in time."))
                self.transport.close()
                return
            self.guard.reject("hello-timeout" if self.hello is not None and self.hello.buffer else "tls-timeout")
            self.transport.abort()

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def release(self) -> None:
        if self.counted:
            self.counted = False
            self.guard.open_connections -= 1
        if self.busy:
            self.busy = False
            self.guard.busy_connections -= 1

    def connection_lost(self, exc: BaseException | None) -> None:
        # Only reached while the Gate still owns the transport (before the hand-over).
        self.cancel_timer()
        self.transport = None
        self.release()


_handshakes: set[asyncio.Task] = set()  # TLS handshakes in progress (the loop keeps only weak references)


class Handshaking(asyncio.Protocol):
    """start_tls's application protocol until the handshake is done, then hands over to the real one.

    asyncio may deliver the first decrypted bytes (and even the loss of the connection) before
    start_tls has returned; they are kept and given to the request handler after its connection_made.
    """

    def __init__(self) -> None:
        self.early: list[bytes] = []
        self.eof = False
        self.lost = False
        self.app: asyncio.Protocol | None = None

    def hand_over(self, tls_transport: asyncio.Transport, app: asyncio.Protocol) -> None:
        self.app = app
        tls_transport.set_protocol(app)
        app.connection_made(tls_transport)
        early, self.early = self.early, []
        for data in early:
            app.data_received(data)
        if self.eof:  # the TLS layer is already closing; the handler only learns of it
            app.eof_received()

    def data_received(self, data: bytes) -> None:
        if self.app is not None:
            self.app.data_received(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        if self.app is not None:
            return self.app.eof_received()
        self.eof = True
        return None  # (over TLS, keeping the transport half-open is not possible anyway)

    def connection_lost(self, exc: BaseException | None) -> None:
        # asyncio schedules connection_lost with the protocol of the moment: forward it if it was us.
        if self.app is not None:
            self.app.connection_lost(exc)  # type: ignore[arg-type]  # typeshed says Exception; asyncio's own protocols take any BaseException
        else:
            self.lost = True


def give_first_bytes(transport: asyncio.Transport, gate: Gate, data: bytes) -> None:
    """Feed the bytes the Gate read to the TLS protocol start_tls has just installed."""
    protocol = transport.get_protocol()
    if protocol is gate:  # start_tls never ran (the connection went away first)
        transport.abort()
        return
    feed_buffered(protocol, data)  # type: ignore[arg-type]  # start_tls installs an SSL protocol, a BufferedProtocol (asyncio's and uvloop's)


def feed_buffered(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """Give bytes already read to a buffered protocol, as the transport would have."""
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        count = min(len(buffer), len(view))
        buffer[:count] = view[:count]
        protocol.buffer_updated(count)
        view = view[count:]


def plain_http_answer(public_origin: str) -> bytes:
    where = f"use {public_origin}/" if public_origin else "use https://"
    return local_answer(400, f"This port speaks HTTPS only; {where}.")


class BusyResponder(asyncio.Protocol):
    """Over --max-connections: read the request head (bounded), answer 503 with Retry-After, close."""

    def __init__(self, guard: ConnectionGuard, on_close: Any = None) -> None:
        self.guard = guard
        self.on_close = on_close
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # a stream server hands a Transport
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(self.guard.header_timeout, self.answer)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            complete = complete_head_length(self.buffer) > 0 or len(self.buffer) > BUSY_HEAD_LIMIT
        except HeadRefused:  # (no head will come of it: the answer is the same)
            complete = True
        if complete:
            self.answer()

    def answer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport, self.transport = self.transport, None
        if transport is None:
            return
        self.guard.reject("max-connections")
        log.warning("503 for %s: --max-connections %d reached", peer_address(transport), self.guard.max_connections)
        transport.write(local_answer(503, "The bridge has too many open connections; try again shortly.", extra_headers=[("Retry-After", str(BUSY_RETRY_AFTER))]))
        transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None
        if self.on_close is not None:
            self.on_close()
