"""IMAP4rev1 (RFC 3501) as the bridge needs it until a logon: sans-IO, bytes in, events and bytes out.

- ``CommandReader`` reads what the client sends: tagged command lines, literals (``{n}`` and LITERAL+'s
  ``{n+}``, at most ``MAX_LITERAL`` bytes), lines of at most ``MAX_LINE`` bytes, and the client's lines
  of an AUTHENTICATE exchange (one base64 line per server ``+``, or ``*``). Each piece it accepts comes
  out as bytes to forward, in order; a whole command also comes out as a ``Command``; what it will not
  forward comes out as a ``Refusal`` with the one-sentence answer the client gets.
- ``ResponseReader`` reads what the server sends: the greeting, untagged (``*``), tagged and
  continuation (``+``) responses, passing response literals through untouched.
- ``filter_capabilities`` keeps what the bridge's front really offers: no STARTTLS (the front is
  implicit TLS), no LOGINDISABLED, and AUTH= only for PLAIN, LOGIN and NTLM (the mechanisms whose user
  name the bridge can read, and whose failure it can count).
- ``ImapWatcher`` puts them together for one session (bridge.protocol.mail.LogonWatcher): LOGIN and
  AUTHENTICATE (PLAIN, LOGIN, NTLM) are followed to their tagged answer: ``OK`` is a logon, ``NO`` a
  failed one (Exchange: ``NO LOGIN failed.``, ``NO AUTHENTICATE failed.``).

Why the watcher can step aside after a successful logon: IMAP has no way back to the
not-authenticated state (RFC 3501 3: only LOGOUT leaves the authenticated state, and it ends the
connection), and no re-authentication (LOGIN and AUTHENTICATE are valid only before a logon; a server
answers them with BAD afterwards). So once the server has said OK to a logon, no later command can be
a logon attempt, nothing the server sends can advertise STARTTLS or a mechanism a client could use,
and the rest of the session is relayed as bytes without parsing (a FETCH of a 25 MB message streams
at the speed of the sockets). Commands the client pipelined behind its LOGIN were forwarded as
they came and are unaffected.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from bridge.protocol.auth import SaslUser, printable_name
from bridge.protocol.mail import Logon, StartTlsStep, Step

MAX_LINE = 64 * 1024  # a line before the logon (an NTLM AUTHENTICATE blob is a few KiB)
MAX_LITERAL = 64 * 1024  # a literal before the logon (a user name or a password)
MAX_COMMAND = 2 * MAX_LINE  # one command, lines and literals together
MAX_RESPONSE_LINE = 64 * 1024  # a server line before the logon
MECHANISMS = ("PLAIN", "LOGIN", "NTLM")  # AUTH= the bridge relays (and reads the user name of)
DROPPED_CAPABILITIES = frozenset({"STARTTLS", "LOGINDISABLED"})

_LITERAL = re.compile(rb"\{(\d{1,20})(\+?)\}\r?\n\Z")
_TAG = re.compile(rb"[!#$&',\-./0-9:;<=>?@A-Z\[^_`a-z|~]+")  # ASTRING-CHAR less "+"
_COMMAND_START = re.compile(rb"[!#$&',\-./0-9:;<=>?@A-Z\[^_`a-z|~]+ [A-Za-z]+(?=[ \r\n])")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}\Z")
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_CAPABILITY_LINE = re.compile(rb"(\* CAPABILITY)( [^\r\n]*)?(\r?\n)\Z", re.IGNORECASE)


# --------------------------------------------------------------------------- events


def take_literal(buffer: bytearray, left: int) -> tuple[bytes, int]:
    """The next piece of a literal of which ``left`` bytes are due, taken from the front of ``buffer``; and what is then due."""
    count = min(left, len(buffer))
    piece = bytes(buffer[:count])
    del buffer[:count]
    return piece, left - count


@dataclass
class Command:
    """A whole client command (its bytes have been forwarded). Only the user name of a LOGIN is kept."""

    tag: str
    name: str  # upper case
    user: str | None = None  # LOGIN's user name
    mechanism: str | None = None  # AUTHENTICATE's mechanism (upper case)
    initial_response: bytes | None = None  # AUTHENTICATE's SASL-IR, decoded (read for the user name, then dropped)


@dataclass
class SaslResponse:
    """One client line of an AUTHENTICATE exchange (forwarded): the decoded response, or a cancel (``*``)."""

    data: bytes
    cancel: bool = False


@dataclass
class Refusal:
    """Input the bridge does not forward: ``answer`` goes to the client; ``close`` ends the session."""

    answer: bytes
    sentence: str
    close: bool = False


@dataclass
class Response:
    """One server line (without its literals): ``kind`` is continuation, untagged or tagged."""

    kind: str
    tag: str
    status: str  # OK, NO, BAD, BYE, PREAUTH, or the untagged response's name (CAPABILITY, ...), upper case
    wire: bytes  # the line as received, CRLF included


Event = bytes | Command | SaslResponse | Refusal


def tagged(tag: str, status: str, sentence: str) -> bytes:
    return f"{tag} {status} {sentence}\r\n".encode()


def bye(sentence: str) -> bytes:
    return f"* BYE {sentence}\r\n".encode()


# --------------------------------------------------------------------------- tokens


def _atoms(text: bytes) -> list[bytes]:
    """The arguments of a command line's text: atoms and quoted strings (unquoted); lists are skipped
    as atoms, which is enough for LOGIN and AUTHENTICATE."""
    tokens: list[bytes] = []
    index, length = 0, len(text)
    while index < length:
        char = text[index : index + 1]
        if char == b" ":
            index += 1
        elif char == b'"':
            value = bytearray()
            index += 1
            while index < length and text[index : index + 1] != b'"':
                if text[index : index + 1] == b"\\" and index + 1 < length:
                    index += 1
                value += text[index : index + 1]
                index += 1
            tokens.append(bytes(value))
            index += 1
        else:
            end = text.find(b" ", index)
            end = length if end < 0 else end
            tokens.append(text[index:end])
            index = end
    return tokens


def command_tokens(parts: list[tuple[bool, bytes]]) -> list[bytes]:
    """The tokens of a whole command: ``parts`` are (is_literal, bytes) in order, lines with their CRLF
    and literal announcement."""
    tokens: list[bytes] = []
    for is_literal, data in parts:
        if is_literal:
            tokens.append(data)
            continue
        line = data.rstrip(b"\r\n")
        match = _LITERAL.search(data)
        if match:
            line = line[: len(line) - len(match.group(0).rstrip(b"\r\n"))]
        tokens.extend(_atoms(line))
    return tokens


def _decode_base64(line: bytes) -> bytes | None:
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


def _tag_of(line: bytes) -> str | None:
    tag = line.split(b" ", 1)[0].rstrip(b"\r\n")
    return tag.decode() if _TAG.fullmatch(tag) else None


# --------------------------------------------------------------------------- the client's side


class CommandReader:
    """The client's bytes before the logon, one accepted piece at a time (see the module docstring).

    While an AUTHENTICATE exchange waits for the server (``held``), nothing more is read: the client's
    next line is its response to the server's next ``+``, and the watcher lets exactly one through per
    ``+`` (``allow_sasl_line``), until the server's tagged answer (``end_sasl``)."""

    def __init__(self, max_line: int = MAX_LINE, max_literal: int = MAX_LITERAL) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self.buffer = bytearray()
        self.literal_left = 0  # bytes of the current literal still to come
        self.parts: list[tuple[bool, bytes]] = []  # the current command so far
        self.size = 0
        self.held = False
        self.sasl = False
        self.closed = False
        self.queued: Command | SaslResponse | None = None

    def feed(self, data: bytes) -> list[Event]:
        self.buffer += data
        return self.events()

    def events(self) -> list[Event]:
        out: list[Event] = []
        while not self.closed:
            event = self.next_event()
            if event is None:
                break
            out.append(event)
        return out

    def release(self) -> bytes:
        """Everything not read yet (the watcher steps aside: it is forwarded as it is)."""
        data, self.buffer = bytes(self.buffer), bytearray()
        return data

    def allow_sasl_line(self) -> None:
        self.held, self.sasl = False, True

    def end_sasl(self) -> None:
        self.held = self.sasl = False

    def next_event(self) -> Event | None:
        if self.queued is not None:
            command, self.queued = self.queued, None
            return command
        buffer = self.buffer
        if self.literal_left:
            if not buffer:
                return None
            piece, self.literal_left = take_literal(buffer, self.literal_left)
            self.parts[-1] = (True, self.parts[-1][1] + piece)  # (a literal is bounded by max_literal)
            return piece
        if self.held:
            if len(buffer) > self.max_line:
                return self.refuse(bye(f"The client sent more than {self.max_line} bytes while its logon was waiting for the server."), close=True)
            return None
        end = buffer.find(b"\n")
        if end < 0 and len(buffer) <= self.max_line:
            return None
        if end < 0 or end + 1 > self.max_line:
            return self.refuse(bye(f"The command line is longer than the {self.max_line} bytes the bridge accepts before a logon."), close=True)
        line = bytes(buffer[: end + 1])
        del buffer[: end + 1]
        if self.sasl:
            return self.sasl_line(line)
        return self.command_line(line)

    def refuse(self, answer: bytes, close: bool = False) -> Refusal:
        sentence = answer.decode(errors="replace").split(" ", 2)[-1].strip()
        if close:
            self.closed = True
            self.buffer.clear()
        return Refusal(answer, sentence, close)

    def sasl_line(self, line: bytes) -> Event:
        self.sasl = False
        self.held = True  # one line per "+": the next waits for the server again
        text = line.rstrip(b"\r\n")
        if text == b"*":
            self.queued = SaslResponse(b"", cancel=True)
            return line
        decoded = _decode_base64(text) if _BASE64.match(text) else None
        if decoded is None:
            return self.refuse(bye("The answer to the server's authentication challenge is not base64; the session is closed."), close=True)
        self.queued = SaslResponse(decoded)  # comes out right after its line
        return line

    def command_line(self, line: bytes) -> Event:
        first = not self.parts
        match = _LITERAL.search(line)
        if first and not _COMMAND_START.match(line):
            sentence = "The line is not an IMAP command (a tag, a space and a command name); nothing was sent to the server."
            return self.refuse(bye(sentence) if match else f"* BAD {sentence}\r\n".encode(), close=bool(match))
        if match:
            count, non_synchronizing = int(match.group(1)), bool(match.group(2))
            if count > self.max_literal or self.size + len(line) + count > MAX_COMMAND:
                sentence = f"The literal of {count} bytes is larger than the {self.max_literal} bytes the bridge accepts before a logon."
                tag = _tag_of(line) if first else None
                if tag is None or non_synchronizing:  # its bytes follow unasked, or a command is half sent: no way to go on
                    return self.refuse(bye(sentence), close=True)
                return self.refuse(tagged(tag, "BAD", sentence))  # the client waits for "+" and sends nothing more of it
            self.parts += [(False, line), (True, b"")]
            self.size += len(line) + count
            self.literal_left = count
            return line
        self.parts.append((False, line))
        parts, self.parts, self.size = self.parts, [], 0
        tokens = command_tokens(parts)
        if len(tokens) < 2 or not _TAG.fullmatch(tokens[0]) or not tokens[1].isalpha():
            sentence = "The line is not an IMAP command (a tag, a space and a command name); nothing was sent to the server."
            return self.refuse(bye(sentence) if not first else f"* BAD {sentence}\r\n".encode(), close=not first)
        tag, name = tokens[0].decode(), tokens[1].decode().upper()
        if name == "STARTTLS":
            return self.refuse(tagged(tag, "BAD", "This connection is already encrypted (implicit TLS), so STARTTLS is not offered."), close=not first)
        command = Command(tag, name)
        if name == "LOGIN" and len(tokens) >= 3:
            command.user = printable_name(tokens[2])
        elif name == "AUTHENTICATE":
            mechanism = tokens[2].decode(errors="replace").upper() if len(tokens) >= 3 else ""
            if mechanism not in MECHANISMS:
                return self.refuse(tagged(tag, "NO", "The bridge relays only the PLAIN, LOGIN and NTLM mechanisms."), close=not first)
            command.mechanism = mechanism
            if len(tokens) >= 4:  # SASL-IR
                command.initial_response = _decode_base64(tokens[3]) if tokens[3] != b"=" else b""
            self.held = True
        self.queued = command  # comes out right after its last line
        return line


