"""POP3S and SMTP submission (465 with TLS from the first byte, 587 with the bridge's own STARTTLS) through
the bridge, with clients this project did not write: Python's poplib and smtplib, and curl, against the
lab's POP3 and SMTP services (Exchange 2007's wording, TLS 1.0 only; SMTP reached on its 587 shape with
the bridge's own STARTTLS, as Exchange 2007 has no implicit-TLS SMTP). Every message retrieved and
compared (the 25 MB one too), the 25 MB message sent and its SHA-256 compared with what the lab
recorded, ten failed logons banning the source on each protocol (and for HTTPS), banned sources closed
before TLS, no password in any log line, and hostile input answered or closed without reaching the lab
or harming another session."""

from __future__ import annotations

import base64
import hashlib
import logging
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess

import pytest
import spnego
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_client_context, bridge_config, bridge_session, ca_file, resolve_lab_names
from support.lab import LAB_PASSWORD, LAB_USER
from support.net import greeted_tls_connection, read_all, receive_line, wait_until

from bridge.config import LegacyServer
from bridge.lab.mailbox import lab_mailbox
from bridge.ops.status import mail_snapshot

MAILBOX = lab_mailbox()
LARGE = MAILBOX[-1]
EWS = "/EWS/Exchange.asmx"
SECRET = "Wr0ng-Secret"
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture(scope="module")
def mail_lab(lab_factory):
    """The lab's POP3 and SMTP services; its SMTP also offers PLAIN (Exchange 2007's offers LOGIN and NTLM)."""
    return lab_factory(pop3_port=0, smtp_port=0, submission_port=0, smtp_mechanisms=("GSSAPI", "NTLM", "LOGIN", "PLAIN"))


@pytest.fixture
def mail_bridge(mail_lab, ca, tmp_path, background_bridges):
    """start(**config overrides) -> BackgroundBridge with --pop3s-port, --smtps-port and --submission-port."""
    count = iter(range(1000))

    def start(**overrides) -> BackgroundBridge:
        settings = dict(
            pop3s_port=0,
            smtps_port=0,
            submission_port=0,
            pop3_upstream=LegacyServer("127.0.0.1", mail_lab.mail_port("pop3")),
            smtp_upstream=LegacyServer("127.0.0.1", mail_lab.mail_port("submission")),
        )
        settings.update(overrides)
        return background_bridges(bridge_config(mail_lab.port, tmp_path / f"bridge{next(count)}", ca, **settings))

    return start


def port(bridge: BackgroundBridge, protocol: str) -> int:
    return bridge.bridge.mail_ports[protocol]


def pop3s(bridge: BackgroundBridge, ca, timeout: float = 60.0) -> poplib.POP3_SSL:
    resolve_lab_names()
    return poplib.POP3_SSL(BRIDGE_FQDN, port(bridge, "pop3"), context=bridge_client_context(ca), timeout=timeout)


def smtps(bridge: BackgroundBridge, ca, timeout: float = 60.0) -> smtplib.SMTP_SSL:
    resolve_lab_names()
    return smtplib.SMTP_SSL(BRIDGE_FQDN, port(bridge, "smtp"), context=bridge_client_context(ca), timeout=timeout)


def submission(bridge: BackgroundBridge, ca, timeout: float = 60.0) -> smtplib.SMTP:
    """smtplib on port 587, after EHLO and STARTTLS (answered by the bridge) and EHLO again."""
    resolve_lab_names()
    client = smtplib.SMTP(BRIDGE_FQDN, port(bridge, "submission"), timeout=timeout)
    client.ehlo("client.example")
    client.starttls(context=bridge_client_context(ca))
    client.ehlo("client.example")
    return client


def retrieved_sha256(lines: list[bytes]) -> str:
    return hashlib.sha256(b"".join(line + b"\r\n" for line in lines)).hexdigest()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def received_last(lab) -> dict:
    return lab.mail_counters.received[-1]


