"""Unit tests of bridge.protocol.pop3: a POP3 session seen from the bridge, fed whole, byte by byte and
in random pieces (the same bytes out and the same events every way), with Exchange 2007's wording."""

from __future__ import annotations

import pytest
import spnego
from hypothesis import given, settings
from hypothesis import strategies as st
from support.observers import Run, b64

from bridge.protocol.mail import Logon, StartTlsStep
from bridge.protocol.pop3 import Capabilities, Pop3Dialect, Pop3Observer, filter_capabilities
from bridge.protocol.sasl import AuthAborted, AuthStarted, Greeting, LocalAnswer, LogonFailed, LogonSucceeded, Passthrough, StartTls, Violation

GREETING = b"+OK The Microsoft Exchange POP3 service is ready.\r\n"
CAPA_REPLY = b"+OK\r\nTOP\r\nUIDL\r\nSASL NTLM GSSAPI PLAIN\r\nUSER\r\nSTLS\r\n.\r\n"
LOGON_FAILURE = b"-ERR Logon failure: unknown user name or bad password.\r\n"
RETR_REPLY = b"+OK\r\nSubject: x\r\n\r\n..leading dot\r\n+OK not a reply\r\n-ERR nor this\r\n.\r\n"


def run(transcript, mode: str = "whole", **options) -> Run:
    result = Run(Pop3Observer(**options))
    for side, data in transcript:
        if mode == "bytes":
            result.feed(side, data, [1] * len(data))
        else:
            result.feed(side, data)
    return result


def same_every_way(transcript, **options) -> Run:
    whole = run(transcript, "whole", **options)
    single = run(transcript, "bytes", **options)
    assert (single.to_server, single.to_client, single.events, single.closed) == (whole.to_server, whole.to_client, whole.events, whole.closed)
    return whole


def kinds(events) -> list[type]:
    return [type(event) for event in events]


# --------------------------------------------------------------------------- logons


def test_user_pass_logon_with_capa_rewritten_then_passthrough():
    transcript = [
        ("s", GREETING),
        ("c", b"CAPA\r\n"),
        ("s", CAPA_REPLY),
        ("c", b"USER LAB\\alice\r\n"),
        ("s", b"+OK\r\n"),
        ("c", b"PASS Passw0rd!\r\n"),
        ("s", b"+OK User successfully logged on.\r\n"),
        ("c", b"RETR 1\r\n"),
        ("s", RETR_REPLY),
    ]
    result = same_every_way(transcript)
    assert result.events == [
        Greeting(True, "The Microsoft Exchange POP3 service is ready."),
        Capabilities(("TOP", "UIDL", "SASL NTLM GSSAPI PLAIN", "USER", "STLS"), ("TOP", "UIDL", "SASL NTLM PLAIN", "USER")),
        AuthStarted("USER"),
        LogonSucceeded("USER", "LAB\\alice"),
        Passthrough(),
    ]
    assert result.to_client == GREETING + b"+OK\r\nTOP\r\nUIDL\r\nSASL NTLM PLAIN\r\nUSER\r\n.\r\n" + b"+OK\r\n+OK User successfully logged on.\r\n" + RETR_REPLY
    assert result.to_server == b"CAPA\r\nUSER LAB\\alice\r\nPASS Passw0rd!\r\nRETR 1\r\n"
    assert result.observer.passthrough
    assert "Passw0rd!" not in repr(result.events)


def test_failed_pass_is_counted_then_a_second_attempt_succeeds():
    transcript = [
        ("s", GREETING),
        ("c", b"USER alice\r\nPASS wrong\r\n"),
        ("s", b"+OK\r\n" + LOGON_FAILURE),
        ("c", b"USER alice\r\nPASS Passw0rd!\r\n"),
        ("s", b"+OK\r\n+OK User successfully logged on.\r\n"),
    ]
    result = same_every_way(transcript)
    assert [event for event in result.events if isinstance(event, LogonFailed | LogonSucceeded)] == [
        LogonFailed("USER", "alice", LOGON_FAILURE.decode().strip()),
        LogonSucceeded("USER", "alice"),
    ]


def test_auth_plain_with_a_continuation():
    transcript = [("s", GREETING), ("c", b"AUTH PLAIN\r\n"), ("s", b"+ \r\n"), ("c", b64(b"\x00LAB\\alice\x00Passw0rd!") + b"\r\n"), ("s", b"+OK User successfully authenticated.\r\n")]
    result = same_every_way(transcript)
    assert result.events[1:] == [AuthStarted("PLAIN"), LogonSucceeded("PLAIN", "LAB\\alice"), Passthrough()]