# --------------------------------------------------------------------------- the server's side


class ResponseReader:
    """The server's bytes before the logon: ``Response`` lines, and the bytes of response literals."""

    def __init__(self, max_line: int = MAX_RESPONSE_LINE) -> None:
        self.max_line = max_line
        self.buffer = bytearray()
        self.literal_left = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def release(self) -> bytes:
        data, self.buffer = bytes(self.buffer), bytearray()
        return data

    def next_event(self) -> Response | bytes | None:
        """The next response line or literal piece; None when more bytes are needed. ValueError: a line too long."""
        buffer = self.buffer
        if self.literal_left:
            if not buffer:
                return None
            piece, self.literal_left = take_literal(buffer, self.literal_left)
            return piece
        end = buffer.find(b"\n")
        if end < 0 or end + 1 > self.max_line:
            if len(buffer) > self.max_line or end + 1 > self.max_line:
                raise ValueError(f"the mail server sent a line longer than {self.max_line} bytes before the logon")
            return None
        line = bytes(buffer[: end + 1])
        del buffer[: end + 1]
        match = _LITERAL.search(line)
        if match:
            self.literal_left = int(match.group(1))
        return parse_response(line)


def parse_response(line: bytes) -> Response:
    words = line.rstrip(b"\r\n").split(b" ", 3)
    first = words[0].decode(errors="replace")
    if first == "+":
        return Response("continuation", "+", "", line)
    if first == "*":
        status = words[1].decode(errors="replace").upper() if len(words) > 1 else ""
        if status.isdigit() and len(words) > 2:  # * 5 EXISTS
            status = words[2].decode(errors="replace").upper()
        return Response("untagged", "*", status, line)
    status = words[1].decode(errors="replace").upper() if len(words) > 1 else ""
    return Response("tagged", first, status, line)


