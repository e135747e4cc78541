"""The front end's request handling: which paths go through, and how one exchange is relayed.

Each client connection is pinned to its own upstream connection (NTLM authenticates connections);
bodies stream both ways with back-pressure; the origin decides ``100 Continue``; hop-by-hop headers
are dropped and the X-Forwarded ones set; nothing of a request's credentials or content is logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from urllib.parse import unquote

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_request import BaseRequest

from bridge.bans import carries_final_credentials
from bridge.config import BridgeConfig
from bridge.guard import check_request_head
from bridge.http_server import ConnectionState, connection_state
from bridge.upstream import (
    LegacyPool,
    ResponseHead,
    UpstreamConnection,
    UpstreamError,
    response_has_body,
    response_keeps_connection,
)

log = logging.getLogger("bridge.proxy")
access_log = logging.getLogger("bridge.access")

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "proxy-authorization", "proxy-authenticate"}
)
SET_BY_BRIDGE = frozenset({"x-forwarded-proto", "x-forwarded-port"})
SECURITY_HEADERS = (("X-Frame-Options", "SAMEORIGIN"), ("X-Content-Type-Options", "nosniff"))
UPSTREAM_KEY = "upstream"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
COALESCE_LIMIT = 16 * 1024  # a response up to this size leaves in one write (headers with the body)



class ClientBodyFaultFilter(logging.Filter):
    """aiohttp reads what is left of a request body after the handler returns; a malformed body from
    the client then surfaces there as an "Unhandled exception" traceback. The bridge has already
    logged it in one line and closed both legs, so the traceback is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (RequestPayloadError, HttpProcessingError))


logging.getLogger("aiohttp.server").addFilter(ClientBodyFaultFilter())