def raw_tls(bridge: BackgroundBridge, ca, protocol: str) -> tuple[ssl.SSLSocket, bytes]:
    return greeted_tls_connection(port(bridge, protocol), ca)


def receive_reply(sock: socket.socket) -> bytes:
    """One SMTP reply, all its lines."""
    reply = b""
    while True:
        line = receive_line(sock)
        reply += line
        if not line or line[3:4] != b"-":
            return reply


def bridge_lines(caplog) -> str:
    """The bridge's own log lines (pyspnego, in this process for the lab and the clients, logs its blobs at DEBUG)."""
    return "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("bridge") and not record.name.startswith("bridge.lab"))


# --------------------------------------------------------------------------- POP3S with poplib


def test_poplib_user_pass_and_every_message_retrieved_intact(mail_bridge, ca, caplog):
    caplog.set_level(logging.INFO, logger="bridge")
    bridge = mail_bridge()
    client = pop3s(bridge, ca)
    assert client.getwelcome() == b"+OK The Microsoft Exchange POP3 service is ready."
    assert client.capa() == {"TOP": [], "UIDL": [], "SASL": ["NTLM", "PLAIN"], "USER": []}  # GSSAPI cut, no STLS
    assert client.user(LAB_USER) == b"+OK"
    assert client.pass_(LAB_PASSWORD) == b"+OK User successfully logged on."
    assert client.stat() == (len(MAILBOX), sum(message.size for message in MAILBOX))
    assert client.uidl()[1] == [f"{message.uid} {message.uidl}".encode() for message in MAILBOX]
    for message in MAILBOX:
        _, lines, _ = client.retr(message.uid)
        assert retrieved_sha256(lines) == message.sha256, f"message {message.uid} differs"
    assert LARGE.size > 25_000_000
    assert client.quit() == b"+OK Microsoft Exchange Server 2007 POP3 server signing off."
    assert wait_until(lambda: "pop3 user=LAB\\alice logged-on" in caplog.text)
    mail = mail_snapshot(bridge.bridge)["pop3"]
    assert mail["sessions"] == {"logged-on": 1} and mail["logons"] == {"ok": 1, "failed": 0} and mail["bytes_out"] > sum(m.size for m in MAILBOX)


@pytest.mark.parametrize("mechanism", ["PLAIN", "NTLM"])
def test_poplib_auth_plain_and_ntlm(mail_bridge, mail_lab, ca, mechanism):
    bridge = mail_bridge()
    client = pop3s(bridge, ca)
    assert client._shortcmd(f"AUTH {mechanism}") == b"+ "
    if mechanism == "PLAIN":
        assert client._shortcmd(b64(f"\x00{LAB_USER}\x00{LAB_PASSWORD}".encode())) == b"+OK User successfully authenticated."
    else:
        ntlm = spnego.client(LAB_USER, LAB_PASSWORD, protocol="ntlm")
        challenge = client._shortcmd(b64(ntlm.step()))
        assert challenge.startswith(b"+ TlRMTVNT")
        assert client._shortcmd(b64(ntlm.step(base64.b64decode(challenge[2:])))) == b"+OK User successfully authenticated."
    _, lines, _ = client.retr(2)
    assert retrieved_sha256(lines) == MAILBOX[1].sha256
    client.quit()
    assert wait_until(lambda: mail_snapshot(bridge.bridge)["pop3"]["logons"]["ok"] == 1)


# --------------------------------------------------------------------------- SMTP submission with smtplib


