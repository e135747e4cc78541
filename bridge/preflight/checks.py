"""`bridge preflight`: probe the legacy Exchange 2007 server and the bridge before the migration batch.

Every check ends as pass / warn / fail / skip with a one-line summary and a fix. Probes run
concurrently on one event loop; a host that cannot be reached costs one timeout (name resolution and
TCP connect happen once per side, and everything that depends on them is skipped with the reason).
Each legacy-side HTTP check is repeated through the bridge and the two results are compared.

The password is held in memory only: it is never part of a Check, a report or a log line.
The network probes live in bridge.preflight.probe; rendering (console table, JSON, HTML) in bridge.preflight.report.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import socket
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

from cryptography import x509

from bridge.certs.keys import inspect_certificate
from bridge.config import PassthroughRoute, is_ip_address
from bridge.net.tls import fingerprint, pin_flag
from bridge.net.upstream import probe_obsolete_suites
from bridge.preflight.model import (
    TLS_VERSIONS,
    VERSION_NAMES,
    Check,
    Report,
    Settings,
)
from bridge.preflight.probe import (
    Handshake,
    HttpAnswer,
    HttpConnection,
    HttpTarget,
    ProbeError,
    VirtualConnectionProbe,
    exact_version_context,
    http_exchange,
    legacy_client,
    offers,
    plain_http_get,
    probe_virtual_connection,
    reason_of,
    refused_handshake,
    request_headers,
    resolve,
    tcp_connect,
    tls_handshake,
    trusting_context,
    unverified_modern_context,
)
from bridge.protocol import rts
from bridge.proxy.port80 import ACME_PREFIX
from bridge.proxy.relay import SECURITY_HEADERS

RPC_PORTS = (6001, 6002, 6004)
MAX_SUITES = 16
EXPIRY_WARNING_DAYS = 14

# The virtual directories a cutover migration touches (and OWA, which users notice first).
HTTP_PATHS = {
    "owa": ("GET", "/owa/"),
    "ews": ("GET", "/EWS/Exchange.asmx"),
    "autodiscover": ("GET", "/Autodiscover/Autodiscover.xml"),
    "rpc": ("RPC_IN_DATA", "/rpc/rpcproxy.dll"),
}
PROTECTED_PATHS = ("ews", "autodiscover", "rpc")
LOGON_PATH = "/EWS/Exchange.asmx"


POX_NS = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
POX_ERROR_NS = "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}"
POX_REQUEST = (
    '<?xml version="1.0" encoding="utf-8"?>'
    '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">'
    "<Request><EMailAddress>{email}</EMailAddress>"
    "<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>"
    "</Request></Autodiscover>"
)

# Details compared between the direct probe and the same probe through the bridge.
COMPARED_DETAILS = {
    "http": ("http_status", "auth_schemes", "server_header"),
    "logon": ("outcome", "http_status"),
    "autodiscover": ("http_status", "error", "exchange_server", "legacy_dn", "auth_package"),
    "rpc": ("rpc_in_data", "rpc_out_data"),
    "outlook_anywhere": ("outcome", "binds"),
}

# The virtual connections of the Outlook Anywhere check, one per port (the port is in the URL):
# (port, interface, syntax, required, call). RFR counts only where it answers.
OUTLOOK_ANYWHERE = (
    (rts.PORT_EMSMDB, "EMSMDB", rts.EMSMDB, True, (rts.OPNUM_EC_DUMMY_RPC, b"")),
    (rts.PORT_NSPI, "NSPI", rts.NSPI, True, None),
    (rts.PORT_RFR, "RFR", rts.RFR, False, None),
)
# What runs each interface on Exchange 2007 (named in the fix of a refused bind).
INTERFACE_SERVICES = {
    "EMSMDB": "Microsoft Exchange Information Store (MSExchangeIS)",
    "NSPI": "Microsoft Exchange System Attendant (MSExchangeSA, its DSProxy)",
    "RFR": "Microsoft Exchange System Attendant (MSExchangeSA, its referral service)",
}
STEP_LABELS = {
    "out_channel": "opening the OUT channel (RPC_OUT_DATA with CONN/A1)",
    "in_channel": "opening the IN channel (RPC_IN_DATA with CONN/B1)",
    "conn_a3": "waiting for CONN/A3 on the OUT channel",
    "conn_c2": "waiting for CONN/C2 on the OUT channel",
    "bind": "the bind",
    "call": "the EcDummyRpc call",
    "close": "closing",
}


# --------------------------------------------------------------------------- which checks run


def http_suffixes(settings: Settings) -> list[str]:
    """The HTTP checks of one side (legacy direct, or the same through the bridge), in report order."""
    suffixes = [f"http.{name}" for name in HTTP_PATHS]
    if settings.credentials:
        suffixes += [f"logon.{scheme}" for scheme in wanted_schemes(settings.auth)]
        suffixes.append("autodiscover")
        suffixes += [f"rpc.{port}" for port in RPC_PORTS]
        suffixes.append("outlook_anywhere")
    return suffixes


def wanted_schemes(auth: str) -> list[str]:
    return ["basic", "ntlm"] if auth == "both" else [auth]


def planned_checks(settings: Settings) -> list[tuple[str, str]]:
    """(id, side) of every check this run reports, in report order."""
    legacy = ["dns", "tcp", "tls", "renegotiation", "certificate"] + http_suffixes(settings)
    from bridge.preflight.mail import planned_mail_checks

    planned = [(f"legacy.{name}", "legacy") for name in legacy]
    if settings.other_legacy:
        planned.append(("legacy.others", "legacy"))
    mail = planned_mail_checks(settings)
    planned += [(check_id, side) for check_id, side in mail if side == "legacy"]
    if not settings.fqdn:
        return planned + [("bridge.fqdn", "bridge")]
    bridge = ["dns", "tcp", "port80.redirect", "port80.acme", "tls.modern", "tls.obsolete", "certificate", "headers", "idle"]
    bridge += http_suffixes(settings)
    bridge += [f"route.{route.name}" for route in settings.routes] + [f"terminate.{name}" for name in settings.terminate]
    return planned + [(f"bridge.{name}", "bridge") for name in bridge] + [(check_id, side) for check_id, side in mail if side == "bridge"]


def probe_name(route_name: str) -> str:
    """A name a client could ask for under a route: the name itself, or one made up under a wildcard."""
    if route_name == "*":
        return "preflight-check.invalid"
    return "preflight-check." + route_name[2:] if route_name.startswith("*.") else route_name


# --------------------------------------------------------------------------- evaluating answers


def evaluate_path(name: str, settings: Settings, answer: HttpAnswer | None, error: str | None, side: str = "legacy") -> tuple[str, str, dict[str, Any], str]:
    """(status, summary, details, fix) for an anonymous request to one virtual directory."""
    method, path = HTTP_PATHS[name]
    if answer is None:
        return "fail", f"{method} {path}: {error}", {"path": path, "error": error}, "Check that IIS serves HTTPS on this port and that nothing in between drops the request."
    details = {"path": path, "method": method, "http_status": answer.status, "auth_schemes": answer.schemes, "server_header": answer.header("Server")}
    if answer.header("Location"):
        details["location"] = answer.header("Location")
    schemes = ", ".join(answer.schemes) or "none"
    if answer.status == 404:
        if name == "rpc":
            return (
                "fail",
                f"{path} answers 404: Outlook Anywhere (RPC over HTTP) is not published",
                details,
                ("Install the Windows 'RPC over HTTP Proxy' feature and run Enable-OutlookAnywhere on the Client Access Server."),
            )
        return "warn", f"{path} answers 404", details, f"Create or re-enable the {path.strip('/').split('/')[0]} virtual directory if the migration or users need it."
    if side == "bridge" and answer.status in (502, 504):
        return (
            "fail",
            f"{path} answers {answer.status}: the bridge cannot reach the legacy server",
            details,
            ("Check that the bridge's machine can reach the legacy server (journalctl -u exchange-bridge shows why)."),
        )
    if answer.status >= 500:
        return "fail", f"{path} answers {answer.status}", details, "Look at the Exchange server's event log and IIS logs for this virtual directory."
    if answer.status == 401 and name in PROTECTED_PATHS:
        missing = [scheme for scheme in wanted_schemes(settings.auth) if not offers(answer.schemes, scheme)]
        if settings.auth != "both" and missing:
            label = "Basic" if missing[0] == "basic" else "NTLM"
            return (
                "fail",
                f"{path} offers {schemes}, not {label}",
                details,
                (f"Enable {label} authentication on {path.split('/')[1]} ({enable_command(name, missing[0])}), or run with the --auth the server offers."),
            )
        if settings.auth == "both" and len(missing) == 2:
            return "fail", f"{path} offers neither Basic nor NTLM ({schemes})", details, f"Enable Basic or NTLM authentication on this virtual directory ({enable_command(name, 'ntlm')})."
        return "pass", f"{path} answers 401 and offers {schemes}", details, ""
    if answer.status in (200, 301, 302, 401, 403, 405):
        where = f" to {details['location']}" if "location" in details else ""
        return "pass", f"{path} answers {answer.status}{where}", details, ""
    return "warn", f"{path} answers {answer.status}", details, "Check this virtual directory's settings in IIS."


# The cmdlet that sets each virtual directory's authentication (Set-OutlookAnywhere covers only /rpc).
AUTH_COMMANDS = {
    "rpc": {"basic": "Set-OutlookAnywhere -ClientAuthenticationMethod Basic", "ntlm": "Set-OutlookAnywhere -ClientAuthenticationMethod Ntlm"},
    "ews": {"basic": "Set-WebServicesVirtualDirectory -BasicAuthentication $true", "ntlm": "Set-WebServicesVirtualDirectory -WindowsAuthentication $true"},
    "autodiscover": {"basic": "Set-AutodiscoverVirtualDirectory -BasicAuthentication $true", "ntlm": "Set-AutodiscoverVirtualDirectory -WindowsAuthentication $true"},
}


def enable_command(directory: str, scheme: str) -> str:
    """The Exchange Management Shell command that enables ``scheme`` on a virtual directory."""
    return AUTH_COMMANDS.get(directory, AUTH_COMMANDS["ews"])[scheme]


def certificate_names_host(sans: list[str], subject: str, host: str) -> bool:
    """Whether a certificate's names (SANs, else the subject's CN) cover ``host``, wildcards included."""
    names = [name.lower() for name in sans] or [part[3:].lower() for part in subject.split(",") if part.strip().upper().startswith("CN=")]
    host = host.lower().rstrip(".")
    parent = host.split(".", 1)[1] if "." in host else None
    return any(name == host or (name.startswith("*.") and parent == name[2:]) for name in names)


def is_timeout(error: str | None) -> bool:
    return bool(error) and "no answer within" in str(error)


def timeout_fix(timeout: float, slowest: float | None) -> str:
    """The fix for a step that ran out of time: a larger --timeout, sized by what did answer."""
    seen = f"; the answers that did come took up to {slowest:.1f} s" if slowest else ""
    return f"The server answered too slowly for --timeout {timeout:g}{seen}: rerun with a larger --timeout (e.g. --timeout {max(timeout * 3, (slowest or 0) * 3, 30):g})."


def pox_settings(body: bytes) -> dict[str, Any]:
    """EXCH/EXPR settings from an Autodiscover POX answer (or its error)."""
    root = ET.fromstring(body)
    error = root.find(f"{POX_ERROR_NS}Response/{POX_ERROR_NS}Error")
    if error is not None:
        return {"error": f"{error.findtext(f'{POX_ERROR_NS}ErrorCode', '')} {error.findtext(f'{POX_ERROR_NS}Message', '')}".strip()}
    response = root.find(f"{POX_NS}Response")
    if response is None:
        return {"error": "the answer has no Response element"}
    found: dict[str, Any] = {"legacy_dn": response.findtext(f"{POX_NS}User/{POX_NS}LegacyDN")}
    account = response.find(f"{POX_NS}Account")
    action = account.findtext(f"{POX_NS}Action") if account is not None else None
    if account is not None and action and action != "settings":
        found["action"] = action
        found["redirect"] = account.findtext(f"{POX_NS}RedirectAddr") or account.findtext(f"{POX_NS}RedirectUrl")
    for protocol in response.iter(f"{POX_NS}Protocol"):
        kind = protocol.findtext(f"{POX_NS}Type")
        if kind == "EXCH":
            found["exchange_server"] = protocol.findtext(f"{POX_NS}Server")
            found["server_dn"] = protocol.findtext(f"{POX_NS}ServerDN")
            found["mdb_dn"] = protocol.findtext(f"{POX_NS}MdbDN")
            found["auth_package"] = protocol.findtext(f"{POX_NS}AuthPackage")
        elif kind == "EXPR":
            found["expr_server"] = protocol.findtext(f"{POX_NS}Server")
            found["expr_ssl"] = protocol.findtext(f"{POX_NS}SSL")
            found["expr_auth_package"] = protocol.findtext(f"{POX_NS}AuthPackage")
    return found


def outlook_anywhere_fix(probe: VirtualConnectionProbe, server: str, scheme: str) -> str:
    """What to do about the step that failed, named by what it saw."""
    step = probe.failed
    assert step is not None
    where = f"{server}:{probe.port}"
    if step.problem == "http" and step.http_status == 503:
        return (
            f"The RPC proxy refuses {where} (503): add {server}:6001-6004 (with its NetBIOS and its FQDN form) to the ValidPorts "
            "registry value of the RPC proxy (HKLM\\SOFTWARE\\Microsoft\\Rpc\\RpcProxy), and check that the name resolves on the Client Access Server."
        )
    if step.problem == "http" and step.http_status == 401:
        label = "Ntlm" if scheme == "ntlm" else "Basic"
        return (
            f"The RPC proxy refused the logon on the {step.name.split('_')[0].upper()} channel: set its authentication to what the migration "
            f"endpoint uses (Set-OutlookAnywhere -ClientAuthenticationMethod {label}) and check the IIS authentication of /rpc."
        )
    if step.problem == "http":
        return "Check the RPC over HTTP Proxy feature and Outlook Anywhere on the Client Access Server (its IIS log shows this request)."
    if step.problem in ("connect",) or (step.problem == "timeout" and step.name.endswith("_channel")):
        if step.name == "in_channel" and step.problem == "timeout":
            return (
                "The IN channel (RPC_IN_DATA, Expect: 100-continue) got no 100 Continue: something in between holds the request back "
                "(a load balancer or reverse proxy that waits for the 1 GiB body); let it pass 100 Continue and stream the body."
            )
        return "Check that the server answers HTTPS on /rpc/rpcproxy.dll (the other checks above show how it answers)."
    if step.name in ("conn_a3", "conn_c2") or step.problem == "closed":
        seen = {True: "the IN channel did get its 100 Continue", False: "the IN channel got no 100 Continue", None: "the IN channel was not opened"}[probe.in_continued]
        if step.problem == "closed":
            return (
                "The OUT channel (RPC_OUT_DATA) was closed early: something in between cuts the long response (a load balancer's or firewall's "
                f"response or idle timeout, or the bridge's --idle-timeout); let RPC_OUT_DATA stream for hours ({seen})."
            )
        if step.name == "conn_a3":
            return (
                "CONN/A3 did not come although the OUT channel answered 200: something in between buffers the 1 GiB RPC_OUT_DATA response "
                f"instead of streaming it (a load balancer or reverse proxy); switch response buffering off for /rpc ({seen})."
            )
        return (
            "CONN/A3 came but CONN/C2 did not: the RPC proxy never saw the IN channel's CONN/B1 (something in between holds back the "
            f"RPC_IN_DATA body or its 100 Continue), or it cannot reach {where} ({seen})."
        )
    if step.problem in ("bind_nak", "rejected"):
        return (
            f"The Exchange {probe.interface} interface is not reachable on {where}: check that the {INTERFACE_SERVICES.get(probe.interface, probe.interface)} "
            f"service runs on {server} and that Outlook Anywhere's fixed port {probe.port} is in use (Enable-OutlookAnywhere; restart the service after changing ports)."
        )
    if step.problem == "fault":
        return f"The Exchange server answered a fault on {where}: look at its application event log (MSExchangeIS / MSExchangeSA) for this time."
    if step.problem == "protocol":
        return "The OUT channel carried something that is not RPC (e.g. an error page inserted by a device in between): look at what answers /rpc/rpcproxy.dll."
    return "Check the RPC over HTTP Proxy feature and Outlook Anywhere on the Client Access Server."


def evaluate_outlook_anywhere(server: str, scheme: str, probes: list[VirtualConnectionProbe], elapsed: float) -> tuple[str, str, dict[str, Any], str]:
    """(status, summary, details, fix) of the Outlook Anywhere connection test: fail when EMSMDB or NSPI
    fails (naming the step and its fix), warn when only RFR does, pass otherwise."""
    channels = {
        str(probe.port): {
            "interface": probe.interface,
            "required": probe.required,
            "in_continue": probe.in_continued,
            "failed_step": probe.failed.name if probe.failed else None,
            "steps": [step.as_json() for step in probe.steps],
        }
        for probe in probes
    }

    def bind_state(probe: VirtualConnectionProbe) -> str:
        bind = next((step for step in probe.steps if step.name == "bind"), None)
        return "not reached" if bind is None else ("accepted" if bind.ok else bind.problem)

    failures = [probe for probe in probes if probe.failed]
    outcome = "; ".join(f"{p.port} {p.interface}: {p.failed.name} {p.failed.problem}" for p in failures if p.failed) or "ok"
    details: dict[str, Any] = {
        "server": server,
        "scheme": scheme,
        "path": "/rpc/rpcproxy.dll",
        "duration_ms": round(elapsed * 1000, 1),
        "outcome": outcome,
        "binds": {f"{probe.port} {probe.interface}": bind_state(probe) for probe in probes},
        "channels": channels,
    }

    def done_part(probe: VirtualConnectionProbe) -> str:
        called = " and answered EcDummyRpc" if any(step.name == "call" for step in probe.steps) else ""
        return f"{probe.interface} on {probe.port} bound{called}"

    def failed_part(probe: VirtualConnectionProbe) -> str:
        step = probe.failed
        assert step is not None
        return f"{probe.interface} on {server}:{probe.port} failed at {STEP_LABELS.get(step.name, step.name)}: {step.note}"

    required = [probe for probe in failures if probe.required]
    if required:
        first = required[0]
        also = [f"{p.port} {p.interface} at {p.failed.name}" for p in failures[1:] if p is not first and p.failed]
        summary = f"Outlook Anywhere: {failed_part(first)}" + (f" (also {', '.join(also)})" if also else "")
        first_step = first.failed
        if first_step is not None and first_step.problem in ("timeout", "connect") and first_step.name.endswith("_channel"):
            details["error"] = first_step.note  # an HTTP answer that did not come in time: --timeout sizes the fix
        return "fail", summary, details, outlook_anywhere_fix(first, server, scheme)
    working = ", ".join(done_part(probe) for probe in probes if not probe.failed)
    total = f"{elapsed * 1000:.0f} ms"
    if failures:
        optional = failures[0]
        return (
            "warn",
            f"Outlook Anywhere to {server} works ({working}, {total}); {failed_part(optional)}",
            details,
            (f"Outlook uses RFR for address book referrals; the migration does not need it. {outlook_anywhere_fix(optional, server, scheme)}"),
        )
    return "pass", f"Outlook Anywhere to {server} works: {working}, each on its own virtual connection, closed cleanly ({total})", details, ""


def rpc_outcome(answer: HttpAnswer | None, error: str | None) -> str:
    if answer is None:
        return f"error: {error}"
    length = answer.header("Content-Length")
    return f"{answer.status}" + (f" ({length} bytes)" if answer.status == 200 and length else "")


# --------------------------------------------------------------------------- the runner


class Preflight:
    def __init__(self, settings: Settings, on_result: Callable[[Check], None] | None = None) -> None:
        self.settings = settings
        self.on_result = on_result
        self.planned = planned_checks(settings)
        self.results: dict[str, Check] = {}
        self.direct: dict[str, Check] = {}  # legacy HTTP checks by suffix
        self.through_bridge: dict[str, Check] = {}  # the same, through the bridge
        self.facts: dict[str, Any] = {}
        self.autodiscovered: dict[str, dict[str, Any]] = {}  # side -> EXCH/EXPR settings
        self.slowest = 0.0  # seconds the slowest HTTP answer took (sizes the fix of a step that timed out)

    # ---- bookkeeping -------------------------------------------------------------------------
    def record(self, check: Check) -> Check:
        self.results[check.id] = check
        if self.on_result is not None:
            self.on_result(check)
        return check

    def skip_remaining(self, prefix: str, reason: str) -> None:
        for check_id, side in self.planned:
            if check_id.startswith(prefix) and check_id not in self.results:
                self.record(Check(check_id, side, "skip", reason))

    async def run(self) -> Report:
        started = dt.datetime.now(dt.UTC)
        clock = time.monotonic()
        await asyncio.gather(self.legacy_side(), self.bridge_side(), self.mail_side())
        self.compare_through_bridge()
        self.note_other_legacy_servers()
        self.skip_remaining("", "not run")
        self.size_timeout_fixes()
        found = self.autodiscovered.get("legacy") or self.autodiscovered.get("bridge") or {}
        self.facts = {
            "exchange_server": self.settings.exchange_server or found.get("exchange_server"),
            "legacy_dn": found.get("legacy_dn"),
            "authentication": self.recommended_authentication(),
        }
        checks = [self.results[check_id] for check_id, _ in self.planned]
        return Report(self.settings, checks, started, time.monotonic() - clock, self.facts)

    async def mail_side(self) -> None:
        """--imap/--pop3/--smtp: the legacy mail services and the bridge's listeners (bridge.preflight.mail)."""
        if not self.settings.mail:
            return
        from bridge.preflight.mail import mail_checks

        for check in await mail_checks(self.settings):
            self.record(check)

    def size_timeout_fixes(self) -> None:
        """A step that ran out of time is fixed by a larger --timeout, not by changing the server."""
        for check in self.results.values():
            if check.status == "fail" and (is_timeout(check.details.get("error")) or "no answer within the timeout" in check.summary):
                check.fix = timeout_fix(self.settings.timeout, self.slowest or None)

    def note_other_legacy_servers(self) -> None:
        others = self.settings.other_legacy
        if not others:
            return
        names = ", ".join(str(server) for server in others)
        commands = "; ".join(f"bridge preflight --legacy {server}" for server in others)
        self.record(
            Check(
                "legacy.others",
                "legacy",
                "warn",
                f"the bridge config lists {len(others)} more legacy server(s), not probed in this run: {names}",
                {"servers": [str(server) for server in others]},
                f"Check each one too: {commands}.",
            )
        )

    # ---- legacy side ---------------------------------------------------------------------------
    async def legacy_side(self) -> None:
        legacy = self.settings.legacy
        timeout = self.settings.timeout
        address = await self.reach("legacy", legacy.host, legacy.port, "the legacy server")
        if address is None:
            return
        sni = "" if is_ip_address(legacy.host) else legacy.host
        try:
            gate = await tls_handshake(address, legacy.port, legacy_client(), sni, timeout)
        except Exception as exc:  # noqa: BLE001 - every handshake failure is reported, none is fatal
            await self.legacy_without_tls(address, exc)
            return
        host_header = legacy.host if legacy.port == 443 else f"{legacy.host}:{legacy.port}"
        target = HttpTarget(address, legacy.port, sni, host_header, legacy_client(), timeout)
        await asyncio.gather(
            self.legacy_tls_versions(address, sni, gate),
            self.legacy_renegotiation(address, sni),
            self.legacy_certificate(gate),
            self.legacy_http(target),
        )

    async def reach(self, side: str, host: str, port: int, what: str, *, connect_to: str | None = None) -> str | None:
        """Resolve and connect once; on failure record it and skip everything else on this side.

        With ``connect_to`` (--bridge-addr) the name is resolved for the report only, while the
        connection goes to that address at the same time.
        """
        timeout = self.settings.timeout
        connecting = asyncio.ensure_future(tcp_connect(connect_to, port, timeout)) if connect_to else None
        try:
            addresses, resolve_error = await resolve(host, port, timeout), ""
        except Exception as exc:  # noqa: BLE001
            addresses = []
            resolve_error = (exc.strerror or str(exc)) if isinstance(exc, socket.gaierror) else reason_of(exc)
        if side == "bridge":
            self.record(self.bridge_dns_check(addresses, resolve_error))
        elif addresses:
            summary = f"{host} is an IP address" if is_ip_address(host) else f"{host} resolves to {', '.join(addresses)}"
            self.record(Check("legacy.dns", side, "pass", summary, {"addresses": addresses}))
        else:
            self.record(
                Check(
                    "legacy.dns",
                    side,
                    "fail",
                    f"{host} does not resolve ({resolve_error})",
                    {"error": resolve_error},
                    "Check the --legacy name and this machine's DNS; use the name the bridge will use.",
                )
            )
        address = connect_to or (addresses[0] if addresses else None)
        if address is None:
            self.skip_remaining(f"{side}.", f"skipped: {host} does not resolve")
            return None
        try:
            elapsed = await (connecting or tcp_connect(address, port, timeout))
        except Exception as exc:  # noqa: BLE001
            reason = reason_of(exc)
            self.record(
                Check(
                    f"{side}.tcp",
                    side,
                    "fail",
                    f"{address} port {port} cannot be reached: {reason}",
                    {"address": address, "port": port, "error": reason},
                    f"Make sure {what} listens on port {port} and that firewalls let this machine in.",
                )
            )
            if side == "bridge":
                await self.port80_checks(address)
            self.skip_remaining(f"{side}.", f"skipped: port {port} cannot be reached")
            return None
        self.record(
            Check(f"{side}.tcp", side, "pass", f"{address} port {port} accepts connections ({elapsed * 1000:.0f} ms)", {"address": address, "port": port, "connect_ms": round(elapsed * 1000, 1)})
        )
        return address

    async def legacy_without_tls(self, address: str, exc: BaseException) -> None:
        legacy = self.settings.legacy
        reason = reason_of(exc)
        details: dict[str, Any] = {"error": reason, "accepted": {}}
        fix = "Make sure the server speaks HTTPS on this port (IIS site binding with a certificate)."
        summary = f"no TLS handshake succeeded ({reason})"
        if refused_handshake(exc):
            obsolete = await probe_obsolete_suites(address, legacy.port, self.settings.timeout)
            if obsolete:
                details["obsolete_suites"] = obsolete
                summary = f"offers only {', '.join(obsolete)}, which this machine's OpenSSL no longer has: this machine shares no suite with it"
                fix = "Enable AES cipher suites on the legacy server (Windows 2003: install KB948963), then rerun."
        self.record(Check("legacy.tls", "legacy", "fail", summary, details, fix))
        self.skip_remaining("legacy.", "skipped: no TLS handshake with the legacy server")

    async def legacy_tls_versions(self, address: str, sni: str, gate: Handshake) -> None:
        port, timeout = self.settings.legacy.port, self.settings.timeout
        results = await asyncio.gather(*(accepted_suites(address, port, sni, version, timeout) for _, version in TLS_VERSIONS))
        accepted = {label: suites for (label, _), suites in zip(TLS_VERSIONS, results, strict=True) if suites}
        refused = [label for (label, _), suites in zip(TLS_VERSIONS, results, strict=True) if not suites]
        listing = "; ".join(f"{label} ({', '.join(suites)})" for label, suites in accepted.items())
        details = {"accepted": accepted, "refused": refused, "negotiated": f"{VERSION_NAMES.get(gate.version, gate.version)} {gate.cipher}"}
        if "TLS 1.2" in accepted or "TLS 1.3" in accepted:
            statement = "it speaks TLS 1.2+, so only its certificate keeps Exchange Online from connecting directly"
        else:
            statement = "Exchange Online (TLS 1.2 or later) cannot connect to it directly: the bridge is needed"
        refusals = f"; refuses {', '.join(refused)}" if refused else ""
        self.record(Check("legacy.tls", "legacy", "pass", f"accepts {listing}{refusals}; {statement}", details))

    async def legacy_renegotiation(self, address: str, sni: str) -> None:
        context = legacy_client()
        context.options &= ~getattr(ssl, "OP_LEGACY_SERVER_CONNECT", 0x4)
        try:
            await tls_handshake(address, self.settings.legacy.port, context, sni, self.settings.timeout)
        except Exception as exc:  # noqa: BLE001
            reason = reason_of(exc)
            if "UNSAFE_LEGACY_RENEGOTIATION" in reason.upper():
                self.record(
                    Check(
                        "legacy.renegotiation",
                        "legacy",
                        "warn",
                        "no RFC 5746 secure renegotiation: the bridge connects anyway (legacy server connect)",
                        {"rfc5746": False},
                        "Install the Windows update for MS10-049 (KB980436) on the legacy server when convenient; the migration works without it.",
                    )
                )
            else:
                self.record(Check("legacy.renegotiation", "legacy", "warn", f"could not tell whether RFC 5746 is supported ({reason})", {"error": reason}, ""))
            return
        self.record(Check("legacy.renegotiation", "legacy", "pass", "supports RFC 5746 secure renegotiation", {"rfc5746": True}))

    async def legacy_certificate(self, gate: Handshake) -> None:
        if not gate.der:
            self.record(Check("legacy.certificate", "legacy", "fail", "the server sent no certificate", {}, "Bind a certificate to the IIS HTTPS site."))
            return
        info = inspect_certificate(x509.load_der_x509_certificate(gate.der))
        observed = fingerprint(gate.der)
        details = {
            "subject": info.subject,
            "sans": info.sans,
            "issuer": info.issuer,
            "not_before": info.not_before.isoformat(),
            "not_after": info.not_after.isoformat(),
            "days_left": int(info.days_left),
            "key": info.key_type,
            "signature_algorithm": info.signature_algorithm,
            "sha256": observed,
            "pin_flag": pin_flag(observed),
            "self_signed": info.subject == info.issuer,
        }
        now = dt.datetime.now(dt.UTC)
        notes = []
        if details["self_signed"]:
            notes.append("self-signed")
        if info.signature_algorithm == "sha1":
            notes.append("SHA-1 signature")
        bits = int(info.key_type.split()[1]) if info.key_type.startswith("RSA ") else None
        if bits is not None and 1024 <= bits < 2048:
            notes.append(f"{info.key_type}-bit key")
        host = self.settings.legacy.host
        if not certificate_names_host(info.sans, info.subject, host):
            notes.append(f"does not name {host} (it names {', '.join(info.sans) or info.subject}): pin it, since name checks would refuse it")
            details["names_host"] = False
        described = f"{info.subject}, issued by {'itself' if details['self_signed'] else info.issuer}, {info.key_type}, {info.signature_algorithm}"
        if self.settings.legacy_fingerprint and self.settings.legacy_fingerprint != observed:
            self.record(
                Check(
                    "legacy.certificate",
                    "legacy",
                    "fail",
                    f"{described}: not the certificate pinned in the bridge config",
                    details,
                    f"If the certificate was renewed on purpose, set {pin_flag(observed)} (legacy_fingerprint in bridge.toml) and restart the bridge.",
                )
            )
        elif info.not_after < now:
            # The bridge pins the fingerprint and ignores dates, and Exchange Online never sees this
            # certificate, so expiry does not fail the batch; it still deserves attention.
            self.record(
                Check(
                    "legacy.certificate",
                    "legacy",
                    "warn",
                    f"{described}: expired on {info.not_after:%Y-%m-%d}; the bridge still connects (it pins, it does not check dates)",
                    details,
                    "Nothing blocks the migration; if other clients use this server, renew it (New-ExchangeCertificate, then Enable-ExchangeCertificate -Services IIS) and pin the new one.",
                )
            )
        elif bits is not None and bits < 1024:
            # The legacy leg crosses the Internet with RSA key exchange and no forward secrecy: a key
            # this small can be factored, exposing every recorded session's credentials and mail.
            self.record(
                Check(
                    "legacy.certificate",
                    "legacy",
                    "fail",
                    f"{described}: a {bits}-bit RSA key can be factored, which exposes recorded logons and mail on the legacy leg",
                    details,
                    "Replace the certificate with one of a 2048-bit key (New-ExchangeCertificate -KeySize 2048, then Enable-ExchangeCertificate -Services IIS), then pin the new one on the bridge.",
                )
            )
        elif info.not_before > now:
            self.record(Check("legacy.certificate", "legacy", "fail", f"{described}: not valid before {info.not_before:%Y-%m-%d}", details, "Fix the legacy server's clock or certificate."))
        elif notes:
            self.record(
                Check(
                    "legacy.certificate",
                    "legacy",
                    "warn",
                    f"{described} ({', '.join(notes)}), {int(info.days_left)} days left; fine behind the bridge",
                    details,
                    f"Pin it on the bridge with {pin_flag(observed)} (legacy_fingerprint in bridge.toml)",
                )
            )
        else:
            self.record(Check("legacy.certificate", "legacy", "pass", f"{described}, {int(info.days_left)} days left", details, ""))

    async def legacy_http(self, target: HttpTarget) -> None:
        results = await self.http_checks(target, "legacy", lambda check: self.record(check))
        self.direct.update(results)

    # ---- the HTTP checks, identical for both sides --------------------------------------------
    async def exchange(self, target: HttpTarget, method: str, path: str, **kwargs: Any) -> tuple[HttpAnswer | None, str | None]:
        """One HTTP exchange on its own connection, timed (the slowest answer sizes a --timeout fix)."""
        started = time.monotonic()
        answer, error = await attempt(http_exchange(target, method, path, **kwargs))
        if answer is not None:
            self.slowest = max(self.slowest, time.monotonic() - started)
        return answer, error

    async def http_checks(self, target: HttpTarget, side: str, emit: Callable[[Check], Any]) -> dict[str, Check]:
        """The anonymous path checks, the logons, Autodiscover and the RPC checks of one side.

        Independent steps run at once on their own connections (against a server answering in 3 s,
        NTLM's two round trips per step add up fast): the anonymous probes, each logon and
        Autodiscover start together; the RPC checks follow as soon as the scheme /rpc accepts, a
        working logon with it and the Exchange server's name are known."""
        results: dict[str, Check] = {}

        def done(suffix: str, status: str, summary: str, details: dict[str, Any] | None = None, fix: str = "") -> None:
            check = Check(f"{side}.{suffix}", side, status, summary, details or {}, fix)
            results[suffix] = check
            emit(check)

        async def probe_path(name: str) -> None:
            method, path = HTTP_PATHS[name]
            answer, error = await self.exchange(target, method, path)
            done(f"http.{name}", *evaluate_path(name, self.settings, answer, error, side))

        credentials = self.settings.credentials
        logons = wanted_schemes(self.settings.auth) if credentials else []
        discovery = asyncio.ensure_future(self.autodiscover(target)) if credentials else None
        await asyncio.gather(*(probe_path(name) for name in HTTP_PATHS), *(self.logon(target, scheme, done) for scheme in logons))
        if discovery is None:
            return results
        outcome = await discovery
        scheme = self.working_scheme(results)
        if scheme is None:
            reason = "no logon succeeded" if any(results[f"logon.{s}"].status == "fail" for s in logons) else "no usable authentication scheme"
            for suffix in ["autodiscover"] + [f"rpc.{port}" for port in RPC_PORTS] + ["outlook_anywhere"]:
                done(suffix, "skip", f"skipped: {reason}")
            return results
        status, summary, details, fix, found = outcome
        manual = self.settings.exchange_server
        if status == "fail" and manual:
            status, summary = "warn", f"{summary}; the RPC checks use --exchange-server {manual}"
            fix = "Create the migration endpoint with manual settings (-ExchangeServer and -RpcProxyServer, shown below): it does not need Autodiscover."
        elif status == "fail":
            fix += " Or give the Exchange server's name with --exchange-server to check Outlook Anywhere with manual settings."
        done("autodiscover", status, summary, details, fix)
        if found.get("exchange_server"):
            self.autodiscovered[side] = found
        server = manual or found.get("exchange_server")
        rpc_path = results["http.rpc"]
        if not server or rpc_path.details.get("http_status") == 404:
            reason = "no Exchange server name from Autodiscover (give it with --exchange-server)" if not server else "/rpc/rpcproxy.dll is missing"
            for port in RPC_PORTS:
                done(f"rpc.{port}", "skip", f"skipped: {reason}")
            done("outlook_anywhere", "skip", f"skipped: {reason}")
            return results
        await asyncio.gather(*(self.rpc_echo(target, scheme, server, port, done) for port in RPC_PORTS), self.outlook_anywhere(target, scheme, server, done))
        return results

    def working_scheme(self, results: dict[str, Check]) -> str | None:
        """The scheme the migration endpoint will use: one whose logon worked, preferring what
        /rpc/rpcproxy.dll itself offers (Outlook Anywhere is often Basic while EWS also takes NTLM)."""
        order = ("ntlm", "basic") if self.settings.auth == "both" else (self.settings.auth,)
        working = [scheme for scheme in order if (check := results.get(f"logon.{scheme}")) is not None and check.status == "pass"]
        rpc = results.get("http.rpc")
        offered = rpc.details.get("auth_schemes") if rpc is not None else None
        if offered:
            for scheme in working:
                if offers(offered, scheme):
                    return scheme
        return working[0] if working else None

    async def logon(self, target: HttpTarget, scheme: str, done: Callable[..., None]) -> None:
        credentials = self.settings.credentials
        assert credentials is not None
        label = "Basic" if scheme == "basic" else "NTLM"
        answer, error = await self.exchange(target, "GET", LOGON_PATH, credentials=credentials, scheme=scheme)
        if answer is None:
            done(f"logon.{scheme}", "fail", f"{label} logon as {credentials.username}: {error}", {"outcome": "error", "error": error}, "Check that the server answers HTTPS on /EWS.")
            return
        details = {"outcome": "ok" if answer.status == 200 else "refused", "http_status": answer.status, "auth_schemes": answer.schemes, "user": credentials.username}
        if answer.status == 200:
            done(f"logon.{scheme}", "pass", f"{label} logon as {credentials.username} succeeded", details)
        elif answer.status == 401 and not offers(answer.schemes, scheme):
            details["outcome"] = "not offered"
            summary = f"{label} is not offered (the server offers {', '.join(answer.schemes) or 'nothing'})"
            if self.settings.auth == "both":
                done(f"logon.{scheme}", "skip", f"skipped: {summary}", details)
            else:
                done(f"logon.{scheme}", "fail", summary, details, f"Enable {label} authentication on EWS ({enable_command('ews', scheme)}), or use --auth with a scheme the server offers.")
        elif answer.status == 401:
            done(
                f"logon.{scheme}",
                "fail",
                f"{label} logon as {credentials.username} was refused (401): wrong user name or password, or the account is locked or disabled",
                details,
                "Check the user name (DOMAIN\\user or UPN) and password with the customer; try the same account in OWA.",
            )
        else:
            done(f"logon.{scheme}", "fail", f"{label} logon as {credentials.username} answered {answer.status}", details, "Check the EWS virtual directory in IIS.")

    async def autodiscover(self, target: HttpTarget) -> tuple[str, str, dict[str, Any], str, dict[str, Any]]:
        """(status, summary, details, fix, EXCH/EXPR settings) of an Autodiscover POX request.

        Runs beside the logons, so it picks its scheme itself: NTLM where allowed, Basic when the
        server does not offer NTLM there."""
        credentials = self.settings.credentials
        assert credentials is not None
        body = POX_REQUEST.format(email=credentials.email).encode()
        path = HTTP_PATHS["autodiscover"][1]
        schemes = ["ntlm", "basic"] if self.settings.auth == "both" else [self.settings.auth]
        answer, error, scheme = None, None, schemes[0]
        for scheme in schemes:
            answer, error = await self.exchange(target, "POST", path, body=body, extra={"Content-Type": "text/xml; charset=utf-8"}, credentials=credentials, scheme=scheme)
            if answer is None or answer.status != 401 or offers(answer.schemes, scheme):
                break
        fix = "Check Autodiscover for this mailbox on the server (Test-OutlookWebServices -Identity <mailbox>) and the e-mail address."
        if answer is None:
            return "fail", f"Autodiscover POST for {credentials.email}: {error}", {"error": error}, fix, {}
        if answer.status == 404:
            return (
                "fail",
                f"Autodiscover is not published ({path} answers 404)",
                {"http_status": 404},
                ("Publish Autodiscover (New-AutodiscoverVirtualDirectory on the Client Access Server) or create the migration endpoint with manual settings."),
                {},
            )
        if answer.status == 401:
            return (
                "fail",
                f"Autodiscover POST for {credentials.email} answered 401 with {scheme.upper() if scheme == 'ntlm' else 'Basic'}",
                {"http_status": 401, "auth_schemes": answer.schemes},
                (f"Enable the scheme on Autodiscover ({enable_command('autodiscover', scheme)}).") + " " + fix,
                {},
            )
        if answer.status != 200:
            return "fail", f"Autodiscover POST for {credentials.email} answered {answer.status}", {"http_status": answer.status}, fix, {}
        try:
            found = pox_settings(answer.body)
        except ET.ParseError as exc:
            return "fail", f"Autodiscover answered with XML that cannot be parsed ({exc})", {"http_status": 200}, fix, {}
        details = {"http_status": 200, "email": credentials.email, "scheme": scheme, **found}
        details.setdefault("error", None)
        if found.get("error"):
            return "fail", f"Autodiscover for {credentials.email} answered an error: {found['error']}", details, fix, {}
        if found.get("action"):
            return (
                "warn",
                f"Autodiscover for {credentials.email} redirects ({found['action']} to {found.get('redirect')})",
                details,
                ("Run preflight with the address Autodiscover redirects to, or give the Exchange server with --exchange-server."),
                {},
            )
        if not found.get("exchange_server"):
            return "fail", f"Autodiscover for {credentials.email} has no EXCH settings", details, fix, {}
        summary = f"Exchange server {found['exchange_server']}, legacy DN {found.get('legacy_dn')}, auth package {found.get('auth_package')}"
        if not found.get("expr_server"):
            return (
                "warn",
                f"{summary}; no EXPR (Outlook Anywhere) block",
                details,
                ("Run Enable-OutlookAnywhere so Autodiscover publishes EXPR, or create the migration endpoint with manual settings (shown below)."),
                found,
            )
        return "pass", f"{summary}; EXPR {found['expr_server']}", details, "", found

    async def rpc_echo(self, target: HttpTarget, scheme: str, server: str, port: int, done: Callable[..., None]) -> None:
        credentials = self.settings.credentials
        path = f"/rpc/rpcproxy.dll?{server}:{port}"
        methods = ("RPC_IN_DATA", "RPC_OUT_DATA")
        answers = await asyncio.gather(*(self.exchange(target, method, path, credentials=credentials, scheme=scheme) for method in methods))
        outcomes = dict(zip(methods, answers, strict=True))
        details = {"path": path, "rpc_in_data": rpc_outcome(*outcomes["RPC_IN_DATA"]), "rpc_out_data": rpc_outcome(*outcomes["RPC_OUT_DATA"]), "scheme": scheme}
        statuses = [answer.status if answer else None for answer, _ in outcomes.values()]
        if statuses == [200, 200]:
            done(f"rpc.{port}", "pass", f"RPC echo to {server}:{port} answered 200 on RPC_IN_DATA and RPC_OUT_DATA", details)
            return
        summary = f"RPC echo to {server}:{port}: RPC_IN_DATA {details['rpc_in_data']}, RPC_OUT_DATA {details['rpc_out_data']}"
        if 503 in statuses:
            fix = f"The RPC proxy cannot reach {server}:{port}: check the ValidPorts registry value of the RPC proxy and that {server} resolves on the Client Access Server."
        elif 401 in statuses:
            fix = f"Enable {'NTLM' if scheme == 'ntlm' else 'Basic'} authentication on /rpc ({enable_command('rpc', scheme)})."
        else:
            fix = "Check the RPC over HTTP Proxy feature and Outlook Anywhere on the Client Access Server."
        done(f"rpc.{port}", "fail", summary, details, fix)

    async def outlook_anywhere(self, target: HttpTarget, scheme: str, server: str, done: Callable[..., None]) -> None:
        """A real Outlook Anywhere connection per port, as Outlook and the migration service open it."""
        credentials = self.settings.credentials
        assert credentials is not None
        started = time.monotonic()
        probes = await asyncio.gather(
            *(probe_virtual_connection(target, server, port, name, syntax, credentials, scheme, call=call, required=required) for port, name, syntax, required, call in OUTLOOK_ANYWHERE)
        )
        done("outlook_anywhere", *evaluate_outlook_anywhere(server, scheme, list(probes), time.monotonic() - started))

    # ---- bridge side ---------------------------------------------------------------------------
    async def bridge_side(self) -> None:
        settings = self.settings
        if not settings.fqdn:
            self.record(
                Check(
                    "bridge.fqdn",
                    "bridge",
                    "skip",
                    "skipped: no --fqdn given, the bridge was not checked",
                    {},
                    "Rerun with --fqdn (and --bridge-addr before its DNS record exists) to check the bridge too.",
                )
            )
            return
        address = await self.reach("bridge", settings.fqdn, settings.https_port, "the bridge", connect_to=settings.bridge_addr)
        if address is None:
            return
        target = HttpTarget(address, settings.https_port, settings.fqdn, self.bridge_host_header(), unverified_modern_context(), settings.timeout)
        await asyncio.gather(
            self.port80_checks(address),
            self.bridge_tls_versions(address),
            self.bridge_certificate(address),
            self.bridge_idle_and_headers(target),
            self.bridge_http(target),
            self.bridge_routes(address),
        )

    def bridge_host_header(self) -> str:
        port = self.settings.https_port
        return self.settings.fqdn if port == 443 else f"{self.settings.fqdn}:{port}"  # type: ignore[return-value]  # bridge checks run only with --fqdn

    def bridge_dns_check(self, addresses: list[str], error: str) -> Check:
        settings = self.settings
        fqdn = settings.fqdn
        details: dict[str, Any] = {"addresses": addresses, "expect_ip": settings.expect_ip, "bridge_addr": settings.bridge_addr}
        if not addresses:
            probed = f"; probing {settings.bridge_addr} as given with --bridge-addr" if settings.bridge_addr else ""
            return Check(
                "bridge.dns",
                "bridge",
                "fail",
                f"{fqdn} does not resolve ({error}){probed}",
                details | {"error": error},
                f"Publish an A record for {fqdn} pointing at the bridge's public IP before creating the migration endpoint.",
            )
        listing = ", ".join(addresses)
        if settings.expect_ip and settings.expect_ip not in addresses:
            return Check(
                "bridge.dns",
                "bridge",
                "fail",
                f"{fqdn} resolves to {listing}, not {settings.expect_ip}",
                details,
                f"Point the A record of {fqdn} at {settings.expect_ip} (and wait for the old record's TTL).",
            )
        if settings.bridge_addr and settings.bridge_addr not in addresses:
            return Check(
                "bridge.dns",
                "bridge",
                "warn",
                f"{fqdn} resolves to {listing}, not to the probed --bridge-addr {settings.bridge_addr}",
                details,
                f"Point the A record of {fqdn} at {settings.bridge_addr} if that is the bridge Exchange Online should use.",
            )
        return Check("bridge.dns", "bridge", "pass", f"{fqdn} resolves to {listing}", details)

    async def port80_checks(self, address: str) -> None:
        settings = self.settings
        port = settings.http_port
        host = settings.fqdn if port == 80 else f"{settings.fqdn}:{port}"
        try:
            headers, status = await plain_http_get(address, port, host, "/", settings.timeout)  # type: ignore[arg-type]  # bridge checks run only with --fqdn
        except Exception as exc:  # noqa: BLE001
            reason = reason_of(exc)
            fix = f"Open port {port} to the bridge: Let's Encrypt renews over HTTP-01 on it (ignore if the certificate is managed elsewhere)."
            self.record(Check("bridge.port80.redirect", "bridge", "warn", f"port {port} does not answer ({reason})", {"port": port, "error": reason}, fix))
            self.record(Check("bridge.port80.acme", "bridge", "skip", f"skipped: port {port} does not answer"))
            return
        location = headers.get("location", "")
        details = {"port": port, "http_status": status, "location": location}
        if status in (301, 302, 307, 308) and location.startswith(f"https://{settings.fqdn}"):
            self.record(Check("bridge.port80.redirect", "bridge", "pass", f"port {port} redirects ({status}) to {location}", details))
        else:
            self.record(
                Check(
                    "bridge.port80.redirect",
                    "bridge",
                    "warn",
                    f"port {port} answers {status} without redirecting to https://{settings.fqdn}",
                    details,
                    "Let the bridge itself listen on port 80 (it redirects and answers ACME challenges).",
                )
            )
        token = "preflight-" + secrets.token_urlsafe(12)
        try:
            headers, status = await plain_http_get(address, port, host, ACME_PREFIX + token, settings.timeout)  # type: ignore[arg-type]  # bridge checks run only with --fqdn
        except Exception as exc:  # noqa: BLE001
            self.record(Check("bridge.port80.acme", "bridge", "warn", f"the ACME challenge path got no answer ({reason_of(exc)})", {"port": port}, ""))
            return
        details = {"port": port, "path": ACME_PREFIX + token, "http_status": status, "location": headers.get("location", "")}
        if status in (200, 404):
            self.record(Check("bridge.port80.acme", "bridge", "pass", f"the ACME challenge path is served on port {port} (unknown token: {status})", details))
        else:
            self.record(
                Check(
                    "bridge.port80.acme",
                    "bridge",
                    "warn",
                    f"the ACME challenge path answers {status} instead of being served",
                    details,
                    "Nothing may redirect or rewrite /.well-known/acme-challenge/ on port 80 in front of the bridge; certificate renewal needs it.",
                )
            )

    async def bridge_tls_versions(self, address: str) -> None:
        settings = self.settings

        async def accepts(version: ssl.TLSVersion) -> tuple[bool | None, str]:
            context = exact_version_context(version, "ALL:@SECLEVEL=0")
            try:
                handshake = await tls_handshake(address, settings.https_port, context, settings.fqdn or "", settings.timeout)
            except Exception as exc:  # noqa: BLE001
                reason = reason_of(exc)
                if "NO_PROTOCOLS_AVAILABLE" in reason.upper() or "NO_CIPHERS_AVAILABLE" in reason.upper():
                    return None, f"this machine's OpenSSL cannot offer it ({reason})"
                return (False, reason) if refused_handshake(exc) else (None, reason)
            return True, handshake.cipher

        results = dict(zip([label for label, _ in TLS_VERSIONS], await asyncio.gather(*(accepts(version) for _, version in TLS_VERSIONS)), strict=True))
        details = {label: ("accepted: " + note if ok else ("refused: " + note if ok is False else "unknown: " + note)) for label, (ok, note) in results.items()}
        modern_ok = [label for label in ("TLS 1.2", "TLS 1.3") if results[label][0]]
        if results["TLS 1.2"][0] and results["TLS 1.3"][0]:
            self.record(Check("bridge.tls.modern", "bridge", "pass", "accepts TLS 1.2 and TLS 1.3", details))
        elif results["TLS 1.2"][0]:
            self.record(Check("bridge.tls.modern", "bridge", "warn", "accepts TLS 1.2 but not TLS 1.3", details, "Run the bridge on a system whose OpenSSL has TLS 1.3."))
        else:
            self.record(
                Check(
                    "bridge.tls.modern",
                    "bridge",
                    "fail",
                    f"refuses TLS 1.2 ({results['TLS 1.2'][1]})" + (f", accepts {', '.join(modern_ok)}" if modern_ok else ""),
                    details,
                    "Exchange Online connects with TLS 1.2: make sure the bridge itself (not another service) answers on this port.",
                )
            )
        obsolete = {label: results[label] for label in ("TLS 1.0", "TLS 1.1")}
        accepted = [label for label, (ok, _) in obsolete.items() if ok]
        unknown = [label for label, (ok, _) in obsolete.items() if ok is None]
        if accepted:
            self.record(
                Check(
                    "bridge.tls.obsolete",
                    "bridge",
                    "fail",
                    f"accepts {' and '.join(accepted)}, which the bridge never offers",
                    details,
                    "Something other than the bridge answers on this port, or a TLS offloader in front of it allows old versions: allow TLS 1.2+ only.",
                )
            )
        elif unknown:
            self.record(Check("bridge.tls.obsolete", "bridge", "skip", f"skipped: could not test {' and '.join(unknown)} ({obsolete[unknown[0]][1]})", details))
        else:
            self.record(Check("bridge.tls.obsolete", "bridge", "pass", "refuses TLS 1.0 and TLS 1.1", details))

    async def bridge_certificate(self, address: str) -> None:
        settings = self.settings
        fqdn = settings.fqdn or ""
        try:
            served = await tls_handshake(address, settings.https_port, unverified_modern_context(), fqdn, settings.timeout)
        except Exception as exc:  # noqa: BLE001
            self.record(Check("bridge.certificate", "bridge", "fail", f"no TLS 1.2+ handshake to read the certificate ({reason_of(exc)})", {}, ""))
            return
        info = inspect_certificate(x509.load_der_x509_certificate(served.der or b""))
        details = {
            "subject": info.subject,
            "sans": info.sans,
            "issuer": info.issuer,
            "not_after": info.not_after.isoformat(),
            "days_left": int(info.days_left),
            "key": info.key_type,
            "sha256": info.sha256,
            "ca_bundle": str(settings.ca_bundle) if settings.ca_bundle else None,
        }
        try:
            await tls_handshake(address, settings.https_port, trusting_context(settings.ca_bundle), fqdn, settings.timeout)
        except ssl.SSLCertVerificationError as exc:
            message = exc.verify_message or str(exc)
            details["verify_error"] = message
            if "hostname mismatch" in message.lower() or "ip address mismatch" in message.lower():
                self.record(
                    Check(
                        "bridge.certificate",
                        "bridge",
                        "fail",
                        f"the certificate does not cover {fqdn} (it names {', '.join(info.sans) or info.subject})",
                        details,
                        f"Obtain a certificate for {fqdn} (bridge cert) or run the bridge with --fqdn {fqdn}.",
                    )
                )
            elif info.days_left < 0:
                self.record(
                    Check("bridge.certificate", "bridge", "fail", f"the certificate expired on {info.not_after:%Y-%m-%d}", details, "Renew it: bridge cert renew, then restart or SIGHUP the bridge.")
                )
            else:
                self.record(
                    Check(
                        "bridge.certificate",
                        "bridge",
                        "fail",
                        f"the certificate chain is not trusted ({message}); issuer {info.issuer}",
                        details,
                        "Serve the full chain (fullchain.pem) from a publicly trusted CA; for a staging or private CA pass it with --ca-bundle.",
                    )
                )
            return
        except Exception as exc:  # noqa: BLE001
            self.record(Check("bridge.certificate", "bridge", "fail", f"the verifying handshake failed ({reason_of(exc)})", details, ""))
            return
        summary = f"trusted chain for {fqdn} from {info.issuer}, {int(info.days_left)} days left"
        if info.days_left < EXPIRY_WARNING_DAYS:
            self.record(Check("bridge.certificate", "bridge", "warn", summary, details, "Renew the certificate before the migration runs (bridge cert renew)."))
        else:
            self.record(Check("bridge.certificate", "bridge", "pass", summary, details))

    async def bridge_routes(self, address: str) -> None:
        """SNI routing: each passthrough name resolves to the bridge and reaches its backend's own
        certificate through it; each --terminate name gets the bridge's certificate."""
        settings = self.settings
        if not (settings.routes or settings.terminate):
            return
        fqdn = settings.fqdn or ""

        async def served(name: str) -> Handshake:
            return await tls_handshake(address, settings.https_port, unverified_modern_context(), name, settings.timeout)

        try:
            own = await served(fqdn)
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            for route in settings.routes:
                self.record(Check(f"bridge.route.{route.name}", "bridge", "skip", f"skipped: no handshake for {fqdn} to compare with ({reason_of(exc)})"))
            for name in settings.terminate:
                self.record(Check(f"bridge.terminate.{name}", "bridge", "skip", f"skipped: no handshake for {fqdn} to compare with ({reason_of(exc)})"))
            return
        own_sha = fingerprint(own.der or b"")
        bridge_addresses = {address, *(a for a in [settings.expect_ip, settings.bridge_addr] if a)}

        async def check_route(route: PassthroughRoute) -> None:
            check_id, name = f"bridge.route.{route.name}", probe_name(route.name)
            details: dict[str, Any] = {"route": str(route), "sni": name}
            if "*" not in route.name:
                try:
                    addresses = await resolve(route.name, settings.https_port, settings.timeout)
                except Exception as exc:  # noqa: BLE001
                    addresses, details["resolve_error"] = [], reason_of(exc)
                details["addresses"] = addresses
                if not set(addresses) & bridge_addresses:
                    where = ", ".join(addresses) or f"nothing ({details.get('resolve_error', 'no address')})"
                    self.record(
                        Check(
                            check_id,
                            "bridge",
                            "fail",
                            f"{route.name} resolves to {where}, not to the bridge ({address})",
                            details,
                            f"Point the A record of {route.name} at the bridge's public address: the bridge routes it to {route.backend} by SNI.",
                        )
                    )
                    return
            try:
                handshake = await served(name)
            except Exception as exc:  # noqa: BLE001
                self.record(
                    Check(
                        check_id,
                        "bridge",
                        "fail",
                        f"no TLS handshake for {name} through the bridge ({reason_of(exc)})",
                        details,
                        f"Check that {route.backend} is up and answers TLS, and that the bridge can reach it (the status page shows the route's health).",
                    )
                )
                return
            info = inspect_certificate(x509.load_der_x509_certificate(handshake.der or b""))
            details |= {"subject": info.subject, "issuer": info.issuer, "sans": info.sans, "sha256": fingerprint(handshake.der or b""), "version": handshake.version}
            if details["sha256"] == own_sha:
                self.record(
                    Check(
                        check_id,
                        "bridge",
                        "fail",
                        f"{name} gets the bridge's own certificate, not its backend's",
                        details,
                        f"The route is not in effect: run the bridge with --passthrough {route} (or in its TOML) and restart it.",
                    )
                )
                return
            self.record(Check(check_id, "bridge", "pass", f"{name} reaches {route.backend} through the bridge: its certificate {info.subject}, issued by {info.issuer}", details))

        async def check_terminated(name: str) -> None:
            check_id = f"bridge.terminate.{name}"
            try:
                handshake = await served(probe_name(name))
            except Exception as exc:  # noqa: BLE001
                self.record(Check(check_id, "bridge", "fail", f"no TLS handshake for {name} ({reason_of(exc)})", {}, ""))
                return
            info = inspect_certificate(x509.load_der_x509_certificate(handshake.der or b""))
            details = {"sni": probe_name(name), "sans": info.sans}
            if fingerprint(handshake.der or b"") != own_sha:
                fix = f"A route sends {name} elsewhere: list it with --terminate only if the bridge should answer it, and not as --passthrough."
                self.record(Check(check_id, "bridge", "fail", f"{name} does not get the bridge's certificate (it gets {info.subject})", details, fix))
            elif not certificate_names_host(info.sans, info.subject, probe_name(name)):
                fix = f"Clients of {name} will refuse the certificate: obtain one that also names {name} (or drop --terminate {name})."
                self.record(Check(check_id, "bridge", "warn", f"{name} is terminated by the bridge, but its certificate names only {', '.join(info.sans)}", details, fix))
            else:
                self.record(Check(check_id, "bridge", "pass", f"{name} is terminated by the bridge with its certificate", details))

        await asyncio.gather(*(check_route(route) for route in settings.routes), *(check_terminated(name) for name in settings.terminate))

    async def bridge_idle_and_headers(self, target: HttpTarget) -> None:
        hold = self.settings.hold
        try:
            connection = await HttpConnection.open(target)
        except ProbeError as exc:
            self.record(Check("bridge.headers", "bridge", "fail", f"the bridge could not be asked ({exc})"))
            self.record(Check("bridge.idle", "bridge", "skip", "skipped: no connection to hold"))
            return
        try:
            try:
                first = await connection.request("GET", "/owa/", request_headers("GET"))
            except ProbeError as exc:
                self.record(Check("bridge.headers", "bridge", "fail", f"the bridge did not answer GET /owa/ ({exc})"))
                self.record(Check("bridge.idle", "bridge", "skip", "skipped: the first request got no answer"))
                return
            self.record(security_headers_check(first))
            await asyncio.sleep(hold)
            try:
                second = await connection.request("GET", "/owa/", request_headers("GET"))
            except ProbeError as exc:
                self.record(
                    Check(
                        "bridge.idle",
                        "bridge",
                        "fail",
                        f"an idle connection did not survive {hold:g} s ({exc})",
                        {"hold_seconds": hold},
                        "Raise the idle timeout of the bridge (--idle-timeout, default 1800 s) and of any load balancer or firewall in front of it to well above 15 minutes.",
                    )
                )
                return
            note = "" if hold >= 900 else "; rerun with --hold 960 to prove the 15 minutes Outlook Anywhere channels may idle"
            self.record(Check("bridge.idle", "bridge", "pass", f"an idle connection survived {hold:g} s (answer {second.status} after the pause){note}", {"hold_seconds": hold}))
        finally:
            connection.close()

    async def bridge_http(self, target: HttpTarget) -> None:
        self.through_bridge.update(await self.http_checks(target, "bridge", lambda check: None))

    def compare_through_bridge(self) -> None:
        """Record bridge.<suffix> for each HTTP check: the result through the bridge against the direct one."""
        if not self.settings.fqdn:
            return
        for suffix, via in self.through_bridge.items():
            self.record(compare(suffix, self.direct.get(suffix), via))

    def recommended_authentication(self) -> str | None:
        """The -Authentication of New-MigrationEndpoint: the scheme the RPC checks used. With
        credentials and no logon that worked, nothing is recommended (nothing was proven)."""
        label = {"ntlm": "NTLM", "basic": "Basic"}
        for results in (self.direct, self.through_bridge):
            scheme = self.working_scheme(results)
            if scheme:
                return label[scheme]
        if self.settings.credentials:
            return None
        if self.settings.auth != "both":
            return label[self.settings.auth]
        rpc = self.direct.get("http.rpc") or self.through_bridge.get("http.rpc")
        if rpc and rpc.details.get("auth_schemes"):
            return "NTLM" if offers(rpc.details["auth_schemes"], "ntlm") else "Basic"
        return None


