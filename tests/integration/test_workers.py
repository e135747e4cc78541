"""`bridge up --workers 2` as real processes in front of the lab: both workers serve the one port,
NTLM stays on its connection, SIGHUP and SIGTERM reach every worker, a killed worker is replaced,
failed logons seen by different workers add up to one ban, the status page adds the workers up."""

from __future__ import annotations

import base64
import json
import os
import poplib
import re
import signal
import smtplib
import ssl
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from requests_ntlm import HttpNtlmAuth
from support.bridges import BRIDGE_FQDN, bridge_client_context, bridge_connection, bridge_session, resolve_lab_names
from support.lab import LAB_PASSWORD, LAB_USER, basic_header, negotiate_logon
from support.net import free_port
from support.processes import BridgeProcess, assert_one_sentence_error, bridge_cli, bridge_command

from bridge.certs.keys import new_private_key, write_pair
from bridge.lab.mailbox import lab_mailbox

WORKER_LINE = re.compile(r"worker (\d+) \(pid (\d+)\) serving")


def worker_pids(process) -> dict[int, int]:
    """Worker index -> pid of the latest start of that worker, from the log."""
    pids: dict[int, int] = {}
    for line in list(process.lines):
        match = WORKER_LINE.search(line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def start_workers(start_bridge_process, *extra: str, **kwargs):
    process, https_port, http_port = start_bridge_process("--workers", "2", *extra, **kwargs)
    process.wait_for("bridge ready")
    pids = worker_pids(process)
    assert sorted(pids) == [0, 1], process.lines
    assert len(set(pids.values())) == 2 and process.process.pid not in pids.values()
    return process, https_port, pids


def get(ca, port: int, path: str = "/EWS/Exchange.asmx", headers: dict[str, str] | None = None) -> int:
    connection = bridge_connection(port, ca, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@contextmanager
def only_worker(pids: dict[int, int], index: int):
    """Stop every other worker (SIGSTOP), so only ``index`` can accept connections."""
    stopped = [pid for other, pid in pids.items() if other != index]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def status_json(process, tmp_path: Path, port: int) -> dict:
    password = (tmp_path / "state" / "status-password").read_text().strip()
    token = base64.b64encode(f"admin:{password}".encode()).decode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/status.json", headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_each_worker_serves_the_one_port_and_ntlm_stays_on_its_connection(start_bridge_process, ca, lab):
    process, port, pids = start_workers(start_bridge_process)
    for index in pids:
        with only_worker(pids, index):
            assert get(ca, port) == 401  # answered although the other worker is stopped
            connection = bridge_connection(port, ca, timeout=10)
            assert negotiate_logon(connection, "/EWS/Exchange.asmx").status == 200
        for _ in range(3):  # both workers accept again; the logged-on connection stays with its worker
            connection.request("GET", "/EWS/Exchange.asmx")
            again = connection.getresponse()
            again.read()
            assert again.status == 200
        connection.close()
    assert process.stop() == 0


def test_twenty_parallel_connections_and_the_status_page_adds_the_workers_up(start_bridge_process, ca, tmp_path):
    status_port = free_port()
    process, port, pids = start_workers(start_bridge_process, "--status-bind", f"127.0.0.1:{status_port}")

    def logon(_: int) -> int:
        session = bridge_session(ca, HttpNtlmAuth(LAB_USER, LAB_PASSWORD))
        try:
            return session.get(f"https://{BRIDGE_FQDN}:{port}/EWS/Exchange.asmx", timeout=30).status_code
        finally:
            session.close()

    with ThreadPoolExecutor(20) as pool:
        assert list(pool.map(logon, range(20))) == [200] * 20
    with only_worker(pids, 0):
        assert get(ca, port) == 401
    with only_worker(pids, 1):
        assert get(ca, port) == 401
    # Each requests-ntlm logon is two 401s (no credentials, then the challenge) and one 200; then two plain 401s.
    deadline = time.monotonic() + 5
    while True:
        data = status_json(process, tmp_path, status_port)
        counts = {(entry["route"], entry["status"]): entry["count"] for entry in data["requests"]}
        if counts.get(("/EWS", 200)) == 20 and counts.get(("/EWS", 401)) == 42 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counts.get(("/EWS", 200)) == 20 and counts.get(("/EWS", 401)) == 42, data["requests"]
    assert data["connections_limit"] == 1000
    assert process.stop() == 0


def test_sighup_swaps_the_certificate_in_every_worker(start_bridge_process, ca, tmp_path):
    directory = tmp_path / "live"
    directory.mkdir()
    key = new_private_key("ecdsa-p256")
    cert, key_path = write_pair(directory, ca.issue([BRIDGE_FQDN], key), key)
    process, port, pids = start_workers(start_bridge_process, cert=cert, key=key_path)
    new_key = new_private_key("ecdsa-p256")
    second = ca.issue([BRIDGE_FQDN], new_key)
    write_pair(directory, second, new_key)
    process.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while sum("certificate reloaded" in line for line in process.lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    for index in pids:
        with only_worker(pids, index):
            fresh = bridge_connection(port, ca, timeout=10)
            fresh.connect()
            served = x509.load_der_x509_certificate(fresh.sock.getpeercert(binary_form=True))
            fresh.close()
        assert served.serial_number == second.serial_number, f"worker {index} still serves the old certificate"
    assert process.stop() == 0


def test_sigterm_stops_every_process_with_exit_0(start_bridge_process):
    process, _, pids = start_workers(start_bridge_process)
    assert process.stop() == 0
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert "Traceback" not in "".join(process.lines)


def test_a_killed_worker_is_replaced_and_service_continues(start_bridge_process, ca):
    process, port, pids = start_workers(start_bridge_process)
    os.kill(pids[0], signal.SIGKILL)
    process.wait_for("exited unexpectedly (signal SIGKILL)")
    deadline = time.monotonic() + 15
    while worker_pids(process).get(0) == pids[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    replacement = worker_pids(process)[0]
    assert replacement != pids[0]
    for index, _pid in {0: replacement, 1: pids[1]}.items():
        with only_worker({0: replacement, 1: pids[1]}, index):
            assert get(ca, port) == 401
    assert process.stop() == 0


def test_failed_logons_seen_by_different_workers_add_up_to_one_ban(start_bridge_process, ca, tmp_path):
    process, port, pids = start_workers(start_bridge_process, "--ban-threshold", "3", "--never-ban", "10.0.0.1")
    wrong = {"Authorization": basic_header(LAB_USER, "wrong")}
    with only_worker(pids, 0):
        assert [get(ca, port, headers=wrong) for _ in range(2)] == [401, 401]
    with only_worker(pids, 1):
        assert get(ca, port) == 401  # not banned yet: two failures, one short of the threshold
        assert get(ca, port, headers=wrong) == 401  # the third, on the other worker
    process.wait_for("banned 127.0.0.1")
    bans = json.loads((tmp_path / "state" / "bans.json").read_text())["bans"]
    assert bans["127.0.0.1"]["failures"] == 3
    for index in pids:
        with only_worker(pids, index):
            deadline = time.monotonic() + 5
            while (status := get(ca, port)) != 403 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert status == 403, f"worker {index} did not apply the ban"
    assert process.stop() == 0


def test_workers_setting_is_checked():
    assert_one_sentence_error(bridge_cli("up", "--fqdn", "ok.example", "--legacy", "a.example", "--cert", "c", "--key", "k", "--workers", "0"), "--workers")


def test_max_connections_is_the_total_divided_among_the_workers(start_bridge_process, ca):
    process, port, pids = start_workers(start_bridge_process, "--max-connections", "2")
    with only_worker(pids, 0):
        held = bridge_connection(port, ca, timeout=10)
        held.request("GET", "/EWS/Exchange.asmx")
        held.getresponse().read()
        assert get(ca, port) == 503  # worker 0's share is 1
    with only_worker(pids, 1):
        assert get(ca, port) == 401  # worker 1 still has its one
    held.close()
    assert process.stop() == 0


def test_https_port_in_use_is_one_sentence_with_workers(lab, front_cert, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = bridge_cli(*bridge_command(lab.port, *front_cert, tmp_path, port, free_port(), "--workers", "2")[3:])
    assert_one_sentence_error(result, f"Port {port}", "already in use", "--https-port")


def test_a_certificate_renewed_by_the_parent_reaches_every_worker(pebble, tmp_path):
    """ACME stays in the parent; its background renewal of a due certificate is loaded by each worker."""
    import datetime as dt
    import socket
    import ssl
    import sys

    from bridge.certs.acme import Lineage
    from bridge.certs.keys import LocalCA, cert_pem, key_pem

    fqdn = "workers.acme.test"
    state = tmp_path / "state"
    local = LocalCA.create()
    key = new_private_key("ecdsa-p256")
    due = local.issue([fqdn], key, days=90, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=80))
    Lineage(state, fqdn).save(cert_pem(due).decode(), key_pem(key), {"directory": pebble.directory_url, "key_type": "ecdsa-p256"})
    port = free_port()
    process = BridgeProcess(
        [
            sys.executable,
            "-m",
            "bridge.cli",
            "up",
            "--fqdn",
            fqdn,
            "--legacy",
            f"127.0.0.1:{free_port()}",
            "--bind",
            "127.0.0.1",
            "--https-port",
            str(port),
            "--http-port",
            str(pebble.http_port),
            "--state-dir",
            str(state),
            "--status-bind",
            "off",
            "--acme-directory",
            pebble.directory_url,
            "--acme-ca-bundle",
            str(pebble.ca_bundle),
            "--workers",
            "2",
        ]
    )
    try:
        process.wait_for("bridge ready")
        pids = worker_pids(process)
        context = ssl.create_default_context(cadata=pebble.root_pem.decode())  # trusts only Pebble's root
        for index in pids:
            deadline, issuer = time.monotonic() + 30, None
            while time.monotonic() < deadline:
                with only_worker(pids, index), socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                    try:
                        with context.wrap_socket(raw, server_hostname=fqdn) as tls:
                            issuer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).issuer.rfc4514_string()
                            break
                    except ssl.SSLCertVerificationError:  # still the due certificate from the local CA
                        time.sleep(0.2)
            assert issuer and "Pebble Intermediate" in issuer, f"worker {index} never served the renewed certificate"
        assert process.stop() == 0
    finally:
        process.stop()


def test_sighup_with_a_broken_key_reloads_no_worker_and_keeps_serving(start_bridge_process, front_cert, ca):
    process, port, pids = start_workers(start_bridge_process)
    front_cert[1].write_text("broken\n")
    process.process.send_signal(signal.SIGHUP)
    process.wait_for("keeping the current certificate")
    for index in pids:
        with only_worker(pids, index):
            assert get(ca, port) == 401
    assert not any("certificate reloaded" in line for line in process.lines)
    assert process.stop() == 0


def test_mail_listeners_run_in_the_parent_and_their_bans_reach_every_worker(lab_factory, front_cert, ca, tmp_path):
    mail_lab = lab_factory(pop3_port=0, submission_port=0)
    https_port, http_port, pop3_port, submission_port = free_port(), free_port(), free_port(), free_port()
    mail = ["--pop3s-port", str(pop3_port), "--pop3-upstream", f"127.0.0.1:{mail_lab.mail_port('pop3')}"]
    mail += ["--submission-port", str(submission_port), "--smtp-upstream", f"127.0.0.1:{mail_lab.mail_port('submission')}", "--ban-threshold", "3"]
    process = BridgeProcess(bridge_command(mail_lab.port, *front_cert, tmp_path, https_port, http_port, "--workers", "2", *mail))
    try:
        process.wait_for("bridge ready")
        pids = worker_pids(process)
        assert "pop3 listener on port" in process.log and "submission listener on port" in process.log
        resolve_lab_names()
        client = poplib.POP3_SSL(BRIDGE_FQDN, pop3_port, context=bridge_client_context(ca), timeout=30)
        client.user(LAB_USER)
        assert client.pass_(LAB_PASSWORD).startswith(b"+OK") and client.stat()[0] == len(lab_mailbox())
        client.quit()
        with smtplib.SMTP(BRIDGE_FQDN, submission_port, timeout=30) as smtp:
            smtp.starttls(context=bridge_client_context(ca))
            smtp.login(LAB_USER, LAB_PASSWORD)
        assert get(ca, https_port) == 401  # the workers serve HTTPS meanwhile
        for attempt in range(3):
            client = poplib.POP3_SSL(BRIDGE_FQDN, pop3_port, context=bridge_client_context(ca), timeout=30)
            client.user(LAB_USER)
            with pytest.raises(poplib.error_proto):
                client.pass_(f"wrong-{attempt}")
            client.close()
        process.wait_for("banned 127.0.0.1")
        for index in pids:  # the parent pushed the ban to every worker
            with only_worker(pids, index):
                deadline = time.monotonic() + 5
                while (status := get(ca, https_port)) != 403 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert status == 403, f"worker {index} did not apply the ban"
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            poplib.POP3_SSL(BRIDGE_FQDN, pop3_port, context=bridge_client_context(ca), timeout=5)  # closed before TLS
        assert "wrong-" not in process.log and LAB_PASSWORD not in process.log
    finally:
        assert process.stop() == 0
