"""Preflight against the shapes Exchange 2007 servers come in: the verdict, the failing check and the
remedy it names must be the ones a consultant can act on (the lab is started in each shape)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config import LegacyServer
from bridge.lab.server import Lab, LabOptions, start_lab
from bridge.preflight.checks import Report, Settings, run_preflight
from bridge.preflight.probe import Credentials
from bridge.preflight.report import next_steps

USER, PASSWORD, EMAIL = "LAB\\alice", "Passw0rd!", "alice@lab.local"


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Any]:
    labs: list[Lab] = []

    async def started(**options: Any) -> Lab:
        lab = await start_lab(LabOptions(state_dir=tmp_path / "lab", **options))
        labs.append(lab)
        return lab

    yield started
    for lab in labs:
        await lab.close()


def settings(lab: Lab, *, host: str = "127.0.0.1", password: str = PASSWORD, timeout: float = 5.0, **overrides: Any) -> Settings:
    chosen = Settings(legacy=LegacyServer(host, lab.port), credentials=Credentials(EMAIL, USER, password), timeout=timeout, hold=0.5)
    for name, value in overrides.items():
        setattr(chosen, name, value)
    return chosen


def status(report: Report, check_id: str) -> str:
    check = report.get(check_id)
    assert check is not None, f"{check_id} not in the report"
    return check.status


async def test_outlook_anywhere_on_basic_while_ews_takes_ntlm_is_ready_with_basic(start) -> None:
    lab = await start(auth="both", rpc_auth="basic")
    report = await run_preflight(settings(lab))
    assert report.verdict in ("pass", "warn"), [(c.id, c.status, c.summary) for c in report.checks if c.status == "fail"]
    for port in (6001, 6002, 6004):
        rpc = report.get(f"legacy.rpc.{port}")
        assert rpc is not None and rpc.status == "pass" and rpc.details["scheme"] == "basic", rpc
    assert report.facts["authentication"] == "Basic"
    assert any("New-MigrationEndpoint" in line and "-Authentication Basic" in line for line in next_steps(report))


async def test_no_autodiscover_names_the_manual_route(start) -> None:
    lab = await start(autodiscover=False)
    report = await run_preflight(settings(lab))
    autodiscover = report.get("legacy.autodiscover")
    assert autodiscover is not None and autodiscover.status == "fail"
    assert "404" in autodiscover.summary and "--exchange-server" in autodiscover.fix
    for port in (6001, 6002, 6004):
        rpc = report.get(f"legacy.rpc.{port}")
        assert rpc is not None and rpc.status == "skip" and "--exchange-server" in rpc.summary


async def test_no_autodiscover_with_the_server_given_checks_rpc_and_recommends_manual_settings(start) -> None:
    lab = await start(autodiscover=False)
    report = await run_preflight(settings(lab, exchange_server="EXCH2007.lab.local"))
    autodiscover = report.get("legacy.autodiscover")
    assert autodiscover is not None and autodiscover.status == "warn" and "manual settings" in autodiscover.fix
    assert all(status(report, f"legacy.rpc.{port}") == "pass" for port in (6001, 6002, 6004))
    assert report.verdict == "warn"
    steps = next_steps(report)
    assert not any("-Autodiscover" in line for line in steps)
    assert any("New-MigrationEndpoint" in line and "-ExchangeServer EXCH2007.lab.local" in line for line in steps)


async def test_a_512_bit_legacy_key_fails_with_the_replacement_named(start) -> None:
    lab = await start(key_bits=512)
    report = await run_preflight(settings(lab))
    certificate = report.get("legacy.certificate")
    assert certificate is not None and certificate.status == "fail", certificate
    assert "512-bit" in certificate.summary and "2048-bit key" in certificate.fix and "New-ExchangeCertificate" in certificate.fix
    assert report.verdict == "fail"


async def test_a_slow_server_with_a_short_timeout_is_told_to_raise_the_timeout(start) -> None:
    lab = await start(delay=1.5)
    report = await run_preflight(settings(lab, timeout=1.0))
    timed_out = [check for check in report.checks if check.status == "fail" and "no answer within the timeout" in (check.summary + str(check.details.get("error")))]
    assert timed_out, [(c.id, c.status, c.summary) for c in report.checks]
    for check in timed_out:
        assert "--timeout" in check.fix and "IIS serves HTTPS" not in check.fix, (check.id, check.fix)
    assert status(report, "legacy.tls") == "pass"


async def test_logon_autodiscover_and_rpc_run_concurrently_against_a_slow_server(start) -> None:
    delay = 1.0
    lab = await start(delay=delay)
    began = time.monotonic()
    report = await run_preflight(settings(lab, timeout=10.0))
    elapsed = time.monotonic() - began
    assert all(status(report, f"legacy.rpc.{port}") == "pass" for port in (6001, 6002, 6004))
    # The longest chain is NTLM's two answers for Autodiscover, then two for the RPC channels:
    # four delays. One step after another it was eight.
    print(f"\nlegacy side against a server answering in {delay:g} s: {elapsed:.2f} s")
    assert elapsed < 6.5 * delay


async def test_after_a_wrong_password_no_scheme_is_recommended(start) -> None:
    lab = await start()
    report = await run_preflight(settings(lab, password="wrong"))
    assert report.facts["authentication"] is None
    assert any("<Basic|NTLM>" in line for line in next_steps(report))


async def test_a_certificate_that_does_not_name_the_host_says_so(start) -> None:
    lab = await start()
    report = await run_preflight(settings(lab, host="localhost"))
    certificate = report.get("legacy.certificate")
    assert certificate is not None and certificate.details.get("names_host") is False
    assert "does not name localhost" in certificate.summary


async def test_fixes_name_the_cmdlet_of_each_virtual_directory(start) -> None:
    lab = await start(auth="ntlm")
    report = await run_preflight(settings(lab, auth="basic"))
    ews = report.get("legacy.http.ews")
    assert ews is not None and ews.status == "fail" and "Set-WebServicesVirtualDirectory" in ews.fix and "Set-OutlookAnywhere" not in ews.fix
    rpc = report.get("legacy.http.rpc")
    assert rpc is not None and rpc.status == "fail" and "Set-OutlookAnywhere" in rpc.fix


async def test_a_server_without_rfc5746_warns_with_the_update_named(start) -> None:
    """An unpatched Windows 2003/2008 (before MS10-049) offers no secure renegotiation: the preflight
    warns and names the update, and says the migration works without it (the bridge connects anyway)."""
    import asyncio

    from support.legacy_tls import no_rfc5746_server

    from bridge.preflight.checks import Preflight

    server = await asyncio.start_server(no_rfc5746_server, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        preflight = Preflight(Settings(legacy=LegacyServer("127.0.0.1", port), timeout=5.0))
        await preflight.legacy_renegotiation("127.0.0.1", "")
    finally:
        server.close()
    check = preflight.results["legacy.renegotiation"]
    assert check.status == "warn" and check.details == {"rfc5746": False}
    assert "MS10-049" in check.fix and "works without it" in check.fix
