"""Unit tests of bridge.protocol.sasl: user names out of PLAIN, LOGIN and NTLM responses, never a password."""

from __future__ import annotations

import base64
import struct

import pytest
import spnego

from bridge.protocol.sasl import SaslExchange, decode_response, ntlm_user, printable, user_from_login_step, user_from_plain


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.fixture
def ntlm_authenticate(tmp_path, monkeypatch):
    """A real NTLM AUTHENTICATE message from pyspnego's client, after a challenge from its acceptor."""
    store = tmp_path / "ntlm-users.txt"
    store.write_text("LAB:alice:Passw0rd!\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(store))

    def make(user: str) -> tuple[bytes, bytes]:
        client = spnego.client(user, "Passw0rd!", protocol="ntlm")
        negotiate = client.step()
        challenge = spnego.server(protocol="ntlm").step(negotiate)
        return negotiate, client.step(challenge)

    return make


def test_plain_gives_the_authentication_identity_not_the_authorisation_one():
    assert user_from_plain(b64(b"\x00alice\x00secret")) == "alice"
    assert user_from_plain(b64(b"admin\x00LAB\\alice\x00secret")) == "LAB\\alice"
    assert user_from_plain(b64("\x00jos\u00e9@lab.test\x00pw".encode())) == "jos\u00e9@lab.test"


@pytest.mark.parametrize("response", ["not base64!", b64(b"alice\x00secret"), b64(b"\x00\x00secret"), b64(b"a\x00b\x00c\x00d"), "QUIT"])
def test_plain_malformed_is_none(response):
    assert user_from_plain(response) is None


def test_login_first_step_is_the_user_name():
    assert user_from_login_step(b64(b"LAB\\alice")) == "LAB\\alice"
    assert user_from_login_step(b"YWxpY2U=\r\n") == "alice"
    assert user_from_login_step("%%%") == ""


def test_user_names_are_made_fit_for_a_log_line():
    assert user_from_login_step(b64(b"alice\r\nFAKE LOG LINE")) == "alice??FAKE LOG LINE"
    long_name = user_from_login_step(b64(b"a" * 5000))
    assert len(long_name) == 259 and long_name.endswith("...")
    assert printable("x\x00y") == "x?y"


def test_empty_response_is_an_equals_sign():
    assert decode_response("=") == b""
    assert decode_response("") == b""
    assert decode_response("a") is None


@pytest.mark.parametrize("name, expected", [("LAB\\alice", "LAB\\alice"), ("alice@lab.test", "alice@lab.test")])
def test_ntlm_user_from_a_real_authenticate_message(ntlm_authenticate, name, expected):
    negotiate, authenticate = ntlm_authenticate(name)
    assert ntlm_user(negotiate) is None
    assert ntlm_user(authenticate) == expected


def test_ntlm_user_oem_and_truncated_messages():
    domain, user = b"LAB", b"bob"
    header = b"NTLMSSP\x00" + struct.pack("<I", 3)
    fields = struct.pack("<HHI", 0, 0, 64) * 2 + struct.pack("<HHI", 3, 3, 64) + struct.pack("<HHI", 3, 3, 67) + struct.pack("<HHI", 0, 0, 70) * 2
    message = header + fields + struct.pack("<I", 0x2) + domain + user  # flags without NEGOTIATE_UNICODE: OEM strings
    assert ntlm_user(message) == "LAB\\bob"
    assert ntlm_user(message[:66]) is None  # the user name's buffer points past the end
    assert ntlm_user(message[:40]) is None
    assert ntlm_user(b"garbage") is None


def test_exchange_tracks_the_user_and_whether_credentials_went_out(ntlm_authenticate):
    plain = SaslExchange("plain")
    assert plain.mechanism == "PLAIN" and not plain.credentials_sent
    plain.client_response(b64(b"\x00alice\x00pw"))
    assert plain.user == "alice" and plain.credentials_sent

    login = SaslExchange("LOGIN")
    login.client_response(b64(b"alice"))
    login.client_response(b64(b"the password"))
    assert login.user == "alice" and login.responses == 2

    negotiate, authenticate = ntlm_authenticate("LAB\\alice")
    ntlm = SaslExchange("NTLM")
    ntlm.client_response(b64(negotiate))
    assert ntlm.user is None and ntlm.credentials_sent
    ntlm.client_response(b64(authenticate).encode() + b"\r\n")
    assert ntlm.user == "LAB\\alice"

    cancelled = SaslExchange("LOGIN")
    cancelled.client_response("*")
    assert cancelled.cancelled and not cancelled.credentials_sent


def test_garbage_responses_still_count_as_credentials():
    exchange = SaslExchange("PLAIN")
    exchange.client_response("RETR 1")  # a command where a response belongs: the server will refuse it
    assert exchange.user is None and exchange.credentials_sent