def compare(suffix: str, direct: Check | None, via: Check) -> Check:
    check_id = f"bridge.{suffix}"
    if via.status == "skip":
        return Check(check_id, "bridge", "skip", via.summary, via.details)
    keys = COMPARED_DETAILS[suffix.split(".", 1)[0]]
    through = {key: via.details.get(key) for key in keys}
    if direct is None or direct.status == "skip":
        return Check(check_id, "bridge", via.status, f"{via.summary} (no direct result to compare)", via.details | {"through_bridge": through}, via.fix)
    direct_values = {key: direct.details.get(key) for key in keys}
    details = via.details | {"direct": direct_values, "through_bridge": through}
    if direct_values == through:
        note = "" if direct.status == "pass" else f" (the direct check is {direct.status})"
        return Check(check_id, "bridge", "pass", f"same as direct: {via.summary}{note}", details)
    differences = ", ".join(f"{key} {direct_values[key]!r} directly but {through[key]!r} through the bridge" for key in keys if direct_values[key] != through[key])
    fix = "Check the bridge's forward_paths and its log (journalctl -u exchange-bridge) for this request; the bridge must pass it unchanged."
    if suffix == "outlook_anywhere" and via.status == "fail" and via.fix:
        fix = via.fix  # the failing step names its own fix, which applies between Exchange Online and the bridge too
    return Check(check_id, "bridge", "fail", f"differs through the bridge: {differences}", details, fix)


