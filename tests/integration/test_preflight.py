"""`bridge preflight` against the lab in several shapes and against a running bridge: real sockets, TLS, NTLM."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from support import REPO
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_config, ca_file, resolve_lab_names
from support.browser import chromium, count_colour, png_pixels
from support.lab import LAB_PASSWORD, LAB_USER
from support.legacy_tls import RC4_SHA, Rc4OnlyServer
from support.net import ThreadedServer, free_port
from support.preflight import EMAIL, parse
from support.processes import bridge_cli

from bridge.config import LegacyServer
from bridge.net.tls import pin_flag
from bridge.preflight.checks import planned_checks, run_preflight
from bridge.preflight.command import settings_from_args
from bridge.preflight.model import SCHEMA, Report, Settings
from bridge.preflight.probe import Credentials
from bridge.preflight.report import STATUS_COLOURS, print_report, render_html, report_json, run_with_progress

TIMEOUT = 5.0
# A password that appears nowhere else, so finding it in an output can only be a leak.
SECRET_USER = "LAB\\bob"
SECRET_PASSWORD = "Zq7-preflight-Secret!"


# --------------------------------------------------------------------------- fixtures and helpers


def settings_for(lab, *, password: str = LAB_PASSWORD, user: str = LAB_USER, email: str = EMAIL, credentials: bool = True, **overrides) -> Settings:
    settings = Settings(
        legacy=LegacyServer("127.0.0.1", lab.port),
        credentials=Credentials(email, user, password) if credentials else None,
        timeout=TIMEOUT,
        hold=0.5,
    )
    for name, value in overrides.items():
        setattr(settings, name, value)
    return settings


def preflight(settings: Settings) -> Report:
    return asyncio.run(run_preflight(settings))


def statuses(report: Report) -> dict[str, str]:
    return {check.id: check.status for check in report.checks}


def check(report: Report, check_id: str):
    found = report.get(check_id)
    assert found is not None, f"{check_id} missing from {list(statuses(report))}"
    return found


class SilentServer(ThreadedServer):
    """Accepts TCP connections and never says a word: every TLS handshake waits for the timeout."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []
        super().__init__()

    def handle(self, connection: socket.socket) -> None:
        self.held.append(connection)

    def close(self) -> None:
        super().close()
        for connection in self.held:
            connection.close()


# --------------------------------------------------------------------------- the lab in its shapes


def test_tls10_lab_full_run_finds_everything_the_batch_needs(lab):
    started = time.monotonic()
    report = preflight(settings_for(lab))
    elapsed = time.monotonic() - started

    found = statuses(report)
    assert [check_id for check_id, _ in planned_checks(report.settings)] == list(found)
    legacy = {check_id: status for check_id, status in found.items() if check_id.startswith("legacy.")}
    assert legacy == {check_id: ("warn" if check_id == "legacy.certificate" else "pass") for check_id in legacy}
    assert found["bridge.fqdn"] == "skip"
    assert report.verdict == "warn"

    tls = check(report, "legacy.tls")
    assert tls.details["accepted"] == {"TLS 1.0": ["AES128-SHA", "AES256-SHA"]}
    assert tls.details["refused"] == ["TLS 1.1", "TLS 1.2", "TLS 1.3"]
    assert "cannot connect to it directly" in tls.summary

    certificate = check(report, "legacy.certificate")
    assert certificate.details["sha256"] == lab.fingerprint
    assert certificate.details["pin_flag"] == pin_flag(lab.fingerprint)
    assert certificate.details["key"] == "RSA 1024" and certificate.details["signature_algorithm"] == "sha1"
    assert certificate.details["self_signed"] is True and "self-signed" in certificate.summary

    assert check(report, "legacy.http.rpc").details["auth_schemes"] == ["Negotiate", "NTLM", "Basic"]
    autodiscover = check(report, "legacy.autodiscover")
    assert autodiscover.details["exchange_server"] == "EXCH2007.lab.local"
    assert autodiscover.details["legacy_dn"].endswith("/cn=Recipients/cn=alice")
    assert autodiscover.details["auth_package"] == "Ntlm" and autodiscover.details["expr_server"] == "127.0.0.1"
    assert report.facts == {"exchange_server": "EXCH2007.lab.local", "legacy_dn": autodiscover.details["legacy_dn"], "authentication": "NTLM"}
    # The echoes really reached the RPC proxy, for each port the migration uses.
    targets = lab.counters.rpc_targets
    assert all(targets.get(f"EXCH2007.lab.local:{port}", 0) >= 2 for port in (6001, 6002, 6004)), targets
    assert check(report, "legacy.rpc.6001").details["rpc_in_data"] == "200 (20 bytes)"
    assert lab.counters.auth_successes.get("ntlm", 0) >= 1 and lab.counters.auth_successes.get("basic", 0) >= 1
    print(f"\nfull run against the TLS 1.0 lab (15 checks, credentials): {elapsed:.2f} s")
    assert elapsed < 5


