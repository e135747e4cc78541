"""The lab's POP3 and SMTP services with real clients this project did not write (poplib, smtplib, curl)
over real TLS 1.0, real NTLM (pyspnego on both ends), the 25 MB message both ways; and the sans-IO
observers (bridge.protocol.pop3, bridge.protocol.smtp) relaying those clients' sessions to the lab."""

from __future__ import annotations

import base64
import hashlib
import poplib
import selectors
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from email.message import EmailMessage

import pytest
import spnego
from support.lab import LAB_PASSWORD, LAB_USER, curl_speaks_tls10, legacy_client_context

from bridge.lab.mailbox import LARGE_ATTACHMENT_BYTES, lab_mailbox
from bridge.protocol.pop3 import Pop3Observer
from bridge.protocol.sasl import LogonFailed, LogonSucceeded, Passthrough
from bridge.protocol.smtp import SmtpObserver

MAILBOX = lab_mailbox()
LARGE = MAILBOX[-1]


@pytest.fixture(scope="module")
def mail_lab(lab_factory):
    return lab_factory(pop3_port=0, smtp_port=0, submission_port=0)


@pytest.fixture(scope="module")
def plain_lab(lab_factory):
    """A lab whose POP3 also offers LOGIN and whose SMTP also offers PLAIN (Exchange 2007 offers neither)."""
    return lab_factory(pop3_port=0, smtp_port=0, submission_port=0, pop3_mechanisms=("NTLM", "GSSAPI", "PLAIN", "LOGIN"), smtp_mechanisms=("GSSAPI", "NTLM", "LOGIN", "PLAIN"))


def pop3(lab) -> poplib.POP3_SSL:
    return poplib.POP3_SSL("127.0.0.1", lab.mail_port("pop3"), context=legacy_client_context(), timeout=30)


def retrieved_sha256(lines: list[bytes]) -> str:
    return hashlib.sha256(b"".join(line + b"\r\n" for line in lines)).hexdigest()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# --------------------------------------------------------------------------- POP3 with poplib


def test_pop3_greeting_capa_and_user_pass_logon(mail_lab):
    client = pop3(mail_lab)
    assert client.getwelcome() == b"+OK The Microsoft Exchange POP3 service is ready."
    assert client.capa() == {"TOP": [], "UIDL": [], "SASL": ["NTLM", "GSSAPI", "PLAIN"], "USER": []}
    assert client.user(LAB_USER) == b"+OK"
    assert client.pass_(LAB_PASSWORD) == b"+OK User successfully logged on."
    assert client.stat() == (len(MAILBOX), sum(message.size for message in MAILBOX))
    assert client.list()[1] == [f"{message.uid} {message.size}".encode() for message in MAILBOX]
    assert client.uidl()[1] == [f"{message.uid} {message.uidl}".encode() for message in MAILBOX]
    for message in MAILBOX[:-1]:
        _, lines, _ = client.retr(message.uid)
        assert retrieved_sha256(lines) == message.sha256  # dot-stuffing undone by poplib: the same bytes
    _, lines, _ = client.top(2, 2)
    assert lines[-3:] == [b"", b".starts with a dot", b"..starts with two"]
    assert client.quit() == b"+OK Microsoft Exchange Server 2007 POP3 server signing off."


def test_pop3_retrieves_the_25_mb_message(mail_lab):
    client = pop3(mail_lab)
    client.user("alice@lab.test")
    client.pass_(LAB_PASSWORD)
    started = time.monotonic()
    _, lines, octets = client.retr(LARGE.uid)
    elapsed = time.monotonic() - started
    assert LARGE.size > 25_000_000 and retrieved_sha256(lines) == LARGE.sha256
    assert elapsed < 30, f"25 MB took {elapsed:.1f} s"
    client.quit()


def test_pop3_bad_password_is_exchanges_logon_failure(mail_lab):
    before = mail_lab.mail_counters.logon_failures.get("pop3 USER", 0)
    client = pop3(mail_lab)
    client.user(LAB_USER)
    with pytest.raises(poplib.error_proto, match="Logon failure: unknown user name or bad password"):
        client.pass_("wrong")
    assert client.user(LAB_USER) == b"+OK"  # the session goes on
    assert client.pass_(LAB_PASSWORD).startswith(b"+OK")
    assert mail_lab.mail_counters.logon_failures["pop3 USER"] == before + 1