@pytest.mark.parametrize("shape", ["smtp", "submission"])
def test_smtplib_logs_on_with_plain_and_login_and_sends_the_25_mb_message(mail_bridge, mail_lab, ca, shape):
    bridge = mail_bridge()
    connect = smtps if shape == "smtp" else submission
    with connect(bridge, ca) as client:
        if shape == "smtp":
            client.ehlo("client.example")
        assert client.esmtp_features["auth"].strip() == "NTLM LOGIN PLAIN"  # GSSAPI cut
        assert "starttls" not in client.esmtp_features and "chunking" in client.esmtp_features
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.user, client.password = LAB_USER, LAB_PASSWORD
        assert client.auth("PLAIN", client.auth_plain) == (235, b"2.7.0 Authentication successful")
        body = b"Subject: large through the bridge\r\n\r\n" + b"".join(LARGE.chunks())
        assert client.sendmail("alice@lab.test", ["bob@lab.test"], body) == {}
    recorded = received_last(mail_lab)
    assert (recorded["size"], recorded["sha256"], recorded["user"]) == (len(body), hashlib.sha256(body).hexdigest(), LAB_USER)
    with connect(bridge, ca) as client:
        if shape == "smtp":
            client.ehlo("client.example")
        client.user, client.password = "alice@lab.test", LAB_PASSWORD
        assert client.auth("LOGIN", client.auth_login) == (235, b"2.7.0 Authentication successful")
        small = f"Subject: {shape} LOGIN\r\n\r\n.a dot line\r\n".encode()
        client.sendmail("alice@lab.test", ["bob@lab.test"], small)
    assert received_last(mail_lab)["sha256"] == hashlib.sha256(small).hexdigest()
    assert wait_until(lambda: mail_snapshot(bridge.bridge)[shape]["sessions"] == {"logged-on": 2})


def test_submission_offers_auth_only_after_the_bridges_starttls(mail_bridge, mail_lab, ca):
    bridge = mail_bridge()
    resolve_lab_names()
    with smtplib.SMTP(BRIDGE_FQDN, port(bridge, "submission"), timeout=30) as client:
        code, banner = client.ehlo("client.example")
        assert code == 250 and banner.startswith(b"exch2007.lab.test Hello")
        assert "starttls" in client.esmtp_features and "auth" not in client.esmtp_features
        assert client.docmd("AUTH", "PLAIN " + b64(f"\x00{LAB_USER}\x00{LAB_PASSWORD}".encode())) == (530, b"5.7.0 Must issue a STARTTLS command first")
        assert client.docmd("MAIL", "FROM:<alice@lab.test>") == (530, b"5.7.1 Client was not authenticated")
        assert client.starttls(context=bridge_client_context(ca))[0] == 220
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo("client.example")
        assert "auth" in client.esmtp_features and "starttls" not in client.esmtp_features
        client.login(LAB_USER, LAB_PASSWORD)


# --------------------------------------------------------------------------- curl


