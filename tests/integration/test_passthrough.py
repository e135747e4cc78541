"""SNI routing against real peers on loopback: the bridge terminates its own name as before and splices
passthrough names, undecrypted, to backends with their own certificates (--passthrough)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import subprocess
import time

import pytest
from cryptography import x509
from support import REPO
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_client_context, bridge_config, bridge_session
from support.lab import LAB_PASSWORD
from support.net import read_all, wait_until
from support.passthrough import ProxyProtocolNginx, Recorder, TlsEchoServer, nginx_available, stream_through

from bridge.config import PassthroughRoute
from bridge.protocol.clienthello import client_hello_record

MAIL = "mail.lab.test"
RAW = "raw.lab.test"


@pytest.fixture
def echo(ca, tmp_path):
    server = TlsEchoServer(ca, tmp_path / "echo", MAIL)
    yield server
    server.close()


@pytest.fixture
def recorder():
    server = Recorder()
    yield server
    server.close()


@pytest.fixture
def routed(lab, ca, tmp_path, echo, recorder, background_bridges):
    """start(**overrides) -> BackgroundBridge with mail.lab.test -> the echo backend and raw.lab.test -> the recorder."""

    def start(*extra_routes: PassthroughRoute, **overrides):
        routes = (PassthroughRoute(MAIL, "127.0.0.1", echo.port), PassthroughRoute(RAW, "127.0.0.1", recorder.port), *extra_routes)
        return background_bridges(bridge_config(lab.port, tmp_path, ca, passthrough=routes, **overrides))

    return start


def client_context(ca) -> ssl.SSLContext:
    return bridge_client_context(ca)


def subject_names(der: bytes) -> list[str]:
    certificate = x509.load_der_x509_certificate(der)
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def raw_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def test_passthrough_name_reaches_its_backend_undecrypted_64_mib_both_ways(routed, ca, caplog):
    bridge = routed()
    caplog.set_level(logging.INFO, logger="bridge.access")
    size = 64 * 1024 * 1024
    sent, received, certificate = asyncio.run(stream_through(bridge.https_port, client_context(ca), MAIL, size))
    assert sent == received
    assert subject_names(certificate) == [MAIL]  # the backend's certificate, not the bridge's
    router = bridge.bridge.router
    assert wait_until(lambda: router.counters()[MAIL]["open"] == 0)
    counters = router.counters()[MAIL]
    assert counters["connections"] == 1 and counters["bytes_in"] > size and counters["bytes_out"] > size
    line = wait_until(lambda: [r.getMessage() for r in caplog.records if "passthrough sni=" in r.getMessage()])
    assert line and f"127.0.0.1 passthrough sni={MAIL} route={MAIL} -> 127.0.0.1:" in line[0] and f"in={counters['bytes_in']} out={counters['bytes_out']}" in line[0]


def test_the_bridges_own_name_is_still_terminated_and_proxied(routed, ca, lab):
    bridge = routed()
    answer = bridge_session(ca).get(f"{bridge.url}/owa/", allow_redirects=False, timeout=10)
    assert answer.status_code in (200, 302)  # the lab's OWA answer, through the bridge
    with socket.create_connection(("127.0.0.1", bridge.https_port)) as raw, client_context(ca).wrap_socket(raw, server_hostname=BRIDGE_FQDN) as tls:
        assert subject_names(tls.getpeercert(binary_form=True)) == [BRIDGE_FQDN]
    assert bridge.bridge.router.counters()["bridge"]["connections"] >= 2


def test_default_route_takes_other_names_and_no_sni(routed, ca, tmp_path):
    default = Recorder()
    try:
        bridge = routed(PassthroughRoute("*", "127.0.0.1", default.port))
        for name in ("other.example", None):
            with raw_connection(bridge.https_port) as sock:
                hello = client_hello_record(name)
                sock.sendall(hello + b"after")
                expected = hello + b"after"
                assert wait_until(lambda expected=expected: default.received and default.received[-1] == expected)
            default.clear()
        assert bridge.bridge.router.counters()["*"]["connections"] == 2
    finally:
        default.close()


@pytest.mark.parametrize("name", ["unknown.example", None])
def test_without_default_unknown_names_and_no_sni_are_closed(routed, recorder, name):
    bridge = routed()
    with raw_connection(bridge.https_port) as sock:
        sock.sendall(client_hello_record(name))
        assert read_all(sock) == b""
    assert recorder.received == []
    assert bridge.bridge.guard.rejections["no-route"] == 1


def test_a_real_client_without_sni_is_closed_without_default(routed, ca):
    bridge = routed()
    context = client_context(ca)
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", bridge.https_port), timeout=5) as raw, pytest.raises((ssl.SSLError, ConnectionError)):
        context.wrap_socket(raw)  # no server_hostname: no SNI


def test_hello_split_across_records_and_tcp_segments_is_replayed_exactly(routed, recorder):
    bridge = routed()
    hello = client_hello_record(RAW.upper(), record_size=40)
    with raw_connection(bridge.https_port) as sock:
        for start in range(0, len(hello), 17):
            sock.sendall(hello[start : start + 17])
            time.sleep(0.01)
        assert wait_until(lambda: recorder.received and bytes(recorder.received[0]) == hello)
        sock.sendall(b"more bytes")
        assert wait_until(lambda: bytes(recorder.received[0]) == hello + b"more bytes")


def test_tls10_hello_is_routed_by_its_name(routed, recorder):
    bridge = routed()
    hello = client_hello_record(RAW, version=0x0301)
    with raw_connection(bridge.https_port) as sock:
        sock.sendall(hello)
        assert wait_until(lambda: recorder.received and bytes(recorder.received[0]) == hello)


def test_tls10_client_to_the_bridges_own_name_is_still_refused(routed):
    bridge = routed()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", bridge.https_port), timeout=5) as raw, pytest.raises((ssl.SSLError, ConnectionError)):
        context.wrap_socket(raw, server_hostname=BRIDGE_FQDN)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + bytes(40), "sslv2-hello"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "hello-malformed"),
        (b"\x16\x05garbage", "not-tls"),
        (b"\x00\xffgarbage", "not-tls"),
    ],
)
def test_sslv2_hellos_and_garbage_are_closed(routed, recorder, data, reason):
    bridge = routed()
    with raw_connection(bridge.https_port) as sock:
        sock.sendall(data)
        assert read_all(sock) == b""
    assert bridge.bridge.guard.rejections[reason] == 1
    assert recorder.received == []


def test_plain_http_on_the_https_port_still_gets_its_400(routed):
    bridge = routed()
    with raw_connection(bridge.https_port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 400")


def test_a_hello_that_never_completes_is_closed_after_the_header_timeout(routed, recorder):
    bridge = routed(header_timeout=1.0)
    hello = client_hello_record(RAW)
    with raw_connection(bridge.https_port) as sock:
        started = time.monotonic()
        sock.sendall(hello[:-5])
        assert read_all(sock, timeout=10) == b""
        assert 0.8 < time.monotonic() - started < 5
    assert bridge.bridge.guard.rejections["hello-timeout"] == 1
    assert recorder.received == []


def closed_without_a_byte(port: int) -> bool:
    """A ClientHello for the raw route sent (if the bridge still reads), and the connection closed with nothing said."""
    with raw_connection(port) as sock:
        try:
            sock.sendall(client_hello_record(RAW))
        except OSError:
            pass
        return read_all(sock) == b""


def test_bans_close_passthrough_connections_before_the_hello(routed, recorder):
    bridge = routed()
    bridge.bridge.bans.add("127.0.0.1", 600, "test")
    assert closed_without_a_byte(bridge.https_port)
    assert recorder.received == []
    assert bridge.bridge.guard.rejections["banned"] == 1


def test_allow_list_applies_to_passthrough(routed, recorder):
    import ipaddress

    bridge = routed(allow=(ipaddress.ip_network("192.0.2.0/24"),))
    assert closed_without_a_byte(bridge.https_port)
    assert recorder.received == []
    assert bridge.bridge.guard.rejections["allow-list"] == 1


def test_max_connections_counts_passthrough_connections(routed, recorder):
    bridge = routed(max_connections=1)
    hello = client_hello_record(RAW)
    with raw_connection(bridge.https_port) as first:
        first.sendall(hello)
        assert wait_until(lambda: len(recorder.received) == 1)
        assert bridge.bridge.guard.open_connections == 1
        with raw_connection(bridge.https_port) as second:
            second.sendall(hello)
            assert read_all(second) == b""
        assert len(recorder.received) == 1
    assert wait_until(lambda: bridge.bridge.guard.open_connections == 0)


def test_idle_passthrough_connection_is_closed(routed, recorder):
    bridge = routed(idle_timeout=1.0)
    with raw_connection(bridge.https_port) as sock:
        sock.sendall(client_hello_record(RAW))
        started = time.monotonic()
        assert read_all(sock, timeout=10) == b""
        assert 0.8 < time.monotonic() - started < 5


def test_sigterm_drain_lets_open_passthrough_connections_run_then_cuts_them(routed, recorder):
    bridge = routed(drain_timeout=1.5)
    with raw_connection(bridge.https_port) as sock:
        sock.sendall(client_hello_record(RAW))
        assert wait_until(lambda: len(recorder.received) == 1)
        closing = asyncio.run_coroutine_threadsafe(bridge.bridge.close(), bridge._loop)
        time.sleep(0.5)
        sock.sendall(b"still here")
        assert wait_until(lambda: bytes(recorder.received[0]).endswith(b"still here"))
        closing.result(10)
        assert read_all(sock) == b""
    bridge.bridge = None  # closed already


def test_backend_down_closes_the_client_and_counts_a_failure(routed, ca):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    bridge = routed(PassthroughRoute("down.lab.test", "127.0.0.1", port))
    with raw_connection(bridge.https_port) as sock:
        sock.sendall(client_hello_record("down.lab.test"))
        assert read_all(sock) == b""
    assert wait_until(lambda: bridge.bridge.router.counters()["down.lab.test"]["failures"] == 1)
    asyncio.run_coroutine_threadsafe(bridge.bridge.router.check_health(), bridge._loop).result(10)
    health = bridge.bridge.router.health()
    assert health["down.lab.test"]["state"] == "down" and health["down.lab.test"]["error"] == "connection refused"
    assert health[MAIL]["state"] == "up"


# ---- port 80 ----------------------------------------------------------------------------------------


def http_request(port: int, host: str, path: str = "/") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return read_all(sock)


def test_port_80_routes_by_host(routed, tmp_path, ca, lab):
    backend = Recorder(reply=b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nbackend", reply_after=1)
    try:
        bridge = routed()
        bridge.bridge.router.http_port = backend.port  # the backends' "port 80"
        own = http_request(bridge.http_port, BRIDGE_FQDN, "/owa/")
        assert own.startswith(b"HTTP/1.1 301") and f"Location: https://{BRIDGE_FQDN}:{bridge.https_port}/owa/".encode() in own
        challenge = http_request(bridge.http_port, f"{MAIL}:80", "/.well-known/acme-challenge/token-of-the-backend")
        assert challenge.endswith(b"backend")
        assert bytes(backend.received[0]).startswith(b"GET /.well-known/acme-challenge/token-of-the-backend HTTP/1.1\r\nHost: mail.lab.test:80\r\n")
        assert http_request(bridge.http_port, "nobody.example").startswith(b"HTTP/1.1 404")
    finally:
        backend.close()


# ---- real clients and servers -------------------------------------------------------------------


def test_curl_ntlm_through_passthrough_to_a_tls12_lab_on_one_connection(lab_factory, ca, tmp_path, lab):
    ntlm_lab = lab_factory(tls_max="1.2")
    name = "legacy-direct.lab.test"
    config = bridge_config(lab.port, tmp_path, ca, passthrough=(PassthroughRoute(name, "127.0.0.1", ntlm_lab.port),))
    with BackgroundBridge(config) as bridge:
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "-k",
                "-v",
                "--ntlm",
                "-u",
                f"LAB\\alice:{LAB_PASSWORD}",
                "--resolve",
                f"{name}:{bridge.https_port}:127.0.0.1",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{num_connects}",
                f"https://{name}:{bridge.https_port}/EWS/Exchange.asmx",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.stdout == "200 1", result.stderr
        assert "CN=" in result.stderr and BRIDGE_FQDN not in result.stderr.split("Server certificate:")[1].split("*")[0]
        assert bridge.bridge.router.counters()[name]["connections"] == 1


@pytest.mark.skipif(not nginx_available(), reason="needs nginx (apt-get install -y nginx)")
def test_proxy_v2_header_is_read_by_a_real_nginx(lab, ca, tmp_path):
    nginx = ProxyProtocolNginx(ca, tmp_path / "nginx", MAIL)
    try:
        config = bridge_config(lab.port, tmp_path, ca, passthrough=(PassthroughRoute(MAIL, "127.0.0.1", nginx.port, proxy_protocol=True),))
        with BackgroundBridge(config) as bridge:
            context = client_context(ca)
            with socket.create_connection(("127.0.0.1", bridge.https_port), timeout=5) as raw, context.wrap_socket(raw, server_hostname=MAIL) as tls:
                assert subject_names(tls.getpeercert(binary_form=True)) == [MAIL]
                local_port = tls.getsockname()[1]
                tls.sendall(f"GET /through-the-bridge HTTP/1.1\r\nHost: {MAIL}\r\nConnection: close\r\n\r\n".encode())
                answer = read_all(tls)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"nginx behind the bridge\n")
            lines = nginx.access_lines()
            assert lines == [f"127.0.0.1 {local_port} 127.0.0.1 {MAIL} /through-the-bridge"]
    finally:
        nginx.stop()


# ---- the status page ------------------------------------------------------------------------------


def test_status_page_and_metrics_show_each_route_and_its_backend(routed, recorder):
    import requests

    bridge = routed(status_bind="127.0.0.1:0")
    asyncio.run_coroutine_threadsafe(bridge.bridge.router.check_health(), bridge._loop).result(10)
    url = f"http://127.0.0.1:{bridge.bridge.status_port}"
    password = (bridge.config.state_dir / "status-password").read_text().strip()
    with raw_connection(bridge.https_port) as sock:
        sock.sendall(client_hello_record(RAW) + b"x" * 1000)
        assert wait_until(lambda: recorder.received and len(recorder.received[0]) > 1000)
        live = requests.get(url + "/status.json", auth=("admin", password), timeout=5).json()
        rows = {row["route"]: row for row in live["routes"]}
        assert rows[RAW]["open"] == 1 and rows[RAW]["bytes_in"] > 1000 and rows[RAW]["state"] == "up"
        assert rows[RAW]["backend"] == f"127.0.0.1:{recorder.port}" and rows["bridge"]["backend"] == "terminated by the bridge"
    assert wait_until(lambda: requests.get(url + "/status.json", auth=("admin", password), timeout=5).json()["routes"][2]["open"] == 0)
    text = requests.get(url + "/metrics", auth=("admin", password), timeout=5).text
    assert f'bridge_route_connections_total{{route="{RAW}"}} 1.0' in text
    assert f'bridge_route_backend_up{{backend="127.0.0.1:{recorder.port}",route="{RAW}"}} 1.0' in text
    page = requests.get(url + "/", auth=("admin", password), timeout=5).text
    assert "<h2>Routes (SNI)</h2>" in page and RAW in page


# ---- `bridge up` as a process -------------------------------------------------------------------


def test_workers_route_passthrough_and_the_parent_adds_up_their_counters(start_bridge_process, recorder, tmp_path):
    import base64
    import json
    import urllib.request

    from support.net import free_port

    status_port = free_port()
    process, https_port, http_port = start_bridge_process("--workers", "2", "--passthrough", f"{RAW}=127.0.0.1:{recorder.port}", "--status-bind", f"127.0.0.1:{status_port}")
    process.wait_for("bridge ready")
    for index in range(6):
        with raw_connection(https_port) as sock:
            sock.sendall(client_hello_record(RAW) + b"#%d" % index)
            assert wait_until(lambda index=index: len(recorder.received) == index + 1)
    assert all(bytes(data).endswith(b"#%d" % index) for index, data in enumerate(recorder.received))
    password = (tmp_path / "state" / "status-password").read_text().strip()
    token = base64.b64encode(f"admin:{password}".encode()).decode()

    def routes() -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{status_port}/status.json", headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return {row["route"]: row for row in json.loads(response.read())["routes"]}

    assert wait_until(lambda: routes()[RAW]["connections"] == 6 and routes()[RAW]["state"] == "up", timeout=10), routes()
    assert process.stop() == 0


def test_a_backend_that_does_not_resolve_is_one_sentence(lab, front_cert, tmp_path):
    from support.processes import assert_one_sentence_error, bridge_command

    command = bridge_command(lab.port, *front_cert, tmp_path, 0, 0, "--passthrough", "mail.example.com=no-such-host.invalid:443")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_one_sentence_error(result, "--passthrough mail.example.com=no-such-host.invalid:443: the backend no-such-host.invalid does not resolve")
