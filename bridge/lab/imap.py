"""The lab's IMAP4 service, as Exchange 2007's Microsoft Exchange IMAP4 service greets and answers.

TLS 1.0 only from the first byte (993-style implicit TLS, the lab's certificate and cipher shape), or
``starttls`` (143-style: STARTTLS and LOGINDISABLED advertised before TLS, as Exchange does when
plain-text logons need TLS). Exchange's wording: ``* OK The Microsoft Exchange IMAP4 service is
ready.``, ``* CAPABILITY IMAP4 IMAP4rev1 AUTH=NTLM AUTH=GSSAPI AUTH=PLAIN IDLE NAMESPACE LITERAL+``,
``NO LOGIN failed.``, ``NO AUTHENTICATE failed.``. It takes LOGIN, AUTHENTICATE PLAIN, LOGIN and NTLM
(pyspnego's acceptor over the lab's NTLM user file, as the HTTP side), then LIST, LSUB, NAMESPACE,
SELECT/EXAMINE INBOX, FETCH and UID FETCH (BODY[], BODY.PEEK[], RFC822, RFC822.SIZE, UID, FLAGS),
IDLE, NOOP, CLOSE and LOGOUT. The mailbox (``mailbox_messages``) is generated and the same in every
lab and test: small messages and one of 25 MB. ``ImapCounters`` record what reached the service.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import os
import random
import re
import ssl
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import spnego

from bridge.protocol.imap import command_tokens

log = logging.getLogger("bridge.lab.imap")

GREETING = b"* OK The Microsoft Exchange IMAP4 service is ready.\r\n"
CAPABILITIES = "IMAP4 IMAP4rev1 AUTH=NTLM AUTH=GSSAPI AUTH=PLAIN IDLE NAMESPACE LITERAL+"
CAPABILITIES_BEFORE_TLS = "IMAP4 IMAP4rev1 LOGINDISABLED STARTTLS IDLE NAMESPACE LITERAL+"
LARGE_MESSAGE_SIZE = 25 * 1024 * 1024
SMALL_MESSAGES = 4
LINE_LIMIT = 1024 * 1024
UIDVALIDITY = 14
FLAGS = r"(\Seen \Answered \Flagged \Deleted \Draft $MDNSent)"
_LITERAL = re.compile(rb"\{(\d+)(\+?)\}\r?\n\Z")


# --------------------------------------------------------------------------- the mailbox


def _message(index: int, body_bytes: int) -> bytes:
    rng = random.Random(f"lab-imap-{index}")
    subject = "Quarterly numbers" if body_bytes < 1024 * 1024 else "Scanned contract (large attachment)"
    head = (
        f"From: Bob <bob@lab.test>\r\nTo: Alice <alice@lab.test>\r\nSubject: {subject} #{index}\r\n"
        f"Date: Mon, 3 Mar 2008 09:{index:02d}:00 +0000\r\nMessage-ID: <lab-{index}@exch2007.lab.local>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    raw = rng.randbytes(body_bytes * 3 // 4)
    body = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return head + body


@functools.cache
def mailbox_messages() -> tuple[bytes, ...]:
    """INBOX: small messages (a few KiB to 200 KiB) and, last, one of 25 MB; sequence number = UID = index + 1."""
    sizes = [2_000, 40_000, 200_000, 9_000][:SMALL_MESSAGES] + [LARGE_MESSAGE_SIZE]
    return tuple(_message(index + 1, size) for index, size in enumerate(sizes))


# --------------------------------------------------------------------------- the service


@dataclass
class ImapCounters:
    """What reached the lab's IMAP service (read from other threads as plain values)."""

    connections: int = 0
    commands: Counter = field(default_factory=Counter)  # command name -> count
    logons: Counter = field(default_factory=Counter)  # "LOGIN ok", "NTLM failed", ...
    fetched_bytes: int = 0
    idles: int = 0
    longest_line: int = 0


