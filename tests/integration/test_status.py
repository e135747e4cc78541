"""The status page, /metrics and `bridge status` against numbers a scripted run produced; SIGTERM
drain and SIGHUP reload with the bridge as a real subprocess."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_config, bridge_session
from support.lab import LAB_PASSWORD, LAB_USER, basic_header
from support.net import read_head, read_response, tls_connection, wait_until
from support.processes import BridgeProcess, bridge_command

from bridge import cli
from bridge.certs.keys import new_private_key, write_pair

EWS = "/EWS/Exchange.asmx"
RPC_OUT = "/rpc/rpcproxy.dll?EXCH2007.lab.local:6001"


def metrics(url: str, password: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(url + "/metrics", auth=("admin", password), timeout=5).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


# --------------------------------------------------------------------------- status page and metrics


def test_status_page_and_metrics_show_what_a_scripted_run_did(lab, ca, tmp_path, capsys):
    config = bridge_config(lab.port, tmp_path, ca, status_bind="127.0.0.1:0", ban_threshold=2)
    with BackgroundBridge(config) as bridge:
        url = f"http://127.0.0.1:{bridge.bridge.status_port}"
        password_file = config.state_dir / "status-password"
        assert password_file.stat().st_mode & 0o777 == 0o600
        password = password_file.read_text().strip()
        assert len(password) >= 20

        # Refused without the generated password (there is no default one).
        for path in ("/", "/metrics", "/status.json"):
            anonymous = requests.get(url + path, timeout=5)
            assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"].startswith("Basic ")
            for user, guess in (("admin", "wrong"), ("admin", "admin"), ("admin", "changeme"), ("root", password)):
                assert requests.get(url + path, auth=(user, guess), timeout=5).status_code == 401

        # A live RPC channel is counted while it streams.
        channel = tls_connection(bridge.https_port, ca)
        channel.sendall(
            f"RPC_OUT_DATA {RPC_OUT} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nAuthorization: {basic_header()}\r\nUser-Agent: MSRPC\r\nX-Lab-Out-Size: {64 * 2**20}\r\nContent-Length: 76\r\n\r\n".encode()
            + b"\0" * 76
        )
        status, _, received = read_head(channel)
        assert status == 200
        while len(received) < 2**20:
            received += channel.recv(65536)
        live = requests.get(url + "/status.json", auth=("admin", password), timeout=5).json()
        assert live["rpc_channels_open"] == 1
        assert live["connections_open"] == 1
        assert live["bytes_out"] >= len(received)  # counted while the response is still streaming
        channel.close()
        assert wait_until(lambda: requests.get(url + "/status.json", auth=("admin", password)).json()["rpc_channels_open"] == 0)
        baseline = metrics(url, password)

        # The scripted run.
        body = b"<soap:Envelope><soap:Body><GetFolder/></soap:Body></soap:Envelope>" + b" " * 5000
        sent_to_clients = 0
        right = bridge_session(ca, auth=(LAB_USER, LAB_PASSWORD))
        for _ in range(3):
            response = right.get(bridge.url + EWS)
            assert response.status_code == 200
            sent_to_clients += len(response.content)
        response = right.post(bridge.url + EWS, data=body, headers={"Content-Type": "text/xml"})
        assert response.status_code == 200
        sent_to_clients += len(response.content)
        assert right.get(bridge.url + "/ecp/").status_code == 404
        wrong = bridge_session(ca, auth=(LAB_USER, "wrong"))
        for _ in range(2):
            response = wrong.get(bridge.url + EWS)
            assert response.status_code == 401
            sent_to_clients += len(response.content)
        assert wrong.get(bridge.url + EWS).status_code == 403  # banned after two failures
        right.close()
        wrong.close()
        held = [tls_connection(bridge.https_port, ca) for _ in range(2)]

        assert wait_until(lambda: metrics(url, password)[("bridge_client_connections", ())] == 2)
        after = metrics(url, password)

        def delta(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0) - baseline.get(key, 0)

        assert delta("bridge_requests_total", route="/EWS", status="200") == 4
        assert delta("bridge_requests_total", route="/EWS", status="401") == 2
        assert delta("bridge_requests_total", route="/EWS", status="403") == 1
        assert delta("bridge_requests_total", route="other", status="404") == 1
        assert delta("bridge_received_bytes_total") == len(body)
        assert delta("bridge_sent_bytes_total") == sent_to_clients
        assert after[("bridge_auth_failures_total", ())] == 2
        assert after[("bridge_bans_total", ())] == 1
        assert after[("bridge_banned_requests_total", ())] == 1
        assert after[("bridge_bans_active", ())] == 1
        assert after[("bridge_rpc_channels", ())] == 0
        assert after[("bridge_legacy_up", (("server", f"127.0.0.1:{lab.port}"),))] == 1
        assert 89 <= after[("bridge_certificate_days_left", ())] <= 90

        page = requests.get(url + "/", auth=("admin", password), timeout=5)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert '<meta http-equiv="refresh"' in page.text
        assert 'id="auth-failures">2<' in page.text
        assert 'id="connections">2 of 1000<' in page.text
        assert f"CN={BRIDGE_FQDN}" in page.text
        assert re.search(r"<td>127\.0\.0\.1</td><td>59m \d+s</td><td>2 failed logons in 600 s</td>", page.text)
        assert re.search(r"<tr><td>/EWS</td><td>200</td><td>4</td></tr>", page.text)

        assert cli.main(["status", "--url", url, "--state-dir", str(config.state_dir), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["auth_failures"] == 2 and shown["connections_open"] == 2
        assert {"route": "/EWS", "status": 403, "count": 1} in shown["requests"]
        assert cli.main(["status", "--url", url, "--state-dir", str(config.state_dir), "--once"]) == 0
        terminal = capsys.readouterr().out
        assert "2 failed, 1 bans, 1 requests refused" in terminal and "127.0.0.1" in terminal

        (tmp_path / "other-password").write_text("not it\n")
        assert cli.main(["status", "--url", url, "--password-file", str(tmp_path / "other-password"), "--once"]) == 2
        assert "refused the password" in capsys.readouterr().err
        for sock in held:
            sock.close()
    assert cli.main(["status", "--url", url, "--state-dir", str(config.state_dir), "--once"]) == 2
    assert "No status page at" in capsys.readouterr().err


def test_status_password_is_kept_across_restarts_and_the_listener_can_be_off(lab, ca, tmp_path):
    config = bridge_config(lab.port, tmp_path, ca, status_bind="127.0.0.1:0")
    with BackgroundBridge(config):
        first = (config.state_dir / "status-password").read_text()
    with BackgroundBridge(config) as again:
        assert (config.state_dir / "status-password").read_text() == first
        assert again.bridge.status_port > 0
    off = bridge_config(lab.port, tmp_path / "off", ca, status_bind="off")
    with BackgroundBridge(off) as quiet:
        assert quiet.bridge.status_port == 0
        assert not (off.state_dir / "status-password").exists()


# --------------------------------------------------------------------------- lifecycle (subprocess)


def start_bridge(lab, config, tmp_path, *extra: str) -> BridgeProcess:
    """`bridge up` as a process with the certificate and state directory of config (ports chosen by the kernel)."""
    return BridgeProcess(bridge_command(lab.port, config.cert, config.key, tmp_path, 0, 0, "--status-bind", "off", *extra))


def post_head(length: int) -> bytes:
    return f"POST {EWS} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nAuthorization: {basic_header()}\r\nContent-Type: text/xml\r\nContent-Length: {length}\r\n\r\n".encode()


def test_sigterm_stops_accepting_lets_open_requests_finish_and_exits_by_the_drain_timeout(lab, ca, tmp_path):
    config = bridge_config(lab.port, tmp_path, ca)
    bridge = start_bridge(lab, config, tmp_path, "--drain-timeout", "2")
    try:
        port = bridge.ready_port()
        body = b"<soap:Envelope><soap:Body><GetFolder/></soap:Body></soap:Envelope>" + b" " * 2000
        idle = tls_connection(port, ca)
        idle.sendall(f"GET {EWS} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nAuthorization: {basic_header()}\r\n\r\n".encode())
        assert read_response(idle)[0] == 200  # now an idle keep-alive connection
        finishing = tls_connection(port, ca)
        finishing.sendall(post_head(len(body)) + body[:1000])
        stalled = tls_connection(port, ca)
        stalled.sendall(post_head(len(body)) + body[:1000])
        time.sleep(0.3)

        started = time.monotonic()
        bridge.process.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False

        assert wait_until(refused, timeout=2)  # no new connections
        idle.settimeout(2)
        assert idle.recv(1) == b""  # idle connections close at once
        finishing.sendall(body[1000:])  # an open request still gets its body read and answered
        finishing.settimeout(5)
        try:
            status, answer = read_response(finishing)
        except ConnectionError:
            raise AssertionError(bridge.log) from None
        assert status == 200 and b"GetFolder" in answer
        assert bridge.process.wait(10) == 0
        elapsed = time.monotonic() - started
        assert 1.8 <= elapsed < 3.5, elapsed  # the stalled request held the exit until --drain-timeout, no longer
        stalled.settimeout(2)
        try:
            assert stalled.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass
        assert "open requests get up to 2 s to finish" in bridge.log
        for sock in (idle, finishing, stalled):
            sock.close()
    finally:
        bridge.stop()


def test_sighup_reloads_the_allow_list_and_certificate_without_dropping_connections(lab, ca, tmp_path):
    config = bridge_config(lab.port, tmp_path, ca)
    settings = tmp_path / "bridge.toml"
    settings.write_text('allow = ["127.0.0.1/32"]\n')
    bridge = start_bridge(lab, config, tmp_path, "--config", str(settings))
    try:
        port = bridge.ready_port()
        kept = tls_connection(port, ca)
        request = f"GET {EWS} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nAuthorization: {basic_header()}\r\n\r\n".encode()
        kept.sendall(request)
        assert read_response(kept)[0] == 200
        first_serial = ssl_serial(kept)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            tls_connection(port, ca, source="127.0.0.2")

        settings.write_text('allow = ["127.0.0.2/32"]\nmax_connections = 50\n')
        key = new_private_key("ecdsa-p256")
        write_pair(config.cert.parent, ca.issue([BRIDGE_FQDN], key), key)
        bridge.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: bridge.find("configuration reloaded"), timeout=5), bridge.log

        def closed_before_tls() -> bool:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=("127.0.0.1", 0))
            sock.settimeout(1)
            try:
                return sock.recv(1) == b""
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            finally:
                sock.close()

        assert closed_before_tls()
        kept.sendall(request)  # the connection opened before the reload keeps working
        assert read_response(kept)[0] == 200
        newcomer = tls_connection(port, ca, source="127.0.0.2")
        assert ssl_serial(newcomer) != first_serial  # the new certificate
        newcomer.sendall(request)
        assert read_response(newcomer)[0] == 200
        kept.close()
        newcomer.close()
    finally:
        bridge.stop()


def ssl_serial(sock: ssl.SSLSocket) -> int:
    from cryptography import x509

    return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number
