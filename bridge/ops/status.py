"""Observability: live counters, the status listener (HTML, JSON, Prometheus) and `bridge status`.

The status listener (default ``127.0.0.1:8404``, ``--status-bind``) answers only with HTTP Basic
``admin`` and the password kept in ``STATE_DIR/status-password`` (0600, generated on first start;
there is no built-in default). ``/`` is an auto-refreshing page, ``/status.json`` what
``bridge status`` shows, ``/metrics`` the Prometheus text format (``prometheus-client``).

Counters cost the request path a few integer updates: bytes of running requests are read from
their ``Exchange`` objects when someone looks, so a channel streaming for hours is counted live.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import html
import json
import logging
import os
import secrets
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bridge import __version__
from bridge.config import parse_status_bind
from bridge.errors import ConfigError
from bridge.net.front import cached_by_path
from bridge.ops.routes import collect as collect_routes
from bridge.ops.routes import routes_html, routes_rich, routes_snapshot
from bridge.ops.units import human_bytes, human_duration

log = logging.getLogger("bridge.status")

STATUS_USER = "admin"
PASSWORD_FILE = "status-password"
REFRESH_SECONDS = 5
RPC_METHODS = frozenset({"RPC_IN_DATA", "RPC_OUT_DATA"})


# --------------------------------------------------------------------------- counters


class BridgeStats:
    """Counters the proxy updates; everything else is read from the bridge's parts on demand."""

    def __init__(self, forward_prefixes: tuple[str, ...] = (), stall_after: float = 600.0) -> None:
        from bridge.ops.traffic import TrafficView

        self.started = time.time()
        self.prefixes = tuple((prefix.lower(), prefix) for prefix in forward_prefixes)
        self.requests: Counter[tuple[str, int]] = Counter()
        self.bytes_in_done = 0
        self.bytes_out_done = 0
        self.active: dict[int, Any] = {}  # id -> Exchange of each request in progress
        self.rpc_channels = 0
        self.routes: dict[str, str] = {}  # target or path -> route label (cached_by_path)
        self.traffic = TrafficView(stall_after)  # the migration view's channels and totals per user

    def begin(self, request: Any, exchange: Any, client: Any = None) -> None:
        self.active[id(exchange)] = exchange
        if request.method in RPC_METHODS:
            self.rpc_channels += 1
            self.traffic.begin(request, exchange, client)

    def body_observer(self, exchange: Any) -> Any:
        """For a request body as it passes: a callable taking each piece (True while it wants more), or None."""
        return self.traffic.opening_observer(exchange)

    def end(self, request: Any, exchange: Any, client: Any = None) -> None:
        self.active.pop(id(exchange), None)
        if request.method in RPC_METHODS:
            self.rpc_channels -= 1
        self.traffic.end(request, exchange, client)
        self.bytes_in_done += exchange.bytes_in
        self.bytes_out_done += exchange.bytes_out
        self.requests[(self.route(request.raw_path), exchange.status)] += 1

    def route(self, target: str) -> str:
        """The forwarded virtual directory a request went to, or "other" (bounded label set)."""
        return cached_by_path(self.routes, target, self._route)

    def _route(self, path: str) -> str:
        lowered = path.lower()
        for prefix, label in self.prefixes:
            if lowered == prefix or lowered.startswith(prefix + "/"):
                return label
        return "other"

    @property
    def bytes_in(self) -> int:
        return self.bytes_in_done + sum(exchange.bytes_in for exchange in self.active.values())

    @property
    def bytes_out(self) -> int:
        return self.bytes_out_done + sum(exchange.bytes_out for exchange in self.active.values())


