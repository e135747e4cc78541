"""scripts/fail2ban's filter against log lines the bridge really wrote (with its own format): failed HTTP
logons (a 401 to Basic credentials), failed POP3 and SMTP logons and the ban they add up to match, with
the client's address; a user name crafted to look like such a line does not. Checked with Python's re
(fail2ban's <HOST> as ``(?P<host>\\S+)``) and, when installed, with fail2ban-regex itself; both as the
bridge writes its stderr to a file and as fail2ban formats a journal entry ("host bridge[pid]: ...")."""

from __future__ import annotations

import configparser
import logging
import poplib
import re
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_client_context, bridge_config, bridge_session, resolve_lab_names
from support.lab import LAB_USER
from support.net import wait_until

from bridge.config import LegacyServer
from bridge.runtime.app import LOG_FORMAT

FILTER = Path(__file__).resolve().parents[2] / "scripts" / "fail2ban" / "filter.d" / "exchange-bridge.conf"
CRAFTED = "x INFO bridge.bans: failed logon from 192.0.2.66 over pop3 (1 of 6 within 600 s)"


def failregexes() -> list[re.Pattern[str]]:
    """The filter's failregex lines, interpolated as fail2ban does, with <HOST> as (?P<host>\\S+)."""
    parser = configparser.ConfigParser(interpolation=configparser.BasicInterpolation())
    parser.read(FILTER)
    lines = [line.strip() for line in parser.get("Definition", "failregex").splitlines() if line.strip()]
    return [re.compile(line.replace("<HOST>", r"(?P<host>\S+)")) for line in lines]


def hosts_by_re(lines: list[str]) -> list[str]:
    found = []
    for line in lines:
        for pattern in failregexes():
            match = pattern.search(line)
            if match:
                found.append(match.group("host"))
                break
    return found


@pytest.fixture(scope="module")
def written_lines(lab_factory, ca, tmp_path_factory) -> list[str]:
    """The bridge's log lines (its own format) from failed logons over HTTP, POP3 and SMTP, up to a ban."""
    lab = lab_factory(pop3_port=0, smtp_port=0, submission_port=0)
    tmp_path = tmp_path_factory.mktemp("fail2ban")
    log_file = tmp_path / "bridge.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    settings = dict(
        pop3s_port=0,
        smtps_port=0,
        pop3_upstream=LegacyServer("127.0.0.1", lab.mail_port("pop3")),
        smtp_upstream=LegacyServer("127.0.0.1", lab.mail_port("submission")),
        ban_threshold=6,
    )
    bridge = BackgroundBridge(bridge_config(lab.port, tmp_path / "bridge", ca, **settings))
    try:
        bridge.start()
        resolve_lab_names()
        for _ in range(2):  # a 401 to Basic credentials
            assert bridge_session(ca, auth=(LAB_USER, "wrong")).get(bridge.url + "/EWS/Exchange.asmx").status_code == 401
        for user in (CRAFTED, LAB_USER):
            client = poplib.POP3_SSL(BRIDGE_FQDN, bridge.bridge.mail_ports["pop3"], context=bridge_client_context(ca), timeout=30)
            client.user(user)
            with pytest.raises(poplib.error_proto):
                client.pass_("wrong")
            client.close()
        for attempt in range(2):
            smtp = smtplib.SMTP_SSL(BRIDGE_FQDN, bridge.bridge.mail_ports["smtp"], context=bridge_client_context(ca), timeout=30)
            smtp.ehlo("client.example")
            smtp.user, smtp.password = LAB_USER, f"wrong-{attempt}"
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.auth("LOGIN", smtp.auth_login)
            smtp.close()
        assert wait_until(lambda: "banned 127.0.0.1" in log_file.read_text())
    finally:
        bridge.shutdown()
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()
    return log_file.read_text().splitlines()


def test_the_filter_matches_failed_logons_of_every_protocol_and_the_ban_not_a_crafted_user(written_lines):
    failures = [line for line in written_lines if line.split(" ", 4)[3:4] == ["bridge.bans:"] and " failed logon from " in line]
    assert [line.split(" over ")[1].split()[0] for line in failures] == ["http", "http", "pop3", "pop3", "smtp", "smtp"]
    crafted = [line for line in written_lines if "192.0.2.66" in line]
    assert crafted and all(line.split(" ", 4)[3] == "bridge.access:" for line in crafted)  # only inside the access line's user=
    matched = [line for line in written_lines if hosts_by_re([line])]
    assert hosts_by_re(written_lines) == ["127.0.0.1"] * 7  # six failed logons, then the ban
    assert matched == failures + [line for line in written_lines if "WARNING bridge.bans: banned 127.0.0.1 for 3600 s after 6 failed logons" in line]
    journal = [f"vm1 bridge[4242]: {line}" for line in written_lines]  # how fail2ban formats a journal entry
    assert hosts_by_re(journal) == ["127.0.0.1"] * 7
    for line in written_lines:  # nothing a client chose in the lines it reads
        assert "Passw0rd" not in line and "wrong" not in line


@pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban is not installed (apt-get install fail2ban)")
def test_fail2ban_regex_itself_finds_the_same_addresses(written_lines, tmp_path):
    for name, lines in (("file", written_lines), ("syslog", [f"Jun  2 10:00:00 vm1 bridge[4242]: {line}" for line in written_lines])):
        log = tmp_path / f"{name}.log"
        log.write_text("\n".join(lines) + "\n")
        result = subprocess.run(["fail2ban-regex", "-o", "ip", str(log), str(FILTER)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["127.0.0.1"] * 7, (name, result.stdout)