def filter_capabilities(names: list[bytes]) -> list[bytes]:
    """What the bridge's front offers of what the server advertises (see the module docstring)."""
    kept = []
    for name in names:
        upper = name.upper().decode(errors="replace")
        if upper in DROPPED_CAPABILITIES:
            continue
        if upper.startswith("AUTH=") and upper[5:] not in MECHANISMS:
            continue
        kept.append(name)
    return kept


def filter_line(line: bytes, drop_code: bool = False) -> bytes:
    """A response line with its capability list (``* CAPABILITY ...`` or a ``[CAPABILITY ...]`` code)
    filtered; ``drop_code`` removes a ``[CAPABILITY ...]`` code altogether (a greeting from before an
    upstream STARTTLS describes the plain connection)."""
    match = _CAPABILITY_LINE.match(line)
    if match:
        names = filter_capabilities((match.group(2) or b"").split())
        return match.group(1) + b"".join(b" " + name for name in names) + match.group(3)
    if b"[" not in line:
        return line
    if drop_code:
        return _CAPABILITY_CODE.sub(b"", line).replace(b"  ", b" ")
    return _CAPABILITY_CODE.sub(lambda m: b"[CAPABILITY " + b" ".join(filter_capabilities(m.group(1).split())) + b"]", line)


# --------------------------------------------------------------------------- one session