def test_pop3_auth_plain_and_ntlm(mail_lab):
    client = pop3(mail_lab)
    assert client._shortcmd("AUTH PLAIN") == b"+ "
    assert client._shortcmd(b64(f"\x00{LAB_USER}\x00{LAB_PASSWORD}".encode())) == b"+OK User successfully authenticated."
    client.quit()

    client = pop3(mail_lab)
    ntlm = spnego.client(LAB_USER, LAB_PASSWORD, protocol="ntlm")
    assert client._shortcmd("AUTH NTLM") == b"+ "
    challenge = client._shortcmd(b64(ntlm.step()))
    assert challenge.startswith(b"+ TlRMTVNT")
    assert client._shortcmd(b64(ntlm.step(base64.b64decode(challenge[2:])))) == b"+OK User successfully authenticated."
    assert client.stat()[0] == len(MAILBOX)
    client.quit()

    client = pop3(mail_lab)
    client._shortcmd("AUTH PLAIN")
    with pytest.raises(poplib.error_proto, match="Authentication failure"):
        client._shortcmd(b64(f"\x00{LAB_USER}\x00wrong".encode()))
    with pytest.raises(poplib.error_proto, match="Protocol error"):
        client._shortcmd("AUTH LOGIN")  # not a mechanism of Exchange's POP3 service


def test_pop3_auth_login_where_offered(plain_lab):
    client = pop3(plain_lab)
    assert client._shortcmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6"
    assert client._shortcmd(b64(LAB_USER.encode())) == b"+ UGFzc3dvcmQ6"
    assert client._shortcmd(b64(LAB_PASSWORD.encode())) == b"+OK User successfully authenticated."


# --------------------------------------------------------------------------- SMTP with smtplib


def small_message(subject: str = "lab test") -> EmailMessage:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "alice@lab.test", "bob@lab.test", subject
    message.set_content(".a line starting with a dot\n.\nand a lone dot above\n")
    return message


def received_last(lab) -> dict:
    return lab.mail_counters.received[-1]


def test_smtps_465_ehlo_login_and_send(mail_lab):
    with smtplib.SMTP_SSL("127.0.0.1", mail_lab.mail_port("smtp"), context=legacy_client_context(), timeout=30) as client:
        code, banner = client.ehlo("client.example")
        assert code == 250 and banner.startswith(b"exch2007.lab.test Hello [127.0.0.1]")
        assert client.esmtp_features["auth"].strip() == "GSSAPI NTLM LOGIN"
        assert "starttls" not in client.esmtp_features and "chunking" in client.esmtp_features
        assert client.login(LAB_USER, LAB_PASSWORD) == (235, b"2.7.0 Authentication successful")
        message = small_message()
        client.send_message(message)
    data = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    expected = {"mail_from": "alice@lab.test", "rcpt_to": ["bob@lab.test"], "size": len(data), "user": "LAB\\alice", "via": "DATA", "service": "smtp"}
    assert received_last(mail_lab) == expected | {"sha256": hashlib.sha256(data).hexdigest()}


def test_submission_587_starttls_then_the_25_mb_message(mail_lab):
    with smtplib.SMTP("127.0.0.1", mail_lab.mail_port("submission"), timeout=60) as client:
        banner = client.ehlo("client.example")[1]
        assert banner.startswith(b"exch2007.lab.test Hello")
        assert client.esmtp_features["auth"].strip() == "GSSAPI NTLM" and "starttls" in client.esmtp_features
        with pytest.raises(smtplib.SMTPSenderRefused, match="Client was not authenticated"):
            client.sendmail("alice@lab.test", ["bob@lab.test"], b"Subject: x\r\n\r\nx\r\n")
        client.rset()
        assert client.starttls(context=legacy_client_context())[0] == 220
        assert client.sock.version() == "TLSv1"
        client.ehlo("client.example")
        assert client.esmtp_features["auth"].strip() == "GSSAPI NTLM LOGIN" and "starttls" not in client.esmtp_features
        client.login(LAB_USER, LAB_PASSWORD)
        body = b"Subject: large\r\n\r\n" + b"".join(LARGE.chunks())
        started = time.monotonic()
        assert client.sendmail("alice@lab.test", ["bob@lab.test"], body) == {}
        elapsed = time.monotonic() - started
    assert received_last(mail_lab)["size"] == len(body) and received_last(mail_lab)["sha256"] == hashlib.sha256(body).hexdigest()
    assert received_last(mail_lab)["service"] == "submission" and elapsed < 60


def test_smtp_bad_password_is_535_5_7_3(mail_lab):
    with smtplib.SMTP_SSL("127.0.0.1", mail_lab.mail_port("smtp"), context=legacy_client_context(), timeout=30) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
            client.login(LAB_USER, "wrong")
        assert (failure.value.smtp_code, failure.value.smtp_error) == (535, b"5.7.3 Authentication unsuccessful")


