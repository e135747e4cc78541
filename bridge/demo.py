"""`bridge demo`: the lab (a simulated Exchange 2007) with the bridge in front of it, checked end to end.

Everything listens on 127.0.0.1. The bridge's certificate comes from a throwaway local CA whose
certificate is written next to it, so curl can verify the bridge exactly as Exchange Online would.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import http.client
import os
import shlex
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import spnego
from rich.console import Console
from rich.table import Table

from bridge.certs.keys import LocalCA, cert_pem, new_private_key, write_pair
from bridge.config import BridgeConfig, LegacyServer, default_state_dir
from bridge.lab.server import DEFAULT_USERS, Lab, LabOptions, payload_sha256, start_lab
from bridge.runtime.app import setup_logging, start_bridge

DEMO_FQDN = "clientowa.lab.test"
RPC_TARGET = "EXCH2007.lab.local:6001"
CHANNEL_BYTES = 64 * 1024**2
# Outlook opens an RPC channel with a body longer than an echo (the lab treats <= 16 bytes as an echo).
CHANNEL_OPEN_BYTES = 76


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fqdn", default=DEMO_FQDN, help=f"name the bridge's certificate is issued to (default {DEMO_FQDN})")
    parser.add_argument("--https-port", type=int, default=9443, help="bridge HTTPS port (default 9443)")
    parser.add_argument("--http-port", type=int, default=9080, help="bridge HTTP port (default 9080)")
    parser.add_argument("--lab-port", type=int, default=8443, help="lab (legacy server) port (default 8443)")
    parser.add_argument("--state-dir", type=Path, help="where the demo keeps its CA and certificates")
    parser.add_argument("--check", action="store_true", help="run the checks, print them and exit (status 1 if one fails)")


def run(args: argparse.Namespace) -> int:
    setup_logging("info")
    return asyncio.run(demo(args))


@dataclass
class DemoSetup:
    fqdn: str
    https_port: int
    ca_file: Path
    user: str
    password: str

    def connection(self, **context_options: Any) -> http.client.HTTPSConnection:
        return ResolvedHTTPSConnection(self.fqdn, self.https_port, "127.0.0.1", client_context(self.ca_file, **context_options))

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()


async def demo(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or default_state_dir() / "demo"
    state_dir.mkdir(parents=True, exist_ok=True)
    lab = await start_lab(LabOptions(host="127.0.0.1", port=args.lab_port, state_dir=state_dir / "lab"))
    try:
        ca_file, config = demo_config(args, state_dir, lab)
        bridge = await start_bridge(config)
        try:
            user, password = next(iter(DEFAULT_USERS.items()))
            setup = DemoSetup(config.fqdn, bridge.https_port, ca_file, user, password)
            console = Console()
            results = await asyncio.to_thread(run_checks, setup, lab)
            console.print(results_table(results))
            failed = sum(1 for r in results if not r.ok)
            if args.check:
                return 1 if failed else 0
            console.print(try_it_yourself(setup, lab))
            if bridge.status_port:
                password_file = config.state_dir / "status-password"
                console.print(
                    f"Status page: http://127.0.0.1:{bridge.status_port}/ (user admin, password in {password_file}); "
                    f"or `bridge status --status-bind 127.0.0.1:{bridge.status_port} --state-dir {config.state_dir}`."
                )
            await wait_for_signal()
            return 0
        finally:
            await bridge.close()
    finally:
        await lab.close()


def demo_config(args: argparse.Namespace, state_dir: Path, lab: Lab) -> tuple[Path, BridgeConfig]:
    """A fresh local CA and bridge certificate each run; the lab's certificate is pinned."""
    ca = LocalCA.create("exchange-bridge demo CA")
    key = new_private_key("ecdsa-p256")
    cert_dir = state_dir / "bridge-cert"
    cert_dir.mkdir(exist_ok=True)
    cert, key_path = write_pair(cert_dir, ca.issue([args.fqdn], key), key)
    ca_file = state_dir / "demo-ca.pem"
    ca_file.write_bytes(cert_pem(ca.cert))
    config = BridgeConfig(
        fqdn=args.fqdn,
        legacy=[LegacyServer("127.0.0.1", lab.port)],
        bind="127.0.0.1",
        https_port=args.https_port,
        http_port=args.http_port,
        cert=cert,
        key=key_path,
        state_dir=state_dir,
        legacy_fingerprint=lab.fingerprint.removeprefix("sha256:").replace(":", "").lower(),
        status_bind="127.0.0.1:0",  # a free port: a real bridge on this machine may hold 8404
    )
    return ca_file, config