@dataclass
class _Pending:
    mechanism: str  # LOGIN, or the AUTHENTICATE mechanism
    user: str | None = None
    sasl: SaslUser | None = None


class ImapWatcher:
    """One IMAP session until its logon (bridge.protocol.mail.LogonWatcher)."""

    def __init__(self, *, upstream_starttls: bool = False, max_line: int = MAX_LINE, max_literal: int = MAX_LITERAL) -> None:
        self.commands = CommandReader(max_line, max_literal)
        self.responses = ResponseReader()
        self.pending: dict[str, _Pending] = {}
        self.sasl_tag: str | None = None
        self.greeted = False
        self.drop_greeting_code = upstream_starttls
        self.stepped_aside = False

    # ---- client -> server
    def from_client(self, data: bytes) -> Step:
        if self.stepped_aside:
            return Step(to_server=data)
        step = Step()
        self.commands.buffer += data
        self._client_events(step)
        return step

    def _client_events(self, step: Step) -> None:
        to_server: list[bytes] = [step.to_server]
        to_client: list[bytes] = [step.to_client]
        for event in self.commands.events():
            if isinstance(event, bytes):
                to_server.append(event)
            elif isinstance(event, Command):
                if event.name == "LOGIN":
                    self.pending[event.tag] = _Pending("LOGIN", event.user)
                elif event.name == "AUTHENTICATE":
                    sasl = SaslUser(event.mechanism or "")
                    if event.initial_response is not None:
                        sasl.feed(event.initial_response)
                    self.pending[event.tag] = _Pending(event.mechanism or "", sasl=sasl)
                    self.sasl_tag = event.tag
            elif isinstance(event, SaslResponse):
                pending = self.pending.get(self.sasl_tag or "")
                if pending is not None and pending.sasl is not None and not event.cancel:
                    pending.sasl.feed(event.data)
            else:  # Refusal
                to_client.append(event.answer)
                if event.close:
                    step.close = True
                    step.problem = event.sentence
        step.to_server = b"".join(to_server)
        step.to_client = b"".join(to_client)

    # ---- server -> client
    def from_server(self, data: bytes) -> Step:
        if self.stepped_aside:
            return Step(to_client=data)
        step = Step()
        out: list[bytes] = []
        self.responses.feed(data)
        while not self.stepped_aside:
            try:
                event = self.responses.next_event()
            except ValueError as exc:
                out.append(bye("The mail server sent an answer the bridge cannot relay; try again later."))
                step.close, step.problem = True, str(exc)
                break
            if event is None:
                break
            if isinstance(event, bytes):
                out.append(event)
                continue
            out.append(self._response(event, step))
        if self.stepped_aside:
            out.append(self.responses.release())
        step.to_client = b"".join(out) + step.to_client
        return step

    def _response(self, response: Response, step: Step) -> bytes:
        if not self.greeted and response.kind == "untagged":
            self.greeted = True
            line = filter_line(response.wire, drop_code=self.drop_greeting_code)
            if response.status == "PREAUTH":  # already authenticated: nothing to watch
                self._step_aside(step)
            return line
        line = filter_line(response.wire)
        if response.kind == "continuation":
            if self.sasl_tag is not None:
                self.commands.allow_sasl_line()
                self._client_events(step)
            return line
        if response.kind != "tagged":
            return line
        pending = self.pending.pop(response.tag, None)
        if pending is None:
            return line
        if response.tag == self.sasl_tag:
            self.sasl_tag = None
            self.commands.end_sasl()
        user = pending.sasl.user if pending.sasl is not None else pending.user
        if response.status == "OK":
            step.logons.append(Logon(True, user, pending.mechanism))
            self._step_aside(step)
        else:
            if response.status == "NO":
                step.logons.append(Logon(False, user, pending.mechanism))
            self._client_events(step)  # lines held during the exchange go on
        return line

    def tls_started(self) -> None:
        """Never asked: the IMAPS front is TLS from the first byte (no STARTTLS step)."""

    def _step_aside(self, step: Step) -> None:
        self.stepped_aside = True
        step.to_server += self.commands.release()


