"""The simulated Exchange 2007: real sockets on 127.0.0.1, real TLS 1.0, real NTLM."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from requests_ntlm import HttpNtlmAuth
from support.lab import (
    LAB_PASSWORD,
    RawHttpsConnection,
    basic_header,
    curl_legacy,
    curl_speaks_tls10,
    https_connection,
    legacy_client_context,
    legacy_session,
    negotiate_logon,
    ntlm_session,
    start_background_lab,
)
from support.net import free_port

from bridge.errors import StartupError
from bridge.lab.server import LabOptions, payload_sha256, start_lab

EWS = "/EWS/Exchange.asmx"
AUTODISCOVER = "/Autodiscover/Autodiscover.xml"
RPC = "/rpc/rpcproxy.dll?EXCH2007.lab.local:6001"
POX_NS = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
POX_REQUEST = (
    '<?xml version="1.0" encoding="utf-8"?>'
    '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">'
    "<Request><EMailAddress>alice@lab.test</EMailAddress>"
    "<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>"
    "</Request></Autodiscover>"
)


def tls_peer(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(raw)


# --------------------------------------------------------------------------- TLS shapes


def test_default_shape_is_tls10_aes128_sha_with_legacy_certificate(lab):
    context = legacy_client_context(ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1, "AES128-SHA:@SECLEVEL=0")
    with tls_peer(lab.port, context) as sock:
        assert sock.version() == "TLSv1"
        assert sock.cipher()[0] == "AES128-SHA"
        der = sock.getpeercert(binary_form=True)
    assert hashlib.sha256(der).hexdigest() == lab.fingerprint
    cert = x509.load_der_x509_certificate(der)
    assert cert.public_key().key_size == 1024
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA1)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "exch2007.lab.test" in names.get_values_for_type(x509.DNSName)


def test_tls10_extensions_are_schannels_no_encrypt_then_mac_no_ticket(lab):
    """OpenSSL's own client says which extensions the lab's ServerHello carries: Schannel of Exchange
    2007's era never sends encrypt-then-MAC (RFC 7366) or a session ticket."""
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{lab.port}", "-tls1", "-cipher", "AES128-SHA:@SECLEVEL=0", "-tlsextdebug"],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    extensions = [line for line in result.stdout.splitlines() if line.startswith("TLS server extension")]
    assert any("renegotiation info" in line for line in extensions), result.stdout[-2000:]  # (the output was read)
    assert not any("encrypt-then-mac" in line for line in extensions), extensions
    assert not any("session ticket" in line for line in extensions), extensions
    assert "Cipher is AES128-SHA" in result.stdout


def test_default_shape_refuses_a_tls12_only_client(lab):
    with pytest.raises(ssl.SSLError):
        tls_peer(lab.port, legacy_client_context(ssl.TLSVersion.TLSv1_2))


def test_tls12_shape_accepts_tls12_with_ecdhe_gcm(lab_factory):
    with tls_peer(lab_factory(tls_max="1.2").port, legacy_client_context(ssl.TLSVersion.TLSv1_2)) as sock:
        assert sock.version() == "TLSv1.2"
        assert "GCM" in sock.cipher()[0]


def test_expired_certificate_shape(lab_factory):
    expired = lab_factory(expired_cert=True)
    with tls_peer(expired.port, legacy_client_context()) as sock:
        der = sock.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    assert hashlib.sha256(der).hexdigest() == expired.fingerprint


# --------------------------------------------------------------------------- authentication


def test_unauthenticated_request_gets_separate_challenges_in_iis_order(lab):
    connection = https_connection(lab.port)
    connection.request("GET", EWS)
    response = connection.getresponse()
    response.read()
    assert response.status == 401
    assert response.headers.get_all("WWW-Authenticate") == ["Negotiate", "NTLM", 'Basic realm="exch2007.lab.test"']
    assert response.headers["Server"] == "Microsoft-IIS/7.0"


def test_ntlm_logon_with_requests_ntlm(lab):
    before = lab.counters.auth_successes.get("ntlm", 0)
    with ntlm_session() as session:
        assert session.get(lab.url + EWS).status_code == 200
        assert session.get(lab.url + EWS).status_code == 200  # same connection: no new handshake
    with ntlm_session() as session:
        # The POST body is sent with every handshake leg: the lab drains it and keeps the connection.
        response = session.post(lab.url + AUTODISCOVER, data=POX_REQUEST, headers={"Content-Type": "text/xml"})
        assert response.status_code == 200
    assert lab.counters.auth_successes["ntlm"] == before + 2


