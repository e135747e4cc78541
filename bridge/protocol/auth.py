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