# ---- checks (blocking clients, run in a worker thread while the loop serves) ---------------------


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


def run_checks(setup: DemoSetup, lab: Lab) -> list[CheckResult]:
    checks: list[tuple[str, Callable[[DemoSetup, Lab], str]]] = [
        ("front end speaks modern TLS", check_modern_tls),
        ("TLS 1.0 client refused", check_tls10_refused),
        ("OWA redirect rewritten to the bridge", check_owa_redirect),
        ("Basic logon to EWS", check_basic),
        ("NTLM logon on one connection", check_ntlm),
        ("RPC_OUT_DATA channel streamed", check_rpc_out),
        ("RPC_IN_DATA channel streamed", check_rpc_in),
        ("non-Exchange path answered locally", check_local_404),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(CheckResult(name, True, check(setup, lab)))
        except Exception as exc:  # noqa: BLE001 - each check reports its own failure in the table
            results.append(CheckResult(name, False, f"{type(exc).__name__}: {exc}"))
    return results


def check_modern_tls(setup: DemoSetup, lab: Lab) -> str:
    connection = setup.connection()
    connection.connect()
    sock = connection.sock
    assert isinstance(sock, ssl.SSLSocket)
    detail = f"{sock.version()} {sock.cipher()[0]}, ALPN {sock.selected_alpn_protocol()}"  # type: ignore[index]  # connected: the handshake is done
    connection.close()
    return detail


def check_tls10_refused(setup: DemoSetup, lab: Lab) -> str:
    connection = setup.connection(maximum_version=ssl.TLSVersion.TLSv1, minimum_version=ssl.TLSVersion.TLSv1, legacy=True)
    try:
        connection.connect()
    except (ssl.SSLError, ConnectionError) as exc:
        return f"handshake refused ({getattr(exc, 'reason', None) or exc})"
    finally:
        connection.close()
    raise AssertionError("the bridge accepted a TLS 1.0 handshake")


def check_owa_redirect(setup: DemoSetup, lab: Lab) -> str:
    status, headers, _ = request(setup, "GET", "/owa")
    location = headers.get("Location", "")
    assert status == 302 and location.startswith(f"https://{setup.fqdn}:{setup.https_port}/"), f"{status} Location {location!r}"
    return f"302 -> {location.split('?')[0]}"


def check_basic(setup: DemoSetup, lab: Lab) -> str:
    status, _, _ = request(setup, "GET", "/EWS/Exchange.asmx", {"Authorization": setup.basic()})
    assert status == 200, f"status {status}"
    return f"200 for {setup.user}"


def check_ntlm(setup: DemoSetup, lab: Lab) -> str:
    connection = setup.connection()
    client = spnego.client(setup.user, setup.password, protocol="ntlm", hostname=setup.fqdn, service="http")
    token, rounds = client.step(), 0
    try:
        while True:
            rounds += 1
            connection.request("GET", "/EWS/Exchange.asmx", headers={"Authorization": "NTLM " + base64.b64encode(token).decode()})  # type: ignore[arg-type]  # an NTLM client's steps always return a token
            response = connection.getresponse()
            response.read()
            challenge = _ntlm_challenge(response)
            if response.status != 401 or challenge is None:
                break
            token = client.step(challenge)
    finally:
        connection.close()
    assert response.status == 200, f"status {response.status} after {rounds} round trips"
    return f"200 after {rounds} round trips on one pinned upstream connection"


def check_rpc_out(setup: DemoSetup, lab: Lab) -> str:
    connection = setup.connection()
    started = time.monotonic()
    connection.putrequest("RPC_OUT_DATA", f"/rpc/rpcproxy.dll?{RPC_TARGET}")
    for name, value in {"Authorization": setup.basic(), "Content-Length": str(CHANNEL_OPEN_BYTES), "X-Lab-Out-Size": str(CHANNEL_BYTES)}.items():
        connection.putheader(name, value)
    connection.endheaders(b"\0" * CHANNEL_OPEN_BYTES)
    response = connection.getresponse()
    digest, received = hashlib.sha256(), 0
    while chunk := response.read(256 * 1024):
        digest.update(chunk)
        received += len(chunk)
    connection.close()
    elapsed = time.monotonic() - started
    assert response.status == 200 and received == CHANNEL_BYTES, f"status {response.status}, {received} bytes"
    assert digest.hexdigest() == payload_sha256(CHANNEL_BYTES), "checksum differs"
    return f"{received // 1024**2} MiB, SHA-256 intact, {received / elapsed / 1e6:.0f} MB/s"


def check_rpc_in(setup: DemoSetup, lab: Lab) -> str:
    connection = setup.connection()
    block = os.urandom(256 * 1024)
    digest = hashlib.sha256()
    started = time.monotonic()
    connection.putrequest("RPC_IN_DATA", f"/rpc/rpcproxy.dll?{RPC_TARGET}")
    connection.putheader("Authorization", setup.basic())
    connection.putheader("Content-Length", str(CHANNEL_BYTES))
    connection.endheaders()
    for _ in range(CHANNEL_BYTES // len(block)):
        connection.send(block)
        digest.update(block)
    response = connection.getresponse()
    response.read()
    connection.close()
    elapsed = time.monotonic() - started
    assert response.status == 200, f"status {response.status}"
    assert response.getheader("X-Lab-Received-SHA256") == digest.hexdigest(), "the legacy server received different bytes"
    return f"{CHANNEL_BYTES // 1024**2} MiB received intact by the legacy server, {CHANNEL_BYTES / elapsed / 1e6:.0f} MB/s"


def check_local_404(setup: DemoSetup, lab: Lab) -> str:
    before = lab.counters.requests_total
    status, _, _ = request(setup, "GET", "/admin/config.php")
    assert status == 404, f"status {status}"
    assert lab.counters.requests_total == before, "the request reached the legacy server"
    return "404 from the bridge; the legacy server saw nothing"


def request(setup: DemoSetup, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = setup.connection()
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def _ntlm_challenge(response: http.client.HTTPResponse) -> bytes | None:
    for value in response.headers.get_all("WWW-Authenticate") or []:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "ntlm" and token:
            return base64.b64decode(token)
    return None


class ResolvedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to a given address but sends the FQDN as SNI and Host (like curl --resolve)."""

    def __init__(self, fqdn: str, port: int, address: str, context: ssl.SSLContext) -> None:
        super().__init__(fqdn, port, context=context, timeout=60)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]  # HTTPSConnection's private _context, set by its __init__


def client_context(ca_file: Path, *, legacy: bool = False, **options: object) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["http/1.1"])
    if legacy:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    for name, value in options.items():
        setattr(context, name, value)
    return context


# ---- output ------------------------------------------------------------------------------------


def results_table(results: list[CheckResult]) -> Table:
    table = Table(title="exchange-bridge demo: Exchange Online's view through the bridge")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for result in results:
        table.add_row(result.name, "[green]pass[/]" if result.ok else "[bold red]FAIL[/]", result.detail)
    return table


def try_it_yourself(setup: DemoSetup, lab: Lab) -> str:
    base = f"https://{setup.fqdn}:{setup.https_port}"
    curl = f"curl -sS --cacert {shlex.quote(str(setup.ca_file))} --resolve {setup.fqdn}:{setup.https_port}:127.0.0.1"
    credentials = shlex.quote(f"{setup.user}:{setup.password}")
    lines = [
        "",
        f"[bold]Bridge[/] {base} -> [bold]lab[/] {lab.url} (TLS 1.0 only). Try it yourself:",
        f"  # NTLM through the bridge (one connection, three round trips)\n  {curl} --ntlm -u {credentials} -o /dev/null -w '%{{http_code}}\\n' {base}/EWS/Exchange.asmx",
        f"  # Basic\n  {curl} -u {credentials} -o /dev/null -w '%{{http_code}}\\n' {base}/EWS/Exchange.asmx",
        f"  # an RPC_OUT_DATA channel of 100 MiB (Outlook Anywhere's server-to-client leg)\n"
        f"  {curl} -u {credentials} -X RPC_OUT_DATA -H 'X-Lab-Out-Size: 104857600' --data-binary @<(head -c {CHANNEL_OPEN_BYTES} /dev/zero) "
        f"-o /dev/null -w '%{{size_download}} bytes at %{{speed_download}} B/s\\n' '{base}/rpc/rpcproxy.dll?{RPC_TARGET}'",
        f"  # the front end refuses TLS 1.0\n  {curl} --tlsv1.0 --tls-max 1.0 {base}/owa",
        "Access log lines appear below as you go. Ctrl-C stops the demo.",
    ]
    return "\n".join(lines)


async def wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