def certificate_summary(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {"subject": "-", "days_left": None, "not_after": None}
    try:
        from bridge.certs.keys import inspect_certificate, load_pem_chain

        info = inspect_certificate(load_pem_chain(Path(path))[0])
    except Exception as exc:  # noqa: BLE001 - the page must render even if the file went away
        return {"subject": f"unreadable: {exc}", "days_left": None, "not_after": None}
    return {"subject": info.subject, "names": info.sans, "days_left": round(info.days_left, 1), "not_after": info.not_after.isoformat()}


def snapshot(bridge: Any) -> dict[str, Any]:
    """Everything the page, the JSON and `bridge status` show (plain data)."""
    stats: BridgeStats = bridge.stats
    guard = bridge.guard
    bans = bridge.bans
    now = time.time()
    legacy = []
    for server, health in bridge.proxy.pool.health.items():
        down = bool(health.last_error)
        legacy.append({"server": str(server), "state": "down" if down else "up", "error": health.last_error})
    from bridge.ops.allowlist import describe
    from bridge.ops.bans import summary

    window = getattr(bridge, "window", None)
    return {
        "version": __version__,
        "fqdn": bridge.config.fqdn,
        "uptime_seconds": int(now - stats.started),
        "certificate": certificate_summary(getattr(bridge, "certificate_path", None) or bridge.config.cert),
        "legacy": legacy,
        "connections_open": guard.open_connections if guard else None,
        "connections_limit": guard.max_connections if guard else None,
        "rpc_channels_open": stats.rpc_channels,
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
        "requests": [{"route": route, "status": status, "count": count} for (route, status), count in sorted(stats.requests.items())],
        "rejected": dict(sorted(guard.rejections.items())) if guard else {},
        "auth_failures": bans.failures_total if bans else 0,
        "bans_total": bans.bans_total if bans else 0,
        "banned_requests": bans.refused_total if bans else 0,
        "bans": summary(bans.active().items()) if bans else [],
        "window": window.describe(now) if window is not None else {"expires_at": None, "expires": None, "basis": "", "seconds_left": None, "expired": False},
        "allow": describe(bridge.config.allow, bridge.config.state_dir),
        "routes": routes_snapshot(bridge),
        "migration": migration.describe(now) if (migration := getattr(bridge, "migration", None)) is not None else None,
        "mail": mail_snapshot(bridge),
    }


def mail_snapshot(bridge: Any) -> dict[str, Any]:
    """Per mail protocol: open sessions, finished ones by result, logons, bytes each way, failed logons
    counted towards bans (bridge.proxy.mail.MailStats; empty when no mail listener runs)."""
    stats = getattr(bridge, "mail", None)
    ports = getattr(bridge, "mail_ports", None) or {}
    bans = getattr(bridge, "bans", None)
    if stats is None or not ports:
        return {}
    opened, received, sent = stats.open_sessions(), stats.bytes_in(), stats.bytes_out()
    failures = getattr(bans, "failures_by_protocol", {})
    return {
        protocol: {
            "port": port,
            "sessions_open": opened[protocol],
            "sessions": {result: count for (name, result), count in sorted(stats.sessions.items()) if name == protocol},
            "logons": {"ok": stats.logons[(protocol, "ok")], "failed": stats.logons[(protocol, "failed")]},
            "ban_failures": failures.get(protocol, 0),
            "bytes_in": received[protocol],
            "bytes_out": sent[protocol],
        }
        for protocol, port in sorted(ports.items())
    }


def mail_metrics(data: dict[str, Any], failures_by_protocol: dict[str, int]) -> Any:
    """The mail protocols' Prometheus families (a label per protocol), and failed logons by protocol."""
    by_protocol = CounterMetricFamily("bridge_auth_failures_by_protocol", "Failed logons counted towards bans, by protocol (http: an upstream 401).", labels=["protocol"])
    for protocol, count in sorted(failures_by_protocol.items()):
        by_protocol.add_metric([protocol], count)
    yield by_protocol
    if not data:
        return
    sessions = CounterMetricFamily("bridge_mail_sessions", "Finished mail sessions, by protocol and result.", labels=["protocol", "result"])
    logons = CounterMetricFamily("bridge_mail_logons", "Mail logons, by protocol and outcome.", labels=["protocol", "outcome"])
    opened = GaugeMetricFamily("bridge_mail_sessions_open", "Open mail sessions, by protocol.", labels=["protocol"])
    received = CounterMetricFamily("bridge_mail_received_bytes", "Bytes received from mail clients, by protocol.", labels=["protocol"])
    sent = CounterMetricFamily("bridge_mail_sent_bytes", "Bytes sent to mail clients, by protocol.", labels=["protocol"])
    for protocol, entry in data.items():
        for result, count in entry["sessions"].items():
            sessions.add_metric([protocol, result], count)
        for outcome, count in entry["logons"].items():
            logons.add_metric([protocol, outcome], count)
        opened.add_metric([protocol], entry["sessions_open"])
        received.add_metric([protocol], entry["bytes_in"])
        sent.add_metric([protocol], entry["bytes_out"])
    yield from (sessions, logons, opened, received, sent)


class SnapshotCollector:
    """Prometheus collector that reads a snapshot at scrape time."""

    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge

    def collect(self) -> Any:
        data = snapshot(self.bridge)
        yield _gauge("bridge_uptime_seconds", "Seconds since the bridge started.", data["uptime_seconds"])
        days = data["certificate"]["days_left"]
        if days is not None:
            yield _gauge("bridge_certificate_days_left", "Days until the front certificate expires.", days)
        up = GaugeMetricFamily("bridge_legacy_up", "1 when the legacy server's last connection attempt succeeded.", labels=["server"])
        for entry in data["legacy"]:
            up.add_metric([entry["server"]], 1 if entry["state"] == "up" else 0)
        yield up
        if data["connections_open"] is not None:
            yield _gauge("bridge_client_connections", "Open client connections on the HTTPS port.", data["connections_open"])
            yield _gauge("bridge_client_connections_limit", "The --max-connections setting.", data["connections_limit"])
        yield _gauge("bridge_rpc_channels", "Outlook Anywhere RPC_IN_DATA/RPC_OUT_DATA requests in progress.", data["rpc_channels_open"])
        yield _counter("bridge_received_bytes", "Request body bytes received from clients.", data["bytes_in"])
        yield _counter("bridge_sent_bytes", "Response body bytes sent to clients.", data["bytes_out"])
        requests = CounterMetricFamily("bridge_requests", "Requests answered, by forwarded route and status.", labels=["route", "status"])
        for entry in data["requests"]:
            requests.add_metric([entry["route"], str(entry["status"])], entry["count"])
        yield requests
        rejected = CounterMetricFamily("bridge_rejected", "Connections or request heads refused before the proxy, by reason.", labels=["reason"])
        for reason, count in data["rejected"].items():
            rejected.add_metric([reason], count)
        yield rejected
        yield _counter("bridge_auth_failures", "Upstream 401 answers to requests carrying final credentials.", data["auth_failures"])
        yield _counter("bridge_bans", "Bans made by the brute-force guard since start.", data["bans_total"])
        yield _counter("bridge_banned_requests", "Requests refused with 403 because the client is banned.", data["banned_requests"])
        yield _gauge("bridge_bans_active", "Addresses banned right now.", len(data["bans"]))
        yield from mail_metrics(data["mail"], dict(getattr(self.bridge.bans, "failures_by_protocol", {})))
        window = data["window"]
        yield _gauge("bridge_window_expired", "1 once the migration window (--expire-at/--expire-after) has closed: requests get 503.", 1 if window["expired"] else 0)
        if window["seconds_left"] is not None:
            yield _gauge("bridge_window_seconds_left", "Seconds until the migration window closes (0 once closed).", window["seconds_left"])
        yield from collect_routes(data["routes"])
        view = data["migration"]
        if view is not None:
            yield _gauge("bridge_rpc_channels_stalled", "Open Outlook Anywhere channels that moved no byte for --stall-after.", view["stalled"])
            yield _counter("bridge_rpc_channel_stalls", "Outlook Anywhere channels flagged stalled since start.", view["stalls_total"])
            yield _counter("bridge_migration_bytes", "Bytes moved for the migration, both ways, as the ledger has them (persists across restarts).", view["total"]["bytes"])
            minutes = view["throughput"]["minutes"]
            if len(minutes) > 1:
                previous = minutes[-2]
                yield _gauge("bridge_throughput_last_minute_bytes", "Bytes moved, both ways, in the last whole minute.", previous[1] + previous[2])


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


# --------------------------------------------------------------------------- the listener


def status_password(state_dir: Path) -> str:
    """The status password, generated (0600) on first use; never a built-in default."""
    path = Path(state_dir) / PASSWORD_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if text:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("%s was readable by others; made it 0600", path)
        return text
    from bridge.certs.keys import atomic_write

    password = secrets.token_urlsafe(18)
    atomic_write(path, (password + "\n").encode(), mode=0o600)
    log.info("generated the status page password in %s", path)
    return password


class StatusPage:
    def __init__(self, bridge: Any, password: str) -> None:
        self.bridge = bridge
        self.expected = f"{STATUS_USER}:{password}".encode()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(bridge))
        self.refused = 0

    @web.middleware
    async def authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        try:
            given = base64.b64decode(token.strip(), validate=True) if scheme.lower() == "basic" else b""
        except ValueError:
            given = b""
        if not hmac.compare_digest(given, self.expected):
            self.refused += 1
            if header:
                log.warning("status page: wrong credentials from %s", request.remote)
            response = web.Response(status=401, text="The status page needs the user admin and the password from the state directory.\n")
            response.headers["WWW-Authenticate"] = 'Basic realm="exchange-bridge status", charset="UTF-8"'
            return response
        response = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=render_html(snapshot(self.bridge)), content_type="text/html")

    async def json(self, request: web.Request) -> web.Response:
        return web.json_response(snapshot(self.bridge))

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self.authenticate])
        app.router.add_get("/", self.page)
        app.router.add_get("/status.json", self.json)
        app.router.add_get("/metrics", self.metrics)
        return app


