"""`bridge report`: the hand-over report for the customer's data-handling note, from the ledger.

What the migration moved and when: the window (first and last forwarded request), bytes per user and
per day, failed logons and bans, the certificates the bridge served, its runs, and the statement that
no content or credentials were stored (user names, client addresses and byte counts were). As a
rich console table, JSON (``--json FILE``) and one self-contained HTML page (``--html FILE``: no
script, no external font or image). The bridge writes the JSON and HTML into its state dir at exit
(``handover-report.json``, ``.html``); the ledger is ``bridge.ops.migration``'s.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

from bridge import __version__
from bridge.ops.units import human_bytes

REPORT_FORMAT = 1
STATEMENT = (
    "The bridge stored no message content and no credentials: no mail, attachments or request and response bodies, no headers, "
    "no passwords, password hashes or NTLM responses. It kept user names (as the clients presented them), client addresses, "
    "byte counts and times, for this report; its access log holds client address, method, path, status and byte counts only. "
    "Destroy the bridge and its state directory once the migration is complete."
)
NOBODY_LABEL = "(no user: handshake legs and anonymous requests)"


def user_label(user: str) -> str:
    return NOBODY_LABEL if user == "-" else user


def build_report(ledger: dict[str, Any]) -> dict[str, Any]:
    """The report's content (plain data, what --json writes) from the ledger's."""
    users: dict[str, list[int]] = {}
    days = []
    for day, entry in sorted(ledger["days"].items()):
        day_in = day_out = 0
        for user, (received, sent) in entry["users"].items():
            totals = users.setdefault(user, [0, 0])
            totals[0] += received
            totals[1] += sent
            day_in += received
            day_out += sent
        days.append(
            {
                "day": day,
                "bytes_in": day_in,
                "bytes_out": day_out,
                "bytes": day_in + day_out,
                "failed_logons": entry.get("failed_logons", 0),
                "users": [{"user": user, "bytes_in": r, "bytes_out": s, "bytes": r + s} for user, (r, s) in sorted(entry["users"].items())],
            }
        )
    per_user: list[dict[str, Any]] = [{"user": user, "bytes_in": r, "bytes_out": s, "bytes": r + s} for user, (r, s) in users.items()]
    per_user.sort(key=lambda item: (-item["bytes"], item["user"]))
    total_in = sum(item["bytes_in"] for item in per_user)
    total_out = sum(item["bytes_out"] for item in per_user)
    return {
        "format": REPORT_FORMAT,
        "generated": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "generator": f"exchange-bridge {__version__}",
        "fqdn": ledger.get("fqdn", ""),
        "window": {"first_forwarded": ledger["first_forwarded"], "last_forwarded": ledger["last_forwarded"]},
        "total": {"bytes_in": total_in, "bytes_out": total_out, "bytes": total_in + total_out},
        "users": per_user,
        "days": days,
        "failed_logons": sorted(ledger["failed_logons"], key=lambda item: (-item["count"], item["address"], item["user"])),
        "failed_logons_total": sum(item["count"] for item in ledger["failed_logons"]),
        "bans": ledger["bans"],
        "certificates": ledger["certificates"],
        "runs": ledger["runs"],
        "stored": ledger.get("stored", ""),
        "statement": STATEMENT,
    }


# --------------------------------------------------------------------------- console


def print_report(report: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    window = report["window"]
    console.print(Text(f"Hand-over report: exchange-bridge {report['fqdn']}", style="bold"))
    console.print(f"window: first forwarded request {window['first_forwarded'] or '-'}, last {window['last_forwarded'] or '-'} (UTC)", highlight=False)
    total = report["total"]
    console.print(f"moved: {human_bytes(total['bytes'])} ({total['bytes']} bytes: {total['bytes_in']} from clients, {total['bytes_out']} to clients)", highlight=False)
    users = Table(title="per user", title_justify="left")
    for column in ("user", "from clients", "to clients", "total"):
        users.add_column(column, justify="left" if column == "user" else "right")
    for item in report["users"]:
        users.add_row(user_label(item["user"]), str(item["bytes_in"]), str(item["bytes_out"]), human_bytes(item["bytes"]))
    console.print(users)
    days = Table(title="per day (UTC)", title_justify="left")
    for column in ("day", "from clients", "to clients", "total", "failed logons"):
        days.add_column(column, justify="left" if column == "day" else "right")
    for item in report["days"]:
        days.add_row(item["day"], str(item["bytes_in"]), str(item["bytes_out"]), human_bytes(item["bytes"]), str(item["failed_logons"]))
    console.print(days)
    failed = Table(title=f"failed logons ({report['failed_logons_total']})", title_justify="left")
    for column in ("address", "user", "count", "last"):
        failed.add_column(column)
    for item in report["failed_logons"]:
        failed.add_row(item["address"], user_label(item["user"]), str(item["count"]), item["last"] or "-")
    console.print(failed)
    bans = Table(title=f"bans ({len(report['bans'])})", title_justify="left")
    for column in ("address", "since", "until", "reason"):
        bans.add_column(column)
    for item in report["bans"]:
        bans.add_row(item["address"], item["since"] or "-", item["until"] or "-", item["reason"])
    console.print(bans)
    certificates = Table(title="certificates served", title_justify="left")
    for column in ("subject", "issuer", "serial", "SHA-256", "expires", "used"):
        certificates.add_column(column)
    for item in report["certificates"]:
        certificates.add_row(item["subject"], item["issuer"], item["serial"], item["sha256"], item["not_after"], f"{item['first_used']} to {item['last_used']}")
    console.print(certificates)
    console.print(Text("Data handling: " + report["statement"], style="dim"))


# --------------------------------------------------------------------------- HTML

CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#222}"
    "header{background:#1565c0;color:#fff;padding:1em 2em}header h1{margin:0 0 .3em}main{padding:1em 2em}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left}"
    "th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}"
    ".statement{border-left:4px solid #2e7d32;background:#f1f8e9;padding:.8em 1em;max-width:60em}"
)


def _rows(items: list[list[str]], numeric: frozenset[int] = frozenset()) -> str:
    out = []
    for cells in items:
        out.append("<tr>" + "".join(f"<td class='n'>{html.escape(cell)}</td>" if index in numeric else f"<td>{html.escape(cell)}</td>" for index, cell in enumerate(cells)) + "</tr>")
    return "".join(out)


def _table(table_id: str, headers: list[str], rows: list[list[str]], numeric: frozenset[int] = frozenset(), empty: str = "none") -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in headers)
    body = _rows(rows, numeric) if rows else f"<tr><td colspan={len(headers)}>{html.escape(empty)}</td></tr>"
    return f'<table id="{table_id}"><tr>{head}</tr>{body}</table>'


def render_html(report: dict[str, Any]) -> str:
    e = html.escape
    window = report["window"]
    total = report["total"]
    users = [[user_label(item["user"]), str(item["bytes_in"]), str(item["bytes_out"]), str(item["bytes"]), human_bytes(item["bytes"])] for item in report["users"]]
    days = [[item["day"], str(item["bytes_in"]), str(item["bytes_out"]), str(item["bytes"]), human_bytes(item["bytes"]), str(item["failed_logons"])] for item in report["days"]]
    failed = [[item["address"], user_label(item["user"]), str(item["count"]), item["last"] or "-"] for item in report["failed_logons"]]
    bans = [[item["address"], item["since"] or "-", item["until"] or "-", item["reason"]] for item in report["bans"]]
    certificates = [[item["subject"], item["issuer"], item["serial"], item["sha256"], item["not_after"], f"{item['first_used']} to {item['last_used']}"] for item in report["certificates"]]
    runs = [[item["started"] or "-", item["ended"] or f"(last seen {item['last_seen']})"] for item in report["runs"]]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
        f"<title>Exchange bridge hand-over report: {e(report['fqdn'])}</title><style>{CSS}</style></head><body>"
        f'<header><h1>Hand-over report: {e(report["fqdn"])}</h1><p id="window">Migration window: first forwarded request '
        f'<span id="first-forwarded">{e(window["first_forwarded"] or "-")}</span>, last <span id="last-forwarded">{e(window["last_forwarded"] or "-")}</span> (UTC). '
        f'Moved <span id="total-bytes" data-bytes="{total["bytes"]}">{e(human_bytes(total["bytes"]))}</span> '
        f"({total['bytes_in']} bytes from clients, {total['bytes_out']} to clients).</p></header><main>"
        f'<h2>Data handling</h2><p class="statement" id="statement">{e(report["statement"])}</p>'
        "<h2>Per user</h2>"
        + _table("users", ["user", "bytes from clients", "bytes to clients", "bytes", "total"], users, frozenset({1, 2, 3, 4}))
        + "<h2>Per day (UTC)</h2>"
        + _table("days", ["day", "bytes from clients", "bytes to clients", "bytes", "total", "failed logons"], days, frozenset({1, 2, 3, 4, 5}))
        + f"<h2>Failed logons ({report['failed_logons_total']})</h2>"
        + _table("failed-logons", ["client address", "user", "count", "last"], failed, frozenset({2}))
        + f"<h2>Bans ({len(report['bans'])})</h2>"
        + _table("bans", ["client address", "since", "until", "reason"], bans)
        + "<h2>Certificates served</h2>"
        + _table("certificates", ["subject", "issuer", "serial", "SHA-256", "expires", "used"], certificates)
        + "<h2>Bridge runs</h2>"
        + _table("runs", ["started", "stopped"], runs)
        + f"<p><small>Generated {e(report['generated'])} UTC by {e(report['generator'])} from the bridge's ledger. What the ledger holds: {e(report['stored'])}</small></p>"
        + "</main></body></html>\n"
    )


def write_report_files(ledger: dict[str, Any], base: Path) -> list[Path]:
    """``base``.json and ``base``.html from the ledger (written atomically); their paths."""
    from bridge.certs.keys import atomic_write

    report = build_report(ledger)
    json_path, html_path = base.with_suffix(".json"), base.with_suffix(".html")
    atomic_write(json_path, (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode(), mode=0o644)
    atomic_write(html_path, render_html(report).encode(), mode=0o644)
    return [json_path, html_path]
