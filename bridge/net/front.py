"""The HTTPS front end: client connections, request heads, and the drain on shutdown.

A purpose-built HTTP/1.1 server connection instead of aiohttp's web server on port 443: aiohttp's
per-request objects (request, response, header multidicts, a task per request, its writer) cost
about two thirds of the bridge's CPU per small request, and its compiled parser refuses Outlook
Anywhere's ``RPC_IN_DATA``/``RPC_OUT_DATA``. Here one task serves each connection: it reads a request
head, parses and checks it in one pass (``parse_request_head``), and hands it to the proxy, which
writes the answer as bytes; a plain request on an open upstream connection skips even that task and
is relayed from the transport callbacks (the proxy's fast path). aiohttp still serves port 80, the
status page and the lab.

Every connection first passes bridge.guard's Gate (allow-list, plain HTTP, --max-connections, TLS by
the loop's own implementation); a head must arrive within --header-timeout (408), an idle
keep-alive connection closes after --idle-timeout.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from bridge.net.accesslog import ACCESS
from bridge.net.channel import Channel, ConnectionState
from bridge.net.gate import ConnectionGuard, Gate, peer_address
from bridge.net.passthrough import Router, Splice, drain_splices
from bridge.protocol.http1 import (
    HeadProblem,
    HeadRefused,
    RequestHead,
    complete_head_length,
    local_answer,
    parse_request_head,
)

if TYPE_CHECKING:
    from bridge.net.upstream import UpstreamConnection

log = logging.getLogger("bridge.front")


def cached_by_path(cache: dict[str, Any], target: str, decide: Callable[[str], Any], limit: int = 4096) -> Any:
    """decide(path) for a request target's path (the target less its query), cached under the whole
    target (clients repeat whole targets: the RPC proxy's, EWS's) and under the path; the cache is
    emptied when it holds ``limit`` entries."""
    try:
        return cache[target]
    except KeyError:
        pass
    path = target.split("?", 1)[0]
    value = cache[path] if path in cache else decide(path)
    if len(cache) >= limit:
        cache.clear()
    cache[path] = cache[target] = value
    return value


Handler = Callable[[RequestHead, "ClientConnection"], Awaitable[bool]]


PENDING = b"pending"  # read_request_head(): an exchange the fast path handed back is waiting


class Phase(enum.Enum):
    """Where a client connection is in its life (``ClientConnection.phase``); only this module sets it.

    READING_HEAD -> IN_REQUEST -> IDLE -> READING_HEAD ... on the general path (the connection's task);
    IDLE/READING_HEAD -> FAST -> IDLE (``end_fast``) or -> HANDED_BACK -> IN_REQUEST (``fall_back``)
    on the proxy's fast path; any phase -> CLOSED. The deadline sweeper turns IDLE/READING_HEAD into
    EXPIRED (the task answers 408 or closes)."""

    IDLE = "idle"  # the task waits for a request head and none has begun: the keep-alive timeout runs
    READING_HEAD = "reading-head"  # part of a head is here (or the first is due): --header-timeout runs
    EXPIRED = "expired"  # the head or keep-alive deadline passed; the task answers 408 or closes
    IN_REQUEST = "in-request"  # the task handles a request (the proxy's handler, or a handed-back exchange)
    FAST = "fast"  # the proxy relays ``exchange`` from the transport callbacks; the task sleeps
    HANDED_BACK = "handed-back"  # the fast path gave ``exchange`` to the task, which resumes it
    CLOSED = "closed"  # no further request on this connection


IDLE, READING_HEAD, EXPIRED, IN_REQUEST, FAST, HANDED_BACK, CLOSED = Phase
BUSY = frozenset({IN_REQUEST, FAST, HANDED_BACK})  # a request is in progress (the drain waits for it)


class Exchange:
    """One request on a client connection: what the access log and the counters say about it and, for
    an exchange on the proxy's fast path, what it is relayed with (``request``, ``connection``)."""

    __slots__ = ("request", "connection", "started", "bytes_in", "bytes_out", "status", "upstream", "answered", "body_withheld", "body_done")

    def __init__(self, request: RequestHead, connection: UpstreamConnection | None = None) -> None:
        self.request = request
        self.connection = connection  # the pinned upstream connection (fast path)
        self.started = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.upstream = connection.name if connection is not None else "-"
        self.answered = False  # the response head went to the client
        self.body_withheld = False  # the client waits for 100 Continue before sending its body
        self.body_done = connection is not None  # the client's whole body has been read (fast: no body)


class FastPath(Protocol):
    """What the connection asks of the proxy's callback-driven path (bridge.proxy.Proxy)."""

    def start_fast(self, client: ClientConnection) -> bool: ...
    def continue_fast(self, client: ClientConnection) -> None: ...
    def fast_expired(self, client: ClientConnection) -> None: ...
    def fast_abandoned(self, client: ClientConnection, exchange: Exchange) -> None: ...
    async def resume(self, client: ClientConnection, exchange: Exchange) -> bool: ...


class ClientConnection(Channel):
    """One client connection (after TLS): reads request heads and runs the handler for each.

    The handler returns whether the connection may carry another request; it reads the request
    body from this channel and writes the answer to it. When the server has a fast path, a simple
    request (no body, on an open upstream connection) is relayed from the transport callbacks
    without waking the connection's task; anything unusual hands it back to the task.

    The connection's lifecycle is ``phase`` (a Phase) plus ``exchange`` (the fast path's Exchange in
    FAST and HANDED_BACK); the proxy moves it only through ``begin_fast``, ``end_fast``,
    ``fall_back``, ``decline`` and ``touch``/``watch_idle``, and never assigns an attribute.
    """

    __slots__ = (
        "server",
        "guard",
        "state",
        "task",
        "phase",
        "requests",
        "scanned",
        "exchange",
        "declined",
        "fast_callback",
        "head_since",
        "idle_since",
        "idle_limit",
        "last_activity",
        "idle_expired",
        "__weakref__",
    )

    def __init__(self, server: FrontServer) -> None:
        super().__init__()
        self.server = server
        self.guard = server.guard
        self.state = ConnectionState(peer="")
        self.task: asyncio.Task | None = None
        self.phase = READING_HEAD
        self.requests = 0
        self.scanned = 0  # buffered bytes already checked for a complete request head
        self.exchange: Exchange | None = None  # the fast path's exchange (FAST, HANDED_BACK)
        self.declined: tuple[bytes, RequestHead] | None = None  # a head the fast path parsed and left to the task
        self.fast_callback: Callable[[], None] | None = None  # the upstream's on_data during fast exchanges
        # Deadlines, checked by the server's sweeper (no timer per request): while the task waits
        # for a head, since when part of one is here (--header-timeout) or since when the
        # connection is idle (keep-alive timeout)...
        self.head_since = 0.0
        self.idle_since = 0.0
        # ... and, during a request, the idle limit on data moving in either direction.
        self.idle_limit = 0.0
        self.last_activity = 0.0
        self.idle_expired = False  # the request in progress was cut by the idle limit

    @property
    def peer(self) -> str:
        return self.state.peer

    @property
    def in_request(self) -> bool:
        return self.phase in BUSY

    @property
    def finished(self) -> bool:
        return self.phase is CLOSED

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.state.peer = peer_address(transport)
        self.server.connections.add(self)
        self.head_since = self.idle_since = self.loop.time()  # the first head is due --header-timeout after the handshake
        self.task = self.loop.create_task(self.serve())

    def data_received(self, data: bytes) -> None:
        if not self.keep(data):
            return
        phase = self.phase
        if (phase is IDLE or phase is READING_HEAD) and not self.writing_paused and self.server.fast is not None:
            try:
                if self.server.fast.start_fast(self):
                    return
            except Exception:  # never let a callback error kill the transport: the task takes over
                log.exception("fast path failed to start; the request goes on the general path")
        self.wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)
        busy = self.phase in BUSY
        self.abandon_exchange()
        self.state.run_close_callbacks()  # the pinned upstream connection goes with its client
        if busy and self.task is not None and not self.task.done():
            self.task.cancel()
        if not self.server.connections:
            ACCESS.idle()  # the last connection ended: its access lines go out now, not on the timer

    def abandon_exchange(self) -> None:
        """The connection ends with a fast exchange in flight or handed back but not resumed."""
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            self.server.fast.fast_abandoned(self, exchange)  # type: ignore[union-attr]  # a connection has a fast exchange only when the server has a fast path

    # ---- the connection's life -------------------------------------------------------------
    async def serve(self) -> None:
        server = self.server
        handler = server.handler
        try:
            while True:
                head = await self.read_request_head()
                if head is None:
                    return
                if head is PENDING:
                    exchange, self.exchange = self.exchange, None
                    keep = await server.fast.resume(self, exchange)  # type: ignore[union-attr, arg-type]  # HANDED_BACK: the server has a fast path and the exchange is set
                else:
                    keep = await handler(self.parsed(head), self)
                self.phase = IDLE
                self.idle_since = self.loop.time()
                if not keep or server.draining or self.closing:
                    return
                if self.writing_paused:
                    await self.drain()  # a client that pipelines but does not read gets no more answers
        except HeadRefused as exc:
            self.refuse(exc.problem)
        except asyncio.CancelledError:
            pass  # the client went away mid-request, or the drain ran out of time
        except Exception:
            log.exception("unexpected error on the connection from %s", self.peer)
        finally:
            self.phase = CLOSED
            self.idle_limit = 0.0
            self.abandon_exchange()
            self.state.run_close_callbacks()
            self.close()

    def refuse(self, problem: HeadProblem) -> None:
        """Answer a request head the bridge will not forward, then close (nothing of it goes upstream)."""
        self.guard.reject(problem.reason)
        log.info("%d for %s: %s", problem.status, self.peer, problem.message)
        if not self.closing:
            self.transport.write(local_answer(problem.status, problem.message))  # type: ignore[union-attr]  # not closing: the transport is there

    async def read_request_head(self) -> bytes | None:
        """The next request head (PENDING for a handed-back exchange), or None when the connection
        should end without an answer."""
        while True:
            phase = self.phase
            if phase is HANDED_BACK:
                self.phase = IN_REQUEST
                return PENDING
            if phase is CLOSED:
                return None
            if phase is not FAST:
                data = self.peek_all()
                if data[:1] in (b"\r", b"\n"):  # empty lines before a request line are ignored (RFC 9112 2.2)
                    self.consume(len(data) - len(data.lstrip(b"\r\n")))
                    continue
                length = self.complete_head(data)
                if length:
                    self.consume(length)
                    self.requests += 1
                    self.head_since = 0.0
                    self.phase = IN_REQUEST
                    return data[:length]
                if self.eof:
                    return None
                if phase is EXPIRED:
                    if self.head_since:
                        self.guard.reject("header-timeout")
                        log.info("408 for %s: request head not complete within %g s", self.peer, self.guard.header_timeout)
                        if not self.closing:
                            self.transport.write(local_answer(408, "The request head did not arrive in time."))  # type: ignore[union-attr]  # not closing: the transport is there
                        return None
                    if not data:
                        return None  # an idle keep-alive connection
                    # (bytes arrived just as the keep-alive deadline fired: a head has begun)
                if data and not self.head_since:
                    self.head_since = self.loop.time()
                self.phase = READING_HEAD if self.head_since else IDLE
            elif self.eof:
                return None
            await self.wait_for_data()

    def parsed(self, head: bytes) -> RequestHead:
        """The request of this head: the fast path's parse of it when it declined it, else a new one."""
        declined, self.declined = self.declined, None
        if declined is not None and declined[0] == head:
            return declined[1]
        return parse_request_head(head)

    def complete_head(self, data: bytes) -> int:
        """complete_head_length() of the buffer, remembering how much of it has been checked."""
        length = complete_head_length(data, self.scanned)
        self.scanned = 0 if length else len(data)
        return length

    # ---- the proxy's fast path -------------------------------------------------------------------
    def decline(self, head: bytes, request: RequestHead) -> None:
        """The fast path parsed this head and leaves it to the task (which will not parse it again)."""
        self.declined = (head, request)

    def begin_fast(self, length: int, exchange: Exchange, idle_timeout: float) -> None:
        """The fast path takes the buffered head (``length`` bytes) and relays ``exchange``."""
        self.consume(length)
        self.requests += 1
        self.head_since = 0.0
        self.declined = None
        self.exchange = exchange
        self.phase = FAST
        self.idle_limit = idle_timeout
        self.idle_expired = False
        self.last_activity = self.loop.time()

    def fast_data_callback(self) -> Callable[[], None]:
        """The upstream channel's on_data while this connection has a fast exchange (made once)."""
        callback = self.fast_callback
        if callback is None:
            callback = self.fast_callback = functools.partial(self.server.fast.continue_fast, self)  # type: ignore[union-attr]  # only the fast path asks
        return callback

    def end_fast(self, keep: bool) -> None:
        """The fast path has answered; go on with what the client sent meanwhile (pipelining)."""
        self.exchange = None
        self.idle_limit = 0.0
        self.idle_since = self.loop.time()
        if not keep or self.server.draining:
            self.phase = CLOSED
            self.wake()
            return
        self.phase = IDLE
        if self.chunks and (self.writing_paused or not self.server.fast.start_fast(self)):  # type: ignore[union-attr]  # a connection has fast exchanges only when the server has a fast path
            self.wake()  # the task takes the next request (after the client has read the answers so far)

    def fall_back(self) -> None:
        """The fast path hands its exchange to the task (an unusual answer, or an error)."""
        self.phase = HANDED_BACK
        self.wake()

    # ---- deadlines ---------------------------------------------------------------------------
    def touch(self) -> None:
        """Data moved for the request in progress."""
        self.last_activity = self.loop.time()

    def watch_idle(self, seconds: float) -> None:
        """From now until watch_idle(0), a request silent for ``seconds`` is cancelled (idle_expired)."""
        self.idle_limit = seconds
        self.idle_expired = False
        self.last_activity = self.loop.time()

    def check_deadlines(self, now: float) -> None:
        if self.idle_limit:
            if now - self.last_activity >= self.idle_limit:
                self.idle_limit = 0.0
                self.idle_expired = True
                if self.phase is FAST:
                    self.server.fast.fast_expired(self)  # type: ignore[union-attr]  # a connection has fast exchanges only when the server has a fast path
                elif self.task is not None and not self.task.done():
                    self.task.cancel()
            return
        phase = self.phase
        if phase is IDLE or phase is READING_HEAD:
            if self.head_since:
                due = self.head_since + self.guard.header_timeout
            else:
                due = self.idle_since + self.server.keepalive_timeout
            if now >= due:
                self.phase = EXPIRED
                self.wake()


