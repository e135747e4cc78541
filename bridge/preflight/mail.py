"""`bridge preflight --imap/--pop3/--smtp`: Exchange 2007's IMAP4, POP3 and SMTP client services, directly
and through the bridge's mail listeners.

Per service and side, two checks:

* ``<side>.<label>.service``: the TLS versions it accepts (each offered alone), its greeting and its
  capabilities (IMAP ``CAPABILITY``, POP3 ``CAPA``, SMTP ``EHLO``). Upstream STARTTLS modes run the
  protocol's own upgrade first, with the very negotiators the bridge uses (bridge.protocol's
  ``UpstreamStartTls``); the bridge's 587 runs it against the bridge, which answers STARTTLS itself.
  Through the bridge TLS 1.2 must be accepted and TLS 1.0/1.1 refused, and the certificate must verify
  for the FQDN (the system store plus --ca-bundle).
* ``<side>.<label>.logon``, with credentials: a logon (IMAP ``LOGIN``, POP3 ``USER``/``PASS``, SMTP
  ``AUTH LOGIN`` or ``PLAIN``); for IMAP ``LIST`` and ``SELECT INBOX`` with its message count, for POP3
  ``STAT``. Through the bridge the count must equal the direct one.

The password goes on the wire only; no check, detail or log line holds it.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from dataclasses import dataclass, field
from typing import Any

from bridge.config import LegacyServer, is_ip_address
from bridge.preflight.model import ENUMERATION_CIPHERS, TLS_VERSIONS, VERSION_NAMES, Check, Settings
from bridge.preflight.probe import Credentials, exact_version_context, legacy_client, reason_of, resolve, trusting_context

PROTOCOL_NAMES = {"imap": "IMAP4", "pop3": "POP3", "smtp": "SMTP", "submission": "SMTP submission"}
EHLO_NAME = "preflight.invalid"
READ_LIMIT = 64 * 1024
_EXISTS = re.compile(rb"^\* (\d+) EXISTS", re.IGNORECASE | re.MULTILINE)
SERVICE_FIXES = {
    "imap": (
        "Start the IMAP4 service on the Client Access Server (Set-Service MSExchangeIMAP4 -StartupType Automatic; Start-Service MSExchangeIMAP4) and check its port and certificate (Get-IMAPSettings)."
    ),
    "pop3": (
        "Start the POP3 service on the Client Access Server (Set-Service MSExchangePOP3 -StartupType Automatic; Start-Service MSExchangePOP3) and check its port and certificate (Get-POPSettings)."
    ),
    "smtp": "Check the client receive connector (Get-ReceiveConnector: port 587, TLS with a certificate, Basic authentication over TLS).",
}
LOGON_FIXES = {
    "imap": "Check the user name (DOMAIN\\user or the UPN) and password, and that the mailbox may use IMAP (Set-CASMailbox -ImapEnabled $true).",
    "pop3": "Check the user name (DOMAIN\\user or the UPN) and password, and that the mailbox may use POP3 (Set-CASMailbox -PopEnabled $true).",
    "smtp": "Check the user name and password, and that the receive connector offers Basic authentication over TLS (Set-ReceiveConnector -AuthMechanism Tls,BasicAuth,BasicAuthRequireTLS).",
}


@dataclass
class MailTarget:
    """One mail service to probe: its legacy endpoint and mode, and the bridge's ports for it (label -> port)."""

    protocol: str  # imap, pop3, smtp
    legacy: LegacyServer
    mode: str = "implicit"  # implicit, starttls, plain: how the legacy service is reached
    bridge_ports: dict[str, int] = field(default_factory=dict)  # imap: 993; pop3: 995; smtp: 465 and submission: 587


def planned_mail_checks(settings: Settings) -> list[tuple[str, str]]:
    planned: list[tuple[str, str]] = []
    kinds = ["service"] + (["logon"] if settings.credentials else [])
    for target in settings.mail:
        planned += [(f"legacy.{target.protocol}.{kind}", "legacy") for kind in kinds]
    if settings.fqdn:
        for target in settings.mail:
            planned += [(f"bridge.{label}.{kind}", "bridge") for label in target.bridge_ports for kind in kinds]
    return planned


# --------------------------------------------------------------------------- a line client


