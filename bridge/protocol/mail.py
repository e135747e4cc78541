"""What the mail listener shell (bridge.proxy.mail) asks of each mail protocol's sans-IO module.

A mail session through the bridge has two parts. Until the client has logged on, the protocol module
reads both directions (``LogonWatcher``): it forwards commands and answers, filters what the server
advertises to what the bridge really offers, answers hostile or unsupported input itself, and reports
each logon attempt (``Logon``: the user name when known, never a password or a SASL blob). Once a logon
has succeeded the watcher *steps aside* (``stepped_aside``) and the shell relays bytes both ways without
looking at them, so large messages stream at full speed. The protocol module says when that is safe.

``UpstreamStartTls`` is the exchange that upgrades a plain upstream connection to TLS before anything
is relayed (``--imap-upstream-tls starttls`` and its POP3/SMTP siblings); ``MailDialect`` ties one
protocol's pieces together. Everything here is bytes in, bytes out: no sockets, no asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Logon:
    """One finished logon attempt: ``ok`` is the server's verdict."""

    ok: bool
    user: str | None  # as the client named it (for the log); None when it could not be read
    mechanism: str  # LOGIN, PLAIN, NTLM, ...


@dataclass
class Step:
    """What to do with one piece of input: bytes for each side (in order), logon outcomes, and whether
    the session ends here (``problem``: one sentence for the log, never credentials)."""

    to_server: bytes = b""
    to_client: bytes = b""
    logons: list[Logon] = field(default_factory=list)
    close: bool = False
    problem: str | None = None
    start_tls: bool = False  # the bridge wrote its go-ahead to the client's STARTTLS: the client's TLS handshake starts now


class LogonWatcher(Protocol):
    """One session's protocol reader before the logon (see the module docstring)."""

    @property
    def stepped_aside(self) -> bool: ...
    def from_client(self, data: bytes) -> Step: ...
    def from_server(self, data: bytes) -> Step: ...
    def tls_started(self) -> None: ...  # the client's TLS handshake after a ``start_tls`` step is done


@dataclass
class StartTlsStep:
    send: bytes = b""  # to the server, now
    ready: bool = False  # the server agreed: upgrade the connection to TLS now
    greeting: bytes = b""  # the server's greeting, which the client gets once the upgrade is done
    error: str | None = None  # the server refused or said something else: one sentence


class UpstreamStartTls(Protocol):
    def start(self) -> bytes: ...  # bytes to send before the server has said anything (usually none)
    def feed(self, data: bytes) -> StartTlsStep: ...


class MailDialect(Protocol):
    """One mail protocol as the shell uses it."""

    name: str  # the label of logs, counters and bans: imap, pop3, smtp

    def watcher(self, *, upstream_starttls: bool) -> LogonWatcher: ...
    def starttls(self) -> UpstreamStartTls: ...
    def bye(self, sentence: str) -> bytes: ...  # the bridge ends the session itself (a line the client understands)