def test_tls12_capable_lab_lists_suites_per_version(lab_factory):
    report = preflight(settings_for(lab_factory(tls_max="1.2"), credentials=False))
    tls = check(report, "legacy.tls")
    assert tls.status == "pass"
    accepted = tls.details["accepted"]
    assert set(accepted) == {"TLS 1.0", "TLS 1.1", "TLS 1.2"}
    assert accepted["TLS 1.2"][:2] == ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384"]
    assert "AES128-SHA" in accepted["TLS 1.2"] and accepted["TLS 1.0"] == ["AES128-SHA", "AES256-SHA"]
    assert tls.details["refused"] == ["TLS 1.3"]
    assert "speaks TLS 1.2+" in tls.summary
    assert report.verdict == "warn"  # the self-signed certificate only


def test_basic_only_lab(lab_factory):
    basic_lab = lab_factory(auth="basic")
    report = preflight(settings_for(basic_lab))
    found = statuses(report)
    assert found["legacy.logon.basic"] == "pass"
    assert found["legacy.logon.ntlm"] == "skip" and "NTLM is not offered" in check(report, "legacy.logon.ntlm").summary
    assert found["legacy.autodiscover"] == "pass" and check(report, "legacy.autodiscover").details["scheme"] == "basic"
    assert all(found[f"legacy.rpc.{port}"] == "pass" for port in (6001, 6002, 6004))
    assert check(report, "legacy.http.rpc").details["auth_schemes"] == ["Basic"]
    assert report.facts["authentication"] == "Basic"
    assert report.verdict == "warn"

    asked_ntlm = preflight(settings_for(basic_lab, auth="ntlm"))
    found = statuses(asked_ntlm)
    assert found["legacy.http.rpc"] == "fail" and "not NTLM" in check(asked_ntlm, "legacy.http.rpc").summary
    assert found["legacy.logon.ntlm"] == "fail"
    assert found["legacy.autodiscover"] == "skip" and found["legacy.rpc.6001"] == "skip"
    assert asked_ntlm.verdict == "fail"


def test_ntlm_only_lab(lab_factory):
    ntlm_lab = lab_factory(auth="ntlm")
    report = preflight(settings_for(ntlm_lab))
    found = statuses(report)
    assert found["legacy.logon.ntlm"] == "pass" and found["legacy.logon.basic"] == "skip"
    assert check(report, "legacy.autodiscover").details["scheme"] == "ntlm"
    assert all(found[f"legacy.rpc.{port}"] == "pass" for port in (6001, 6002, 6004))
    assert report.facts["authentication"] == "NTLM"
    assert report.verdict == "warn"

    asked_basic = preflight(settings_for(ntlm_lab, auth="basic"))
    assert statuses(asked_basic)["legacy.logon.basic"] == "fail"
    assert asked_basic.verdict == "fail"


def test_expired_legacy_certificate_warns_because_the_bridge_pins_it(lab_factory):
    report = preflight(settings_for(lab_factory(expired_cert=True), credentials=False))
    certificate = check(report, "legacy.certificate")
    assert certificate.status == "warn" and "expired on" in certificate.summary
    assert certificate.details["days_left"] < 0 and certificate.fix
    assert report.verdict == "warn"


