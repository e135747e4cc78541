"""A simulated Exchange 2007 Client Access Server, as a mailbox migration sees it.

It speaks TLS 1.0 only with RSA-key-exchange CBC suites and a self-signed RSA-1024 SHA-1
certificate, authenticates with real NTLM (pyspnego's acceptor, bound to the TCP connection as IIS
does) and Basic, and serves the Outlook Anywhere surface: Autodiscover, EWS, OWA's redirect and
``/rpc/rpcproxy.dll`` with echo requests, streaming IN/OUT channels and real RPC over HTTP v2 virtual
connections (CONN/A1 + CONN/B1, binds and calls; see bridge.lab.rpch). Counters record what it saw
so tests can check what a proxy in front of it did.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import datetime as dt
import errno
import functools
import hashlib
import json
import os
import random
import re
import signal
import ssl
import struct
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import spnego
from aiohttp import web
from aiohttp.web_request import BaseRequest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from bridge.certs.keys import legacy_self_signed
from bridge.errors import StartupError
from bridge.lab import rpch
from bridge.lab.aio_server import bound_port, connection_state, start_site
from bridge.lab.mailbox import MailCounters, MailLogons
from bridge.lab.pop3 import POP3_SASL, Pop3Service, start_pop3
from bridge.lab.smtp import SMTP_AUTH_AFTER_TLS, SmtpService, start_smtp
from bridge.net.tls import fingerprint, pin_flag
from bridge.protocol import rts
from bridge.protocol.auth import NTLM_SIGNATURE, starts_new_handshake

DEFAULT_HOSTNAME = "exch2007.lab.test"
DEFAULT_INTERNAL_SERVER = "EXCH2007.lab.local"
DEFAULT_USERS = {"LAB\\alice": "Passw0rd!"}
DEFAULT_CLI_PORT = 8443

TLS10_CIPHERS = "AES128-SHA:AES256-SHA:@SECLEVEL=0"
# A Windows 2008 R2 with TLS 1.2 switched on: the CBC suites plus ECDHE-GCM.
TLS12_CIPHERS = "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:AES128-SHA:AES256-SHA:@SECLEVEL=0"
TLS_SHAPES = {
    "1.0": (ssl.TLSVersion.TLSv1, TLS10_CIPHERS, "TLS 1.0 only (AES128-SHA, AES256-SHA)"),
    "1.2": (ssl.TLSVersion.TLSv1_2, TLS12_CIPHERS, "TLS 1.0-1.2 (AES-CBC-SHA, ECDHE-RSA-AES-GCM)"),
}
AUTH_MODES = ("basic", "ntlm", "both")

SERVER_HEADER = "Microsoft-IIS/7.0"
RECENT_REQUESTS = 200
ECHO_MAX_BODY = 16
DEFAULT_OUT_SIZE = 128 * 1024
MAX_OUT_SIZE = 2 * 1024**3
# Bodies read before answering an error on a keep-alive connection; larger ones close it instead.
DRAIN_LIMIT = 1024**2
SMALL_BODY_LIMIT = 1024**2
PAYLOAD_BLOCK = 64 * 1024
PAYLOAD_INDEX_BYTES = 8

CONTINUE_SENT = web.RequestKey("lab_continue_sent", bool)
FINAL_CHALLENGES = web.RequestKey("lab_final_challenges", list)

ORGANISATION_DN = "/o=Lab Organization/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)"
EXCHANGE_2007_SP3 = (8, 3, 83)


# --------------------------------------------------------------------------- options and counters


@dataclass
class LabOptions:
    host: str = "127.0.0.1"
    port: int = 0
    hostname: str = DEFAULT_HOSTNAME
    state_dir: Path | None = None
    tls_max: str = "1.0"
    expired_cert: bool = False
    auth: str = "both"
    rpc: bool = True
    users: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_USERS))
    internal_server: str = DEFAULT_INTERNAL_SERVER
    # Shapes real servers come in (each a preflight case): /rpc's own authentication (Outlook
    # Anywhere set to Basic while EWS and Autodiscover also take NTLM is the usual 2007 setup),
    # no Autodiscover, a weak key, a slow server.
    rpc_auth: str | None = None  # basic | ntlm | both; None: as --auth
    autodiscover: bool = True
    key_bits: int = 1024
    delay: float = 0.0  # seconds before every answer
    # Outlook Anywhere failure shapes: every bind answered with bind_nak; the OUT channel closed
    # right after CONN/A3 (what a load balancer that cuts or buffers the response looks like).
    refuse_bind: bool = False
    close_out_early: bool = False
    # The IMAP4 service (bridge.lab.imap): off unless a port is given (0: a free one).
    imap_port: int | None = None
    imap_tls: str = "implicit"  # implicit (993-style) or starttls (143-style)
    # Mail services (bridge.lab.pop3, bridge.lab.smtp): None is off, 0 any free port. POP3 and SMTP with
    # TLS from the first byte (995 and 465 shapes), submission with STARTTLS (587); one mailbox, the users above.
    pop3_port: int | None = None
    smtp_port: int | None = None
    submission_port: int | None = None
    pop3_mechanisms: tuple[str, ...] = POP3_SASL
    smtp_mechanisms: tuple[str, ...] = SMTP_AUTH_AFTER_TLS
    large_message: bool = True  # the 25 MB message in the mailbox


@dataclass
class LabCounters:
    """What the lab saw. Mutated only on the lab's event loop; plain reads from other threads are fine."""

    connections: int = 0
    connections_open: int = 0
    requests_total: int = 0
    requests_by_path: dict[str, int] = field(default_factory=dict)
    recent_requests: deque = field(default_factory=lambda: deque(maxlen=RECENT_REQUESTS))
    auth_successes: dict[str, int] = field(default_factory=dict)
    auth_failures: dict[str, int] = field(default_factory=dict)
    rpc_in_bytes: int = 0  # RPC_IN_DATA channel bodies (not echo requests), counted as they arrive
    rpc_out_bytes: int = 0  # RPC_OUT_DATA channel payload (not echo answers), counted as it is written
    rpc_targets: dict[str, int] = field(default_factory=dict)  # "server:port" -> requests
    expect_continue_sent: int = 0
    # RPC over HTTP v2 virtual connections (CONN/A1 + CONN/B1 channels, bridge.lab.rpch).
    rpc_virtual_connections: int = 0  # paired (both channels arrived)
    rpc_virtual_connections_open: int = 0
    rpc_channels: dict[str, int] = field(default_factory=dict)  # "in" / "out" -> channels opened
    rpc_binds: dict[str, int] = field(default_factory=dict)  # accepted binds by interface (EMSMDB, NSPI, RFR)
    rpc_events: dict[str, int] = field(default_factory=dict)  # calls, bind_refusals, pings_received, flow_control_acks_*
    rpc_out_closed_early: int = 0
    # Body bytes of virtual connection channels: received (CONN/A1, CONN/B1 and every IN channel PDU)
    # and written on the OUT channels (CONN/A3, CONN/C2, answers).
    rpc_virtual_bytes_in: int = 0
    rpc_virtual_bytes_out: int = 0
    rpc_slow_writes: deque = field(default_factory=lambda: deque(maxlen=64))  # monotonic time of each slow-echo fragment written

    def count_auth(self, scheme: str, success: bool) -> None:
        tally = self.auth_successes if success else self.auth_failures
        tally[scheme] = tally.get(scheme, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "connections_open": self.connections_open,
            "requests_total": self.requests_total,
            "requests_by_path": dict(self.requests_by_path),
            "recent_requests": [dict(entry) for entry in self.recent_requests],
            "auth_successes": dict(self.auth_successes),
            "auth_failures": dict(self.auth_failures),
            "rpc_in_bytes": self.rpc_in_bytes,
            "rpc_out_bytes": self.rpc_out_bytes,
            "rpc_targets": dict(self.rpc_targets),
            "expect_continue_sent": self.expect_continue_sent,
            "rpc_virtual_connections": self.rpc_virtual_connections,
            "rpc_virtual_connections_open": self.rpc_virtual_connections_open,
            "rpc_channels": dict(self.rpc_channels),
            "rpc_binds": dict(self.rpc_binds),
            "rpc_calls": self.rpc_events.get("calls", 0),
            "rpc_events": dict(self.rpc_events),
            "rpc_out_closed_early": self.rpc_out_closed_early,
            "rpc_virtual_bytes_in": self.rpc_virtual_bytes_in,
            "rpc_virtual_bytes_out": self.rpc_virtual_bytes_out,
        }


