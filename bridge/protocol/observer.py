"""The line-based logon observer POP3 and SMTP share, and its adapter to the mail shell's watcher.

``LineObserver`` holds what both protocols do the same way before a logon (bridge.protocol.pop3 and
bridge.protocol.smtp say what differs): client and server bytes split into bounded lines
(``take_line``), commands queued in order with the bridge's own answers waiting their turn behind
replies still due (``Pending``), client bytes held behind a logon attempt until its reply, one SASL
response line let through per server continuation (and only if it is base64 or the cancel:
a command there closes the session, as bridge.protocol.imap does), the front's STARTTLS/STLS (a go-ahead written
by the bridge, then ``StartTls``; bytes sent before the handshake close the session: CVE-2011-0411),
and the step aside at a successful logon (``Passthrough`` with every byte still held).

``ObserverWatcher`` makes such an observer the ``LogonWatcher`` bridge.proxy.mail drives (the IMAP
watcher's interface): an ``Output`` becomes a ``Step``, logon events become ``Logon`` entries, a
``Violation`` the session's end with its sentence, ``StartTls`` the front's TLS upgrade.

Sans-IO: bytes in, bytes and events out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from bridge.protocol.mail import Logon, Step
from bridge.protocol.sasl import (
    RELAYED_MECHANISMS,
    AuthAborted,
    AuthStarted,
    LineTooLong,
    LocalAnswer,
    LogonFailed,
    LogonSucceeded,
    Output,
    Passthrough,
    SaslExchange,
    StartTls,
    Violation,
    decode_response,
    take_line,
)

NOT_BASE64 = "The answer to the server's authentication challenge is not base64; the session is closed."
MAX_LINE = 16384  # a line before the logon: commands are short, an NTLM AUTHENTICATE response is 1-3 KB of base64


@dataclass
class Pending:
    """A client command whose reply is due, or an answer of the bridge's own waiting for its turn."""

    command: str
    argument: str = ""
    local: bytes | None = None
    start_tls: bool = False
    sasl: SaslExchange | None = None

    @property
    def barrier(self) -> bool:
        """Client bytes after this command wait for its reply."""
        return self.sasl is not None


