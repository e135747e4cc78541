"""Certificates over ACME against a real ACME server (Debian's Pebble on loopback) and small aiohttp stubs.

Pebble must be installed (scripts/test.sh installs it); these tests fail, never skip, when it is missing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import json
import logging
import os
import re
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from acme.client import _renewal_info_path_component
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support.certs import local_certificate
from support.net import free_port
from support.pebble import EAB_KEYS, PebbleServer
from support.processes import bridge_cli

from bridge.certs.acme import Lineage, certificate_for_bridge, open_session
from bridge.certs.keys import LocalCA, cert_pem, key_pem, new_private_key
from bridge.certs.renewal import Renewer, renewal_plan
from bridge.config import BridgeConfig, LegacyServer
from bridge.errors import AcmeError
from bridge.net.tls import front_context
from bridge.runtime.app import RunningBridge, start_bridge


def acme_config(pebble: PebbleServer, directory: Path, fqdn: str, **overrides: Any) -> BridgeConfig:
    """A bridge on loopback whose port 80 is the port Pebble validates HTTP-01 against."""
    config = BridgeConfig(
        fqdn=fqdn,
        legacy=[LegacyServer("127.0.0.1", free_port())],  # nothing there: the bridge answers locally
        bind="127.0.0.1",
        https_port=0,
        http_port=pebble.http_port,
        state_dir=directory / "state",
        acme_directory=pebble.directory_url,
        acme_ca_bundle=pebble.ca_bundle,
    )
    return replace(config, **overrides)


def pebble_client_context(pebble: PebbleServer) -> ssl.SSLContext:
    """Trusts only the root Pebble issues under: the bridge must serve the intermediate itself."""
    context = ssl.create_default_context(cadata=pebble.root_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def served_certificate(pebble: PebbleServer, port: int, fqdn: str) -> x509.Certificate:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, pebble_client_context(pebble).wrap_socket(raw, server_hostname=fqdn) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


class KeptConnection:
    """One HTTPS connection kept open across a renewal."""

    def __init__(self, pebble: PebbleServer, port: int, fqdn: str) -> None:
        self.conn = http.client.HTTPSConnection(fqdn, port, timeout=5)
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.conn.sock = pebble_client_context(pebble).wrap_socket(raw, server_hostname=fqdn)
        self.fqdn = fqdn

    def request(self) -> int:
        self.conn.request("GET", "/", headers={"Host": self.fqdn})
        response = self.conn.getresponse()
        response.read()
        return response.status

    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.conn.sock.getpeercert(binary_form=True))

    def local_port(self) -> int:
        return self.conn.sock.getsockname()[1]


def handshake_trusting(ca: LocalCA, port: int, fqdn: str) -> x509.Certificate:
    context = ssl.create_default_context(cadata=cert_pem(ca.cert).decode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw, server_hostname=fqdn) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


async def in_thread(function: Any, *args: Any) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(function, *args), 30)


@pytest.fixture
async def bridges() -> AsyncIterator[list[RunningBridge]]:
    """Bridges started by a test, closed even when it fails."""
    started: list[RunningBridge] = []
    yield started
    for bridge in started:
        await bridge.close()


async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    """app on 127.0.0.1:port (0: a free one): its runner (cleanup() stops it) and its port."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@asynccontextmanager
async def serving(app: web.Application, port: int = 0) -> AsyncIterator[int]:
    """app on 127.0.0.1:port (0: a free one) for the block, which gets the port."""
    runner, port = await serve(app, port)
    try:
        yield port
    finally:
        await runner.cleanup()


async def start(bridges: list[RunningBridge], config: BridgeConfig) -> RunningBridge:
    bridge = await asyncio.wait_for(start_bridge(config), 60)
    bridges.append(bridge)
    return bridge


# ------------------------------------------------------------------------------------------ end to end


