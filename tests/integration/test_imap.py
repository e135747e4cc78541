"""IMAPS through the bridge, with clients this project did not write: Python's imaplib and curl, against
the lab's IMAP4 service (Exchange 2007's wording, TLS 1.0 only). Logons (LOGIN, AUTHENTICATE PLAIN and
NTLM), every message fetched and compared (the 25 MB one too), IDLE held across a pause, failed logons
banning the source for IMAPS and HTTPS alike, banned sources closed before TLS, no password in any log
line, and hostile input answered or closed without reaching the lab or another session."""

from __future__ import annotations

import base64
import hashlib
import imaplib
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest
import spnego
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_client_context, bridge_config, bridge_session, ca_file, resolve_lab_names
from support.lab import LAB_PASSWORD, LAB_USER
from support.net import greeted_tls_connection, read_all, receive_line, wait_until

from bridge.config import LegacyServer
from bridge.lab.imap import LARGE_MESSAGE_SIZE, mailbox_messages
from bridge.ops.status import mail_snapshot, snapshot

EWS = "/EWS/Exchange.asmx"


@pytest.fixture(scope="module")
def imap_lab(lab_factory):
    return lab_factory(imap_port=0)


@pytest.fixture
def imap_bridge(imap_lab, ca, tmp_path, background_bridges):
    """start(**config overrides) -> BackgroundBridge with --imaps-port in front of the lab's IMAP4 service."""
    count = iter(range(1000))

    def start(**overrides) -> BackgroundBridge:
        settings = dict(imaps_port=0, imap_upstream=LegacyServer("127.0.0.1", imap_lab.imap_port))
        settings.update(overrides)
        return background_bridges(bridge_config(imap_lab.port, tmp_path / f"bridge{next(count)}", ca, **settings))

    return start


def imaps_port(bridge: BackgroundBridge) -> int:
    return bridge.bridge.mail_ports["imap"]


def client(bridge: BackgroundBridge, ca, timeout: float = 30.0) -> imaplib.IMAP4_SSL:
    resolve_lab_names()
    return imaplib.IMAP4_SSL(BRIDGE_FQDN, imaps_port(bridge), ssl_context=bridge_client_context(ca), timeout=timeout)


def raw_session(bridge: BackgroundBridge, ca) -> tuple[ssl.SSLSocket, bytes]:
    return greeted_tls_connection(imaps_port(bridge), ca)


# --------------------------------------------------------------------------- real clients


def test_imaplib_logs_on_lists_selects_and_fetches_every_message_then_idles_across_a_pause(imap_bridge, imap_lab, ca, caplog):
    caplog.set_level(logging.INFO, logger="bridge")
    bridge = imap_bridge(idle_timeout=30)
    imap = client(bridge, ca)
    assert imap.welcome == b"* OK The Microsoft Exchange IMAP4 service is ready."
    capabilities = set(imap.capabilities)
    assert {"IMAP4REV1", "AUTH=NTLM", "AUTH=PLAIN", "IDLE", "LITERAL+"} <= capabilities
    assert not capabilities & {"AUTH=GSSAPI", "STARTTLS", "LOGINDISABLED"}  # what the front really offers
    assert imap.login(LAB_USER, LAB_PASSWORD)[0] == "OK"
    status, folders = imap.list()
    assert status == "OK" and b'(\\HasNoChildren) "/" INBOX' in folders
    status, [count] = imap.select("INBOX")
    messages = mailbox_messages()
    assert status == "OK" and int(count) == len(messages)
    started = time.monotonic()
    for number, expected in enumerate(messages, start=1):
        status, data = imap.fetch(str(number), "(UID RFC822.SIZE BODY[])")
        assert status == "OK"
        head, body = data[0]
        assert f"UID {number} RFC822.SIZE {len(expected)}".encode() in head
        assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest(), f"message {number} differs"
    seconds = time.monotonic() - started
    assert len(messages[-1]) > LARGE_MESSAGE_SIZE
    # IDLE, held across a pause in which nothing moves, then ended by DONE
    tag = imap._new_tag()
    imap.send(tag + b" IDLE\r\n")
    assert imap.readline().startswith(b"+ IDLE accepted")
    time.sleep(3)
    imap.send(b"DONE\r\n")
    assert imap.readline() == tag + b" OK IDLE completed.\r\n"
    assert imap.noop()[0] == "OK"
    assert imap.logout()[0] == "BYE"
    assert wait_until(lambda: "imap user=LAB\\alice logged-on" in caplog.text)
    line = next(line for line in caplog.text.splitlines() if "imap user=LAB\\alice logged-on" in line)
    received = int(line.split(" out=")[1].split()[0])
    assert received > sum(len(message) for message in messages)
    assert seconds < 30, f"fetching {sum(map(len, messages)) / 1e6:.0f} MB took {seconds:.1f} s"
    mail = mail_snapshot(bridge.bridge)
    assert mail["imap"]["sessions"] == {"logged-on": 1} and mail["imap"]["logons"]["ok"] == 1
    assert mail["imap"]["bytes_out"] == received