# --------------------------------------------------------------------------- deterministic payload


@functools.lru_cache(maxsize=8)
def _payload_filler(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAYLOAD_BLOCK - PAYLOAD_INDEX_BYTES)


def lab_payload(size: int, seed: int = 0) -> Iterator[bytes]:
    """``size`` bytes in 64 KiB blocks: an 8-byte big-endian block index, then fixed seeded bytes."""
    filler = _payload_filler(seed)
    full_blocks, tail = divmod(size, PAYLOAD_BLOCK)
    for index in range(full_blocks):
        yield index.to_bytes(PAYLOAD_INDEX_BYTES, "big") + filler
    if tail:
        yield (full_blocks.to_bytes(PAYLOAD_INDEX_BYTES, "big") + filler)[:tail]


def payload_sha256(size: int, seed: int = 0) -> str:
    digest = hashlib.sha256()
    for chunk in lab_payload(size, seed):
        digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- accounts


@dataclass(frozen=True)
class Account:
    domain: str
    user: str
    password: str

    @property
    def logon_name(self) -> str:
        return f"{self.domain}\\{self.user}"

    @property
    def legacy_dn(self) -> str:
        return f"{ORGANISATION_DN}/cn=Recipients/cn={self.user}"


def parse_accounts(users: dict[str, str]) -> list[Account]:
    accounts = []
    for name, password in users.items():
        domain, _, user = name.rpartition("\\")
        if not user or ":" in user or "@" in user:
            raise StartupError(f"The lab user {name!r} is not of the form DOMAIN\\user; give users like LAB\\alice.")
        accounts.append(Account((domain or "LAB").upper(), user, password))
    if not accounts:
        raise StartupError("The lab needs at least one user; give one with --user 'LAB\\alice:Passw0rd!'.")
    return accounts


def upn_suffixes(account: Account, hostname: str) -> list[str]:
    """The UPN domains accepted for alice@...: lab.test, lab.local and the hostname's parent domain."""
    netbios = account.domain.lower()
    suffixes = [f"{netbios}.test", f"{netbios}.local"]
    parent = hostname.lower().partition(".")[2]
    if parent and parent not in suffixes:
        suffixes.append(parent)
    return suffixes


def logon_aliases(account: Account, hostname: str) -> list[str]:
    """Names a user may log on with, as IIS accepts them: alice, LAB\\alice, alice@lab.test."""
    return [account.user, account.logon_name] + [f"{account.user}@{suffix}" for suffix in upn_suffixes(account, hostname)]


def write_ntlm_user_file(path: Path, accounts: list[Account], hostname: str) -> None:
    """pyspnego's acceptor store: ``DOMAIN:user:password``, one line per name a client may send."""
    lines = []
    for account in accounts:
        if ":" in account.password:
            raise StartupError(f"The password of {account.logon_name} contains ':', which pyspnego's NTLM user file cannot hold; choose another password.")
        lines.append(f"{account.domain}:{account.user}:{account.password}")
        lines.append(f":{account.user}:{account.password}")
        lines += [f":{account.user}@{suffix}:{account.password}" for suffix in upn_suffixes(account, hostname)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- TLS and certificate


def default_state_dir() -> Path:
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg) / "exchange-bridge" / "lab"
    return Path(tempfile.gettempdir()) / f"exchange-bridge-lab-{os.getuid()}"


def lab_certificate(state_dir: Path, hostname: str, expired: bool, key_bits: int = 1024) -> tuple[Path, Path]:
    """Reuse the certificate in state_dir when it still fits, so a restarted lab keeps its fingerprint."""
    bits = "" if key_bits == 1024 else f"-rsa{key_bits}"
    directory = state_dir / "certs" / f"{hostname}-{'expired' if expired else 'current'}{bits}"
    cert_path, key_path = directory / "legacy-cert.pem", directory / "legacy-key.pem"
    if not _certificate_fits(cert_path, key_path, hostname, expired):
        try:
            cert_path, key_path = legacy_self_signed(directory, [hostname, "127.0.0.1"], expired=expired, key_bits=key_bits)
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
    return cert_path, key_path


