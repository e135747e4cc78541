"""`bridge up` as a real process: start-up errors, the ready line, SIGHUP reload, flat memory on a
512 MiB RPC_OUT_DATA channel, SIGTERM."""

from __future__ import annotations

import hashlib
import re
import signal
import socket
import time

import pytest
from support.bridges import BRIDGE_FQDN, bridge_connection
from support.lab import basic_header
from support.net import free_port
from support.processes import assert_one_sentence_error, bridge_cli, bridge_command

from bridge.certs.keys import LocalCA, new_private_key, write_pair
from bridge.lab.server import payload_sha256

RPC_PATH = "/rpc/rpcproxy.dll?EXCH2007.lab.local:6001"


# ---- start-up errors --------------------------------------------------------------------------------


def test_port_in_use_is_one_sentence(lab, front_cert, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = bridge_cli(*bridge_command(lab.port, *front_cert, tmp_path, port, free_port())[3:])
    assert_one_sentence_error(result, f"Port {port}", "already in use", "--https-port")


def test_http_port_in_use_is_one_sentence(lab, front_cert, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = bridge_cli(*bridge_command(lab.port, *front_cert, tmp_path, free_port(), port)[3:])
    assert_one_sentence_error(result, f"Port {port}", "--http-port")


def test_unreadable_key_is_one_sentence(lab, front_cert, tmp_path):
    missing = tmp_path / "no-such-key.pem"
    result = bridge_cli(*bridge_command(lab.port, front_cert[0], missing, tmp_path, free_port(), free_port())[3:])
    assert_one_sentence_error(result, str(missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    result = bridge_cli(*bridge_command(lab.port, front_cert[0], garbage, tmp_path, free_port(), free_port())[3:])
    assert_one_sentence_error(result, str(garbage))


def test_key_that_does_not_match_the_certificate_is_one_sentence(lab, front_cert, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    ca = LocalCA.create()
    key = new_private_key("ecdsa-p256")
    _, other_key = write_pair(other, ca.issue([BRIDGE_FQDN], key), key)
    result = bridge_cli(*bridge_command(lab.port, front_cert[0], other_key, tmp_path, free_port(), free_port())[3:])
    assert_one_sentence_error(result, "does not belong to the certificate")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--fqdn", "not a name", "--legacy", "a.example", "--cert", "c", "--key", "k"], "--fqdn"),
        (["--fqdn", "ok.example", "--cert", "c", "--key", "k"], "--legacy"),
        (["--fqdn", "ok.example", "--legacy", "a.example:99999", "--cert", "c", "--key", "k"], "--legacy"),
        (["--fqdn", "ok.example", "--legacy", "a.example", "--cert", "c"], "--key"),
        (["--fqdn", "ok.example", "--legacy", "a.example", "--legacy-fingerprint", "sha1:00", "--cert", "c", "--key", "k"], "--legacy-fingerprint"),
        (["--fqdn", "ok.example", "--legacy", "a.example", "--https-port", "http", "--cert", "c", "--key", "k"], "--https-port"),
        (["--fqdn", "ok.example", "--legacy", "a.example", "--idle-timeout", "-5", "--cert", "c", "--key", "k"], "--idle-timeout"),
        (["--fqdn", "ok.example", "--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_input_is_one_sentence(args, fragment):
    result = bridge_cli("up", *args)
    assert_one_sentence_error(result, fragment)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bad_config_file_is_one_sentence(tmp_path):
    config = tmp_path / "bridge.toml"
    config.write_text('fqdn = "ok.example"\nlegacy = ["a.example"]\nlegasy_typo = 1\n')
    assert_one_sentence_error(bridge_cli("up", "--config", str(config)), "legasy_typo")
    config.write_text("fqdn = \n")
    assert_one_sentence_error(bridge_cli("up", "--config", str(config)), str(config))


# ---- running ------------------------------------------------------------------------------------


def test_ready_line_names_the_urls_and_unpinned_warning_names_the_flag(start_bridge_process, lab):
    process, https_port, _ = start_bridge_process()
    ready = process.wait_for("bridge ready")
    assert f"https://{BRIDGE_FQDN}:{https_port}/rpc/rpcproxy.dll" in ready
    assert f"127.0.0.1:{lab.port}" in ready
    warning = process.wait_for("is not verified")
    assert "--legacy-fingerprint sha256:" in warning
    assert process.stop() == 0


def test_sighup_swaps_the_certificate_without_dropping_connections(start_bridge_process, ca, tmp_path):
    directory = tmp_path / "live"
    directory.mkdir()
    key = new_private_key("ecdsa-p256")
    first_cert = ca.issue([BRIDGE_FQDN], key)
    cert, key_path = write_pair(directory, first_cert, key)
    process, https_port, _ = start_bridge_process(cert=cert, key=key_path)
    process.wait_for("bridge ready")
    old = bridge_connection(https_port, ca)
    old.request("GET", "/EWS/Exchange.asmx")
    old.getresponse().read()

    new_key = new_private_key("ecdsa-p256")
    second_cert = ca.issue([BRIDGE_FQDN], new_key)
    write_pair(directory, second_cert, new_key)
    process.process.send_signal(signal.SIGHUP)
    process.wait_for("certificate reloaded")

    fresh = bridge_connection(https_port, ca)
    fresh.connect()
    served = fresh.sock.getpeercert(binary_form=True)
    from cryptography import x509

    assert x509.load_der_x509_certificate(served).serial_number == second_cert.serial_number
    old.request("GET", "/EWS/Exchange.asmx")  # the connection opened before the swap still works
    assert old.getresponse().status == 401
    old.close()
    fresh.close()


def test_sighup_with_a_broken_file_keeps_serving(start_bridge_process, front_cert, ca):
    process, https_port, _ = start_bridge_process()
    process.wait_for("bridge ready")
    front_cert[1].write_text("broken\n")
    process.process.send_signal(signal.SIGHUP)
    process.wait_for("keeping the current certificate")
    connection = bridge_connection(https_port, ca)
    connection.request("GET", "/EWS/Exchange.asmx")
    assert connection.getresponse().status == 401


def test_512_mib_rpc_out_data_arrives_intact_with_flat_memory(start_bridge_process, ca):
    size = 512 * 1024**2
    process, https_port, _ = start_bridge_process("--log-level", "warning")
    process.wait_for("legacy 127.0.0.1")
    time.sleep(0.5)
    connection = bridge_connection(https_port, ca)
    connection.putrequest("RPC_OUT_DATA", RPC_PATH)
    connection.putheader("Authorization", basic_header())
    connection.putheader("Content-Length", "76")
    connection.putheader("X-Lab-Out-Size", str(size))
    connection.endheaders(b"\0" * 76)
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Length") == str(size)
    digest, received = hashlib.sha256(), 0
    baseline = peak = None
    while chunk := response.read(1024 * 1024):
        digest.update(chunk)
        received += len(chunk)
        if baseline is None and received >= 32 * 1024**2:
            baseline = process.rss_kib()  # buffers are warm by now
        if baseline is not None and received % (32 * 1024**2) < len(chunk):
            peak = max(peak or 0, process.rss_kib())
    connection.close()
    assert received == size
    assert digest.hexdigest() == payload_sha256(size)
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 16, f"bridge RSS grew by {growth_mib:.1f} MiB while streaming"


def test_sigterm_stops_cleanly(start_bridge_process):
    process, _, _ = start_bridge_process()
    process.wait_for("bridge ready")
    assert process.stop() == 0
    assert "Traceback" not in "".join(process.lines)


def test_sigterm_right_after_requests_loses_no_access_line(start_bridge_process, ca):
    """The access log is buffered (bridge.net.accesslog): a SIGTERM within its flush interval of the
    last answer, with a connection still open, must still leave one line per request."""
    process, https_port, _ = start_bridge_process()
    process.wait_for("bridge ready")
    connections = [bridge_connection(https_port, ca) for _ in range(3)]
    count = 0
    for round_number in range(40):
        for index, connection in enumerate(connections):
            connection.request("GET", f"/owa/sigterm-{round_number}-{index}")
            connection.getresponse().read()
            count += 1
    process.process.send_signal(signal.SIGTERM)  # the connections are still open: nothing went idle
    assert process.stop() == 0
    for connection in connections:
        connection.close()
    lines = [line for line in process.lines if " INFO bridge.access: " in line and " /owa/sigterm-" in line]
    assert len(lines) == count, process.log[-3000:]
    paths = {line.split()[6] for line in lines}
    assert paths == {f"/owa/sigterm-{r}-{i}" for r in range(40) for i in range(3)}
    # Every line has the usual shape: time stamp, level, logger, client, method, path, status, bytes, duration, upstream.
    shape = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO bridge\.access: 127\.0\.0\.1 GET /owa/sigterm-\d+-\d \d{3} in=0 out=\d+ \d+\.\d{3}s upstream=\S+\n")
    assert all(shape.fullmatch(line) for line in lines), lines[:3]
