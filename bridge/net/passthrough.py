"""SNI routing: which names the bridge terminates and which go, undecrypted, to another backend.

With ``--passthrough`` routes the Gate (bridge.net.gate) reads each HTTPS connection's ClientHello
without answering it (bridge.protocol.clienthello) and asks the ``Router``: the bridge's own names
(``--fqdn``, ``--terminate``) get the bridge's TLS as before; a passthrough name is spliced at TCP
level to its backend, the bytes already read replayed first (after a PROXY v2 header when the route
asks for one); other names and hellos without a name take the default route (``*``), or are
closed. Port 80 does the same by the first request's Host header, to the backend's port 80.

Matching is case-insensitive: an exact name wins, then the longest ``*.domain`` suffix (any depth),
then the default.

``Splice`` is the thin shell that moves bytes both ways: two asyncio protocols, each pausing the
other side's reading while its own write buffer is full (back-pressure), half-closes passed on,
an idle limit (--idle-timeout), counted per route and logged once at the end.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bridge.config import PassthroughRoute
from bridge.errors import ConfigError
from bridge.net.accesslog import ACCESS
from bridge.protocol.proxyv2 import header as proxy_v2_header

log = logging.getLogger("bridge.passthrough")

TERMINATED = "bridge"  # the label of the bridge's own route (terminated and proxied)
WRITE_HIGH = 1024 * 1024  # bytes queued towards one side before the other side's reading pauses
WRITE_LOW = 256 * 1024
HEALTH_INTERVAL = 15.0  # seconds between TCP connect checks of each backend


@dataclass
class RouteCounters:
    connections: int = 0  # accepted for this route, in all
    open: int = 0
    bytes_in: int = 0  # client -> backend (finished connections; open ones are added when read)
    bytes_out: int = 0  # backend -> client
    failures: int = 0  # backend connect failures

    def as_dict(self) -> dict[str, int]:
        return {"connections": self.connections, "open": self.open, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "failures": self.failures}


@dataclass
class Health:
    state: str = "unknown"  # "up", "down" or "unknown" (not checked yet)
    error: str = ""
    checked: float = 0.0  # epoch seconds
    connect_ms: float | None = None


@dataclass
class Route:
    """A route and its live state: counters, backend health, open splices."""

    label: str  # the name as configured ("mail.example.com", "*.example.com", "*"), or TERMINATED
    config: PassthroughRoute | None = None  # None: the bridge terminates
    counters: RouteCounters = field(default_factory=RouteCounters)
    health: Health = field(default_factory=Health)
    live: set[Splice] = field(default_factory=set)  # its open splices (their bytes count as they move)

    def counted(self) -> dict[str, int]:
        row = self.counters.as_dict()
        row["bytes_in"] += sum(splice.client.received for splice in self.live)
        row["bytes_out"] += sum(splice.backend.received for splice in self.live)
        return row

    @property
    def terminated(self) -> bool:
        return self.config is None


class Router:
    """The routes of one bridge process (shared by its port-80 and HTTPS listeners)."""

    def __init__(self, own_names: Iterable[str], routes: Iterable[PassthroughRoute], connect_timeout: float = 10.0, idle_timeout: float = 1800.0) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.bans: Any = None  # bridge.ops.bans.BanGuard (or a worker's view): banned sources are closed before the hello
        self.own = Route(TERMINATED)
        self.routes: dict[str, Route] = {}
        self.exact: dict[str, Route] = {}
        self.wildcards: dict[str, Route] = {}  # "example.com" -> the route of "*.example.com"
        self.default: Route | None = None
        for name in own_names:
            self._add(name.lower(), self.own)
        for spec in routes:
            route = Route(spec.name, spec)
            self.routes[spec.name] = route
            if spec.name == "*":
                self.default = route
            else:
                self._add(spec.name, route)
        self.unrouted = 0  # connections closed: no route for their name
        self.http_port = 80  # the backends' plain HTTP port, for port 80's passthrough (tests change it)

    def _add(self, name: str, route: Route) -> None:
        if name.startswith("*."):
            self.wildcards[name[2:]] = route
        else:
            self.exact[name] = route

    def choose(self, name: str | None) -> Route | None:
        """The route for a server name (lower case) or None (no name); None when the connection closes."""
        if name:
            route = self.exact.get(name)
            if route is not None:
                return route
            rest = name
            while "." in rest:
                rest = rest.split(".", 1)[1]
                route = self.wildcards.get(rest)
                if route is not None:
                    return route
        return self.default

    def choose_host(self, host: str | None) -> Route | None:
        """The route for an HTTP Host header value (port and trailing dot dropped)."""
        if not host:
            return self.default
        text = host.strip().lower()
        if text.startswith("["):
            text = text[: text.find("]") + 1]
        elif text.count(":") == 1:
            text = text.split(":", 1)[0]
        return self.choose(text.rstrip("."))

    def banned(self, peer: str) -> bool:
        return self.bans is not None and self.bans.is_banned(peer)

    # ---- counters and health (the status page: bridge.ops.routes) ---------------------------------
    def counters(self) -> dict[str, dict[str, int]]:
        """Per route label (TERMINATED for the bridge's own names): connections, open, bytes each way, connect failures."""
        rows = {TERMINATED: self.own.counted()}
        for label, route in self.routes.items():
            rows[label] = route.counted()
        return rows

    def health(self) -> dict[str, dict[str, Any]]:
        return {
            label: {"backend": route.config.backend, "proxy_protocol": route.config.proxy_protocol, "state": route.health.state, "error": route.health.error, "connect_ms": route.health.connect_ms}
            for label, route in self.routes.items()
            if route.config is not None
        }

    async def check_health(self) -> None:
        """One TCP connect to each backend (its HTTPS port), all at once."""
        await asyncio.gather(*(self._check(route) for route in self.routes.values()))

    async def _check(self, route: Route) -> None:
        assert route.config is not None
        started = time.monotonic()
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(route.config.host, route.config.port), self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            error = connect_error(exc, self.connect_timeout)
            if route.health.state != "down" or route.health.error != error:
                log.warning("passthrough backend %s for %s is down: %s", route.config.backend, route.label, error)
            route.health = Health("down", error, time.time(), None)
            return
        writer.close()
        if route.health.state == "down":
            log.info("passthrough backend %s for %s is up again", route.config.backend, route.label)
        route.health = Health("up", "", time.time(), round((time.monotonic() - started) * 1000, 1))

    async def run_health_checks(self, interval: float = HEALTH_INTERVAL) -> None:
        while True:
            try:
                await self.check_health()
            except Exception:  # housekeeping must never die
                log.exception("checking the passthrough backends failed")
            await asyncio.sleep(interval)


def connect_error(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"the name does not resolve ({exc.strerror})"
    return str(getattr(exc, "strerror", None) or exc)


async def check_backends_resolve(routes: Iterable[PassthroughRoute]) -> None:
    """ConfigError (one sentence) for the first backend whose name does not resolve."""
    loop = asyncio.get_running_loop()
    for route in routes:
        try:
            await loop.getaddrinfo(route.host, route.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConfigError(f"--passthrough {route}: the backend {route.host} does not resolve ({exc.strerror}); fix the name or give its IP address.") from None


# --------------------------------------------------------------------------- the splice


class _Side(asyncio.Protocol):
    """One leg of a splice: what it receives goes to the other leg's transport."""

    def __init__(self, splice: Splice, name: str) -> None:
        self.splice = splice
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.received = 0
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.splice.last_activity = self.splice.loop.time()
        other = self.other
        if other is not None and other.transport is not None and not other.lost:
            other.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other is None or other.transport is None or other.lost or other.eof:
            self.splice.close()
            return False
        if other.transport.can_write_eof():
            other.transport.write_eof()
        return True  # half-open: the other direction goes on

    def pause_writing(self) -> None:  # our write buffer is full: stop reading from the other side
        other = self.other
        if other is not None and other.transport is not None and not other.lost:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is not None and other.transport is not None and not other.lost:
            other.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.splice.side_lost(self)


class Splice:
    """A client connection spliced to a passthrough backend; see the module's docstring."""

    def __init__(
        self, router: Router, route: Route, client: asyncio.Transport, first_bytes: bytes, *, server_name: str | None, backend_port: int, on_close: Callable[[], None], registry: set[Splice]
    ) -> None:
        assert route.config is not None
        self.loop = asyncio.get_running_loop()
        self.router = router
        self.route = route
        self.first_bytes = first_bytes
        self.server_name = server_name
        self.backend_port = backend_port
        self.on_close = on_close
        self.registry = registry
        self.started = time.monotonic()
        self.last_activity = self.loop.time()
        self.peer = client.get_extra_info("peername")
        self.local = client.get_extra_info("sockname")
        self.client = _Side(self, "client")
        self.backend = _Side(self, "backend")
        self.client.other, self.backend.other = self.backend, self.client
        self.finished = False
        self.done: asyncio.Future = self.loop.create_future()
        self.timer: asyncio.TimerHandle | None = None
        self.connector: asyncio.Task | None = None
        client.pause_reading()
        client.set_protocol(self.client)
        self.client.connection_made(client)
        route.counters.connections += 1
        route.counters.open += 1
        route.live.add(self)
        registry.add(self)

    def start(self) -> None:
        self.connector = self.loop.create_task(self.connect())
        self.timer = self.loop.call_later(self.router.idle_timeout, self.check_idle)

    async def connect(self) -> None:
        config = self.route.config
        assert config is not None
        try:
            await asyncio.wait_for(self.loop.create_connection(lambda: self.backend, config.host, self.backend_port), self.router.connect_timeout)
        except (OSError, TimeoutError) as exc:
            self.route.counters.failures += 1
            log.warning("passthrough %s -> %s:%d failed for %s: %s", self.route.label, config.host, self.backend_port, self.peer_text, connect_error(exc, self.router.connect_timeout))
            self.abort()
            return
        if self.client.lost or self.client.transport is None:
            self.close()
            return
        backend = self.backend.transport
        assert backend is not None
        if config.proxy_protocol:
            backend.write(proxy_v2_header(_pair(self.peer), _pair(self.local)))
        backend.write(self.first_bytes)
        self.client.received += len(self.first_bytes)
        self.first_bytes = b""
        self.client.transport.resume_reading()

    @property
    def peer_text(self) -> str:
        return str(self.peer[0]) if self.peer else "-"

    def check_idle(self) -> None:
        self.timer = None
        if self.finished:
            return
        left = self.last_activity + self.router.idle_timeout - self.loop.time()
        if left <= 0:
            log.info("passthrough %s from %s: idle for %g s, closed", self.route.label, self.peer_text, self.router.idle_timeout)
            self.abort()
            return
        self.timer = self.loop.call_later(left, self.check_idle)

    def side_lost(self, side: _Side) -> None:
        other = side.other
        if other is not None and other.transport is not None and not other.lost:
            other.transport.close()  # flushes what is queued for it first
            if side is self.client and self.connector is not None and not self.connector.done():
                self.connector.cancel()
            return
        if side is self.client and self.connector is not None and not self.connector.done():
            self.connector.cancel()
            self.finish()
            return
        self.finish()

    def close(self) -> None:
        for side in (self.client, self.backend):
            if side.transport is not None and not side.lost:
                side.transport.close()
        if self.backend.transport is None and self.connector is not None and not self.connector.done():
            self.connector.cancel()

    def abort(self) -> None:
        for side in (self.client, self.backend):
            if side.transport is not None and not side.lost:
                side.transport.abort()
        if self.connector is not None and not self.connector.done():
            self.connector.cancel()
        if self.client.transport is None or self.client.lost:
            self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        if not self.client.lost or (self.backend.transport is not None and not self.backend.lost):
            return  # the other leg's connection_lost finishes it
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        counters = self.route.counters
        counters.open -= 1
        counters.bytes_in += self.client.received
        counters.bytes_out += self.backend.received
        self.route.live.discard(self)
        self.registry.discard(self)
        self.on_close()
        if not self.done.done():
            self.done.set_result(None)
        if ACCESS.enabled():
            host = self.route.config.host if self.route.config else "-"
            ACCESS.write(
                f"{self.peer_text} passthrough sni={self.server_name or '-'} route={self.route.label} -> {host}:{self.backend_port} "
                f"in={self.client.received} out={self.backend.received} {time.monotonic() - self.started:.3f}s"
            )

    @property
    def bytes_in(self) -> int:
        return self.client.received

    @property
    def bytes_out(self) -> int:
        return self.backend.received


def _pair(address: Any) -> tuple[str, int] | None:
    if not address or not isinstance(address, tuple) or len(address) < 2:
        return None
    return str(address[0]), int(address[1])


async def drain_splices(splices: set[Splice], timeout: float) -> int:
    """SIGTERM: open splices get ``timeout`` seconds to end by themselves, then are cut; how many were cut."""
    waiting = [splice.done for splice in splices]
    if waiting:
        await asyncio.wait(waiting, timeout=timeout)
    cut = 0
    for splice in list(splices):
        cut += 1
        splice.abort()
    return cut