class IdleTimer:
    """Cancels a task when neither direction has moved a byte for ``idle`` seconds.

    Activity is one float store per chunk (``touch``); the timer re-arms itself lazily instead of
    being rescheduled on every chunk, which keeps the per-chunk cost negligible.
    """

    def __init__(self, idle: float, task: asyncio.Task) -> None:
        self.idle = idle
        self.task = task
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.expired = False
        self._handle = self.loop.call_at(self.last + idle, self._check)

    def touch(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        due = self.last + self.idle
        if self.loop.time() < due:
            self._handle = self.loop.call_at(due, self._check)
            return
        self.expired = True
        self.task.cancel()

    def cancel(self) -> None:
        self._handle.cancel()


@dataclass
class Exchange:
    """What the access log says about one request."""

    started: float = field(default_factory=time.monotonic)
    bytes_in: int = 0
    bytes_out: int = 0
    status: int = 0
    upstream: str = "-"
    response: web.StreamResponse | None = None  # set once headers went to the client
    body_withheld: bool = False  # the client waits for 100 Continue before sending its body


class Proxy:
    def __init__(self, config: BridgeConfig, pool: LegacyPool) -> None:
        self.config = config
        self.pool = pool
        self.forward_prefixes = tuple(p.lower() for p in config.forward_paths)
        self.legacy_names = set(config.legacy_hostnames)
        if config.legacy_host_header:
            self.legacy_names.add(config.legacy_host_header.lower())
        self.https_port = str(config.https_port)
        self.set_public_port(config.https_port)
        self._location_names: frozenset[str] = frozenset()
        self._location_pattern: re.Pattern[str] | None = None
        # Operations hooks, set by start_bridge: bridge.bans.BanGuard, bridge.status.BridgeStats, bridge.guard.ConnectionGuard
        self.bans = None
        self.stats = None
        self.guard = None

    def set_public_port(self, port: int) -> None:
        self.https_port = str(port)
        self.public_origin = f"https://{self.config.fqdn}" + ("" if port == 443 else f":{port}")

    @property
    def location_pattern(self) -> re.Pattern[str] | None:
        """Matches an absolute URL on any name the legacy server goes by (configured or in its certificate)."""
        names = frozenset(self.legacy_names | self.pool.certificate_names)
        if names != self._location_names:
            self._location_names = names
            self._location_pattern = _location_pattern(set(names))
        return self._location_pattern

    # ---- entry point -------------------------------------------------------------------------
    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        exchange = Exchange()
        stats = self.stats
        if stats is not None:
            stats.begin(request, exchange)
        try:
            refusal = self.refuse(request)
            if refusal:
                exchange.status = refusal.status
                return refusal
            response = await self.forward(request, exchange)
            self.note_failed_logon(request, exchange)
            return response
        finally:
            if stats is not None:
                stats.end(request, exchange)
            self.log_access(request, exchange)

    def note_failed_logon(self, request: BaseRequest, exchange: Exchange) -> None:
        """An upstream 401 to Basic or to a final NTLM/Negotiate message counts towards a ban."""
        if exchange.status == 401 and self.bans is not None and carries_final_credentials(request.headers.get("Authorization")):
            self.bans.record_failure(connection_state(request).peer)

    # ---- what may pass ---------------------------------------------------------------------
    def refuse(self, request: BaseRequest) -> web.Response | None:
        """A local answer for requests that must not reach the legacy server, else None."""
        if self.bans is not None and self.bans.is_banned(connection_state(request).peer):
            response = local_response(403, "Forbidden: too many failed logons from this address; try again later.")
            response.force_close()
            return response
        problem = check_request_head(request)
        if problem is not None:
            if self.guard is not None:
                self.guard.reject(problem.reason)
            log.info("%d for %s: %s", problem.status, connection_state(request).peer, problem.message)
            response = local_response(problem.status, problem.message)
            response.force_close()
            return response
        target = request.raw_path
        if not target.startswith("/"):
            return local_response(400, "The request target must be a path (absolute-form and authority-form are not accepted).")
        path = target.split("?", 1)[0]
        decoded = unquote(path)
        if not is_clean_path(decoded) or "%" in decoded:
            return local_response(400, "The request path contains dot-segments, backslashes or double encoding, which the bridge does not forward.")
        if not self.is_forwarded(decoded):
            return local_response(404, "Not found: the bridge forwards only Exchange virtual directories.")
        return None

    def is_forwarded(self, path: str) -> bool:
        lowered = path.lower()
        return any(lowered == prefix or lowered.startswith(prefix + "/") for prefix in self.forward_prefixes)

    # ---- relaying ------------------------------------------------------------------------------
    async def forward(self, request: BaseRequest, exchange: Exchange) -> web.StreamResponse:
        state = connection_state(request)
        try:
            upstream = await self.pinned_upstream(state)
        except UpstreamError as exc:
            log.error("502 for %s %s: %s", request.method, log_path(request), exc)
            exchange.status = 502
            return local_response(502, f"The bridge could not reach the Exchange server: {exc}.")
        exchange.upstream = str(upstream.server)
        timer = IdleTimer(self.config.idle_timeout, asyncio.current_task())  # type: ignore[arg-type]
        pump: asyncio.Task | None = None
        try:
            head_bytes, body_kind = self.request_head(request)
            await upstream.write(head_bytes)
            expects_continue = request.headers.get("Expect", "").lower() == "100-continue" and body_kind != "none"
            exchange.body_withheld = expects_continue
            if body_kind != "none" and not expects_continue:
                pump = self.start_pump(request, upstream, body_kind, timer, exchange)
            head = await upstream.read_head()
            while 100 <= head.status < 200:
                if head.status == 101:
                    raise UpstreamError("the legacy server tried to switch protocols, which the bridge does not relay")
                if request.version >= HttpVersion11:  # HTTP/1.0 clients never get 1xx (RFC 9110 15.2)
                    await request.writer.write(CONTINUE if head.status == 100 else _interim_bytes(head))
                    exchange.body_withheld = exchange.body_withheld and head.status != 100
                timer.touch()
                if head.status == 100 and pump is None and body_kind != "none":
                    pump = self.start_pump(request, upstream, body_kind, timer, exchange)
                head = await upstream.read_head()
            if pump is None and body_kind != "none":
                # A final answer without 100 Continue: whatever the client sends as the body goes
                # on to the origin too, so both legs keep the same framing.
                pump = self.start_pump(request, upstream, body_kind, timer, exchange)
            response = await self.relay_response(request, upstream, head, timer, exchange)
            if pump is not None and upstream.reusable:
                await pump  # the origin keeps the connection: it reads the rest of the body
            # Otherwise the origin answered early and ends the connection: the rest of the body has
            # nowhere to go; the pump is cancelled and the client connection closes after the answer.
            return response
        except asyncio.CancelledError:
            if timer.expired:
                upstream.close()
                log.warning("%s %s: no data moved for %g s, closing both legs", request.method, log_path(request), self.config.idle_timeout)
                return self.abort_exchange(request, exchange, 504, "The Exchange server did not answer in time.")
            upstream.close()
            raise
        except UpstreamError as exc:
            upstream.close()
            log.error("502 for %s %s: %s", request.method, log_path(request), exc)
            return self.abort_exchange(request, exchange, 502, f"The bridge lost the Exchange server: {exc}.")
        except (ConnectionError, OSError) as exc:
            upstream.close()
            log.info("%s %s: client connection ended (%s)", request.method, log_path(request), type(exc).__name__)
            return self.abort_exchange(request, exchange, 502, "The connection ended during the request.")
        except (HttpProcessingError, RequestPayloadError) as exc:
            upstream.close()
            log.info("%s %s: the client's body was malformed (%s), closing both legs", request.method, log_path(request), type(exc).__name__)
            return self.abort_exchange(request, exchange, 400, "The request body is malformed.")
        except BaseException:
            upstream.close()  # never leave an upstream connection open behind an unexpected error
            raise
        finally:
            timer.cancel()
            if pump is not None and not pump.done():
                pump.cancel()

    def start_pump(self, request: BaseRequest, upstream: UpstreamConnection, body_kind: str, timer: IdleTimer, exchange: Exchange) -> asyncio.Task:
        pump = asyncio.ensure_future(self.pump_request_body(request, upstream, body_kind, timer, exchange))

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
        if replacing:
            upstream.close()
        upstream = await self.pool.connect()
        if replacing:
            # The connection the client authenticated on is gone: answer on a new one, then end the
            # client connection so the client re-authenticates instead of trusting a stale logon.
            upstream.reusable = False
        state.data[UPSTREAM_KEY] = upstream
        state.on_close(upstream.close)
        return upstream

    def request_head(self, request: BaseRequest) -> tuple[bytes, str]:
        """The upstream request head (exactly the client's headers, less hop-by-hop) and body kind."""
        connection_tokens = {
            token.strip().lower() for value in request.headers.getall("Connection", []) for token in value.split(",")
        }
        drop = HOP_BY_HOP | SET_BY_BRIDGE | connection_tokens
        lines = [f"{request.method} {request.raw_path} HTTP/1.1".encode("latin-1")]
        forwarded_for: bytes | None = None
        host_header = self.config.legacy_host_header
        for raw_name, raw_value in request.raw_headers:
            name = raw_name.decode("latin-1").lower()
            if name in drop:
                continue
            if name == "x-forwarded-for":
                forwarded_for = raw_value if forwarded_for is None else forwarded_for + b", " + raw_value
                continue
            if name == "host" and host_header:
                raw_value = host_header.encode("latin-1")
            lines.append(raw_name + b": " + raw_value)
        peer = (connection_state(request).peer or "unknown").encode()
        lines.append(b"X-Forwarded-For: " + (forwarded_for + b", " + peer if forwarded_for else peer))
        lines.append(b"X-Forwarded-Proto: https")
        lines.append(b"X-Forwarded-Port: " + self.https_port.encode())
        body_kind = "none"
        if request.headers.get("Transfer-Encoding", "").lower().endswith("chunked"):
            lines.append(b"Transfer-Encoding: chunked")
            body_kind = "chunked"
        elif request.content_length:
            body_kind = "length"
        return b"\r\n".join(lines) + b"\r\n\r\n", body_kind

    async def pump_request_body(
        self, request: BaseRequest, upstream: UpstreamConnection, body_kind: str, timer: IdleTimer, exchange: Exchange
    ) -> None:
        """Copy the client's body to the origin chunk by chunk, as it arrives (never buffered)."""
        content = request.content
        write = upstream.writer.write
        drain = upstream.writer.drain
        chunked = body_kind == "chunked"
        while True:
            data = await content.readany()
            if not data:
                break
            timer.touch()
            exchange.bytes_in += len(data)
            if chunked:
                write(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))  # one copy of the chunk, one TLS record
            else:
                write(data)
            await drain()
            timer.touch()
        if chunked:
            write(b"0\r\n\r\n")
            await drain()
        if request.content_length and exchange.bytes_in < request.content_length:
            upstream.reusable = False  # client left mid-body; the origin would wait for the rest

    async def relay_response(
        self, request: BaseRequest, upstream: UpstreamConnection, head: ResponseHead, timer: IdleTimer, exchange: Exchange
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=head.status, reason=head.reason or None)
        self.copy_response_headers(head, response)
        length = head.content_length
        has_body = response_has_body(request.method, head.status)
        if length is not None:
            response.content_length = length
        elif has_body and head.chunked and request.version >= HttpVersion11:
            response.enable_chunked_encoding()
        delimited_by_close = has_body and length is None and not (head.chunked and request.version >= HttpVersion11)
        keep = response_keeps_connection(head) and upstream.reusable
        if not keep or delimited_by_close:
            # The origin ends this connection: end the client's too, so it re-authenticates.
            upstream.reusable = False
            response.force_close()
        exchange.status = head.status
        if length is not None and length <= COALESCE_LIMIT:
            # aiohttp (>= 3.12) then holds the headers until the first body bytes: a small response
            # costs one TLS record and one send instead of two. Larger ones get their headers at once.
            response._send_headers_immediately = False
        await response.prepare(request)
        exchange.response = response
        write = response.write
        async for data in upstream.body(head, request.method):
            timer.touch()
            exchange.bytes_out += len(data)
            await write(data)
            timer.touch()
        await response.write_eof()
        if not upstream.reusable:
            upstream.close()
        return response

    def copy_response_headers(self, head: ResponseHead, response: web.StreamResponse) -> None:
        connection_tokens = {t.strip().lower() for v in head.get_all("Connection") for t in v.split(",")}
        present = set()
        for name, value in head.headers:
            lowered = name.lower()
            if lowered in HOP_BY_HOP or lowered in connection_tokens or lowered == "content-length":
                continue
            if lowered in ("location", "content-location"):
                pattern = self.location_pattern
                if pattern is not None:
                    value = pattern.sub(self.public_origin, value)
            present.add(lowered)
            response.headers.add(name, value)
        for name, value in SECURITY_HEADERS:
            if name.lower() not in present:
                response.headers[name] = value

    def abort_exchange(self, request: BaseRequest, exchange: Exchange, status: int, message: str) -> web.StreamResponse:
        """Answer with an error if nothing was sent yet and the client has sent its whole body;
        otherwise cut the client connection (a client still sending could not read the answer)."""
        if exchange.response is None and (request.content.is_eof() or exchange.body_withheld):
            exchange.status = status
            response = local_response(status, message)
            response.force_close()
            return response
        transport = request.transport
        if transport is not None:
            transport.abort()
        if exchange.response is None:
            exchange.status = status
            return local_response(status, message)
        return exchange.response

    def log_access(self, request: BaseRequest, exchange: Exchange) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        duration = time.monotonic() - exchange.started
        access_log.info(
            "%s %s %s %d in=%d out=%d %.3fs upstream=%s",
            connection_state(request).peer or "-", request.method, log_path(request), exchange.status,
            exchange.bytes_in, exchange.bytes_out, duration, exchange.upstream,
        )


