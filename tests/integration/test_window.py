"""The migration window over real sockets: a bridge whose window closes stops forwarding (503 with the
sentence), drains the requests in progress like SIGTERM, and keeps its status page and port 80; SIGHUP
with a later deadline re-opens it, with one process and with --workers."""

from __future__ import annotations

import datetime as dt
import signal
import socket
import ssl
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_config
from support.lab import basic_header
from support.net import read_response, tls_connection, wait_until
from support.processes import BridgeProcess, bridge_command

from bridge.config import format_moment

EWS = "/EWS/Exchange.asmx"
GET = f"GET {EWS} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nAuthorization: {basic_header()}\r\n\r\n".encode()
TOKEN = "window-token_1"


def post_head(length: int) -> bytes:
    return f"POST {EWS} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nAuthorization: {basic_header()}\r\nContent-Type: text/xml\r\nContent-Length: {length}\r\n\r\n".encode()


def soon(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


def metrics(url: str, password: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", auth=("admin", password), timeout=5).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


def test_expiry_answers_503_drains_open_requests_and_keeps_status_page_and_port_80(lab, ca, tmp_path):
    deadline = soon(3).replace(microsecond=0) + dt.timedelta(seconds=1)
    config = bridge_config(lab.port, tmp_path, ca, expire_at=deadline, drain_timeout=2.0, status_bind="127.0.0.1:0")
    with BackgroundBridge(config) as background:
        bridge = background.bridge
        port = background.https_port
        status_url = f"http://127.0.0.1:{bridge.status_port}"
        password = (config.state_dir / "status-password").read_text().strip()
        port80 = next(runner for runner in bridge.runners if getattr(runner, "ssl_context", "") is None)
        port80.handler.__self__.challenges[TOKEN] = TOKEN + ".thumbprint"

        before = requests.get(status_url + "/status.json", auth=("admin", password), timeout=5).json()["window"]
        assert before["expired"] is False and 0 < before["seconds_left"] <= 4 and before["basis"] == "expire_at"
        idle = tls_connection(port, ca)
        idle.sendall(GET)
        assert read_response(idle)[0] == 200  # forwarded, and now an idle keep-alive connection
        body = b"<soap:Envelope><soap:Body><GetFolder/></soap:Body></soap:Envelope>" + b" " * 2000
        finishing = tls_connection(port, ca)  # an open request that completes inside --drain-timeout
        finishing.sendall(post_head(len(body)) + body[:1000])
        stalled = tls_connection(port, ca)  # one that does not: cut after --drain-timeout
        stalled.sendall(post_head(len(body)) + body[:1000])

        assert wait_until(lambda: bridge.window.closed, timeout=8)
        closed = time.monotonic()
        # New requests: 503 with the sentence, on a new connection and on the idle one.
        fresh = tls_connection(port, ca)
        fresh.sendall(GET)
        status, answer = read_response(fresh)
        expected = f"migration window closed at {format_moment(deadline)}"  # (a whole minute is written without ":00")
        assert status == 503 and expected.encode() in answer and b"--expire-at" in answer and b"SIGHUP" in answer, answer
        idle.sendall(GET)
        assert read_response(idle)[0] == 503
        # The open request finishes.
        finishing.sendall(body[1000:])
        finishing.settimeout(5)
        status, answer = read_response(finishing)
        assert status == 200 and b"GetFolder" in answer
        # The stalled one is cut once --drain-timeout has passed.
        stalled.settimeout(5)
        try:
            assert stalled.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass
        assert 1.5 <= time.monotonic() - closed < 4.5

        # The status page, /status.json and /metrics still answer and say so.
        page = requests.get(status_url + "/", auth=("admin", password), timeout=5)
        assert page.status_code == 200 and "CLOSED at" in page.text
        window = requests.get(status_url + "/status.json", auth=("admin", password), timeout=5).json()["window"]
        assert window["expired"] is True and window["seconds_left"] == 0
        values = metrics(status_url, password)
        assert values["bridge_window_expired"] == 1 and values["bridge_window_seconds_left"] == 0
        # Port 80 still answers ACME challenges and redirects.
        with socket.create_connection(("127.0.0.1", background.http_port), timeout=5) as plain:
            plain.sendall(f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\n\r\n".encode())
            status, answer = read_response(plain)
            assert status == 200 and answer.strip() == (TOKEN + ".thumbprint").encode()
            plain.sendall(f"GET /owa/ HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nConnection: close\r\n\r\n".encode())
            assert read_response(plain)[0] == 301
        for sock in (idle, finishing, stalled, fresh):
            sock.close()


def request_status(port: int, ca) -> int | None:
    try:
        sock = tls_connection(port, ca)
    except OSError:
        return None
    try:
        sock.sendall(GET)
        return read_response(sock)[0]
    except (OSError, ConnectionError):
        return None
    finally:
        sock.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_with_a_later_expiry_reopens(lab, front_cert, ca, tmp_path, workers):
    settings = tmp_path / "bridge.toml"
    # Long enough for two workers to start and answer once on a loaded machine (CI shares two cores).
    settings.write_text('expire_after = "12s"\n')
    cert, key = front_cert
    process = BridgeProcess(bridge_command(lab.port, cert, key, tmp_path, 0, 0, "--status-bind", "off", "--config", str(settings), "--workers", workers))
    try:
        port = process.ready_port(timeout=60)
        assert "migration window closes at" in process.log and "expire_after 12s from the first start" in process.log
        assert request_status(port, ca) == 200
        process.wait_for("migration window closed at", timeout=30)
        assert wait_until(lambda: request_status(port, ca) == 503, timeout=5)  # every worker too
        started = (tmp_path / "state" / "window-started").read_text().strip()

        settings.write_text(f'expire_at = "{soon(3600):%Y-%m-%dT%H:%M:%S}"\n')
        process.process.send_signal(signal.SIGHUP)
        process.wait_for("migration window re-opened until", timeout=10)
        assert wait_until(lambda: all(request_status(port, ca) == 200 for _ in range(4)), timeout=5), process.log
        assert (tmp_path / "state" / "window-started").read_text().strip() == started
    finally:
        process.stop()
    assert process.log.count("migration window closed at") == 1  # logged by the parent only
