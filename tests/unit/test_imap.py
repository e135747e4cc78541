"""bridge.protocol.imap: the client's commands, the server's answers, the capability filter, the logon
outcome and the step aside after a successful logon (pure: bytes in, steps out)."""

from __future__ import annotations

import base64

import pytest
import spnego

from bridge.protocol.auth import SaslUser, ntlm_user
from bridge.protocol.imap import (
    MAX_LINE,
    Command,
    CommandReader,
    ImapStartTls,
    ImapWatcher,
    Refusal,
    SaslResponse,
    filter_capabilities,
    filter_line,
    parse_response,
)

GREETING = b"* OK The Microsoft Exchange IMAP4 service is ready.\r\n"
EXCHANGE_CAPABILITY = b"* CAPABILITY IMAP4 IMAP4rev1 AUTH=NTLM AUTH=GSSAPI AUTH=PLAIN IDLE NAMESPACE LITERAL+\r\n"


def greeted() -> ImapWatcher:
    watcher = ImapWatcher()
    assert watcher.from_server(GREETING).to_client == GREETING
    return watcher


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# ---- the command reader -----------------------------------------------------------------------------


def test_commands_are_forwarded_line_by_line_and_named():
    reader = CommandReader()
    events = reader.feed(b"a1 CAPABILITY\r\na2 LOGIN alice \"pass word\"\r\na3 NOO")
    assert events[0] == b"a1 CAPABILITY\r\n"
    assert events[1] == Command("a1", "CAPABILITY")
    assert events[2] == b'a2 LOGIN alice "pass word"\r\n'
    assert events[3] == Command("a2", "LOGIN", user="alice")
    assert len(events) == 4  # the partial line waits
    assert reader.feed(b"P\r\n") == [b"a3 NOOP\r\n", Command("a3", "NOOP")]


def test_literals_synchronising_and_non_synchronising_are_passed_through_and_parsed():
    reader = CommandReader()
    assert reader.feed(b"a LOGIN {5}\r\n") == [b"a LOGIN {5}\r\n"]
    assert reader.feed(b"al") == [b"al"]
    events = reader.feed(b"ice {3+}\r\npw!\r\n")
    assert events == [b"ice", b" {3+}\r\n", b"pw!", b"\r\n", Command("a", "LOGIN", user="alice")]


def test_a_literal_announced_as_4_gb_is_refused_before_anything_is_forwarded():
    reader = CommandReader()
    [refusal] = reader.feed(b"a LOGIN {4294967296}\r\n")
    assert isinstance(refusal, Refusal) and not refusal.close
    assert refusal.answer.startswith(b"a BAD The literal of 4294967296 bytes is larger than")
    assert refusal.answer.count(b".") == 1 and refusal.answer.endswith(b".\r\n")  # one sentence
    assert reader.feed(b"b NOOP\r\n") == [b"b NOOP\r\n", Command("b", "NOOP")]  # the session goes on
    [refusal] = CommandReader().feed(b"a LOGIN {4294967296+}\r\n")  # its bytes would follow unasked
    assert refusal.close and refusal.answer.startswith(b"* BYE ")


def test_a_line_of_1_mb_is_refused_and_closes():
    reader = CommandReader()
    events = reader.feed(b"a LOGIN " + b"x" * (1024 * 1024))
    assert len(events) == 1 and isinstance(events[0], Refusal) and events[0].close
    assert b"longer than the 65536 bytes" in events[0].answer
    assert reader.feed(b"\r\nb NOOP\r\n") == []  # nothing more is read


def test_not_a_command_and_starttls_and_unknown_mechanisms_are_answered_locally():
    reader = CommandReader()
    [refusal] = reader.feed(b"\r\n")
    assert refusal.answer.startswith(b"* BAD The line is not an IMAP command") and not refusal.close
    [refusal] = reader.feed(b"s STARTTLS\r\n")
    assert refusal.answer == b"s BAD This connection is already encrypted (implicit TLS), so STARTTLS is not offered.\r\n"
    [refusal] = reader.feed(b"g AUTHENTICATE GSSAPI\r\n")
    assert refusal.answer.startswith(b"g NO ") and not refusal.close


