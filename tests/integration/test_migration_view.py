"""The migration view and the hand-over report against a scripted migration through a real bridge and
the lab: several users on real RPC over HTTP v2 virtual connections (CONN/A1 + CONN/B1, a bind, echo
calls at different rates), an IN channel sinking a plain upload, and one virtual connection that
stalls; the status page, /status.json, /metrics and `bridge status` show the channels paired, their
users, rates and the stalled flag; the chart renders in headless Chromium with the run's numbers; the
report's totals equal what the client sent and received and what the lab counted."""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time

import requests
from prometheus_client.parser import text_string_to_metric_families
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_config
from support.browser import chromium, count_colour, png_pixels
from support.lab import basic_header
from support.net import free_port, read_head, tls_connection, wait_until
from support.processes import BridgeProcess, bridge_command

from bridge import cli
from bridge.lab import rpch
from bridge.protocol import rts

USERS = {"LAB\\alice": "Passw0rd!", "LAB\\bob": "B0b-second!", "LAB\\dave": "D4ve-third!", "LAB\\erin": "Er1n-fourth!"}
TARGET = "/rpc/rpcproxy.dll?EXCH2007.lab.local:6001"
IN_CHANNEL_LENGTH = rts.DEFAULT_CHANNEL_LIFETIME


class Client:
    """A scripted client's own count of what it sent and received (request and response bodies)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.sent = 0
        self.received = 0
        self.lock = threading.Lock()

    def add(self, sent: int = 0, received: int = 0) -> None:
        with self.lock:
            self.sent += sent
            self.received += received


class VirtualConnection:
    """Outlook's two channels over two TLS connections to the bridge, driven by rts.ClientVirtualConnection."""

    def __init__(self, port: int, ca, client: Client) -> None:
        self.client = client
        self.vc = rts.ClientVirtualConnection(receive_window_size=0x40000000)
        authorization = basic_header(client.user, USERS[client.user])
        self.out = tls_connection(port, ca, timeout=10)
        opening = self.vc.out_channel_opening()
        self.out.sendall(f"RPC_OUT_DATA {TARGET} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nAuthorization: {authorization}\r\nContent-Length: {len(opening)}\r\n\r\n".encode() + opening)
        client.add(sent=len(opening))
        status, _, rest = read_head(self.out)
        assert status == 200
        self.events = []
        self.feed(rest)
        self.inbound = tls_connection(port, ca, timeout=10)
        opening = self.vc.in_channel_opening()
        self.inbound.sendall(f"RPC_IN_DATA {TARGET} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nAuthorization: {authorization}\r\nContent-Length: {IN_CHANNEL_LENGTH}\r\n\r\n".encode() + opening)
        client.add(sent=len(opening))
        self.wait_for(rts.ConnC2Received)
        self.send(self.vc.bind(rts.EMSMDB))
        self.wait_for(rts.BindAckReceived)

    def feed(self, data: bytes) -> None:
        self.client.add(received=len(data))
        self.events.extend(self.vc.feed_out(data))

    def send(self, pdu: bytes) -> None:
        pdu += self.vc.take_in_channel_bytes()
        self.inbound.sendall(pdu)
        self.client.add(sent=len(pdu))

    def wait_for(self, kind: type) -> object:
        while True:
            for index, event in enumerate(self.events):
                if isinstance(event, kind):
                    del self.events[: index + 1]
                    return event
            data = self.out.recv(65536)
            assert data, "the OUT channel closed"
            self.feed(data)

    def echo(self, size: int) -> None:
        stub = bytes(range(256)) * (size // 256)
        self.send(self.vc.request(rpch.LAB_ECHO_OPNUM, stub))
        answer = self.wait_for(rts.ResponseReceived)
        assert answer.stub == stub

    def close(self) -> None:
        for sock in (self.inbound, self.out):
            sock.close()


def keep_echoing(connection: VirtualConnection, size: int, pause: float, stop: threading.Event, errors: list) -> None:
    try:
        while not stop.is_set():
            connection.echo(size)
            time.sleep(pause)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def plain_upload(port: int, ca, client: Client, stop: threading.Event, errors: list, piece: int = 8192, total: int = 1024 * 1024) -> None:
    """An RPC_IN_DATA channel whose body is not RTS (the lab's sink): paired by client connection."""
    try:
        sock = tls_connection(port, ca, timeout=10)
        sock.sendall(f"RPC_IN_DATA {TARGET} HTTP/1.1\r\nHost: {BRIDGE_FQDN}\r\nAuthorization: {basic_header(client.user, USERS[client.user])}\r\nContent-Length: {total}\r\n\r\n".encode())
        left = total
        while left:
            size = min(piece, left) if not stop.is_set() else left
            sock.sendall(b"x" * size)
            client.add(sent=size)
            left -= size
            if not stop.is_set():
                time.sleep(0.1)
        status, head, rest = read_head(sock)
        assert status == 200 and b"X-Lab-Received-Bytes: %d" % total in head and rest == b""
        sock.close()
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def metrics(url: str, password: str) -> dict[tuple[str, tuple], float]:
    values = {}
    for family in text_string_to_metric_families(requests.get(url + "/metrics", auth=("admin", password), timeout=5).text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_a_scripted_migration_on_the_status_page_metrics_bridge_status_chart_and_report(lab_factory, ca, tmp_path, capsys, caplog):
    caplog.set_level(logging.WARNING, logger="bridge.traffic")
    lab = lab_factory(users=USERS)
    before = lab.counters.snapshot()
    config = bridge_config(lab.port, tmp_path, ca, status_bind="127.0.0.1:0", stall_after=1.5, ledger_interval=1.0)
    clients = {user: Client(user) for user in USERS}
    stop = threading.Event()
    errors: list = []
    with BackgroundBridge(config) as bridge:
        url = f"http://127.0.0.1:{bridge.bridge.status_port}"
        password = (config.state_dir / "status-password").read_text().strip()

        def status() -> dict:
            return requests.get(url + "/status.json", auth=("admin", password), timeout=5).json()

        stalled = VirtualConnection(bridge.https_port, ca, clients["LAB\\erin"])  # bound, then silent
        fast = VirtualConnection(bridge.https_port, ca, clients["LAB\\alice"])
        slow = VirtualConnection(bridge.https_port, ca, clients["LAB\\bob"])
        threads = [
            threading.Thread(target=keep_echoing, args=(fast, 32 * 1024, 0.02, stop, errors)),
            threading.Thread(target=keep_echoing, args=(slow, 2 * 1024, 0.25, stop, errors)),
            threading.Thread(target=plain_upload, args=(bridge.https_port, ca, clients["LAB\\dave"], stop, errors)),
        ]
        for thread in threads:
            thread.start()

        def settled() -> dict | None:
            data = status()["migration"]
            erin = [c for c in data["channels"] if c["user"] == "LAB\\erin"]
            others = [c for c in data["channels"] if c["user"] != "LAB\\erin"]
            moving = all(c["rate"] > 0 and not c["stalled"] for c in others)
            return data if len(erin) == 2 and all(c["stalled"] for c in erin) and len(others) == 5 and moving else None

        view = wait_until(settled, timeout=20, step=0.25)
        assert view, (status()["migration"], errors)
        assert not errors, errors
        # Pairs: each virtual connection's IN and OUT by its cookie, dave's upload by its connection.
        pairs = {pair["user"]: pair for pair in view["pairs"]}
        assert set(pairs) == set(USERS)
        for user, connection in (("LAB\\alice", fast), ("LAB\\bob", slow), ("LAB\\erin", stalled)):
            assert pairs[user]["paired_by"] == "cookie" and pairs[user]["pair"] == "vc:" + connection.vc.virtual_connection_cookie.hex
            assert [len(pairs[user]["in"]), len(pairs[user]["out"])] == [1, 1]
            assert pairs[user]["in"][0]["client"] == "127.0.0.1"
        assert pairs["LAB\\dave"]["paired_by"] == "connection" and [len(pairs["LAB\\dave"]["in"]), len(pairs["LAB\\dave"]["out"])] == [1, 0]
        rate = {user: pairs[user]["out"][0]["rate"] for user in ("LAB\\alice", "LAB\\bob")}
        assert rate["LAB\\alice"] > 10 * rate["LAB\\bob"] > 0, rate  # 32 KiB every 20 ms against 2 KiB every 250 ms
        assert pairs["LAB\\dave"]["in"][0]["rate"] > 0
        assert view["stalled"] == 2 and view["stalls_total"] >= 2 and view["stall_after"] == 1.5
        erin = pairs["LAB\\erin"]["out"][0]
        assert erin["idle_seconds"] >= 1.5 and erin["age_seconds"] >= erin["idle_seconds"]
        assert erin["rate"] < rate["LAB\\bob"] / 10  # its opening's bytes over its age (younger than a minute)

        live_page = requests.get(url + "/", auth=("admin", password), timeout=5).text
        assert live_page.count("data-stalled='true'") == 2 and live_page.count("data-direction='IN'") == 4
        assert re.search(r"<tr class='stalled' [^>]*data-user='LAB\\erin'", live_page)
        after = metrics(url, password)
        assert after[("bridge_rpc_channels_stalled", ())] == 2
        assert after[("bridge_rpc_channel_stalls_total", ())] >= 2
        assert after[("bridge_rpc_channels", ())] == 7

        assert cli.main(["status", "--url", url, "--state-dir", str(config.state_dir), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)["migration"]
        assert {pair["user"] for pair in shown["pairs"]} == set(USERS) and shown["stalled"] == 2
        assert cli.main(["status", "--url", url, "--state-dir", str(config.state_dir), "--once"]) == 0
        terminal = capsys.readouterr().out
        assert "Outlook Anywhere channels" in terminal and "stalled" in terminal and "LAB\\erin" in terminal
        assert re.search("[▁▂▃▄▅▆▇█]", terminal)

        # The stall is logged once per channel at WARNING.
        warnings = [record.getMessage() for record in caplog.records if "stalled" in record.getMessage()]
        assert len(warnings) == 2 and all("LAB\\erin" in line for line in warnings), warnings

        # The end of the run: every answer in, every channel closed.
        stop.set()
        for thread in threads:
            thread.join(20)
        assert not errors, errors
        for connection in (fast, slow, stalled):
            connection.close()
        assert wait_until(lambda: status()["rpc_channels_open"] == 0, timeout=10)
        sent = sum(client.sent for client in clients.values())
        received = sum(client.received for client in clients.values())
        lab_now = lab.counters.snapshot()
        lab_in = sum(lab_now[name] - before[name] for name in ("rpc_in_bytes", "rpc_virtual_bytes_in"))
        lab_out = sum(lab_now[name] - before[name] for name in ("rpc_out_bytes", "rpc_virtual_bytes_out"))
        assert (lab_in, lab_out) == (sent, received)

        def totals_in() -> dict | None:
            data = status()["migration"]
            return data if data["total"]["bytes"] == sent + received else None

        view = wait_until(totals_in, timeout=5)
        assert view, status()["migration"]["total"]
        per_user = {item["user"]: (item["bytes_in"], item["bytes_out"]) for item in view["users"]}
        assert per_user == {user: (client.sent, client.received) for user, client in clients.items()}
        chart = view["throughput"]
        assert sum(row[1] for row in chart["minutes"]) == sent and sum(row[2] for row in chart["minutes"]) == received
        page = requests.get(url + "/", auth=("admin", password), timeout=5).text
        assert "<script" not in page and "LAB\\erin" in page.replace("&#x27;", "'")

    # The page in a real browser: the chart renders, carrying the run's numbers.
    saved = tmp_path / "status.html"
    saved.write_text(page.replace('<meta http-equiv="refresh"', '<meta name="no-refresh"'), encoding="utf-8")
    dom = chromium("--dump-dom", saved.as_uri(), directory=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    svg = re.search(r"<svg[^>]*id=\"throughput-chart\"[^>]*>", dom.stdout).group(0)
    assert f'data-total-in="{sent}"' in svg and f'data-total-out="{received}"' in svg
    minutes = re.findall(r'class="minute" data-minute="\d+" data-in="(\d+)" data-out="(\d+)"', dom.stdout)
    assert minutes and sum(int(a) for a, _ in minutes) == sent and sum(int(b) for _, b in minutes) == received
    shot = tmp_path / "status.png"
    result = chromium("--window-size=1000,700", "--hide-scrollbars", f"--screenshot={shot}", saved.as_uri(), directory=tmp_path)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    width, height, rows = png_pixels(shot.read_bytes())
    assert (width, height) == (1000, 700)
    from bridge.ops.status import COLOUR_IN, COLOUR_OUT

    assert count_colour(rows, COLOUR_OUT) > 20  # the bars (to clients) are drawn ...
    assert count_colour(rows, COLOUR_IN) > 2  # ... on top of the ones from clients

    # At exit the bridge wrote the ledger and the hand-over report; `bridge report` makes the same.
    written = json.loads((config.state_dir / "handover-report.json").read_text())
    assert written["total"] == {"bytes_in": sent, "bytes_out": received, "bytes": sent + received}
    assert {item["user"]: (item["bytes_in"], item["bytes_out"]) for item in written["users"]} == {user: (c.sent, c.received) for user, c in clients.items()}
    assert written["window"]["first_forwarded"] and written["window"]["last_forwarded"] and len(written["days"]) in (1, 2)
    assert written["certificates"][0]["subject"] == f"CN={BRIDGE_FQDN}" and written["runs"][0]["ended"]
    assert "no credentials" in written["statement"]
    ledger_text = (config.state_dir / "ledger.json").read_text()
    for secret in USERS.values():
        assert secret not in ledger_text and secret not in (config.state_dir / "handover-report.html").read_text()
    out_json, out_html = tmp_path / "report.json", tmp_path / "report.html"
    assert cli.main(["report", "--state-dir", str(config.state_dir), "--json", str(out_json), "--html", str(out_html)]) == 0
    console = capsys.readouterr().out
    assert "LAB\\alice" in console and "no credentials" in console.replace("\n", " ")
    assert json.loads(out_json.read_text())["total"]["bytes"] == sent + received
    assert f'data-bytes="{sent + received}"' in out_html.read_text()
    assert cli.main(["report", "--state-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_with_workers_the_parent_adds_up_the_views_and_writes_the_report_on_sigterm(lab_factory, ca, tmp_path, front_cert):
    lab = lab_factory(users=USERS)
    status_port = free_port()
    https_port, http_port = free_port(), free_port()
    command = bridge_command(lab.port, front_cert[0], front_cert[1], tmp_path, https_port, http_port, "--workers", "2", "--status-bind", f"127.0.0.1:{status_port}", "--stall-after", "30")
    process = BridgeProcess(command)
    try:
        port = process.ready_port()
        state_dir = tmp_path / "state"
        clients = {user: Client(user) for user in ("LAB\\alice", "LAB\\bob")}
        connections = [VirtualConnection(port, ca, clients[user]) for user in clients for _ in range(2)]
        for connection in connections:
            connection.echo(8192)
        url = f"http://127.0.0.1:{status_port}"
        password = (state_dir / "status-password").read_text().strip()

        def view() -> dict | None:
            data = requests.get(url + "/status.json", auth=("admin", password), timeout=5).json()["migration"]
            users = {item["user"]: item["bytes"] for item in data["users"]}
            expected = {user: client.sent + client.received for user, client in clients.items()}
            return data if data["channels_open"] == 8 and users == expected else None

        data = wait_until(view, timeout=10, step=0.25)
        assert data, requests.get(url + "/status.json", auth=("admin", password), timeout=5).json()["migration"]
        pairs = [pair for pair in data["pairs"] if pair["paired_by"] == "cookie"]
        assert len(pairs) == 4 and all(len(pair["in"]) == 1 and len(pair["out"]) == 1 for pair in pairs)  # across workers too
        for connection in connections:
            connection.close()
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(30) == 0
        report = json.loads((state_dir / "handover-report.json").read_text())
        assert {item["user"]: item["bytes"] for item in report["users"]} == {user: c.sent + c.received for user, c in clients.items()}
    finally:
        process.stop()
