"""The bridge in front of the lab, over real sockets: TLS front end, forwarding rules, NTLM and Basic,
RPC over HTTP channels, failure and recovery. The lab's counters show what reached the legacy server."""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import socket
import ssl
import subprocess
import time

import pytest
from requests_ntlm import HttpNtlmAuth
from support.bridges import (
    BRIDGE_FQDN,
    BackgroundBridge,
    bridge_client_context,
    bridge_config,
    bridge_connection,
    bridge_session,
    ca_file,
    raw_bridge_connection,
    resolve_lab_names,
)
from support.lab import LAB_PASSWORD, LAB_USER, RawHttpsConnection, basic_header, negotiate_logon, start_background_lab

from bridge.certs.keys import LocalCA
from bridge.config import LegacyServer
from bridge.lab.server import payload_sha256

RPC_PATH = "/rpc/rpcproxy.dll?EXCH2007.lab.local:6001"


@pytest.fixture(scope="module")
def bridge(lab, ca, tmp_path_factory):
    with BackgroundBridge(bridge_config(lab.port, tmp_path_factory.mktemp("bridge"), ca)) as running:
        yield running


def raw(bridge: BackgroundBridge, ca: LocalCA) -> RawHttpsConnection:
    return raw_bridge_connection(bridge.https_port, ca)


# ---- front-end TLS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_clients_are_refused(bridge, ca, version):
    context = bridge_client_context(ca)
    context.minimum_version = version
    context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)), socket.create_connection(("127.0.0.1", bridge.https_port), timeout=5) as sock:
        context.wrap_socket(sock, server_hostname=BRIDGE_FQDN)


def test_rsa_key_exchange_and_cbc_suites_are_refused(bridge, ca):
    context = bridge_client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    context.set_ciphers("AES128-SHA:AES256-SHA:AES128-GCM-SHA256:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA")
    with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", bridge.https_port), timeout=5) as sock:
        context.wrap_socket(sock, server_hostname=BRIDGE_FQDN)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls12_and_tls13_with_alpn_http11(bridge, ca, version):
    context = bridge_client_context(ca, minimum_version=version, maximum_version=version)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", bridge.https_port), timeout=5) as sock, context.wrap_socket(sock, server_hostname=BRIDGE_FQDN) as tls:
        assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        assert tls.selected_alpn_protocol() == "http/1.1"
        cipher = tls.cipher()[0]
        assert "GCM" in cipher or "CHACHA20" in cipher


def test_curl_refuses_nothing_modern_and_old_tls_fails(bridge, ca, tmp_path):
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert.public_bytes(__import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.PEM))
    base = ["curl", "-sS", "--cacert", str(ca_file), "--resolve", f"{BRIDGE_FQDN}:{bridge.https_port}:127.0.0.1", "-o", "/dev/null", "-w", "%{http_code}"]
    url = f"{bridge.url}/EWS/Exchange.asmx"
    modern = subprocess.run([*base, "--ntlm", "-u", f"{LAB_USER}:{LAB_PASSWORD}", url], capture_output=True, text=True, timeout=30)
    assert modern.stdout == "200", modern.stderr
    old = subprocess.run([*base, "--tlsv1.0", "--tls-max", "1.1", url], capture_output=True, text=True, timeout=30)
    assert old.returncode != 0 and old.stdout == "000"


# ---- authentication -------------------------------------------------------------------------------


def test_ntlm_through_the_bridge(bridge, ca, lab):
    before = lab.counters.auth_successes.get("ntlm", 0)
    response = bridge_session(ca, HttpNtlmAuth(LAB_USER, LAB_PASSWORD)).get(f"{bridge.url}/EWS/Exchange.asmx", timeout=30)
    assert response.status_code == 200
    assert lab.counters.auth_successes.get("ntlm", 0) == before + 1


def test_ntlm_wrong_password_is_refused(bridge, ca):
    response = bridge_session(ca, HttpNtlmAuth(LAB_USER, "wrong")).get(f"{bridge.url}/EWS/Exchange.asmx", timeout=30)
    assert response.status_code == 401


