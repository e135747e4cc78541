"""The lab's POP3 service, as Exchange 2007's Microsoft Exchange POP3 service answers on port 995.

Implicit TLS with the lab's TLS 1.0 context and certificate. Its words are Exchange's (from the
service's own strings): ``+OK The Microsoft Exchange POP3 service is ready.``; CAPA ``TOP``, ``UIDL``,
``SASL NTLM GSSAPI PLAIN``, ``USER`` (no STLS once on TLS, no PIPELINING); USER answers a bare
``+OK``, PASS ``+OK User successfully logged on.`` or ``-ERR Logon failure: unknown user name or bad
password.``; AUTH takes no initial response (``+ `` first), answers ``+OK User successfully
authenticated.``, ``-ERR Authentication failure: unknown user name or bad password.``, ``-ERR The AUTH
protocol exchange was canceled by the client.`` and ``-ERR Protocol error. 14`` for a mechanism it does
not have; bare AUTH lists the mechanisms. STAT, LIST, UIDL, TOP, RETR, DELE (this session only: the
mailbox is generated, bridge.lab.mailbox), NOOP, RSET, QUIT (``+OK Microsoft Exchange Server 2007 POP3
server signing off.``). GSSAPI is offered, as Exchange offers it, and always fails (no Kerberos here).
"""

from __future__ import annotations

import asyncio
import ssl
from base64 import b64decode, b64encode
from dataclasses import dataclass, field

from bridge.lab.mailbox import LabMailService, LineSession, MailCounters, MailLogons, MailMessage, decode_b64_text, lab_mailbox, pop3_stuffed

POP3_SASL = ("NTLM", "GSSAPI", "PLAIN")
LINE_LIMIT = 64 * 1024

GREETING = b"+OK The Microsoft Exchange POP3 service is ready.\r\n"
LOGON_OK = b"+OK User successfully logged on.\r\n"
LOGON_FAILED = b"-ERR Logon failure: unknown user name or bad password.\r\n"
AUTH_OK = b"+OK User successfully authenticated.\r\n"
AUTH_FAILED = b"-ERR Authentication failure: unknown user name or bad password.\r\n"
AUTH_CANCELLED = b"-ERR The AUTH protocol exchange was canceled by the client.\r\n"
PROTOCOL_ERROR = b"-ERR Protocol error. 14\r\n"
NOT_VALID = b"-ERR Command is not valid in this state.\r\n"
OUT_OF_RANGE = b"-ERR The specified message is out of range.\r\n"
SIGNING_OFF = b"+OK Microsoft Exchange Server 2007 POP3 server signing off.\r\n"


