"""The proxy: which requests go through, and how one exchange is relayed.

Each client connection is pinned to its own upstream connection (NTLM authenticates connections);
bodies stream both ways with back-pressure; the origin decides ``100 Continue``; hop-by-hop headers
are dropped and the X-Forwarded ones set; nothing of a request's credentials or content is logged.
Requests arrive parsed and checked by bridge.front; answers are written to the client as bytes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from bridge.config import BridgeConfig, public_origin
from bridge.net.accesslog import ACCESS
from bridge.net.channel import ChannelClosed, ConnectionState
from bridge.net.front import FAST, ClientConnection, Exchange, cached_by_path
from bridge.net.upstream import READ_SIZE, LegacyPool, UpstreamClosedEarly, UpstreamConnection, UpstreamError, UpstreamProtocolError
from bridge.protocol.auth import carries_final_credentials
from bridge.protocol.http1 import (
    CONTINUE,
    HOP_BY_HOP,
    LAST_CHUNK,
    Body,
    ChunkedDecoder,
    ChunkedError,
    HeadRefused,
    RequestHead,
    ResponseHead,
    ResponseRefused,
    client_framing,
    cut_lines,
    encode_chunk,
    interim_response,
    lines_matching,
    local_answer,
    parse_request_head,
    parse_response_head,
    response_body_framing,
    response_has_body,
    response_head_length,
    response_keeps_connection,
    without_lines_named,
)
from bridge.proxy import policy

log = logging.getLogger("bridge.proxy")
access_enabled = ACCESS.enabled
write_access = ACCESS.write

SET_BY_BRIDGE = frozenset({b"x-forwarded-proto", b"x-forwarded-port"})
SECURITY_HEADERS = (("X-Frame-Options", "SAMEORIGIN"), ("X-Content-Type-Options", "nosniff"))
SECURITY_BY_NAME = {name.lower().encode(): f"{name}: {value}".encode() for name, value in SECURITY_HEADERS}
SECURITY_SUFFIX = b"".join(b"\r\n" + line for line in SECURITY_BY_NAME.values())
# Request header names the upstream head treats specially (all others are copied line for line).
REQUEST_SPECIAL = HOP_BY_HOP | SET_BY_BRIDGE | {b"x-forwarded-for", b"host"}
PLAIN_CONNECTION_TOKENS = frozenset({b"close", b"keep-alive"})
LOCATION_LINE = lines_matching({b"location", b"content-location"})
UPSTREAM_KEY = "upstream"
PATH_CACHE_SIZE = 4096
COALESCE_LIMIT = 16 * 1024  # a response up to this size leaves in one write (headers with the body)
RPC_CHANNELS = frozenset({"RPC_IN_DATA", "RPC_OUT_DATA"})  # Outlook Anywhere's long-lived channels


def log_path(request: RequestHead) -> str:
    """The path for logs (bridge.proxy.policy.log_path of the request's target)."""
    return policy.log_path(request.raw_path)


def client_body_error(pump: asyncio.Task | None) -> ChunkedError | None:
    """The client's malformed chunked body, if that is what ended the body pump."""
    if pump is None or not pump.done() or pump.cancelled():
        return None
    error = pump.exception()
    return error if isinstance(error, ChunkedError) else None


class Proxy:
    def __init__(self, config: BridgeConfig, pool: LegacyPool) -> None:
        self.config = config
        self.pool = pool
        self.forward_prefixes = tuple(p.lower() for p in config.forward_paths)
        self.legacy_names = set(config.legacy_hostnames)
        if config.legacy_host_header:
            self.legacy_names.add(config.legacy_host_header.lower())
        self.host_header = config.legacy_host_header.encode("latin-1") if config.legacy_host_header else None
        self.host_line = b"\r\nHost: " + self.host_header if self.host_header else b""
        # The client's header lines the upstream head leaves out or replaces (the Host line only with
        # --legacy-host-header).
        self.request_special_names = REQUEST_SPECIAL if self.host_header else REQUEST_SPECIAL - {b"host"}
        self.set_public_port(config.https_port)
        self._location_names: frozenset[str] = frozenset()
        self._location_pattern: re.Pattern[str] | None = None
        # Operations hooks, set by start_bridge: bridge.bans.BanGuard, bridge.status.BridgeStats, bridge.guard.ConnectionGuard
        self.bans = None
        self.stats = None
        self.guard = None
        self.closed_message: str | None = None  # the migration window has closed (bridge.ops.window): 503 with this
        # What refuse() decided per path: clients repeat a handful of paths (EWS, OWA, the RPC proxy).
        self.path_verdicts: dict[str, tuple[int, str, bool] | None] = {}

    def set_public_port(self, port: int) -> None:
        self.https_port = str(port)
        self.forwarded_lines = b"\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Port: " + self.https_port.encode()
        self.public_origin = public_origin(self.config.fqdn, port)
        # The Host an HTTP/1.1 client of the bridge sends (for HTTP/1.0 requests without one).
        self.public_host_line = b"\r\nHost: " + self.public_origin.removeprefix("https://").encode("ascii")

    @property
    def location_pattern(self) -> re.Pattern[str] | None:
        """Matches an absolute URL on any name the legacy server goes by (configured or in its certificate)."""
        names = frozenset(self.legacy_names | self.pool.certificate_names)
        if names != self._location_names:
            self._location_names = names
            self._location_pattern = _location_pattern(set(names))
        return self._location_pattern

    # ---- entry point (bridge.front calls it for each request head) ------------------------------
    async def handle(self, request: RequestHead, client: ClientConnection) -> bool:
        """Answer one request; True when the client connection may carry another."""
        exchange = Exchange(request)
        stats = self.stats
        if stats is not None:
            stats.begin(request, exchange, client)
        try:
            refusal = self.refuse(request, client)
            if refusal is not None:
                status, message, close = refusal
                keep = not close and request.keep_alive and not request.has_body and not client.server.draining
                return self.answer_locally(request, client, exchange, status, message, keep)
            keep = await self.forward(request, client, exchange)
            self.note_failed_logon(request, client, exchange)
            return keep
        finally:
            if stats is not None:
                stats.end(request, exchange, client)
            self.log_access(request, client, exchange)

    def note_failed_logon(self, request: RequestHead, client: ClientConnection, exchange: Exchange) -> None:
        """An upstream 401 to Basic or to a final NTLM/Negotiate message counts towards a ban."""
        if exchange.status == 401 and self.bans is not None and carries_final_credentials(request.header("Authorization")):
            self.bans.record_failure(client.peer)

    # ---- what may pass ---------------------------------------------------------------------
    def refuse(self, request: RequestHead, client: ClientConnection) -> tuple[int, str, bool] | None:
        """(status, message, close) for requests that must not reach the legacy server, else None."""
        if self.closed_message is not None:
            return 503, self.closed_message, True
        if self.bans is not None and self.bans.is_banned(client.peer):
            return 403, "Forbidden: too many failed logons from this address; try again later.", True
        return self.cached_path_verdict(request.raw_path)

    def cached_path_verdict(self, target: str) -> tuple[int, str, bool] | None:
        return cached_by_path(self.path_verdicts, target, self.path_verdict, PATH_CACHE_SIZE)

    def path_verdict(self, path: str) -> tuple[int, str, bool] | None:
        return policy.path_verdict(path, self.forward_prefixes)

    def is_forwarded(self, path: str) -> bool:
        return policy.is_forwarded(path, self.forward_prefixes)

    def answer_locally(self, request: RequestHead, client: ClientConnection, exchange: Exchange, status: int, message: str, keep: bool) -> bool:
        """The bridge's own short answer; a request body it did not read ends the connection."""
        exchange.status = status
        exchange.answered = True
        if not client.closing:
            client.write(local_answer(status, message, keep_alive=keep, version=request.version, with_body=request.method != "HEAD"))
        return keep

    # ---- relaying ------------------------------------------------------------------------------
    async def forward(self, request: RequestHead, client: ClientConnection, exchange: Exchange) -> bool:
        try:
            upstream = client.state.data.get(UPSTREAM_KEY)
            if upstream is None or not upstream.usable:
                upstream = await self.pinned_upstream(client.state)
        except UpstreamError as exc:
            log.error("502 for %s %s: %s", request.method, log_path(request), exc)
            keep = request.keep_alive and not request.has_body and not client.server.draining
            return self.answer_locally(request, client, exchange, 502, f"The bridge could not reach the Exchange server: {exc}.", keep)
        exchange.upstream = upstream.name
        exchange.body_done = not request.has_body
        client.watch_idle(self.config.idle_timeout)
        return await self.relay(request, client, upstream, exchange, self.request_head(request, client.peer))

    async def relay(self, request: RequestHead, client: ClientConnection, upstream: UpstreamConnection, exchange: Exchange, head_bytes: bytes | None) -> bool:
        """Everything after the upstream connection is chosen: the request (its head unless
        ``head_bytes`` is None, i.e. already sent), interim answers, the response, the body pump."""
        pump: asyncio.Task | None = None
        has_body = request.has_body
        try:
            if head_bytes is not None:
                upstream.write(head_bytes)
            expects_continue = request.expect_continue and has_body
            if expects_continue and b"expect" in request.connection_tokens:
                # Connection names Expect: the expectation is the bridge's (Expect never reaches the
                # origin, which will send no 100), so the bridge answers it and the body flows at once.
                expects_continue = False
                if request.version >= (1, 1):
                    client.write(CONTINUE)
            exchange.body_withheld = expects_continue
            if has_body and not expects_continue:
                pump = self.start_pump(request, client, upstream, exchange)
            head = await upstream.read_head()
            while head.status < 200:
                try:
                    interim = interim_response(head, request.version)  # (a 101 raises: no tunnel is relayed)
                except ResponseRefused as exc:
                    raise UpstreamProtocolError(f"the legacy server {upstream.server} {exc}") from None
                if interim:  # (HTTP/1.0 clients never get 1xx, RFC 9110 15.2)
                    client.write(interim)
                    exchange.body_withheld = exchange.body_withheld and head.status != 100
                client.touch()
                if head.status == 100 and pump is None and has_body:
                    pump = self.start_pump(request, client, upstream, exchange)
                head = await upstream.read_head()
            if pump is None and has_body:
                # A final answer without 100 Continue: whatever the client sends as the body goes
                # on to the origin too, so both legs keep the same framing.
                pump = self.start_pump(request, client, upstream, exchange)
            keep = await self.relay_response(request, client, upstream, head, exchange)
            if pump is not None:
                if upstream.reusable:
                    await pump  # the origin keeps the connection: it reads the rest of the body
                elif not exchange.body_done:
                    # The origin answered early and ends the connection: the rest of the body has
                    # nowhere to go, and the client connection ends after the answer.
                    keep = False
            return keep
        except asyncio.CancelledError:
            upstream.close()
            if client.idle_expired:
                log.warning("%s %s: no data moved for %g s, closing both legs", request.method, log_path(request), self.config.idle_timeout)
                return self.abort_exchange(client, exchange, 504, "The Exchange server did not answer in time.")
            raise
        except ChunkedError as exc:
            return self.malformed_client_body(request, client, upstream, exchange, exc)
        except UpstreamError as exc:
            upstream.close()
            body_error = client_body_error(pump)
            if body_error is not None:  # the pump closed the upstream leg over the client's body
                return self.malformed_client_body(request, client, upstream, exchange, body_error)
            if exchange.answered and isinstance(exc, UpstreamClosedEarly) and request.method in RPC_CHANNELS:
                # How an RPC channel ends (its Content-Length is a placeholder): the session is over.
                log.info("%s %s: the legacy server ended the channel (%d bytes short of its placeholder length)", request.method, log_path(request), exc.remaining)
                client.close()  # (what was relayed still reaches the client)
                return False
            if exchange.answered:
                log.error("%s %s: %s; the answer was cut off", request.method, log_path(request), exc)
            else:
                log.error("502 for %s %s: %s", request.method, log_path(request), exc)
            return self.abort_exchange(client, exchange, 502, f"The bridge lost the Exchange server: {exc}.")
        except (ConnectionError, OSError) as exc:
            upstream.close()
            log.info("%s %s: client connection ended (%s)", request.method, log_path(request), type(exc).__name__)
            return self.abort_exchange(client, exchange, 502, "The connection ended during the request.")
        except BaseException:
            upstream.close()  # never leave an upstream connection open behind an unexpected error
            raise
        finally:
            client.watch_idle(0)
            if pump is not None and not pump.done():
                pump.cancel()

    def malformed_client_body(self, request: RequestHead, client: ClientConnection, upstream: UpstreamConnection, exchange: Exchange, exc: ChunkedError) -> bool:
        """The client's chunked body broke the rules: nothing more of it went upstream; a 400 when no
        answer has started, and both legs end."""
        upstream.close()
        log.info("%s %s: the client's chunked body is malformed (%s), closing both legs", request.method, log_path(request), exc)
        if exchange.answered:
            client.abort()
            return False
        exchange.status = 400
        exchange.answered = True
        if not client.closing:
            client.write(local_answer(400, "The request body is malformed (chunked transfer coding)."))
        return False

    # ---- the fast path: a simple exchange in transport callbacks, no task switch ----------------
    # Most requests are small and plain: no body, an open pinned upstream connection, a short
    # answer with a Content-Length. For them the head goes upstream from the client's
    # data_received and the answer goes back from the upstream's, which spares the connection's
    # task two wake-ups and the coroutine layers per request. Anything else (1xx, chunked or large
    # bodies, errors, a lost leg) is handed to the task, which goes on with relay(). The client
    # connection's phase (FAST, HANDED_BACK) and its ``exchange`` are bridge.net.front's: this side
    # moves them only through the connection's methods.

    def start_fast(self, client: ClientConnection) -> bool:
        """Relay the buffered request head on the fast path if it qualifies; False leaves it to the task."""
        data = client.peek_all()
        try:
            end = data.find(b"\r\n\r\n") if not client.scanned else -1  # (the usual case: a whole head in one read)
            length = end + 4 if end >= 0 else client.complete_head(data)
            if not length:
                return False
            head = data if length == len(data) else data[:length]
            request = parse_request_head(head)
        except HeadRefused:
            return False  # the task answers it
        if not self.qualifies_for_fast(request, client):
            client.decline(head, request)  # the task takes it without parsing it again
            return False
        upstream = client.state.data[UPSTREAM_KEY]
        exchange = Exchange(request, upstream)
        if self.stats is not None:
            self.stats.begin(request, exchange, client)
        client.begin_fast(length, exchange, self.config.idle_timeout)
        channel = upstream.channel
        channel.on_data = client.fast_data_callback()
        try:
            channel.write(self.request_head(request, client.peer))
        except ChannelClosed:
            self.fall_back(client)
        return True

    def qualifies_for_fast(self, request: RequestHead, client: ClientConnection) -> bool:
        if request.chunked or request.content_length or request.expect_continue or client.server.draining:
            return False
        upstream = client.state.data.get(UPSTREAM_KEY)
        if upstream is None or not upstream.usable or upstream.channel.chunks:
            return False
        # Refused or possibly banned requests are the task's to answer (and count).
        bans = self.bans
        return (bans is None or not bans.has_bans()) and self.closed_message is None and self.cached_path_verdict(request.raw_path) is None

    def continue_fast(self, client: ClientConnection) -> None:
        """Upstream data for a fast exchange: answer once the whole (small) response is here."""
        if client.phase is not FAST:
            return
        try:
            self.answer_fast(client)
        except Exception:  # never let a callback error kill a transport
            log.exception("fast path failed")
            exchange = client.exchange
            if client.phase is not FAST or exchange is None:
                return
            if exchange.answered:
                self.end_fast(client, False)  # the answer is out: end the connection, never answer twice
            else:
                self.fall_back(client)  # the task answers

    def answer_fast(self, client: ClientConnection) -> None:
        exchange: Exchange = client.exchange  # type: ignore[assignment]  # FAST: the connection has its exchange
        request = exchange.request
        upstream: UpstreamConnection = exchange.connection  # type: ignore[assignment]  # a fast exchange has its connection
        client.touch()  # upstream bytes count as activity for --idle-timeout
        channel = upstream.channel
        data = channel.peek_all()
        try:
            end = response_head_length(data)
            if not end:
                if channel.eof:
                    self.fall_back(client)
                return
            head = parse_response_head(data if end == len(data) else data[:end])
        except ResponseRefused:
            self.fall_back(client)  # the task says why, in a 502
            return
        length = head.content_length
        has_body = response_has_body(request.method, head.status)
        if head.status < 200 or (has_body and (length is None or length > COALESCE_LIMIT)):
            self.fall_back(client)
            return
        total = end + (length if has_body and length else 0)
        if len(data) < total:
            if channel.eof:
                self.fall_back(client)
            return
        channel.consume(total)
        keep = response_keeps_connection(head) and upstream.reusable
        if not keep:
            upstream.reusable = False
        keep = keep and request.keep_alive and not client.server.draining
        exchange.status = head.status
        exchange.bytes_out = total - end
        exchange.answered = True
        if not client.closing:
            client.write(self.response_head(request, head, length, False, keep) + data[end:total])
        if not upstream.reusable:
            upstream.close()
        self.end_fast(client, keep)

    def end_fast(self, client: ClientConnection, keep: bool) -> None:
        exchange: Exchange = client.exchange  # type: ignore[assignment]  # FAST: the connection has its exchange
        request = exchange.request
        exchange.connection.channel.on_data = None  # type: ignore[union-attr]  # a fast exchange has its connection
        if exchange.status == 401:
            try:
                self.note_failed_logon(request, client, exchange)
            except Exception:  # the answer is out; a failing ban hook must not touch the exchange
                log.exception("recording a failed logon failed")
        if self.stats is not None:
            self.stats.end(request, exchange, client)
        if access_enabled():
            self.log_access(request, client, exchange)
        client.end_fast(keep)

    def fall_back(self, client: ClientConnection) -> None:
        """Hand the fast exchange to the connection's task (resume() goes on with relay())."""
        client.exchange.connection.channel.on_data = None  # type: ignore[union-attr]  # FAST: the connection has its exchange
        client.fall_back()

    async def resume(self, client: ClientConnection, exchange: Exchange) -> bool:
        request = exchange.request
        upstream = exchange.connection
        assert upstream is not None  # a fast exchange has its connection
        try:
            keep = await self.relay(request, client, upstream, exchange, None)
            self.note_failed_logon(request, client, exchange)
            return keep
        finally:
            if self.stats is not None:
                self.stats.end(request, exchange, client)
            self.log_access(request, client, exchange)

    def fast_expired(self, client: ClientConnection) -> None:
        """--idle-timeout ran out while the legacy server had not answered a fast exchange."""
        exchange: Exchange = client.exchange  # type: ignore[assignment]  # FAST: the connection has its exchange
        assert exchange.connection is not None  # a fast exchange has its connection
        exchange.connection.close()
        log.warning("%s %s: no data moved for %g s, closing both legs", exchange.request.method, log_path(exchange.request), self.config.idle_timeout)
        self.abort_exchange(client, exchange, 504, "The Exchange server did not answer in time.")
        self.end_fast(client, False)

    def fast_abandoned(self, client: ClientConnection, exchange: Exchange) -> None:
        """The client connection ended with a fast exchange in flight or handed back but not resumed."""
        upstream = exchange.connection
        assert upstream is not None  # a fast exchange has its connection
        upstream.channel.on_data = None
        upstream.close()
        client.watch_idle(0)
        if self.stats is not None:
            self.stats.end(exchange.request, exchange, client)
        self.log_access(exchange.request, client, exchange)

    def start_pump(self, request: RequestHead, client: ClientConnection, upstream: UpstreamConnection, exchange: Exchange) -> asyncio.Task:
        pump = asyncio.ensure_future(self.pump_request_body(request, client, upstream, exchange))

        def on_done(task: asyncio.Task) -> None:
            # A body that cannot be delivered leaves the origin waiting: closing the upstream makes
            # the response read fail at once instead of at the idle timeout.
            if not task.cancelled() and task.exception() is not None:
                upstream.close()

        pump.add_done_callback(on_done)
        return pump

    async def pinned_upstream(self, state: ConnectionState) -> UpstreamConnection:
        """The client connection's own upstream connection; a new one only if it has none usable."""
        upstream: UpstreamConnection | None = state.data.get(UPSTREAM_KEY)
        if upstream is not None and upstream.usable:
            return upstream
        replacing = upstream is not None
        if upstream is not None:
            upstream.close()
        upstream = await self.pool.connect()
        if replacing:
            # The connection the client authenticated on is gone: answer on a new one, then end the
            # client connection so the client re-authenticates instead of trusting a stale logon.
            upstream.reusable = False
        if state.closed:  # the client left while the connection was being made
            upstream.close()
            raise UpstreamError("the client connection closed while the bridge connected to the Exchange server")
        state.data[UPSTREAM_KEY] = upstream
        state.on_close(upstream.close)
        return upstream

    def request_head(self, request: RequestHead, peer: str) -> bytes:
        """The upstream request head: exactly the client's header lines less hop-by-hop, plus X-Forwarded-*."""
        block = request.block
        pieces = []
        forwarded_for: bytes | None = None
        position = 0
        special = self.request_special_names
        for name, start, end in request.fields:
            if name not in special:
                continue  # end to end (Content-Length, Expect; Host without --legacy-host-header)
            pieces.append(block[position:start])
            position = end
            if name == b"host":
                pieces.append(self.host_line)  # --legacy-host-header
            elif name == b"x-forwarded-for":
                value = block[start + 18 : end].strip(b" \t")  # after CRLF "x-forwarded-for:"
                if value:
                    forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            # (anything else: hop-by-hop or set by the bridge: dropped)
        if position:
            pieces.append(block[position:])
            block = b"".join(pieces)
        tokens = request.connection_tokens
        if tokens and not tokens <= PLAIN_CONNECTION_TOKENS:  # the client's Connection names other headers too
            block = without_lines_named(block, tokens - PLAIN_CONNECTION_TOKENS - special)
        if request.version < (1, 1) and not any(field[0] == b"host" for field in request.fields):
            # An HTTP/1.0 request may come without Host; the upstream request is HTTP/1.1, which needs
            # one (IIS answers 400 Invalid Hostname): the one an HTTP/1.1 client would have sent.
            block += self.host_line or self.public_host_line
        address = (peer or "unknown").encode()
        forwarded = b"\r\nX-Forwarded-For: " + (forwarded_for + b", " + address if forwarded_for else address)
        framing = b"\r\nTransfer-Encoding: chunked" if request.chunked else b""
        return b"".join((request.request_line, block, forwarded, self.forwarded_lines, framing, b"\r\n\r\n"))

    async def pump_request_body(self, request: RequestHead, client: ClientConnection, upstream: UpstreamConnection, exchange: Exchange) -> None:
        """Copy the client's body to the origin piece by piece, as it arrives (never buffered). A
        chunked body goes through the strict ChunkedDecoder: a malformed one raises ChunkedError
        before any byte of the offending piece is written upstream."""
        touch = client.touch
        write = upstream.write
        channel = upstream.channel
        read_some = client.read_some
        if request.chunked:
            decoder = ChunkedDecoder()
            feed = decoder.feed
            while not decoder.done:
                data = await read_some(READ_SIZE)
                if not data:
                    upstream.reusable = False  # client left mid-body; the origin would wait for the rest
                    raise ConnectionResetError("the client ended the connection inside a chunked body")
                touch()
                pieces = feed(data)
                for piece in pieces:
                    exchange.bytes_in += len(piece)
                    write(encode_chunk(piece))  # one copy of the piece, one TLS record
                if channel.writing_paused:
                    await upstream.drain()
                touch()
            write(LAST_CHUNK)
            if decoder.leftover:
                client.unread(decoder.leftover)  # the next request (pipelined)
            exchange.body_done = True
            return
        remaining = request.content_length or 0
        # The migration view reads an RPC channel's first RTS PDU (its cookie) as the body passes.
        observe = self.stats.body_observer(exchange) if self.stats is not None else None
        while remaining:
            data = await read_some(min(remaining, READ_SIZE))
            if not data:
                upstream.reusable = False  # client left mid-body; the origin would wait for the rest
                return
            remaining -= len(data)
            touch()
            exchange.bytes_in += len(data)
            write(data)
            if observe is not None and not observe(data):
                observe = None
            if channel.writing_paused:
                await upstream.drain()
            touch()
        exchange.body_done = True

    async def relay_response(self, request: RequestHead, client: ClientConnection, upstream: UpstreamConnection, head: ResponseHead, exchange: Exchange) -> bool:
        origin = response_body_framing(request.method, head)
        kind = origin.kind
        if head.codings and kind is not Body.NONE and head.codings != b"chunked":
            # A transfer coding other than chunked (e.g. gzip, alone and running to the close, or
            # under chunked): no client asked for one (TE is hop-by-hop and never reaches the
            # origin), an HTTP/1.0 client could not take one, and decoding it is not the bridge's
            # business: refused as a protocol error rather than relayed as if it were plain.
            raise UpstreamProtocolError(f"the legacy server {upstream.server} sent Transfer-Encoding: {head.codings.decode('latin-1')[:40]}, which the bridge does not relay")
        framing = client_framing(origin, request.version)
        chunked_out = framing.kind is Body.CHUNKED
        length = head.content_length
        keep = response_keeps_connection(head) and upstream.reusable
        if not keep or framing.kind is Body.UNTIL_CLOSE:
            # The origin ends this connection: end the client's too, so it re-authenticates.
            upstream.reusable = False
            keep = False
        keep = keep and request.keep_alive and not client.server.draining
        head_bytes = self.response_head(request, head, length, chunked_out, keep)
        exchange.status = head.status
        touch = client.touch
        if kind is Body.LENGTH and 0 < origin.length <= COALESCE_LIMIT:
            # Wait for the (small) body so that headers and body leave in one TLS record and one send.
            body = await upstream.read_small_body(origin.length)
            exchange.bytes_out += origin.length
            touch()
            client.write(head_bytes + body)
            exchange.answered = True
        else:
            pieces = upstream.body(origin)
            first = b""
            if kind is Body.CHUNKED:
                # The first piece before the head: a body malformed from its first line is a 502
                # (not a cut connection), and the head leaves with the first piece.
                first = await anext(pieces, b"")
                exchange.bytes_out += len(first)
                touch()
            if first and len(first) <= COALESCE_LIMIT:
                client.write(head_bytes + (encode_chunk(first) if chunked_out else first))
            else:
                client.write(head_bytes)
                if first:
                    client.write(encode_chunk(first) if chunked_out else first)
            exchange.answered = True
            write = client.write
            async for data in pieces:
                touch()
                exchange.bytes_out += len(data)
                write(encode_chunk(data) if chunked_out else data)
                if client.writing_paused:
                    await client.drain()
                touch()
            if chunked_out:
                write(LAST_CHUNK)
        if not upstream.reusable:
            upstream.close()
        return keep

    def response_head(self, request: RequestHead, head: ResponseHead, length: int | None, chunked_out: bool, keep: bool) -> bytes:
        """The client's response head: the origin's header lines less hop-by-hop, Location rewritten."""
        block = head.block
        if head.fields:
            block, rewritten = cut_lines(block, head.fields)
        else:
            rewritten = ()
        tokens = head.connection_tokens
        if tokens and not tokens <= PLAIN_CONNECTION_TOKENS:  # headers the origin marked hop-by-hop (RFC 9110 7.6.1)
            named = tokens - PLAIN_CONNECTION_TOKENS
            block = without_lines_named(block, named)
            rewritten = tuple(name for name in rewritten if name not in named)  # (a dropped security header is added back)
        if b"location" in rewritten or b"content-location" in rewritten:
            block = LOCATION_LINE.sub(self.rewrite_location, block)
        if length is not None:
            framing = b"\r\nContent-Length: %d" % length
        else:
            framing = b"\r\nTransfer-Encoding: chunked" if chunked_out else b""
        if request.version >= (1, 1):
            connection = b"" if keep else b"\r\nConnection: close"
        else:
            connection = b"\r\nConnection: keep-alive" if keep else b""
        if b"x-frame-options" in rewritten or b"x-content-type-options" in rewritten:
            security = b"".join(b"\r\n" + line for name, line in SECURITY_BY_NAME.items() if name not in rewritten)
        else:
            security = SECURITY_SUFFIX
        return b"HTTP/1.%d %d %s%s%s%s%s\r\n\r\n" % (request.version[1], head.status, head.reason, block, framing, connection, security)

    def rewrite_location(self, match: re.Match[bytes]) -> bytes:
        line = match.group(0)
        pattern = self.location_pattern
        if pattern is None:
            return line
        return pattern.sub(self.public_origin, line.decode("latin-1")).encode("latin-1")

    def abort_exchange(self, client: ClientConnection, exchange: Exchange, status: int, message: str) -> bool:
        """Answer with an error if nothing was sent yet and the client has sent its whole body;
        otherwise cut the client connection (a client still sending could not read the answer)."""
        if not exchange.answered and (exchange.body_done or exchange.body_withheld):
            exchange.status = status
            exchange.answered = True
            if not client.closing:
                client.write(local_answer(status, message))
            return False
        client.abort()
        if not exchange.answered:
            exchange.status = status
        return False

    def log_access(self, request: RequestHead, client: ClientConnection, exchange: Exchange) -> None:
        """The request's access-log line (bridge.net.accesslog: formatted here, written in batches)."""
        if not access_enabled():
            return
        write_access(
            f"{client.state.peer or '-'} {request.method} {policy.log_path(request.raw_path)} {exchange.status} in={exchange.bytes_in} out={exchange.bytes_out} "
            f"{time.monotonic() - exchange.started:.3f}s upstream={exchange.upstream}"
        )


def _location_pattern(names: set[str]) -> re.Pattern[str] | None:
    if not names:
        return None
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.compile(rf"\bhttps?://(?:{alternatives})(?::\d+)?(?=[/?#&]|$)", re.IGNORECASE)
