"""`bridge up`: config -> certificate -> front end (80, then 443) -> legacy servers."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config import EXCHANGE_ONLINE, BridgeConfig, public_origin
from bridge.errors import ConfigError, StartupError
from bridge.net.accesslog import ACCESS, FlushingHandler
from bridge.net.front import FrontServer
from bridge.net.gate import ConnectionGuard
from bridge.net.passthrough import Router, check_backends_resolve
from bridge.net.tls import front_context, legacy_context, load_front_certificate
from bridge.net.upstream import LegacyPool
from bridge.ops.allowlist import RangeWatcher, announce_list, apply_to_guard, expand_allow
from bridge.ops.status import attach_operations, reload_settings
from bridge.ops.window import Window
from bridge.proxy.mail import MailStats, mail_listeners
from bridge.proxy.port80 import Redirector
from bridge.proxy.relay import Proxy

log = logging.getLogger("bridge")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # scripts/fail2ban's filter reads these lines
PORT80_KEEPALIVE = 75.0  # seconds an idle port-80 connection is kept (redirects and ACME need no more)


def setup_logging(level: str, name_suffix: str = "") -> None:
    """Log lines to stderr (the journal under systemd); the access log through bridge.net.accesslog's
    buffered writer. ``name_suffix`` follows each logger's name (a worker's ``[worker N]``)."""
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise ConfigError(f"--log-level {level!r} is not a level; use debug, info or warning.")
    handler = FlushingHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT.replace("%(name)s", "%(name)s" + name_suffix)))
    ACCESS.install(sys.stderr, f"bridge.access{name_suffix}")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("aiohttp").setLevel(max(numeric, logging.WARNING))


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: C transports and TLS for the legacy leg (less memory per connection, more requests/s)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@dataclass
class RunningBridge:
    config: BridgeConfig
    proxy: Proxy
    https_port: int
    http_port: int
    ssl_context: Any
    runners: list[Any] = field(default_factory=list)  # the front servers (80 and 443) and the status page's aiohttp runner
    background: list[asyncio.Task] = field(default_factory=list)
    renewal: Any = None  # bridge.renewal.Renewer when the certificate comes from ACME
    # Operations (bridge.status.attach_operations): bridge.guard.ConnectionGuard, bridge.bans.BanGuard, bridge.status.BridgeStats
    guard: Any = None
    bans: Any = None
    stats: Any = None
    status_port: int = 0
    certificate_path: Path | None = None
    key_path: Path | None = None
    window: Any = None  # bridge.ops.window.Window: the migration window (--expire-at/--expire-after)
    router: Router | None = None  # --passthrough routes (SNI on 443, Host on 80)
    migration: Any = None  # bridge.ops.migration.MigrationView: the live view, the ledger and the hand-over report
    mail: MailStats = field(default_factory=MailStats)  # the mail listeners' counters (bridge.proxy.mail)
    mail_ports: dict[str, int] = field(default_factory=dict)  # protocol -> bound port

    async def close(self) -> None:
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        for runner in reversed(self.runners):
            await runner.cleanup()
        if self.migration is not None:  # after the drain: the ledger and the hand-over report have everything
            self.migration.finish()

    def reload_certificate(self) -> None:
        reload_front_certificate(self)


def reload_front_certificate(bridge: Any) -> bool:
    """Re-read the front certificate into ``bridge.ssl_context`` (new handshakes get it): the --cert/--key
    files, else ACME's live files through the Renewer. True when it was --cert/--key."""
    config = bridge.config
    if config.cert and config.key:
        load_front_certificate(bridge.ssl_context, config.cert, config.key)
        bridge.certificate_path, bridge.key_path = config.cert, config.key
        log.info("certificate reloaded from %s", config.cert)
        return True
    if bridge.renewal is not None:
        bridge.renewal.reload()
    return False


CertificateSource = Callable[[BridgeConfig, dict[str, str]], Awaitable[tuple[Path, Path]]]


async def start_bridge(config: BridgeConfig, certificate_source: CertificateSource | None = None) -> RunningBridge:
    """Start port 80, get a certificate, start 443. Raises StartupError/ConfigError/CertificateError."""
    challenges: dict[str, str] = {}
    runners: list[Any] = []
    try:
        router = await build_router(config)
        redirector, http_runner = await start_redirector(config, challenges)
        http_runner.router = router
        runners.append(http_runner)
        cert, key = await obtain_certificate(config, challenges, certificate_source)
        ssl_context = front_context(cert, key)
        pool = build_upstream(config)
        await check_upstream(pool)
        proxy = Proxy(config, pool)
        window = Window(proxy)
        window.configure(config, starting=True)  # before 443 listens: a bridge restarted after its window answers 503 from the first request
        front = build_front(config, proxy, ssl_context)
        front.router = router
        window.fronts.append(front)
        runners.append(front)
        try:
            await front.listen(config.bind, config.https_port)
        except OSError as exc:
            raise listen_error(exc, config.bind, config.https_port, "--https-port") from None
    except BaseException:
        for runner in reversed(runners):
            await runner.cleanup()
        raise
    bridge = RunningBridge(config, proxy, front.port, http_runner.port, ssl_context, runners, certificate_path=cert, key_path=key, window=window, router=router)
    bridge.background.append(asyncio.create_task(window.run(), name="migration-window"))
    bridge.background.append(asyncio.create_task(RangeWatcher(config.state_dir, lambda: apply_to_guard(bridge)).run(), name="exchange-online-ranges"))
    publish_https_port(bridge.https_port, proxy, front, redirector)
    try:
        await attach_operations(bridge, front.guard, front)
        await start_mail(bridge, front.guard)
    except BaseException:
        await bridge.close()
        raise
    if router is not None:
        router.bans = bridge.bans
        bridge.background.append(asyncio.create_task(router.run_health_checks(), name="passthrough-health"))
    if certificate_source is None and not (config.cert and config.key):
        from bridge.certs.renewal import Renewer

        bridge.renewal = Renewer(config, challenges, ssl_context)
        bridge.background.append(asyncio.create_task(bridge.renewal.run(), name="certificate-renewal"))
    return bridge