class MailClient:
    """One session: lines and replies read within the timeout, commands written, TLS started in place."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout

    async def line(self) -> bytes:
        line = await asyncio.wait_for(self.reader.readline(), self.timeout)
        if not line:
            raise ConnectionResetError("the server closed the connection")
        return line

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), self.timeout)

    async def reply(self, protocol: str, tag: bytes = b"") -> list[bytes]:
        """One whole answer: IMAP up to its tagged line, POP3 one line, SMTP every line of a reply."""
        lines = [await self.line()]
        if protocol == "imap":
            while tag and not lines[-1].startswith(tag + b" "):
                lines.append(await self.line())
        elif protocol != "pop3":
            while lines[-1][3:4] == b"-":
                lines.append(await self.line())
        return lines

    async def multiline(self) -> list[bytes]:
        """A POP3 multi-line answer's lines, up to the lone "."."""
        lines = []
        while (line := await self.line()).rstrip(b"\r\n") != b".":
            lines.append(line)
        return lines

    def tls(self) -> tuple[str | None, str | None]:
        ssl_object = self.writer.get_extra_info("ssl_object")
        return (VERSION_NAMES.get(ssl_object.version(), ssl_object.version()), ssl_object.cipher()[0]) if ssl_object else (None, None)

    def close(self) -> None:
        self.writer.close()


def negotiator(protocol: str) -> Any:
    """The bridge's own upstream STARTTLS for ``protocol`` (bridge.protocol.mail.UpstreamStartTls)."""
    from bridge.protocol.imap import ImapStartTls
    from bridge.protocol.pop3 import Pop3StartTls
    from bridge.protocol.smtp import SmtpStartTls

    return {"imap": ImapStartTls, "pop3": Pop3StartTls}.get(protocol, lambda: SmtpStartTls(EHLO_NAME))()


async def open_session(protocol: str, address: str, port: int, mode: str, context: ssl.SSLContext | None, sni: str, timeout: float) -> tuple[MailClient, bytes]:
    """A session up to its greeting (after STARTTLS in that mode): the client and the greeting's text."""
    wire = "imap" if protocol == "imap" else "pop3" if protocol == "pop3" else "smtp"
    implicit = mode == "implicit"
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port, ssl=context if implicit else None, server_hostname=(sni or None) if implicit else None, limit=READ_LIMIT), timeout)
    client = MailClient(reader, writer, timeout)
    try:
        if mode != "starttls":
            return client, b"".join(await client.reply(wire))
        upgrade = negotiator(wire)
        if first := upgrade.start():
            await client.send(first)
        while True:
            data = await asyncio.wait_for(reader.read(READ_LIMIT), timeout)
            if not data:
                raise ConnectionResetError("the server closed the connection before STARTTLS")
            step = upgrade.feed(data)
            if step.error:
                raise ConnectionError(step.error)
            if step.send:
                await client.send(step.send)
            if step.ready:
                break
        assert context is not None
        await asyncio.wait_for(writer.start_tls(context, server_hostname=sni or None), timeout)
        return client, step.greeting
    except BaseException:
        client.close()
        raise


async def capabilities(client: MailClient, protocol: str) -> list[str]:
    if protocol == "imap":
        await client.send(b"p1 CAPABILITY\r\n")
        lines = await client.reply("imap", b"p1")
        return [word.decode(errors="replace") for line in lines if line.upper().startswith(b"* CAPABILITY") for word in line.split()[2:]]
    if protocol == "pop3":
        await client.send(b"CAPA\r\n")
        if not (await client.line()).startswith(b"+OK"):
            return []
        return [line.rstrip(b"\r\n").decode(errors="replace") for line in await client.multiline()]
    await client.send(f"EHLO {EHLO_NAME}\r\n".encode())
    lines = await client.reply("smtp")
    return [line[4:].rstrip(b"\r\n").decode(errors="replace") for line in lines[1:]] if lines[0].startswith(b"250") else []


def imap_quoted(text: str) -> bytes:
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