def test_basic_through_the_bridge(bridge, ca):
    session = bridge_session(ca)
    assert session.get(f"{bridge.url}/EWS/Exchange.asmx", auth=(LAB_USER, LAB_PASSWORD), timeout=30).status_code == 200
    assert session.get(f"{bridge.url}/EWS/Exchange.asmx", auth=(LAB_USER, "nope"), timeout=30).status_code == 401


def test_ntlm_session_stays_on_its_connection_and_no_other(bridge, ca):
    """IIS binds NTLM to the TCP connection: the bridge must pin one upstream connection per client one."""
    first = bridge_connection(bridge.https_port, ca)
    assert negotiate_logon(first, "/EWS/Exchange.asmx").status == 200
    second = bridge_connection(bridge.https_port, ca)
    second.request("GET", "/EWS/Exchange.asmx")
    refused = second.getresponse()
    refused.read()
    assert refused.status == 401
    for _ in range(3):  # the authenticated connection stays authenticated without new credentials
        first.request("GET", "/EWS/Exchange.asmx")
        again = first.getresponse()
        again.read()
        assert again.status == 200
    first.close()
    second.close()


def test_repeated_www_authenticate_headers_stay_separate_and_in_order(bridge, ca, lab):
    with RawHttpsConnection(lab.port) as direct:
        direct.send_head("GET", "/EWS/Exchange.asmx", {})
        _, direct_headers = direct.read_raw_head()
    with raw(bridge, ca) as through:
        through.send_head("GET", "/EWS/Exchange.asmx", {})
        status, headers = through.read_raw_head()
    challenges = [v for n, v in headers if n.lower() == "www-authenticate"]
    assert "401" in status
    assert len(challenges) >= 2
    assert challenges == [v for n, v in direct_headers if n.lower() == "www-authenticate"]