def test_sasl_lines_wait_for_the_server_and_must_be_base64():
    reader = CommandReader()
    events = reader.feed(b"a AUTHENTICATE PLAIN\r\n" + b64(b"\0alice\0pw") + b"\r\n")
    assert events == [b"a AUTHENTICATE PLAIN\r\n", Command("a", "AUTHENTICATE", mechanism="PLAIN")]
    reader.allow_sasl_line()  # the server's "+"
    assert reader.events() == [b64(b"\0alice\0pw") + b"\r\n", SaslResponse(b"\0alice\0pw")]
    assert reader.feed(b"b NOOP\r\n") == []  # held until the server answers the AUTHENTICATE
    reader.end_sasl()
    assert reader.events() == [b"b NOOP\r\n", Command("b", "NOOP")]


def test_a_command_injected_as_a_sasl_response_is_refused_and_closes():
    reader = CommandReader()
    reader.feed(b"a AUTHENTICATE LOGIN\r\n")
    reader.allow_sasl_line()
    [refusal] = reader.feed(b"x DELETE INBOX\r\n")
    assert isinstance(refusal, Refusal) and refusal.close and refusal.answer.startswith(b"* BYE ")


# ---- responses and capabilities ----------------------------------------------------------------------


def test_responses_are_told_apart():
    assert parse_response(b"+ Ready for additional command text.\r\n").kind == "continuation"
    untagged = parse_response(b"* 5 EXISTS\r\n")
    assert (untagged.kind, untagged.status) == ("untagged", "EXISTS")
    tagged = parse_response(b"a1 NO LOGIN failed.\r\n")
    assert (tagged.kind, tagged.tag, tagged.status) == ("tagged", "a1", "NO")