async def logon(client: MailClient, protocol: str, credentials: Credentials, offered: list[str]) -> dict[str, Any]:
    """Log on and look around; the details of the logon check (never the password)."""
    user, password = credentials.username, credentials.password
    found: dict[str, Any] = {"user": user}
    if protocol == "imap":
        await client.send(b"p2 LOGIN " + imap_quoted(user) + b" " + imap_quoted(password) + b"\r\n")
        answer = (await client.reply("imap", b"p2"))[-1]
        found["outcome"], found["answer"] = ("ok" if answer.split()[1:2] == [b"OK"] else "refused"), answer[3:].strip().decode(errors="replace")
        if found["outcome"] == "ok":
            await client.send(b'p3 LIST "" "*"\r\n')
            found["folders"] = sum(1 for line in await client.reply("imap", b"p3") if line.upper().startswith(b"* LIST"))
            await client.send(b"p4 SELECT INBOX\r\n")
            selected = b"".join(await client.reply("imap", b"p4"))
            count = _EXISTS.search(selected)
            found["messages"] = int(count.group(1)) if count else None
            await client.send(b"p5 LOGOUT\r\n")
        return found
    if protocol == "pop3":
        await client.send(b"USER " + user.encode() + b"\r\n")
        await client.line()
        await client.send(b"PASS " + password.encode() + b"\r\n")
        answer = await client.line()
        found["outcome"], found["answer"] = ("ok" if answer.startswith(b"+OK") else "refused"), answer.strip().decode(errors="replace")
        if found["outcome"] == "ok":
            await client.send(b"STAT\r\n")
            stat = (await client.line()).split()
            found["messages"] = int(stat[1]) if len(stat) > 2 and stat[1].isdigit() else None
            await client.send(b"QUIT\r\n")
        return found
    mechanisms = next((line.split()[1:] for line in offered if line.upper().startswith("AUTH ")), [])
    mechanism = next((name for name in ("LOGIN", "PLAIN") if name in (word.upper() for word in mechanisms)), None)
    if mechanism is None:
        return found | {"outcome": "not offered", "answer": f"AUTH {' '.join(mechanisms) or 'none'}"}
    if mechanism == "PLAIN":
        await client.send(b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()) + b"\r\n")
    else:
        await client.send(b"AUTH LOGIN\r\n")
        for value in (user, password):
            if not (await client.reply("smtp"))[-1].startswith(b"334"):
                break
            await client.send(base64.b64encode(value.encode()) + b"\r\n")
    answer = (await client.reply("smtp"))[-1]
    found["mechanism"] = mechanism
    found["outcome"], found["answer"] = ("ok" if answer.startswith(b"235") else "refused"), answer.strip().decode(errors="replace")
    await client.send(b"QUIT\r\n")
    return found


# --------------------------------------------------------------------------- one service on one side


@dataclass
class Endpoint:
    side: str  # legacy or bridge
    label: str  # imap, pop3, smtp, submission: the check ids' middle part
    protocol: str  # imap, pop3, smtp
    host: str
    port: int
    mode: str  # implicit, starttls (the client's STARTTLS), plain
    sni: str
    context: ssl.SSLContext  # the session's: the legacy client's, or one that verifies the bridge

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


async def tls_versions(endpoint: Endpoint, address: str, timeout: float) -> dict[str, str]:
    """Each TLS version offered alone: ``accepted`` or ``refused``."""

    async def one(version: ssl.TLSVersion) -> str:
        try:
            context = exact_version_context(version, ENUMERATION_CIPHERS)
        except (ssl.SSLError, ValueError):
            return "not offered by this machine"
        try:
            client, _ = await open_session(endpoint.protocol, address, endpoint.port, endpoint.mode, context, endpoint.sni, timeout)
        except Exception:  # noqa: BLE001 - a refusal is the answer
            return "refused"
        client.close()
        return "accepted"

    results = await asyncio.gather(*(one(version) for _, version in TLS_VERSIONS))
    return {name: result for (name, _), result in zip(TLS_VERSIONS, results, strict=True)}


