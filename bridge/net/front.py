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
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bridge.net.aio_server import MAX_FIELD_SIZE, MAX_HEADERS, MAX_LINE_SIZE
from bridge.net.channel import Channel, ConnectionState
from bridge.net.gate import (
    MAX_HEAD_BYTES,
    MAX_METHOD_LENGTH,
    REFUSED_METHODS,
    ConnectionGuard,
    Gate,
    HeadProblem,
    peer_address,
    simple_response,
    valid_host,
)
from bridge.net.upstream import HOP_BY_HOP_BYTES, MIN_LINE, connection_tokens, header_values

log = logging.getLogger("bridge.front")

METHOD_TOKEN = re.compile(rb"[A-Z][A-Z0-9_-]*")
# Control characters other than HTAB, and CR or LF that are not part of a CRLF line end.
BAD_HEAD_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
NOT_CONTROL = bytes(c for c in range(256) if c == 0x09 or 0x20 <= c != 0x7F)
BAD_TARGET_BYTES = re.compile(rb"[\x00-\x20\x7f#]")
VERSIONS = {b"HTTP/1.1": (1, 1), b"HTTP/1.0": (1, 0)}
ANY_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
MAX_REQUEST_HEAD = MAX_LINE_SIZE + 2 + MAX_HEAD_BYTES + 4 * MAX_HEADERS + 4


class HeadRefused(Exception):
    def __init__(self, problem: HeadProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def refused(status: int, reason: str, message: str) -> HeadRefused:
    return HeadRefused(HeadProblem(status, reason, message))


MALFORMED = "The request is not valid HTTP/1.1 (malformed request line or header, or ambiguous message framing)."


@dataclass(slots=True)
class RequestHead:
    """One parsed request head: the header lines as received, plus what the proxy decides on."""

    method: str
    raw_path: str
    version: tuple[int, int]
    request_line: bytes  # the request line to send upstream (always HTTP/1.1)
    block: bytes  # the header lines as received, each preceded by CRLF
    lowered: bytes  # the same, lower-case (for finding names)
    content_length: int | None
    chunked: bool
    keep_alive: bool
    expect_continue: bool
    connection_tokens: frozenset[bytes]  # lower-case
    fields: list[tuple[bytes, int, int]]  # (lower-case name, start, end) of each REQUEST_FIELDS line in the block

    @property
    def lines(self) -> list[bytes]:
        return self.block.split(b"\r\n")[1:]

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(line[: line.find(b":")], line[line.find(b":") + 1 :].strip(b" \t")) for line in self.lines]

    def header(self, name: str) -> str | None:
        """The first value of a header (for the rare lookups outside the parse)."""
        values = header_values(self.block, self.lowered, b"\r\n" + name.lower().encode("latin-1") + b":")
        return values[0].decode("latin-1") if values else None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


COMMON_METHODS = {m.encode(): m for m in ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "RPC_IN_DATA", "RPC_OUT_DATA", "PROPFIND", "SEARCH")}
VALID_HOSTS: set[bytes] = set()  # Host values seen and found valid (clients repeat one or two)
# Each line: CRLF, a token name directly followed by a colon (no whitespace, no obsolete folding), a
# value (which has_only_clean_line_ends() has checked: it runs to the CR of the next CRLF).
HEADER_BLOCK = re.compile(rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]++:[^\r]*+)*+")