def test_smtp_plain_where_offered(plain_lab):
    with smtplib.SMTP_SSL("127.0.0.1", plain_lab.mail_port("smtp"), context=legacy_client_context(), timeout=30) as client:
        client.ehlo("client.example")
        client.user, client.password = "alice@lab.test", LAB_PASSWORD
        assert client.auth("PLAIN", client.auth_plain) == (235, b"2.7.0 Authentication successful")
    assert plain_lab.mail_counters.logons["smtp PLAIN"] >= 1


class RawSmtp:
    """A TLS socket for byte-exact SMTP (NTLM, BDAT, pipelining)."""

    def __init__(self, port: int) -> None:
        self.sock = legacy_client_context().wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30))
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        lines = b""
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                assert chunk, "the lab closed the connection"
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines += line + b"\r\n"
            if line[3:4] != b"-":
                return lines


def test_smtp_ntlm_and_bdat(mail_lab):
    client = RawSmtp(mail_lab.mail_port("smtp"))
    assert client.reply().startswith(b"220 exch2007.lab.test Microsoft ESMTP MAIL Service ready at ")
    client.send(b"EHLO c\r\n")
    client.reply()
    ntlm = spnego.client(LAB_USER, LAB_PASSWORD, protocol="ntlm")
    client.send(b"AUTH NTLM\r\n")
    assert client.reply() == b"334 NTLM supported\r\n"
    client.send(b64(ntlm.step()).encode() + b"\r\n")
    challenge = client.reply()
    client.send(b64(ntlm.step(base64.b64decode(challenge[4:].strip()))).encode() + b"\r\n")
    assert client.reply() == b"235 2.7.0 Authentication successful\r\n"
    client.send(b"AUTH LOGIN\r\n")
    assert client.reply().startswith(b"503")  # RFC 4954: one AUTH a session
    first, second = b"Subject: chunks\r\n\r\n.not stuffed in BDAT\r\n", b"\x00binary\xff\r\n"
    client.send(b"MAIL FROM:<alice@lab.test>\r\nRCPT TO:<bob@lab.test>\r\nBDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(second) + second)
    assert [client.reply()[:3] for _ in range(4)] == [b"250"] * 4
    assert received_last(mail_lab)["via"] == "BDAT" and received_last(mail_lab)["sha256"] == hashlib.sha256(first + second).hexdigest()


def test_submission_discards_commands_pipelined_after_starttls(mail_lab):
    raw = socket.create_connection(("127.0.0.1", mail_lab.mail_port("submission")), timeout=10)
    raw.recv(1024)
    raw.sendall(b"EHLO c\r\n")
    time.sleep(0.2)
    raw.recv(4096)
    raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil>\r\n")
    assert raw.recv(1024) == b"220 2.0.0 SMTP server ready\r\n"
    tls = legacy_client_context().wrap_socket(raw)
    tls.sendall(b"NOOP\r\n")
    assert tls.recv(1024) == b"250 2.0.0 OK\r\n"  # the injected MAIL got no answer: it was dropped
    tls.close()


# --------------------------------------------------------------------------- curl


CURL_TLS10 = ["--tlsv1.0", "--tls-max", "1.0", "--ciphers", "AES128-SHA:@SECLEVEL=0", "-k", "-sS"]
needs_curl = pytest.mark.skipif(not curl_speaks_tls10(), reason="curl with OpenSSL and NTLM is needed")


def curl(*arguments: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", *CURL_TLS10, *arguments], capture_output=True, timeout=timeout)


@needs_curl
@pytest.mark.parametrize("mechanism", ["PLAIN", "NTLM"])
def test_curl_pop3s_lists_and_retrieves(mail_lab, mechanism):
    base = f"pop3s://127.0.0.1:{mail_lab.mail_port('pop3')}/"
    listing = curl("-u", f"{LAB_USER}:{LAB_PASSWORD}", "--login-options", f"AUTH={mechanism}", base)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.decode().splitlines() == [f"{message.uid} {message.size}" for message in MAILBOX]
    message = curl("-u", f"{LAB_USER}:{LAB_PASSWORD}", "--login-options", f"AUTH={mechanism}", base + "2")
    assert message.returncode == 0, message.stderr
    assert message.stdout == MAILBOX[1].data()
    assert mail_lab.mail_counters.logons[f"pop3 {mechanism}"] >= 2


@needs_curl
def test_curl_pop3s_wrong_password_fails(mail_lab):
    result = curl("-u", f"{LAB_USER}:wrong", "--login-options", "AUTH=PLAIN", f"pop3s://127.0.0.1:{mail_lab.mail_port('pop3')}/")
    assert result.returncode == 67  # CURLE_LOGIN_DENIED


@needs_curl
@pytest.mark.parametrize("service, mechanism", [("smtp", "LOGIN"), ("smtp", "NTLM"), ("submission", "LOGIN")])
def test_curl_sends_mail(mail_lab, tmp_path, service, mechanism):
    body = f"Subject: curl {service} {mechanism}\r\n\r\n.dot line\r\n".encode()
    (tmp_path / "mail.txt").write_bytes(body)
    scheme = "smtps" if service == "smtp" else "smtp"
    extra = ["--ssl-reqd"] if service == "submission" else []
    url = f"{scheme}://127.0.0.1:{mail_lab.mail_port(service)}/client.example"
    envelope = ["--mail-from", "alice@lab.test", "--mail-rcpt", "bob@lab.test", "-T", str(tmp_path / "mail.txt")]
    result = curl(*extra, "-u", f"{LAB_USER}:{LAB_PASSWORD}", "--login-options", f"AUTH={mechanism}", *envelope, url)
    assert result.returncode == 0, result.stderr
    assert received_last(mail_lab)["sha256"] == hashlib.sha256(body).hexdigest() and received_last(mail_lab)["service"] == service


# --------------------------------------------------------------------------- the observers relaying real clients to the lab


class ObserverRelay:
    """A plain TCP listener whose every connection is relayed to a lab TLS port through an observer:
    the smallest bridge (no TLS on the client's side), to check the observers against real clients."""

    def __init__(self, lab_port: int, make_observer) -> None:
        self.lab_port, self.make_observer = lab_port, make_observer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.events: list[object] = []
        self.bytes_after_logon = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        server = legacy_client_context().wrap_socket(socket.create_connection(("127.0.0.1", self.lab_port)))
        observer = self.make_observer()
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, "c")
        selector.register(server, selectors.EVENT_READ, "s")
        try:
            while True:
                ready = [key.data for key, _ in selector.select(30)] or ["timeout"]
                if server.pending():
                    ready.append("s")
                for side in dict.fromkeys(ready):
                    if side == "timeout":
                        return
                    data = (client if side == "c" else server).recv(262144)
                    if not data:
                        return
                    if observer.passthrough:
                        self.bytes_after_logon += len(data)
                    out = observer.client_data(data) if side == "c" else observer.server_data(data)
                    self.events += out.events
                    server.sendall(out.to_server) if out.to_server else None
                    client.sendall(out.to_client) if out.to_client else None
                    if out.close:
                        return
        except (OSError, ssl.SSLError):
            return
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self.listener.close()


def test_pop3_observer_relays_poplib_to_the_lab(mail_lab):
    relay = ObserverRelay(mail_lab.mail_port("pop3"), Pop3Observer)
    try:
        client = poplib.POP3("127.0.0.1", relay.port, timeout=60)
        assert client.capa() == {"TOP": [], "UIDL": [], "SASL": ["NTLM", "PLAIN"], "USER": []}  # GSSAPI cut
        client.user(LAB_USER)
        with pytest.raises(poplib.error_proto):
            client.pass_("wrong")
        client.user(LAB_USER)
        client.pass_(LAB_PASSWORD)
        _, lines, _ = client.retr(LARGE.uid)
        assert retrieved_sha256(lines) == LARGE.sha256
        client.quit()
    finally:
        relay.close()
    assert [event for event in relay.events if isinstance(event, LogonFailed | LogonSucceeded | Passthrough)] == [
        LogonFailed("USER", LAB_USER, "-ERR Logon failure: unknown user name or bad password."),
        LogonSucceeded("USER", LAB_USER),
        Passthrough(),
    ]
    assert relay.bytes_after_logon > LARGE.size


def test_smtp_observer_relays_smtplib_to_the_lab(mail_lab):
    relay = ObserverRelay(mail_lab.mail_port("smtp"), SmtpObserver)
    body = b"Subject: through the observer\r\n\r\n" + b"".join(LARGE.chunks())
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
            client.ehlo("client.example")
            assert client.esmtp_features["auth"].strip() == "NTLM LOGIN"  # GSSAPI cut, no STARTTLS (the relay does not answer it)
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("alice@lab.test", "wrong")
            client.login("alice@lab.test", LAB_PASSWORD)
            client.sendmail("alice@lab.test", ["bob@lab.test"], body)
    finally:
        relay.close()
    assert [event for event in relay.events if isinstance(event, LogonFailed | LogonSucceeded)] == [
        LogonFailed("LOGIN", "alice@lab.test", "535 5.7.3 Authentication unsuccessful"),
        LogonSucceeded("LOGIN", "alice@lab.test"),
    ]
    assert received_last(mail_lab)["sha256"] == hashlib.sha256(body).hexdigest() and len(body) > LARGE_ATTACHMENT_BYTES