def is_clean_path(path: str) -> bool:
    if "\\" in path or "\x00" in path:
        return False
    segments = path.split("/")
    return not any(segment in (".", "..") for segment in segments)


def log_path(request: BaseRequest) -> str:
    """The path for logs; the query only for the RPC proxy, where it names the target server:port."""
    target = request.raw_path
    path, _, query = target.partition("?")
    if query and path.lower().endswith("/rpcproxy.dll"):
        return f"{path}?{query[:100]}"
    return path[:300]


def local_response(status: int, message: str) -> web.Response:
    response = web.Response(status=status, text=message + "\n")
    for name, value in SECURITY_HEADERS:
        response.headers[name] = value
    return response


def _interim_bytes(head: ResponseHead) -> bytes:
    lines = [f"HTTP/1.1 {head.status} {head.reason}".encode("latin-1")]
    lines += [f"{n}: {v}".encode("latin-1") for n, v in head.headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _location_pattern(names: set[str]) -> re.Pattern[str] | None:
    if not names:
        return None
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.compile(rf"\bhttps?://(?:{alternatives})(?::\d+)?(?=[/?#&]|$)", re.IGNORECASE)


# ---- port 80 -----------------------------------------------------------------------------------
ACME_PREFIX = "/.well-known/acme-challenge/"


class HttpRedirector:
    """Port 80: answers ACME HTTP-01 challenges, redirects everything else to https://FQDN."""

    def __init__(self, fqdn: str, https_port: int, challenges: dict[str, str]) -> None:
        self.challenges = challenges
        self.fqdn = fqdn
        self.set_https_port(https_port)

    def set_https_port(self, port: int) -> None:
        self.origin = f"https://{self.fqdn}" + ("" if port == 443 else f":{port}")

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        path = request.raw_path
        if path.startswith(ACME_PREFIX):
            token = path[len(ACME_PREFIX) :].split("?", 1)[0]
            answer = self.challenges.get(token)
            if answer is None:
                return local_response(404, "No such ACME challenge.")
            return web.Response(status=200, text=answer, content_type="text/plain")
        if not path.startswith("/"):
            path = "/"
        response = web.Response(status=301, text="This service is served over HTTPS.\n")
        response.headers["Location"] = self.origin + path
        return response