def _certificate_fits(cert_path: Path, key_path: Path, hostname: str, expired: bool) -> bool:
    if not (cert_path.exists() and key_path.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return False
    now = dt.datetime.now(dt.UTC)
    is_expired = cert.not_valid_after_utc < now
    has_name = cert.subject.rfc4514_string() == f"CN={hostname}"
    return has_name and is_expired == expired and (expired or cert.not_valid_after_utc - now > dt.timedelta(days=2))


NO_ENCRYPT_THEN_MAC = 1 << 19  # SSL_OP_NO_ENCRYPT_THEN_MAC (OpenSSL 1.1.1 and 3.x)


def lab_tls_context(cert_path: Path, key_path: Path, tls_max: str) -> ssl.SSLContext:
    max_version, ciphers, _ = TLS_SHAPES[tls_max]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 is the point of the lab
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = max_version
    # The security level must drop before loading the 1024-bit SHA-1 certificate.
    context.set_ciphers(ciphers)
    # Schannel of that era: server cipher order, no session tickets, no encrypt-then-MAC (RFC 7366,
    # which OpenSSL would otherwise negotiate; Python 3.11 has no name for SSL_OP_NO_ENCRYPT_THEN_MAC).
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET | getattr(ssl, "OP_NO_ENCRYPT_THEN_MAC", NO_ENCRYPT_THEN_MAC)
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


def certificate_fingerprint(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return fingerprint(cert.public_bytes(Encoding.DER))


# --------------------------------------------------------------------------- authentication


@dataclass
class AuthOutcome:
    user: str | None  # None: not authenticated
    challenges: list[str] = field(default_factory=list)  # WWW-Authenticate values to send


class Authenticator:
    """IIS-like authentication: NTLM/Negotiate bound to the TCP connection, Basic per request."""

    CONTEXT_KEY = "lab_ntlm_context"
    USER_KEY = "lab_ntlm_user"

    def __init__(self, options: LabOptions, accounts: list[Account], ntlm_user_file: Path | None, counters: LabCounters) -> None:
        self.hostname = options.hostname
        self.basic_enabled = options.auth in ("basic", "both")
        self.ntlm_enabled = options.auth in ("ntlm", "both")
        self.ntlm_user_file = ntlm_user_file
        self.counters = counters
        self.accounts_by_alias = {alias.lower(): account for account in accounts for alias in logon_aliases(account, options.hostname)}

    def offered_challenges(self) -> list[str]:
        """WWW-Authenticate values in IIS order, each sent as its own header."""
        offered = ["Negotiate", "NTLM"] if self.ntlm_enabled else []
        if self.basic_enabled:
            offered.append(f'Basic realm="{self.hostname}"')
        return offered

    def authenticate(self, request: BaseRequest) -> AuthOutcome:
        header = request.headers.get("Authorization")
        state = connection_state(request).data
        if header is None:
            # A connection NTLM authenticated counts only where this directory takes NTLM.
            user = state.get(self.USER_KEY) if self.ntlm_enabled else None
            return AuthOutcome(user, [] if user else self.offered_challenges())
        scheme, _, token = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and self.basic_enabled:
            return self._basic(token.strip())
        if scheme in ("ntlm", "negotiate") and self.ntlm_enabled:
            return self._connection_handshake(state, scheme, token.strip())
        return self._failed(scheme)

    def _failed(self, scheme: str) -> AuthOutcome:
        self.counters.count_auth(scheme, success=False)
        return AuthOutcome(None, self.offered_challenges())

    def _basic(self, token: str) -> AuthOutcome:
        try:
            decoded = base64.b64decode(token, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return self._failed("basic")
        name, _, password = decoded.partition(":")
        account = self.accounts_by_alias.get(name.lower())
        if account is None or account.password != password:
            return self._failed("basic")
        self.counters.count_auth("basic", success=True)
        return AuthOutcome(account.logon_name)

    def _connection_handshake(self, state: dict[str, Any], scheme: str, token_text: str) -> AuthOutcome:
        try:
            token = base64.b64decode(token_text, validate=True)
        except binascii.Error:
            return self._failed(scheme)
        if starts_new_handshake(token):
            state.pop(self.USER_KEY, None)
            state[self.CONTEXT_KEY] = self._new_acceptor(raw_ntlm=token.startswith(NTLM_SIGNATURE))
        context = state.get(self.CONTEXT_KEY)
        if context is None:  # e.g. a type 3 message on another connection than its type 1
            return self._failed(scheme)
        try:
            reply = self._step(context, token)
        except Exception:  # noqa: BLE001 - pyspnego raises assorted errors on bad tokens: all are a failed logon
            state.pop(self.CONTEXT_KEY, None)
            return self._failed(scheme)
        header_scheme = "Negotiate" if scheme == "negotiate" else "NTLM"
        reply_header = [f"{header_scheme} {base64.b64encode(reply).decode()}"] if reply else []
        if not context.complete:
            return AuthOutcome(None, reply_header)
        state.pop(self.CONTEXT_KEY, None)
        state[self.USER_KEY] = context.client_principal or "unknown"
        self.counters.count_auth(scheme, success=True)
        return AuthOutcome(state[self.USER_KEY], reply_header)

    def _new_acceptor(self, raw_ntlm: bool) -> spnego.ContextProxy:
        self._select_user_file()
        # Raw NTLM tokens also arrive under "Negotiate" (clients fall back when only NTLM is usable).
        return spnego.server(protocol="ntlm" if raw_ntlm else "negotiate")

    def _step(self, context: spnego.ContextProxy, token: bytes) -> bytes | None:
        self._select_user_file()
        return context.step(token)

    def _select_user_file(self) -> None:
        # pyspnego reads the store named by the environment at each step: point it at this lab's file,
        # so several labs with different users can share one process.
        os.environ["NTLM_USER_FILE"] = str(self.ntlm_user_file)


# --------------------------------------------------------------------------- response bodies

UNAUTHORIZED_HTML = (
    "<!DOCTYPE html><html><head><title>401 - Unauthorized: Access is denied due to invalid credentials.</title></head>"
    "<body><h2>401 - Unauthorized: Access is denied due to invalid credentials.</h2>"
    "<h3>You do not have permission to view this directory or page using the credentials that you supplied.</h3></body></html>"
)
NOT_FOUND_HTML = "<!DOCTYPE html><html><head><title>404 - File or directory not found.</title></head><body><h2>404 - File or directory not found.</h2></body></html>"

LOGON_PAGE_HTML = """<!DOCTYPE html>
<html><head><title>Microsoft Exchange - Outlook Web Access</title></head>
<body>
<form action="/owa/auth/owaauth.dll" method="POST" name="logonForm" autocomplete="off">
<input type="hidden" name="destination" value="https://{hostname}/owa/">
<input type="hidden" name="flags" value="0">
<input type="hidden" name="forcedownlevel" value="0">
<label for="username">Domain\\user name:</label><input id="username" name="username" type="text">
<label for="password">Password:</label><input id="password" name="password" type="password">
<input type="hidden" name="isUtf8" value="1">
<input type="submit" class="btn" value="Log On">
</form>
</body></html>
"""

EWS_GET_HTML = "<html><head><title>Exchange Web Services</title></head><body>Exchange Web Services (Exchange 2007 SP3)</body></html>"

SOAP_ENVELOPE = """<?xml version="1.0" encoding="utf-8"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">
  <soap:Header>
    <t:ServerVersionInfo MajorVersion="8" MinorVersion="3" MajorBuildNumber="83" MinorBuildNumber="6" Version="Exchange2007_SP1" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"/>
  </soap:Header>
  <soap:Body>
    <m:{operation}Response xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages">
      <m:ResponseMessages>
        <m:{operation}ResponseMessage ResponseClass="Success">
          <m:ResponseCode>NoError</m:ResponseCode>
        </m:{operation}ResponseMessage>
      </m:ResponseMessages>
    </m:{operation}Response>
  </soap:Body>
</soap:Envelope>
"""

AUTODISCOVER_ERROR = """<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">
  <Response>
    <Error Time="00:00:00.0000000" Id="2477272013">
      <ErrorCode>{code}</ErrorCode>
      <Message>{message}</Message>
      <DebugData />
    </Error>
  </Response>
</Autodiscover>
"""

AUTODISCOVER_ACCOUNT = """<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">
  <Response xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a">
    <User>
      <DisplayName>{display_name}</DisplayName>
      <LegacyDN>{legacy_dn}</LegacyDN>
      <DeploymentId>6f3c5d4e-2b1a-4c9d-8e7f-0a1b2c3d4e5f</DeploymentId>
    </User>
    <Account>
      <AccountType>email</AccountType>
      <Action>settings</Action>
      <Protocol>
        <Type>EXCH</Type>
        <Server>{internal_server}</Server>
        <ServerDN>{server_dn}</ServerDN>
        <ServerVersion>{server_version}</ServerVersion>
        <MdbDN>{server_dn}/cn=Microsoft Private MDB</MdbDN>
        <AD>{internal_server}</AD>
        <ASUrl>https://{internal_server}/EWS/Exchange.asmx</ASUrl>
        <EwsUrl>https://{internal_server}/EWS/Exchange.asmx</EwsUrl>
        <OOFUrl>https://{internal_server}/EWS/Exchange.asmx</OOFUrl>
        <OABUrl>https://{internal_server}/OAB/</OABUrl>
        <AuthPackage>{auth_package}</AuthPackage>
      </Protocol>
      <Protocol>
        <Type>EXPR</Type>
        <Server>{external_host}</Server>
        <SSL>On</SSL>
        <AuthPackage>{auth_package}</AuthPackage>
        <ASUrl>https://{external_host}/EWS/Exchange.asmx</ASUrl>
        <EwsUrl>https://{external_host}/EWS/Exchange.asmx</EwsUrl>
        <OOFUrl>https://{external_host}/EWS/Exchange.asmx</OOFUrl>
        <OABUrl>https://{external_host}/OAB/</OABUrl>
      </Protocol>
      <Protocol>
        <Type>WEB</Type>
        <External>
          <OWAUrl AuthenticationMethod="Fba">https://{external_host}/owa/</OWAUrl>
        </External>
      </Protocol>
    </Account>
  </Response>
</Autodiscover>
"""


def server_version_hex(major: int, minor: int, build: int) -> str:
    """Autodiscover's ServerVersion: 0111, 6-bit major, 6-bit minor, a set bit, 15-bit build."""
    return f"{(0b0111 << 28) | (major << 22) | (minor << 16) | (1 << 15) | build:08X}"


def server_dn(internal_server: str) -> str:
    return f"{ORGANISATION_DN}/cn=Configuration/cn=Servers/cn={internal_server.partition('.')[0].upper()}"


def host_without_port(host: str) -> str:
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def rts_echo_response() -> bytes:
    """The 20-byte RTS packet answering an echo: common header, RTS_FLAG_ECHO, no commands."""
    return struct.pack("<BBBB4sHHIHH", 5, 0, 20, 0x03, b"\x10\x00\x00\x00", 20, 0, 0, 0x0008, 0)


# --------------------------------------------------------------------------- the simulator


def iis_response(status: int, body: str | bytes = b"", content_type: str = "text/html", **headers: str) -> web.Response:
    response = web.Response(status=status, body=body.encode() if isinstance(body, str) else body)
    if body:
        response.headers["Content-Type"] = content_type
    response.headers["Server"] = SERVER_HEADER
    response.headers["X-Powered-By"] = "ASP.NET"
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def add_final_challenges(request: BaseRequest, response: web.StreamResponse) -> None:
    """A final Negotiate token (SPNEGO accept-complete) rides on the successful answer."""
    for challenge in request.get(FINAL_CHALLENGES, []):
        response.headers.add("WWW-Authenticate", challenge)


def expects_continue(request: BaseRequest) -> bool:
    return request.headers.get("Expect", "").lower() == "100-continue"


def has_unread_body(request: BaseRequest) -> bool:
    return request.body_exists and not request.content.is_eof()


class ExchangeSimulator:
    def __init__(self, options: LabOptions, accounts: list[Account], ntlm_user_file: Path | None, counters: LabCounters) -> None:
        self.options = options
        self.accounts = accounts
        self.counters = counters
        self.auth = Authenticator(options, accounts, ntlm_user_file, counters)
        # /rpc/rpcproxy.dll has its own authentication setting (Set-OutlookAnywhere -ClientAuthenticationMethod).
        rpc_auth = options.rpc_auth or options.auth
        self.rpc_auth = self.auth if rpc_auth == options.auth else Authenticator(replace(options, auth=rpc_auth), accounts, ntlm_user_file, counters)
        self.routes = {
            "/owa": (self.owa_redirect, False),
            "/owa/": (self.owa_redirect, False),
            "/owa/auth/logon.aspx": (self.owa_logon_page, False),
            "/ews/exchange.asmx": (self.ews, True),
            "/autodiscover/autodiscover.xml": (self.autodiscover, True),
            "/lab/counters": (self.counters_json, False),
        }
        if options.rpc:
            self.routes["/rpc/rpcproxy.dll"] = (self.rpc_proxy, True)
        if not options.autodiscover:  # not published: IIS answers 404 like any other missing path
            del self.routes["/autodiscover/autodiscover.xml"]
        self.virtual_connections = rpch.VirtualConnectionTable(counters.rpc_events, counters.rpc_binds)

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        entry = self._record_request(request)
        try:
            response = await self._dispatch(request)
            entry["status"] = response.status
            return response
        except BaseException:  # client gone mid-request (cancelled) or the write failed
            entry["status"] = entry["status"] or "aborted"
            raise

    def _record_request(self, request: BaseRequest) -> dict[str, Any]:
        counters = self.counters
        counters.requests_total += 1
        path = request.path.lower()
        counters.requests_by_path[path] = counters.requests_by_path.get(path, 0) + 1
        entry = {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "status": None,
            "header_names": [name.decode("latin-1") for name, _ in request.raw_headers],
        }
        counters.recent_requests.append(entry)
        return entry

    async def _dispatch(self, request: BaseRequest) -> web.StreamResponse:
        route = self.routes.get(request.path.lower())
        if route is None:
            if self.options.delay:
                await asyncio.sleep(self.options.delay)
            return await self.final_without_body(request, iis_response(404, NOT_FOUND_HTML))
        handler, protected = route
        if self.options.delay:  # a slow server: every answer takes this long
            await asyncio.sleep(self.options.delay)
        if protected:
            authenticator = self.rpc_auth if handler == self.rpc_proxy else self.auth
            outcome = authenticator.authenticate(request)
            if outcome.user is None:
                return await self.unauthorized(request, outcome)
            request[FINAL_CHALLENGES] = outcome.challenges
            response = await handler(request)
            if not response.prepared:
                add_final_challenges(request, response)
            return response
        return await handler(request)

    async def unauthorized(self, request: BaseRequest, outcome: AuthOutcome) -> web.StreamResponse:
        response = iis_response(401, UNAUTHORIZED_HTML)
        for challenge in outcome.challenges:
            response.headers.add("WWW-Authenticate", challenge)
        return await self.final_without_body(request, response)

    async def final_without_body(self, request: BaseRequest, response: web.StreamResponse) -> web.StreamResponse:
        """Answer without the body: drain a small one so the connection (and its NTLM state) survives.

        A client still waiting for ``100 Continue`` may never send its body, and a large one is not
        worth reading, so those connections close after the answer rather than desynchronise.
        """
        if not has_unread_body(request):
            return response
        too_large = (request.content_length or 0) > DRAIN_LIMIT
        if (expects_continue(request) and not request.get(CONTINUE_SENT)) or too_large:
            response.force_close()
            return response
        if await self.read_body(request, limit=DRAIN_LIMIT) is None:
            response.force_close()
        return response

    async def send_continue(self, request: BaseRequest) -> None:
        """IIS sends 100 Continue once the request may proceed; the low-level server never does."""
        if expects_continue(request) and not request.get(CONTINUE_SENT) and has_unread_body(request):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request[CONTINUE_SENT] = True
            self.counters.expect_continue_sent += 1

    async def read_body(self, request: BaseRequest, limit: int = SMALL_BODY_LIMIT) -> bytes | None:
        """The whole body, or None when it exceeds limit (the rest is then left unread)."""
        await self.send_continue(request)
        chunks, size = [], 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    # ----------------------------------------------------------------------- OWA, EWS, Autodiscover

    async def owa_redirect(self, request: BaseRequest) -> web.StreamResponse:
        hostname = self.options.hostname
        location = f"https://{hostname}/owa/auth/logon.aspx?url=https://{hostname}/owa/&reason=0"
        return await self.final_without_body(request, iis_response(302, b"", Location=location))

    async def owa_logon_page(self, request: BaseRequest) -> web.StreamResponse:
        page = LOGON_PAGE_HTML.format(hostname=self.options.hostname)
        return await self.final_without_body(request, iis_response(200, page, "text/html; charset=utf-8"))

    async def ews(self, request: BaseRequest) -> web.StreamResponse:
        if request.method == "GET":
            return iis_response(200, EWS_GET_HTML, "text/html; charset=utf-8")
        if request.method != "POST":
            return await self.final_without_body(request, iis_response(405, b"", Allow="GET, POST"))
        body = await self.read_body(request)
        if body is None:
            return await self.final_without_body(request, iis_response(413, b""))
        match = re.search(rb"<(?:\w+:)?Body[^>]*>\s*<(?:\w+:)?(\w+)", body)
        operation = match.group(1).decode() if match else "Unknown"
        return iis_response(200, SOAP_ENVELOPE.format(operation=operation), "text/xml; charset=utf-8")

    async def autodiscover(self, request: BaseRequest) -> web.StreamResponse:
        if request.method != "POST":
            return await self.final_without_body(request, self._autodiscover_error(600, "Invalid Request"))
        body = await self.read_body(request)
        match = re.search(rb"<EMailAddress>\s*([^<\s]+)\s*</EMailAddress>", body or b"", re.IGNORECASE)
        if match is None:
            return await self.final_without_body(request, self._autodiscover_error(600, "Invalid Request"))
        account = self._account_for_email(match.group(1).decode("utf-8", "replace"))
        if account is None:
            return self._autodiscover_error(500, "The e-mail address cannot be found.")
        return iis_response(200, self._autodiscover_account(request, account), "text/xml; charset=utf-8")

    def _account_for_email(self, email: str) -> Account | None:
        local = email.partition("@")[0].lower()
        return next((account for account in self.accounts if account.user.lower() == local), None)

    def _autodiscover_error(self, code: int, message: str) -> web.Response:
        return iis_response(200, AUTODISCOVER_ERROR.format(code=code, message=message), "text/xml; charset=utf-8")

    def _autodiscover_account(self, request: BaseRequest, account: Account) -> str:
        internal = self.options.internal_server
        return AUTODISCOVER_ACCOUNT.format(
            display_name=account.user,
            legacy_dn=account.legacy_dn,
            internal_server=internal,
            server_dn=server_dn(internal),
            server_version=server_version_hex(*EXCHANGE_2007_SP3),
            external_host=host_without_port(request.host or self.options.hostname),
            auth_package="Basic" if (self.options.rpc_auth or self.options.auth) == "basic" else "Ntlm",
        )

    async def counters_json(self, request: BaseRequest) -> web.StreamResponse:
        body = json.dumps(self.counters.snapshot(), indent=1)
        return await self.final_without_body(request, iis_response(200, body, "application/json"))

    # ----------------------------------------------------------------------- Outlook Anywhere

    async def rpc_proxy(self, request: BaseRequest) -> web.StreamResponse:
        if request.method not in ("RPC_IN_DATA", "RPC_OUT_DATA"):
            return await self.final_without_body(request, iis_response(405, b"", Allow="RPC_IN_DATA, RPC_OUT_DATA"))
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            # RPC over HTTP frames with Content-Length only; a proxy that re-chunks breaks real servers.
            return await self.final_without_body(request, iis_response(400, "RPC over HTTP requires Content-Length framing"))
        target = request.query_string
        self.counters.rpc_targets[target] = self.counters.rpc_targets.get(target, 0) + 1
        declared = request.content_length or 0
        if declared <= ECHO_MAX_BODY:
            return await self.rpc_echo(request)
        out_size = _out_size(request.headers.get("X-Lab-Out-Size"))
        if request.method == "RPC_OUT_DATA" and out_size is None:
            return await self.final_without_body(request, iis_response(400, f"X-Lab-Out-Size must be a byte count up to {MAX_OUT_SIZE}"))
        # A body that starts with CONN/A1 (OUT) or CONN/B1 (IN) opens a channel of a virtual
        # connection; anything else keeps the lab's streaming sink and source.
        await self.send_continue(request)
        prefix, opening = await read_opening(request, declared)
        if (request.method, opening) in (("RPC_OUT_DATA", "CONN/A1"), ("RPC_IN_DATA", "CONN/B1")):
            port = rpch.target_port(target)
            if port not in rpch.VALID_PORTS:
                # The RPC proxy answers so for a server:port missing from its ValidPorts.
                response = iis_response(503, "RPC Error", "text/plain")
                response.set_status(503, "RPC Error")
                response.force_close()
                return response
            if request.method == "RPC_OUT_DATA":
                return await self.rpc_out_virtual(request, target, prefix)
            return await self.rpc_in_virtual(request, target, prefix)
        if request.method == "RPC_IN_DATA":
            return await self.rpc_in_channel(request, declared, prefix)
        return await self.rpc_out_channel(request, out_size or 0, prefix)

    async def rpc_echo(self, request: BaseRequest) -> web.StreamResponse:
        await self.read_body(request)
        return iis_response(200, rts_echo_response(), "application/rpc")

    async def rpc_in_channel(self, request: BaseRequest, declared: int, prefix: bytes = b"") -> web.StreamResponse:
        await self.send_continue(request)
        digest, received = hashlib.sha256(prefix), len(prefix)
        self.counters.rpc_in_bytes += len(prefix)
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            received += len(chunk)
            self.counters.rpc_in_bytes += len(chunk)
        if received != declared:  # the client went away mid-body
            return iis_response(400, b"")
        return iis_response(200, b"", X_Lab_Received_Bytes=str(received), X_Lab_Received_SHA256=digest.hexdigest())

    async def rpc_out_channel(self, request: BaseRequest, size: int, prefix: bytes = b"") -> web.StreamResponse:
        if await self.read_body(request, limit=SMALL_BODY_LIMIT - len(prefix)) is None:
            return await self.final_without_body(request, iis_response(413, b""))
        response = web.StreamResponse(status=200, headers={"Server": SERVER_HEADER, "Content-Type": "application/rpc"})
        response.content_length = size
        add_final_challenges(request, response)
        await response.prepare(request)
        for chunk in lab_payload(size):
            await response.write(chunk)  # waits for the transport to drain: back-pressure
            self.counters.rpc_out_bytes += len(chunk)
        await response.write_eof()
        return response

    # ----------------------------------------------------------------------- RPC over HTTP v2 channels

    async def rpc_out_virtual(self, request: BaseRequest, target: str, opening: bytes) -> web.StreamResponse:
        """The OUT channel: 200 with a 1 GiB Content-Length, CONN/A3 at once, CONN/C2 once the IN
        channel is there, then whatever the virtual connection answers, as it comes."""
        a1 = rts.parse_conn_a1(opening)
        self.counters.rpc_virtual_bytes_in += len(opening) + len(await self.read_body(request) or b"")  # CONN/A1 is the whole body; anything after it is ignored
        try:
            vc, paired = self.virtual_connections.attach(target, a1.virtual_connection_cookie, "out", request.transport, refuse_bind=self.options.refuse_bind)
        except ValueError as exc:
            return iis_response(400, str(exc))
        vc.out_window = a1.receive_window_size
        vc.out_channel_cookie = a1.out_channel_cookie
        self._count_channel("out", paired)
        response = web.StreamResponse(status=200, headers={"Server": SERVER_HEADER, "Content-Type": "application/rpc", "Cache-Control": "private"})
        response.content_length = rpch.OUT_CHANNEL_CONTENT_LENGTH
        add_final_challenges(request, response)
        try:
            await response.prepare(request)
            await response.write(rts.conn_a3())
            self.counters.rpc_virtual_bytes_out += len(rts.conn_a3())
            if self.options.close_out_early:
                self.counters.rpc_out_closed_early += 1
                return response  # the finally clause closes both channels' connections
            await asyncio.wait_for(vc.paired.wait(), rpch.PAIRING_TIMEOUT)
            await response.write(rts.conn_c2())
            self.counters.rpc_virtual_bytes_out += len(rts.conn_c2())
            while (item := await vc.out_queue.get()) is not None:
                if item.pause:
                    await asyncio.sleep(item.pause)
                if item.flow_controlled:
                    await vc.wait_for_window(len(item.pdu))
                    vc.out_sent += len(item.pdu)
                await response.write(item.pdu)
                self.counters.rpc_virtual_bytes_out += len(item.pdu)
                if item.slow:
                    self.counters.rpc_slow_writes.append(time.monotonic())
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._end_virtual_connection(vc)
        return response  # the connection is closed: the 1 GiB body never completes, as with IIS

    async def rpc_in_virtual(self, request: BaseRequest, target: str, opening: bytes) -> web.StreamResponse:
        """The IN channel: each PDU is answered on the OUT channel as soon as it is whole."""
        b1 = rts.parse_conn_b1(opening)
        try:
            vc, paired = self.virtual_connections.attach(target, b1.virtual_connection_cookie, "in", request.transport, refuse_bind=self.options.refuse_bind)
        except ValueError as exc:
            return await self.final_without_body(request, iis_response(400, str(exc)))
        vc.in_channel_cookie = b1.in_channel_cookie
        self._count_channel("in", paired)
        reader = rts.PduReader()
        self.counters.rpc_virtual_bytes_in += len(opening)
        try:
            async for chunk in request.content.iter_any():
                self.counters.rpc_virtual_bytes_in += len(chunk)
                for pdu in reader.feed(chunk):
                    for item in vc.on_in_pdu(pdu):
                        vc.out_queue.put_nowait(item)
        except (rts.RpcProtocolError, ConnectionError):
            pass
        finally:
            self._end_virtual_connection(vc)
        return iis_response(200, b"")  # only if the client really sent its whole declared body

    def _count_channel(self, side: str, paired: bool) -> None:
        counters = self.counters
        counters.rpc_channels[side] = counters.rpc_channels.get(side, 0) + 1
        if paired:
            counters.rpc_virtual_connections += 1
            counters.rpc_virtual_connections_open += 1

    def _end_virtual_connection(self, vc: rpch.VirtualConnection) -> None:
        if vc.paired.is_set() and not vc.ended:
            self.counters.rpc_virtual_connections_open -= 1
        self.virtual_connections.detach(vc)


async def read_opening(request: BaseRequest, declared: int) -> tuple[bytes, str | None]:
    """The body's first bytes and, when they are a CONN/A1 or CONN/B1 PDU, its name. Reads the 20-byte
    RTS header, then the rest of the PDU only when the header says it is an RTS PDU of opening size."""
    content = request.content
    try:
        prefix = await content.readexactly(min(declared, rts.RTS_HEADER_SIZE))
    except asyncio.IncompleteReadError as exc:  # the client went away mid-body
        return exc.partial, None
    length = rpch.opening_length(prefix)
    if length is None or length > declared:
        return prefix, None
    try:
        prefix += await content.readexactly(length - len(prefix))
    except asyncio.IncompleteReadError as exc:
        return prefix + exc.partial, None
    return prefix, rpch.opening_of(prefix)


def _out_size(text: str | None) -> int | None:
    if text is None:
        return DEFAULT_OUT_SIZE
    try:
        size = int(text)
    except ValueError:
        return None
    return size if 0 <= size <= MAX_OUT_SIZE else None


# --------------------------------------------------------------------------- lifecycle


@dataclass
class Lab:
    options: LabOptions = field(repr=False)
    runner: web.ServerRunner = field(repr=False)
    port: int
    cert_path: Path
    key_path: Path
    fingerprint: str
    counters: LabCounters = field(repr=False)
    mail_counters: MailCounters = field(default_factory=MailCounters, repr=False)
    mail_servers: dict[str, asyncio.Server] = field(default_factory=dict, repr=False)  # pop3, smtp, submission
    mail_services: dict[str, Pop3Service | SmtpService] = field(default_factory=dict, repr=False)
    _closed: bool = field(default=False, repr=False)
    imap: Any = field(default=None, repr=False)  # bridge.lab.imap.ImapLab when options.imap_port is set
    imap_port: int = 0

    def mail_port(self, service: str) -> int:
        return self.mail_servers[service].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = self.options.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"https://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def close(self) -> None:
        """Stop listening at once and drop open connections, like a server going down."""
        if self._closed:
            return
        self._closed = True
        if self.imap is not None:
            await self.imap.close()
        for server in self.mail_servers.values():
            server.close()
        for service in self.mail_services.values():
            service.close_connections()
        await self.runner.cleanup()


def validate_options(options: LabOptions) -> None:
    if options.tls_max not in TLS_SHAPES:
        raise StartupError(f"Unknown TLS shape {options.tls_max!r}; use 1.0 (TLS 1.0 only) or 1.2.")
    if options.auth not in AUTH_MODES:
        raise StartupError(f"Unknown authentication mode {options.auth!r}; use basic, ntlm or both.")
    if options.rpc_auth is not None and options.rpc_auth not in AUTH_MODES:
        raise StartupError(f"Unknown authentication mode {options.rpc_auth!r} for /rpc; use basic, ntlm or both.")
    if options.rpc_auth not in (None, "both") and options.auth not in (options.rpc_auth, "both"):
        raise StartupError(f"--rpc-auth {options.rpc_auth} needs --auth {options.rpc_auth} or both: the lab's users can only log on with a scheme it has.")
    if options.key_bits not in (512, 768, 1024, 2048):
        raise StartupError(f"--key-bits {options.key_bits} is not offered; use 512, 768, 1024 or 2048.")
    if not 0 <= options.delay <= 600:
        raise StartupError(f"--delay {options.delay:g} is out of range; give 0 to 600 seconds.")
    if not 0 <= options.port <= 65535:
        raise StartupError(f"Port {options.port} is not a TCP port; give one between 1 and 65535.")
    for flag, port in (("--pop3-port", options.pop3_port), ("--smtp-port", options.smtp_port), ("--submission-port", options.submission_port)):
        if port is not None and not 0 <= port <= 65535:
            raise StartupError(f"{flag} {port} is not a TCP port; give one between 1 and 65535 (0: any free port).")


async def start_lab(options: LabOptions) -> Lab:
    validate_options(options)
    accounts = parse_accounts(options.users)
    state_dir = options.state_dir or default_state_dir()
    ntlm_user_file = None
    if options.auth in ("ntlm", "both") or _mail_ports(options):
        ntlm_user_file = state_dir / f"ntlm-users-{_users_digest(options)}.txt"
        write_ntlm_user_file(ntlm_user_file, accounts, options.hostname)
        os.environ["NTLM_USER_FILE"] = str(ntlm_user_file)
    cert_path, key_path = lab_certificate(state_dir, options.hostname, options.expired_cert, options.key_bits)
    counters = LabCounters()
    simulator = ExchangeSimulator(options, accounts, ntlm_user_file, counters)
    context = lab_tls_context(cert_path, key_path, options.tls_max)
    runner = await _listen(simulator.handle, options, context)
    _count_connections(runner, counters)
    lab = Lab(options, runner, bound_port(runner), cert_path, key_path, certificate_fingerprint(cert_path), counters)
    if options.imap_port is not None:
        from bridge.lab.imap import start_imap

        aliases = {alias.lower(): (account.logon_name, account.password) for account in accounts for alias in logon_aliases(account, options.hostname)}
        try:
            lab.imap, lab.imap_port = await start_imap(options, aliases, ntlm_user_file, context)
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(_bind_failure(replace(options, port=options.imap_port), exc).replace("--port", "--imap-port")) from None
    try:
        await _start_mail(lab, accounts, ntlm_user_file, context)
    except BaseException:
        await lab.close()
        raise
    return lab


def _mail_ports(options: LabOptions) -> dict[str, int]:
    ports = {"pop3": options.pop3_port, "smtp": options.smtp_port, "submission": options.submission_port}
    return {service: port for service, port in ports.items() if port is not None}


async def _start_mail(lab: Lab, accounts: list[Account], ntlm_user_file: Path | None, context: ssl.SSLContext) -> None:
    """The POP3 and SMTP services (bridge.lab.pop3, bridge.lab.smtp) on the ports the options name."""
    options = lab.options
    logons = MailLogons({alias.lower(): (account.logon_name, account.password) for account in accounts for alias in logon_aliases(account, options.hostname)}, ntlm_user_file)
    for service, port in _mail_ports(options).items():
        try:
            if service == "pop3":
                pop3 = lab.mail_services[service] = Pop3Service(logons, lab.mail_counters, options.pop3_mechanisms, options.large_message)
                server = await start_pop3(pop3, options.host, port, context)
            else:
                smtp = lab.mail_services[service] = SmtpService(options.hostname, logons, lab.mail_counters, context, starttls=service == "submission", mechanisms=options.smtp_mechanisms)
                server = await start_smtp(smtp, options.host, port)
        except OSError as exc:
            raise StartupError(_bind_failure(replace(options, port=port), exc).replace("--port", f"--{service}-port")) from None
        lab.mail_servers[service] = server


def _users_digest(options: LabOptions) -> str:
    material = json.dumps([options.hostname, sorted(options.users.items())]).encode()
    return hashlib.sha256(material).hexdigest()[:12]


async def _listen(handler: Any, options: LabOptions, context: ssl.SSLContext) -> web.ServerRunner:
    try:
        # IIS closes idle connections after 120 s.
        runner = await start_site(handler, options.host, options.port, ssl_context=context, keepalive_timeout=120.0)
    except OSError as exc:
        raise StartupError(_bind_failure(options, exc)) from None
    # Closing is a simulated outage: don't wait a minute for streaming handlers to finish.
    runner._shutdown_timeout = 0.5
    return runner


def _bind_failure(options: LabOptions, exc: OSError) -> str:
    where = f"{options.host}:{options.port}"
    if exc.errno == errno.EADDRINUSE:
        return f"Port {options.port} on {options.host} is already in use; stop what listens there or choose another port with --port."
    if exc.errno == errno.EACCES:
        return f"Not allowed to listen on {where}; use a port above 1023 or run with the needed privilege."
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"The address {options.host} is not on this machine; give a local address with --host (e.g. 127.0.0.1)."
    return f"Cannot listen on {where} ({exc.strerror or exc}); check --host and --port."


def _count_connections(runner: web.ServerRunner, counters: LabCounters) -> None:
    """Count connections as the server accepts them (after the TLS handshake)."""
    server = runner.server
    assert server is not None, "count connections after runner.setup()"
    accept = server.connection_made

    def connection_made(handler: Any, transport: Any) -> None:
        counters.connections += 1
        counters.connections_open += 1
        handler.state.on_close(_decrement_open(counters))
        accept(handler, transport)

    server.connection_made = connection_made  # type: ignore[method-assign]  # a per-runner hook on the one server object


def _decrement_open(counters: LabCounters) -> Any:
    def decrement() -> None:
        counters.connections_open -= 1

    return decrement


# --------------------------------------------------------------------------- command line


def _user_argument(text: str) -> tuple[str, str]:
    name, separator, password = text.partition(":")
    if not separator or not name or not password:
        raise argparse.ArgumentTypeError(f"{text!r} is not DOMAIN\\user:password (e.g. 'LAB\\alice:Passw0rd!')")
    return (name if "\\" in name else f"LAB\\{name}"), password


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_CLI_PORT, help=f"port to listen on (default {DEFAULT_CLI_PORT})")
    parser.add_argument("--hostname", default=DEFAULT_HOSTNAME, help=f"the server's public name, in its certificate and redirects (default {DEFAULT_HOSTNAME})")
    parser.add_argument("--state-dir", type=Path, default=None, help="where the certificate and NTLM user file live (default $XDG_STATE_HOME/exchange-bridge/lab or a temp dir)")
    parser.add_argument("--tls-max", choices=sorted(TLS_SHAPES), default="1.0", help="1.0: TLS 1.0 only like Windows 2003/2008 (default); 1.2: a TLS-1.2-capable 2008 R2")
    parser.add_argument("--expired-cert", action="store_true", help="serve an expired certificate")
    parser.add_argument("--auth", choices=AUTH_MODES, default="both", help="authentication offered (default both)")
    parser.add_argument("--no-rpc", dest="rpc", action="store_false", help="no Outlook Anywhere: /rpc/rpcproxy.dll answers 404")
    parser.add_argument("--rpc-auth", choices=AUTH_MODES, default=None, help="authentication /rpc/rpcproxy.dll offers (default: as --auth; basic is Outlook Anywhere's usual 2007 setting)")
    parser.add_argument("--no-autodiscover", dest="autodiscover", action="store_false", help="Autodiscover not published: /Autodiscover/Autodiscover.xml answers 404")
    parser.add_argument("--key-bits", type=int, default=1024, choices=(512, 768, 1024, 2048), help="RSA key size of the lab's certificate (default 1024, as Exchange 2007 made them)")
    parser.add_argument("--delay", type=float, default=0.0, metavar="S", help="seconds before every answer: a slow server (default 0)")
    parser.add_argument("--refuse-bind", action="store_true", help="Outlook Anywhere: answer every RPC bind with bind_nak (the Exchange interface is not reachable)")
    parser.add_argument("--pop3-port", type=int, default=None, metavar="N", help="also serve POP3 with TLS from the first byte (Exchange's 995) on this port (0: any free port)")
    parser.add_argument("--smtp-port", type=int, default=None, metavar="N", help="also serve SMTP submission with TLS from the first byte (465 style) on this port")
    parser.add_argument("--submission-port", type=int, default=None, metavar="N", help="also serve SMTP submission with STARTTLS (587 style) on this port")
    parser.add_argument("--close-out-early", action="store_true", help="Outlook Anywhere: close the RPC_OUT_DATA channel right after CONN/A3 (a load balancer or timeout cutting it)")
    parser.add_argument("--imap-port", type=int, default=None, metavar="N", help="also serve IMAP4 as Exchange 2007 does, TLS 1.0 from the first byte (993-style); off by default")
    parser.add_argument("--imap-starttls", dest="imap_tls", action="store_const", const="starttls", default="implicit", help="the IMAP4 port speaks plain text first and offers STARTTLS (143-style)")
    parser.add_argument("--user", dest="users", type=_user_argument, action="append", metavar="'DOMAIN\\user:password'", help="a mailbox user, repeatable (default LAB\\alice:Passw0rd!)")


def options_from_args(args: argparse.Namespace) -> LabOptions:
    return LabOptions(
        host=args.host,
        port=args.port,
        hostname=args.hostname,
        state_dir=args.state_dir,
        tls_max=args.tls_max,
        expired_cert=args.expired_cert,
        auth=args.auth,
        rpc=args.rpc,
        users=dict(args.users) if args.users else dict(DEFAULT_USERS),
        rpc_auth=args.rpc_auth,
        autodiscover=args.autodiscover,
        key_bits=args.key_bits,
        delay=args.delay,
        refuse_bind=args.refuse_bind,
        close_out_early=args.close_out_early,
        imap_port=args.imap_port,
        imap_tls=args.imap_tls,
        pop3_port=args.pop3_port,
        smtp_port=args.smtp_port,
        submission_port=args.submission_port,
    )


def ready_line(lab: Lab) -> str:
    options = lab.options
    auth = {"basic": "Basic", "ntlm": "NTLM/Negotiate", "both": "NTLM/Negotiate and Basic"}[options.auth]
    certificate = "expired certificate" if options.expired_cert else f"self-signed RSA-{options.key_bits} SHA-1 certificate"
    users = ", ".join(options.users)
    return (
        f"Exchange 2007 lab ready at {lab.url} as {options.hostname}: {TLS_SHAPES[options.tls_max][2]}, "
        f"{certificate} sha256 {lab.fingerprint} (bridge flag: {pin_flag(lab.fingerprint)}), auth {auth}, "
        f"users {users}, RPC {_rpc_state(options)}{_mail_state(lab)}"
        + (f", IMAP4 on port {lab.imap_port} ({'STARTTLS' if options.imap_tls == 'starttls' else 'TLS from the first byte'})" if lab.imap is not None else "")
        + ". Ctrl-C stops it."
    )


def _mail_state(lab: Lab) -> str:
    names = {"pop3": "POP3 (TLS)", "smtp": "SMTP (TLS)", "submission": "SMTP (STARTTLS)"}
    return "".join(f", {names[service]} on port {lab.mail_port(service)}" for service in lab.mail_servers)


def _rpc_state(options: LabOptions) -> str:
    if not options.rpc:
        return "off"
    shapes = [name for name, on in (("binds refused", options.refuse_bind), ("OUT channel closed after CONN/A3", options.close_out_early)) if on]
    return "on" + (f" ({', '.join(shapes)})" if shapes else "")


async def serve_until_signalled(options: LabOptions) -> None:
    lab = await start_lab(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(ready_line(lab), flush=True)
    try:
        await stop.wait()
    finally:
        await lab.close()


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve_until_signalled(options_from_args(args)))
    return 0
