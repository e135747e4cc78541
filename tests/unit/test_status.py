"""Addresses as the ban file keeps them (tests/integration/test_status.py runs the status page)."""

from __future__ import annotations

from bridge.ops.bans import normalise_address


def test_normalised_addresses_for_ban_files():
    assert normalise_address("::ffff:192.0.2.1") == "192.0.2.1"
    assert normalise_address(" 2001:DB8::1 ") == "2001:db8::1"


def test_mail_counters_per_protocol_on_the_page_and_in_metrics():
    from types import SimpleNamespace

    from bridge.ops.status import mail_metrics, mail_rows, mail_snapshot
    from bridge.proxy.mail import MailStats

    stats = MailStats()
    stats.sessions[("imap", "logged-on")] += 2
    stats.logons[("imap", "failed")] += 3
    stats.bytes_out_done["imap"] = 2048
    bridge = SimpleNamespace(mail=stats, mail_ports={"imap": 993}, bans=SimpleNamespace(failures_by_protocol={"imap": 3, "http": 1}))
    data = mail_snapshot(bridge)
    assert data == {"imap": {"port": 993, "sessions_open": 0, "sessions": {"logged-on": 2}, "logons": {"ok": 0, "failed": 3}, "ban_failures": 3, "bytes_in": 0, "bytes_out": 2048}}
    assert 'id="mail-imap">port 993: 0 open, 2 finished, 0 logons, 3 failed' in mail_rows(data)
    families = {family.name: family for family in mail_metrics(data, bridge.bans.failures_by_protocol)}
    assert {sample.labels["protocol"]: sample.value for sample in families["bridge_auth_failures_by_protocol"].samples} == {"http": 1, "imap": 3}
    assert [(sample.labels, sample.value) for sample in families["bridge_mail_sessions"].samples] == [({"protocol": "imap", "result": "logged-on"}, 2)]
    assert mail_snapshot(SimpleNamespace(mail=stats, mail_ports={}, bans=None)) == {}