def test_ntlm_wrong_password_gets_401(lab):
    before = lab.counters.auth_failures.get("ntlm", 0)
    with legacy_session(HttpNtlmAuth("LAB\\alice", "wrong")) as session:
        assert session.get(lab.url + EWS).status_code == 401
    assert lab.counters.auth_failures["ntlm"] == before + 1


@pytest.mark.skipif(not curl_speaks_tls10(), reason="curl with OpenSSL and NTLM is needed")
def test_ntlm_logon_with_curl(lab):
    assert curl_legacy(lab.url + EWS, "--ntlm", "-u", f"LAB\\alice:{LAB_PASSWORD}").stdout == "200"
    assert curl_legacy(lab.url + EWS, "--ntlm", "-u", "LAB\\alice:nope").stdout == "401"


def test_ntlm_authenticates_the_connection_not_the_client(lab):
    first = https_connection(lab.port)
    assert negotiate_logon(first, EWS).status == 200
    first.request("GET", EWS)  # no Authorization: the connection is authenticated
    follow_up = first.getresponse()
    follow_up.read()
    assert follow_up.status == 200

    second = https_connection(lab.port)
    second.request("GET", EWS)
    other = second.getresponse()
    other.read()
    assert other.status == 401
    first.close()
    second.close()


@pytest.mark.parametrize("scheme, protocol", [("Negotiate", "ntlm"), ("Negotiate", "negotiate")], ids=["raw-ntlm", "spnego"])
def test_negotiate_scheme_with_raw_ntlm_or_spnego_tokens(lab, scheme, protocol):
    connection = https_connection(lab.port)
    response = negotiate_logon(connection, EWS, scheme=scheme, protocol=protocol)
    assert response.status == 200
    if protocol == "negotiate":  # SPNEGO's accept-complete token comes back with the 200
        assert response.headers["WWW-Authenticate"].startswith("Negotiate ")
    connection.close()


@pytest.mark.parametrize("user", ["alice", "LAB\\alice", "alice@lab.test"])
def test_user_name_forms_for_basic_and_ntlm(lab, user):
    with legacy_session((user, LAB_PASSWORD)) as session:
        assert session.get(lab.url + EWS).status_code == 200
    connection = https_connection(lab.port)
    assert negotiate_logon(connection, EWS, user=user).status == 200
    connection.close()


def test_basic_is_checked_on_every_request(lab):
    with legacy_session() as session:
        assert session.get(lab.url + EWS, headers={"Authorization": basic_header()}).status_code == 200
        assert session.get(lab.url + EWS).status_code == 401
        assert session.get(lab.url + EWS, headers={"Authorization": basic_header(password="bad")}).status_code == 401


def test_auth_basic_offers_only_basic(lab_factory):
    connection = https_connection(lab_factory(auth="basic").port)
    connection.request("GET", EWS)
    response = connection.getresponse()
    response.read()
    assert response.headers.get_all("WWW-Authenticate") == ['Basic realm="exch2007.lab.test"']
    assert negotiate_logon(connection, EWS).status == 401


# --------------------------------------------------------------------------- OWA, EWS, Autodiscover


def test_owa_redirects_to_the_configured_hostname(lab):
    with legacy_session() as session:
        for path in ("/owa", "/OWA/"):
            response = session.get(lab.url + path, allow_redirects=False)
            assert response.status_code == 302
            assert response.headers["Location"] == ("https://exch2007.lab.test/owa/auth/logon.aspx?url=https://exch2007.lab.test/owa/&reason=0")
        logon = session.get(lab.url + "/owa/auth/logon.aspx")
        assert logon.status_code == 200 and "<form" in logon.text


def test_ews_get_and_soap_post(lab):
    with legacy_session(("LAB\\alice", LAB_PASSWORD)) as session:
        assert session.get(lab.url + "/ews/exchange.ASMX").status_code == 200
        soap = '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><GetFolder/></soap:Body></soap:Envelope>'
        response = session.post(lab.url + EWS, data=soap, headers={"Content-Type": "text/xml"})
        assert response.status_code == 200
        assert "GetFolderResponse" in response.text and "soap:Envelope" in response.text


def autodiscover_protocols(xml_text: str) -> dict[str, ET.Element]:
    root = ET.fromstring(xml_text)
    return {p.findtext(f"{POX_NS}Type"): p for p in root.iter(f"{POX_NS}Protocol")}