def test_upstream_gets_exactly_the_client_headers_plus_forwarded(bridge, ca, lab):
    with raw(bridge, ca) as connection:
        connection.send_head("GET", "/EWS/Exchange.asmx", {"User-Agent": "MSRPC", "X-Custom": "1", "Connection": "keep-alive, X-Drop", "X-Drop": "hop"})
        connection.read_raw_head()
    seen = lab.counters.recent_requests[-1]
    assert seen["header_names"] == ["Host", "User-Agent", "X-Custom", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Port"]


def test_connection_may_name_many_headers_each_request_a_new_set(bridge, ca, lab):
    """The headers the client's Connection names are dropped, the others kept, whatever the names (a
    fresh set on each request, names that look like regular expressions): matched line by line, no
    pattern compiled per set (which let a client burn the bridge's CPU with long, changing lists)."""
    with raw(bridge, ca) as connection:
        for round_number in range(3):
            tokens = [f"x-{round_number}-{index}" for index in range(800)] + ["x.*", "a+b"]  # one line under the 8 KiB field limit
            headers = {"Connection": ", ".join(tokens), "x.*": "dropped", "A+B": "dropped", f"X-{round_number}-7": "dropped", "X-Kept": "kept"}
            connection.send_head("GET", "/EWS/Exchange.asmx", headers)
            status, _ = connection.read_raw_head()
            assert "200" in status or "401" in status
            seen = lab.counters.recent_requests[-1]
            assert seen["header_names"] == ["Host", "X-Kept", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Port"], seen["header_names"]


def test_pipelined_requests_are_answered_in_order_on_one_connection(bridge, ca, lab):
    """Three heads in one TLS write: forwarded, refused locally, forwarded; the answers keep their order."""
    heads = [f"GET {path} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\n\r\n" for path in ("/EWS/Exchange.asmx", "/admin/", "/owa/")]
    before = lab.counters.snapshot()["requests_total"]
    with raw(bridge, ca) as connection:
        connection.send("".join(heads).encode())
        statuses = []
        for _ in heads:
            status, headers = connection.read_head()
            connection.read_body(int(headers["content-length"]))
            statuses.append(status)
    assert statuses[1] == 404 and statuses[0] != 404 and statuses[2] != 404
    assert lab.counters.snapshot()["requests_total"] - before == 2


# ---- what is forwarded ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, status",
    [
        ("/", 404),
        ("/admin/", 404),
        ("/owax", 404),
        ("/owa/../admin", 400),
        ("/owa/%2e%2e/admin", 400),
        ("/owa/%252e%252e/admin", 400),
        ("/owa\\..\\admin", 400),
        ("http://evil.example/owa/", 400),
        ("/.well-known/acme-challenge/x", 404),
    ],
)
def test_paths_outside_the_list_never_reach_the_legacy_server(bridge, ca, lab, target, status):
    before = lab.counters.requests_total
    with raw(bridge, ca) as connection:
        connection.send(f"GET {target} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\n\r\n".encode())
        answer, _ = connection.read_raw_head()
    assert answer.split()[1] == str(status)
    assert lab.counters.requests_total == before


@pytest.mark.parametrize("path", ["/ews/exchange.asmx", "/EWS/Exchange.asmx", "/AUTODISCOVER/autodiscover.xml", "/OAB/", "/Microsoft-Server-ActiveSync"])
def test_exchange_paths_are_forwarded_case_insensitively(bridge, ca, lab, path):
    before = lab.counters.requests_total
    with raw(bridge, ca) as connection:
        connection.send_head("GET", path, {})
        connection.read_raw_head()
    assert lab.counters.requests_total == before + 1


def test_owa_redirect_points_at_the_bridge(bridge, ca):
    response = bridge_session(ca).get(f"{bridge.url}/owa", allow_redirects=False, timeout=30)
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(f"{bridge.url}/owa/auth/logon.aspx")
    assert "exch2007" not in location.lower()
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_port_80_redirects_to_https(bridge):
    connection = http.client.HTTPConnection("127.0.0.1", bridge.http_port, timeout=10)
    connection.request("GET", "/owa/?a=1", headers={"Host": BRIDGE_FQDN})
    response = connection.getresponse()
    response.read()
    assert response.status == 301
    assert response.getheader("Location") == f"{bridge.url}/owa/?a=1"
    connection.request("GET", "/.well-known/acme-challenge/unknown-token")
    challenge = connection.getresponse()
    challenge.read()
    assert challenge.status == 404


# ---- RPC over HTTP -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["RPC_IN_DATA", "RPC_OUT_DATA"])
@pytest.mark.parametrize("length", [0, 16])
def test_rpc_echo_requests_get_the_legacy_answer(bridge, ca, lab, method, length):
    with raw(bridge, ca) as connection:
        connection.send_head(method, RPC_PATH, {"Authorization": basic_header(), "Content-Length": str(length)})
        connection.send(b"\x05" * length)
        status, headers = connection.read_head()
        body = connection.read_body(int(headers["content-length"]))
    assert status == 200
    assert body[:2] == b"\x05\x00" and len(body) == 20  # an RTS PDU from the lab, byte for byte
    assert headers["server"] == "Microsoft-IIS/7.0"


def test_expect_100_continue_is_relayed_from_the_legacy_server(bridge, ca, lab):
    before = lab.counters.expect_continue_sent
    size = 1024 * 1024
    with raw(bridge, ca) as connection:
        connection.send_head("RPC_IN_DATA", RPC_PATH, {"Authorization": basic_header(), "Content-Length": str(size), "Expect": "100-continue"})
        status, _ = connection.read_head()
        assert status == 100
        deadline = time.monotonic() + 5  # the lab counts its 100 just after writing it
        while lab.counters.expect_continue_sent == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lab.counters.expect_continue_sent == before + 1
        connection.send(b"\x01" * size)
        status, headers = connection.read_head()
    assert status == 200
    assert headers["x-lab-received-sha256"] == hashlib.sha256(b"\x01" * size).hexdigest()


def test_rpc_out_data_keeps_content_length_framing(bridge, ca):
    size = 3 * 1024 * 1024 + 7
    with raw(bridge, ca) as connection:
        connection.send_head("RPC_OUT_DATA", RPC_PATH, {"Authorization": basic_header(), "Content-Length": "76", "X-Lab-Out-Size": str(size)})
        connection.send(b"\0" * 76)
        status, headers = connection.read_raw_head()
        names = {n.lower(): v for n, v in headers}
        assert "200" in status
        assert names["content-length"] == str(size) and "transfer-encoding" not in names
        body = connection.read_body(size)
    assert hashlib.sha256(body).hexdigest() == payload_sha256(size)


def test_rpc_in_data_reaches_the_legacy_server_while_the_client_is_still_sending(bridge, ca, lab):
    declared = 1024**3
    block = b"\x17" * (1024 * 1024)
    with raw(bridge, ca) as connection:
        start = lab.counters.rpc_in_bytes
        connection.send_head("RPC_IN_DATA", RPC_PATH, {"Authorization": basic_header(), "Content-Length": str(declared)})
        for _ in range(8):
            connection.send(block)
        deadline = time.monotonic() + 10
        while lab.counters.rpc_in_bytes - start < 6 * len(block) and time.monotonic() < deadline:
            time.sleep(0.05)
        arrived = lab.counters.rpc_in_bytes - start
        assert arrived >= 6 * len(block), f"only {arrived} bytes reached the legacy server"
        assert not connection.has_pending_bytes(0.2)  # no premature answer while the body flows


def test_slow_rpc_in_body_outlives_the_idle_timeout(lab, ca, tmp_path):
    """The upstream answers only at the end; a body that keeps flowing is activity, not idleness."""
    config = bridge_config(lab.port, tmp_path, ca, idle_timeout=1.0)
    with BackgroundBridge(config) as short_idle, raw(short_idle, ca) as connection:
        chunk, count = b"\x02" * 4096, 12
        connection.send_head("RPC_IN_DATA", RPC_PATH, {"Authorization": basic_header(), "Content-Length": str(len(chunk) * count)})
        for _ in range(count):  # 3 s in all, four times the idle timeout
            connection.send(chunk)
            time.sleep(0.25)
        status, headers = connection.read_head()
    assert status == 200
    assert headers["x-lab-received-bytes"] == str(len(chunk) * count)


def test_idle_connection_is_closed_after_the_idle_timeout(lab, ca, tmp_path):
    config = bridge_config(lab.port, tmp_path, ca, idle_timeout=1.0)
    with BackgroundBridge(config) as short_idle, raw(short_idle, ca) as connection:
        connection.send_head("RPC_IN_DATA", RPC_PATH, {"Authorization": basic_header(), "Content-Length": "100000"})
        connection.send(b"\x03" * 1000)
        started = time.monotonic()
        connection.sock.settimeout(10)
        data = b""
        try:
            while chunk := connection.sock.recv(65536):
                data += chunk
        except (ConnectionError, ssl.SSLError):
            pass
    waited = time.monotonic() - started
    assert 0.8 < waited < 6, waited
    assert data == b"" or data.startswith(b"HTTP/1.1 504")


# ---- failure and recovery ------------------------------------------------------------------------


def test_legacy_down_gives_502_then_recovers(ca, tmp_path):
    background = start_background_lab(tmp_path / "lab")
    lab = background.lab
    try:
        with BackgroundBridge(bridge_config(lab.port, tmp_path, ca)) as running:
            session = bridge_session(ca)
            assert session.get(f"{running.url}/EWS/Exchange.asmx", timeout=30).status_code == 401
            background.stop()
            down = bridge_session(ca).get(f"{running.url}/EWS/Exchange.asmx", timeout=30)
            assert down.status_code == 502
            assert "refused" in down.text and "\n" not in down.text.strip() and down.text.strip().endswith(".")
            background.start()
            assert bridge_session(ca).get(f"{running.url}/EWS/Exchange.asmx", timeout=30).status_code == 401
    finally:
        background.shutdown()


def test_failover_and_round_robin_across_legacy_servers(ca, tmp_path):
    first = start_background_lab(tmp_path / "a")
    second = start_background_lab(tmp_path / "b")
    labs = [first.lab, second.lab]
    try:
        config = bridge_config(labs[0].port, tmp_path, ca, legacy=[LegacyServer("127.0.0.1", lab.port) for lab in labs])
        with BackgroundBridge(config) as running:
            for _ in range(4):
                assert bridge_session(ca).get(f"{running.url}/EWS/Exchange.asmx", timeout=30).status_code == 401
            assert all(lab.counters.requests_total >= 2 for lab in labs)
            first.stop()
            for _ in range(4):  # never a 502 while one server is up
                assert bridge_session(ca).get(f"{running.url}/EWS/Exchange.asmx", timeout=30).status_code == 401
    finally:
        first.shutdown()
        second.shutdown()


def test_pinned_fingerprint_mismatch_is_refused(lab, ca, tmp_path):
    config = bridge_config(lab.port, tmp_path, ca, legacy_fingerprint="ab" * 32)
    before = lab.counters.requests_total
    with BackgroundBridge(config) as running:
        response = bridge_session(ca).get(f"{running.url}/EWS/Exchange.asmx", timeout=30)
    assert response.status_code == 502
    assert lab.counters.requests_total == before


def test_access_log_has_no_credentials(bridge, ca, caplog):
    with caplog.at_level(logging.INFO, logger="bridge.access"):
        bridge_session(ca, HttpNtlmAuth(LAB_USER, LAB_PASSWORD)).get(f"{bridge.url}/EWS/Exchange.asmx?secret=q", timeout=30)
        bridge_session(ca).get(f"{bridge.url}/EWS/Exchange.asmx", auth=(LAB_USER, LAB_PASSWORD), timeout=30)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "GET /EWS/Exchange.asmx 200" in text
    assert LAB_PASSWORD not in text and "alice" not in text and "secret" not in text
    assert base64.b64encode(f"{LAB_USER}:{LAB_PASSWORD}".encode()).decode() not in text


def test_legacy_ca_verifies_the_legacy_certificate_by_name(lab, ca, tmp_path):
    resolve_lab_names()  # exch2007.lab.test -> 127.0.0.1 inside this process, the bridge's loop included
    trusted = bridge_config(lab.port, tmp_path / "good", ca, legacy=[LegacyServer("exch2007.lab.test", lab.port)], legacy_ca=lab.cert_path)
    with BackgroundBridge(trusted) as running:
        assert bridge_session(ca).get(f"{running.url}/EWS/Exchange.asmx", timeout=30).status_code == 401
    wrong_ca = ca_file(LocalCA.create(), tmp_path)
    untrusted = bridge_config(lab.port, tmp_path / "bad", ca, legacy=[LegacyServer("exch2007.lab.test", lab.port)], legacy_ca=wrong_ca)
    before = lab.counters.requests_total
    with BackgroundBridge(untrusted) as running:
        response = bridge_session(ca).get(f"{running.url}/EWS/Exchange.asmx", timeout=30)
    assert response.status_code == 502 and "verification" in response.text
    assert lab.counters.requests_total == before


def test_config_file_with_flags_winning(lab, ca, tmp_path):
    import argparse

    from bridge.runtime.up import add_arguments, config_from_args

    config_file = tmp_path / "bridge.toml"
    config_file.write_text(f'fqdn = "{BRIDGE_FQDN}"\nlegacy = ["127.0.0.1:{lab.port}"]\nhttps_port = 8443\nhttp_port = 8080\nidle_timeout = 600\nforward_paths = ["/EWS", "/rpc"]\n')
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--config", str(config_file), "--https-port", "9443", "--cert", "c.pem", "--key", "k.pem"]))
    assert (config.fqdn, config.https_port, config.http_port, config.idle_timeout) == (BRIDGE_FQDN, 9443, 8080, 600)
    assert config.forward_paths == ("/EWS", "/rpc") and str(config.legacy[0]) == f"127.0.0.1:{lab.port}"


def test_client_connection_ends_when_its_upstream_connection_was_lost(ca, tmp_path):
    """The NTLM logon lived on the lost upstream connection: the client must reconnect and log on again."""
    background = start_background_lab(tmp_path / "lab")
    lab = background.lab
    try:
        with BackgroundBridge(bridge_config(lab.port, tmp_path, ca)) as running:
            connection = bridge_connection(running.https_port, ca)
            assert negotiate_logon(connection, "/EWS/Exchange.asmx").status == 200
            background.stop()
            background.start()  # every upstream connection is gone
            connection.request("GET", "/EWS/Exchange.asmx")
            response = connection.getresponse()
            response.read()
            assert response.status == 401  # not 200: the new upstream connection has no logon
            assert response.getheader("Connection", "").lower() == "close"
            fresh = bridge_connection(running.https_port, ca)
            assert negotiate_logon(fresh, "/EWS/Exchange.asmx").status == 200
            fresh.close()
    finally:
        background.shutdown()