# --------------------------------------------------------------------------- upstream STARTTLS

STARTTLS_TAG = "B0"


class ImapStartTls:
    """``--imap-upstream-tls starttls``: read the greeting, send STARTTLS, wait for its OK."""

    def __init__(self) -> None:
        self.reader = ResponseReader()
        self.greeting = b""

    def start(self) -> bytes:
        return b""

    def feed(self, data: bytes) -> StartTlsStep:
        self.reader.feed(data)
        while True:
            try:
                event = self.reader.next_event()
            except ValueError as exc:
                return StartTlsStep(error=str(exc))
            if event is None:
                return StartTlsStep()
            if not isinstance(event, Response):
                continue
            if not self.greeting:
                if event.status != "OK":
                    return StartTlsStep(error=f"the mail server greeted with {event.wire.strip().decode(errors='replace')!r}")
                self.greeting = event.wire
                return StartTlsStep(send=f"{STARTTLS_TAG} STARTTLS\r\n".encode())
            if event.kind == "tagged" and event.tag == STARTTLS_TAG:
                if event.status == "OK":
                    return StartTlsStep(ready=True, greeting=self.greeting)
                return StartTlsStep(error=f"the mail server refused STARTTLS ({event.wire.strip().decode(errors='replace')})")


class ImapDialect:
    """IMAP for the mail listener shell (bridge.protocol.mail.MailDialect)."""

    name = "imap"

    def watcher(self, *, upstream_starttls: bool) -> ImapWatcher:
        return ImapWatcher(upstream_starttls=upstream_starttls)

    def starttls(self) -> ImapStartTls:
        return ImapStartTls()

    def bye(self, sentence: str) -> bytes:
        return bye(sentence)