def security_headers_check(answer: HttpAnswer) -> Check:
    found = {name: answer.header(name) for name, _ in SECURITY_HEADERS}
    missing = [name for name, value in found.items() if not value]
    if missing:
        return Check(
            "bridge.headers",
            "bridge",
            "warn",
            f"missing security header(s) {', '.join(missing)} on GET /owa/",
            {"headers": found},
            "Run the bridge itself on this port: it adds X-Frame-Options and X-Content-Type-Options.",
        )
    return Check("bridge.headers", "bridge", "pass", f"{' and '.join(found)} present", {"headers": found})


async def attempt(coroutine: Any) -> tuple[HttpAnswer | None, str | None]:
    try:
        return await coroutine, None
    except ProbeError as exc:
        return None, str(exc)


async def accepted_suites(address: str, port: int, sni: str, version: ssl.TLSVersion, timeout: float) -> list[str]:
    """The suites the server accepts for one TLS version, in its order of preference ([] if refused)."""
    found: list[str] = []
    while len(found) < MAX_SUITES:
        ciphers = ":".join(["ALL"] + [f"!{name}" for name in found] + ["@SECLEVEL=0"])
        try:
            context = exact_version_context(version, ciphers)
        except ssl.SSLError:  # no suite left to offer
            break
        try:
            handshake = await tls_handshake(address, port, context, sni, timeout)
        except Exception:  # noqa: BLE001 - a refusal ends the enumeration
            break
        if handshake.cipher in found:
            break
        found.append(handshake.cipher)
        if version == ssl.TLSVersion.TLSv1_3:
            break  # TLS 1.3 suites cannot be excluded through set_ciphers
    return found


async def run_preflight(settings: Settings, on_result: Callable[[Check], None] | None = None) -> Report:
    return await Preflight(settings, on_result).run()


# --------------------------------------------------------------------------- command line