def test_certificate_pinned_in_config_must_match(lab):
    other = "ab" * 32
    report = preflight(settings_for(lab, credentials=False, legacy_fingerprint=other))
    certificate = check(report, "legacy.certificate")
    assert certificate.status == "fail" and "not the certificate pinned" in certificate.summary
    assert pin_flag(lab.fingerprint) in certificate.fix
    matching = preflight(settings_for(lab, credentials=False, legacy_fingerprint=lab.fingerprint))
    assert check(matching, "legacy.certificate").status == "warn"


def test_wrong_password_fails_logon_and_skips_what_depends_on_it(lab):
    failures_before = sum(lab.counters.auth_failures.values())
    report = preflight(settings_for(lab, password="not-the-password"))
    found = statuses(report)
    assert found["legacy.logon.basic"] == "fail" and found["legacy.logon.ntlm"] == "fail"
    assert "wrong user name or password" in check(report, "legacy.logon.basic").summary
    assert found["legacy.autodiscover"] == "skip" and "no logon succeeded" in check(report, "legacy.autodiscover").summary
    assert all(found[f"legacy.rpc.{port}"] == "skip" for port in (6001, 6002, 6004))
    assert sum(lab.counters.auth_failures.values()) >= failures_before + 2
    assert report.verdict == "fail"


def test_missing_rpc_proxy_fails_and_skips_the_echoes(lab_factory):
    report = preflight(settings_for(lab_factory(rpc=False)))
    rpc = check(report, "legacy.http.rpc")
    assert rpc.status == "fail" and rpc.details["http_status"] == 404 and "not published" in rpc.summary
    assert "Enable-OutlookAnywhere" in rpc.fix
    found = statuses(report)
    assert found["legacy.autodiscover"] == "pass"
    assert all(found[f"legacy.rpc.{port}"] == "skip" for port in (6001, 6002, 6004))
    assert "/rpc/rpcproxy.dll is missing" in check(report, "legacy.rpc.6001").summary
    assert report.verdict == "fail"


def test_closed_port_fails_at_once_and_skips_the_rest():
    port = free_port()
    started = time.monotonic()
    report = preflight(Settings(legacy=LegacyServer("127.0.0.1", port), credentials=Credentials(EMAIL, LAB_USER, LAB_PASSWORD), timeout=TIMEOUT))
    elapsed = time.monotonic() - started
    found = statuses(report)
    assert found["legacy.dns"] == "pass" and found["legacy.tcp"] == "fail"
    assert "connection refused" in check(report, "legacy.tcp").summary
    assert all(status == "skip" for check_id, status in found.items() if check_id not in ("legacy.dns", "legacy.tcp"))
    assert report.verdict == "fail"
    print(f"\nrun against a closed port: {elapsed:.3f} s")
    assert elapsed < 1.0


def test_unresolvable_legacy_name_fails_and_skips_the_rest():
    report = preflight(Settings(legacy=LegacyServer("no-such-exchange.invalid", 443), timeout=TIMEOUT))
    found = statuses(report)
    assert found["legacy.dns"] == "fail" and "does not resolve" in check(report, "legacy.dns").summary
    assert found["legacy.tcp"] == "skip" and found["legacy.certificate"] == "skip"
    assert report.verdict == "fail"


def test_silent_hosts_cost_one_timeout_not_one_per_check():
    """Both sides accept TCP and never speak TLS: every probe waits, concurrently, for one timeout."""
    resolve_lab_names()
    silent = SilentServer()
    try:
        timeout = 1.0
        settings = Settings(
            legacy=LegacyServer("127.0.0.1", silent.port),
            fqdn=BRIDGE_FQDN,
            bridge_addr="127.0.0.1",
            https_port=silent.port,
            http_port=silent.port,
            credentials=Credentials(EMAIL, LAB_USER, LAB_PASSWORD),
            timeout=timeout,
            hold=0,
        )
        started = time.monotonic()
        report = preflight(settings)
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    found = statuses(report)
    assert found["legacy.tcp"] == "pass" and found["legacy.tls"] == "fail"
    assert "no answer within the timeout" in check(report, "legacy.tls").summary
    assert found["bridge.tls.modern"] == "fail" and found["bridge.certificate"] == "fail"
    assert found["bridge.logon.ntlm"] == "fail" and found["bridge.autodiscover"] == "skip"
    print(f"\nrun against silent hosts with --timeout {timeout:g}: {elapsed:.2f} s for {len(found)} checks")
    assert timeout <= elapsed < 2 * timeout


