"""--allow exchange-online over real sockets: a bridge admitting a source inside the (test) list and
closing one outside, picking up a refreshed list without a signal, and `bridge allow refresh` against a
local HTTPS endpoints service (a good list, a malformed one, nothing listening)."""

from __future__ import annotations

import ipaddress
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_config, ca_file
from support.lab import basic_header
from support.net import free_port, read_response, tls_connection, wait_until
from support.processes import assert_one_sentence_error, bridge_cli

from bridge.certs.keys import new_private_key, write_pair
from bridge.ops import allowlist
from bridge.ops.allowlist import STATE_FILE, store, validate_ranges

EWS = "/EWS/Exchange.asmx"
GET = f"GET {EWS} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nAuthorization: {basic_header()}\r\n\r\n".encode()
TEST_LIST = ["127.0.0.2/32", "192.0.2.0/24", "2001:db8::/32"]


def answered_from(port: int, ca, source: str) -> bool:
    """True when a request from ``source`` is forwarded (200); False when the connection is closed before TLS."""
    try:
        sock = tls_connection(port, ca, source=source)
    except (ssl.SSLError, ConnectionError, OSError):
        return False
    with sock:
        sock.sendall(GET)
        return read_response(sock)[0] == 200


def test_exchange_online_admits_listed_sources_and_follows_a_refreshed_list(lab, ca, tmp_path, monkeypatch):
    monkeypatch.setattr(allowlist, "WATCH_INTERVAL", 0.2)
    state = tmp_path / "state"
    store(state, "https://endpoints.test/worldwide?clientrequestid=test", validate_ranges(TEST_LIST, "test"))
    config = bridge_config(lab.port, tmp_path, ca, allow=("exchange-online",), status_bind="127.0.0.1:0")
    with BackgroundBridge(config) as background:
        port = background.https_port
        assert answered_from(port, ca, "127.0.0.2")
        assert not answered_from(port, ca, "127.0.0.3")
        assert not answered_from(port, ca, "127.0.0.1")
        assert background.bridge.guard.rejections["allow-list"] == 2

        password = (state / "status-password").read_text().strip()
        status = requests.get(f"http://127.0.0.1:{background.bridge.status_port}/status.json", auth=("admin", password), timeout=5).json()
        listed = status["allow"]["exchange_online"]
        assert status["allow"]["sources"] == ["exchange-online"]
        assert listed["source"] == "https://endpoints.test/worldwide?clientrequestid=test" and listed["ranges"] == 3 and not listed["packaged"]
        assert len(listed["date"]) == 10

        # `bridge allow refresh` (here: the file it writes) reaches the running bridge without a signal.
        store(state, "https://endpoints.test/worldwide?clientrequestid=again", validate_ranges(["127.0.0.3/32", *TEST_LIST[1:]], "test"))
        assert wait_until(lambda: answered_from(port, ca, "127.0.0.3"), timeout=5)
        assert not answered_from(port, ca, "127.0.0.2")


def test_exchange_online_combines_with_a_cidr(lab, ca, tmp_path):
    store(tmp_path / "state", "https://endpoints.test/list", validate_ranges(TEST_LIST, "test"))
    config = bridge_config(lab.port, tmp_path, ca, allow=("exchange-online", ipaddress.ip_network("127.0.0.4/32")))
    with BackgroundBridge(config) as background:
        assert answered_from(background.https_port, ca, "127.0.0.2")
        assert answered_from(background.https_port, ca, "127.0.0.4")
        assert not answered_from(background.https_port, ca, "127.0.0.5")


# --------------------------------------------------------------------------- `bridge allow refresh`


class EndpointsService:
    """A local HTTPS server standing in for endpoints.office.com; ``answer`` is what it serves."""

    def __init__(self, ca, directory) -> None:
        self.answer = b"[]"
        self.requests: list[str] = []
        service = self
        key = new_private_key("ecdsa-p256")
        cert, key_path = write_pair(directory, ca.issue(["localhost"], key), key)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                service.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(service.answer)))
                self.end_headers()
                self.wfile.write(service.answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key_path)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://localhost:{self.server.server_address[1]}/endpoints/worldwide?clientrequestid=4e8b4fa8-0e2c-4a1b-8e0a-1a2b3c4d5e6f"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoints(ca, tmp_path):
    directory = tmp_path / "endpoints-cert"
    directory.mkdir()
    service = EndpointsService(ca, directory)
    yield service
    service.close()


def test_refresh_stores_a_good_list_and_keeps_it_when_the_service_fails(endpoints, ca, tmp_path):
    state = tmp_path / "state"
    trust = ca_file(ca, tmp_path)
    refresh = ("allow", "refresh", "--state-dir", str(state), "--ca-bundle", str(trust), "--timeout", "5")
    endpoints.answer = json.dumps(
        [
            {"id": 1, "serviceArea": "Exchange", "urls": ["outlook.office.com"], "ips": ["13.107.6.152/31", "40.96.0.0/13", "2603:1006::/40"], "tcpPorts": "80,443"},
            {"id": 9, "serviceArea": "Exchange", "ips": ["40.92.0.0/15", "2a01:111:f400::/48"], "tcpPorts": "25"},
            {"id": 46, "serviceArea": "SharePoint", "ips": ["13.107.136.0/22"]},
        ]
    ).encode()
    result = bridge_cli(*refresh, "--endpoints-url", endpoints.url)
    assert result.returncode == 0, result.stderr
    assert "stored 5 Exchange Online ranges (3 IPv4, 2 IPv6" in result.stdout
    stored = json.loads((state / STATE_FILE).read_text())
    assert stored["source"] == endpoints.url and len(stored["date"]) == 10
    assert stored["ranges"] == ["13.107.6.152/31", "40.92.0.0/15", "40.96.0.0/13", "2603:1006::/40", "2a01:111:f400::/48"]
    assert "13.107.136.0/22" not in stored["ranges"]  # SharePoint's
    assert endpoints.requests[-1].startswith("/endpoints/worldwide?clientrequestid=")
    good = (state / STATE_FILE).read_bytes()

    shown = bridge_cli("allow", "show", "--state-dir", str(state))
    assert shown.returncode == 0 and endpoints.url in shown.stdout and "40.92.0.0/15" in shown.stdout

    endpoints.answer = b"<html><body>Service Unavailable</body></html>"
    assert_one_sentence_error(bridge_cli(*refresh, "--endpoints-url", endpoints.url), "did not answer JSON", "keeps its current list")
    assert (state / STATE_FILE).read_bytes() == good

    endpoints.answer = json.dumps([{"id": 46, "serviceArea": "SharePoint", "ips": ["13.107.136.0/22"]}]).encode()
    assert_one_sentence_error(bridge_cli(*refresh, "--endpoints-url", endpoints.url), "lists no Exchange address ranges")
    assert (state / STATE_FILE).read_bytes() == good

    refused = f"https://localhost:{free_port()}/endpoints/worldwide?clientrequestid=x"
    assert_one_sentence_error(bridge_cli(*refresh, "--endpoints-url", refused), "is unreachable", "refused", "keeps its current list")
    assert (state / STATE_FILE).read_bytes() == good

    # A service whose certificate is not trusted is refused too (no --ca-bundle: the system store).
    untrusted = bridge_cli("allow", "refresh", "--state-dir", str(state), "--endpoints-url", endpoints.url, "--timeout", "5")
    assert_one_sentence_error(untrusted, "is unreachable", "CERTIFICATE_VERIFY_FAILED")
    assert (state / STATE_FILE).read_bytes() == good
