"""Unit tests of bridge.protocol.smtp: an SMTP submission session seen from the bridge (465 and 587),
fed whole, byte by byte and in random pieces, with Exchange 2007's wording; and the bridge's own
STARTTLS towards the server."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.observers import Run, b64

from bridge.protocol.mail import Logon, StartTlsStep
from bridge.protocol.sasl import AuthAborted, AuthStarted, Greeting, LocalAnswer, LogonFailed, LogonSucceeded, Passthrough, StartTls, Violation
from bridge.protocol.smtp import BackendStartTls, Extensions, SmtpDialect, SmtpObserver, filter_ehlo

GREETING = b"220 exch2007.lab.test Microsoft ESMTP MAIL Service ready at Mon, 2 Jun 2025 10:00:00 +0000\r\n"
EHLO_LINES = [
    "exch2007.lab.test Hello [127.0.0.1]",
    "SIZE 36700160",
    "PIPELINING",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "AUTH GSSAPI NTLM LOGIN",
    "X-EXPS GSSAPI NTLM",
    "8BITMIME",
    "BINARYMIME",
    "CHUNKING",
    "XEXCH50",
]
EHLO_REPLY = b"".join(f"250{' ' if index == len(EHLO_LINES) - 1 else '-'}{line}\r\n".encode() for index, line in enumerate(EHLO_LINES))
FRONT_EHLO = (
    b"250-exch2007.lab.test Hello [127.0.0.1]\r\n250-SIZE 36700160\r\n250-PIPELINING\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250-AUTH NTLM LOGIN\r\n250-8BITMIME\r\n250-BINARYMIME\r\n250 CHUNKING\r\n"
)
FAILURE = b"535 5.7.3 Authentication unsuccessful\r\n"


def run(transcript, byte_by_byte: bool = False, **options) -> Run:
    result = Run(SmtpObserver(**options))
    for side, data in transcript:
        result.feed(side, data, [1] * len(data) if byte_by_byte else [])
    return result


def same_every_way(transcript, **options) -> Run:
    whole, single = run(transcript, **options), run(transcript, byte_by_byte=True, **options)
    assert (single.to_server, single.to_client, single.events, single.closed) == (whole.to_server, whole.to_client, whole.events, whole.closed)
    return whole


def logon_events(events):
    return [event for event in events if isinstance(event, LogonSucceeded | LogonFailed | AuthAborted)]


# --------------------------------------------------------------------------- 465: TLS from the first byte


def test_implicit_tls_ehlo_is_rewritten_and_auth_login_passes_through():
    transcript = [
        ("s", GREETING),
        ("c", b"EHLO client.example\r\n"),
        ("s", EHLO_REPLY),
        ("c", b"AUTH LOGIN\r\n"),
        ("s", b"334 VXNlcm5hbWU6\r\n"),
        ("c", b64(b"LAB\\alice") + b"\r\n"),
        ("s", b"334 UGFzc3dvcmQ6\r\n"),
        ("c", b64(b"Passw0rd!") + b"\r\n"),
        ("s", b"235 2.7.0 Authentication successful\r\n"),
        ("c", b"MAIL FROM:<alice@lab.test>\r\nRCPT TO:<bob@lab.test>\r\nDATA\r\n"),
        ("s", b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n354 Start mail input; end with <CRLF>.<CRLF>\r\n"),
        ("c", b"AUTH PLAIN lookslikeacommand\r\n.\r\n"),
    ]
    result = same_every_way(transcript)
    assert result.events == [
        Greeting(True, "exch2007.lab.test Microsoft ESMTP MAIL Service ready at Mon, 2 Jun 2025 10:00:00 +0000"),
        Extensions(tuple(EHLO_LINES), tuple(FRONT_EHLO.decode().replace("250-", "").replace("250 ", "").split("\r\n")[:-1])),
        AuthStarted("LOGIN"),
        LogonSucceeded("LOGIN", "LAB\\alice"),
        Passthrough(),
    ]
    assert result.to_client.startswith(GREETING + FRONT_EHLO)
    assert result.to_server.endswith(b"DATA\r\nAUTH PLAIN lookslikeacommand\r\n.\r\n")  # a body: never parsed


def test_auth_plain_initial_response_failure_then_success():
    transcript = [
        ("s", GREETING),
        ("c", b"EHLO c\r\nAUTH PLAIN " + b64(b"\x00alice\x00wrong") + b"\r\n"),
        ("s", EHLO_REPLY + FAILURE),
        ("c", b"AUTH PLAIN\r\n"),
        ("s", b"334 \r\n"),
        ("c", b64(b"\x00alice\x00Passw0rd!") + b"\r\n"),
        ("s", b"235 2.7.0 Authentication successful\r\n"),
    ]
    result = same_every_way(transcript)
    assert logon_events(result.events) == [LogonFailed("PLAIN", "alice", "535 5.7.3 Authentication unsuccessful"), LogonSucceeded("PLAIN", "alice")]
    assert "Passw0rd" not in repr(result.events) and "wrong" not in repr(result.events)


def test_ntlm_exchange_and_cancelled_login():
    transcript = [
        ("s", GREETING),
        ("c", b"AUTH LOGIN\r\n"),
        ("s", b"334 VXNlcm5hbWU6\r\n"),
        ("c", b"*\r\n"),
        ("s", b"501 5.7.0 Authentication cancelled\r\n"),
        ("c", b"AUTH NTLM\r\n"),
        ("s", b"334 NTLM supported\r\n"),
        ("c", b"TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAKAGFKAAAADw==\r\n"),
        ("s", b"334 TlRMTVNTUAACAAAAAAAAAAAAAAA=\r\n"),
        ("c", b"Z2FyYmFnZQ==\r\n"),  # base64, but no NTLM message: the server decides
        ("s", FAILURE),
    ]
    result = same_every_way(transcript)
    assert logon_events(result.events) == [AuthAborted("LOGIN", "501 5.7.0 Authentication cancelled"), LogonFailed("NTLM", None, "535 5.7.3 Authentication unsuccessful")]


def test_mail_before_the_logon_is_answered_by_the_bridge():
    transcript = [("s", GREETING), ("c", b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nVRFY x\r\nX-EXPS GSSAPI\r\nNOOP\r\n"), ("s", EHLO_REPLY + b"250 2.0.0 OK\r\n")]
    result = same_every_way(transcript)
    assert result.to_server == b"EHLO c\r\nNOOP\r\n"
    refused = b"530 5.7.1 Client was not authenticated\r\n" * 3 + b"500 5.3.3 Unrecognized command\r\n" * 2
    assert result.to_client == GREETING + FRONT_EHLO + refused + b"250 2.0.0 OK\r\n"


def test_bdat_before_the_logon_is_refused_and_its_chunk_read_past():
    chunk = b"AUTH PLAIN x\r\nQUIT\r\n" * 10
    transcript = [("s", GREETING), ("c", b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n"), ("s", b"250 2.0.0 OK\r\n")]
    result = same_every_way(transcript)
    assert result.to_server == b"NOOP\r\n"
    assert result.to_client == GREETING + b"530 5.7.1 Client was not authenticated\r\n250 2.0.0 OK\r\n"
    bad = run([("s", GREETING), ("c", b"BDAT lots\r\n")])
    assert bad.closed and bad.to_client.endswith(b"501 5.5.4 Invalid arguments\r\n")


def test_unsupported_mechanism_is_refused_locally():
    result = same_every_way([("s", GREETING), ("c", b"AUTH GSSAPI YIIG\r\n")])
    assert result.to_server == b"" and result.events[-1] == LocalAnswer("AUTH", "504 5.7.4 Unrecognized authentication type")


def test_starttls_on_465_is_not_offered():
    result = same_every_way([("s", GREETING), ("c", b"STARTTLS\r\n")])
    assert result.to_server == b"" and result.to_client.endswith(b"500 5.3.3 Unrecognized command\r\n")


def test_filter_ehlo():
    assert filter_ehlo(["me", "SIZE 1", "AUTH GSSAPI NTLM", "X-ANONYMOUSTLS", "STARTTLS", "CHUNKING"], starttls=True, auth=False) == ["me", "SIZE 1", "STARTTLS", "CHUNKING"]
    assert filter_ehlo(["me", "AUTH GSSAPI"], starttls=False, auth=True) == ["me"]
    assert filter_ehlo(["me"], starttls=True, auth=True) == ["me", "STARTTLS"]


# --------------------------------------------------------------------------- 587: the bridge answers STARTTLS


def test_587_offers_starttls_not_auth_until_the_client_is_encrypted():
    observer = SmtpObserver(front_starttls=True)
    result = Run(observer)
    for side, data in [("s", GREETING), ("c", b"EHLO c\r\nAUTH LOGIN\r\n"), ("s", EHLO_REPLY), ("c", b"STARTTLS\r\n")]:
        result.feed(side, data, [])
    before_tls = FRONT_EHLO.replace(b"250-AUTH NTLM LOGIN\r\n", b"").replace(b"ENHANCEDSTATUSCODES\r\n", b"ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n")
    assert result.to_client == GREETING + before_tls + b"530 5.7.0 Must issue a STARTTLS command first\r\n220 2.0.0 SMTP server ready\r\n"
    assert result.to_server == b"EHLO c\r\n"  # neither AUTH nor STARTTLS reached the server
    assert isinstance(result.events[-1], StartTls)
    observer.tls_started()
    for side, data in [("c", b"EHLO c\r\n"), ("s", EHLO_REPLY), ("c", b"STARTTLS\r\n")]:
        result.feed(side, data, [])
    assert result.to_client.endswith(FRONT_EHLO + b"500 5.3.3 Unrecognized command\r\n")


def test_pipelined_starttls_waits_for_the_replies_before_it():
    result = same_every_way([("s", GREETING), ("c", b"EHLO c\r\nSTARTTLS\r\n"), ("s", EHLO_REPLY)], front_starttls=True)
    assert result.to_client.endswith(b"250 CHUNKING\r\n220 2.0.0 SMTP server ready\r\n")
    assert [type(event) for event in result.events][-2:] == [LocalAnswer, StartTls]


@pytest.mark.parametrize("later", [False, True])
def test_commands_pipelined_after_starttls_close_the_session(later):
    observer = SmtpObserver(front_starttls=True)
    observer.server_data(GREETING)
    if later:
        assert observer.client_data(b"STARTTLS\r\n").to_client == b"220 2.0.0 SMTP server ready\r\n"
        out = observer.client_data(b"AUTH PLAIN " + b64(b"\x00alice\x00pw") + b"\r\n")
    else:
        out = observer.client_data(b"STARTTLS\r\nAUTH PLAIN " + b64(b"\x00alice\x00pw") + b"\r\n")
    assert out.close and out.to_server == b"" and out.to_client == b""
    assert isinstance(out.events[-1], Violation) and "command injection" in out.events[-1].reason


# --------------------------------------------------------------------------- hostile input


def test_a_command_inside_an_auth_exchange_closes_the_session_unsent():
    transcript = [
        ("s", GREETING),
        ("c", b"AUTH LOGIN\r\nMAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\n"),  # pipelined where the responses belong
        ("s", b"334 VXNlcm5hbWU6\r\n"),
    ]
    result = same_every_way(transcript)
    assert result.to_server == b"AUTH LOGIN\r\n" and result.closed
    assert result.to_client == GREETING + b"334 VXNlcm5hbWU6\r\n501 5.5.2 The answer to the server's authentication challenge is not base64; the session is closed.\r\n"
    assert not logon_events(result.events)
    assert run(transcript[:2]).to_server == b"AUTH LOGIN\r\n"


@pytest.mark.parametrize("newline", [False, True])
def test_a_one_megabyte_line_closes_the_session(newline):
    observer = SmtpObserver()
    observer.server_data(GREETING)
    out = observer.client_data(b"EHLO " + b"a" * 1024 * 1024 + (b"\r\n" if newline else b""))
    assert out.close and out.to_server == b"" and out.to_client == b"500 5.5.2 Line too long\r\n"
    assert out.events[-1].side == "client"


def test_a_server_line_that_is_no_reply_closes_the_session():
    out = SmtpObserver().server_data(b"HTTP/1.1 400 Bad Request\r\n")
    assert out.close and out.to_client == b"" and out.events[0].side == "server"


# --------------------------------------------------------------------------- the bridge's own STARTTLS to the server


def test_backend_starttls():
    starttls = BackendStartTls("bridge.example")
    out = starttls.server_data(GREETING[:10])
    assert out.to_server == b""
    out = starttls.server_data(GREETING[10:])
    assert out.to_server == b"EHLO bridge.example\r\n"
    out = starttls.server_data(EHLO_REPLY.replace(b"250-AUTH GSSAPI NTLM\r\n", b"").replace(b"250-ENHANCEDSTATUSCODES\r\n", b"250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n"))
    assert out.to_server == b"STARTTLS\r\n" and not starttls.ready
    assert starttls.server_data(b"220 2.0.0 SMTP server ready\r\n").events == [] and starttls.ready
    assert starttls.greeting == GREETING
    observer = SmtpObserver(front_starttls=True)
    assert observer.server_data(starttls.greeting).to_client == GREETING


@pytest.mark.parametrize(
    "replies, reason",
    [
        ([b"554 5.7.1 No thanks\r\n"], "refused the connection"),
        ([GREETING, EHLO_REPLY], "does not offer STARTTLS"),
        ([GREETING, b"250-me\r\n250 STARTTLS\r\n", b"454 4.7.0 TLS not available\r\n"], "refused STARTTLS"),
        ([GREETING, b"250-me\r\n250 STARTTLS\r\n", b"220 go\r\n250 injected\r\n"], "response injection"),
    ],
)
def test_backend_starttls_failures(replies, reason):
    starttls = BackendStartTls("bridge.example")
    outs = [starttls.server_data(reply) for reply in replies]
    assert outs[-1].close and reason in outs[-1].events[-1].reason and not any(out.close for out in outs[:-1])


# --------------------------------------------------------------------------- any chunking

TRANSCRIPT = [
    ("s", GREETING),
    ("c", b"EHLO c\r\nSTARTTLS\r\n"),
    ("s", EHLO_REPLY),
]
AFTER_TLS = [
    ("c", b"EHLO c\r\nAUTH LOGIN " + b64(b"alice") + b"\r\n"),
    ("s", EHLO_REPLY + b"334 UGFzc3dvcmQ6\r\n"),
    ("c", b64(b"bad") + b"\r\nAUTH PLAIN\r\n"),
    ("s", FAILURE + b"334 \r\n"),
    ("c", b64(b"\x00alice\x00Passw0rd!") + b"\r\nMAIL FROM:<a@b>\r\n"),
    ("s", b"235 2.7.0 Authentication successful\r\n250 2.1.0 Sender OK\r\n"),
]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_chunking_gives_the_same_bytes_and_events(data):
    def play(sizes) -> Run:
        result = Run(SmtpObserver(front_starttls=True))
        for index, (side, blob) in enumerate(TRANSCRIPT + AFTER_TLS):
            if index == len(TRANSCRIPT):
                result.observer.tls_started()
            result.feed(side, blob, sizes(index))
        return result

    reference = play(lambda index: [])
    chunked = play(lambda index: data.draw(st.lists(st.integers(1, 12), max_size=30)))
    assert (chunked.to_server, chunked.to_client, chunked.events) == (reference.to_server, reference.to_client, reference.events)
    assert logon_events(reference.events) == [LogonFailed("LOGIN", "alice", "535 5.7.3 Authentication unsuccessful"), LogonSucceeded("PLAIN", "alice")]
    assert reference.to_server.endswith(b"MAIL FROM:<a@b>\r\n") and reference.observer.passthrough


# --------------------------------------------------------------------------- the mail shell's dialect


def test_the_submission_dialect_asks_the_shell_for_the_clients_tls_and_counts_logons():
    dialect = SmtpDialect("submission", front_starttls=True, ehlo_name="bridge.example")
    watcher = dialect.watcher(upstream_starttls=True)
    watcher.from_server(GREETING)
    watcher.from_client(b"EHLO c\r\n")
    watcher.from_server(EHLO_REPLY)
    step = watcher.from_client(b"STARTTLS\r\n")
    assert step.start_tls and step.to_client == b"220 2.0.0 SMTP server ready\r\n" and step.to_server == b""
    watcher.tls_started()
    watcher.from_client(b"EHLO c\r\n")
    assert b"AUTH NTLM LOGIN" in watcher.from_server(EHLO_REPLY).to_client
    watcher.from_client(b"AUTH PLAIN " + b64(b"\x00alice\x00wrong") + b"\r\n")
    assert watcher.from_server(FAILURE).logons == [Logon(False, "alice", "PLAIN")]
    watcher.from_client(b"AUTH PLAIN " + b64(b"\x00alice\x00right") + b"\r\n")
    assert watcher.from_server(b"235 2.7.0 Authentication successful\r\n").logons == [Logon(True, "alice", "PLAIN")]
    assert watcher.stepped_aside and dialect.bye("Gone.") == b"421 4.3.2 Gone.\r\n"


def test_the_upstream_starttls_is_the_bridges_own_ehlo_and_starttls():
    starttls = SmtpDialect("smtp", front_starttls=False, ehlo_name="bridge.example").starttls()
    assert starttls.start() == b""
    assert starttls.feed(GREETING) == StartTlsStep(send=b"EHLO bridge.example\r\n")
    assert starttls.feed(b"250-exch\r\n250 STARTTLS\r\n") == StartTlsStep(send=b"STARTTLS\r\n")
    assert starttls.feed(b"220 2.0.0 SMTP server ready\r\n") == StartTlsStep(ready=True, greeting=GREETING)
    plain = SmtpDialect("smtp", front_starttls=False, ehlo_name="bridge.example").starttls()
    plain.feed(GREETING)
    assert "does not offer STARTTLS" in (plain.feed(b"250-exch\r\n250 AUTH LOGIN\r\n").error or "")