@dataclass
class Pop3Service(LabMailService):
    """The POP3 side of one lab: its mailbox, logons and counters."""

    logons: MailLogons
    counters: MailCounters
    mechanisms: tuple[str, ...] = POP3_SASL
    large_message: bool = True
    mailbox: tuple[MailMessage, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.mailbox = lab_mailbox(self.large_message)

    name = "pop3"

    def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Session:
        return _Session(self, reader, writer)


class _Session(LineSession):
    def __init__(self, service: Pop3Service, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.service, self.reader, self.writer = service, reader, writer
        self.user_name: str | None = None
        self.user: str | None = None
        self.deleted: set[int] = set()

    async def run(self) -> None:
        await self.send(GREETING)
        while (text := await self.line()) is not None:
            name, _, argument = text.partition(" ")
            command = name.upper()
            if command == "QUIT":
                await self.send(SIGNING_OFF)
                return
            if command == "CAPA":
                sasl = "SASL " + " ".join(self.service.mechanisms) + "\r\n" if self.user is None else ""
                await self.send(b"+OK\r\nTOP\r\nUIDL\r\n" + sasl.encode() + b"USER\r\n.\r\n")
            elif self.user is None:
                await self.authorization(command, argument)
            else:
                await self.transaction(command, argument)

    # ------------------------------------------------------------------ AUTHORIZATION state

    async def authorization(self, command: str, argument: str) -> None:
        if command == "USER" and argument:
            self.user_name = argument
            await self.send(b"+OK\r\n")
        elif command == "PASS" and self.user_name is not None:
            self.user = self.service.logons.check(self.user_name, argument)
            self.user_name = None
            await self.logon_outcome("USER", LOGON_OK if self.user else LOGON_FAILED)
        elif command == "AUTH" and not argument:
            await self.send(b"+OK\r\n" + b"".join(mechanism.encode() + b"\r\n" for mechanism in self.service.mechanisms) + b".\r\n")
        elif command == "AUTH":
            await self.auth(argument.strip().upper())
        else:
            await self.send(NOT_VALID)

    async def auth(self, mechanism: str) -> None:
        if mechanism not in self.service.mechanisms or " " in mechanism:
            await self.send(PROTOCOL_ERROR)
            return
        # LOGIN is reached only when a lab is told to offer it (Exchange's POP3 service does not).
        await self.send(b"+ VXNlcm5hbWU6\r\n" if mechanism == "LOGIN" else b"+ \r\n")
        response = await self.line()
        if response is None:
            return
        if response.strip() == "*":
            await self.send(AUTH_CANCELLED)
            return
        if mechanism == "PLAIN":
            self.user = self.service.logons.check_plain(response)
        elif mechanism == "LOGIN":
            await self.send(b"+ UGFzc3dvcmQ6\r\n")
            name, password = decode_b64_text(response), decode_b64_text(await self.line() or "")
            self.user = self.service.logons.check(name, password) if name is not None and password is not None else None
        elif mechanism == "NTLM":
            self.user = await self.ntlm_steps(response)
        await self.logon_outcome(mechanism, AUTH_OK if self.user else AUTH_FAILED)

    async def ntlm_steps(self, first: str) -> str | None:
        ntlm = self.service.logons.ntlm()
        token_text: str | None = first
        try:
            while ntlm is not None and token_text is not None:
                if token_text.strip() == "*":
                    return None
                reply = ntlm.step(b64decode(token_text.strip(), validate=True))
                if ntlm.context.complete:
                    return ntlm.user
                await self.send(b"+ " + b64encode(reply or b"") + b"\r\n")
                token_text = await self.line()
        except Exception:  # noqa: BLE001 - pyspnego raises assorted errors on bad tokens: all are a failed logon
            return None
        return None

    async def logon_outcome(self, mechanism: str, reply: bytes) -> None:
        counters = self.service.counters
        counters.count(counters.logons if self.user else counters.logon_failures, f"pop3 {mechanism}")
        await self.send(reply)

    # ------------------------------------------------------------------ TRANSACTION state

    def message(self, argument: str) -> MailMessage | None:
        try:
            number = int(argument.split()[0])
        except (ValueError, IndexError):
            return None
        mailbox = self.service.mailbox
        if not 1 <= number <= len(mailbox) or number in self.deleted:
            return None
        return mailbox[number - 1]

    def listed(self) -> list[tuple[int, MailMessage]]:
        return [(number, message) for number, message in enumerate(self.service.mailbox, 1) if number not in self.deleted]

    async def transaction(self, command: str, argument: str) -> None:
        if command == "STAT":
            listed = self.listed()
            await self.send(f"+OK {len(listed)} {sum(message.size for _, message in listed)}\r\n".encode())
        elif command in ("LIST", "UIDL"):
            value = (lambda message: str(message.size)) if command == "LIST" else (lambda message: message.uidl)
            if argument.strip():
                message = self.message(argument)
                reply = f"+OK {argument.split()[0]} {value(message)}\r\n".encode() if message else OUT_OF_RANGE
                await self.send(reply)
                return
            lines = "".join(f"{number} {value(message)}\r\n" for number, message in self.listed())
            await self.send(f"+OK\r\n{lines}.\r\n".encode())
        elif command == "RETR":
            await self.retr(argument)
        elif command == "TOP":
            await self.top(argument)
        elif command == "DELE":
            message = self.message(argument)
            if message is not None:
                self.deleted.add(int(argument.split()[0]))
            await self.send(b"+OK\r\n" if message else OUT_OF_RANGE)
        elif command == "RSET":
            self.deleted.clear()
            await self.send(b"+OK\r\n")
        elif command == "NOOP":
            await self.send(b"+OK\r\n")
        else:
            await self.send(NOT_VALID)

    async def retr(self, argument: str) -> None:
        message = self.message(argument)
        if message is None:
            await self.send(OUT_OF_RANGE)
            return
        self.writer.write(b"+OK\r\n")
        for chunk in pop3_stuffed(message):
            self.writer.write(chunk)
            await self.writer.drain()
        await self.send(b".\r\n")
        self.service.counters.count(self.service.counters.retrieved, message.uid)

    async def top(self, argument: str) -> None:
        words = argument.split()
        message = self.message(argument)
        if message is None or len(words) != 2 or not words[1].isdigit():
            await self.send(OUT_OF_RANGE if message is None else PROTOCOL_ERROR)
            return
        wanted, taken, body, head_done = int(words[1]), b"", 0, False
        for chunk in pop3_stuffed(message):
            for line in chunk.splitlines(keepends=True):
                if head_done:
                    if body >= wanted:
                        break
                    body += 1
                elif line == b"\r\n":
                    head_done = True
                taken += line
            if head_done and body >= wanted:
                break
        await self.send(b"+OK\r\n" + taken + b".\r\n")


async def start_pop3(service: Pop3Service, host: str, port: int, context: ssl.SSLContext) -> asyncio.Server:
    """Listen with implicit TLS (995-style)."""
    return await asyncio.start_server(service.handle, host, port, ssl=context, limit=LINE_LIMIT)