async def test_issues_over_own_http01_serves_chain_and_renews_without_dropping_connections(pebble: PebbleServer, tmp_path: Path, bridges: list) -> None:
    fqdn = "bridge.acme.test"
    config = acme_config(pebble, tmp_path, fqdn)
    bridge = await start(bridges, config)

    served = await in_thread(served_certificate, pebble, bridge.https_port, fqdn)  # verified against Pebble's root only
    live = config.state_dir / "live" / fqdn
    stored = x509.load_pem_x509_certificates((live / "fullchain.pem").read_bytes())
    assert len(stored) == 2, "fullchain.pem must hold the leaf and the intermediate"
    assert served.serial_number == stored[0].serial_number
    assert served.issuer == stored[1].subject and "Pebble Intermediate" in served.issuer.rfc4514_string()
    assert served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [fqdn]
    assert isinstance(served.public_key(), ec.EllipticCurvePublicKey)
    assert x509.load_pem_x509_certificate((live / "cert.pem").read_bytes()) == stored[0]
    assert x509.load_pem_x509_certificates((live / "chain.pem").read_bytes()) == stored[1:]
    assert (live / "privkey.pem").stat().st_mode & 0o777 == 0o600
    account_files = list((config.state_dir / "accounts").rglob("private_key.json"))
    assert len(account_files) == 1 and account_files[0].stat().st_mode & 0o777 == 0o600
    assert (account_files[0].parent / "regr.json").exists()

    with pytest.raises(ssl.SSLCertVerificationError):  # the check above is a real verification
        await in_thread(handshake_trusting, LocalCA.create(), bridge.https_port, fqdn)

    kept = await in_thread(KeptConnection, pebble, bridge.https_port, fqdn)
    assert await in_thread(kept.request) == 404  # the bridge's own answer for a path it does not forward
    kept_port = await in_thread(kept.local_port)

    assert await asyncio.wait_for(bridge.renewal.renew(), 60), "a forced renewal against Pebble must succeed"

    renewed = await in_thread(served_certificate, pebble, bridge.https_port, fqdn)
    assert renewed.serial_number != served.serial_number
    assert renewed.serial_number == x509.load_pem_x509_certificate((live / "cert.pem").read_bytes()).serial_number
    assert await in_thread(kept.request) == 404, "a connection opened before the renewal must stay usable"
    assert await in_thread(kept.local_port) == kept_port, "the old connection must be the same TCP connection"
    assert (await in_thread(kept.certificate)).serial_number == served.serial_number
    kept.conn.close()