# The request header lines the bridge acts on, found in one scan of the lower-case block: the framing
# fields, and those the upstream head leaves out or replaces (hop-by-hop, X-Forwarded-*, Host).
# Group 1: the name; group 2: the value, lower-case, not stripped.
REQUEST_FIELD_NAMES = HOP_BY_HOP_BYTES | {b"content-length", b"host", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-port"}
REQUEST_FIELDS = re.compile(rb"\r\n(" + b"|".join(sorted(REQUEST_FIELD_NAMES, key=len, reverse=True)) + rb"):([^\r]*)")  # type: ignore[arg-type]  # mypy takes sorted's type from join's Iterable[Buffer]


def remember_valid_host(host: bytes) -> bool:
    if not valid_host(host.decode("latin-1")):
        return False
    if len(VALID_HOSTS) >= 256:
        VALID_HOSTS.clear()
    VALID_HOSTS.add(host)
    return True


def has_only_clean_line_ends(raw: bytes) -> bool:
    """No control characters but HTAB, and CR and LF only as CRLF pairs (faster than BAD_HEAD_BYTES)."""
    return len(raw.translate(None, NOT_CONTROL)) == 2 * raw.count(b"\r\n")


def parse_request_head(raw: bytes) -> RequestHead:
    """Parse and check a request head (ending in CRLF CRLF); raises HeadRefused with the answer.

    The header lines are checked and searched as one block (one regular expression checks every
    name, one scan of the lower-case block finds the REQUEST_FIELDS lines), not line by line: a
    head's cost barely grows with its number of headers."""
    if not has_only_clean_line_ends(raw):
        raise refused(400, "malformed-head", MALFORMED)
    line_end = raw.find(b"\r\n")
    request_line = raw[:line_end]
    if line_end > MAX_LINE_SIZE:
        raise refused(414, "target-too-long", "The request line is too long.")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise refused(400, "malformed-head", MALFORMED)
    method_bytes, target_bytes, version_bytes = parts
    method = COMMON_METHODS.get(method_bytes)
    if method is None:
        if len(method_bytes) > MAX_METHOD_LENGTH or not METHOD_TOKEN.fullmatch(method_bytes):
            raise refused(400, "bad-method", "The request method is not a valid method token.")
        method = method_bytes.decode("ascii")
    if method in REFUSED_METHODS:
        raise refused(405, "refused-method", f"The bridge does not relay {method} requests.")
    version = VERSIONS.get(version_bytes)
    if version is None:
        if ANY_VERSION.fullmatch(version_bytes):
            raise refused(505, "bad-version", "Only HTTP/1.0 and HTTP/1.1 are supported.")
        raise refused(400, "malformed-head", MALFORMED)
    if BAD_TARGET_BYTES.search(target_bytes):
        if b"#" in target_bytes:
            raise refused(400, "bad-target", "The request target may not contain a fragment.")
        raise refused(400, "malformed-head", MALFORMED)
    block = raw[line_end:-4]
    size = len(block)
    if size > MIN_LINE * MAX_HEADERS and block.count(b"\r\n") > MAX_HEADERS:
        raise refused(431, "head-too-large", "The request header fields are too large.")
    if size > MAX_HEAD_BYTES:  # the header lines with their CRLFs
        raise refused(431, "head-too-large", "The request header fields are too large.")
    if not HEADER_BLOCK.fullmatch(block):
        raise refused(400, "malformed-head", MALFORMED)
    if size > MAX_FIELD_SIZE + 2 and max(map(len, block.split(b"\r\n"))) > MAX_FIELD_SIZE:
        raise refused(431, "head-too-large", "The request header fields are too large.")
    lowered = block.lower()
    if version == (1, 0):
        request_line = method_bytes + b" " + target_bytes + b" HTTP/1.1"

    content_length = None
    chunked = False
    fields = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    hosts: list[bytes] = []
    connection = b""
    expect = b""
    for match in REQUEST_FIELDS.finditer(lowered):
        name, value = match.group(1, 2)
        fields.append((name, *match.span()))
        if name == b"host":
            hosts.append(value.strip(b" \t"))
        elif name == b"connection":
            connection = connection + b"," + value if connection else value
        elif name == b"content-length":
            lengths.append(value.strip(b" \t"))
        elif name == b"transfer-encoding":
            codings.append(value.strip(b" \t"))
        elif name == b"expect":
            expect = value
    if lengths or codings:
        content_length, chunked = request_framing(lengths, codings, version)
    if len(hosts) > 1 or (hosts and hosts[0] not in VALID_HOSTS and not remember_valid_host(hosts[0])):
        raise refused(400, "bad-host", "The Host header is not a valid host name.")
    if not hosts and version == (1, 1):
        raise refused(400, "bad-host", "An HTTP/1.1 request must have a Host header.")
    tokens = EMPTY_TOKENS
    if connection:
        tokens = connection_tokens(connection)
        if not tokens.isdisjoint(END_TO_END):
            # Dropping them as hop-by-hop would change the framing the legacy server sees (smuggling).
            raise refused(400, "smuggling", "The Connection header may not name Content-Length or Host.")
    return RequestHead(
        method,
        target_bytes.decode("latin-1"),
        version,
        request_line,
        block,
        lowered,
        content_length,
        chunked,
        b"close" not in tokens if version == (1, 1) else b"keep-alive" in tokens,
        expect.strip(b" \t") == b"100-continue",
        tokens,
        fields,
    )


EMPTY_TOKENS: frozenset[bytes] = frozenset()
END_TO_END = frozenset({b"content-length", b"host"})


def request_framing(lengths: list[bytes], codings: list[bytes], version: tuple[int, int]) -> tuple[int | None, bool]:
    """(Content-Length, chunked) of a request with a body, from its Content-Length and (lower-case)
    Transfer-Encoding values; raises HeadRefused when the framing is ambiguous (RFC 9112 6.3: the
    request smuggling cases)."""
    if len(lengths) > 1:
        raise refused(400, "smuggling", "The request has more than one Content-Length.")
    if codings and lengths:
        raise refused(400, "smuggling", "The request has both Content-Length and Transfer-Encoding.")
    if codings:
        if version == (1, 0):
            raise refused(400, "smuggling", "HTTP/1.0 requests may not use Transfer-Encoding.")
        final_coding = codings[0].rsplit(b",", 1)[-1].strip(b" \t") if len(codings) == 1 else b""
        if final_coding != b"chunked":  # no way to tell where the body ends (RFC 9112 6.3)
            raise refused(400, "smuggling", "The request's Transfer-Encoding does not end in chunked.")
        if codings[0] != b"chunked":
            raise refused(501, "smuggling", "Only Transfer-Encoding: chunked is supported.")
        return None, True
    if not lengths[0].isdigit() or len(lengths[0]) > 18:
        raise refused(400, "smuggling", "The Content-Length is not a number.")
    return int(lengths[0]), False


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


def complete_head_length(data: bytes, scanned: int = 0) -> int:
    """The length of the request head that starts ``data`` (through CRLF CRLF), or 0 while more bytes
    are needed; raises HeadRefused as soon as no acceptable head can come of it. ``scanned``: how many
    bytes of ``data`` an earlier call already checked (a head trickling in is not rescanned whole)."""
    end = data.find(b"\r\n\r\n", max(0, scanned - 3))
    if end >= 0:
        return end + 4
    size = len(data)
    if size > MAX_LINE_SIZE and data.find(b"\r\n", 0, MAX_LINE_SIZE + 2) < 0:
        raise refused(414, "target-too-long", "The request line is too long.")
    if size > MAX_REQUEST_HEAD:
        raise refused(431, "head-too-large", "The request header fields are too large.")
    # (A CR at the very end may be the start of a CRLF: not judged yet.)
    if BAD_HEAD_BYTES.search(data, max(0, scanned - 1), size - 1 if data.endswith(b"\r") else size):
        raise refused(400, "malformed-head", MALFORMED)  # e.g. bare LF line ends: no CRLF CRLF will come
    return 0


Handler = Callable[[RequestHead, "ClientConnection"], Awaitable[bool]]


PENDING = b"pending"  # read_request_head(): an exchange the fast path handed back is waiting


class FastPath(Protocol):
    """What the connection asks of the proxy's callback-driven path (bridge.proxy.Proxy)."""

    def start_fast(self, client: ClientConnection) -> bool: ...
    def fast_expired(self, client: ClientConnection) -> None: ...
    def fast_abandoned(self, client: ClientConnection) -> None: ...
    async def resume(self, client: ClientConnection) -> bool: ...


class ClientConnection(Channel):
    """One client connection (after TLS): reads request heads and runs the handler for each.

    The handler returns whether the connection may carry another request; it reads the request
    body from this channel and writes the answer to it. When the server has a fast path, a simple
    request (no body, on an open upstream connection) is relayed from the transport callbacks
    without waking the connection's task; anything unusual hands it back to the task (``pending``).
    """

    def __init__(self, server: FrontServer) -> None:
        super().__init__()
        self.server = server
        self.guard = server.guard
        self.state = ConnectionState(peer="")
        self.task: asyncio.Task | None = None
        self.in_request = False
        self.requests = 0
        self.finished = False  # no further request on this connection
        self.scanned = 0  # buffered bytes already checked for a complete request head
        self.fast: Any = None  # the exchange the fast path is relaying
        self.pending: Any = None  # an exchange the fast path handed back to the task
        self.declined: tuple[bytes, RequestHead] | None = None  # a head the fast path parsed and left to the task
        self.fast_data_callback: Callable[[], None] | None = None  # the upstream's on_data during fast exchanges
        # Deadlines, checked by the server's sweeper (no timer per request): while the task waits
        # for a head, since when part of one is here (--header-timeout) or since when the
        # connection is idle (keep-alive timeout)...
        self.waiting = False
        self.head_since = 0.0
        self.idle_since = 0.0
        self.timed_out = False
        # ... and, during a request, the idle limit on data moving in either direction.
        self.idle_limit = 0.0
        self.last_activity = 0.0
        self.idle_expired = False

    @property
    def peer(self) -> str:
        return self.state.peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.state.peer = peer_address(transport)
        self.server.connections.add(self)
        self.head_since = self.idle_since = self.loop.time()  # the first head is due --header-timeout after the handshake
        self.task = self.loop.create_task(self.serve())

    def data_received(self, data: bytes) -> None:
        if not self.keep(data):
            return
        if (
            self.waiting and self.fast is None and self.pending is None and not self.timed_out and not self.finished
            and not self.writing_paused and self.server.fast is not None
        ):
            try:
                if self.server.fast.start_fast(self):
                    return
            except Exception:  # never let a callback error kill the transport: the task takes over
                log.exception("fast path failed to start; the request goes on the general path")
        self.wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)
        if self.fast is not None or self.pending is not None:
            self.server.fast.fast_abandoned(self)  # type: ignore[union-attr]  # a connection has fast/pending state only when the server has a fast path
        self.state.run_close_callbacks()  # the pinned upstream connection goes with its client
        if self.in_request and self.task is not None and not self.task.done():
            self.task.cancel()

    # ---- the connection's life -------------------------------------------------------------
    async def serve(self) -> None:
        server = self.server
        handler = server.handler
        try:
            while True:
                head = await self.read_request_head()
                if head is None:
                    return
                self.in_request = True
                if head is PENDING:
                    keep = await server.fast.resume(self)  # type: ignore[union-attr]  # a connection has fast/pending state only when the server has a fast path
                else:
                    keep = await handler(self.parsed(head), self)
                self.in_request = False
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
            self.finished = True
            self.idle_limit = 0.0
            if self.fast is not None or self.pending is not None:
                self.server.fast.fast_abandoned(self)  # type: ignore[union-attr]  # a connection has fast/pending state only when the server has a fast path
            self.state.run_close_callbacks()
            self.close()

    def refuse(self, problem: HeadProblem) -> None:
        """Answer a request head the bridge will not forward, then close (nothing of it goes upstream)."""
        self.guard.reject(problem.reason)
        log.info("%d for %s: %s", problem.status, self.peer, problem.message)
        if not self.closing:
            self.transport.write(refusal_bytes(problem.status, problem.message))  # type: ignore[union-attr]  # not closing: the transport is there

    async def read_request_head(self) -> bytes | None:
        """The next request head (PENDING for a handed-back exchange), or None when the connection
        should end without an answer."""
        expired = False
        while True:
            if self.pending is not None:
                return PENDING
            if self.finished:
                return None
            if self.fast is None:
                data = self.peek_all()
                if data[:1] in (b"\r", b"\n"):  # empty lines before a request line are ignored (RFC 9112 2.2)
                    self.consume(len(data) - len(data.lstrip(b"\r\n")))
                    continue
                length = self.complete_head(data)
                if length:
                    self.consume(length)
                    self.requests += 1
                    self.head_since = 0.0
                    return data[:length]
                if self.eof:
                    return None
                if expired:
                    if self.head_since:
                        self.guard.reject("header-timeout")
                        log.info("408 for %s: request head not complete within %g s", self.peer, self.guard.header_timeout)
                        if not self.closing:
                            self.transport.write(simple_response(408, "Request Timeout", "The request head did not arrive in time."))  # type: ignore[union-attr]  # not closing: the transport is there
                        return None
                    if not data:
                        return None  # an idle keep-alive connection
                    # (bytes arrived just as the keep-alive deadline fired: a head has begun)
                if data and not self.head_since:
                    self.head_since = self.loop.time()
            elif self.eof:
                return None
            self.timed_out = False
            self.waiting = True
            try:
                await self.wait_for_data()
            finally:
                self.waiting = False
            expired, self.timed_out = self.timed_out, False

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

    def fast_done(self, keep: bool) -> None:
        """The fast path has answered; go on with what the client sent meanwhile (pipelining)."""
        self.fast = None
        self.in_request = False
        self.idle_since = self.loop.time()
        if not keep or self.server.draining:
            self.finished = True
            self.wake()
        elif self.chunks and (self.writing_paused or not self.server.fast.start_fast(self)):  # type: ignore[union-attr]  # a connection has fast/pending state only when the server has a fast path
            self.wake()  # the task takes the next request (after the client has read the answers so far)

    def fast_fallback(self, exchange: Any) -> None:
        """The fast path hands its exchange to the task (an unusual answer, or an error)."""
        self.fast = None
        self.pending = exchange
        self.wake()

    def take_pending(self) -> Any:
        exchange, self.pending = self.pending, None
        return exchange

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
                if self.fast is not None:
                    self.server.fast.fast_expired(self)  # type: ignore[union-attr]  # a connection has fast/pending state only when the server has a fast path
                elif self.task is not None and not self.task.done():
                    self.task.cancel()
        elif self.waiting and self.fast is None:
            if self.head_since:
                due = self.head_since + self.guard.header_timeout
            else:
                due = self.idle_since + self.server.keepalive_timeout
            if now >= due:
                self.timed_out = True
                self.wake()


def refusal_bytes(status: int, message: str) -> bytes:
    reasons = {400: "Bad Request", 405: "Method Not Allowed", 414: "URI Too Long", 431: "Request Header Fields Too Large", 501: "Not Implemented", 505: "HTTP Version Not Supported"}
    return simple_response(status, reasons.get(status, "Error"), message, "X-Content-Type-Options: nosniff", "X-Frame-Options: SAMEORIGIN")


class FrontServer:
    """The HTTPS listener(s), its open connections and the drain on shutdown."""

    def __init__(
        self, handler: Handler, guard: ConnectionGuard, ssl_context: Any, keepalive_timeout: float, drain_timeout: float = 30.0, fast: FastPath | None = None
    ) -> None:
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

    def new_connection(self) -> ClientConnection:
        return ClientConnection(self)

    async def listen(self, host: str | None, port: int, *, sock: Any = None, backlog: int = 1024) -> None:
        """Raises OSError when the port cannot be bound."""
        loop = asyncio.get_running_loop()
        gate = lambda: Gate(self.guard, self.new_connection, self.ssl_context)  # noqa: E731
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
        if busy:
            done, pending = await asyncio.wait(busy, timeout=self.drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
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
