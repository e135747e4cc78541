"""A POP3 session seen from a proxy between a client and the server (RFC 1939, RFC 2449 CAPA, RFC 5034 AUTH).

Sans-IO: feed it what each side sends (``client_data``, ``server_data``); each call returns an
``Output`` (``bridge.protocol.sasl``) with the bytes to write to each side, in order, the events seen
and whether to close. Until the logon it parses both directions line by line:

* the greeting (``Greeting``);
* CAPA: the backend's capability list (``Capabilities``) is rewritten to what the front offers
  (``filter_capabilities``: STLS only where the front answers STLS itself, SASL mechanisms the backend
  offers and the bridge can follow: PLAIN, LOGIN, NTLM); a bare ``AUTH`` listing likewise;
* USER/PASS and APOP (the user name only, for the log), AUTH with its SASL continuations (``+ ...``
  from the server, one response line from the client per continuation, ``*`` cancels);
* the outcome: ``LogonSucceeded`` (+OK after PASS, APOP or the SASL exchange), ``LogonFailed`` (-ERR
  after credentials went out; Exchange 2007 says ``-ERR Logon failure: unknown user name or bad
  password.``) or ``AuthAborted`` (cancelled, or refused before any credentials);
* STLS: refused locally unless the front offers it; then the bridge answers ``+OK`` itself
  (``StartTls``), and a client that sends anything after STLS before the handshake is cut off
  (STARTTLS command injection, CVE-2011-0411).

After a successful logon POP3 allows no second logon (the session is in the TRANSACTION state), so
nothing more needs watching: the observer emits ``Passthrough`` with every byte it still held, sets
``passthrough``, and from then on both methods hand data straight back. RETR and TOP bodies are never
parsed after the logon.

Pipelining (RFC 2449): commands may arrive many at a time; replies are matched to them in order, and
answers the bridge writes itself wait their turn behind replies still due from the server. Client bytes
after a logon attempt (PASS, APOP, AUTH) are held until its reply: only then is it known whether they
are SASL responses, commands, or (after success) bytes needing no parsing. A response line is taken
from the client only after the server's ``+`` continuation, as the server itself reads them, so a
command typed where a SASL response belongs is a (failed) SASL response, never a command.

Lines are bounded (``MAX_LINE``): a longer one closes the session with one sentence.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from bridge.protocol.sasl import (
    RELAYED_MECHANISMS,
    AuthAborted,
    AuthStarted,
    Greeting,
    LineTooLong,
    LocalAnswer,
    LogonFailed,
    LogonSucceeded,
    Output,
    Passthrough,
    SaslExchange,
    StartTls,
    Violation,
    printable,
    take_line,
)

# RFC 2449 allows 255 octets for a command and 512 for a reply line; SASL responses have no limit there
# (an NTLM AUTHENTICATE message is 1-3 KB in base64). The bound is the one sentence below.
MAX_LINE = 16384

STLS_GO_AHEAD = b"+OK Begin TLS negotiation now.\r\n"
STLS_REFUSED = b"-ERR Command is not valid in this state.\r\n"
MECHANISM_REFUSED = b"-ERR Unrecognized authentication type.\r\n"
NOT_VALID_BEFORE_LOGON = b"-ERR Command is not valid in this state.\r\n"
LINE_TOO_LONG = b"-ERR Line too long.\r\n"

# +OK replies that go on until a line of a single ".": always, or only without an argument.
MULTILINE_ALWAYS = frozenset({"CAPA", "RETR", "TOP"})
MULTILINE_WITHOUT_ARGUMENT = frozenset({"LIST", "UIDL", "AUTH"})
# What a client may say before its logon (RFC 1939's AUTHORIZATION state, CAPA, STLS, AUTH); anything
# else is answered by the bridge, so no logon can hide in a command the observer does not know.
BEFORE_LOGON = frozenset({"CAPA", "USER", "PASS", "APOP", "AUTH", "STLS", "QUIT"})


@dataclass(frozen=True)
class Capabilities:
    backend: tuple[str, ...]  # the server's CAPA lines
    advertised: tuple[str, ...]  # what the client was sent instead


def filter_capabilities(lines: Iterable[str], *, stls: bool = False, mechanisms: Iterable[str] = RELAYED_MECHANISMS) -> list[str]:
    """The CAPA lines the front advertises: the backend's, without STLS (added back only when the front
    answers STLS itself), its SASL line cut to the mechanisms in ``mechanisms`` (dropped when none is left)."""
    allowed = {mechanism.upper() for mechanism in mechanisms}
    advertised = []
    for line in lines:
        words = line.split()
        keyword = words[0].upper() if words else ""
        if keyword == "STLS":
            continue
        if keyword == "SASL":
            offered = [word for word in words[1:] if word.upper() in allowed]
            if offered:
                advertised.append(" ".join(["SASL", *offered]))
            continue
        advertised.append(line)
    if stls:
        advertised.append("STLS")
    return advertised


@dataclass
class _Pending:
    """A client command whose reply is due, or an answer of the bridge's own waiting for its turn."""

    command: str
    argument: str = ""
    local: bytes | None = None
    start_tls: bool = False
    sasl: SaslExchange | None = None
    logon: str | None = None  # "USER" (PASS) or "APOP": a reply decides the logon
    user: str | None = None
    collect: list[str] | None = None  # CAPA and AUTH-listing lines, rewritten at the end

    @property
    def barrier(self) -> bool:
        """Client bytes after this command wait for its reply."""
        return self.sasl is not None or self.logon is not None


