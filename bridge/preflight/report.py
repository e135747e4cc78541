"""Rendering a preflight report: a rich console table, versioned JSON, and one self-contained HTML file.

Nothing here sees the password: reports are built from Check objects, which never hold it.
"""

from __future__ import annotations

import asyncio
import html
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from bridge.certs.keys import atomic_write
from bridge.preflight.checks import planned_checks, run_preflight
from bridge.preflight.model import SCHEMA, Check, Report, Settings, worst

STATUS_COLOURS = {"pass": "#2e7d32", "warn": "#e65100", "fail": "#c62828", "skip": "#757575"}
RICH_STYLES = {"pass": "bold green", "warn": "bold yellow", "fail": "bold red", "skip": "dim"}
SIDE_TITLES = {"legacy": "Legacy server", "bridge": "Bridge"}

DATA_HANDLING_NOTE = (
    "The bridge terminates TLS: whoever runs it could technically read mailbox traffic as it passes. "
    "It logs and stores no mail content and no credentials (its access log holds the client address, method, path, status and byte counts only), "
    "and it should be destroyed once the migration is complete (terraform destroy, and delete its DNS record)."
)

# Checks that make up each hop of the path picture.
FRONT_HOP = ("bridge.dns", "bridge.tcp", "bridge.tls.modern", "bridge.certificate")
BACK_HOP_PREFIXES = ("bridge.http.", "bridge.logon.", "bridge.autodiscover", "bridge.rpc.", "bridge.outlook_anywhere")


# --------------------------------------------------------------------------- running with progress