async def probe_endpoint(endpoint: Endpoint, settings: Settings, direct: dict[str, Check]) -> list[Check]:
    """The service check and, with credentials, the logon check of one endpoint."""
    prefix, name = f"{endpoint.side}.{endpoint.label}", PROTOCOL_NAMES[endpoint.label]
    timeout, credentials = settings.timeout, settings.credentials
    skipped = [Check(f"{prefix}.logon", endpoint.side, "skip", "skipped: the service check failed")] if credentials else []
    try:
        if endpoint.side == "bridge" and settings.bridge_addr:
            address = settings.bridge_addr
        else:
            address = endpoint.host if is_ip_address(endpoint.host) else (await resolve(endpoint.host, endpoint.port, timeout))[0]
        client, greeting = await open_session(endpoint.protocol, address, endpoint.port, endpoint.mode, endpoint.context if endpoint.mode != "plain" else None, endpoint.sni, timeout)
    except Exception as exc:  # noqa: BLE001 - every failure is reported
        reason = reason_of(exc)
        fix = SERVICE_FIXES[endpoint.protocol]
        if endpoint.side == "bridge":
            fix = f"Check that the bridge runs with its {endpoint.label} listener on port {endpoint.port} and that firewalls let it in (journalctl -u exchange-bridge)."
        if isinstance(exc, ssl.SSLCertVerificationError):
            fix = "The bridge's certificate does not verify for this name: check --mail-fqdn and the certificate's names (bridge cert show)."
        details = {"host": endpoint.host, "port": endpoint.port, "mode": endpoint.mode, "error": reason}
        return [Check(f"{prefix}.service", endpoint.side, "fail", f"{name} on {endpoint.where} ({endpoint.mode}): {reason}", details, fix), *skipped]
    try:
        version, cipher = client.tls()
        offered = await capabilities(client, endpoint.protocol)
        versions = await tls_versions(endpoint, address, timeout) if endpoint.mode != "plain" else {}
        found = await logon(client, endpoint.protocol, credentials, offered) if credentials else None
    except Exception as exc:  # noqa: BLE001
        reason = reason_of(exc)
        details = {"host": endpoint.host, "port": endpoint.port, "mode": endpoint.mode, "error": reason}
        return [Check(f"{prefix}.service", endpoint.side, "fail", f"{name} on {endpoint.where} stopped answering: {reason}", details, SERVICE_FIXES[endpoint.protocol]), *skipped]
    finally:
        client.close()
    text = greeting.decode(errors="replace").strip().replace("\r\n", " ")
    accepted = [label for label, result in versions.items() if result == "accepted"]
    details = {"host": endpoint.host, "port": endpoint.port, "mode": endpoint.mode, "greeting": text, "capabilities": offered, "tls": versions, "negotiated": version, "cipher": cipher}
    summary = f"{name} on {endpoint.where} ({endpoint.mode}{', ' + version if version else ''}): greeting {text[:80]!r}; {len(offered)} capabilities; accepts {', '.join(accepted) or 'no TLS'}"
    status, fix = ("pass", "") if text[:1] in ("*", "+", "2") else ("fail", SERVICE_FIXES[endpoint.protocol])
    if endpoint.side == "bridge" and versions:
        if versions.get("TLS 1.2") != "accepted" or "accepted" in (versions.get("TLS 1.0"), versions.get("TLS 1.1")):
            status, fix = "fail", "Run the bridge itself on this port: it accepts TLS 1.2 and 1.3 only."
        elif versions.get("TLS 1.3") != "accepted" and status == "pass":
            status = "warn"
    checks = [Check(f"{prefix}.service", endpoint.side, status, summary, details, fix)]
    if found is not None:
        checks.append(logon_check(endpoint, found, direct.get(f"legacy.{endpoint.protocol}.logon")))
    return checks


def logon_check(endpoint: Endpoint, found: dict[str, Any], direct: Check | None) -> Check:
    check_id, name = f"{endpoint.side}.{endpoint.label}.logon", PROTOCOL_NAMES[endpoint.label]
    if found["outcome"] != "ok":
        return Check(check_id, endpoint.side, "fail", f"{name} logon as {found['user']} {found['outcome']}: {found.get('answer', '')}", found, LOGON_FIXES[endpoint.protocol])
    seen = []
    if "folders" in found:
        seen.append(f"LIST: {found['folders']} folders")
    if "messages" in found:
        seen.append(f"INBOX: {found['messages']} messages" if endpoint.protocol == "imap" else f"STAT: {found['messages']} messages")
    summary = f"{name} logon as {found['user']} ok" + ("; " + ", ".join(seen) if seen else "")
    if direct is not None and direct.status == "pass" and "messages" in found and direct.details.get("messages") != found["messages"]:
        found = found | {"direct_messages": direct.details.get("messages")}
        fix = "The bridge must reach the same mailbox: check --imap-upstream/--pop3-upstream."
        return Check(check_id, endpoint.side, "fail", f"{summary}, but {direct.details.get('messages')} directly", found, fix)
    return Check(check_id, endpoint.side, "pass", summary, found)


def endpoints(settings: Settings) -> tuple[list[Endpoint], list[Endpoint]]:
    """The legacy endpoints and the bridge's, of every service asked for."""
    legacy, bridge = [], []
    for target in settings.mail:
        host = target.legacy.host
        legacy.append(Endpoint("legacy", target.protocol, target.protocol, host, target.legacy.port, target.mode, "" if is_ip_address(host) else host, legacy_client()))
        if settings.fqdn:
            for label, port in target.bridge_ports.items():
                mode = "starttls" if label == "submission" else "implicit"
                bridge.append(Endpoint("bridge", label, target.protocol, settings.fqdn, port, mode, settings.fqdn, trusting_context(settings.ca_bundle)))
    return legacy, bridge


async def mail_checks(settings: Settings) -> list[Check]:
    """Every mail check: the legacy services first (their logons give the counts the bridge's must match)."""
    legacy, bridge = endpoints(settings)
    direct: dict[str, Check] = {}
    for checks in await asyncio.gather(*(probe_endpoint(endpoint, settings, {}) for endpoint in legacy)):
        direct.update((check.id, check) for check in checks)
    through = await asyncio.gather(*(probe_endpoint(endpoint, settings, direct) for endpoint in bridge))
    return list(direct.values()) + [check for checks in through for check in checks]