@dataclass
class Pop3Observer:
    """One POP3 session between a client and the server, before and up to the logon (module docstring)."""

    front_stls: bool = False  # the front answers STLS itself (a plain port); False on an implicit-TLS port
    mechanisms: tuple[str, ...] = RELAYED_MECHANISMS
    max_line: int = MAX_LINE
    passthrough: bool = field(default=False, init=False)
    closed: bool = field(default=False, init=False)
    _client: bytes = field(default=b"", init=False, repr=False)
    _server: bytes = field(default=b"", init=False, repr=False)
    _pending: deque[_Pending] = field(default_factory=deque, init=False, repr=False)
    _greeted: bool = field(default=False, init=False)
    _multiline: _Pending | None = field(default=None, init=False, repr=False)
    _sasl_turn: bool = field(default=False, init=False)  # the server sent "+": one client line is a SASL response
    _user: str | None = field(default=None, init=False)
    _stls_requested: bool = field(default=False, init=False)
    _tls_active: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.mechanisms = tuple(mechanism.upper() for mechanism in self.mechanisms)

    # ------------------------------------------------------------------ client side

    def client_data(self, data: bytes) -> Output:
        out = Output()
        if self.passthrough:
            out.to_server = data
            return out
        if self.closed or not data:
            return out
        if self._stls_requested:
            return self._violation(out, "client", f"The client sent {len(data)} bytes after STLS before the TLS handshake (STARTTLS command injection); the connection is closed.")
        self._client += data
        self._parse_client(out)
        return out

    def tls_started(self) -> None:
        """The bridge finished the TLS handshake with the client after its STLS go-ahead."""
        self._stls_requested = False
        self._tls_active = True

    def _holding(self) -> bool:
        return bool(self._pending) and self._pending[-1].barrier and not self._sasl_turn

    def _parse_client(self, out: Output) -> None:
        while not self.closed and not self._holding():
            try:
                line, self._client = take_line(self._client, self.max_line)
            except LineTooLong:
                self._line_too_long(out)
                return
            if line is None:
                return
            if self._sasl_turn:
                self._sasl_turn = False
                sasl = self._pending[-1].sasl
                assert sasl is not None
                sasl.client_response(line)
                out.to_server += line
                continue
            self._command(line, out)

    def _line_too_long(self, out: Output) -> None:
        out.to_client += LINE_TOO_LONG
        self._violation(out, "client", f"The client sent a line longer than {self.max_line} bytes before logging on (POP3 commands are at most 255); the connection is closed.")

    def _command(self, line: bytes, out: Output) -> None:
        text = line.rstrip(b"\r\n").decode("latin-1")
        name, _, argument = text.partition(" ")
        command = name.upper()
        if command == "STLS":
            if not self.front_stls or self._tls_active:
                self._answer_locally(out, _Pending(command, local=STLS_REFUSED))
                return
            self._stls_requested = True
            if self._client:
                self._violation(out, "client", f"The client sent {len(self._client)} bytes after STLS before the TLS handshake (STARTTLS command injection); the connection is closed.")
                return
            self._answer_locally(out, _Pending(command, local=STLS_GO_AHEAD, start_tls=True))
            return
        if command not in BEFORE_LOGON:
            self._answer_locally(out, _Pending(command, local=NOT_VALID_BEFORE_LOGON))
            return
        pending = _Pending(command, argument)
        if command == "AUTH" and argument.strip():
            mechanism, _, initial = argument.strip().partition(" ")
            if mechanism.upper() not in self.mechanisms:
                self._answer_locally(out, _Pending(command, local=MECHANISM_REFUSED))
                return
            pending.sasl = SaslExchange(mechanism)
            if initial.strip():
                pending.sasl.client_response(initial)
            out.events.append(AuthStarted(pending.sasl.mechanism))
        elif command in ("AUTH", "CAPA"):
            pending.collect = []
        elif command == "USER":
            self._user = printable(argument.strip())
        elif command == "PASS":
            pending.logon, pending.user = "USER", self._user
            out.events.append(AuthStarted("USER"))
        elif command == "APOP":
            pending.logon, pending.user = "APOP", printable(argument.strip().rpartition(" ")[0])
            out.events.append(AuthStarted("APOP"))
        out.to_server += line
        self._pending.append(pending)

    def _answer_locally(self, out: Output, pending: _Pending) -> None:
        if self._pending:
            self._pending.append(pending)  # written when the replies due before it have gone out
        else:
            self._write_local(out, pending)

    def _write_local(self, out: Output, pending: _Pending) -> None:
        assert pending.local is not None
        out.to_client += pending.local
        out.events.append(LocalAnswer(pending.command, pending.local.decode("latin-1").rstrip()))
        if pending.start_tls:
            out.events.append(StartTls(discarded=0))

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
                self._violation(out, "server", f"The POP3 server sent a line longer than {self.max_line} bytes before the logon; the connection is closed.")
                break
            if line is None:
                break
            self._server_line(line, out)
            if self._client and not self.passthrough:
                self._parse_client(out)  # the reply may have released held client lines, sent before the next reply
        if self.passthrough:
            out.to_client += self._server
            out.to_server += self._client
            self._server = self._client = b""
        return out

    def _server_line(self, line: bytes, out: Output) -> None:
        text = line.rstrip(b"\r\n").decode("latin-1")
        if not self._greeted:
            self._greeted = True
            ok = text.startswith("+OK")
            out.events.append(Greeting(ok, text[3 if ok else 4 :].strip()))
            out.to_client += line
            return
        if self._multiline is not None:
            self._multiline_line(line, text, out)
            return
        if not self._pending or not text.startswith(("+", "-")):
            out.to_client += line  # unsolicited ("-ERR autologout", "Connection is closed. 21" after a final -ERR)
            return
        head = self._pending[0]
        ok = text.startswith("+OK")
        if head.sasl is not None and not ok and text.startswith("+"):
            self._sasl_turn = True  # a continuation: the client's next line is a SASL response
            out.to_client += line
            return
        out.to_client += line
        if head.sasl is not None:
            self._sasl_outcome(head.sasl, ok, text, out)
        elif head.logon is not None:
            self._logon_outcome(head.logon, head.user, ok, text, out)
        if self.passthrough:
            return
        if ok and self._multiline_reply(head):
            self._multiline = head
            return
        self._reply_done(out)

    def _multiline_reply(self, pending: _Pending) -> bool:
        if pending.command in MULTILINE_ALWAYS:
            return True
        return pending.command in MULTILINE_WITHOUT_ARGUMENT and not pending.argument.strip()

    def _multiline_line(self, line: bytes, text: str, out: Output) -> None:
        pending = self._multiline
        assert pending is not None
        if text != ".":
            if pending.collect is not None:
                pending.collect.append(text)
            else:
                out.to_client += line
            return
        if pending.collect is not None:
            if pending.command == "CAPA":
                advertised = filter_capabilities(pending.collect, stls=self.front_stls and not self._tls_active, mechanisms=self.mechanisms)
                out.events.append(Capabilities(tuple(pending.collect), tuple(advertised)))
            else:  # the AUTH listing: one mechanism a line
                advertised = [mechanism for mechanism in pending.collect if mechanism.strip().upper() in self.mechanisms]
            out.to_client += b"".join(entry.encode("latin-1") + b"\r\n" for entry in advertised)
        out.to_client += line
        self._multiline = None
        self._reply_done(out)

    def _reply_done(self, out: Output) -> None:
        self._pending.popleft()
        while self._pending and self._pending[0].local is not None:
            self._write_local(out, self._pending.popleft())

    def _sasl_outcome(self, sasl: SaslExchange, ok: bool, text: str, out: Output) -> None:
        self._sasl_turn = False
        if ok:
            self._logged_on(LogonSucceeded(sasl.mechanism, sasl.user), out)
        elif sasl.credentials_sent:
            out.events.append(LogonFailed(sasl.mechanism, sasl.user, text))
        else:
            out.events.append(AuthAborted(sasl.mechanism, text))

    def _logon_outcome(self, mechanism: str, user: str | None, ok: bool, text: str, out: Output) -> None:
        if ok:
            self._logged_on(LogonSucceeded(mechanism, user), out)
        else:
            out.events.append(LogonFailed(mechanism, user, text))

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
