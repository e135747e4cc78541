"""Preflight with --imap, --pop3 and --smtp against the lab's IMAP4, POP3 and SMTP services (TLS 1.0 only,
Exchange 2007's words) and through a bridge with all four mail listeners: TLS versions, greetings,
capabilities, logons, IMAP's LIST, SELECT INBOX and message count on both sides and compared, the
rows of the HTML report, and the PowerShell of an IMAP migration endpoint."""

from __future__ import annotations

import asyncio

import pytest
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_config, ca_file
from support.lab import LAB_PASSWORD, LAB_USER
from support.preflight import EMAIL, parse

from bridge.config import LegacyServer
from bridge.lab.imap import mailbox_messages
from bridge.lab.mailbox import lab_mailbox
from bridge.preflight.checks import Report, Settings, run_preflight
from bridge.preflight.command import settings_from_args
from bridge.preflight.mail import MailTarget
from bridge.preflight.probe import Credentials
from bridge.preflight.report import next_steps, render_html


@pytest.fixture(scope="module")
def mail_lab(lab_factory):
    return lab_factory(imap_port=0, pop3_port=0, submission_port=0)


@pytest.fixture(scope="module")
def mail_bridge(mail_lab, ca, tmp_path_factory):
    settings = dict(
        imaps_port=0,
        pop3s_port=0,
        smtps_port=0,
        submission_port=0,
        imap_upstream=LegacyServer("127.0.0.1", mail_lab.imap_port),
        pop3_upstream=LegacyServer("127.0.0.1", mail_lab.mail_port("pop3")),
        smtp_upstream=LegacyServer("127.0.0.1", mail_lab.mail_port("submission")),
    )
    bridge = BackgroundBridge(bridge_config(mail_lab.port, tmp_path_factory.mktemp("bridge"), ca, **settings))
    bridge.start()
    yield bridge
    bridge.shutdown()


def targets(mail_lab, bridge: BackgroundBridge) -> list[MailTarget]:
    ports = bridge.bridge.mail_ports
    return [
        MailTarget("imap", LegacyServer("127.0.0.1", mail_lab.imap_port), "implicit", {"imap": ports["imap"]}),
        MailTarget("pop3", LegacyServer("127.0.0.1", mail_lab.mail_port("pop3")), "implicit", {"pop3": ports["pop3"]}),
        MailTarget("smtp", LegacyServer("127.0.0.1", mail_lab.mail_port("submission")), "starttls", {"smtp": ports["smtp"], "submission": ports["submission"]}),
    ]


def run(mail_lab, bridge, ca, tmp_path, password: str = LAB_PASSWORD) -> Report:
    settings = Settings(
        legacy=LegacyServer("127.0.0.1", mail_lab.port),
        fqdn=BRIDGE_FQDN,
        bridge_addr="127.0.0.1",
        https_port=bridge.https_port,
        http_port=bridge.http_port,
        ca_bundle=ca_file(ca, tmp_path),
        credentials=Credentials(EMAIL, LAB_USER, password),
        timeout=10.0,
        hold=0.0,
        mail=targets(mail_lab, bridge),
    )
    return asyncio.run(run_preflight(settings))