def run_with_progress(settings: Settings, console: Console | None = None) -> Report:
    """Run the checks with a progress display on stderr (only when stderr is a terminal)."""
    console = console or Console(stderr=True)
    total = len(planned_checks(settings))
    columns = (SpinnerColumn(), TextColumn("[bold]preflight[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("resolving names", total=total)

        def on_result(check: Check) -> None:
            progress.update(task, advance=1, description=f"{check.id}: {check.status}")

        return asyncio.run(run_preflight(settings, on_result))


# --------------------------------------------------------------------------- console


def counts(report: Report) -> dict[str, int]:
    return {status: sum(1 for check in report.checks if check.status == status) for status in ("pass", "warn", "fail", "skip")}


def verdict_line(report: Report) -> str:
    tally = counts(report)
    return f"{report.verdict.upper()}: {tally['fail']} failed, {tally['warn']} warnings, {tally['pass']} passed, {tally['skip']} skipped in {report.duration:.1f} s"


def side_title(report: Report, side: str) -> str:
    settings = report.settings
    if side == "legacy":
        return f"{SIDE_TITLES[side]} {settings.legacy}"
    if not settings.fqdn:
        return f"{SIDE_TITLES[side]} (not checked)"
    where = f" at {settings.bridge_addr}" if settings.bridge_addr else ""
    return f"{SIDE_TITLES[side]} {settings.fqdn}{where} (https {settings.https_port}, http {settings.http_port})"


def print_report(report: Report, console: Console | None = None) -> None:
    console = console or Console()
    for side in ("legacy", "bridge"):
        table = Table(title=side_title(report, side), title_justify="left", title_style="bold", expand=True)
        table.add_column("", no_wrap=True, width=4)
        table.add_column("check", no_wrap=True, style="cyan")
        table.add_column("result and fix", ratio=1, overflow="fold")
        for check in report.by_side(side):
            result = Text(check.summary)
            if check.fix:
                result.append("\n" + check.fix, style="dim")
            table.add_row(Text(check.status.upper(), style=RICH_STYLES[check.status]), check.id, result)
        console.print(table)
    certificate = report.get("legacy.certificate")
    if certificate is not None and certificate.details.get("pin_flag"):
        console.print(Text.assemble("Legacy certificate pin: ", (certificate.details["pin_flag"], "bold")), soft_wrap=True)
    console.print(Text(verdict_line(report), style=RICH_STYLES[report.verdict]))
    console.print("\nNext, in Exchange Online PowerShell:", highlight=False)
    for line in next_steps(report):
        console.print(Text("  " + line), soft_wrap=True)
    console.print(Text("\nData handling: " + DATA_HANDLING_NOTE, style="dim"))


# --------------------------------------------------------------------------- next steps


def next_steps(report: Report) -> list[str]:
    """The PowerShell to run next, filled in with what preflight found (placeholders otherwise)."""
    settings, facts = report.settings, report.facts
    credentials = settings.credentials
    email = credentials.email if credentials else "<mailbox e-mail address>"
    username = credentials.username if credentials else "<DOMAIN\\migration-admin>"
    fqdn = settings.fqdn or "<bridge FQDN>"
    server = facts.get("exchange_server") or "<Exchange server name from Autodiscover, or --exchange-server>"
    authentication = facts.get("authentication") or "<Basic|NTLM>"
    lines = []
    if report.verdict == "fail":
        lines.append("# Fix the failed checks first; these commands will fail until then.")
    lines.append(f"$credentials = Get-Credential -UserName '{username}' -Message 'Migration administrator'")
    autodiscovered = any(check.id.endswith(".autodiscover") and check.details.get("exchange_server") for check in report.checks)
    if autodiscovered or not credentials:
        lines += [
            f"Test-MigrationServerAvailability -ExchangeOutlookAnywhere -Autodiscover -EmailAddress {email} -Credentials $credentials",
            "# or, with the settings found here:",
        ]
    else:
        lines.append("# Autodiscover did not answer: create the endpoint with manual settings.")
    lines += [
        f"Test-MigrationServerAvailability -ExchangeOutlookAnywhere -RpcProxyServer {fqdn} -ExchangeServer {server} -Authentication {authentication} -EmailAddress {email} -Credentials $credentials",
        f"New-MigrationEndpoint -ExchangeOutlookAnywhere -Name 'Exchange 2007 via bridge' -RpcProxyServer {fqdn} -ExchangeServer {server} "
        f"-Authentication {authentication} -EmailAddress {email} -Credentials $credentials",
    ]
    return lines + imap_steps(report)


def imap_steps(report: Report) -> list[str]:
    """With --imap: the IMAP migration endpoint through the bridge's IMAPS port (mail only), and its batch."""
    target = next((target for target in report.settings.mail if target.protocol == "imap"), None)
    if target is None:
        return []
    fqdn = report.settings.fqdn or "<bridge FQDN>"
    port = target.bridge_ports.get("imap", 993)
    return [
        "# Or an IMAP migration (e-mail only: no calendar, contacts or tasks) through the bridge's IMAPS port:",
        f"Test-MigrationServerAvailability -IMAP -RemoteServer {fqdn} -Port {port} -Security Ssl",
        f"New-MigrationEndpoint -IMAP -Name 'Exchange 2007 IMAP via bridge' -RemoteServer {fqdn} -Port {port} -Security Ssl",
        "# imap-users.csv has the columns EmailAddress,UserName,Password (UserName as Exchange 2007's IMAP4 takes it: DOMAIN\\user or the UPN):",
        "New-MigrationBatch -Name 'IMAP batch 1' -SourceEndpoint 'Exchange 2007 IMAP via bridge' -CSVData ([System.IO.File]::ReadAllBytes('C:\\migration\\imap-users.csv')) -AutoStart",
    ]


# --------------------------------------------------------------------------- JSON


def report_json(report: Report) -> dict[str, Any]:
    settings = report.settings
    return {
        "schema": SCHEMA,
        "verdict": report.verdict,
        "generated": report.started.isoformat(timespec="seconds"),
        "duration_seconds": round(report.duration, 3),
        "target": {
            "legacy": str(settings.legacy),
            "fqdn": settings.fqdn,
            "bridge_addr": settings.bridge_addr,
            "https_port": settings.https_port,
            "http_port": settings.http_port,
            "auth": settings.auth,
            "email": settings.credentials.email if settings.credentials else None,
            "username": settings.credentials.username if settings.credentials else None,
            "mail": [{"protocol": target.protocol, "legacy": str(target.legacy), "mode": target.mode, "bridge_ports": target.bridge_ports} for target in settings.mail],
        },
        "counts": counts(report),
        "facts": report.facts,
        "checks": [check.as_json() for check in report.checks],
        "next_steps": next_steps(report),
        "data_handling": DATA_HANDLING_NOTE,
    }


def write_json(report: Report, path: Path) -> None:
    atomic_write(path, (json.dumps(report_json(report), indent=2) + "\n").encode())


# --------------------------------------------------------------------------- HTML


def hop_statuses(report: Report) -> dict[str, str]:
    """Status of each element of the path picture: two nodes we probe and the two hops between them."""
    legacy = worst([check.status for check in report.by_side("legacy")])
    if not report.settings.fqdn:
        return {"exchange-online": "skip", "front": "skip", "bridge": "skip", "back": "skip", "legacy": legacy}
    front = worst([check.status for check in report.checks if check.id in FRONT_HOP])
    back = worst([check.status for check in report.checks if check.id.startswith(BACK_HOP_PREFIXES)])
    bridge = worst([check.status for check in report.by_side("bridge")])
    return {"exchange-online": "skip", "front": front, "bridge": bridge, "back": back, "legacy": legacy}


def path_svg(report: Report) -> str:
    states = hop_statuses(report)
    settings = report.settings
    nodes = [
        ("exchange-online", 10, "Exchange Online", "TLS 1.2+ only"),
        ("bridge", 320, "bridge", settings.fqdn or "not checked"),
        ("legacy", 630, "Exchange 2007", str(settings.legacy)),
    ]
    hops = [("front", 180, 320, "HTTPS, trusted cert"), ("back", 490, 630, "legacy TLS, pinned")]
    parts = ['<svg id="path-picture" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 820 120" width="820" height="120" role="img" aria-label="Exchange Online to bridge to legacy server">']
    for name, x, title, subtitle in nodes:
        colour = STATUS_COLOURS[states[name]] if name != "exchange-online" else "#1565c0"
        state = states[name] if name != "exchange-online" else "info"
        parts.append(
            f'<g data-node="{name}" data-status="{state}"><title>{html.escape(title)}: {state}</title>'
            f'<rect x="{x}" y="25" width="170" height="70" rx="10" fill="#ffffff" stroke="{colour}" stroke-width="4"/>'
            f'<text x="{x + 85}" y="55" text-anchor="middle" font-size="16" font-weight="bold" fill="{colour}">{html.escape(title)}</text>'
            f'<text x="{x + 85}" y="77" text-anchor="middle" font-size="12" fill="#333333">{html.escape(_shorten(subtitle, 24))}</text></g>'
        )
    for name, start, end, label in hops:
        state = states[name]
        colour = STATUS_COLOURS[state]
        parts.append(
            f'<g data-hop="{name}" data-status="{state}"><title>{html.escape(label)}: {state}</title>'
            f'<line x1="{start + 2}" y1="60" x2="{end - 12}" y2="60" stroke="{colour}" stroke-width="8"/>'
            f'<polygon points="{end - 14},48 {end},60 {end - 14},72" fill="{colour}"/>'
            f'<text x="{(start + end) // 2}" y="40" text-anchor="middle" font-size="11" fill="{colour}">{html.escape(state.upper())}</text>'
            f'<text x="{(start + end) // 2}" y="88" text-anchor="middle" font-size="10" fill="#333333">{html.escape(label)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _details_html(details: dict[str, Any]) -> str:
    if not details:
        return ""
    rows = "".join(f"<dt>{html.escape(str(key))}</dt><dd>{html.escape(value if isinstance(value, str) else json.dumps(value))}</dd>" for key, value in details.items())
    return f"<details><summary>details</summary><dl>{rows}</dl></details>"


def _check_rows(checks: list[Check]) -> str:
    rows = []
    for check in checks:
        rows.append(
            f'<tr class="{check.status}" data-check="{html.escape(check.id)}"><td><span class="badge {check.status}">{check.status.upper()}</span></td>'
            f"<td><code>{html.escape(check.id)}</code></td><td>{html.escape(check.summary)}{_details_html(check.details)}</td>"
            f"<td>{html.escape(check.fix)}</td></tr>"
        )
    return "".join(rows)


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif;margin:0;color:#212121;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:0 20px 40px}
.verdict{padding:18px 20px;color:#fff}
.verdict h1{margin:0;font-size:28px}.verdict p{margin:6px 0 0}
.verdict.pass{background:#2e7d32}.verdict.warn{background:#e65100}.verdict.fail{background:#c62828}
h2{margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #e0e0e0;padding:6px 8px;text-align:left;vertical-align:top;font-size:14px;overflow-wrap:anywhere}
td:nth-child(2){white-space:nowrap}
.badge{display:inline-block;min-width:44px;text-align:center;border-radius:4px;color:#fff;font-weight:bold;font-size:12px;padding:2px 4px}
.badge.pass{background:#2e7d32}.badge.warn{background:#e65100}.badge.fail{background:#c62828}.badge.skip{background:#757575}
tr.fail td{background:#fdecea}tr.warn td{background:#fff4e5}
details summary{cursor:pointer;color:#555;font-size:12px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:12px;margin:4px 0}
dt{font-weight:bold}dd{margin:0;word-break:break-all}
pre{background:#263238;color:#eceff1;padding:12px;overflow-x:auto;font-size:13px;white-space:pre-wrap}
.note{background:#e3f2fd;border-left:4px solid #1565c0;padding:10px 14px}
"""


def render_html(report: Report) -> str:
    settings = report.settings
    verdict = report.verdict
    sections = []
    for side in ("legacy", "bridge"):
        sections.append(
            f'<h2 id="side-{side}">{html.escape(side_title(report, side))}</h2>'
            f"<table><thead><tr><th>status</th><th>check</th><th>result</th><th>fix</th></tr></thead><tbody>{_check_rows(report.by_side(side))}</tbody></table>"
        )
    target = f"legacy server {settings.legacy}" + (f", bridge {settings.fqdn}" if settings.fqdn else "")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Exchange bridge preflight: {verdict.upper()}</title><style>{CSS}</style></head><body>"
        f'<header class="verdict {verdict}" id="verdict" data-verdict="{verdict}"><h1>Verdict: {verdict.upper()}</h1>'
        f"<p>{html.escape(verdict_line(report))}. Checked {html.escape(target)} on {report.started:%Y-%m-%d %H:%M} UTC.</p></header>"
        f'<main><h2>Path</h2><figure id="path">{path_svg(report)}<figcaption>Exchange Online &#8594; bridge &#8594; legacy server; '
        "each hop is coloured by the worst result of its checks (green pass, orange warning, red failure, grey not checked).</figcaption></figure>"
        + "".join(sections)
        + '<h2 id="next-steps">Next steps (Exchange Online PowerShell)</h2>'
        f"<pre>{html.escape(chr(10).join(next_steps(report)))}</pre>"
        f'<h2 id="data-handling">Data handling</h2><p class="note">{html.escape(DATA_HANDLING_NOTE)}</p>'
        f"<p><small>Report schema {html.escape(SCHEMA)}; generated by exchange-bridge preflight.</small></p>"
        "</main></body></html>\n"
    )


def write_html(report: Report, path: Path) -> None:
    atomic_write(path, render_html(report).encode("utf-8"))
