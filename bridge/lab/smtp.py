"""The lab's SMTP submission service, as Exchange 2007's client receive connector answers.

Two shapes: implicit TLS (465-style, ``--smtp-port``) and STARTTLS (587-style, ``--submission-port``),
both with the lab's TLS 1.0 context. Exchange's words: ``220 <host> Microsoft ESMTP MAIL Service ready
at <date>``; EHLO ``250-<host> Hello [<ip>]``, SIZE, PIPELINING, DSN, ENHANCEDSTATUSCODES, STARTTLS
(587 before TLS), ``AUTH GSSAPI NTLM`` before TLS and ``AUTH GSSAPI NTLM LOGIN`` after it (Basic
authentication is offered only over TLS), 8BITMIME, BINARYMIME, CHUNKING; ``220 2.0.0 SMTP server
ready``; ``334 VXNlcm5hbWU6``/``334 UGFzc3dvcmQ6``, ``334 NTLM supported``; ``235 2.7.0 Authentication
successful``, ``535 5.7.3 Authentication unsuccessful``; ``530 5.7.1 Client was not authenticated`` for
mail before the logon; ``250 2.1.0 Sender OK``, ``250 2.1.5 Recipient OK``, ``354 Start mail input; end
with <CRLF>.<CRLF>``, ``250 2.6.0 <id> Queued mail for delivery``, ``221 2.0.0 Service closing
transmission channel``.

Messages (DATA, dot-stuffing undone, or BDAT chunks) are read as they stream, never kept: each is
recorded in the counters with its envelope, size and SHA-256, so a test compares what it sent. SIZE is
35 MiB by default (Exchange 2007 ships with 10 MB; migrations raise it), and a larger message is refused
with ``552 5.3.4 Message size exceeds fixed maximum message size``. The lab was written on asyncio
streams rather than on aiosmtpd: aiosmtpd has no BDAT/CHUNKING (which Exchange advertises), answers in
its own words, needs a patch for STARTTLS on Python 3.11 (it drives asyncio's private SSL protocol), and
would be a new dependency of the package for the lab alone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ssl
from base64 import b64decode, b64encode
from dataclasses import dataclass
from typing import Any

from bridge.lab.mailbox import LabMailService, LineSession, MailCounters, MailLogons, decode_b64_text

SMTP_AUTH_AFTER_TLS = ("GSSAPI", "NTLM", "LOGIN")
SMTP_AUTH_BEFORE_TLS = ("GSSAPI", "NTLM")
DEFAULT_MAX_SIZE = 35 * 1024 * 1024
LINE_LIMIT = 64 * 1024
READ_SIZE = 256 * 1024

STARTTLS_READY = b"220 2.0.0 SMTP server ready\r\n"
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
AUTH_FAILED = b"535 5.7.3 Authentication unsuccessful\r\n"
AUTH_CANCELLED = b"501 5.7.0 Authentication cancelled\r\n"
AUTH_UNRECOGNIZED = b"504 5.7.4 Unrecognized authentication type\r\n"
NOT_AUTHENTICATED = b"530 5.7.1 Client was not authenticated\r\n"
UNRECOGNIZED = b"500 5.3.3 Unrecognized command\r\n"
SEND_HELLO = b"503 5.5.2 Send hello first\r\n"
TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
CLOSING = b"221 2.0.0 Service closing transmission channel\r\n"


def exchange_date(now: dt.datetime) -> str:
    """Exchange's greeting date: ``Mon, 2 Jun 2025 10:00:00 +0000`` (day without a leading zero)."""
    return f"{now:%a}, {now.day} {now:%b %Y %H:%M:%S} +0000"


@dataclass
class SmtpService(LabMailService):
    """The SMTP side of one lab: ``starttls`` True for the 587 shape, False for 465 (TLS from the start)."""

    hostname: str
    logons: MailLogons
    counters: MailCounters
    context: ssl.SSLContext
    starttls: bool
    mechanisms: tuple[str, ...] = SMTP_AUTH_AFTER_TLS
    max_size: int = DEFAULT_MAX_SIZE

    @property
    def name(self) -> str:
        return "submission" if self.starttls else "smtp"

    def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Session:
        return _Session(self, reader, writer)


