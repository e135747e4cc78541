"""HTTP authentication messages (Basic, NTLM, Negotiate): which step of a logon a header carries.

Pure functions over header values and tokens; the proxy uses them to tell a failed logon from a
handshake step, the lab to tell a new NTLM handshake from its continuation.
"""

from __future__ import annotations

import base64
import binascii

NTLM_SIGNATURE = b"NTLMSSP\x00"
NTLM_NEGOTIATE = 1
NTLM_AUTHENTICATE = 3
SPNEGO_INIT_TAG = 0x60


def ntlm_message_type(token: bytes) -> int | None:
    """The NTLM message type (1 negotiate, 2 challenge, 3 authenticate) of a raw token, None if not NTLM."""
    if token.startswith(NTLM_SIGNATURE) and len(token) >= 12:
        return int.from_bytes(token[8:12], "little")
    return None


def starts_new_handshake(token: bytes) -> bool:
    """True for an NTLM NEGOTIATE message or a SPNEGO NegTokenInit (the first leg of a logon)."""
    if token.startswith(NTLM_SIGNATURE):
        return ntlm_message_type(token) == NTLM_NEGOTIATE
    return bool(token) and token[0] == SPNEGO_INIT_TAG


def carries_final_credentials(authorization: str | None) -> bool:
    """True when a 401 to this Authorization header means a failed logon (not a handshake step)."""
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        return True
    if scheme not in ("ntlm", "negotiate"):
        return False
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return True  # garbage credentials are a failed attempt too
    if raw.startswith(NTLM_SIGNATURE):
        return ntlm_message_type(raw) == NTLM_AUTHENTICATE
    return bool(raw) and raw[0] != SPNEGO_INIT_TAG  # a NegTokenResp: the client's answer to a challenge


# --------------------------------------------------------------------------- who a logon names

NTLM_NEGOTIATE_UNICODE = 0x00000001
NTLM_NEGOTIATE_OEM = 0x00000002
_AUTHENTICATE_FIXED = 64  # through NegotiateFlags: the shortest AUTHENTICATE message ([MS-NLMP] 2.2.1.3)
MAX_USER_NAME = 256  # characters kept of a user name (longer ones are cut: a label, not an identity check)


def _ntlm_field(token: bytes, offset: int) -> bytes | None:
    """The payload of the (Len, MaxLen, BufferOffset) field descriptor at ``offset``; None when it points outside the message."""
    length = int.from_bytes(token[offset : offset + 2], "little")
    start = int.from_bytes(token[offset + 4 : offset + 8], "little")
    if length == 0:
        return b""
    if start < _AUTHENTICATE_FIXED or start + length > len(token):  # (a payload never overlaps the fixed header)
        return None
    return token[start : start + length]


def ntlm_authenticate_user(token: bytes) -> str | None:
    """``DOMAIN\\user`` (or ``user``) from an NTLM AUTHENTICATE message's DomainName and UserName
    fields ([MS-NLMP] 2.2.1.3); None for any other message, a malformed one, or an anonymous logon.
    Nothing else of the message is read: never the challenge responses (the password's proof)."""
    if ntlm_message_type(token) != NTLM_AUTHENTICATE or len(token) < _AUTHENTICATE_FIXED:
        return None
    flags = int.from_bytes(token[60:64], "little")
    domain = _ntlm_field(token, 28)
    user = _ntlm_field(token, 36)
    if domain is None or user is None or not user:
        return None
    encoding = "utf-16-le" if flags & NTLM_NEGOTIATE_UNICODE else "cp437"
    try:
        name = user.decode(encoding)
        realm = domain.decode(encoding)
    except UnicodeDecodeError:
        return None
    name = _printable(name)
    realm = _printable(realm)
    if not name:
        return None
    return (f"{realm}\\{name}" if realm else name)[:MAX_USER_NAME]


def _printable(text: str) -> str:
    return "".join(character for character in text if character.isprintable()).strip()


def user_of(authorization: str | None) -> str | None:
    """The user name an Authorization header names: Basic's user (the password is dropped unread),
    or an NTLM AUTHENTICATE message's DOMAIN\\user (bare or inside Negotiate); None otherwise (a
    handshake's first leg, Kerberos, garbage)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("basic", "ntlm", "negotiate"):
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    if scheme == "basic":
        name, colon, _ = raw.partition(b":")
        if not colon:
            return None
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            text = name.decode("latin-1")
        return _printable(text)[:MAX_USER_NAME] or None
    start = raw.find(NTLM_SIGNATURE)  # Negotiate: the NTLM token inside a SPNEGO NegTokenResp
    return ntlm_authenticate_user(raw[start:]) if start >= 0 else None


# --------------------------------------------------------------------------- SASL (the mail protocols)


def printable_name(raw: bytes | str) -> str:
    """A user name as the log may show it: decoded, control characters replaced, bounded."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return "".join(char if char.isprintable() else "?" for char in text[:MAX_USER_NAME])


def ntlm_user(token: bytes) -> str | None:
    """DOMAIN\\user from an NTLM AUTHENTICATE (type 3) message, None for anything else (as log text)."""
    name = ntlm_authenticate_user(token)
    return printable_name(name) if name else None


class SaslUser:
    """The user name in a SASL exchange's decoded client responses (PLAIN, LOGIN, NTLM); the password and
    the blobs are looked at only to find it, and never kept. Shared by IMAP, POP3 and SMTP."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism.upper()
        self.responses = 0
        self.user: str | None = None

    def feed(self, response: bytes) -> None:
        self.responses += 1
        mechanism = self.mechanism
        if mechanism == "PLAIN" and self.responses == 1:
            parts = response.split(b"\x00")
            if len(parts) == 3:  # authzid NUL authcid NUL passwd
                self.user = printable_name(parts[1] or parts[0])
        elif mechanism == "LOGIN" and self.responses == 1:
            self.user = printable_name(response)
        elif mechanism == "NTLM":
            self.user = ntlm_user(response) or self.user