# ---- the pieces, composed the same way by one process, the --workers parent and its workers, and `bridge cert`


async def start_redirector(config: BridgeConfig, challenges: dict[str, str]) -> tuple[Redirector, FrontServer]:
    """Port 80: ACME HTTP-01 answers from ``challenges`` and redirects to https; StartupError when it cannot listen.

    The same front server as 443, without TLS. Its ConnectionGuard has the header timeout and the
    connection limit but no allow-list (ACME HTTP-01 validation comes from addresses Let's Encrypt
    does not publish)."""
    redirector = Redirector(config.fqdn, config.https_port, challenges)
    guard = ConnectionGuard(max_connections=config.max_connections, header_timeout=config.header_timeout)
    server = FrontServer(redirector.handle, guard, None, keepalive_timeout=PORT80_KEEPALIVE, drain_timeout=config.drain_timeout)
    try:
        await server.listen(config.bind, config.http_port)
    except OSError as exc:
        await server.cleanup()
        raise listen_error(exc, config.bind, config.http_port, "--http-port") from None
    return redirector, server


async def build_router(config: BridgeConfig) -> Router | None:
    """The --passthrough routes (None without any); ConfigError when a backend's name does not resolve."""
    if not config.passthrough:
        return None
    await check_backends_resolve(config.passthrough)
    router = Router([config.fqdn, *config.terminate], config.passthrough, connect_timeout=config.connect_timeout, idle_timeout=config.idle_timeout)
    for route in config.passthrough:
        name = "every other name" if route.name == "*" else route.name
        log.info("passthrough: %s -> %s (port 80: %s:80)%s", name, route.backend, route.host, ", with a PROXY v2 header" if route.proxy_protocol else "")
    if router.default is None:
        log.info("passthrough: names without a route (and hellos without SNI) are closed; add --passthrough '*=HOST:PORT' for a default")
    return router


async def obtain_certificate(config: BridgeConfig, challenges: dict[str, str], source: CertificateSource | None = None) -> tuple[Path, Path]:
    """The front certificate and key files: --cert/--key, else from ``source`` (default: ACME over port 80's ``challenges``)."""
    if config.cert and config.key:
        return config.cert, config.key
    if source is None:
        try:
            from bridge.certs.acme import certificate_for_bridge
        except ImportError:
            raise ConfigError("No certificate given: pass --cert and --key (e.g. certbot's fullchain.pem and privkey.pem).") from None
        source = certificate_for_bridge
    return await source(config, challenges)


def build_upstream(config: BridgeConfig) -> LegacyPool:
    """The legacy servers' connection pool (TLS 1.0 client side, pinning or CA as configured)."""
    return LegacyPool(
        servers=config.legacy,
        tls_context=legacy_context(config.legacy_ca),
        connect_timeout=config.connect_timeout,
        pinned_fingerprint=config.legacy_fingerprint,
        verified_by_ca=config.legacy_ca is not None,
    )


async def check_upstream(pool: LegacyPool) -> None:
    """Try each legacy server once at start and log what was found (the bridge starts either way)."""
    for server, result in (await pool.check_all()).items():
        if result.startswith("ok"):
            log.info("legacy %s reachable: %s", server, result[3:])
        else:
            log.warning("legacy %s: %s; the bridge answers 502 until it is fixed", server, result)


def build_front(config: BridgeConfig, proxy: Proxy, ssl_context: Any) -> FrontServer:
    """The HTTPS front end for ``proxy`` (not yet listening), with its ConnectionGuard from the configuration."""
    if EXCHANGE_ONLINE in config.allow:
        announce_list(config.state_dir, "in use")
    guard = ConnectionGuard(
        allow=expand_allow(config.allow, config.state_dir),
        max_connections=config.max_connections,
        header_timeout=config.header_timeout,
        public_origin=proxy.public_origin,
    )
    return FrontServer(proxy.handle, guard, ssl_context, keepalive_timeout=config.idle_timeout, drain_timeout=config.drain_timeout, fast=proxy)