def test_autodiscover_post_answers_exch_and_expr(lab):
    with legacy_session(("alice@lab.test", LAB_PASSWORD)) as session:
        response = session.post(lab.url + AUTODISCOVER, data=POX_REQUEST, headers={"Host": "mail.example.com:443"})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/xml")
    protocols = autodiscover_protocols(response.text)
    exch, expr = protocols["EXCH"], protocols["EXPR"]
    assert exch.findtext(f"{POX_NS}Server") == "EXCH2007.lab.local"
    assert "cn=EXCH2007" in exch.findtext(f"{POX_NS}ServerDN")
    assert exch.findtext(f"{POX_NS}MdbDN").endswith("/cn=Microsoft Private MDB")
    assert exch.findtext(f"{POX_NS}AuthPackage") == "Ntlm"
    assert expr.findtext(f"{POX_NS}Server") == "mail.example.com"
    assert expr.findtext(f"{POX_NS}SSL") == "On"
    assert expr.findtext(f"{POX_NS}AuthPackage") == "Ntlm"
    assert ET.fromstring(response.text).find(f".//{POX_NS}LegacyDN").text.endswith("/cn=Recipients/cn=alice")


def test_autodiscover_get_answers_error_600(lab):
    with legacy_session(("alice", LAB_PASSWORD)) as session:
        response = session.get(lab.url + AUTODISCOVER)
    assert response.status_code == 200
    assert "<ErrorCode>600</ErrorCode>" in response.text and "Invalid Request" in response.text


def test_unknown_path_is_404(lab):
    with legacy_session() as session:
        assert session.get(lab.url + "/exchange/").status_code == 404


# --------------------------------------------------------------------------- Outlook Anywhere


@pytest.mark.parametrize("method, body", [("RPC_IN_DATA", b""), ("RPC_OUT_DATA", b"ping")])
def test_rpc_echo_answers_20_bytes(lab, method, body):
    with RawHttpsConnection(lab.port) as conn:
        conn.send_head(method, RPC, {"Authorization": basic_header(), "Content-Length": str(len(body)), "User-Agent": "MSRPC"})
        conn.send(body)
        status, headers = conn.read_head()
        assert (status, headers["content-length"], headers["content-type"]) == (200, "20", "application/rpc")
        assert len(conn.read_body(20)) == 20
    assert lab.counters.rpc_targets["EXCH2007.lab.local:6001"] >= 1


def test_rpc_out_data_streams_the_requested_payload(lab):
    size = 3 * 1024 * 1024 + 123
    before = lab.counters.rpc_out_bytes
    with RawHttpsConnection(lab.port) as conn:
        conn.send_head("RPC_OUT_DATA", RPC, {"Authorization": basic_header(), "Content-Length": "76", "X-Lab-Out-Size": str(size)})
        conn.send(b"\0" * 76)
        status, headers = conn.read_head()
        assert (status, headers["content-type"], int(headers["content-length"])) == (200, "application/rpc", size)
        assert hashlib.sha256(conn.read_body(size)).hexdigest() == payload_sha256(size)
    assert lab.counters.rpc_out_bytes == before + size


def test_rpc_in_data_counts_bytes_while_the_client_is_still_sending(lab):
    part, total = 1024 * 1024, 4 * 1024 * 1024
    body = os.urandom(total)
    start = lab.counters.rpc_in_bytes
    with RawHttpsConnection(lab.port) as conn:
        conn.send_head("RPC_IN_DATA", RPC, {"Authorization": basic_header(), "Content-Length": str(total)})
        conn.send(body[:part])
        deadline = time.monotonic() + 5
        while lab.counters.rpc_in_bytes - start < part and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lab.counters.rpc_in_bytes - start == part
        assert not conn.has_pending_bytes(0.1)  # no answer before the whole body
        conn.send(body[part:])
        status, headers = conn.read_head()
    assert status == 200 and headers["content-length"] == "0"
    assert headers["x-lab-received-bytes"] == str(total)
    assert headers["x-lab-received-sha256"] == hashlib.sha256(body).hexdigest()


def test_rpc_disabled_gives_404(lab_factory):
    with legacy_session(("alice", LAB_PASSWORD)) as session:
        assert session.request("RPC_IN_DATA", lab_factory(rpc=False).url + RPC, data=b"").status_code == 404


# --------------------------------------------------------------------------- Expect: 100-continue