class FrontServer:
    """The HTTPS listener(s), its open connections and the drain on shutdown."""

    def __init__(self, handler: Handler, guard: ConnectionGuard, ssl_context: Any, keepalive_timeout: float, drain_timeout: float = 30.0, fast: FastPath | None = None) -> None:
        self.handler = handler
        self.fast = fast
        self.guard = guard
        self.ssl_context = ssl_context
        self.keepalive_timeout = keepalive_timeout
        self.drain_timeout = drain_timeout
        self.connections: set[ClientConnection] = set()
        self.listeners: list[asyncio.Server] = []
        self.draining = False
        self.sweeper: asyncio.Task | None = None
        self.router: Router | None = None  # --passthrough routes: the Gate routes each connection by SNI (or Host on port 80)
        self.splices: set[Splice] = set()  # this listener's passthrough connections

    def new_connection(self) -> ClientConnection:
        return ClientConnection(self)

    async def listen(self, host: str | None, port: int, *, sock: Any = None, backlog: int = 1024) -> None:
        """Raises OSError when the port cannot be bound."""
        loop = asyncio.get_running_loop()
        gate = lambda: Gate(self.guard, self.new_connection, self.ssl_context, self.router, self.splices)  # noqa: E731
        if sock is not None:
            listener = await loop.create_server(gate, sock=sock, backlog=backlog)
        else:
            listener = await loop.create_server(gate, host, port, backlog=backlog, reuse_address=True)
        self.listeners.append(listener)
        if self.sweeper is None:
            self.sweeper = loop.create_task(self.sweep(), name="front-deadlines")

    async def sweep(self) -> None:
        """Enforce every connection's deadlines a few times per second (one timer for all of them)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.05, min(0.5, self.guard.header_timeout / 8, self.keepalive_timeout / 8)))
            now = loop.time()
            for connection in list(self.connections):
                try:
                    connection.check_deadlines(now)
                except Exception:  # one connection's failure must not stop the deadlines of all
                    log.exception("deadline handling failed for the connection from %s", connection.peer)
                    connection.abort()

    @property
    def port(self) -> int:
        for listener in self.listeners:
            if listener.sockets:
                return listener.sockets[0].getsockname()[1]
        raise RuntimeError("the front end has no listening socket")

    async def cleanup(self) -> None:
        """Stop accepting; idle connections close now, requests in progress get --drain-timeout."""
        self.draining = True
        for listener in self.listeners:
            listener.close()
        for connection in list(self.connections):
            if not connection.in_request:
                connection.wake()  # it is waiting for a head: let it see the drain
                connection.close()
        busy = [c.task for c in self.connections if c.in_request and c.task is not None]
        started = asyncio.get_running_loop().time()
        if busy:
            done, pending = await asyncio.wait(busy, timeout=self.drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.splices:  # passthrough connections: the same drain, then cut
            await drain_splices(self.splices, max(0.0, self.drain_timeout - (asyncio.get_running_loop().time() - started)))
        for connection in list(self.connections):
            connection.abort()
        for listener in self.listeners:
            await listener.wait_closed()
        if self.sweeper is not None:
            self.sweeper.cancel()
            await asyncio.gather(self.sweeper, return_exceptions=True)

    async def finish_requests(self, timeout: float) -> int:
        """Requests in progress get ``timeout`` seconds, then their connections are cut; the listeners
        stay open (the migration window closing: new requests are the handler's to refuse). Returns
        how many connections were still in a request when cut."""
        busy = [c.task for c in self.connections if c.in_request and c.task is not None]
        if not busy:
            return 0
        _, pending = await asyncio.wait(busy, timeout=timeout)
        cut = sum(1 for c in list(self.connections) if c.in_request and c.task in pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return cut
