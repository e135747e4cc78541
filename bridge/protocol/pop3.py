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
from the client only after the server's ``+`` continuation, as the server itself reads them, and it
must be base64 (or ``*``): a command typed where a SASL response belongs closes the session, unsent.

Lines are bounded (``MAX_LINE``): a longer one closes the session with one sentence.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from bridge.protocol.mail import StartTlsStep
from bridge.protocol.observer import MAX_LINE, LineObserver, ObserverWatcher, Pending
from bridge.protocol.sasl import RELAYED_MECHANISMS, AuthStarted, Greeting, LineTooLong, LogonFailed, LogonSucceeded, Output, printable, take_line

# RFC 2449 allows 255 octets for a command and 512 for a reply line; SASL responses have no limit there
# (an NTLM AUTHENTICATE message is 1-3 KB in base64): the bound is bridge.protocol.observer.MAX_LINE.

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
class _Pending(Pending):
    """A POP3 command whose reply is due (``Pending``), with what a logon or a listing needs."""

    logon: str | None = None  # "USER" (PASS) or "APOP": a reply decides the logon
    user: str | None = None
    collect: list[str] | None = None  # CAPA and AUTH-listing lines, rewritten at the end

    @property
    def barrier(self) -> bool:
        return self.sasl is not None or self.logon is not None


@dataclass
class Pop3Observer(LineObserver):
    """One POP3 session between a client and the server, before and up to the logon (module docstring)."""

    PROTOCOL = "POP3"
    TLS_COMMAND = "STLS"
    MECHANISM_REFUSED = MECHANISM_REFUSED
    LINE_TOO_LONG = LINE_TOO_LONG
    ERROR_PREFIX = b"-ERR "
    COMMAND_LIMIT = 255

    front_stls: bool = False  # the front answers STLS itself (a plain port); False on an implicit-TLS port
    _multiline: _Pending | None = field(default=None, init=False, repr=False)
    _user: str | None = field(default=None, init=False)

    # ------------------------------------------------------------------ client side

    def _command(self, line: bytes, out: Output) -> None:
        text = line.rstrip(b"\r\n").decode("latin-1")
        name, _, argument = text.partition(" ")
        command = name.upper()
        if command == "STLS":
            self._front_tls(command, out, offered=self.front_stls and not self._tls_active, refusal=STLS_REFUSED, go_ahead=STLS_GO_AHEAD)
            return
        if command not in BEFORE_LOGON:
            self._answer_locally(out, _Pending(command, local=NOT_VALID_BEFORE_LOGON))
            return
        pending = _Pending(command, argument)
        if command == "AUTH" and argument.strip():
            if not self._start_sasl(pending, argument, out):
                return
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

    # ------------------------------------------------------------------ server side

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

    def _logon_outcome(self, mechanism: str, user: str | None, ok: bool, text: str, out: Output) -> None:
        if ok:
            self._logged_on(LogonSucceeded(mechanism, user), out)
        else:
            out.events.append(LogonFailed(mechanism, user, text))


# --------------------------------------------------------------------------- the mail shell's dialect


class Pop3StartTls:
    """``--pop3-upstream-tls starttls`` (port 110): the greeting, ``STLS``, its ``+OK``; then TLS. Bytes
    the server sends after that ``+OK`` and before the handshake are refused (response injection)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.greeting = b""

    def start(self) -> bytes:
        return b""

    def feed(self, data: bytes) -> StartTlsStep:
        self.buffer += data
        try:
            line, self.buffer = take_line(self.buffer, MAX_LINE)
        except LineTooLong:
            return StartTlsStep(error=f"it sent a line longer than {MAX_LINE} bytes before STLS")
        if line is None:
            return StartTlsStep()
        text = line.rstrip(b"\r\n").decode("latin-1")
        if not self.greeting:
            if not text.startswith("+OK"):
                return StartTlsStep(error=f"it greeted with {text!r}")
            self.greeting = line
            return StartTlsStep(send=b"STLS\r\n") if not self.buffer else StartTlsStep(error="it sent more than its greeting before STLS")
        if not text.startswith("+OK"):
            return StartTlsStep(error=f"it refused STLS ({text})")
        if self.buffer:
            return StartTlsStep(error="it sent bytes after its answer to STLS, before the TLS handshake (response injection)")
        return StartTlsStep(ready=True, greeting=self.greeting)


class Pop3Dialect:
    """POP3 for the mail listener shell (bridge.protocol.mail.MailDialect): port 995, TLS from the first byte."""

    name = "pop3"

    def watcher(self, *, upstream_starttls: bool) -> ObserverWatcher:
        return ObserverWatcher(Pop3Observer())

    def starttls(self) -> Pop3StartTls:
        return Pop3StartTls()

    def bye(self, sentence: str) -> bytes:
        return f"-ERR {sentence}\r\n".encode()