def test_capabilities_are_what_the_front_offers():
    assert filter_capabilities(b"IMAP4rev1 STARTTLS LOGINDISABLED AUTH=NTLM AUTH=GSSAPI AUTH=PLAIN AUTH=login IDLE".split()) == b"IMAP4rev1 AUTH=NTLM AUTH=PLAIN AUTH=login IDLE".split()
    assert filter_line(EXCHANGE_CAPABILITY) == b"* CAPABILITY IMAP4 IMAP4rev1 AUTH=NTLM AUTH=PLAIN IDLE NAMESPACE LITERAL+\r\n"
    assert filter_line(b"a OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] ready\r\n") == b"a OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n"
    assert filter_line(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n", drop_code=True) == b"* OK ready\r\n"


# ---- the watcher: logons and the step aside ----------------------------------------------------------


def test_login_failure_then_success_then_the_watcher_steps_aside():
    watcher = greeted()
    step = watcher.from_client(b"a1 CAPABILITY\r\n")
    assert step.to_server == b"a1 CAPABILITY\r\n"
    step = watcher.from_server(EXCHANGE_CAPABILITY + b"a1 OK CAPABILITY completed.\r\n")
    assert b"GSSAPI" not in step.to_client and b"AUTH=NTLM" in step.to_client
    watcher.from_client(b'a2 LOGIN "LAB\\\\alice" wrong\r\n')
    step = watcher.from_server(b"a2 NO LOGIN failed.\r\n")
    assert [(logon.ok, logon.user, logon.mechanism) for logon in step.logons] == [(False, "LAB\\alice", "LOGIN")]
    watcher.from_client(b"a3 LOGIN alice {9+}\r\nPassw0rd!\r\na4 SELECT INBOX\r\n")
    step = watcher.from_server(b"a3 OK LOGIN completed.\r\n* CAPABILITY STARTTLS\r\n")
    assert [(logon.ok, logon.user) for logon in step.logons] == [(True, "alice")]
    assert watcher.stepped_aside
    assert step.to_client == b"a3 OK LOGIN completed.\r\n* CAPABILITY STARTTLS\r\n"  # after the logon nothing is parsed
    assert watcher.from_client(b"a5 LOGIN x {99999999}\r\n").to_server == b"a5 LOGIN x {99999999}\r\n"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_authenticate_plain_and_login_name_the_user_never_the_password(mechanism):
    watcher = greeted()
    watcher.from_client(f"a AUTHENTICATE {mechanism}\r\n".encode())
    responses = [b"\0LAB\\alice\0Passw0rd!"] if mechanism == "PLAIN" else [b"LAB\\alice", b"Passw0rd!"]
    for response in responses:
        assert watcher.from_client(b64(response) + b"\r\n").to_server == b""  # held until the server's "+"
        step = watcher.from_server(b"+ \r\n")
        assert step.to_server == b64(response) + b"\r\n"
    step = watcher.from_server(b"a NO AUTHENTICATE failed.\r\n")
    [logon] = step.logons
    assert (logon.ok, logon.user, logon.mechanism) == (False, "LAB\\alice", mechanism)
    assert "Passw0rd" not in repr(step) and "Passw0rd" not in repr(watcher.__dict__)


def test_authenticate_ntlm_reads_the_user_from_the_authenticate_message(tmp_path, monkeypatch):
    users = tmp_path / "ntlm-users"
    users.write_text("LAB:alice:Passw0rd!\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    client = spnego.client("LAB\\alice", "Passw0rd!", protocol="ntlm")
    server = spnego.server(protocol="ntlm")
    negotiate = client.step()
    challenge = server.step(negotiate)
    authenticate = client.step(challenge)
    assert ntlm_user(authenticate) == "LAB\\alice" and ntlm_user(negotiate) is None
    watcher = greeted()
    watcher.from_client(b"n AUTHENTICATE NTLM\r\n")
    watcher.from_server(b"+ \r\n")
    watcher.from_client(b64(negotiate) + b"\r\n")
    assert watcher.from_server(b"+ " + b64(challenge) + b"\r\n").to_server == b""
    assert watcher.from_client(b64(authenticate) + b"\r\n").to_server == b64(authenticate) + b"\r\n"
    step = watcher.from_server(b"n OK AUTHENTICATE completed.\r\n")
    assert step.logons[0].user == "LAB\\alice" and watcher.stepped_aside


def test_a_cancelled_or_bad_authenticate_is_no_failed_logon():
    watcher = greeted()
    watcher.from_client(b"a AUTHENTICATE PLAIN\r\n")
    watcher.from_server(b"+ \r\n")
    watcher.from_client(b"*\r\n")
    assert watcher.from_server(b"a BAD AUTHENTICATE cancelled.\r\n").logons == []
    watcher.from_client(b"b NOOP\r\n")  # the session goes on


def test_sasl_ir_and_preauth():
    watcher = greeted()
    watcher.from_client(b"a AUTHENTICATE PLAIN " + b64(b"\0bob\0secret") + b"\r\n")
    assert watcher.from_server(b"a NO AUTHENTICATE failed.\r\n").logons[0].user == "bob"
    preauth = ImapWatcher()
    preauth.from_server(b"* PREAUTH ready\r\n")
    assert preauth.stepped_aside


def test_hostile_server_line_closes():
    watcher = ImapWatcher()
    step = watcher.from_server(b"* OK " + b"x" * (MAX_LINE + 10))
    assert step.close and step.to_client.startswith(b"* BYE ")


def test_sasl_user_and_printable_names():
    sasl = SaslUser("PLAIN")
    sasl.feed(b"admin\0alice\x1b[31m\0pw")
    assert sasl.user == "alice?[31m"


def test_upstream_starttls():
    starttls = ImapStartTls()
    assert starttls.start() == b""
    step = starttls.feed(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n")
    assert step.send == b"B0 STARTTLS\r\n" and not step.ready
    step = starttls.feed(b"B0 OK Begin TLS negotiation now.\r\n")
    assert step.ready and step.greeting.startswith(b"* OK [CAPABILITY")
    assert ImapStartTls().feed(b"* BYE go away\r\n").error
    refused = ImapStartTls()
    refused.feed(GREETING)
    assert "refused STARTTLS" in (refused.feed(b"B0 BAD no\r\n").error or "")
