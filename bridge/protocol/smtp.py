"""An SMTP submission session seen from a proxy between a client and the server (RFC 5321, RFC 3207
STARTTLS, RFC 4954 AUTH, RFC 2920 PIPELINING, RFC 3030 CHUNKING).

Sans-IO, like ``bridge.protocol.pop3``: ``client_data`` and ``server_data`` return an ``Output``
(``bridge.protocol.sasl``) with the bytes for each side, the events and whether to close.

Before the logon it parses both directions:

* the greeting (``Greeting``) and EHLO replies, rewritten to what the front offers
  (``filter_ehlo``, event ``Extensions``): STARTTLS only where the bridge answers it itself (port 587
  before the client's TLS; never on 465), AUTH only once the client's side is encrypted, with the
  mechanisms the backend offers that the bridge can follow (PLAIN, LOGIN, NTLM), SIZE and the other
  standard keywords as the backend says them, Exchange's server-to-server verbs (X-EXPS, XEXCH50, ...) left out;
* the client's STARTTLS on 587 is the bridge's to answer (``220 2.0.0 SMTP server ready``, then
  ``StartTls``): the server never sees it (the bridge's own link to the server is encrypted first, see
  ``BackendStartTls``). Anything the client sends after STARTTLS and before the handshake closes the
  session (STARTTLS command injection, CVE-2011-0411): such bytes would otherwise be read as if they
  had come over TLS;
* AUTH PLAIN/LOGIN/NTLM with ``334`` continuations (one client response line per continuation, ``*``
  cancels); ``235`` is ``LogonSucceeded``, a refusal after credentials went out ``LogonFailed``
  (Exchange 2007: ``535 5.7.3 Authentication unsuccessful``), without credentials ``AuthAborted``;
* MAIL, RCPT, DATA and BDAT before the logon are answered by the bridge with Exchange's own
  ``530 5.7.1 Client was not authenticated`` (a BDAT chunk is read past, unparsed): the bridge relays
  mail only for logged-on clients, so there is never a message body to frame before the logon (no
  DATA-terminator smuggling can put the observer and the server out of step). Other commands outside
  EHLO, HELO, AUTH, STARTTLS, NOOP, RSET, HELP and QUIT are answered ``500 5.3.3 Unrecognized command``.

Where parsing stops: at the ``235``. RFC 4954 section 4: after a successful AUTH the server must reject
any further AUTH with 503, and RSET does not undo the logon, so no second logon can happen on the
connection; the client's side is already TLS, so no STARTTLS is left for the bridge to answer (a late
STARTTLS goes to the server, which refuses it or runs TLS inside the relayed stream, opaque to the
bridge). The observer emits ``Passthrough`` with every byte it still held and from then on hands data
straight back: DATA and BDAT bodies stream without line parsing.

Pipelining: replies are matched to commands in order; the bridge's own answers wait their turn behind
replies still due. Client bytes after AUTH are held until its reply (or continuation), as the server
reads them, and a response must be base64 (or ``*``): a command typed where a SASL response belongs
closes the session, unsent. Lines are bounded (``MAX_LINE``): a longer one closes the session with one sentence.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from bridge.protocol.mail import StartTlsStep
from bridge.protocol.observer import MAX_LINE, LineObserver, ObserverWatcher, Pending
from bridge.protocol.sasl import RELAYED_MECHANISMS, Greeting, LineTooLong, Output, Violation, take_line

# RFC 5321 4.5.3.1: 512 octets for a command line, 1000 for a text line; RFC 4954 allows 12288 for an
# AUTH line with its initial response: the bound is bridge.protocol.observer.MAX_LINE.

STARTTLS_GO_AHEAD = b"220 2.0.0 SMTP server ready\r\n"
NOT_AUTHENTICATED = b"530 5.7.1 Client was not authenticated\r\n"
TLS_FIRST = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
MECHANISM_REFUSED = b"504 5.7.4 Unrecognized authentication type\r\n"
UNRECOGNIZED = b"500 5.3.3 Unrecognized command\r\n"
LINE_TOO_LONG = b"500 5.5.2 Line too long\r\n"
BAD_BDAT = b"501 5.5.4 Invalid arguments\r\n"

BEFORE_LOGON = frozenset({"EHLO", "HELO", "AUTH", "STARTTLS", "NOOP", "RSET", "HELP", "QUIT"})
MAIL_COMMANDS = frozenset({"MAIL", "RCPT", "DATA", "BDAT"})
# EHLO keywords passed on as the backend says them; the rest (X-EXPS, XEXCH50, X-LINK2STATE, XRDST,
# X-ANONYMOUSTLS: Exchange's verbs for other Exchange servers) are not advertised.
STANDARD_KEYWORDS = frozenset({"SIZE", "PIPELINING", "DSN", "ENHANCEDSTATUSCODES", "8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8", "DELIVERBY", "REQUIRETLS"})
# STARTTLS goes where Exchange puts it: after these, before AUTH and the body types.
BEFORE_STARTTLS = frozenset({"SIZE", "PIPELINING", "DSN", "ENHANCEDSTATUSCODES"})
REPLY_LINE = re.compile(r"^([2-5]\d\d)([ -]|$)")


@dataclass(frozen=True)
class Extensions:
    backend: tuple[str, ...]  # the server's EHLO lines (first: its name and greeting)
    advertised: tuple[str, ...]  # what the client was sent instead


def filter_ehlo(lines: Iterable[str], *, starttls: bool, auth: bool, mechanisms: Iterable[str] = RELAYED_MECHANISMS) -> list[str]:
    """The EHLO reply lines (text after ``250-``/``250 ``) the front advertises: the first line as it is,
    standard keywords as the backend says them, AUTH cut to ``mechanisms`` (and only when ``auth``),
    STARTTLS only when ``starttls`` (the bridge answers it itself)."""
    allowed = {mechanism.upper() for mechanism in mechanisms}
    lines = list(lines)
    advertised = lines[:1]
    for line in lines[1:]:
        words = line.split()
        keyword = words[0].upper() if words else ""
        if keyword == "AUTH":
            offered = [word for word in words[1:] if word.upper() in allowed]
            if auth and offered:
                advertised.append(" ".join(["AUTH", *offered]))
        elif keyword in STANDARD_KEYWORDS:
            advertised.append(line)
    if starttls:
        position = 1
        while position < len(advertised) and advertised[position].split()[0].upper() in BEFORE_STARTTLS:
            position += 1
        advertised.insert(position, "STARTTLS")
    return advertised


def reply_bytes(code: str, lines: list[str]) -> bytes:
    """A (multi-line) reply: ``250-first``, ..., ``250 last``."""
    last = len(lines) - 1
    return b"".join(f"{code}{' ' if index == last else '-'}{line}\r\n".encode("latin-1") for index, line in enumerate(lines))


def parse_reply_line(line: bytes) -> tuple[str, bool, str] | None:
    """(code, is_last, text) of one reply line, None if it is not one."""
    text = line.rstrip(b"\r\n").decode("latin-1")
    match = REPLY_LINE.match(text)
    if match is None:
        return None
    return match.group(1), match.group(2) != "-", text[4:]


@dataclass
class SmtpObserver(LineObserver):
    """One SMTP submission session between a client and the server, up to the logon (module docstring).

    ``front_starttls``: the bridge answers the client's STARTTLS (port 587); False where the client's
    side is TLS from the first byte (465). ``tls_started()`` tells it the client's handshake is done.
    """

    PROTOCOL = "SMTP"
    TLS_COMMAND = "STARTTLS"
    MECHANISM_REFUSED = MECHANISM_REFUSED
    LINE_TOO_LONG = LINE_TOO_LONG
    ERROR_PREFIX = b"501 5.5.2 "
    COMMAND_LIMIT = 512

    front_starttls: bool = False
    _reply: list[str] = field(default_factory=list, init=False, repr=False)  # lines of a multi-line reply so far
    _reply_raw: bytes = field(default=b"", init=False, repr=False)
    _discard: int = field(default=0, init=False)  # BDAT chunk bytes still to read past

    def __post_init__(self) -> None:
        super().__post_init__()
        self._tls_active = not self.front_starttls

    # ------------------------------------------------------------------ client side

    def _skip_client_bytes(self) -> bool:
        if self._discard:
            dropped = self._client[: self._discard]
            self._client = self._client[len(dropped) :]
            self._discard -= len(dropped)
        return not self._discard

    def _command(self, line: bytes, out: Output) -> None:
        text = line.rstrip(b"\r\n").decode("latin-1")
        name, _, argument = text.partition(" ")
        command = name.upper()
        if command == "STARTTLS":
            self._front_tls(command, out, offered=not self._tls_active, refusal=UNRECOGNIZED, go_ahead=STARTTLS_GO_AHEAD)
            return
        if command in MAIL_COMMANDS:
            if command == "BDAT" and not self._bdat_size(argument, out):
                return
            self._answer_locally(out, Pending(command, local=NOT_AUTHENTICATED))
            return
        if command not in BEFORE_LOGON:
            self._answer_locally(out, Pending(command, local=UNRECOGNIZED))
            return
        pending = Pending(command, argument)
        if command == "AUTH":
            if not self._tls_active:
                self._answer_locally(out, Pending(command, local=TLS_FIRST))
                return
            if not self._start_sasl(pending, argument, out):
                return
        out.to_server += line
        self._pending.append(pending)

    def _bdat_size(self, argument: str, out: Output) -> bool:
        words = argument.split()
        if not words or not words[0].isdigit() or len(words) > 2 or (len(words) == 2 and words[1].upper() != "LAST"):
            out.to_client += BAD_BDAT
            self._violation(out, "client", "The client sent a BDAT command whose chunk size cannot be read, so its data cannot be told from commands; the connection is closed.")
            return False
        self._discard = int(words[0])
        return True

    # ------------------------------------------------------------------ server side

    def _server_line(self, line: bytes, out: Output) -> None:
        parsed = parse_reply_line(line)
        if parsed is None:
            self._violation(out, "server", f"The SMTP server sent {line[:60]!r}, which is not a reply line; the connection is closed.")
            return
        code, last, text = parsed
        self._reply.append(text)
        self._reply_raw += line
        if not last:
            return
        lines, raw = self._reply, self._reply_raw
        self._reply, self._reply_raw = [], b""
        self._reply_complete(code, lines, raw, out)

    def _reply_complete(self, code: str, lines: list[str], raw: bytes, out: Output) -> None:
        if not self._greeted:
            self._greeted = True
            out.events.append(Greeting(code == "220", " ".join(lines)))
            out.to_client += raw
            return
        if not self._pending:
            out.to_client += raw  # unsolicited, e.g. "421 4.4.1 Connection timed out"
            return
        head = self._pending[0]
        if head.sasl is not None and code == "334":
            self._sasl_turn = True
            out.to_client += raw
            return
        if head.command == "EHLO" and code == "250":
            advertised = filter_ehlo(lines, starttls=self.front_starttls and not self._tls_active, auth=self._tls_active, mechanisms=self.mechanisms)
            out.events.append(Extensions(tuple(lines), tuple(advertised)))
            out.to_client += reply_bytes(code, advertised)
        else:
            out.to_client += raw
        if head.sasl is not None:
            self._sasl_outcome(head.sasl, code == "235", f"{code} {' '.join(lines)}".strip(), out)
            if self.passthrough:
                return
        self._reply_done(out)


@dataclass
class BackendStartTls:
    """The bridge's own STARTTLS towards the server, before any client byte reaches it (port 587 to a
    server that offers STARTTLS): greeting in, ``EHLO <name>``, the server's STARTTLS keyword checked,
    ``STARTTLS``, ``220``; then ``ready`` is True and the bridge wraps the connection in TLS. The
    server's greeting is kept in ``greeting``: hand it to ``SmtpObserver.server_data`` so the client
    sees the server's own greeting (and the ``Greeting`` event). A server that does not offer STARTTLS, refuses it, or sends bytes
    after its 220 (response injection) ends in a ``Violation``: the bridge sends no credentials in clear.
    """

    ehlo_name: str
    max_line: int = MAX_LINE
    greeting: bytes = field(default=b"", init=False)
    ready: bool = field(default=False, init=False)
    closed: bool = field(default=False, init=False)
    _buffer: bytes = field(default=b"", init=False, repr=False)
    _stage: str = field(default="greeting", init=False)
    _lines: list[str] = field(default_factory=list, init=False, repr=False)

    def server_data(self, data: bytes) -> Output:
        out = Output()
        if self.closed or self.ready:
            return out
        self._buffer += data
        while not self.closed and not self.ready:
            try:
                line, self._buffer = take_line(self._buffer, self.max_line)
            except LineTooLong:
                return self._fail(out, f"The SMTP server sent a line longer than {self.max_line} bytes before STARTTLS; the connection is closed.")
            if line is None:
                break
            parsed = parse_reply_line(line)
            if parsed is None:
                return self._fail(out, f"The SMTP server sent {line[:60]!r}, which is not a reply line; the connection is closed.")
            code, last, text = parsed
            if self._stage == "greeting":
                self.greeting += line
            self._lines.append(text)
            if last:
                self._reply(code, out)
        if self.ready and self._buffer:
            return self._fail(out, f"The SMTP server sent {len(self._buffer)} bytes after its 220 to STARTTLS, before the TLS handshake (response injection); the connection is closed.")
        return out

    def _reply(self, code: str, out: Output) -> None:
        lines, self._lines = self._lines, []
        reply = f"{code} {' '.join(lines)}".strip()
        if self._stage == "greeting":
            if code != "220":
                self._fail(out, f"The SMTP server refused the connection ({reply}).")
                return
            out.to_server += f"EHLO {self.ehlo_name}\r\n".encode()
            self._stage = "ehlo"
        elif self._stage == "ehlo":
            if code != "250" or not any(line.split()[:1] == ["STARTTLS"] for line in (entry.upper() for entry in lines[1:])):
                self._fail(out, f"The SMTP server does not offer STARTTLS ({reply}); the bridge sends no credentials to it in clear. Turn on TLS for its receive connector.")
                return
            out.to_server += b"STARTTLS\r\n"
            self._stage = "starttls"
        elif code == "220":
            self.ready = True
        else:
            self._fail(out, f"The SMTP server refused STARTTLS ({reply}); check its certificate and receive connector.")

    def _fail(self, out: Output, reason: str) -> Output:
        out.events.append(Violation("server", reason))
        out.close = True
        self.closed = True
        return out


# --------------------------------------------------------------------------- the mail shell's dialect


class SmtpStartTls:
    """``BackendStartTls`` as the shell's upstream STARTTLS (bridge.protocol.mail.UpstreamStartTls)."""

    def __init__(self, ehlo_name: str) -> None:
        self.backend = BackendStartTls(ehlo_name)

    def start(self) -> bytes:
        return b""

    def feed(self, data: bytes) -> StartTlsStep:
        out = self.backend.server_data(data)
        problem = next((event.reason for event in out.events if isinstance(event, Violation)), None)
        if problem is not None:
            return StartTlsStep(error=problem)
        ready = self.backend.ready
        return StartTlsStep(send=out.to_server, ready=ready, greeting=self.backend.greeting if ready else b"")


@dataclass
class SmtpDialect:
    """SMTP submission for the mail listener shell (bridge.protocol.mail.MailDialect): ``smtp`` is port
    465 (TLS from the first byte), ``submission`` port 587 (the bridge answers the client's STARTTLS)."""

    name: str  # smtp or submission: the label of logs, counters and bans
    front_starttls: bool
    ehlo_name: str  # the bridge's name in its own EHLO to the server (the upstream STARTTLS)

    def watcher(self, *, upstream_starttls: bool) -> ObserverWatcher:
        return ObserverWatcher(SmtpObserver(front_starttls=self.front_starttls))

    def starttls(self) -> SmtpStartTls:
        return SmtpStartTls(self.ehlo_name)

    def bye(self, sentence: str) -> bytes:
        return f"421 4.3.2 {sentence}\r\n".encode()
