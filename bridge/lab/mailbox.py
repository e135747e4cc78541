"""The lab's mail: one deterministic mailbox every lab user owns, the logons the mail services accept
(PLAIN, LOGIN, NTLM through pyspnego as the HTTP side does), and what those services counted.

Shared by the lab's POP3, SMTP and IMAP services. Every message is generated, never stored: the same
bytes on every run and every machine, so tests compare sizes and SHA-256 digests. The messages are
chosen for what they exercise: plain text, lines starting with dots (POP3 and SMTP dot-stuffing, a
lone "." line inside the body), 8-bit UTF-8, a small attachment, and one of about 25 MB (a base64
attachment) that must stream at full speed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import functools
import hashlib
import os
import random
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import spnego

LARGE_ATTACHMENT_BYTES = 18_400_000  # base64 with CRLF every 76 characters: about 25 MB on the wire
SMALL_ATTACHMENT_BYTES = 96 * 1024
BASE64_LINE_RAW = 57  # raw bytes per 76-character base64 line
BLOCK_LINES = 1149  # 65,493 raw bytes: whole base64 lines per generated block
MAILBOX_ADDRESS = "mailbox@lab.test"


@dataclass(frozen=True)
class MailMessage:
    uid: int  # IMAP UID, POP3 message number in the listing order
    subject: str
    kind: str  # text | dots | utf8 | attachment
    internal_date: dt.datetime
    flags: tuple[str, ...] = ()
    attachment_bytes: int = 0

    @property
    def uidl(self) -> str:
        """The POP3 unique id (Exchange's are opaque base64 strings too)."""
        return base64.b64encode(f"lab-message-{self.uid:04d}".encode()).decode().rstrip("=")

    def chunks(self) -> Iterator[bytes]:
        """The message (RFC 5322, CRLF line ends), in pieces that each end at a line end."""
        yield self._head()
        yield from _BODIES[self.kind](self)

    def data(self) -> bytes:
        return b"".join(self.chunks())

    @property
    def size(self) -> int:
        return _measure(self)[0]

    @property
    def sha256(self) -> str:
        return _measure(self)[1]

    def _head(self) -> bytes:
        date = self.internal_date.strftime("%a, %d %b %Y %H:%M:%S +0000")
        content_type = {
            "attachment": 'multipart/mixed; boundary="lab-boundary"',
            "utf8": 'text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 8bit',
        }.get(self.kind, 'text/plain; charset="us-ascii"')
        subject = self.subject if self.subject.isascii() else "=?utf-8?b?" + base64.b64encode(self.subject.encode()).decode() + "?="
        lines = [
            "From: Lab Sender <sender@lab.test>",
            f"To: Lab Mailbox <{MAILBOX_ADDRESS}>",
            f"Subject: {subject}",
            f"Date: {date}",
            f"Message-ID: <lab-{self.uid:04d}@exch2007.lab.test>",
            "MIME-Version: 1.0",
            f"Content-Type: {content_type}",
            "",
            "",
        ]
        return "\r\n".join(lines).encode()


@functools.lru_cache(maxsize=32)
def _measure(message: MailMessage) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    for chunk in message.chunks():
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _text_body(message: MailMessage) -> Iterator[bytes]:
    yield (f"Hello from the Exchange 2007 lab.\r\nThis is message {message.uid}.\r\n").encode()


def _dots_body(message: MailMessage) -> Iterator[bytes]:
    yield b".starts with a dot\r\n..starts with two\r\n.\r\nthe line above is a lone dot\r\n. \r\nend\r\n"


def _utf8_body(message: MailMessage) -> Iterator[bytes]:
    yield "Grüße aus dem Labor: ½ € ✓\r\n".encode()


def _attachment_body(message: MailMessage) -> Iterator[bytes]:
    yield b'--lab-boundary\r\nContent-Type: text/plain; charset="us-ascii"\r\n\r\nThe attachment follows.\r\n'
    yield f'--lab-boundary\r\nContent-Type: application/octet-stream; name="lab-{message.uid}.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n'.encode()
    yield from base64_lines(message.attachment_bytes, seed=message.uid)
    yield b"--lab-boundary--\r\n"


_BODIES = {"text": _text_body, "dots": _dots_body, "utf8": _utf8_body, "attachment": _attachment_body}


@functools.lru_cache(maxsize=4)
def _filler(seed: int) -> bytes:
    return random.Random(seed).randbytes(BASE64_LINE_RAW * BLOCK_LINES - 8)


def base64_lines(size: int, seed: int) -> Iterator[bytes]:
    """``size`` deterministic bytes (an 8-byte block index, then seeded filler) as base64 lines of 76
    characters with CRLF, in blocks of whole lines."""
    filler, block = _filler(seed), BASE64_LINE_RAW * BLOCK_LINES
    for index, start in enumerate(range(0, size, block)):
        raw = (index.to_bytes(8, "big") + filler)[: min(block, size - start)]
        yield base64.encodebytes(raw).replace(b"\n", b"\r\n")


def _date(day: int) -> dt.datetime:
    return dt.datetime(2025, 1, day, 9, 30, tzinfo=dt.UTC)


def lab_mailbox(large: bool = True) -> tuple[MailMessage, ...]:
    """Every lab user's mailbox, oldest first; ``large=False`` leaves out the 25 MB message."""
    messages = [
        MailMessage(1, "Welcome to the lab", "text", _date(2), ("\\Seen",)),
        MailMessage(2, "Dots at the start of lines", "dots", _date(3)),
        MailMessage(3, "Grüße: 8-bit UTF-8", "utf8", _date(4), ("\\Seen", "\\Flagged")),
        MailMessage(4, "A small attachment", "attachment", _date(5), attachment_bytes=SMALL_ATTACHMENT_BYTES),
    ]
    if large:
        messages.append(MailMessage(5, "A 25 MB attachment", "attachment", _date(6), attachment_bytes=LARGE_ATTACHMENT_BYTES))
    return tuple(messages)


def pop3_stuffed(message: MailMessage) -> Iterator[bytes]:
    """The message dot-stuffed for a POP3 multi-line reply (RFC 1939 3), without the final ".\\r\\n"."""
    for chunk in message.chunks():
        stuffed = chunk.replace(b"\r\n.", b"\r\n..")
        yield b"." + stuffed if stuffed.startswith(b".") else stuffed


# --------------------------------------------------------------------------- logons and counters


@dataclass
class MailCounters:
    """What the lab's mail services saw. Mutated on the lab's loop; plain reads from other threads are fine."""

    connections: dict[str, int] = field(default_factory=dict)  # service -> connections (pop3, smtp, submission)
    logons: dict[str, int] = field(default_factory=dict)  # "pop3 PLAIN" -> successes
    logon_failures: dict[str, int] = field(default_factory=dict)
    retrieved: dict[int, int] = field(default_factory=dict)  # uid -> whole messages sent (POP3 RETR)
    received: list[dict[str, Any]] = field(default_factory=list)  # SMTP: mail_from, rcpt_to, size, sha256, user, via, service

    def count(self, tally: dict[Any, int], key: Any) -> None:
        tally[key] = tally.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "connections": dict(self.connections),
            "logons": dict(self.logons),
            "logon_failures": dict(self.logon_failures),
            "retrieved": dict(self.retrieved),
            "received": [dict(entry) for entry in self.received],
        }