def test_rc4_only_server_is_named_as_sharing_no_suite_with_this_machine():
    with Rc4OnlyServer(suites=(RC4_SHA,)) as server:
        report = preflight(Settings(legacy=LegacyServer("127.0.0.1", server.port), timeout=TIMEOUT))
    tls = check(report, "legacy.tls")
    assert tls.status == "fail" and tls.details["obsolete_suites"] == ["RC4-SHA"]
    assert "offers only RC4-SHA" in tls.summary and "shares no suite" in tls.summary
    assert "KB948963" in tls.fix
    assert check(report, "legacy.http.rpc").status == "skip"


# --------------------------------------------------------------------------- a running bridge


@pytest.fixture(scope="module")
def running_bridge(lab, ca, tmp_path_factory):
    with BackgroundBridge(bridge_config(lab.port, tmp_path_factory.mktemp("bridge"), ca)) as bridge:
        yield bridge


@pytest.fixture(scope="module")
def ca_bundle(ca, tmp_path_factory) -> Path:
    return ca_file(ca, tmp_path_factory.mktemp("ca"))


def bridge_settings(lab, bridge, **overrides) -> Settings:
    resolve_lab_names()
    values = {"fqdn": BRIDGE_FQDN, "bridge_addr": "127.0.0.1", "https_port": bridge.https_port, "http_port": bridge.http_port}
    return settings_for(lab, **(values | overrides))


@pytest.fixture(scope="module")
def bridge_report(lab, running_bridge, ca_bundle) -> Report:
    started = time.monotonic()
    report = preflight(bridge_settings(lab, running_bridge, ca_bundle=ca_bundle, hold=1.0, expect_ip="127.0.0.1"))
    print(f"\nfull run against the lab and a bridge (34 checks, --hold 1): {time.monotonic() - started:.2f} s")
    return report


def test_bridge_in_front_of_the_lab_passes_every_bridge_check(bridge_report, running_bridge):
    found = statuses(bridge_report)
    bridge_side = {check_id: status for check_id, status in found.items() if check_id.startswith("bridge.")}
    assert bridge_side == {check_id: "pass" for check_id in bridge_side}, bridge_side
    assert len(bridge_side) == 9 + 11  # 11 repeated HTTP checks: http.* (4), logon.* (2), autodiscover, rpc.* (3), outlook_anywhere
    assert bridge_report.verdict == "warn"  # the lab's self-signed certificate, nothing else
    assert check(bridge_report, "bridge.tls.obsolete").details["TLS 1.0"].startswith("refused")
    certificate = check(bridge_report, "bridge.certificate")
    assert certificate.details["issuer"] == "CN=exchange-bridge local test CA" and 85 <= certificate.details["days_left"] <= 90
    redirect = check(bridge_report, "bridge.port80.redirect")
    assert redirect.details["location"] == f"https://{BRIDGE_FQDN}:{running_bridge.https_port}/"
    rpc = check(bridge_report, "bridge.rpc.6001")
    assert rpc.summary.startswith("same as direct") and rpc.details["direct"] == rpc.details["through_bridge"]
    assert check(bridge_report, "bridge.autodiscover").details["expr_server"] == BRIDGE_FQDN
    assert check(bridge_report, "bridge.idle").details["hold_seconds"] == 1.0
    assert bridge_report.duration < 5


