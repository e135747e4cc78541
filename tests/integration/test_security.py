"""Brute-force bans, the allow-list, connection limits and hostile input, over real sockets.

The lab's counters prove what reached the legacy server: a refused request leaves them unchanged.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import ssl
import sys
import time
from dataclasses import replace

import pytest
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_config, bridge_connection, bridge_session
from support.lab import LAB_PASSWORD, LAB_USER, basic_header, negotiate_logon
from support.net import read_all, response_bytes, status_of, tls_connection, wait_until

from bridge import cli
from bridge.certs.keys import LocalCA

EWS = "/EWS/Exchange.asmx"


def lab_requests(lab) -> int:
    return lab.counters.snapshot()["requests_total"]


def connection(bridge: BackgroundBridge, ca: LocalCA):
    return bridge_connection(bridge.https_port, ca, timeout=10)


def normal_request_works(bridge: BackgroundBridge, ca: LocalCA) -> bool:
    session = bridge_session(ca, auth=(LAB_USER, LAB_PASSWORD))
    try:
        return session.get(bridge.url + EWS, timeout=10).status_code == 200
    finally:
        session.close()


# --------------------------------------------------------------------------- bans


def test_failed_basic_logons_ban_the_address_and_the_ban_survives_a_restart(lab, ca, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bridge")
    hook_log = tmp_path / "hook.log"
    hook = tmp_path / "hook.py"
    hook.write_text("import sys\nwith open(sys.argv[1], 'a') as f: f.write(' '.join(sys.argv[2:]) + '\\n')\n")
    config = bridge_config(lab.port, tmp_path, ca, status_bind="off", ban_threshold=3, ban_command=f"{sys.executable} {hook} {hook_log}")
    wrong = bridge_session(ca, auth=(LAB_USER, "not-the-password"))
    right = bridge_session(ca, auth=(LAB_USER, LAB_PASSWORD))
    with BackgroundBridge(config) as bridge:
        assert right.get(bridge.url + EWS).status_code == 200  # a good logon is no failure
        assert [wrong.get(bridge.url + EWS).status_code for _ in range(3)] == [401, 401, 401]
        before = lab.counters.snapshot()
        refused = right.get(bridge.url + EWS)
        assert refused.status_code == 403
        assert "too many failed logons" in refused.text
        assert lab.counters.snapshot()["requests_total"] == before["requests_total"]  # never reached the lab
        assert wait_until(lambda: bridge.bridge.bans.failures_total == 3)
        assert wait_until(lambda: hook_log.exists() and "ban 127.0.0.1 3600" in hook_log.read_text())
    assert "banned 127.0.0.1 for 3600 s after 3 failed logons in 600 s" in caplog.text
    saved = json.loads((config.state_dir / "bans.json").read_text())
    assert saved["bans"]["127.0.0.1"]["failures"] == 3

    with BackgroundBridge(replace(config)) as again:  # a new bridge process state, same state dir
        before = lab_requests(lab)
        assert right.get(again.url + EWS).status_code == 403
        assert lab_requests(lab) == before
        assert wait_until(lambda: hook_log.read_text().count("ban 127.0.0.1") >= 2)  # firewall refilled at start
        assert cli.main(["ban", "remove", "127.0.0.1", "--state-dir", str(config.state_dir)]) == 0
        assert wait_until(lambda: right.get(again.url + EWS).status_code == 200, timeout=5)
        assert wait_until(lambda: "unban 127.0.0.1" in hook_log.read_text())
    right.close()
    wrong.close()


def test_failed_ntlm_and_negotiate_logons_ban_the_address(lab, ca, tmp_path):
    config = bridge_config(lab.port, tmp_path, ca, status_bind="off", ban_threshold=2)
    with BackgroundBridge(config) as bridge:
        bans = bridge.bridge.bans
        good = negotiate_logon(connection(bridge, ca), EWS)
        assert good.status == 200
        assert bans.failures_total == 0  # the 401 carrying the NTLM challenge is a handshake step
        ntlm_failures = lab.counters.snapshot()["auth_failures"].get("ntlm", 0)
        assert negotiate_logon(connection(bridge, ca), EWS, password="wrong").status == 401
        assert lab.counters.snapshot()["auth_failures"].get("ntlm", 0) == ntlm_failures + 1
        assert wait_until(lambda: bans.failures_total == 1) and not bans.active()
        spnego = negotiate_logon(connection(bridge, ca), EWS, scheme="Negotiate", protocol="negotiate", password="wrong")
        assert spnego.status == 401
        assert wait_until(lambda: bans.failures_total == 2 and "127.0.0.1" in bans.active())
        before = lab_requests(lab)
        assert negotiate_logon(connection(bridge, ca), EWS).status == 403  # even the right password
        assert lab_requests(lab) == before


def test_never_ban_addresses_are_exempt(lab, ca, tmp_path):
    config = bridge_config(lab.port, tmp_path, ca, status_bind="off", ban_threshold=1, never_ban=(ipaddress.ip_network("127.0.0.0/8"),))
    with BackgroundBridge(config) as bridge:
        wrong = bridge_session(ca, auth=(LAB_USER, "wrong"))
        assert [wrong.get(bridge.url + EWS).status_code for _ in range(3)] == [401, 401, 401]
        assert wait_until(lambda: bridge.bridge.bans.failures_total == 3) and not bridge.bridge.bans.active()
        assert normal_request_works(bridge, ca)


# --------------------------------------------------------------------------- allow-list and limits


def test_allow_list_closes_other_sources_before_tls(lab, ca, tmp_path):
    config = bridge_config(lab.port, tmp_path, ca, status_bind="off", allow=(ipaddress.ip_network("127.0.0.1/32"),))
    with BackgroundBridge(config) as bridge:
        connections = lab.counters.snapshot()["connections"]
        # Not a byte of TLS: the server closes a silent connection from 127.0.0.2 at once...
        outsider = socket.create_connection(("127.0.0.1", bridge.https_port), timeout=5, source_address=("127.0.0.2", 0))
        started = time.monotonic()
        assert read_all(outsider, timeout=3) == b""
        assert time.monotonic() - started < 1.0
        outsider.close()
        # ...while it waits for the ClientHello of a silent connection from an allowed source.
        insider = socket.create_connection(("127.0.0.1", bridge.https_port), timeout=5, source_address=("127.0.0.1", 0))
        insider.settimeout(0.5)
        with pytest.raises((TimeoutError, socket.timeout)):
            insider.recv(1)
        insider.close()
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            tls_connection(bridge.https_port, ca, source="127.0.0.2")
        assert normal_request_works(bridge, ca)
        assert bridge.bridge.guard.rejections["allow-list"] == 2
        assert lab.counters.snapshot()["connections"] == connections + 1  # only the allowed request
        # Port 80 stays open to all (ACME HTTP-01 validation); it only redirects.
        redirect = socket.create_connection(("127.0.0.1", bridge.http_port), timeout=5, source_address=("127.0.0.2", 0))
        redirect.sendall(f"GET /owa/ HTTP/1.1\r\n{HOST}\r\n".encode())
        assert status_of(response_bytes(redirect)) == 301
        redirect.close()


def test_max_connections_answers_503_with_retry_after(lab, ca, tmp_path):
    config = bridge_config(lab.port, tmp_path, ca, status_bind="off", max_connections=2)
    with BackgroundBridge(config) as bridge:
        held = [tls_connection(bridge.https_port, ca) for _ in range(2)]
        assert wait_until(lambda: bridge.bridge.guard.open_connections == 2)
        before = lab_requests(lab)
        extra = tls_connection(bridge.https_port, ca)
        extra.sendall(f"GET {EWS} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nAuthorization: {basic_header()}\r\n\r\n".encode())
        answer = response_bytes(extra)
        assert status_of(answer) == 503
        assert b"Retry-After: 10" in answer
        assert lab_requests(lab) == before
        for sock in held:
            sock.close()
        assert wait_until(lambda: bridge.bridge.guard.open_connections == 0)
        assert normal_request_works(bridge, ca)


# --------------------------------------------------------------------------- hostile input

HOST = f"Host: {BRIDGE_FQDN}\r\n"
HOSTILE = {
    "content-length-with-transfer-encoding": (f"POST {EWS} HTTP/1.1\r\n{HOST}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "two-content-lengths": (f"POST {EWS} HTTP/1.1\r\n{HOST}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    "content-length-list": (f"POST {EWS} HTTP/1.1\r\n{HOST}Content-Length: 5, 5\r\n\r\nhello", 400),
    "obsolete-line-folding": (f"GET {EWS} HTTP/1.1\r\n{HOST}X-Folded: a\r\n b\r\n\r\n", 400),
    "transfer-encoding-gzip-chunked": (f"POST {EWS} HTTP/1.1\r\n{HOST}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "two-transfer-encodings": (f"POST {EWS} HTTP/1.1\r\n{HOST}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "transfer-encoding-identity": (f"POST {EWS} HTTP/1.1\r\n{HOST}Transfer-Encoding: identity\r\n\r\n", 400),
    "transfer-encoding-http10": (f"POST {EWS} HTTP/1.0\r\n{HOST}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "bare-lf": (f"GET {EWS} HTTP/1.1\n{HOST.strip()}\n\n", 400),
    "space-before-colon": (f"GET {EWS} HTTP/1.1\r\nHost : {BRIDGE_FQDN}\r\n\r\n", 400),
    "nul-in-header": (f"GET {EWS} HTTP/1.1\r\n{HOST}X-A: a\x00b\r\n\r\n", 400),
    "long-request-line": (f"GET {EWS}?{'a' * 9000} HTTP/1.1\r\n{HOST}\r\n", 414),
    "long-header": (f"GET {EWS} HTTP/1.1\r\n{HOST}X-Long: {'a' * 9000}\r\n\r\n", 431),
    "too-many-headers": (f"GET {EWS} HTTP/1.1\r\n{HOST}" + "".join(f"X-H{i}: {i}\r\n" for i in range(200)) + "\r\n", 431),
    "headers-too-large-together": (f"GET {EWS} HTTP/1.1\r\n{HOST}" + "".join(f"X-H{i}: {'b' * 4000}\r\n" for i in range(10)) + "\r\n", 431),
    "invalid-method-token": (f"GE(T {EWS} HTTP/1.1\r\n{HOST}\r\n", 400),
    "method-with-dot": (f"G.ET {EWS} HTTP/1.1\r\n{HOST}\r\n", 400),
    "lower-case-method": (f"get {EWS} HTTP/1.1\r\n{HOST}\r\n", 400),
    "connection-names-content-length": (f"POST {EWS} HTTP/1.1\r\n{HOST}Connection: content-length\r\nContent-Length: 5\r\n\r\nhello", 400),
    "connect": ("CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", 405),
    "trace": (f"TRACE {EWS} HTTP/1.1\r\n{HOST}\r\n", 405),
    "absolute-form": (f"GET https://exch2007.lab.test{EWS} HTTP/1.1\r\n{HOST}\r\n", 400),
    "asterisk-form": (f"OPTIONS * HTTP/1.1\r\n{HOST}\r\n", 400),
    "dot-segments": (f"GET /owa/../ecp/ HTTP/1.1\r\n{HOST}\r\n", 400),
    "encoded-dot-segments": (f"GET /owa/%2e%2e/ecp/ HTTP/1.1\r\n{HOST}\r\n", 400),
    "double-encoding": (f"GET /owa/%252e%252e/ecp/ HTTP/1.1\r\n{HOST}\r\n", 400),
    "backslash": (f"GET /owa\\..\\ecp HTTP/1.1\r\n{HOST}\r\n", 400),
    "not-forwarded": (f"GET /ecp/ HTTP/1.1\r\n{HOST}\r\n", 404),
    "fragment": (f"GET {EWS}#frag HTTP/1.1\r\n{HOST}\r\n", 400),
    "http-2-version": (f"GET {EWS} HTTP/2.0\r\n{HOST}\r\n", 505),
    "bad-host": (f"GET {EWS} HTTP/1.1\r\nHost: evil host\r\n\r\n", 400),
    "two-hosts": (f"GET {EWS} HTTP/1.1\r\n{HOST}Host: other.example\r\n\r\n", 400),
    "missing-host": (f"GET {EWS} HTTP/1.1\r\n\r\n", 400),
}


@pytest.fixture(scope="module")
def guarded(lab, ca, tmp_path_factory):
    config = bridge_config(lab.port, tmp_path_factory.mktemp("guarded"), ca, status_bind="off", header_timeout=1.0)
    with BackgroundBridge(config) as bridge:
        yield bridge


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_request_heads_are_answered_and_not_forwarded(name, guarded, lab, ca):
    text, expected = HOSTILE[name]
    before = lab_requests(lab)
    sock = tls_connection(guarded.https_port, ca)
    sock.sendall(text.encode("latin-1"))
    answer = response_bytes(sock)
    sock.close()
    assert status_of(answer) == expected, answer[:200]
    assert lab_requests(lab) == before
    assert normal_request_works(guarded, ca)


def test_slow_request_heads_get_408_after_the_header_timeout(guarded, lab, ca):
    before = lab_requests(lab)
    for partial in (b"", f"GET {EWS} HTTP/1.1\r\n{HOST}X-Slow: ".encode()):
        sock = tls_connection(guarded.https_port, ca)
        started = time.monotonic()
        sock.sendall(partial)
        if partial:
            time.sleep(0.5)
            sock.sendall(b"still-")  # trickling bytes do not extend the deadline
        answer = read_all(sock, timeout=5)
        elapsed = time.monotonic() - started
        sock.close()
        assert status_of(answer) == 408
        assert 0.9 <= elapsed < 3.0
    plain = socket.create_connection(("127.0.0.1", guarded.http_port), timeout=5)
    started = time.monotonic()
    plain.sendall(b"GET /owa/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # port 80 has the same deadline
    assert status_of(read_all(plain)) == 408
    assert 0.9 <= time.monotonic() - started < 3.0
    plain.close()
    assert lab_requests(lab) == before
    assert guarded.bridge.guard.rejections["header-timeout"] >= 2
    assert normal_request_works(guarded, ca)


def test_plain_http_and_tls_garbage_on_the_https_port(guarded, lab, ca):
    before = lab_requests(lab)
    plain = socket.create_connection(("127.0.0.1", guarded.https_port), timeout=5)
    plain.sendall(f"GET {EWS} HTTP/1.1\r\n{HOST}\r\n".encode())
    answer = read_all(plain)
    plain.close()
    assert status_of(answer) == 400
    assert f"HTTPS only; use https://{BRIDGE_FQDN}:{guarded.https_port}/".encode() in answer
    for garbage in (b"\x00\x01\x02binary garbage\r\n\r\n", b"\x16\x03\x01\x00\x20" + bytes(range(32)) + b"\r\n\r\n"):
        sock = socket.create_connection(("127.0.0.1", guarded.https_port), timeout=5)
        sock.sendall(garbage)
        reply = read_all(sock, timeout=3)
        sock.close()
        assert b"HTTP/" not in reply  # closed, or a TLS alert: never an answer in clear
    assert lab_requests(lab) == before
    rejections = guarded.bridge.guard.rejections
    assert rejections["plain-http"] >= 1 and rejections["not-tls"] >= 1
    assert wait_until(lambda: rejections["tls-handshake"] >= 1)
    assert normal_request_works(guarded, ca)


def test_a_long_upload_is_not_cut_by_the_header_timeout(guarded, lab, ca):
    """The header deadline covers the head only: a body may take longer than it."""
    sock = tls_connection(guarded.https_port, ca)
    body = b"<soap:Envelope><soap:Body><GetFolder/></soap:Body></soap:Envelope>"
    sock.sendall(f"POST {EWS} HTTP/1.1\r\n{HOST}Authorization: {basic_header()}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    for index in range(0, len(body), len(body) // 3 + 1):
        time.sleep(0.6)
        sock.sendall(body[index : index + len(body) // 3 + 1])
    sock.settimeout(5)
    head = sock.recv(65536)
    sock.close()
    assert status_of(head) == 200