async def start_mail(bridge: RunningBridge, guard: ConnectionGuard) -> None:
    """The mail listeners (--imaps-port, --pop3s-port, --smtps-port, --submission-port): the HTTPS gate's
    guard (one --max-connections), the certificate's context (renewals and SIGHUP reach it), the ban
    list and the migration window."""
    config = bridge.config
    for flag, port, listener in mail_listeners(config, guard, bridge.ssl_context, bridge.bans, lambda: bridge.proxy.closed_message, bridge.mail):
        bridge.runners.append(listener)
        await listen_mail(config, flag, port, listener)
        bridge.mail_ports[listener.protocol] = listener.port
        if bridge.window is not None:
            bridge.window.fronts.append(listener)


async def listen_mail(config: BridgeConfig, flag: str, port: int, listener: Any) -> None:
    """One mail listener (bridge.proxy.mail.MailListener) listening, or the one-sentence StartupError."""
    try:
        await listener.listen(config.bind, port)
    except OSError as exc:
        raise listen_error(exc, config.bind, port, flag) from None
    log.info("%s listener on port %d -> %s (%s)", listener.protocol, listener.port, listener.service.server, listener.service.tls_mode)


def publish_https_port(port: int, proxy: Proxy, front: FrontServer, redirector: Redirector | None = None) -> None:
    """The HTTPS port is known (a kernel-chosen one too): the public origin the proxy, the front end's
    plain-HTTP answer and port 80's redirects name follows it."""
    proxy.set_public_port(port)
    front.guard.public_origin = proxy.public_origin
    if redirector is not None:
        redirector.set_https_port(port)


def listen_error(exc: OSError, bind: str | None, port: int, flag: str) -> StartupError:
    """The one-sentence StartupError for a port that cannot be bound."""
    where = f"{bind or 'all addresses'} port {port}"
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"Port {port} on {bind or 'all addresses'} is already in use by another program; stop it or choose another {flag}.")
    if exc.errno == errno.EACCES:
        return StartupError(f"Binding {where} needs root or CAP_NET_BIND_SERVICE; run as root, use the systemd unit (which grants the capability) or choose a port above 1023 with {flag}.")
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"--bind {bind} is not an address of this machine; give one of its addresses or leave --bind out.")
    return StartupError(f"Cannot listen on {where}: {exc.strerror}; check --bind and {flag}.")


def settle_garbage_collector() -> None:
    """Everything allocated at start-up lives as long as the process: move it out of the cyclic
    collector's sight, and collect the short-lived objects of requests less often (fewer passes
    over the same young objects; each request's objects are freed by reference counting anyway)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def ready_line(bridge: RunningBridge) -> str:
    config = bridge.config
    base = public_origin(config.fqdn, bridge.https_port)
    legacy = ", ".join(str(s) for s in config.legacy)
    return (
        f"bridge ready: {base}/rpc/rpcproxy.dll, {base}/EWS/Exchange.asmx, {base}/Autodiscover/Autodiscover.xml, "
        f"{base}/owa (and {len(config.forward_paths)} forwarded paths in all) -> {legacy}; http port {bridge.http_port} redirects"
    )


def on_sighup(bridge: Any, reload_config: Callable[[], BridgeConfig] | None) -> None:
    """SIGHUP, the same for one process, the --workers parent and each worker (told by the parent):
    re-read the configuration (settings that need a restart are logged and kept), then the certificate.
    ``bridge`` has ``config`` and ``reload_certificate()`` and what bridge.ops.status.reload_settings reads."""
    if reload_config is not None:
        try:
            reload_settings(bridge, reload_config())
        except Exception as exc:  # a bad file on reload must not stop the service
            log.error("configuration not reloaded, keeping the current one: %s", exc)
    try:
        bridge.reload_certificate()
    except Exception as exc:  # a bad file on reload must not stop the service
        log.error("reload failed, keeping the current certificate: %s", exc)


def handle_signals(stop: asyncio.Event, on_hup: Callable[[], None], stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """``stop_signals`` set ``stop``; SIGHUP calls ``on_hup``."""
    loop = asyncio.get_running_loop()
    for sig in stop_signals:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)


async def serve_until_signalled(config: BridgeConfig, reload_config: Callable[[], BridgeConfig] | None = None) -> int:
    bridge = await start_bridge(config)
    stop = asyncio.Event()
    handle_signals(stop, lambda: on_sighup(bridge, reload_config))
    settle_garbage_collector()
    log.info(ready_line(bridge))  # after the handlers: a signal sent on seeing this line is handled
    return await serve_until(stop, bridge.config, bridge.close)


async def serve_until(stop: asyncio.Event, config: BridgeConfig, close: Callable[[], Awaitable[None]]) -> int:
    """Serve until ``stop`` is set, then ``close`` (which drains for --drain-timeout); the exit code."""
    try:
        await stop.wait()
        log.info("stopping: no new connections; open requests get up to %g s to finish (--drain-timeout)", config.drain_timeout)
    finally:
        try:
            await close()
        finally:
            ACCESS.close()  # every access line of the drained requests is written before the exit
    return 0
