"""`bridge up --workers N`: one supervising process and N HTTPS worker processes on one listening socket.

The parent keeps what must exist once: the validated configuration, port 80 (redirects and ACME
HTTP-01), the certificate (ACME with background renewal, or --cert/--key), the status listener, the
ban list and bans.json. It binds the HTTPS socket itself (so a busy port is the usual one-sentence
error) and starts each worker as ``python -m bridge.workers`` with that socket passed by file
descriptor (no fork of a process with a running event loop). The kernel hands each new connection to
one worker, which serves it to the end, so NTLM's connection pinning holds.

Parent and worker talk over a socketpair, one pickled message per frame (both ends are this
program):

- parent -> worker: ``("start", settings)``, ``("reload", config)`` (SIGHUP, or a renewed
  certificate: the worker re-reads the certificate files), ``("bans", {address: until})``;
- worker -> parent: ``("ready", port)``, ``("failure", address)`` for each failed logon, and
  ``("stats", counters)`` every second, which the parent adds up for the status page and /metrics.

Failed logons are counted by the parent across all workers, so the threshold means the same as with
one process; the parent pushes the ban set to every worker at once. --max-connections stays the
total: each worker gets its share. SIGTERM to the parent is passed on (each worker drains for
--drain-timeout); a worker that dies otherwise is restarted with a growing delay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bridge.config import BridgeConfig, plain_address
from bridge.ops.routes import add_counters as add_route_counters

log = logging.getLogger("bridge.workers")

STATS_INTERVAL = 1.0
BAN_PUSH_INTERVAL = 1.0
READY_TIMEOUT = 60.0
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
STABLE_SECONDS = 30.0  # a worker that ran this long restarts without the grown delay
FRAME = struct.Struct("!I")


# --------------------------------------------------------------------------- framing


async def receive(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at end of stream."""
    try:
        header = await reader.readexactly(FRAME.size)
        return pickle.loads(await reader.readexactly(FRAME.unpack(header)[0]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def send(writer: asyncio.StreamWriter, message: Any) -> None:
    if writer.is_closing():
        return
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(FRAME.pack(len(data)) + data)


def connection_share(total: int, workers: int, index: int) -> int:
    """Worker ``index``'s part of --max-connections (the parts add up to the total)."""
    return max(1, total // workers + (1 if index < total % workers else 0))


# --------------------------------------------------------------------------- the parent


@dataclass
class WorkerTotals:
    """The workers' counters added up; read by bridge.status.snapshot as both ``stats`` and ``guard``.

    A worker that exits leaves its last report in ``retired`` so counters never go backwards
    (counts from its last second before an unexpected death are lost).
    """

    max_connections: int
    forward_paths: tuple[str, ...] = ()
    started: float = field(default_factory=time.time)
    current: dict[int, dict[str, Any]] = field(default_factory=dict)  # worker index -> last report
    retired: dict[str, Any] = field(default_factory=lambda: {"requests": Counter(), "rejected": Counter(), "bytes_in": 0, "bytes_out": 0, "refused": 0, "passthrough": {}, "traffic": None})

    def update(self, index: int, report: dict[str, Any]) -> None:
        self.current[index] = report

    def apply(self, allow: Any, max_connections: int, header_timeout: float) -> None:
        """SIGHUP (bridge.ops.status.reload_settings): the limit the status page shows; the workers apply the rest."""
        self.max_connections = max_connections

    def retire(self, index: int) -> None:
        report = self.current.pop(index, None)
        if report is None:
            return
        self.retired["requests"].update(report["requests"])
        self.retired["rejected"].update(report["rejected"])
        for name in ("bytes_in", "bytes_out", "refused"):
            self.retired[name] += report[name]
        retired = report.get("passthrough") or {}
        for row in retired.values():
            row["open"] = 0
        add_route_counters(self.retired["passthrough"], retired)
        if "traffic" in report:  # its counts stay; its channels are gone
            self.retired["traffic"] = self.traffic_report(extra=[dict(report["traffic"], channels=[])], current=False)

    def traffic_report(self, extra: list[dict[str, Any]] | None = None, current: bool = True) -> dict[str, Any]:
        """The workers' migration views added up (bridge.ops.traffic.merge_reports), retired workers' counts included."""
        from bridge.ops.traffic import merge_reports

        reports = [("", self.retired["traffic"])] if self.retired["traffic"] is not None else []
        if current:
            reports += [(f"w{index}:", report["traffic"]) for index, report in sorted(self.current.items()) if "traffic" in report]
        reports += [("", report) for report in extra or ()]
        return merge_reports(reports)

    def _sum(self, name: str) -> int:
        return self.retired.get(name, 0) + sum(report[name] for report in self.current.values())

    def _counter(self, name: str) -> Counter:
        total = Counter(self.retired[name])
        for report in self.current.values():
            total.update(report[name])
        return total

    # BridgeStats interface
    requests = property(lambda self: self._counter("requests"))
    bytes_in = property(lambda self: self._sum("bytes_in"))
    bytes_out = property(lambda self: self._sum("bytes_out"))
    rpc_channels = property(lambda self: sum(report["rpc_channels"] for report in self.current.values()))
    refused = property(lambda self: self._sum("refused"))
    # ConnectionGuard interface
    open_connections = property(lambda self: sum(report["connections_open"] for report in self.current.values()))
    rejections = property(lambda self: self._counter("rejected"))

    @property
    def passthrough(self) -> dict[str, dict[str, int]]:
        """The workers' per-route counters added up (bridge.ops.routes)."""
        total = add_route_counters({}, self.retired["passthrough"])
        for report in self.current.values():
            add_route_counters(total, report.get("passthrough") or {})
        return total

    @property
    def legacy_health(self) -> dict[str, Any]:
        """Per legacy server: the error any worker saw on its last attempt, else up."""
        health: dict[str, Any] = {}
        for report in self.current.values():
            for server, error in report["legacy"].items():
                entry = health.setdefault(server, _Health(""))
                entry.last_error = entry.last_error or error
        return health


@dataclass
class _Health:
    last_error: str


class _PoolView:
    def __init__(self, totals: WorkerTotals, servers: list[Any]) -> None:
        self.totals = totals
        self.servers = servers

    @property
    def health(self) -> dict[str, Any]:
        reported = self.totals.legacy_health
        return {str(server): reported.get(str(server), _Health("")) for server in self.servers}


class _ProxyView:
    def __init__(self, pool: _PoolView) -> None:
        self.pool = pool


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    ready: asyncio.Future
    reader_task: asyncio.Task | None = None


class Supervisor:
    """The parent: what `bridge.status` and `ready_line` read (config, stats, guard, bans, proxy.pool)."""

    def __init__(self, config: BridgeConfig, sockets: list[socket.socket], cert: Path, key: Path, ssl_context: Any) -> None:
        from bridge.ops.bans import BanGuard, policy_from_config
        from bridge.ops.window import Window

        self.config = config
        self.sockets = sockets
        self.https_port = sockets[0].getsockname()[1]
        self.http_port = 0
        self.certificate_path = cert
        self.key_path = key
        self.ssl_context = ssl_context  # the parent's copy: validates the files before workers load them
        self.totals = WorkerTotals(config.max_connections, config.forward_paths)
        self.stats = self.guard = self.totals
        self.proxy = _ProxyView(_PoolView(self.totals, list(config.legacy)))
        self.bans = BanGuard(config.state_dir, policy_from_config(config))
        self.workers: dict[int, Worker] = {}
        self.stopping = asyncio.Event()
        self.runners: list[Any] = []
        self.background: list[asyncio.Task] = []
        self.renewal: Any = None
        self.status_port = 0
        self.window = Window()  # keeps the time for the logs and the status page; each worker closes its own proxy
        self.router: Any = None  # --passthrough: port 80's routing and the backends' health checks (the workers route 443)
        self.migration: Any = None  # bridge.ops.migration.MigrationView over the workers' reports (serve_with_workers)
        self._pushed_bans: dict[str, float] | None = None
        # The mail listeners run here, not in the workers (start_mail_here): their sessions, ports and gate.
        from bridge.proxy.mail import MailStats

        self.mail = MailStats()
        self.mail_ports: dict[str, int] = {}
        self.mail_listeners: list[Any] = []
        self.mail_guard: Any = None

    # ---- what each worker gets -----------------------------------------------------------------
    def worker_config(self, index: int) -> BridgeConfig:
        """Worker ``index``'s settings: its share of the connections, the allow-list with its keywords
        expanded and the migration window as the parent resolved it (one absolute deadline for all)."""
        from bridge.ops.allowlist import expand_allow

        share = connection_share(self.config.max_connections, self.config.workers, index)
        return replace(
            self.config,
            cert=self.certificate_path,
            key=self.key_path,
            max_connections=share,
            allow=expand_allow(self.config.allow, self.config.state_dir),
            expire_at=self.window.deadline,
            expire_after=None,
        )

    def ban_set(self) -> dict[str, float]:
        return {address: ban.until for address, ban in self.bans.active().items() if not self.bans.exempt(address)}

    # ---- workers ---------------------------------------------------------------------------------
    async def spawn(self, index: int) -> Worker:
        parent_end, child_end = socket.socketpair()
        fds = [child_end.fileno(), *(sock.fileno() for sock in self.sockets)]
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bridge.runtime.workers",
                str(index),
                *map(str, fds),
                pass_fds=fds,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child_end.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent_end)
        worker = Worker(index, process, writer, asyncio.get_running_loop().create_future())
        send(writer, ("start", {"config": self.worker_config(index), "bans": self.ban_set(), "public_port": self.https_port}))
        worker.reader_task = asyncio.create_task(self.listen_to(worker, reader), name=f"worker-{index}-messages")
        self.workers[index] = worker
        return worker

    async def listen_to(self, worker: Worker, reader: asyncio.StreamReader) -> None:
        while (message := await receive(reader)) is not None:
            kind = message[0]
            if kind == "stats":
                self.totals.update(worker.index, message[1])
            elif kind == "failure":
                if self.bans.record_failure(message[1]) is not None:
                    self.push_bans()
            elif kind == "ready" and not worker.ready.done():
                worker.ready.set_result(message[1])

    def push_bans(self, force: bool = True) -> None:
        bans = self.ban_set()
        if not force and bans == self._pushed_bans:
            return
        self._pushed_bans = bans
        for worker in self.workers.values():
            send(worker.writer, ("bans", bans))

    async def keep_bans_in_step(self) -> None:
        """Edits by `bridge ban` and expiries reach the workers within a second."""
        while True:
            await asyncio.sleep(BAN_PUSH_INTERVAL)
            try:
                self.bans.refresh()
                self.bans.refused_total = self.totals.refused
                self.push_bans(force=False)
            except Exception:  # housekeeping must never die
                log.exception("pushing the ban list to the workers failed")

    async def start_workers(self) -> None:
        """Start every worker and wait until each serves; StartupError when one exits or hangs first."""
        from bridge.errors import StartupError

        for index in range(self.config.workers):
            await self.spawn(index)
        for worker in self.workers.values():
            exited = asyncio.ensure_future(worker.process.wait())
            await asyncio.wait([worker.ready, exited], timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            exited.cancel()
            if worker.ready.done():
                continue
            if worker.process.returncode is not None:
                raise StartupError(f"Worker {worker.index} exited during start-up ({_exit_reason(worker.process.returncode)}); see the lines above, or run with --workers 1.")
            raise StartupError(f"Worker {worker.index} did not start within {READY_TIMEOUT:g} s; see the lines above, or run with --workers 1.")
        for index in list(self.workers):
            self.background.append(asyncio.create_task(self.watch(index), name=f"worker-{index}-watch"))

    async def watch(self, index: int) -> None:
        """Restart worker ``index`` whenever it dies unexpectedly, with a growing delay."""
        delay = RESTART_FIRST
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            worker = self.workers[index]
            code = await worker.process.wait()
            if worker.reader_task is not None:  # its last reports first, then keep them as retired
                await asyncio.wait([worker.reader_task], timeout=2)
            self.totals.retire(index)
            if self.stopping.is_set():
                return
            if loop.time() - started > STABLE_SECONDS:
                delay = RESTART_FIRST
            log.error("worker %d (pid %d) exited unexpectedly (%s); starting a new one in %g s", index, worker.process.pid, _exit_reason(code), delay)
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            delay = min(delay * 2, RESTART_MAX)
            started = loop.time()
            try:
                await self.spawn(index)
            except Exception as exc:  # keep trying: the other workers still serve
                log.error("worker %d could not be started (%s); trying again", index, exc)

    def reload_workers(self) -> None:
        for worker in self.workers.values():
            send(worker.writer, ("reload", self.worker_config(worker.index)))

    def ranges_refreshed(self) -> None:
        """`bridge allow refresh` wrote a new Exchange Online list: the workers get it with their settings."""
        from bridge.config import EXCHANGE_ONLINE
        from bridge.ops.allowlist import announce_list

        if EXCHANGE_ONLINE in self.config.allow:
            self.reload_workers()
            if self.mail_guard is not None:
                from bridge.ops.allowlist import expand_allow

                self.mail_guard.allow = tuple(expand_allow(self.config.allow, self.config.state_dir))
            announce_list(self.config.state_dir, "applied")

    # ---- signals ---------------------------------------------------------------------------------
    def reload_certificate(self) -> None:
        """SIGHUP's second half (bridge.runtime.app.on_sighup): the parent validates the files, then tells the workers."""
        from bridge.runtime.app import reload_front_certificate

        if reload_front_certificate(self):
            self.reload_workers()
        # else the Renewer's swap has told them (notifying_renewer)

    async def stop(self) -> None:
        self.stopping.set()
        for listener in self.mail_listeners:  # mail clients reconnect on their own (as with one process)
            await listener.cleanup()
        for worker in self.workers.values():
            if worker.process.returncode is None:
                try:
                    worker.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        waits = [worker.process.wait() for worker in self.workers.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.config.drain_timeout + 10)
        except TimeoutError:
            for worker in self.workers.values():
                if worker.process.returncode is None:
                    log.error("worker %d (pid %d) did not stop after the drain; killing it", worker.index, worker.process.pid)
                    worker.process.kill()
            await asyncio.gather(*(worker.process.wait() for worker in self.workers.values()))
        readers = [worker.reader_task for worker in self.workers.values() if worker.reader_task is not None]
        if readers:  # the workers' last reports (sent after their drain) are read before the counts are final
            await asyncio.wait(readers, timeout=2)
        for worker in self.workers.values():
            worker.writer.close()
            if worker.reader_task is not None:
                worker.reader_task.cancel()
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        for runner in reversed(self.runners):
            await runner.cleanup()
        for sock in self.sockets:
            sock.close()
        if self.migration is not None:  # after the workers' last reports: the ledger and the hand-over report
            self.migration.finish()


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def bind_https(config: BridgeConfig, backlog: int = 1024) -> list[socket.socket]:
    """The HTTPS listening socket(s), bound and listening in the parent; StartupError when that fails."""
    from bridge.runtime.app import listen_error

    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(config.bind or None, config.https_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        seen = set()
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise listen_error(exc, config.bind, config.https_port, "--https-port") from None
    return sockets


async def serve_with_workers(config: BridgeConfig, reload_config: Callable[[], BridgeConfig] | None = None) -> int:
    """`bridge up` with --workers N > 1; returns the exit code."""
    from bridge.net.tls import front_context
    from bridge.ops.allowlist import RangeWatcher
    from bridge.ops.status import start_status_listener
    from bridge.runtime.app import build_router, build_upstream, check_upstream, handle_signals, obtain_certificate, on_sighup, ready_line, serve_until, start_redirector

    challenges: dict[str, str] = {}
    router = await build_router(config)
    redirector, http_runner = await start_redirector(config, challenges)
    http_runner.router = router
    supervisor: Supervisor | None = None
    try:
        cert, key = await obtain_certificate(config, challenges)
        ssl_context = front_context(cert, key)
        sockets = bind_https(config)
        supervisor = Supervisor(config, sockets, cert, key, ssl_context)
        supervisor.router = router
        if router is not None:
            supervisor.background.append(asyncio.create_task(router.run_health_checks(), name="passthrough-health"))
        supervisor.runners.append(http_runner)
        supervisor.http_port = http_runner.port
        redirector.set_https_port(supervisor.https_port)
        await check_upstream(build_upstream(config))
        supervisor.window.configure(config, starting=True)
        supervisor.background.append(asyncio.create_task(supervisor.window.run(), name="migration-window"))
        supervisor.background.append(asyncio.create_task(RangeWatcher(config.state_dir, supervisor.ranges_refreshed).run(), name="exchange-online-ranges"))
        supervisor.bans.restore_hooks()
        supervisor.background.append(asyncio.create_task(supervisor.bans.run_forever(), name="ban-housekeeping"))
        supervisor.background.append(asyncio.create_task(supervisor.keep_bans_in_step(), name="ban-push"))
        if not (config.cert and config.key):
            supervisor.renewal = notifying_renewer(config, challenges, ssl_context, supervisor.reload_workers)
            supervisor.background.append(asyncio.create_task(supervisor.renewal.run(), name="certificate-renewal"))
        await supervisor.start_workers()
        await start_mail_here(supervisor)
        from bridge.ops.migration import MigrationView

        supervisor.migration = MigrationView(supervisor, supervisor.totals.traffic_report)
        supervisor.background.append(asyncio.create_task(supervisor.migration.run(), name="migration-view"))
        started = await start_status_listener(supervisor)
        if started is not None:
            runner, supervisor.status_port = started
            supervisor.runners.insert(0, runner)
    except BaseException:
        if supervisor is not None:
            await supervisor.stop()
        else:
            await http_runner.cleanup()
        raise
    handle_signals(supervisor.stopping, lambda: on_sighup(supervisor, reload_config))
    log.info(ready_line(supervisor) + f"; {config.workers} worker processes")  # type: ignore[arg-type]  # it has the config and ports ready_line reads; after the handlers: a signal sent on this line is handled
    return await serve_until(supervisor.stopping, config, supervisor.stop)


class ParentBans:
    """The parent's ban list as its mail listeners use it: a ban a mail logon causes reaches the workers at once."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def is_banned(self, address: str) -> bool:
        return bool(self.supervisor.bans.is_banned(address))

    def record_failure(self, address: str, protocol: str = "http") -> Any:
        ban = self.supervisor.bans.record_failure(address, protocol)
        if ban is not None:
            self.supervisor.push_bans()
        return ban


async def start_mail_here(supervisor: Supervisor) -> None:
    """With --workers the mail listeners run in the parent (they are not the hot path): with the parent's
    certificate context, ban list and migration window, behind a gate of their own (the allow-list,
    banned sources closed before TLS, and --max-connections counted for the mail sessions alone)."""
    from bridge.net.gate import ConnectionGuard
    from bridge.ops.allowlist import expand_allow
    from bridge.ops.window import closed_sentence
    from bridge.proxy.mail import mail_listeners
    from bridge.runtime.app import listen_mail

    config, window = supervisor.config, supervisor.window
    if not config.mail_ports:
        return
    supervisor.mail_guard = ConnectionGuard(allow=expand_allow(config.allow, config.state_dir), max_connections=config.max_connections, header_timeout=config.header_timeout)

    def closed_message() -> str | None:
        return closed_sentence(window.closed_at) if window.closed and window.closed_at is not None else None

    for flag, port, listener in mail_listeners(config, supervisor.mail_guard, supervisor.ssl_context, ParentBans(supervisor), closed_message, supervisor.mail):
        supervisor.mail_listeners.append(listener)
        await listen_mail(config, flag, port, listener)
        supervisor.mail_ports[listener.protocol] = listener.port
        window.fronts.append(listener)


def notifying_renewer(config: BridgeConfig, challenges: dict[str, str], ssl_context: Any, notify: Callable[[], None]) -> Any:
    """bridge.renewal.Renewer whose every certificate swap also tells the workers to reload."""
    from bridge.certs.renewal import Renewer

    class NotifyingRenewer(Renewer):
        def swap(self) -> None:
            super().swap()
            notify()

    return NotifyingRenewer(config, challenges, ssl_context)


# --------------------------------------------------------------------------- a worker


class WorkerBans:
    """The worker's side of bridge.bans.BanGuard: failures go to the parent, bans come from it."""

    def __init__(self, writer: asyncio.StreamWriter, bans: dict[str, float], policy: Any) -> None:
        self.writer = writer
        self.bans = bans
        self.policy = policy  # kept for bridge.status.reload_settings
        self.refused_total = 0

    def has_bans(self) -> bool:
        return bool(self.bans)

    def is_banned(self, address: str) -> bool:
        until = self.bans.get(plain_address(address))
        if until is None or until <= time.time():
            return False
        self.refused_total += 1
        return True

    def record_failure(self, address: str) -> None:
        send(self.writer, ("failure", address))


def worker_report(bridge: Any) -> dict[str, Any]:
    stats, guard = bridge.stats, bridge.guard
    stats.traffic.tick()  # a second's sample of the worker's channels (rates, stalls, bytes per user)
    return {
        "traffic": stats.traffic.report(),
        "requests": dict(stats.requests),
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
        "rpc_channels": stats.rpc_channels,
        "connections_open": guard.open_connections,
        "rejected": dict(guard.rejections),
        "refused": bridge.bans.refused_total,
        "legacy": {str(server): health.last_error for server, health in bridge.proxy.pool.health.items()},
        "passthrough": bridge.router.counters() if bridge.router is not None else {},
    }


async def serve_worker(index: int, control_fd: int, listen_fds: list[int]) -> int:
    from bridge.net.accesslog import ACCESS
    from bridge.net.tls import front_context
    from bridge.ops.bans import policy_from_config
    from bridge.ops.status import attach_counters
    from bridge.ops.window import Window
    from bridge.proxy.relay import Proxy
    from bridge.runtime.app import RunningBridge, build_front, build_router, build_upstream, handle_signals, on_sighup, publish_https_port, settle_garbage_collector, setup_logging

    control = socket.socket(fileno=control_fd)
    reader, writer = await asyncio.open_unix_connection(sock=control)
    message = await receive(reader)
    if message is None or message[0] != "start":
        return 1
    settings = message[1]
    config: BridgeConfig = settings["config"]
    setup_logging(config.log_level, f"[worker {index}]")
    ssl_context = front_context(config.cert, config.key)  # type: ignore[arg-type]  # the supervisor gives workers a config with the certificate files
    proxy = Proxy(config, build_upstream(config))
    window = Window(proxy, announce=False)  # the parent logs the window; this worker closes its own proxy and drains its connections
    window.configure(config, starting=True)
    runner = build_front(config, proxy, ssl_context)
    runner.router = await build_router(config)
    window.fronts.append(runner)
    publish_https_port(settings["public_port"], proxy, runner)
    for sock in (socket.socket(fileno=fd) for fd in listen_fds):
        await runner.listen(None, 0, sock=sock)
    bridge = RunningBridge(config, proxy, settings["public_port"], 0, ssl_context, [runner], window=window, router=runner.router)
    attach_counters(bridge, runner.guard, WorkerBans(writer, settings["bans"], policy_from_config(config)))
    if bridge.router is not None:
        bridge.router.bans = bridge.bans  # banned sources are closed before their ClientHello is read

    stop = asyncio.Event()
    handle_signals(stop, lambda: on_sighup(bridge, None), stop_signals=(signal.SIGTERM,))

    async def obey_parent() -> None:
        while (message := await receive(reader)) is not None:
            if message[0] == "bans":
                bridge.bans.bans = message[1]
            elif message[0] == "reload":
                on_sighup(bridge, lambda: message[1])
        stop.set()  # the parent is gone: nobody would restart or stop this worker

    async def report() -> None:
        while True:
            send(writer, ("stats", worker_report(bridge)))
            await asyncio.sleep(STATS_INTERVAL)

    tasks = [asyncio.create_task(obey_parent()), asyncio.create_task(report()), asyncio.create_task(window.run())]
    settle_garbage_collector()
    log.info("worker %d (pid %d) serving https on port %d", index, os.getpid(), settings["public_port"])
    send(writer, ("ready", settings["public_port"]))  # after the line: the parent's ready line follows every worker's
    await stop.wait()
    await runner.cleanup()  # drains open requests for up to --drain-timeout
    ACCESS.close()  # every access line of the drained requests is written before the exit
    send(writer, ("stats", worker_report(bridge)))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    writer.close()
    return 0


def main(argv: list[str]) -> int:
    from bridge.runtime.app import event_loop_factory

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the workers
    index, control_fd, *listen_fds = (int(arg) for arg in argv)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(serve_worker(index, control_fd, listen_fds))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