def test_expect_continue_is_answered_when_authenticated(lab):
    before = lab.counters.expect_continue_sent
    with RawHttpsConnection(lab.port) as conn:
        conn.send_head("POST", AUTODISCOVER, {"Authorization": basic_header(), "Expect": "100-continue", "Content-Length": str(len(POX_REQUEST))})
        assert conn.read_head()[0] == 100
        conn.send(POX_REQUEST.encode())
        status, headers = conn.read_head()
        assert status == 200
        conn.read_body(int(headers["content-length"]))
    assert lab.counters.expect_continue_sent == before + 1


def test_expect_continue_without_credentials_gets_a_final_401(lab):
    with RawHttpsConnection(lab.port) as conn:
        conn.send_head("POST", AUTODISCOVER, {"Expect": "100-continue", "Content-Length": "100"})
        status, headers = conn.read_head()
    assert status == 401
    assert headers["connection"] == "close"  # the unsent body must not be read as the next request


# --------------------------------------------------------------------------- counters, payload, lifecycle


def test_counters_record_requests_without_secrets(lab):
    with legacy_session(("LAB\\alice", LAB_PASSWORD)) as session:
        session.get(lab.url + EWS + "?probe=1", headers={"Cookie": "secret-cookie"})
        snapshot = session.get(lab.url + "/lab/counters").json()
    assert snapshot["connections"] >= 1 and snapshot["requests_total"] >= 2
    assert snapshot["requests_by_path"]["/ews/exchange.asmx"] >= 1
    probe = [entry for entry in snapshot["recent_requests"] if entry["query"] == "probe=1"][-1]
    assert probe["method"] == "GET" and probe["status"] == 200
    assert "Authorization" in probe["header_names"] and "Cookie" in probe["header_names"]
    text = json.dumps(snapshot)
    assert "secret-cookie" not in text and LAB_PASSWORD not in text


async def test_close_releases_the_port_for_a_restart(lab_state_dir):
    first = await start_lab(LabOptions(state_dir=lab_state_dir))
    port, fingerprint = first.port, first.fingerprint
    await first.close()
    second = await start_lab(LabOptions(state_dir=lab_state_dir, port=port))
    try:
        assert second.port == port
        assert second.fingerprint == fingerprint  # same state dir: same certificate, pins survive
    finally:
        await second.close()


def test_close_drops_open_connections_quickly(lab_state_dir):
    background = start_background_lab(lab_state_dir)
    with RawHttpsConnection(background.lab.port) as streaming, RawHttpsConnection(background.lab.port) as idle:
        streaming.send_head("RPC_IN_DATA", RPC, {"Authorization": basic_header(), "Content-Length": str(1024**3)})
        streaming.send(b"x" * 65536)
        idle.send_head("GET", "/lab/counters", {})
        idle.read_head()
        started = time.monotonic()
        background.shutdown()
        assert time.monotonic() - started < 3
        for conn in (streaming, idle):
            with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
                while True:
                    conn._receive()


def test_two_labs_with_different_users_in_one_process(lab, lab_factory):
    other = lab_factory(users={"CORP\\bob": "B0bPass"})
    bob = https_connection(other.port)
    assert negotiate_logon(bob, EWS, user="CORP\\bob", password="B0bPass").status == 200
    alice = https_connection(lab.port)
    assert negotiate_logon(alice, EWS).status == 200
    alice_on_other = https_connection(other.port)
    assert negotiate_logon(alice_on_other, EWS).status == 401


async def test_port_in_use_is_a_startup_error(lab_state_dir):
    lab = await start_lab(LabOptions(state_dir=lab_state_dir))
    try:
        with pytest.raises(StartupError, match="already in use"):
            await start_lab(LabOptions(state_dir=lab_state_dir, port=lab.port))
    finally:
        await lab.close()


def test_cli_prints_a_ready_line_and_stops_on_sigterm(lab_state_dir):
    port = free_port()
    command = [sys.executable, "-m", "bridge.cli", "lab", "--port", str(port), "--state-dir", str(lab_state_dir), "--user", "LAB\\bob:S3cret!"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert f"https://127.0.0.1:{port}" in line and "TLS 1.0 only" in line and "sha256" in line
        assert "S3cret!" not in line
        with legacy_session(("bob", "S3cret!")) as session:
            assert session.get(f"https://127.0.0.1:{port}{EWS}").status_code == 200
        busy = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert busy.returncode == 2 and "already in use" in busy.stderr and "Traceback" not in busy.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
