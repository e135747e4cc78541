"""The status page's rows for SNI routing (--passthrough): per route its connections, bytes each way,
connect failures and its backend's health, for the page, /status.json, /metrics and `bridge status`.

Kept apart from bridge.ops.status, which calls these few functions. With --workers the parent's
router (port 80, health checks) is added to the workers' reported counters (``stats.passthrough``).
"""

from __future__ import annotations

import html
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

COUNTERS = ("connections", "open", "bytes_in", "bytes_out", "failures")


def add_counters(total: dict[str, dict[str, int]], more: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    for label, row in more.items():
        into = total.setdefault(label, dict.fromkeys(COUNTERS, 0))
        for name in COUNTERS:
            into[name] += row.get(name, 0)
    return total


def routes_snapshot(bridge: Any) -> list[dict[str, Any]] | None:
    """One row per route (the bridge's own first), or None without routes."""
    router = getattr(bridge, "router", None)
    if router is None:
        return None
    counters = add_counters({}, router.counters())
    add_counters(counters, getattr(bridge.stats, "passthrough", None) or {})
    health = router.health()
    rows = []
    for label, row in counters.items():
        backend = health.get(label)
        rows.append(
            {
                "route": label,
                "backend": backend["backend"] if backend else "terminated by the bridge",
                "proxy_protocol": bool(backend and backend["proxy_protocol"]),
                "state": backend["state"] if backend else "up",
                "error": backend["error"] if backend else "",
                "connect_ms": backend["connect_ms"] if backend else None,
                **row,
            }
        )
    return rows


def collect(rows: list[dict[str, Any]] | None) -> Any:
    """Prometheus families for the routes."""
    if rows is None:
        return
    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
        "connections": CounterMetricFamily("bridge_route_connections", "Connections routed by SNI (or Host on port 80), by route.", labels=["route"]),
        "open": GaugeMetricFamily("bridge_route_open_connections", "Routed connections open now, by route.", labels=["route"]),
        "bytes_in": CounterMetricFamily("bridge_route_received_bytes", "Passthrough bytes from clients to the backend, by route.", labels=["route"]),
        "bytes_out": CounterMetricFamily("bridge_route_sent_bytes", "Passthrough bytes from the backend to clients, by route.", labels=["route"]),
        "failures": CounterMetricFamily("bridge_route_connect_failures", "Failed connections to the route's backend.", labels=["route"]),
    }
    up = GaugeMetricFamily("bridge_route_backend_up", "1 when the route's backend accepted the last TCP health check.", labels=["route", "backend"])
    for row in rows:
        for name, family in families.items():
            if row["route"] == "bridge" and name in ("bytes_in", "bytes_out", "failures"):
                continue  # the terminated route's bytes are the request counters'
            family.add_metric([row["route"]], row[name])
        if row["backend"] != "terminated by the bridge":
            up.add_metric([row["route"], row["backend"]], 1 if row["state"] == "up" else 0)
    yield from families.values()
    yield up


def routes_html(rows: list[dict[str, Any]] | None, human_bytes: Any) -> str:
    if rows is None:
        return ""
    e = html.escape
    lines = []
    for row in rows:
        backend = row["backend"] + (" (PROXY v2)" if row["proxy_protocol"] else "")
        state = row["state"] + (f": {row['error']}" if row["error"] else "") + (f" ({row['connect_ms']} ms)" if row["connect_ms"] is not None else "")
        lines.append(
            f"<tr><td>{e(row['route'])}</td><td>{e(backend)}</td><td class='{e(row['state'])}'>{e(state)}</td><td>{row['connections']}</td>"
            f"<td>{row['open']}</td><td>{human_bytes(row['bytes_in'])}</td><td>{human_bytes(row['bytes_out'])}</td><td>{row['failures']}</td></tr>"
        )
    head = "<tr><th>route</th><th>backend</th><th>health</th><th>connections</th><th>open</th><th>from clients</th><th>to clients</th><th>connect failures</th></tr>"
    return f"<h2>Routes (SNI)</h2><table id='routes'>{head}{''.join(lines)}</table>\n"


def routes_rich(rows: list[dict[str, Any]] | None, human_bytes: Any) -> Any:
    if rows is None:
        return None
    from rich.table import Table

    table = Table(title="routes (SNI)", title_justify="left")
    for column in ("route", "backend", "health", "connections", "open", "from clients", "to clients", "failures"):
        table.add_column(column)
    for row in rows:
        colour = "green" if row["state"] == "up" else "bold red"
        health = f"[{colour}]{row['state']}[/] {row['error']}"
        table.add_row(row["route"], row["backend"], health, str(row["connections"]), str(row["open"]), human_bytes(row["bytes_in"]), human_bytes(row["bytes_out"]), str(row["failures"]))
    return table