async def start_status_listener(bridge: Any) -> tuple[web.AppRunner, int] | None:
    """Start the status listener per --status-bind; None when it is off or its port is taken."""
    address = parse_status_bind(bridge.config.status_bind)
    if address is None:
        return None
    host, port = address
    password = status_password(bridge.config.state_dir)
    runner = web.AppRunner(StatusPage(bridge, password).application(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host=host, port=port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        # The status page is secondary to the migration: say so and keep the bridge running.
        log.error("status page not started: cannot listen on %s:%d (%s); choose another --status-bind or off", host, port, exc.strerror or exc)
        return None
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    where = f"[{host}]" if ":" in host else host
    if not host.startswith("127.") and host not in ("::1", "localhost"):
        log.warning("the status page listens on %s, which is not loopback: its Basic password travels in clear text", host)
    log.info("status page on http://%s:%d/ (user %s, password in %s)", where, bound, STATUS_USER, Path(bridge.config.state_dir) / PASSWORD_FILE)
    return runner, bound


# --------------------------------------------------------------------------- rendering


def window_text(window: dict[str, Any]) -> tuple[str, str]:
    """The migration window in words, and the page's CSS class for it."""
    if window["expires"] is None:
        return "none set (forwards until stopped)", "up"
    if window["expired"]:
        return f"CLOSED at {window['expires']}: requests get 503; extend it with a later expire_at and SIGHUP", "down"
    return f"closes at {window['expires']}, in {human_duration(window['seconds_left'])} ({window['basis']})", "up"


def allow_text(allow: dict[str, Any]) -> str:
    if not allow["sources"]:
        return "any source"
    text = ", ".join(allow["sources"])
    listed = allow["exchange_online"]
    if listed is not None:
        if "error" in listed:
            return f"{text} ({listed['error']})"
        origin = "packaged snapshot" if listed["packaged"] else "refreshed"
        text += f" (Exchange Online: {listed['ranges']} ranges of {listed['date']}, {origin}, from {listed['source']})"
    return text


def mail_rows(mail: dict[str, Any]) -> str:
    """One overview row per mail protocol (none when no mail listener runs)."""
    rows = []
    for protocol, entry in mail.items():
        text = (
            f"port {entry['port']}: {entry['sessions_open']} open, {sum(entry['sessions'].values())} finished, "
            f"{entry['logons']['ok']} logons, {entry['logons']['failed']} failed, "
            f"{human_bytes(entry['bytes_in'])} in, {human_bytes(entry['bytes_out'])} out"
        )
        rows.append(f'<tr><th>{html.escape(protocol.upper())}</th><td id="mail-{html.escape(protocol)}">{html.escape(text)}</td></tr>\n')
    return "".join(rows)


def render_html(data: dict[str, Any]) -> str:
    e = html.escape
    cert = data["certificate"]
    days = "-" if cert["days_left"] is None else f"{cert['days_left']:.0f} days left"
    legacy_rows = "".join(f"<tr><td>{e(entry['server'])}</td><td class='{e(entry['state'])}'>{e(entry['state'])}</td><td>{e(entry['error'])}</td></tr>" for entry in data["legacy"])
    request_rows = "".join(f"<tr><td>{e(entry['route'])}</td><td>{entry['status']}</td><td>{entry['count']}</td></tr>" for entry in data["requests"]) or "<tr><td colspan=3>none yet</td></tr>"
    rejected_rows = "".join(f"<tr><td>{e(reason)}</td><td>{count}</td></tr>" for reason, count in data["rejected"].items()) or "<tr><td colspan=2>none</td></tr>"
    ban_rows = "".join(f"<tr><td>{e(ban['address'])}</td><td>{human_duration(ban['seconds_left'])}</td><td>{e(ban['reason'])}</td></tr>" for ban in data["bans"]) or "<tr><td colspan=3>none</td></tr>"
    connections = "-" if data["connections_open"] is None else f"{data['connections_open']} of {data['connections_limit']}"
    window, window_class = window_text(data["window"])
    allow = allow_text(data["allow"])
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>exchange-bridge {e(data['fqdn'])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;margin-bottom:1.2em}}
td,th{{border:1px solid #bbb;padding:.25em .6em;text-align:left}}th{{background:#eee}}.up{{color:#070}}.down{{color:#b00;font-weight:bold}}
td.n{{text-align:right;font-variant-numeric:tabular-nums}}tr.stalled td{{background:#fdecea}}svg text{{font:11px sans-serif;fill:#333}}</style>
</head><body>
<h1>exchange-bridge {e(data['fqdn'])}</h1>
<table>
<tr><th>uptime</th><td id="uptime">{human_duration(data['uptime_seconds'])}</td></tr>
<tr><th>certificate</th><td id="certificate">{e(cert['subject'])} ({e(days)})</td></tr>
<tr><th>migration window</th><td id="window" class="{window_class}">{e(window)}</td></tr>
<tr><th>allowed sources</th><td id="allow">{e(allow)}</td></tr>
<tr><th>client connections</th><td id="connections">{connections}</td></tr>
<tr><th>RPC channels</th><td id="rpc">{data['rpc_channels_open']}</td></tr>
<tr><th>bytes from clients</th><td id="bytes-in">{data['bytes_in']} ({human_bytes(data['bytes_in'])})</td></tr>
<tr><th>bytes to clients</th><td id="bytes-out">{data['bytes_out']} ({human_bytes(data['bytes_out'])})</td></tr>
<tr><th>failed logons</th><td id="auth-failures">{data['auth_failures']}</td></tr>
<tr><th>bans made / requests refused</th><td id="bans">{data['bans_total']} / {data['banned_requests']}</td></tr>
{mail_rows(data["mail"])}</table>
{migration_html(data["migration"])}
<h2>Legacy servers</h2><table><tr><th>server</th><th>state</th><th>last error</th></tr>{legacy_rows}</table>
<h2>Requests</h2><table id="requests"><tr><th>route</th><th>status</th><th>count</th></tr>{request_rows}</table>
{routes_html(data.get("routes"), human_bytes)}<h2>Refused before the proxy</h2><table id="rejected"><tr><th>reason</th><th>count</th></tr>{rejected_rows}</table>
<h2>Current bans</h2><table id="current-bans"><tr><th>address</th><th>time left</th><th>reason</th></tr>{ban_rows}</table>
<p>exchange-bridge {e(data['version'])} &middot; refreshes every {REFRESH_SECONDS} s &middot; <a href="/metrics">metrics</a> &middot; <a href="/status.json">json</a></p>
</body></html>
"""


CHART_WIDTH = 720
CHART_HEIGHT = 160
CHART_LEFT = 84
CHART_BOTTOM = 20
COLOUR_IN = "#1565c0"  # bytes from clients (RPC_IN_DATA, uploads)
COLOUR_OUT = "#2e7d32"  # bytes to clients (RPC_OUT_DATA: the mailbox data)


def clock_label(moment: float) -> str:
    return time.strftime("%H:%M", time.gmtime(moment))


def throughput_svg(throughput: dict[str, Any]) -> str:
    """The per-minute throughput as an inline SVG bar chart (no script, no font file): bytes to clients
    stacked on bytes from clients, one bar per minute; each bar carries its numbers (data-* and a title)."""
    minutes = throughput["minutes"]
    step = throughput["step"]
    plot_width = CHART_WIDTH - CHART_LEFT - 8
    plot_height = CHART_HEIGHT - CHART_BOTTOM - 10
    peak = max((received + sent for _, received, sent in minutes), default=0)
    scale = plot_height / peak if peak else 0.0
    width = plot_width / max(1, len(minutes))
    bars = []
    for index, (start, received, sent) in enumerate(minutes):
        if not (received or sent):
            continue
        x = CHART_LEFT + index * width
        base = CHART_HEIGHT - CHART_BOTTOM
        title = f"{clock_label(start)} UTC: {received} bytes from clients, {sent} bytes to clients"
        parts = []
        height_in = received * scale
        height_out = sent * scale
        if received:
            parts.append(f'<rect class="in" x="{x:.2f}" y="{base - height_in:.2f}" width="{max(width - 0.3, 0.6):.2f}" height="{max(height_in, 1):.2f}" fill="{COLOUR_IN}"/>')
        if sent:
            parts.append(f'<rect class="out" x="{x:.2f}" y="{base - height_in - height_out:.2f}" width="{max(width - 0.3, 0.6):.2f}" height="{max(height_out, 1):.2f}" fill="{COLOUR_OUT}"/>')
        bars.append(f'<g class="minute" data-minute="{start}" data-in="{received}" data-out="{sent}"><title>{html.escape(title)}</title>{"".join(parts)}</g>')
    total_in = sum(received for _, received, _ in minutes)
    total_out = sum(sent for _, _, sent in minutes)
    first = minutes[0][0] if minutes else 0
    last = minutes[-1][0] + step if minutes else 0
    bottom = CHART_HEIGHT - CHART_BOTTOM
    return (
        f'<svg id="throughput-chart" xmlns="http://www.w3.org/2000/svg" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" '
        f'role="img" aria-label="bytes per minute" data-peak="{peak}" data-total-in="{total_in}" data-total-out="{total_out}" data-minutes="{len(minutes)}">'
        f'<rect x="{CHART_LEFT}" y="10" width="{plot_width}" height="{plot_height}" fill="#fafafa" stroke="#ccc"/>'
        f'<text id="chart-peak" x="{CHART_LEFT - 4}" y="18" text-anchor="end">{html.escape(human_bytes(peak))}/min</text>'
        f'<text x="{CHART_LEFT - 4}" y="{bottom}" text-anchor="end">0</text>'
        f'<text x="{CHART_LEFT}" y="{CHART_HEIGHT - 5}">{clock_label(first)}</text>'
        f'<text x="{CHART_WIDTH - 8}" y="{CHART_HEIGHT - 5}" text-anchor="end">{clock_label(last)} UTC</text>' + "".join(bars) + "</svg>"
    )


def channel_rows(view: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for pair in view["pairs"]:
        label = pair["pair"].removeprefix("vc:")[:8] if pair["paired_by"] == "cookie" else pair["pair"]
        for channel in pair["in"] + pair["out"]:
            stalled = " class='stalled'" if channel["stalled"] else ""
            state = "<b class='down'>stalled</b>" if channel["stalled"] else "moving" if channel["idle_seconds"] < 5 else "idle"
            rows.append(
                f"<tr{stalled} data-channel='{channel['id']}' data-pair='{e(pair['pair'])}' data-direction='{channel['direction']}' data-user='{e(channel['user'])}' "
                f"data-bytes='{channel['bytes']}' data-rate='{channel['rate']}' data-stalled='{str(channel['stalled']).lower()}'>"
                f"<td title='{e(pair['pair'])} (paired by {pair['paired_by']})'>{e(label)}</td><td>{channel['direction']}</td><td>{e(channel['client'])}</td><td>{e(channel['user'])}</td>"
                f"<td class='n'>{human_bytes(channel['bytes'])}</td><td class='n'>{human_bytes(channel['rate'])}/s</td><td>{human_duration(channel['age_seconds'])}</td>"
                f"<td>{human_duration(channel['idle_seconds'])}</td><td>{state}</td></tr>"
            )
    return "".join(rows) or "<tr><td colspan=9>no Outlook Anywhere channel open</td></tr>"


def migration_html(view: dict[str, Any] | None) -> str:
    if view is None:
        return ""
    e = html.escape
    total = view["total"]
    user_rows = (
        "".join(
            f"<tr data-user='{e(item['user'])}' data-bytes='{item['bytes']}'><td>{e(item['user'])}</td>"
            f"<td class='n'>{item['bytes_in']}</td><td class='n'>{item['bytes_out']}</td><td class='n'>{human_bytes(item['bytes'])}</td></tr>"
            for item in view["users"]
        )
        or "<tr><td colspan=4>nothing moved yet</td></tr>"
    )
    return f"""<h2>Migration</h2>
<p id="migration-summary">{view['channels_open']} Outlook Anywhere channels open, <span id="stalled" class="{'down' if view['stalled'] else 'up'}">{view['stalled']} stalled</span>
(no byte for {human_duration(view['stall_after'])}); moved <span id="migration-total" data-bytes="{total['bytes']}">{human_bytes(total['bytes'])}</span>
since {e(view['first_forwarded'] or '-')}, last request {e(view['last_forwarded'] or '-')} (UTC).</p>
<figure>{throughput_svg(view['throughput'])}<figcaption>bytes per minute, last {len(view['throughput']['minutes'])} minutes:
<span style="color:{COLOUR_OUT}">&#9632; to clients</span> on <span style="color:{COLOUR_IN}">&#9632; from clients</span></figcaption></figure>
<table id="channels"><tr><th>connection</th><th>channel</th><th>client</th><th>user</th><th>bytes</th><th>rate (1 min)</th><th>age</th><th>since last byte</th><th>state</th></tr>
{channel_rows(view)}</table>
<table id="users"><tr><th>user</th><th>bytes from clients</th><th>bytes to clients</th><th>total</th></tr>{user_rows}
<tr><th>all</th><td class='n'>{total['bytes_in']}</td><td class='n'>{total['bytes_out']}</td><td class='n'>{human_bytes(total['bytes'])}</td></tr></table>
"""


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[int], width: int = 72) -> str:
    """``values`` squeezed into at most ``width`` block characters (groups summed), scaled to the largest."""
    if not values:
        return ""
    group = max(1, -(-len(values) // width))
    sums = [sum(values[index : index + group]) for index in range(0, len(values), group)]
    peak = max(sums)
    if not peak:
        return " " * len(sums)
    return "".join(" " if value == 0 else SPARK[min(len(SPARK) - 1, int(value * (len(SPARK) - 1) / peak + 0.999))] for value in sums)


def render_migration_rich(view: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    minutes = view["throughput"]["minutes"]
    totals = [received + sent for _, received, sent in minutes]
    peak = max(totals, default=0)
    summary = Table.grid(padding=(0, 2))
    summary.add_row("throughput", f"{sparkline(totals)}  peak {human_bytes(peak)}/min over {len(minutes)} min")
    summary.add_row(
        "migration",
        f"{human_bytes(view['total']['bytes'])} moved since {view['first_forwarded'] or '-'}; "
        f"{view['channels_open']} channels, {view['stalled']} stalled (no byte for {human_duration(view['stall_after'])})",
    )
    channels = Table(title="Outlook Anywhere channels", title_justify="left")
    for column in ("connection", "dir", "client", "user", "bytes", "rate", "age", "idle", "state"):
        channels.add_column(column)
    for pair in view["pairs"]:
        label = pair["pair"].removeprefix("vc:")[:8] if pair["paired_by"] == "cookie" else pair["pair"]
        for channel in pair["in"] + pair["out"]:
            state = "[bold red]stalled[/]" if channel["stalled"] else "moving" if channel["idle_seconds"] < 5 else "idle"
            channels.add_row(
                label,
                channel["direction"],
                channel["client"],
                channel["user"],
                human_bytes(channel["bytes"]),
                f"{human_bytes(channel['rate'])}/s",
                human_duration(channel["age_seconds"]),
                human_duration(channel["idle_seconds"]),
                state,
            )
    users = Table(title="moved per user", title_justify="left")
    for column in ("user", "from clients", "to clients", "total"):
        users.add_column(column)
    for item in view["users"]:
        users.add_row(item["user"], str(item["bytes_in"]), str(item["bytes_out"]), human_bytes(item["bytes"]))
    users.add_row("[bold]all[/]", str(view["total"]["bytes_in"]), str(view["total"]["bytes_out"]), human_bytes(view["total"]["bytes"]))
    return [summary, channels, users]


# --------------------------------------------------------------------------- `bridge status`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="status listener URL (default: from --status-bind, http://127.0.0.1:8404)")
    parser.add_argument("--status-bind", help="the bridge's --status-bind, to find the URL")
    parser.add_argument("--state-dir", type=Path, help="the bridge's state directory, to read the password")
    parser.add_argument("--config", type=Path, help="the bridge's TOML config, to find status_bind and state_dir")
    parser.add_argument("--password-file", type=Path, help="file holding the status password (default: STATE_DIR/status-password)")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit (no live view)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON snapshot and exit")
    parser.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between refreshes of the live view (default 2)")


def _client_settings(args: argparse.Namespace) -> tuple[str, Path]:
    from bridge.config import load_settings

    settings = load_settings(args.config)
    state_dir = args.state_dir or settings.state_dir
    url = args.url
    if not url:
        address = parse_status_bind(args.status_bind or settings.status_bind)
        if address is None:
            raise ConfigError("The status listener is off (--status-bind off); start the bridge with --status-bind 127.0.0.1:8404.")
        host, port = address
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    return url.rstrip("/"), args.password_file or state_dir / PASSWORD_FILE


def fetch(url: str, password_file: Path, timeout: float = 5.0) -> dict[str, Any]:
    try:
        password = password_file.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{password_file} does not exist; give the bridge's --state-dir (the bridge writes the password there on first start).") from None
    except PermissionError:
        raise ConfigError(f"{password_file} is not readable by this user; run as the bridge's user or root.") from None
    token = base64.b64encode(f"{STATUS_USER}:{password}".encode()).decode()
    request = urllib.request.Request(url + "/status.json", headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise ConfigError(f"The status page at {url} refused the password in {password_file}; point --state-dir at the running bridge's state directory.") from None
        raise ConfigError(f"The status page at {url} answered {exc.code}; check --url.") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"No status page at {url} ({reason}); is the bridge running, and with which --status-bind?") from None


def render_rich(data: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    cert = data["certificate"]
    overview = Table.grid(padding=(0, 2))
    overview.add_row("bridge", f"{data['fqdn']} (exchange-bridge {data['version']}), up {human_duration(data['uptime_seconds'])}")
    days = "-" if cert["days_left"] is None else f"{cert['days_left']:.0f} days left"
    overview.add_row("certificate", f"{cert['subject']}, {days}")
    overview.add_row("window", window_text(data["window"])[0])
    overview.add_row("allowed", allow_text(data["allow"]))
    overview.add_row("connections", f"{data['connections_open']} of {data['connections_limit']}, RPC channels {data['rpc_channels_open']}")
    overview.add_row("traffic", f"{human_bytes(data['bytes_in'])} from clients, {human_bytes(data['bytes_out'])} to clients")
    overview.add_row("logons", f"{data['auth_failures']} failed, {data['bans_total']} bans, {data['banned_requests']} requests refused")
    legacy = Table(title="legacy servers", title_justify="left")
    for column in ("server", "state", "last error"):
        legacy.add_column(column)
    for entry in data["legacy"]:
        colour = "green" if entry["state"] == "up" else "bold red"
        legacy.add_row(entry["server"], f"[{colour}]{entry['state']}[/]", entry["error"])
    requests = Table(title="requests", title_justify="left")
    for column in ("route", "status", "count"):
        requests.add_column(column)
    for entry in data["requests"]:
        requests.add_row(entry["route"], str(entry["status"]), str(entry["count"]))
    bans = Table(title="bans", title_justify="left")
    for column in ("address", "time left", "reason"):
        bans.add_column(column)
    for ban in data["bans"]:
        bans.add_row(ban["address"], human_duration(ban["seconds_left"]), ban["reason"])
    parts: list[Any] = [overview]
    if data.get("migration") is not None:
        parts.extend(render_migration_rich(data["migration"]))
    parts += [legacy, requests]
    routes = routes_rich(data.get("routes"), human_bytes)
    if routes is not None:
        parts.append(routes)
    if data["rejected"]:
        rejected = Table(title="refused before the proxy", title_justify="left")
        rejected.add_column("reason")
        rejected.add_column("count")
        for reason, count in data["rejected"].items():
            rejected.add_row(reason, str(count))
        parts.append(rejected)
    parts.append(bans)
    return Group(*parts)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    url, password_file = _client_settings(args)
    data = fetch(url, password_file)
    console = Console()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    if args.once:
        console.print(render_rich(data))
        return 0
    interval = max(args.interval, 0.2)
    try:
        with Live(render_rich(data), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(render_rich(fetch(url, password_file)))
    except KeyboardInterrupt:
        return 0


# --------------------------------------------------------------------------- wiring into a running bridge


def attach_counters(bridge: Any, guard: Any, bans: Any) -> None:
    """The HTTPS front end's guard, the bans (a BanGuard, or a worker's view of the parent's) and new
    counters, on the bridge and its proxy (which updates them per request)."""
    bridge.guard, bridge.bans, bridge.stats = guard, bans, BridgeStats(bridge.config.forward_paths, bridge.config.stall_after)
    bridge.proxy.bans, bridge.proxy.stats, bridge.proxy.guard = bridge.bans, bridge.stats, guard


async def attach_operations(bridge: Any, guard: Any, https_runner: Any) -> None:
    """Bans, counters and the status listener for a started bridge; drains take --drain-timeout."""
    from bridge.ops.bans import BanGuard, policy_from_config

    config = bridge.config
    attach_counters(bridge, guard, BanGuard(config.state_dir, policy_from_config(config)))
    https_runner.drain_timeout = config.drain_timeout
    if config.allow:
        log.info("only %s may connect (--allow)", ", ".join(str(entry) for entry in config.allow))
    bridge.bans.restore_hooks()
    bridge.background.append(asyncio.create_task(bridge.bans.run_forever(), name="ban-housekeeping"))
    from bridge.ops.migration import MigrationView

    traffic = bridge.stats.traffic
    bridge.migration = MigrationView(bridge, traffic.report, local=traffic)
    bridge.background.append(asyncio.create_task(bridge.migration.run(), name="migration-view"))
    started = await start_status_listener(bridge)
    if started is not None:
        runner, bridge.status_port = started
        bridge.runners.insert(0, runner)  # closed last, so the page shows the drain


def reload_settings(bridge: Any, new: Any) -> None:
    """Apply a re-read configuration (SIGHUP) without dropping connections: one process, the --workers
    parent (whose ``guard`` is the workers' totals) and each worker alike."""
    from bridge.config import apply_reload
    from bridge.ops.allowlist import expand_allow
    from bridge.ops.bans import policy_from_config

    allow = expand_allow(new.allow, bridge.config.state_dir)  # first: a list that cannot be read keeps the whole running configuration
    changed = apply_reload(bridge.config, new)
    if changed:
        log.warning("SIGHUP: %s changed; restart the bridge to apply %s", ", ".join(changed), "them" if len(changed) > 1 else "it")
    if bridge.guard is not None:
        bridge.guard.apply(allow, new.max_connections, new.header_timeout)
    mail_guard = getattr(bridge, "mail_guard", None)  # the --workers parent's mail listeners: a gate of their own
    if mail_guard is not None:
        mail_guard.apply(allow, new.max_connections, new.header_timeout)
    window = getattr(bridge, "window", None)
    if window is not None:
        window.configure(bridge.config)
    if bridge.bans is not None:
        bridge.bans.policy = policy_from_config(new)
    traffic = getattr(bridge.stats, "traffic", None)
    if traffic is not None:
        traffic.stall_after = new.stall_after
    bridge.proxy.pool.connect_timeout = new.connect_timeout
    router = getattr(bridge, "router", None)
    if router is not None:
        router.connect_timeout, router.idle_timeout = new.connect_timeout, new.idle_timeout
    for runner in bridge.runners:
        guard = getattr(runner, "guard", None)  # the front servers (bridge.net.front.FrontServer): 443, and port 80
        if guard is None or guard is mail_guard:
            continue
        runner.drain_timeout = new.drain_timeout
        if guard is bridge.guard:
            runner.keepalive_timeout = new.idle_timeout
        else:  # port 80: no allow-list (ACME validation comes from unpublished addresses)
            guard.apply((), new.max_connections, new.header_timeout)
    logging.getLogger().setLevel(getattr(logging, new.log_level.upper(), logging.INFO))
    log.info("configuration reloaded (allow-list: %s, max connections %d)", ", ".join(map(str, new.allow)) or "any source", new.max_connections)