def test_every_mail_service_directly_and_through_the_bridge(mail_lab, mail_bridge, ca, tmp_path):
    report = run(mail_lab, mail_bridge, ca, tmp_path)
    mail = {check.id: check for check in report.checks if check.id.split(".")[1] in ("imap", "pop3", "smtp", "submission")}
    assert list(mail) == [
        "legacy.imap.service",
        "legacy.imap.logon",
        "legacy.pop3.service",
        "legacy.pop3.logon",
        "legacy.smtp.service",
        "legacy.smtp.logon",
        "bridge.imap.service",
        "bridge.imap.logon",
        "bridge.pop3.service",
        "bridge.pop3.logon",
        "bridge.smtp.service",
        "bridge.smtp.logon",
        "bridge.submission.service",
        "bridge.submission.logon",
    ]
    assert all(check.status == "pass" for check in mail.values()), [(check.id, check.status, check.summary) for check in mail.values() if check.status != "pass"]
    legacy = mail["legacy.imap.service"].details
    assert legacy["greeting"] == "* OK The Microsoft Exchange IMAP4 service is ready." and legacy["negotiated"] == "TLS 1.0"
    assert legacy["tls"] == {"TLS 1.0": "accepted", "TLS 1.1": "refused", "TLS 1.2": "refused", "TLS 1.3": "refused"}
    assert "AUTH=NTLM" in legacy["capabilities"]
    through = mail["bridge.imap.service"].details
    assert through["tls"]["TLS 1.0"] == "refused" and through["tls"]["TLS 1.2"] == "accepted" and through["negotiated"] in ("TLS 1.2", "TLS 1.3")
    assert "STARTTLS" not in through["capabilities"] and "AUTH=GSSAPI" not in through["capabilities"]
    for side in ("legacy", "bridge"):
        imap = mail[f"{side}.imap.logon"].details
        assert imap["outcome"] == "ok" and imap["messages"] == len(mailbox_messages()) and imap["folders"] >= 1
        assert mail[f"{side}.pop3.logon"].details["messages"] == len(lab_mailbox())
    assert mail["legacy.smtp.service"].details["mode"] == "starttls" and "STARTTLS" not in mail["legacy.smtp.service"].details["capabilities"]  # after the upgrade
    assert mail["bridge.submission.service"].details["mode"] == "starttls" and mail["bridge.submission.logon"].details["mechanism"] == "LOGIN"
    assert mail["bridge.smtp.service"].details["greeting"].startswith("220 exch2007.lab.test Microsoft ESMTP MAIL Service ready")
    steps = "\n".join(next_steps(report))
    port = mail_bridge.bridge.mail_ports["imap"]
    assert f"New-MigrationEndpoint -IMAP -Name 'Exchange 2007 IMAP via bridge' -RemoteServer {BRIDGE_FQDN} -Port {port} -Security Ssl" in steps
    assert f"Test-MigrationServerAvailability -IMAP -RemoteServer {BRIDGE_FQDN} -Port {port} -Security Ssl" in steps
    assert "New-MigrationBatch -Name 'IMAP batch 1' -SourceEndpoint 'Exchange 2007 IMAP via bridge' -CSVData" in steps
    page = render_html(report)
    for check_id in mail:
        assert f">{check_id}<" in page or check_id in page
    assert LAB_PASSWORD not in page and LAB_PASSWORD not in repr(report.checks)


def test_a_wrong_password_fails_every_logon_with_its_fix(mail_lab, mail_bridge, ca, tmp_path):
    report = run(mail_lab, mail_bridge, ca, tmp_path, password="wrong-password")
    imap, pop3, smtp = report.get("legacy.imap.logon"), report.get("bridge.pop3.logon"), report.get("bridge.submission.logon")
    assert imap is not None and imap.status == "fail" and "Set-CASMailbox -ImapEnabled" in imap.fix and "LOGIN failed" in imap.summary
    assert pop3 is not None and pop3.status == "fail" and "Logon failure" in pop3.summary
    assert smtp is not None and smtp.status == "fail" and "BasicAuthRequireTLS" in smtp.fix
    assert "wrong-password" not in repr(report.checks)


def test_a_mail_port_nothing_listens_on_fails_with_the_service_fix(mail_lab, mail_bridge, ca, tmp_path):
    settings = Settings(legacy=LegacyServer("127.0.0.1", mail_lab.port), timeout=5.0, hold=0.0, mail=[MailTarget("pop3", LegacyServer("127.0.0.1", 1), "implicit", {"pop3": 995})])
    report = asyncio.run(run_preflight(settings))
    service = report.get("legacy.pop3.service")
    assert service is not None and service.status == "fail" and "connection refused" in service.summary and "MSExchangePOP3" in service.fix
    assert report.get("bridge.pop3.service") is None  # no --fqdn: the bridge side is the one skipped bridge.fqdn check


def test_flags_and_the_bridge_config_choose_the_services(tmp_path):
    config = tmp_path / "bridge.toml"
    config.write_text('fqdn = "bridge.example"\nlegacy = ["owa.example:443"]\nimaps_port = 1993\nsubmission_port = 2587\nsmtp_upstream = "smtp.example"\n')
    settings = settings_from_args(parse("--config", str(config), "--pop3", "pop.example:1995"))
    assert [(t.protocol, str(t.legacy), t.mode, t.bridge_ports) for t in settings.mail] == [
        ("imap", "owa.example:993", "implicit", {"imap": 1993}),
        ("pop3", "pop.example:1995", "implicit", {"pop3": 995}),
        ("smtp", "smtp.example:587", "starttls", {"submission": 2587}),
    ]
    assert settings_from_args(parse("--legacy", "owa.example")).mail == []