def test_auth_plain_initial_response_and_failure():
    failure = b"-ERR Authentication failure: unknown user name or bad password.\r\nConnection is closed. 21\r\n"
    transcript = [("s", GREETING), ("c", b"AUTH PLAIN " + b64(b"\x00bob\x00nope") + b"\r\n"), ("s", failure)]
    result = same_every_way(transcript)
    assert result.events[1:] == [AuthStarted("PLAIN"), LogonFailed("PLAIN", "bob", "-ERR Authentication failure: unknown user name or bad password.")]
    assert result.to_client == GREETING + failure  # Exchange's last words pass through as they are
    assert not result.observer.passthrough


def test_auth_login_two_steps():
    transcript = [
        ("s", GREETING),
        ("c", b"AUTH LOGIN\r\n"),
        ("s", b"+ VXNlcm5hbWU6\r\n"),
        ("c", b64(b"alice") + b"\r\n"),
        ("s", b"+ UGFzc3dvcmQ6\r\n"),
        ("c", b64(b"Passw0rd!") + b"\r\n"),
        ("s", b"+OK User successfully authenticated.\r\n"),
    ]
    result = same_every_way(transcript)
    assert result.events[1:] == [AuthStarted("LOGIN"), LogonSucceeded("LOGIN", "alice"), Passthrough()]