async def test_restart_reuses_stored_account_and_certificate_without_new_order(pebble: PebbleServer, tmp_path: Path, bridges: list, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bridge")
    fqdn = "restart.acme.test"
    config = acme_config(pebble, tmp_path, fqdn)
    first = await start(bridges, config)
    first_serial = (await in_thread(served_certificate, pebble, first.https_port, fqdn)).serial_number
    account_dir = next((config.state_dir / "accounts").rglob("regr.json")).parent
    account_before = {p.name: p.read_bytes() for p in account_dir.iterdir()}
    await first.close()
    bridges.remove(first)
    caplog.clear()

    second = await start(bridges, replace(config))
    assert (await in_thread(served_certificate, pebble, second.https_port, fqdn)).serial_number == first_serial
    messages = [r.getMessage() for r in caplog.records if r.name == "bridge.acme"]
    assert any("reusing the stored certificate" in m for m in messages), messages
    assert not any("ordering a certificate" in m for m in messages), messages

    caplog.clear()
    assert await asyncio.wait_for(second.renewal.renew(), 60)
    messages = [r.getMessage() for r in caplog.records if r.name == "bridge.acme"]
    assert any("using the stored ACME account" in m for m in messages), messages
    assert not any("registered ACME account" in m for m in messages), messages
    assert {p.name: p.read_bytes() for p in account_dir.iterdir()} == account_before
    lineage = Lineage(config.state_dir, fqdn).load()
    assert lineage is not None and lineage.meta["account"] == json.loads(account_before["regr.json"])["uri"]


async def test_sighup_reload_picks_up_a_certificate_renewed_outside_the_bridge(pebble: PebbleServer, tmp_path: Path, bridges: list) -> None:
    """`bridge cert renew` in another process writes live/<fqdn>/; SIGHUP (reload_certificate) serves it."""
    fqdn = "reload.acme.test"
    config = acme_config(pebble, tmp_path, fqdn)
    bridge = await start(bridges, config)
    ca = LocalCA.create()
    key = new_private_key("ecdsa-p256")
    outside = ca.issue([fqdn], key)
    Lineage(config.state_dir, fqdn).save(cert_pem(outside).decode(), key_pem(key), {"directory": config.acme_directory, "key_type": "ecdsa-p256"})
    bridge.reload_certificate()

    assert (await in_thread(handshake_trusting, ca, bridge.https_port, fqdn)).serial_number == outside.serial_number


async def test_certificate_due_at_startup_is_served_then_renewed_in_the_background(pebble: PebbleServer, tmp_path: Path, bridges: list) -> None:
    """A stored certificate with 10 of 90 days left: the bridge starts with it at once and renews it behind."""
    fqdn = "due.acme.test"
    config = acme_config(pebble, tmp_path, fqdn)
    old, key = local_certificate(90, 10, fqdn)
    ca_for_old = old.issuer
    Lineage(config.state_dir, fqdn).save(cert_pem(old).decode(), key_pem(key), {"directory": pebble.directory_url, "key_type": "ecdsa-p256"})
    bridge = await start(bridges, config)
    for _ in range(150):
        if bridge.renewal.renewals:
            break
        await asyncio.sleep(0.1)
    assert bridge.renewal.renewals == 1, "the due certificate was not renewed in the background"
    served = await in_thread(served_certificate, pebble, bridge.https_port, fqdn)
    assert served.issuer != ca_for_old and "Pebble Intermediate" in served.issuer.rfc4514_string()


async def test_bad_nonce_storm_is_retried(tmp_path: Path, bridges: list, caplog: pytest.LogCaptureFixture) -> None:
    """Pebble rejecting 30% of nonces: with acme's single retry most of these two orders fail; the bridge retries more."""
    caplog.set_level(logging.DEBUG, logger="bridge.acme")
    with PebbleServer(tmp_path / "pebble", http_port=free_port(), nonce_reject_percent=30) as stormy:
        fqdn = "nonce.acme.test"
        bridge = await start(bridges, acme_config(stormy, tmp_path, fqdn))
        first = await in_thread(served_certificate, stormy, bridge.https_port, fqdn)
        assert await asyncio.wait_for(bridge.renewal.renew(), 60)
        assert (await in_thread(served_certificate, stormy, bridge.https_port, fqdn)).serial_number != first.serial_number
        retries = [r for r in caplog.records if "rejected the nonce" in r.getMessage()]
        assert retries, "Pebble rejected no nonce at 30%: the test did not exercise badNonce"
        await bridge.close()
        bridges.remove(bridge)


# ------------------------------------------------------------------------------------------ ARI (RFC 9773)


class RenewalInfoStub:
    """A directory that is Pebble's plus a renewalInfo resource: the first certificate asked about is due now."""

    def __init__(self, pebble: PebbleServer, retry_after: int = 7200, always_due: bool = False) -> None:
        self.pebble_directory = pebble.directory()
        self.retry_after = retry_after
        self.always_due = always_due
        self.asked: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> RenewalInfoStub:
        app = web.Application()
        app.router.add_get("/dir", self.directory)
        app.router.add_get("/renewal-info/{cert_id}", self.renewal_info)
        self.runner, port = await serve(app)
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/dir"
        return self

    async def directory(self, request: web.Request) -> web.Response:
        return web.json_response({**self.pebble_directory, "renewalInfo": f"{self.base}/renewal-info"})

    def window(self, cert_id: str) -> tuple[dt.datetime, dt.datetime]:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        if cert_id == self.asked[0] or self.always_due:
            return now - dt.timedelta(hours=2), now - dt.timedelta(hours=1)  # "renew now" (e.g. mass revocation)
        return now + dt.timedelta(days=30), now + dt.timedelta(days=31)

    async def renewal_info(self, request: web.Request) -> web.Response:
        cert_id = request.match_info["cert_id"]
        self.asked.append(cert_id)
        start, end = self.window(cert_id)
        body = {"suggestedWindow": {"start": start.isoformat().replace("+00:00", "Z"), "end": end.isoformat().replace("+00:00", "Z")}}
        return web.json_response(body, headers={"Retry-After": str(self.retry_after)})

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def test_ari_window_in_the_past_renews_in_background_and_future_window_is_planned(pebble: PebbleServer, tmp_path: Path, bridges: list) -> None:
    stub = await RenewalInfoStub(pebble).start()
    try:
        fqdn = "ari.acme.test"
        config = acme_config(pebble, tmp_path, fqdn, acme_directory=stub.url)
        bridge = await start(bridges, config)
        first = Lineage(config.state_dir, fqdn).load()
        assert first is not None
        # Pebble's certificate has five years left; only the CA's window can make the bridge renew it now.
        for _ in range(200):
            if bridge.renewal.renewals >= 1:
                break
            await asyncio.sleep(0.1)
        assert bridge.renewal.renewals == 1, f"no renewal inside the ARI window (stub was asked about {stub.asked})"
        assert stub.asked[0] == _renewal_info_path_component(first.leaf)
        second = Lineage(config.state_dir, fqdn).load()
        assert second is not None and second.leaf.serial_number != first.leaf.serial_number
        assert second.meta["replaces"] == stub.asked[0], "the renewal order must name the certificate it replaces"
        served = await in_thread(served_certificate, pebble, bridge.https_port, fqdn)
        assert served.serial_number == second.leaf.serial_number

        session = await open_session(config)
        plan = await renewal_plan(session, second.leaf)
        start_, end = stub.window(_renewal_info_path_component(second.leaf))
        assert start_ - dt.timedelta(seconds=2) <= plan.due <= end + dt.timedelta(seconds=2)
        assert plan.next_check == stub.retry_after
        assert "renewal window" in plan.basis
        await asyncio.sleep(0.5)
        assert bridge.renewal.renewals == 1, "a certificate whose window lies ahead must not be renewed"
    finally:
        await stub.close()


async def test_a_window_that_always_says_now_does_not_become_a_renewal_loop(pebble: PebbleServer, tmp_path: Path, bridges: list, caplog: pytest.LogCaptureFixture) -> None:
    stub = await RenewalInfoStub(pebble, retry_after=1, always_due=True).start()
    try:
        config = acme_config(pebble, tmp_path, "loop.acme.test", acme_directory=stub.url)
        bridge = await start(bridges, config)
        for _ in range(150):
            if bridge.renewal.renewals:
                break
            await asyncio.sleep(0.1)
        assert bridge.renewal.renewals == 1
        await asyncio.sleep(2)
        assert bridge.renewal.renewals == 1, "renewed again within the hour"
        assert any("waiting an hour between renewals" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    finally:
        await stub.close()


# ------------------------------------------------------------------------------------------ EAB


async def test_eab_required_refused_without_or_with_wrong_binding_and_issued_with_it(tmp_path: Path, bridges: list) -> None:
    with PebbleServer(tmp_path / "pebble", http_port=free_port(), eab_keys=EAB_KEYS) as strict:
        fqdn = "eab.acme.test"
        config = acme_config(strict, tmp_path, fqdn)
        with pytest.raises(AcmeError) as missing:
            await asyncio.wait_for(certificate_for_bridge(config, {}), 60)
        assert "requires External Account Binding" in str(missing.value) and "--acme-eab-kid" in str(missing.value)

        wrong = replace(config, acme_eab_kid="kid-1", acme_eab_hmac_key=EAB_KEYS["kid-2"])
        with pytest.raises(AcmeError) as refused:
            await asyncio.wait_for(certificate_for_bridge(wrong, {}), 60)
        message = str(refused.value)
        assert message.startswith("The CA refused the ACME account (the CA said: "), message
        assert "--acme-eab-hmac-key" in message

        bridge = await start(bridges, replace(config, acme_eab_kid="kid-1", acme_eab_hmac_key=EAB_KEYS["kid-1"]))
        served = await in_thread(served_certificate, strict, bridge.https_port, fqdn)
        assert served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [fqdn]
        await bridge.close()
        bridges.remove(bridge)


# ------------------------------------------------------------------------------------------ errors


async def test_validation_failure_when_nothing_answers_on_port_80(pebble: PebbleServer, tmp_path: Path) -> None:
    config = acme_config(pebble, tmp_path, "unreachable.acme.test")
    with pytest.raises(AcmeError) as failure:
        await asyncio.wait_for(certificate_for_bridge(config, {}), 60)
    message = str(failure.value)
    assert message.startswith("The CA could not reach http://unreachable.acme.test/ on port 80 (the CA said: "), message
    assert "connection refused" in message.lower() and "open port 80" in message
    assert not (config.state_dir / "live" / "unreachable.acme.test").exists()


async def test_validation_failure_when_something_else_answers_on_port_80(pebble: PebbleServer, tmp_path: Path) -> None:
    async def impostor(request: web.Request) -> web.Response:
        return web.Response(text="not-the-key-authorization")

    app = web.Application()
    app.router.add_get("/{tail:.*}", impostor)
    async with serving(app, pebble.http_port):
        config = acme_config(pebble, tmp_path, "impostor.acme.test")
        with pytest.raises(AcmeError) as failure:
            await asyncio.wait_for(certificate_for_bridge(config, {}), 60)
    message = str(failure.value)
    assert message.startswith("The CA reached http://impostor.acme.test/ but did not get this bridge's HTTP-01 answer (the CA said: "), message
    assert "point impostor.acme.test at this machine" in message


async def test_rate_limit_names_the_retry_after_time(tmp_path: Path) -> None:
    """A stub CA answering newAccount with RFC 8555 rateLimited and Retry-After: one hour."""
    nonce = iter(range(1_000_000))

    def nonce_headers() -> dict[str, str]:
        return {"Replay-Nonce": f"nonce{next(nonce)}", "Cache-Control": "no-store"}

    async def directory(request: web.Request) -> web.Response:
        base = f"http://{request.host}"
        return web.json_response({"newNonce": f"{base}/nonce", "newAccount": f"{base}/account", "newOrder": f"{base}/order"})

    async def new_nonce(request: web.Request) -> web.Response:
        return web.Response(status=200, headers=nonce_headers())

    async def new_account(request: web.Request) -> web.Response:
        problem = {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many new registrations (10) from this IP address in the last 3h0m0s"}
        return web.Response(status=429, text=json.dumps(problem), content_type="application/problem+json", headers={**nonce_headers(), "Retry-After": "3600"})

    app = web.Application()
    app.router.add_get("/dir", directory)
    app.router.add_route("HEAD", "/nonce", new_nonce)
    app.router.add_post("/account", new_account)
    async with serving(app) as port:
        config = BridgeConfig(fqdn="limited.acme.test", state_dir=tmp_path, acme_directory=f"http://127.0.0.1:{port}/dir", http_port=0)
        with pytest.raises(AcmeError) as failure:
            await asyncio.wait_for(certificate_for_bridge(config, {}), 60)
    message = str(failure.value)
    assert message.startswith("The CA rate-limited this account (the CA said: too many new registrations"), message
    when = re.search(r"retry after (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", message)
    assert when, message
    expected = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    named = dt.datetime.strptime(when.group(1), "%Y-%m-%d %H:%M").replace(tzinfo=dt.UTC)
    assert abs((named - expected).total_seconds()) < 120


async def test_directory_unreachable_or_untrusted(pebble: PebbleServer, tmp_path: Path) -> None:
    closed = BridgeConfig(fqdn="x.acme.test", state_dir=tmp_path, acme_directory=f"https://127.0.0.1:{free_port()}/dir")
    with pytest.raises(AcmeError) as unreachable:
        await asyncio.wait_for(certificate_for_bridge(closed, {}), 60)
    assert str(unreachable.value).startswith(f"The ACME directory {closed.acme_directory} is unreachable (")
    assert "outbound HTTPS" in str(unreachable.value)

    untrusted = BridgeConfig(fqdn="x.acme.test", state_dir=tmp_path, acme_directory=pebble.directory_url)
    with pytest.raises(AcmeError) as distrust:
        await asyncio.wait_for(certificate_for_bridge(untrusted, {}), 60)
    assert "does not trust" in str(distrust.value) and "--acme-ca-bundle" in str(distrust.value)


# ------------------------------------------------------------------------------------------ renewal policy


async def test_failed_renewal_is_logged_loudly_and_retried_with_growing_delay(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bridge")
    fqdn = "failing.acme.test"
    cert, key = local_certificate(90, 10, fqdn)  # due (a third of 90 days is 30) and inside the warning period
    config = BridgeConfig(fqdn=fqdn, state_dir=tmp_path, acme_directory=f"https://127.0.0.1:{free_port()}/dir")
    Lineage(tmp_path, fqdn).save(cert_pem(cert).decode(), key_pem(key), {"directory": config.acme_directory, "key_type": "ecdsa-p256"})
    live = Lineage(tmp_path, fqdn)
    renewer = Renewer(config, {}, front_context(live.fullchain, live.privkey))
    assert await asyncio.wait_for(renewer.check(), 30) == 60
    assert await asyncio.wait_for(renewer.check(), 30) == 120
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all("CERTIFICATE RENEWAL FAILED for failing.acme.test" in e and "is unreachable" in e for e in errors)
    assert "Next attempt in 60 s" in errors[0] and "Next attempt in 120 s" in errors[1]
    assert any(r.levelno == logging.WARNING and "expires in 10.0 days" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ `bridge cert`


def cert_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return bridge_cli("cert", *args, env=dict(os.environ, COLUMNS="200", NO_COLOR="1"))


def test_cert_cli_obtain_show_renew(pebble: PebbleServer, tmp_path: Path) -> None:
    fqdn = "cli.acme.test"
    state = tmp_path / "state"
    acme = ["--fqdn", fqdn, "--state-dir", str(state), "--bind", "127.0.0.1", "--http-port", str(pebble.http_port), "--acme-directory", pebble.directory_url, "--acme-ca-bundle", str(pebble.ca_bundle)]

    empty = cert_cli("show", "--state-dir", str(state))
    assert empty.returncode == 2 and "No certificate is stored under" in empty.stderr and "Traceback" not in empty.stderr

    obtained = cert_cli("obtain", *acme)
    assert obtained.returncode == 0, obtained.stderr
    leaf = x509.load_pem_x509_certificate((state / "live" / fqdn / "cert.pem").read_bytes())
    serial = format(leaf.serial_number, "x")
    assert serial in obtained.stdout

    shown = cert_cli("show", "--state-dir", str(state))
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    for label, value in (
        ("SANs:", fqdn),
        ("Issuer:", "Pebble Intermediate CA"),
        ("Serial:", serial),
        ("Not after:", f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"),
        ("Key type:", "ECDSA secp256r1"),
        ("fullchain:", str(state / "live" / fqdn / "fullchain.pem")),
        ("privkey:", str(state / "live" / fqdn / "privkey.pem")),
    ):
        assert re.search(rf"^{re.escape(label)}\s+.*{re.escape(value)}", out, re.M), (label, value, out)
    days = int(re.search(r"^Days left:\s+(\d+)", out, re.M).group(1))
    assert abs(days - (leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)).days) <= 1
    assert re.search(r"^Subject:\s+\S", out, re.M)

    not_due = cert_cli("renew", *acme)
    assert not_due.returncode == 0 and "not due for renewal until" in not_due.stdout, not_due.stdout + not_due.stderr

    forced = cert_cli("renew", "--force", *acme, "--key-type", "rsa-2048")
    assert forced.returncode == 0, forced.stderr
    renewed = x509.load_pem_x509_certificate((state / "live" / fqdn / "cert.pem").read_bytes())
    assert renewed.serial_number != leaf.serial_number
    assert isinstance(renewed.public_key(), rsa.RSAPublicKey) and renewed.public_key().key_size == 2048
    assert "RSA 2048" in cert_cli("show", "--state-dir", str(state), "--fqdn", fqdn).stdout


def test_mail_fqdn_is_a_second_name_of_the_same_lineage(pebble: PebbleServer, tmp_path: Path) -> None:
    fqdn, mail = "owa.acme.test", "imap.acme.test"
    state = tmp_path / "state"
    acme = ["--fqdn", fqdn, "--state-dir", str(state), "--bind", "127.0.0.1", "--http-port", str(pebble.http_port), "--acme-directory", pebble.directory_url, "--acme-ca-bundle", str(pebble.ca_bundle)]
    obtained = cert_cli("obtain", *acme, "--mail-fqdn", mail)
    assert obtained.returncode == 0, obtained.stderr
    leaf = x509.load_pem_x509_certificate((state / "live" / fqdn / "cert.pem").read_bytes())
    assert sorted(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)) == [mail, fqdn]
    assert not (state / "live" / mail).exists()  # one lineage, named after --fqdn
