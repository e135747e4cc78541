"""SASL seen from the middle, and what a mail session observer hands back (shared by POP3, SMTP and IMAP).

A proxy in front of a mail server needs two things from a logon: the user name, for the log line and
the ban list, and whether it worked. This module reads the user name out of the client's SASL responses
(PLAIN, LOGIN, NTLM's AUTHENTICATE message) without ever keeping a password, and defines the events and
the ``Output`` the protocol observers (``bridge.protocol.pop3``, ``bridge.protocol.smtp``) return.

Pure functions and small dataclasses: no sockets, no asyncio, stdlib only.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field

from bridge.protocol.auth import NTLM_AUTHENTICATE, NTLM_SIGNATURE, ntlm_message_type

# The mechanisms whose user name the bridge can read and whose outcome it can count. GSSAPI (Kerberos)
# cannot work from the Internet through the bridge (the ticket names the legacy server's SPN) and
# CRAM-MD5/DIGEST-MD5 are not offered by Exchange 2007.
RELAYED_MECHANISMS = ("PLAIN", "LOGIN", "NTLM")
USER_NAME_LIMIT = 256
SASL_CANCEL = "*"
NTLMSSP_NEGOTIATE_UNICODE = 0x00000001


def printable(name: str) -> str:
    """A user name fit for one log line: control characters replaced, at most 256 characters."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in name[:USER_NAME_LIMIT])
    return cleaned + ("..." if len(name) > USER_NAME_LIMIT else "")


def decode_response(b64: str | bytes) -> bytes | None:
    """A client's base64 SASL response; ``=`` is the empty response (RFC 4954); None if not base64."""
    text = b64.strip() if isinstance(b64, bytes) else b64.strip().encode("ascii", "replace")
    if text == b"=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def user_from_plain(b64: str | bytes) -> str | None:
    """The authentication identity of a PLAIN response (``authzid NUL authcid NUL password``), None if malformed."""
    raw = decode_response(b64)
    if raw is None:
        return None
    parts = raw.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        return None
    return printable(parts[1].decode("utf-8", "replace"))


def user_from_login_step(b64: str | bytes) -> str:
    """The user name LOGIN's first response carries ("" when it is not base64)."""
    raw = decode_response(b64)
    return "" if raw is None else printable(raw.decode("utf-8", "replace"))


def ntlm_user(token: bytes) -> str | None:
    """``DOMAIN\\user`` (or ``user``) from an NTLM AUTHENTICATE message (MS-NLMP 2.2.1.3); None for any other token."""
    if not token.startswith(NTLM_SIGNATURE) or ntlm_message_type(token) != NTLM_AUTHENTICATE or len(token) < 52:
        return None
    flags = struct.unpack_from("<I", token, 60)[0] if len(token) >= 64 else NTLMSSP_NEGOTIATE_UNICODE
    encoding = "utf-16-le" if flags & NTLMSSP_NEGOTIATE_UNICODE else "latin-1"

    def field_at(offset: int) -> str | None:
        length, _, start = struct.unpack_from("<HHI", token, offset)
        if start + length > len(token):
            return None
        return token[start : start + length].decode(encoding, "replace")

    domain, user = field_at(28), field_at(36)
    if user is None or domain is None:
        return None
    return printable(f"{domain}\\{user}" if domain else user)


@dataclass
class SaslExchange:
    """One AUTH exchange as a proxy sees it: the mechanism, the client's responses, the user they name.

    Feed it every client response line (the initial response too); the password is read past, never kept.
    """

    mechanism: str
    user: str | None = None
    responses: int = 0
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.mechanism = self.mechanism.upper()

    def client_response(self, line: str | bytes) -> None:
        text = line.decode("ascii", "replace") if isinstance(line, bytes) else line
        text = text.strip()
        if text == SASL_CANCEL:
            self.cancelled = True
            return
        self.responses += 1
        if self.mechanism == "PLAIN" and self.responses == 1:
            self.user = user_from_plain(text)
        elif self.mechanism == "LOGIN" and self.responses == 1:
            self.user = user_from_login_step(text) or None
        elif self.mechanism == "NTLM":
            raw = decode_response(text)
            name = ntlm_user(raw) if raw else None
            if name is not None:
                self.user = name

    @property
    def credentials_sent(self) -> bool:
        """True once the client answered anything but ``*``: a refusal now is a failed logon (garbage included)."""
        return self.responses > 0 and not self.cancelled


# --------------------------------------------------------------------------- what an observer returns


@dataclass(frozen=True)
class Greeting:
    ok: bool
    text: str  # the server's greeting line without the status word


@dataclass(frozen=True)
class AuthStarted:
    mechanism: str  # upper case; "USER" for POP3 USER/PASS


@dataclass(frozen=True)
class LogonSucceeded:
    mechanism: str
    user: str | None


@dataclass(frozen=True)
class LogonFailed:
    """The server refused credentials the client sent: count it towards a ban."""

    mechanism: str
    user: str | None
    reply: str


@dataclass(frozen=True)
class AuthAborted:
    """An AUTH that ended without credentials (cancelled with ``*``, unknown mechanism): not a failed logon."""

    mechanism: str
    reply: str


@dataclass(frozen=True)
class LocalAnswer:
    """The bridge answered a client command itself (it never reached the server)."""

    command: str
    reply: str


@dataclass(frozen=True)
class StartTls:
    """The bridge wrote its go-ahead for the client's STARTTLS/STLS: start the TLS handshake on the client
    side now. ``discarded`` bytes the client sent after the command (before the handshake) were dropped."""

    discarded: int


@dataclass(frozen=True)
class Passthrough:
    """From here on nothing needs parsing: relay both directions as they are (``Output`` already holds
    every byte the observer had buffered)."""


@dataclass(frozen=True)
class Violation:
    """The session broke a rule the bridge enforces; ``reason`` is one sentence for the log. The connection closes."""

    side: str  # "client" or "server"
    reason: str


class LineTooLong(Exception):
    """More than the line bound arrived without a line end."""


def take_line(buffer: bytes, max_line: int) -> tuple[bytes | None, bytes]:
    """The first whole line of ``buffer`` (with its LF) and the rest; (None, buffer) when it is not whole yet.
    Raises LineTooLong when the line, whole or not, is longer than ``max_line`` bytes."""
    end = buffer.find(b"\n", 0, max_line)
    if end < 0:
        if len(buffer) >= max_line:
            raise LineTooLong
        return None, buffer
    return buffer[: end + 1], buffer[end + 1 :]


@dataclass
class Output:
    """What to do with one read: bytes for each side (in order), what happened, whether to close after writing."""

    to_server: bytes = b""
    to_client: bytes = b""
    events: list[object] = field(default_factory=list)
    close: bool = False