@dataclass(kw_only=True)
class LineObserver:
    """One session's common half (module docstring); subclasses set the protocol's words and commands."""

    PROTOCOL = ""  # POP3, SMTP: in the sentences
    TLS_COMMAND = ""  # STLS, STARTTLS
    MECHANISM_REFUSED = b""
    LINE_TOO_LONG = b""
    COMMAND_LIMIT = 0  # the protocol's own bound on a command line, for the sentence
    ERROR_PREFIX = b""  # what starts an error reply: "-ERR ", "501 5.5.2 "

    mechanisms: tuple[str, ...] = RELAYED_MECHANISMS
    max_line: int = MAX_LINE
    passthrough: bool = field(default=False, init=False)
    closed: bool = field(default=False, init=False)
    _client: bytes = field(default=b"", init=False, repr=False)
    _server: bytes = field(default=b"", init=False, repr=False)
    _pending: deque[Any] = field(default_factory=deque, init=False, repr=False)
    _greeted: bool = field(default=False, init=False)
    _sasl_turn: bool = field(default=False, init=False)  # the server sent a continuation: one client line is a SASL response
    _tls_requested: bool = field(default=False, init=False)  # the go-ahead for the front's TLS is out, the handshake not done
    _tls_active: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.mechanisms = tuple(mechanism.upper() for mechanism in self.mechanisms)

    @property
    def client_encrypted(self) -> bool:
        return self._tls_active

    def tls_started(self) -> None:
        """The bridge finished the TLS handshake with the client after its go-ahead."""
        self._tls_requested = False
        self._tls_active = True

    # ------------------------------------------------------------------ client side

    def client_data(self, data: bytes) -> Output:
        out = Output()
        if self.passthrough:
            out.to_server = data
            return out
        if self.closed or not data:
            return out
        if self._tls_requested:
            return self._injection(out, len(data))
        self._client += data
        self._parse_client(out)
        return out

    def _holding(self) -> bool:
        return bool(self._pending) and self._pending[-1].barrier and not self._sasl_turn

    def _parse_client(self, out: Output) -> None:
        while not self.closed and not self._holding() and self._skip_client_bytes():
            try:
                line, self._client = take_line(self._client, self.max_line)
            except LineTooLong:
                out.to_client += self.LINE_TOO_LONG
                self._violation(
                    out, "client", f"The client sent a line longer than {self.max_line} bytes before logging on ({self.PROTOCOL} commands are at most {self.COMMAND_LIMIT}); the connection is closed."
                )
                return
            if line is None:
                return
            if self._sasl_turn:
                self._sasl_response(line, out)
                continue
            self._command(line, out)

    def _sasl_response(self, line: bytes, out: Output) -> None:
        """One client line after the server's continuation: base64 (or ``*``, the cancel) goes on; anything
        else (a command typed or injected where a response belongs) ends the session before the server sees it."""
        self._sasl_turn = False
        if line.strip() != b"*" and decode_response(line) is None:
            out.to_client += self.ERROR_PREFIX + NOT_BASE64.encode() + b"\r\n"
            self._violation(out, "client", NOT_BASE64)
            return
        sasl = self._pending[-1].sasl
        assert sasl is not None
        sasl.client_response(line)
        out.to_server += line

    def _skip_client_bytes(self) -> bool:
        """Bytes to read past before the next line (SMTP's BDAT chunk before the logon); False: wait for more."""
        return True

    def _command(self, line: bytes, out: Output) -> None:
        raise NotImplementedError

    def _front_tls(self, command: str, out: Output, *, offered: bool, refusal: bytes, go_ahead: bytes) -> None:
        """The client's STARTTLS/STLS: the bridge's own go-ahead when it offers TLS here, else ``refusal``."""
        if not offered:
            self._answer_locally(out, Pending(command, local=refusal))
            return
        self._tls_requested = True
        if self._client:
            self._injection(out, len(self._client))
            return
        self._answer_locally(out, Pending(command, local=go_ahead, start_tls=True))

    def _start_sasl(self, pending: Pending, argument: str, out: Output) -> bool:
        """AUTH's mechanism and initial response; False when the bridge refused the mechanism itself."""
        mechanism, _, initial = argument.strip().partition(" ")
        if mechanism.upper() not in self.mechanisms:
            self._answer_locally(out, Pending(pending.command, local=self.MECHANISM_REFUSED))
            return False
        pending.sasl = SaslExchange(mechanism)
        if initial.strip():
            pending.sasl.client_response(initial)
        out.events.append(AuthStarted(pending.sasl.mechanism))
        return True

    def _answer_locally(self, out: Output, pending: Pending) -> None:
        if self._pending:
            self._pending.append(pending)  # written when the replies due before it have gone out
        else:
            self._write_local(out, pending)

    def _write_local(self, out: Output, pending: Pending) -> None:
        assert pending.local is not None
        out.to_client += pending.local
        out.events.append(LocalAnswer(pending.command, pending.local.decode("latin-1").rstrip()))
        if pending.start_tls:
            out.events.append(StartTls(discarded=0))

    def _injection(self, out: Output, count: int) -> Output:
        return self._violation(out, "client", f"The client sent {count} bytes after {self.TLS_COMMAND} before the TLS handshake (STARTTLS command injection); the connection is closed.")

    # ------------------------------------------------------------------ server side

    def server_data(self, data: bytes) -> Output:
        out = Output()
        if self.passthrough:
            out.to_client = data
            return out
        if self.closed or not data:
            return out
        self._server += data
        while not self.closed and not self.passthrough:
            try:
                line, self._server = take_line(self._server, self.max_line)
            except LineTooLong:
                self._violation(out, "server", f"The {self.PROTOCOL} server sent a line longer than {self.max_line} bytes before the logon; the connection is closed.")
                break
            if line is None:
                break
            self._server_line(line, out)
            if self._client and not self.passthrough and not self.closed:
                self._parse_client(out)  # the reply may have released held client lines, sent before the next reply
        if self.passthrough:
            out.to_client += self._server
            out.to_server += self._client
            self._server = self._client = b""
        return out

    def _server_line(self, line: bytes, out: Output) -> None:
        raise NotImplementedError

    def _reply_done(self, out: Output) -> None:
        """The head command's reply is complete: the bridge's own answers queued behind it go out."""
        self._pending.popleft()
        while self._pending and self._pending[0].local is not None:
            self._write_local(out, self._pending.popleft())

    def _sasl_outcome(self, sasl: SaslExchange, ok: bool, reply: str, out: Output) -> None:
        self._sasl_turn = False
        if ok:
            self._logged_on(LogonSucceeded(sasl.mechanism, sasl.user), out)
        elif sasl.credentials_sent:
            out.events.append(LogonFailed(sasl.mechanism, sasl.user, reply))
        else:
            out.events.append(AuthAborted(sasl.mechanism, reply))

    def _logged_on(self, event: LogonSucceeded, out: Output) -> None:
        # A barrier is always the last command: nothing after it was parsed, so nothing else is due.
        self._pending.clear()
        out.events += [event, Passthrough()]
        self.passthrough = True

    def _violation(self, out: Output, side: str, reason: str) -> Output:
        out.events.append(Violation(side, reason))
        out.close = True
        self.closed = True
        return out


class ObserverWatcher:
    """A ``LineObserver`` as bridge.protocol.mail.LogonWatcher (module docstring)."""

    def __init__(self, observer: Any) -> None:
        self.observer = observer

    @property
    def stepped_aside(self) -> bool:
        return bool(self.observer.passthrough)

    def from_client(self, data: bytes) -> Step:
        return step_of(self.observer.client_data(data))

    def from_server(self, data: bytes) -> Step:
        return step_of(self.observer.server_data(data))

    def tls_started(self) -> None:
        self.observer.tls_started()


def step_of(out: Output) -> Step:
    """An observer's ``Output`` as the shell's ``Step``."""
    step = Step(to_server=out.to_server, to_client=out.to_client, close=out.close)
    for event in out.events:
        if isinstance(event, LogonSucceeded | LogonFailed):
            step.logons.append(Logon(isinstance(event, LogonSucceeded), event.user, event.mechanism))
        elif isinstance(event, Violation):
            step.problem = event.reason
        elif isinstance(event, StartTls):
            step.start_tls = True
    return step