def test_bridge_that_does_not_forward_rpc_differs_from_direct(lab, ca, ca_bundle, tmp_path):
    config = bridge_config(lab.port, tmp_path, ca, forward_paths=("/owa", "/EWS", "/Autodiscover"))
    with BackgroundBridge(config) as bridge:
        report = preflight(bridge_settings(lab, bridge, ca_bundle=ca_bundle, hold=0))
    rpc = check(report, "bridge.http.rpc")
    assert rpc.status == "fail" and "differs through the bridge" in rpc.summary
    assert rpc.details["direct"]["http_status"] == 401 and rpc.details["through_bridge"]["http_status"] == 404
    assert all(check(report, f"bridge.rpc.{port}").status == "skip" for port in (6001, 6002, 6004))
    assert check(report, "bridge.http.ews").status == "pass"
    assert report.verdict == "fail"


def test_bridge_certificate_untrusted_without_the_ca_bundle(lab, running_bridge):
    report = preflight(bridge_settings(lab, running_bridge, credentials=None, hold=0))
    certificate = check(report, "bridge.certificate")
    assert certificate.status == "fail" and "not trusted" in certificate.summary
    assert "--ca-bundle" in certificate.fix


def test_bridge_name_resolving_elsewhere_than_expected(lab, running_bridge, ca_bundle):
    report = preflight(bridge_settings(lab, running_bridge, credentials=None, ca_bundle=ca_bundle, hold=0, expect_ip="192.0.2.7"))
    dns = check(report, "bridge.dns")
    assert dns.status == "fail" and "not 192.0.2.7" in dns.summary
    assert check(report, "bridge.tcp").status == "pass"  # probed at --bridge-addr all the same


def test_bridge_that_cannot_reach_the_legacy_server(ca, ca_bundle, tmp_path):
    dead_port = free_port()
    with BackgroundBridge(bridge_config(dead_port, tmp_path, ca)) as bridge:
        report = preflight(bridge_settings(SimpleNamespace(port=dead_port), bridge, ca_bundle=ca_bundle, hold=0))
    found = statuses(report)
    assert found["legacy.tcp"] == "fail" and found["legacy.http.rpc"] == "skip"
    assert found["bridge.certificate"] == "pass" and found["bridge.tls.modern"] == "pass"
    rpc = check(report, "bridge.http.rpc")
    assert rpc.status == "fail" and "the bridge cannot reach the legacy server" in rpc.summary and "no direct result" in rpc.summary
    assert found["bridge.logon.ntlm"] == "fail" and found["bridge.autodiscover"] == "skip"


def test_bridge_port_closed(lab):
    resolve_lab_names()
    report = preflight(settings_for(lab, credentials=False, fqdn=BRIDGE_FQDN, bridge_addr="127.0.0.1", https_port=free_port(), http_port=free_port()))
    found = statuses(report)
    assert found["bridge.tcp"] == "fail" and found["bridge.port80.redirect"] == "warn"
    assert found["bridge.certificate"] == "skip" and found["bridge.http.rpc"] == "skip"


# --------------------------------------------------------------------------- reports


def test_json_report_follows_the_documented_schema(bridge_report):
    data = json.loads(json.dumps(report_json(bridge_report)))
    assert data["schema"] == SCHEMA and data["verdict"] == "warn"
    assert set(data) >= {"schema", "verdict", "checks", "target", "facts", "next_steps", "data_handling"}
    for entry in data["checks"]:
        assert list(entry) == ["id", "side", "status", "summary", "details", "fix"]
        assert entry["side"] in ("legacy", "bridge") and entry["status"] in ("pass", "warn", "fail", "skip")
    documented = (REPO / "docs" / "preflight-schema.md").read_text()
    assert SCHEMA in documented
    for check_id, _ in planned_checks(bridge_report.settings) + [("bridge.fqdn", "bridge")]:
        assert f"`{check_id}`" in documented or check_id.startswith(("bridge.http.", "bridge.logon.", "bridge.autodiscover", "bridge.rpc.")), check_id
    steps = "\n".join(data["next_steps"])
    assert "Test-MigrationServerAvailability -ExchangeOutlookAnywhere -Autodiscover -EmailAddress alice@lab.test" in steps
    assert "New-MigrationEndpoint -ExchangeOutlookAnywhere" in steps
    assert f"-RpcProxyServer {BRIDGE_FQDN} -ExchangeServer EXCH2007.lab.local -Authentication NTLM" in steps