class NtlmLogon:
    """One NTLM handshake on one connection: pyspnego's acceptor against the lab's NTLM user file."""

    def __init__(self, user_file: Path) -> None:
        self.user_file = user_file
        self._select()
        self.context = spnego.server(protocol="ntlm")

    def step(self, token: bytes) -> bytes | None:
        """The next challenge (None when done); raises on a bad token or wrong password."""
        self._select()
        return self.context.step(token)

    @property
    def user(self) -> str | None:
        return (self.context.client_principal or "unknown") if self.context.complete else None

    def _select(self) -> None:
        # pyspnego reads the store named by the environment at each step (several labs share a process).
        os.environ["NTLM_USER_FILE"] = str(self.user_file)


@dataclass
class MailLogons:
    """Who may open the mailbox: ``passwords`` maps every accepted name, lower case (alice, LAB\\alice,
    alice@lab.test), to (logon name, password); NTLM goes through the lab's pyspnego user file."""

    passwords: dict[str, tuple[str, str]]
    ntlm_user_file: Path | None = None

    def check(self, name: str, password: str) -> str | None:
        """The logon name for a right password, else None."""
        entry = self.passwords.get(name.lower())
        return entry[0] if entry is not None and entry[1] == password else None

    def check_plain(self, b64: str) -> str | None:
        """A PLAIN response (``authzid NUL authcid NUL password``) checked; an authzid other than the user is refused."""
        try:
            raw = base64.b64decode(b64.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        parts = raw.split("\x00")
        if len(parts) != 3:
            return None
        authzid, authcid, password = parts
        user = self.check(authcid, password)
        if user is None or (authzid and self.check(authzid, password) != user):
            return None
        return user

    def ntlm(self) -> NtlmLogon | None:
        return NtlmLogon(self.ntlm_user_file) if self.ntlm_user_file is not None else None


# --------------------------------------------------------------------------- what the POP3 and SMTP services share


class LabMailService:
    """A lab mail listener's connections: each one counted under ``name``, served by ``session(reader,
    writer).run()``; ``close_connections`` drops them all, like a server going down."""

    counters: MailCounters

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def writers(self) -> set[asyncio.StreamWriter]:
        return self.__dict__.setdefault("_writers", set())  # made on first use: the subclasses are dataclasses

    def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        raise NotImplementedError

    def close_connections(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        self.counters.count(self.counters.connections, self.name)
        try:
            await self.session(reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ssl.SSLError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()


class LineSession:
    """One connection of a lab mail service: ``send`` and ``line`` (latin-1 text without its CRLF, None at the end)."""

    reader: Any  # asyncio.StreamReader or anything with the same readline()
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self) -> str | None:
        raw = await self.reader.readline()
        return raw.rstrip(b"\r\n").decode("latin-1") if raw else None


def decode_b64_text(b64: str) -> str | None:
    try:
        return base64.b64decode(b64.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