class _Input:
    """The client's bytes: lines for commands, exact counts for BDAT, a scan for DATA's end; what a read
    brought beyond that stays here for the next command (pipelining)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buffer = b""

    async def more(self) -> bytes:
        data = await self.reader.read(READ_SIZE)
        if not data:
            raise ConnectionError("the client closed the connection")
        return data

    async def readline(self) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > LINE_LIMIT:
                raise ValueError("line too long")
            try:
                self.buffer += await self.more()
            except ConnectionError:
                rest, self.buffer = self.buffer, b""
                return rest
        line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
        return line

    async def read(self, limit: int) -> bytes:
        if not self.buffer:
            self.buffer = await self.more()
        data, self.buffer = self.buffer[:limit], self.buffer[limit:]
        return data


class _Session(LineSession):
    def __init__(self, service: SmtpService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.service, self.reader, self.writer = service, _Input(reader), writer
        self.tls = not service.starttls
        self.greeted = False
        self.user: str | None = None
        self.mail_from: str | None = None
        self.rcpt_to: list[str] = []
        self.chunks: Any = None  # hashlib object while BDAT chunks arrive
        self.chunk_size = 0
        self.queued = 0

    def peer(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return peer[0] if peer else "unknown"

    async def run(self) -> None:
        now = dt.datetime.now(dt.UTC)
        await self.send(f"220 {self.service.hostname} Microsoft ESMTP MAIL Service ready at {exchange_date(now)}\r\n".encode())
        while (text := await self.line()) is not None:
            name, _, argument = text.partition(" ")
            command = name.upper()
            handler = getattr(self, f"do_{command.lower()}", None) if command.isalpha() else None
            if handler is None:
                await self.send(UNRECOGNIZED)
                continue
            if await handler(argument.strip()) is False:
                return

    # ------------------------------------------------------------------ session

    def mechanisms(self) -> tuple[str, ...]:
        if self.tls:
            return self.service.mechanisms
        return tuple(mechanism for mechanism in self.service.mechanisms if mechanism in SMTP_AUTH_BEFORE_TLS)

    async def do_ehlo(self, argument: str) -> None:
        if not argument:
            await self.send(b"501 5.5.4 Invalid domain name\r\n")
            return
        self.greeted = True
        self.reset()
        lines = [f"{self.service.hostname} Hello [{self.peer()}]", f"SIZE {self.service.max_size}", "PIPELINING", "DSN", "ENHANCEDSTATUSCODES"]
        if not self.tls:
            lines.append("STARTTLS")
        if self.mechanisms() and self.user is None:
            lines.append("AUTH " + " ".join(self.mechanisms()))
        lines += ["8BITMIME", "BINARYMIME", "CHUNKING"]
        await self.send(b"".join(f"250{' ' if index == len(lines) - 1 else '-'}{line}\r\n".encode() for index, line in enumerate(lines)))

    async def do_helo(self, argument: str) -> None:
        self.greeted = True
        self.reset()
        await self.send(f"250 {self.service.hostname} Hello [{self.peer()}]\r\n".encode())

    async def do_starttls(self, argument: str) -> None:
        if self.tls:
            await self.send(UNRECOGNIZED)
            return
        await self.send(STARTTLS_READY)
        self.reader.buffer = b""  # anything sent before the handshake is discarded (STARTTLS command injection)
        await self.writer.start_tls(self.service.context)
        self.tls, self.greeted = True, False
        self.reset()

    async def do_noop(self, argument: str) -> None:
        await self.send(b"250 2.0.0 OK\r\n")

    async def do_rset(self, argument: str) -> None:
        self.reset()
        await self.send(b"250 2.0.0 Resetting\r\n")

    async def do_quit(self, argument: str) -> bool:
        await self.send(CLOSING)
        return False

    def reset(self) -> None:
        self.mail_from, self.rcpt_to, self.chunks, self.chunk_size = None, [], None, 0

    # ------------------------------------------------------------------ AUTH

    async def do_auth(self, argument: str) -> None:
        if not self.greeted:
            await self.send(SEND_HELLO)
            return
        if self.user is not None:
            await self.send(b"503 5.5.2 Already authenticated\r\n")
            return
        mechanism, _, initial = argument.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if mechanism not in self.mechanisms():
            await self.send(AUTH_UNRECOGNIZED)
            return
        user: str | None = None
        if mechanism == "PLAIN":
            response = initial or await self.challenge(b"334 \r\n")
            if response is None:
                return
            user = self.service.logons.check_plain(response)
        elif mechanism == "LOGIN":
            name = initial or await self.challenge(b"334 VXNlcm5hbWU6\r\n")
            password = None if name is None else await self.challenge(b"334 UGFzc3dvcmQ6\r\n")
            if name is None or password is None:
                return
            decoded_name, decoded_password = decode_b64_text(name), decode_b64_text(password)
            user = self.service.logons.check(decoded_name, decoded_password) if decoded_name is not None and decoded_password is not None else None
        elif mechanism == "NTLM":
            user = await self.ntlm(initial)
        else:  # GSSAPI: offered as Exchange offers it; no Kerberos in the lab
            if await self.challenge(b"334 \r\n") is None:
                return
        if user == "":
            return  # cancelled: already answered
        self.user = user
        counters = self.service.counters
        counters.count(counters.logons if user else counters.logon_failures, f"{self.service.name} {mechanism}")
        await self.send(AUTH_OK if user else AUTH_FAILED)

    async def challenge(self, prompt: bytes) -> str | None:
        """The client's answer to one 334; None after a cancel (answered here) or a closed connection."""
        await self.send(prompt)
        response = await self.line()
        if response is not None and response.strip() == "*":
            await self.send(AUTH_CANCELLED)
            return None
        return response

    async def ntlm(self, initial: str) -> str | None:
        ntlm = self.service.logons.ntlm()
        if ntlm is None:
            return None
        token = initial or await self.challenge(b"334 NTLM supported\r\n")
        try:
            while token is not None:
                reply = ntlm.step(b64decode(token.strip(), validate=True))
                if ntlm.context.complete:
                    return ntlm.user
                token = await self.challenge(b"334 " + b64encode(reply or b"") + b"\r\n")
        except Exception:  # noqa: BLE001 - pyspnego raises assorted errors on bad tokens: all are a failed logon
            return None
        return ""

    # ------------------------------------------------------------------ mail

    async def do_mail(self, argument: str) -> None:
        if not self.greeted:
            await self.send(SEND_HELLO)
        elif self.user is None:
            await self.send(NOT_AUTHENTICATED)
        elif self.mail_from is not None:
            await self.send(b"503 5.5.2 Sender already specified\r\n")
        elif not argument.upper().startswith("FROM:"):
            await self.send(b"501 5.5.4 Invalid arguments\r\n")
        else:
            address, _, parameters = argument[5:].strip().partition(" ")
            declared = next((int(word[5:]) for word in parameters.upper().split() if word.startswith("SIZE=") and word[5:].isdigit()), 0)
            if declared > self.service.max_size:
                await self.send(TOO_BIG)
                return
            self.mail_from = address.strip("<>")
            await self.send(b"250 2.1.0 Sender OK\r\n")

    async def do_rcpt(self, argument: str) -> None:
        if self.user is None:
            await self.send(NOT_AUTHENTICATED)
        elif self.mail_from is None:
            await self.send(b"503 5.5.2 Need mail command\r\n")
        elif not argument.upper().startswith("TO:"):
            await self.send(b"501 5.5.4 Invalid arguments\r\n")
        else:
            self.rcpt_to.append(argument[3:].strip().strip("<>"))
            await self.send(b"250 2.1.5 Recipient OK\r\n")

    def ready_for_data(self) -> bytes | None:
        if self.user is None:
            return NOT_AUTHENTICATED
        if self.mail_from is None:
            return b"503 5.5.2 Need mail command\r\n"
        if not self.rcpt_to:
            return b"503 5.5.2 Need rcpt command\r\n"
        return None

    async def do_data(self, argument: str) -> None:
        refusal = self.ready_for_data()
        if refusal is not None:
            await self.send(refusal)
            return
        await self.send(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n")
        digest, size = hashlib.sha256(), 0
        buffer, first = b"\r\n", True  # every line is preceded by a CRLF: the terminator is \r\n.\r\n
        while True:
            end = buffer.find(b"\r\n.\r\n")
            part_end = end + 2 if end >= 0 else buffer.rfind(b"\r\n")
            if part_end > 0:
                part = buffer[:part_end].replace(b"\r\n..", b"\r\n.")
                if first:
                    part, first = part[2:], False
                digest.update(part)
                size += len(part)
                buffer = buffer[end + 5 :] if end >= 0 else buffer[part_end:]
            if end >= 0:
                break
            if self.reader.buffer:
                buffer, self.reader.buffer = buffer + self.reader.buffer, b""
            else:
                buffer += await self.reader.more()
        self.reader.buffer = buffer + self.reader.buffer  # commands pipelined after the body
        await self.queue(digest.hexdigest(), size, "DATA")

    async def do_bdat(self, argument: str) -> None:
        words = argument.split()
        if not words or not words[0].isdigit() or len(words) > 2 or (len(words) == 2 and words[1].upper() != "LAST"):
            await self.send(b"501 5.5.4 Invalid arguments\r\n")
            return
        size, last = int(words[0]), len(words) == 2
        refusal = self.ready_for_data()
        remaining = size
        if self.chunks is None and refusal is None:
            self.chunks, self.chunk_size = hashlib.sha256(), 0
        while remaining:
            data = await self.reader.read(min(remaining, READ_SIZE))
            remaining -= len(data)
            if refusal is None:
                self.chunks.update(data)
        if refusal is not None:
            await self.send(refusal)
            return
        self.chunk_size += size
        if not last:
            await self.send(f"250 2.0.0 {size} octets received\r\n".encode())
            return
        await self.queue(self.chunks.hexdigest(), self.chunk_size, "BDAT")

    async def queue(self, sha256: str, size: int, via: str) -> None:
        if size > self.service.max_size:
            self.reset()
            await self.send(TOO_BIG)
            return
        self.queued += 1
        self.service.counters.received.append({"mail_from": self.mail_from, "rcpt_to": list(self.rcpt_to), "size": size, "sha256": sha256, "user": self.user, "via": via, "service": self.service.name})
        self.reset()
        await self.send(f"250 2.6.0 <lab-{len(self.service.counters.received):06d}@{self.service.hostname}> Queued mail for delivery\r\n".encode())


async def start_smtp(service: SmtpService, host: str, port: int) -> asyncio.Server:
    """Listen: TLS from the first byte for the 465 shape, plain with STARTTLS for 587."""
    return await asyncio.start_server(service.handle, host, port, ssl=None if service.starttls else service.context, limit=LINE_LIMIT)