def test_password_never_reaches_any_output(lab_factory, tmp_path):
    secret_lab = lab_factory(users={SECRET_USER: SECRET_PASSWORD})
    settings = settings_for(secret_lab, user=SECRET_USER, password=SECRET_PASSWORD, email="bob@lab.test")
    progress = io.StringIO()
    report = run_with_progress(settings, Console(file=progress, force_terminal=True, width=120))
    assert check(report, "legacy.logon.basic").status == "pass" and check(report, "legacy.rpc.6004").status == "pass"
    console = io.StringIO()
    print_report(report, Console(file=console, width=120))
    outputs = {"progress": progress.getvalue(), "console": console.getvalue(), "json": json.dumps(report_json(report)), "html": render_html(report)}
    basic_token = base64.b64encode(f"{SECRET_USER}:{SECRET_PASSWORD}".encode()).decode()
    for name, text in outputs.items():
        assert SECRET_PASSWORD not in text and basic_token not in text, f"the password leaked into the {name} output"
    assert "legacy.rpc.6004" in outputs["console"] and "WARN" in outputs["console"]
    assert "preflight" in outputs["progress"]  # the progress display ran


def test_html_report_is_self_contained(bridge_report):
    page = render_html(bridge_report)
    assert not re.search(r"\b(?:src|href)\s*=", page, re.IGNORECASE)
    assert "<link" not in page and "<script" not in page and "@import" not in page
    for needle in (
        "Verdict: WARN",
        'id="path-picture"',
        'data-hop="front" data-status="pass"',
        'data-hop="back" data-status="pass"',
        "Test-MigrationServerAvailability -ExchangeOutlookAnywhere -Autodiscover",
        "New-MigrationEndpoint -ExchangeOutlookAnywhere",
        "terminates TLS",
        "destroyed",
    ):
        assert needle in page, needle


def test_html_report_renders_in_headless_chromium(lab, ca, ca_bundle, tmp_path):
    config = bridge_config(lab.port, tmp_path, ca, forward_paths=("/owa", "/EWS", "/Autodiscover"))
    with BackgroundBridge(config) as bridge:
        report = preflight(bridge_settings(lab, bridge, ca_bundle=ca_bundle, hold=0))
    assert report.verdict == "fail"
    page = tmp_path / "preflight.html"
    page.write_text(render_html(report), encoding="utf-8")

    dom = chromium("--dump-dom", page.as_uri(), directory=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Verdict: FAIL" in dom.stdout
    assert re.search(r'<svg[^>]*id="path-picture"', dom.stdout)
    assert 'data-hop="front" data-status="pass"' in dom.stdout and 'data-hop="back" data-status="fail"' in dom.stdout

    shot = tmp_path / "preflight.png"
    result = chromium("--window-size=1000,500", "--hide-scrollbars", f"--screenshot={shot}", page.as_uri(), directory=tmp_path)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    width, height, rows = png_pixels(shot.read_bytes())
    assert (width, height) == (1000, 500)
    # The red verdict banner on top, then the path picture: a green front hop and a red back hop.
    assert count_colour(rows, STATUS_COLOURS["fail"], 0, 60) > 20000
    assert count_colour(rows, STATUS_COLOURS["pass"], 120, 420) > 500
    assert count_colour(rows, STATUS_COLOURS["fail"], 120, 420) > 500


# --------------------------------------------------------------------------- settings and the command line


def test_config_file_supplies_defaults_and_flags_win(tmp_path, lab):
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'fqdn = "bridge.example.com"\nlegacy = ["127.0.0.1:{lab.port}", "10.0.0.2"]\nhttps_port = 8443\nhttp_port = 8080\n'
        f'legacy_fingerprint = "sha256:{lab.fingerprint}"\nacme_email = "ops@example.com"\n'
    )
    settings = settings_from_args(parse("--config", str(config), "--http-port", "80"))
    assert settings.legacy == LegacyServer("127.0.0.1", lab.port)
    assert (settings.fqdn, settings.https_port, settings.http_port) == ("bridge.example.com", 8443, 80)
    assert settings.legacy_fingerprint == lab.fingerprint and settings.credentials is None
    assert settings.other_legacy == [LegacyServer("10.0.0.2", 443)]
    overridden = settings_from_args(parse("--config", str(config), "--legacy", "owa.example.com", "--fqdn", "other.example.com"))
    assert overridden.legacy == LegacyServer("owa.example.com", 443) and overridden.fqdn == "other.example.com"
    assert overridden.other_legacy == []