class ImapLab:
    """The IMAP4 listener of a lab."""

    def __init__(self, accounts: dict[str, tuple[str, str]], ntlm_user_file: Path | None, tls_context: ssl.SSLContext, starttls: bool = False) -> None:
        self.accounts = accounts  # lower-case alias -> (logon name, password)
        self.ntlm_user_file = ntlm_user_file
        self.tls_context = tls_context
        self.starttls = starttls
        self.counters = ImapCounters()
        self.server: asyncio.Server | None = None
        self.sessions: set[asyncio.Task] = set()

    async def listen(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self.serve, host, port, ssl=None if self.starttls else self.tls_context, limit=LINE_LIMIT, reuse_address=True)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.sessions):
            task.cancel()
        await asyncio.gather(*self.sessions, return_exceptions=True)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        self.counters.connections += 1
        try:
            await ImapLabSession(self, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ssl.SSLError):
            pass
        finally:
            self.sessions.discard(task)
            writer.close()


class ImapLabSession:
    def __init__(self, lab: ImapLab, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.lab = lab
        self.reader = reader
        self.writer = writer
        self.tls = not lab.starttls
        self.user: str | None = None
        self.selected = False

    async def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)
        await self.writer.drain()

    async def line(self) -> bytes:
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("client closed")
        self.lab.counters.longest_line = max(self.lab.counters.longest_line, len(line))
        return line

    async def command(self) -> list[bytes]:
        """One command's tokens, literals read (a synchronising literal is asked for with "+")."""
        parts: list[tuple[bool, bytes]] = []
        while True:
            line = await self.line()
            parts.append((False, line))
            match = _LITERAL.search(line)
            if not match:
                return command_tokens(parts)
            if not match.group(2):
                await self.send(b"+ Ready for additional command text.\r\n")
            parts.append((True, await self.reader.readexactly(int(match.group(1)))))

    async def run(self) -> None:
        await self.send(GREETING)
        while True:
            tokens = await self.command()
            if len(tokens) < 2:
                await self.send(b"* BAD Command Error. 10\r\n")
                continue
            tag, name, arguments = tokens[0].decode(errors="replace"), tokens[1].decode(errors="replace").upper(), tokens[2:]
            if name == "UID" and arguments:
                name, arguments = "UID " + arguments[0].decode(errors="replace").upper(), arguments[1:]
            self.lab.counters.commands[name] += 1
            handler = getattr(self, "do_" + name.replace(" ", "_").lower(), None)
            if handler is None:
                await self.send(f"{tag} BAD Command Error. 12\r\n")
                continue
            if await handler(tag, arguments) is False:
                return

    # ---- any state
    async def do_capability(self, tag: str, arguments: list[bytes]) -> None:
        await self.send(f"* CAPABILITY {CAPABILITIES if self.tls else CAPABILITIES_BEFORE_TLS}\r\n{tag} OK CAPABILITY completed.\r\n")

    async def do_noop(self, tag: str, arguments: list[bytes]) -> None:
        await self.send(f"{tag} OK NOOP completed.\r\n")

    async def do_logout(self, tag: str, arguments: list[bytes]) -> bool:
        await self.send(f"* BYE Microsoft Exchange Server 2007 IMAP4 server signing off.\r\n{tag} OK LOGOUT completed.\r\n")
        return False

    async def do_starttls(self, tag: str, arguments: list[bytes]) -> None:
        if self.tls:
            await self.send(f"{tag} BAD Command received in Invalid state.\r\n")
            return
        await self.send(f"{tag} OK Begin TLS negotiation now.\r\n")
        await self.writer.start_tls(self.lab.tls_context)
        self.tls = True

    # ---- logons
    async def do_login(self, tag: str, arguments: list[bytes]) -> None:
        if self.user is not None:
            await self.send(f"{tag} BAD Command received in Invalid state.\r\n")
            return
        if not self.tls:
            await self.send(f"{tag} NO LOGIN failed.\r\n")  # LOGINDISABLED
            return
        if len(arguments) != 2:
            await self.send(f"{tag} BAD Command Argument Error. 11\r\n")
            return
        await self.finish_logon(tag, "LOGIN", self.check(arguments[0], arguments[1]))

    def check(self, name: bytes, password: bytes) -> str | None:
        account = self.lab.accounts.get(name.decode(errors="replace").lower())
        if account is None or account[1] != password.decode(errors="replace"):
            return None
        return account[0]

    async def finish_logon(self, tag: str, command_or_mechanism: str, user: str | None) -> None:
        verb = "LOGIN" if command_or_mechanism == "LOGIN" else "AUTHENTICATE"
        self.lab.counters.logons[f"{command_or_mechanism} {'ok' if user else 'failed'}"] += 1
        if user is None:
            await self.send(f"{tag} NO {verb} failed.\r\n")
            return
        self.user = user
        await self.send(f"{tag} OK {verb} completed.\r\n")

    async def sasl_response(self, tag: str, challenge: bytes = b"") -> bytes | None:
        """The client's answer to a "+ challenge"; None when it cancelled or sent no base64 (answered)."""
        await self.send(b"+ " + base64.b64encode(challenge) + b"\r\n")
        line = (await self.line()).rstrip(b"\r\n")
        if line == b"*":
            await self.send(f"{tag} BAD AUTHENTICATE cancelled.\r\n")
            return None
        try:
            return base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            await self.send(f"{tag} BAD Command Argument Error. 11\r\n")
            return None

    async def do_authenticate(self, tag: str, arguments: list[bytes]) -> None:
        mechanism = arguments[0].decode(errors="replace").upper() if arguments else ""
        if self.user is not None or not self.tls:
            await self.send(f"{tag} BAD Command received in Invalid state.\r\n")
            return
        if mechanism == "PLAIN":
            response = await self.sasl_response(tag)
            if response is None:
                return
            parts = response.split(b"\x00")
            await self.finish_logon(tag, "PLAIN", self.check(parts[1], parts[2]) if len(parts) == 3 else None)
        elif mechanism == "LOGIN":
            name = await self.sasl_response(tag, b"Username:")
            password = None if name is None else await self.sasl_response(tag, b"Password:")
            if name is not None and password is not None:
                await self.finish_logon(tag, "LOGIN", self.check(name, password))
        elif mechanism == "NTLM":
            await self.ntlm(tag)
        else:
            await self.send(f"{tag} NO The requested authentication mechanism is not supported.\r\n")

    async def ntlm(self, tag: str) -> None:
        if self.lab.ntlm_user_file is None:
            await self.send(f"{tag} NO The requested authentication mechanism is not supported.\r\n")
            return
        os.environ["NTLM_USER_FILE"] = str(self.lab.ntlm_user_file)  # as the HTTP side: pyspnego reads it at each step
        context = spnego.server(protocol="ntlm")
        token = await self.sasl_response(tag)
        try:
            while token is not None:
                reply = context.step(token)
                if context.complete:
                    await self.finish_logon(tag, "NTLM", context.client_principal or "unknown")
                    return
                token = await self.sasl_response(tag, reply or b"")
        except Exception:  # noqa: BLE001 - pyspnego raises assorted errors for a wrong password or a bad token: all are a failed logon
            await self.finish_logon(tag, "NTLM", None)

    # ---- the mailbox
    async def authenticated(self, tag: str) -> bool:
        if self.user is None:
            await self.send(f"{tag} BAD Command received in Invalid state.\r\n")
            return False
        return True

    async def do_namespace(self, tag: str, arguments: list[bytes]) -> None:
        if await self.authenticated(tag):
            await self.send(f'* NAMESPACE (("" "/")) NIL NIL\r\n{tag} OK NAMESPACE completed.\r\n')

    async def do_list(self, tag: str, arguments: list[bytes]) -> None:
        if not await self.authenticated(tag):
            return
        if len(arguments) >= 2 and arguments[1] == b"":
            await self.send(f'* LIST (\\Noselect) "/" ""\r\n{tag} OK LIST completed.\r\n')
            return
        folders = ["INBOX", "Calendar", "Contacts", "Deleted Items", "Drafts", "Sent Items"]
        await self.send("".join(f'* LIST (\\HasNoChildren) "/" {folder if " " not in folder else chr(34) + folder + chr(34)}\r\n' for folder in folders) + f"{tag} OK LIST completed.\r\n")

    do_lsub = do_list

    async def do_select(self, tag: str, arguments: list[bytes], verb: str = "SELECT") -> None:
        if not await self.authenticated(tag):
            return
        if not arguments or arguments[0].upper() != b"INBOX":
            await self.send(f"{tag} NO {verb} failed.\r\n")
            return
        count = len(mailbox_messages())
        self.selected = True
        mode = "READ-WRITE" if verb == "SELECT" else "READ-ONLY"
        await self.send(
            f"* {count} EXISTS\r\n* 0 RECENT\r\n* FLAGS {FLAGS}\r\n* OK [PERMANENTFLAGS {FLAGS}] Permanent flags\r\n"
            f"* OK [UIDVALIDITY {UIDVALIDITY}] UIDVALIDITY value\r\n* OK [UIDNEXT {count + 1}] The next unique identifier value\r\n"
            f"{tag} OK [{mode}] {verb} completed.\r\n"
        )

    async def do_examine(self, tag: str, arguments: list[bytes]) -> None:
        await self.do_select(tag, arguments, "EXAMINE")

    async def do_close(self, tag: str, arguments: list[bytes]) -> None:
        self.selected = False
        await self.send(f"{tag} OK CLOSE completed.\r\n")

    async def do_fetch(self, tag: str, arguments: list[bytes], uid: bool = False) -> None:
        if not await self.authenticated(tag):
            return
        if not self.selected or len(arguments) < 2:
            await self.send(f"{tag} BAD Command received in Invalid state.\r\n")
            return
        messages = mailbox_messages()
        numbers = sequence_set(arguments[0].decode(errors="replace"), len(messages))
        items = [item.upper() for item in b" ".join(arguments[1:]).decode(errors="replace").strip("()").split()]
        if uid and "UID" not in items:
            items.insert(0, "UID")
        for number in numbers:
            message = messages[number - 1]
            pieces: list[bytes] = []
            for item in items:
                if item == "UID":
                    pieces.append(f"UID {number}".encode())
                elif item == "RFC822.SIZE":
                    pieces.append(f"RFC822.SIZE {len(message)}".encode())
                elif item == "FLAGS":
                    pieces.append(b"FLAGS (\\Seen)")
                elif item in ("BODY[]", "BODY.PEEK[]", "RFC822"):
                    name = "RFC822" if item == "RFC822" else "BODY[]"
                    pieces.append(f"{name} {{{len(message)}}}\r\n".encode() + message)
                    self.lab.counters.fetched_bytes += len(message)
            self.writer.write(f"* {number} FETCH (".encode() + b" ".join(pieces) + b")\r\n")
            await self.writer.drain()
        await self.send(f"{tag} OK {'UID FETCH' if uid else 'FETCH'} completed.\r\n")

    async def do_uid_fetch(self, tag: str, arguments: list[bytes]) -> None:
        await self.do_fetch(tag, arguments, uid=True)

    async def do_uid_search(self, tag: str, arguments: list[bytes]) -> None:
        if await self.authenticated(tag):
            await self.send("* SEARCH " + " ".join(str(n) for n in range(1, len(mailbox_messages()) + 1)) + f"\r\n{tag} OK SEARCH completed.\r\n")

    async def do_idle(self, tag: str, arguments: list[bytes]) -> None:
        if not await self.authenticated(tag):
            return
        self.lab.counters.idles += 1
        await self.send(b"+ IDLE accepted, awaiting DONE command.\r\n")
        while (await self.line()).strip().upper() != b"DONE":
            pass
        await self.send(f"{tag} OK IDLE completed.\r\n")


def sequence_set(text: str, count: int) -> list[int]:
    """The message numbers of an IMAP sequence set (1, 2:4, 3:*, *) within 1..count."""
    numbers: list[int] = []
    for piece in text.split(","):
        low, _, high = piece.partition(":")
        start = count if low == "*" else int(low)
        end = start if not high else (count if high == "*" else int(high))
        start, end = sorted((start, end))
        numbers.extend(n for n in range(start, end + 1) if 1 <= n <= count)
    return numbers


async def start_imap(options: Any, accounts: dict[str, tuple[str, str]], ntlm_user_file: Path | None, tls_context: ssl.SSLContext) -> tuple[ImapLab, int]:
    """The lab's IMAP4 service on options.host:options.imap_port (0: a free port)."""
    imap = ImapLab(accounts, ntlm_user_file, tls_context, starttls=options.imap_tls == "starttls")
    port = await imap.listen(options.host, options.imap_port)
    return imap, port