@needs_curl
def test_curl_pop3s_smtps_and_smtp_with_ssl_reqd_through_the_bridge(mail_bridge, mail_lab, ca, tmp_path):
    bridge = mail_bridge()
    ports = {protocol: port(bridge, protocol) for protocol in ("pop3", "smtp", "submission")}
    base = ["curl", "--silent", "--show-error", "--cacert", str(ca_file(ca, tmp_path)), *[argument for number in ports.values() for argument in ("--resolve", f"{BRIDGE_FQDN}:{number}:127.0.0.1")]]
    user = ["--user", f"{LAB_USER}:{LAB_PASSWORD}"]
    listing = subprocess.run([*base, *user, f"pop3s://{BRIDGE_FQDN}:{ports['pop3']}/"], capture_output=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.decode().splitlines() == [f"{message.uid} {message.size}" for message in MAILBOX]
    message = subprocess.run([*base, *user, f"pop3s://{BRIDGE_FQDN}:{ports['pop3']}/3"], capture_output=True, timeout=60)
    assert message.returncode == 0 and message.stdout == MAILBOX[2].data()
    for scheme, protocol, extra in (("smtps", "smtp", []), ("smtp", "submission", ["--ssl-reqd"])):
        body = f"Subject: curl {scheme}\r\n\r\n.dot line\r\n".encode()
        (tmp_path / "mail.txt").write_bytes(body)
        envelope = ["--mail-from", "alice@lab.test", "--mail-rcpt", "bob@lab.test", "-T", str(tmp_path / "mail.txt")]
        sent = subprocess.run([*base, *extra, *user, *envelope, f"{scheme}://{BRIDGE_FQDN}:{ports[protocol]}/client.example"], capture_output=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        assert received_last(mail_lab)["sha256"] == hashlib.sha256(body).hexdigest()
    wrong = subprocess.run([*base, "--user", f"{LAB_USER}:wrong", f"pop3s://{BRIDGE_FQDN}:{ports['pop3']}/"], capture_output=True, timeout=60)
    assert wrong.returncode == 67  # CURLE_LOGIN_DENIED
    assert wait_until(lambda: bridge.bridge.bans.failures_by_protocol["pop3"] == 1)


# --------------------------------------------------------------------------- bans and logs


def fail_logon(bridge: BackgroundBridge, ca, protocol: str, attempt: int) -> None:
    if protocol == "pop3":
        client = pop3s(bridge, ca, timeout=10)
        client.user(LAB_USER)
        with pytest.raises(poplib.error_proto, match="Logon failure"):
            client.pass_(f"{SECRET}-{attempt}")
        client.close()
        return
    client = smtps(bridge, ca, timeout=10) if protocol == "smtp" else submission(bridge, ca, timeout=10)
    client.ehlo("client.example")
    client.user, client.password = LAB_USER, f"{SECRET}-{attempt}"
    with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
        client.auth("LOGIN", client.auth_login)  # one attempt (login() would go on to the next mechanism)
    assert failure.value.smtp_code == 535
    client.close()


@pytest.mark.parametrize("protocol", ["pop3", "smtp", "submission"])
def test_ten_failed_logons_ban_the_source_for_every_port_before_tls(mail_bridge, mail_lab, ca, caplog, protocol):
    caplog.set_level(logging.DEBUG)
    bridge = mail_bridge()
    for attempt in range(10):
        fail_logon(bridge, ca, protocol, attempt)
    assert wait_until(lambda: "127.0.0.1" in bridge.bridge.bans.active())
    assert bridge.bridge.bans.failures_by_protocol[protocol] == 10
    connections = dict(mail_lab.mail_counters.connections)
    for other in ("pop3", "smtp"):  # closed before TLS: the handshake never happens
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            raw_tls(bridge, ca, other)
    with socket.create_connection(("127.0.0.1", port(bridge, "submission")), timeout=10) as plain:
        assert read_all(plain, timeout=30) == b""  # no greeting: closed before anything was said
    assert mail_lab.mail_counters.connections == connections  # none of them reached the lab
    assert bridge_session(ca, auth=(LAB_USER, LAB_PASSWORD)).get(bridge.url + EWS).status_code == 403  # and HTTPS
    assert f"banned 127.0.0.1 for 3600 s after 10 failed logons in 600 s (the last over {protocol})" in caplog.text
    assert mail_snapshot(bridge.bridge)[protocol]["logons"]["failed"] == 10
    lines = bridge_lines(caplog)
    assert f"{protocol} user=LAB\\alice banned" in lines
    assert SECRET not in lines and LAB_PASSWORD not in lines


def test_no_password_or_sasl_blob_in_any_log_line(mail_bridge, ca, caplog):
    caplog.set_level(logging.DEBUG)
    bridge = mail_bridge()
    secrets = [LAB_PASSWORD, SECRET, b64(f"\x00{LAB_USER}\x00{LAB_PASSWORD}".encode()), b64(LAB_PASSWORD.encode()), b64(SECRET.encode())]
    client = pop3s(bridge, ca)
    with pytest.raises(poplib.error_proto):
        client._shortcmd("AUTH PLAIN " + b64(f"\x00{LAB_USER}\x00{SECRET}".encode()))
    ntlm = spnego.client(LAB_USER, LAB_PASSWORD, protocol="ntlm")
    blobs = [ntlm.step()]
    client._shortcmd("AUTH NTLM")
    challenge = client._shortcmd(b64(blobs[0]))
    blobs.append(ntlm.step(base64.b64decode(challenge[2:])))
    assert client._shortcmd(b64(blobs[1])).startswith(b"+OK")
    client.quit()
    for connect in (smtps, submission):
        with connect(bridge, ca) as smtp:
            smtp.ehlo("client.example")
            smtp.user, smtp.password = LAB_USER, SECRET
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.auth("PLAIN", smtp.auth_plain)
        with connect(bridge, ca) as smtp:
            smtp.ehlo("client.example")
            smtp.login(LAB_USER, LAB_PASSWORD)
    assert wait_until(lambda: bridge_lines(caplog).count("user=LAB\\alice logged-on") == 3)
    lines = bridge_lines(caplog)
    secrets += [b64(blob)[:40] for blob in blobs]
    for secret in secrets:
        assert secret not in lines


# --------------------------------------------------------------------------- hostile input


def test_hostile_input_is_answered_or_closed_without_reaching_the_lab_or_another_session(mail_bridge, mail_lab, ca):
    bridge = mail_bridge()
    counters = mail_lab.mail_counters
    other = pop3s(bridge, ca)  # a session in progress beside the hostile ones
    other.user(LAB_USER)
    other.pass_(LAB_PASSWORD)
    failures, received = dict(counters.logon_failures), len(counters.received)

    # a line of 1 MB, on each port: one answer, then the close
    for protocol, answer in (("pop3", b"-ERR Line too long.\r\n"), ("smtp", b"500 5.5.2 Line too long\r\n")):
        sock, greeting = raw_tls(bridge, ca, protocol)
        try:
            sock.sendall(b"USER " + b"x" * (1024 * 1024) + b"\r\n")
        except (ConnectionError, ssl.SSLError):
            pass
        assert read_all(sock, timeout=30) == answer

    # a command pipelined before the TLS handshake after STARTTLS on 587: closed, no go-ahead, nothing sent
    with socket.create_connection(("127.0.0.1", port(bridge, "submission")), timeout=10) as plain:
        assert receive_reply(plain).startswith(b"220 exch2007.lab.test")
        plain.sendall(b"EHLO client.example\r\n")
        assert b"STARTTLS" in receive_reply(plain)
        plain.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        assert read_all(plain, timeout=30) == b""

    # a command where a SASL response belongs: answered, closed, never reaches the lab
    sock, _ = raw_tls(bridge, ca, "pop3")
    sock.sendall(b"AUTH PLAIN\r\n")
    assert receive_line(sock) == b"+ \r\n"
    sock.sendall(b"DELE 1\r\n")
    assert read_all(sock, timeout=30) == b"-ERR The answer to the server's authentication challenge is not base64; the session is closed.\r\n"
    sock, _ = raw_tls(bridge, ca, "smtp")
    sock.sendall(b"EHLO client.example\r\n")
    receive_reply(sock)
    sock.sendall(b"AUTH LOGIN\r\n")
    assert receive_reply(sock) == b"334 VXNlcm5hbWU6\r\n"
    sock.sendall(b"MAIL FROM:<injected@evil.example>\r\n")
    assert read_all(sock, timeout=30) == b"501 5.5.2 The answer to the server's authentication challenge is not base64; the session is closed.\r\n"

    # plain text on an implicit-TLS port: one line saying so, before any TLS
    with socket.create_connection(("127.0.0.1", port(bridge, "pop3")), timeout=10) as plain:
        plain.sendall(b"CAPA\r\n")
        assert plain.recv(1024) == b"-ERR This port speaks TLS from the first byte; connect with TLS (POP3S).\r\n"

    assert counters.logon_failures == failures and len(counters.received) == received
    assert bridge.bridge.bans.failures_by_protocol.total() == 0
    _, lines, _ = other.retr(1)  # the other session is unharmed
    assert retrieved_sha256(lines) == MAILBOX[0].sha256
    other.quit()
    sessions = mail_snapshot(bridge.bridge)
    assert sessions["pop3"]["sessions"]["refused"] == 2 and sessions["smtp"]["sessions"]["refused"] == 2 and sessions["submission"]["sessions"]["refused"] == 1