def test_further_legacy_servers_in_the_config_are_named_not_silently_skipped(lab):
    report = preflight(settings_for(lab, credentials=False, other_legacy=[LegacyServer("10.0.0.2", 443), LegacyServer("cas2.example", 8443)]))
    others = check(report, "legacy.others")
    assert others.status == "warn" and "10.0.0.2:443, cas2.example:8443" in others.summary
    assert "bridge preflight --legacy cas2.example:8443" in others.fix


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFLIGHT_")}
    return bridge_cli("preflight", *argv, env=environment | {"COLUMNS": "120"} | (env or {}))


def test_cli_exit_codes_reports_and_no_password(lab_factory, tmp_path):
    secret_lab = lab_factory(users={SECRET_USER: SECRET_PASSWORD})
    json_path, html_path = tmp_path / "report.json", tmp_path / "report.html"
    started = time.monotonic()
    result = run_cli(
        "--legacy",
        f"127.0.0.1:{secret_lab.port}",
        "--email",
        "bob@lab.test",
        "--username",
        SECRET_USER,
        "--password-env",
        "PREFLIGHT_PW",
        "--json",
        str(json_path),
        "--html",
        str(html_path),
        "--timeout",
        "5",
        env={"PREFLIGHT_PW": SECRET_PASSWORD},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(json_path.read_text())
    assert data["schema"] == SCHEMA and data["verdict"] == "warn"
    assert {entry["id"]: entry["status"] for entry in data["checks"]}["legacy.rpc.6002"] == "pass"
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr), ("json", json_path.read_text()), ("html", html_path.read_text())):
        assert SECRET_PASSWORD not in text, f"the password leaked into {name}"
    assert "WARN:" in result.stdout and "New-MigrationEndpoint" in result.stdout
    print(f"\nCLI run (process start included) against the lab: {elapsed:.2f} s")

    closed = run_cli("--legacy", f"127.0.0.1:{free_port()}", "--json", str(json_path))
    assert closed.returncode == 1
    assert json.loads(json_path.read_text())["verdict"] == "fail"


def test_cli_with_config_checks_the_bridge_it_names(lab, running_bridge, ca_bundle, tmp_path):
    config = tmp_path / "bridge.toml"
    config.write_text(f'fqdn = "{BRIDGE_FQDN}"\nlegacy = ["127.0.0.1:{lab.port}"]\nhttps_port = {running_bridge.https_port}\nhttp_port = {running_bridge.http_port}\n')
    json_path = tmp_path / "report.json"
    result = run_cli("--config", str(config), "--bridge-addr", "127.0.0.1", "--ca-bundle", str(ca_bundle), "--hold", "0", "--json", str(json_path))
    data = json.loads(json_path.read_text())
    found = {entry["id"]: entry["status"] for entry in data["checks"]}
    assert data["target"]["https_port"] == running_bridge.https_port and data["target"]["fqdn"] == BRIDGE_FQDN
    # This process cannot resolve *.lab.test: that alone fails, the rest is probed at --bridge-addr.
    assert found["bridge.dns"] == "fail"
    assert [check_id for check_id, status in found.items() if status == "fail"] == ["bridge.dns"]
    assert found["bridge.certificate"] == "pass" and found["bridge.http.rpc"] == "pass"
    assert result.returncode == 1


@pytest.mark.parametrize(
    "argv, words",
    [
        ((), "No legacy server given"),
        (("--legacy", "owa.example.com", "--email", EMAIL), "--email and --username go together"),
        (("--legacy", "owa.example.com", "--fqdn", "192.0.2.1"), "is an IP address"),
    ],
)
def test_cli_usage_errors_exit_2_with_one_sentence(argv, words):
    result = run_cli(*argv)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0] and lines[0].endswith("."), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