@pytest.mark.parametrize("mechanism", ["PLAIN", "NTLM"])
def test_imaplib_authenticate_plain_and_ntlm(imap_bridge, ca, mechanism):
    bridge = imap_bridge()
    imap = client(bridge, ca)
    if mechanism == "PLAIN":
        status, _ = imap.authenticate("PLAIN", lambda challenge: f"\0{LAB_USER}\0{LAB_PASSWORD}".encode())
    else:
        context = spnego.client(LAB_USER, LAB_PASSWORD, protocol="ntlm")
        status, _ = imap.authenticate("NTLM", lambda challenge: context.step(challenge or None))
    assert status == "OK"
    assert imap.select("INBOX")[0] == "OK"
    assert imap.fetch("1", "(BODY.PEEK[])")[1][0][1] == mailbox_messages()[0]
    imap.logout()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_imaps_lists_and_fetches_through_the_bridge(imap_bridge, ca, tmp_path):
    bridge = imap_bridge()
    port = imaps_port(bridge)
    base = ["curl", "--silent", "--show-error", "--cacert", str(ca_file(ca, tmp_path)), "--resolve", f"{BRIDGE_FQDN}:{port}:127.0.0.1", "--user", f"{LAB_USER}:{LAB_PASSWORD}"]
    listing = subprocess.run([*base, f"imaps://{BRIDGE_FQDN}:{port}/"], capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert b'"/" INBOX' in listing.stdout
    fetched = subprocess.run([*base, f"imaps://{BRIDGE_FQDN}:{port}/INBOX;UID=2"], capture_output=True, timeout=30)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == mailbox_messages()[1]
    wrong = subprocess.run([*base[:-1], f"{LAB_USER}:wrong", f"imaps://{BRIDGE_FQDN}:{port}/"], capture_output=True, timeout=30)
    assert wrong.returncode == 67  # CURLE_LOGIN_DENIED
    assert wait_until(lambda: bridge.bridge.bans.failures_by_protocol["imap"] == 1)


# --------------------------------------------------------------------------- bans and logs


def test_ten_failed_logons_ban_the_source_for_imaps_and_https_before_tls(imap_bridge, imap_lab, ca, caplog):
    caplog.set_level(logging.DEBUG)
    bridge = imap_bridge()
    for attempt in range(10):
        imap = client(bridge, ca)
        with pytest.raises(imaplib.IMAP4.error) as failed:
            imap.login(LAB_USER, f"wrong-{attempt}")
        assert "LOGIN failed." in str(failed.value)
        if attempt < 9:
            imap.logout()
    assert bridge.bridge.bans.failures_by_protocol["imap"] == 10
    assert "127.0.0.1" in bridge.bridge.bans.active()
    connections = imap_lab.imap.counters.connections
    with pytest.raises((ConnectionError, ssl.SSLError, imaplib.IMAP4.abort, OSError)):
        client(bridge, ca, timeout=5)  # closed before TLS
    assert imap_lab.imap.counters.connections == connections
    refused = bridge_session(ca, auth=(LAB_USER, LAB_PASSWORD)).get(bridge.url + EWS)
    assert refused.status_code == 403  # the same ban holds on the HTTPS port
    data = snapshot(bridge.bridge)
    assert data["rejected"]["banned"] >= 1 and data["mail"]["imap"]["logons"]["failed"] == 10
    assert LAB_PASSWORD not in caplog.text and "wrong-3" not in caplog.text
    assert "banned 127.0.0.1 for 3600 s after 10 failed logons in 600 s (the last over imap)" in caplog.text


def test_no_password_or_sasl_blob_in_any_log_line(imap_bridge, ca, caplog):
    caplog.set_level(logging.DEBUG)
    bridge = imap_bridge()
    secrets = [LAB_PASSWORD, base64.b64encode(f"\0{LAB_USER}\0{LAB_PASSWORD}".encode()).decode(), "Wr0ng-Secret"]
    imap = client(bridge, ca)
    with pytest.raises(imaplib.IMAP4.error):
        imap.authenticate("PLAIN", lambda challenge: f"\0{LAB_USER}\0Wr0ng-Secret".encode())
    context = spnego.client(LAB_USER, LAB_PASSWORD, protocol="ntlm")
    blobs: list[bytes] = []

    def ntlm(challenge: bytes) -> bytes:
        blobs.append(context.step(challenge or None))
        return blobs[-1]

    assert imap.authenticate("NTLM", ntlm)[0] == "OK"
    imap.logout()
    imap = client(bridge, ca)
    imap.login(LAB_USER, LAB_PASSWORD)
    imap.logout()
    assert wait_until(lambda: caplog.text.count("imap user=LAB\\alice logged-on") == 2)
    secrets += [base64.b64encode(blob).decode()[:40] for blob in blobs]
    # the bridge's own lines (pyspnego, in this process for the lab and the client, logs its blobs at DEBUG)
    bridge_lines = "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("bridge") and not record.name.startswith("bridge.lab"))
    assert "imap user=LAB\\alice logon-failed" in bridge_lines or "logged-on" in bridge_lines
    for secret in secrets:
        assert secret not in bridge_lines


# --------------------------------------------------------------------------- hostile input


def test_hostile_input_is_answered_or_closed_without_reaching_the_lab_or_another_session(imap_bridge, imap_lab, ca):
    bridge = imap_bridge()
    counters = imap_lab.imap.counters
    other = client(bridge, ca)  # a session in progress beside the hostile ones
    other.login(LAB_USER, LAB_PASSWORD)
    other.select("INBOX")
    logins = counters.commands["LOGIN"]

    # a literal announced as 4 GB: answered, the session goes on, nothing reached the lab
    sock, greeting = raw_session(bridge, ca)
    assert greeting.startswith(b"* OK ")
    sock.sendall(b"a1 LOGIN {4294967296}\r\n")
    assert receive_line(sock) == b"a1 BAD The literal of 4294967296 bytes is larger than the 65536 bytes the bridge accepts before a logon.\r\n"
    sock.sendall(b"a2 LOGIN {4294967296+}\r\n" + b"x" * 65536)
    assert read_all(sock, timeout=30).startswith(b"* BYE The literal of 4294967296 bytes")
    assert counters.commands["LOGIN"] == logins

    # a line of 1 MB: closed with one sentence
    sock, _ = raw_session(bridge, ca)
    longest = counters.longest_line
    try:
        sock.sendall(b"a1 LOGIN " + b"x" * (1024 * 1024) + b"\r\n")
    except (ConnectionError, ssl.SSLError):
        pass
    assert read_all(sock, timeout=30).startswith(b"* BYE The command line is longer than the 65536 bytes")
    assert counters.longest_line == longest

    # a command injected where a SASL response belongs: closed, never reaches the lab
    sock, _ = raw_session(bridge, ca)
    sock.sendall(b"a1 AUTHENTICATE PLAIN\r\n")
    assert receive_line(sock) == b"+ \r\n"
    sock.sendall(b"a2 DELETE INBOX\r\n")
    assert read_all(sock, timeout=30).startswith(b"* BYE The answer to the server's authentication challenge is not base64")
    assert wait_until(lambda: counters.commands["AUTHENTICATE"] >= 1)
    assert "DELETE" not in counters.commands

    # plain text on the implicit-TLS port: one line saying so, before any TLS
    with socket.create_connection(("127.0.0.1", imaps_port(bridge)), timeout=10) as plain:
        plain.sendall(b"a1 CAPABILITY\r\n")
        assert plain.recv(1024) == b"* BYE This port speaks TLS from the first byte; connect with TLS (IMAPS).\r\n"

    # the other session is unharmed
    assert other.fetch("1", "(BODY[])")[1][0][1] == mailbox_messages()[0]
    other.logout()
    assert "refused" in snapshot(bridge.bridge)["mail"]["imap"]["sessions"]


def test_upstream_starttls_and_a_wrong_pin(lab_factory, ca, tmp_path):
    lab = lab_factory(imap_port=0, imap_tls="starttls")
    config = bridge_config(lab.port, tmp_path, ca, imaps_port=0, imap_upstream=LegacyServer("127.0.0.1", lab.imap_port), imap_upstream_tls="starttls", legacy_fingerprint=lab.fingerprint)
    with BackgroundBridge(config) as bridge:
        imap = client(bridge, ca)
        assert not {"STARTTLS", "LOGINDISABLED"} & set(imap.capabilities)
        assert imap.login(LAB_USER, LAB_PASSWORD)[0] == "OK"
        imap.select("INBOX")
        assert imap.fetch("3", "(BODY[])")[1][0][1] == mailbox_messages()[2]
        imap.logout()
    wrong = bridge_config(lab.port, tmp_path / "pinned", ca, imaps_port=0, imap_upstream=LegacyServer("127.0.0.1", lab.imap_port), imap_upstream_tls="starttls", legacy_fingerprint="00" * 32)
    with BackgroundBridge(wrong) as bridge:
        sock, greeting = raw_session(bridge, ca)
        assert greeting == b"* BYE The mail server cannot be reached through the bridge; try again later.\r\n"


def test_many_sessions_at_once_share_max_connections_with_https(imap_bridge, ca):
    bridge = imap_bridge(max_connections=2)
    first, second = client(bridge, ca), client(bridge, ca)
    sock, greeting = raw_session(bridge, ca)
    assert greeting == b"* BYE The bridge has too many open connections; try again shortly.\r\n"
    first.logout()
    second.logout()
    assert wait_until(lambda: bridge.bridge.guard.open_connections == 0)
    threads = [threading.Thread(target=lambda: client(bridge, ca).logout()) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)


def test_a_session_where_nothing_moves_for_idle_timeout_is_closed(imap_bridge, ca, caplog):
    caplog.set_level(logging.INFO, logger="bridge")
    bridge = imap_bridge(idle_timeout=1)
    sock, _ = raw_session(bridge, ca)
    sock.sendall(b"a1 LOGIN alice Passw0rd!\r\n")
    assert receive_line(sock) == b"a1 OK LOGIN completed.\r\n"
    started = time.monotonic()
    assert read_all(sock, timeout=30) == b"* BYE The session was idle for too long.\r\n"
    assert 0.9 < time.monotonic() - started < 5
    assert wait_until(lambda: "imap user=alice idle-timeout" in caplog.text)