def test_auth_ntlm_names_the_user_of_the_authenticate_message(tmp_path, monkeypatch):
    store = tmp_path / "users"
    store.write_text("LAB:alice:Passw0rd!\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(store))
    client, server = spnego.client("LAB\\alice", "Passw0rd!", protocol="ntlm"), spnego.server(protocol="ntlm")
    negotiate = client.step()
    challenge = server.step(negotiate)
    authenticate = client.step(challenge)
    transcript = [
        ("s", GREETING),
        ("c", b"AUTH NTLM\r\n"),
        ("s", b"+ \r\n"),
        ("c", b64(negotiate) + b"\r\n"),
        ("s", b"+ " + b64(challenge) + b"\r\n"),
        ("c", b64(authenticate) + b"\r\n"),
        ("s", LOGON_FAILURE),
    ]
    result = same_every_way(transcript)
    assert result.events[1:] == [AuthStarted("NTLM"), LogonFailed("NTLM", "LAB\\alice", LOGON_FAILURE.decode().strip())]


def test_cancelled_auth_is_not_a_failed_logon():
    transcript = [("s", GREETING), ("c", b"AUTH LOGIN\r\n"), ("s", b"+ VXNlcm5hbWU6\r\n"), ("c", b"*\r\n"), ("s", b"-ERR The AUTH protocol exchange was canceled by the client.\r\n")]
    result = same_every_way(transcript)
    assert result.events[1:] == [AuthStarted("LOGIN"), AuthAborted("LOGIN", "-ERR The AUTH protocol exchange was canceled by the client.")]


def test_mechanisms_the_bridge_cannot_follow_are_refused_locally():
    result = same_every_way([("s", GREETING), ("c", b"AUTH GSSAPI\r\n")])
    assert result.to_server == b""
    assert result.to_client == GREETING + b"-ERR Unrecognized authentication type.\r\n"
    assert result.events[1:] == [LocalAnswer("AUTH", "-ERR Unrecognized authentication type.")]


def test_the_auth_listing_is_cut_to_the_relayed_mechanisms():
    result = same_every_way([("s", GREETING), ("c", b"AUTH\r\n"), ("s", b"+OK\r\nNTLM\r\nGSSAPI\r\nPLAIN\r\n.\r\n")])
    assert result.to_client == GREETING + b"+OK\r\nNTLM\r\nPLAIN\r\n.\r\n"


def test_filter_capabilities():
    lines = ["TOP", "UIDL", "SASL NTLM GSSAPI PLAIN", "USER", "STLS", "PIPELINING"]
    assert filter_capabilities(lines) == ["TOP", "UIDL", "SASL NTLM PLAIN", "USER", "PIPELINING"]
    assert filter_capabilities(lines, stls=True, mechanisms=["plain"]) == ["TOP", "UIDL", "SASL PLAIN", "USER", "PIPELINING", "STLS"]
    assert filter_capabilities(["SASL GSSAPI", "USER"]) == ["USER"]


# --------------------------------------------------------------------------- pipelining and STLS


def test_pipelined_commands_keep_their_order_and_wait_behind_the_logon():
    transcript = [
        ("s", GREETING),
        ("c", b"CAPA\r\nSTLS\r\nUSER alice\r\nPASS Passw0rd!\r\nSTAT\r\nLIST\r\n"),
        ("s", CAPA_REPLY + b"+OK\r\n"),
        ("s", b"+OK User successfully logged on.\r\n+OK 2 320\r\n+OK\r\n1 120\r\n2 200\r\n.\r\n"),
    ]
    result = same_every_way(transcript)
    # STLS was answered by the bridge after CAPA's reply and before USER's; STAT and LIST waited for PASS's reply.
    assert result.to_server == b"CAPA\r\nUSER alice\r\nPASS Passw0rd!\r\nSTAT\r\nLIST\r\n"
    stls_refusal = b"-ERR Command is not valid in this state.\r\n"
    assert (
        result.to_client
        == GREETING + b"+OK\r\nTOP\r\nUIDL\r\nSASL NTLM PLAIN\r\nUSER\r\n.\r\n" + stls_refusal + b"+OK\r\n+OK User successfully logged on.\r\n+OK 2 320\r\n+OK\r\n1 120\r\n2 200\r\n.\r\n"
    )
    whole = run(transcript[:2])
    assert whole.to_server == b"CAPA\r\nUSER alice\r\nPASS Passw0rd!\r\n"  # nothing after PASS before its reply


def test_front_stls_is_answered_by_the_bridge_and_advertised():
    result = same_every_way([("s", GREETING), ("c", b"CAPA\r\n"), ("s", CAPA_REPLY), ("c", b"STLS\r\n")], front_stls=True)
    assert result.to_server == b"CAPA\r\n"
    assert result.to_client.endswith(b"USER\r\nSTLS\r\n.\r\n+OK Begin TLS negotiation now.\r\n")
    assert kinds(result.events)[-2:] == [LocalAnswer, StartTls]
    result.observer.tls_started()
    out = result.observer.client_data(b"STLS\r\n")
    assert out.to_client == b"-ERR Command is not valid in this state.\r\n"


@pytest.mark.parametrize("split", [False, True])
def test_bytes_after_stls_before_the_handshake_close_the_session(split):
    observer = Pop3Observer(front_stls=True)
    observer.server_data(GREETING)
    if split:
        first = observer.client_data(b"STLS\r\n")
        assert first.to_client == b"+OK Begin TLS negotiation now.\r\n"
        out = observer.client_data(b"USER alice\r\n")
    else:
        out = observer.client_data(b"STLS\r\nUSER alice\r\n")
    assert out.close and out.to_server == b"" and isinstance(out.events[-1], Violation)
    assert "command injection" in out.events[-1].reason
    assert observer.client_data(b"PASS x\r\n").to_server == b""


# --------------------------------------------------------------------------- hostile input


def test_a_command_inside_a_sasl_exchange_closes_the_session_unsent():
    transcript = [
        ("s", GREETING),
        ("c", b"AUTH PLAIN\r\nUSER evil\r\nPASS guess\r\n"),  # sent before the continuation: all held
        ("s", b"+ \r\n"),
    ]
    result = same_every_way(transcript)
    assert result.to_server == b"AUTH PLAIN\r\n"  # "USER evil" is where the PLAIN response belongs: never sent
    assert result.to_client == GREETING + b"+ \r\n-ERR The answer to the server's authentication challenge is not base64; the session is closed.\r\n"
    assert result.closed and [event for event in result.events if isinstance(event, Violation)] == [
        Violation("client", "The answer to the server's authentication challenge is not base64; the session is closed.")
    ]
    assert not [event for event in result.events if isinstance(event, LogonFailed)]
    assert run(transcript[:2]).to_server == b"AUTH PLAIN\r\n"


@pytest.mark.parametrize("newline", [False, True])
def test_a_one_megabyte_line_closes_the_session(newline):
    line = b"USER " + b"a" * 1024 * 1024 + (b"\r\n" if newline else b"")
    observer = Pop3Observer()
    observer.server_data(GREETING)
    out = observer.client_data(line)
    assert out.close and out.to_server == b"" and out.to_client == b"-ERR Line too long.\r\n"
    assert out.events == [Violation("client", "The client sent a line longer than 16384 bytes before logging on (POP3 commands are at most 255); the connection is closed.")]


def test_a_long_line_fed_byte_by_byte_is_refused_at_the_bound():
    observer = Pop3Observer(max_line=64)
    observer.server_data(GREETING)
    outs = [observer.client_data(b"x") for _ in range(64)]
    assert not any(out.close for out in outs[:63]) and outs[63].close  # 64 bytes and no line end: the line is longer than 64


def test_a_long_server_line_closes_the_session():
    observer = Pop3Observer(max_line=64)
    out = observer.server_data(b"+OK " + b"x" * 100)
    assert out.close and out.to_client == b"" and out.events[0].side == "server"


def test_commands_not_valid_before_the_logon_never_reach_the_server():
    result = same_every_way([("s", GREETING), ("c", b"XTND XMIT\r\nRETR 1\r\nQUIT\r\n"), ("s", b"+OK Microsoft Exchange Server 2007 POP3 server signing off.\r\n")])
    assert result.to_server == b"QUIT\r\n"
    assert result.to_client == GREETING + b"-ERR Command is not valid in this state.\r\n" * 2 + b"+OK Microsoft Exchange Server 2007 POP3 server signing off.\r\n"


def test_after_the_logon_nothing_is_parsed():
    observer = Pop3Observer(max_line=64)
    observer.server_data(GREETING)
    observer.client_data(b"USER a\r\nPASS b\r\n")
    observer.server_data(b"+OK\r\n+OK User successfully logged on.\r\n")
    blob = b"\r\n.\r\n-ERR\r\n" + b"x" * 1_000_000
    assert observer.server_data(blob).to_client == blob
    assert observer.client_data(blob).to_server == blob


# --------------------------------------------------------------------------- any chunking


TRANSCRIPT = [
    ("s", GREETING),
    ("c", b"CAPA\r\nAUTH\r\nAUTH LOGIN\r\n" + b64(b"alice") + b"\r\n"),
    ("s", CAPA_REPLY + b"+OK\r\nNTLM\r\nGSSAPI\r\nPLAIN\r\n.\r\n+ VXNlcm5hbWU6\r\n"),
    ("s", b"+ UGFzc3dvcmQ6\r\n"),
    ("c", b64(b"bad") + b"\r\nUSER alice\r\nPASS Passw0rd!\r\nUIDL\r\n"),
    ("s", b"-ERR Authentication failure: unknown user name or bad password.\r\n+OK\r\n+OK User successfully logged on.\r\n+OK\r\n1 a\r\n.\r\n"),
]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_chunking_gives_the_same_bytes_and_events(data):
    reference = run(TRANSCRIPT)
    result = Run(Pop3Observer())
    for side, blob in TRANSCRIPT:
        result.feed(side, blob, data.draw(st.lists(st.integers(1, 12), max_size=30)))
    assert (result.to_server, result.to_client, result.events) == (reference.to_server, reference.to_client, reference.events)
    assert kinds(reference.events) == [Greeting, AuthStarted, Capabilities, LogonFailed, AuthStarted, LogonSucceeded, Passthrough]


# --------------------------------------------------------------------------- the mail shell's dialect


def test_the_dialect_adapts_the_observer_to_the_shells_watcher():
    watcher = Pop3Dialect().watcher(upstream_starttls=False)
    assert watcher.from_server(GREETING).to_client == GREETING
    step = watcher.from_client(b"USER alice\r\nPASS wrong\r\n")
    assert step.to_server == b"USER alice\r\nPASS wrong\r\n" and not step.logons
    step = watcher.from_server(b"+OK\r\n" + LOGON_FAILURE)
    assert step.logons == [Logon(False, "alice", "USER")] and not watcher.stepped_aside
    watcher.from_client(b"PASS right\r\n")
    step = watcher.from_server(b"+OK User successfully logged on.\r\n")
    assert step.logons == [Logon(True, "alice", "USER")] and watcher.stepped_aside
    assert watcher.from_client(b"RETR 1\r\n").to_server == b"RETR 1\r\n"
    closing = Pop3Dialect().watcher(upstream_starttls=False)
    step = closing.from_client(b"USER " + b"x" * 20000)
    assert step.close and step.problem is not None and "longer than 16384 bytes" in step.problem
    assert Pop3Dialect().bye("Gone.") == b"-ERR Gone.\r\n"


def test_upstream_stls_greeting_then_stls_then_ok():
    starttls = Pop3Dialect().starttls()
    assert starttls.start() == b"" and starttls.feed(b"+OK The Microsoft") == StartTlsStep()
    assert starttls.feed(b" Exchange POP3 service is ready.\r\n") == StartTlsStep(send=b"STLS\r\n")
    assert starttls.feed(b"+OK Begin TLS negotiation now.\r\n") == StartTlsStep(ready=True, greeting=GREETING)
    refused = Pop3Dialect().starttls()
    refused.feed(GREETING)
    assert refused.feed(b"-ERR Command is not valid in this state.\r\n").error == "it refused STLS (-ERR Command is not valid in this state.)"
    injected = Pop3Dialect().starttls()
    injected.feed(GREETING)
    assert "response injection" in (injected.feed(b"+OK Begin TLS negotiation now.\r\n+OK forged\r\n").error or "")
    assert Pop3Dialect().starttls().feed(b"-ERR busy\r\n").error == "it greeted with '-ERR busy'"
