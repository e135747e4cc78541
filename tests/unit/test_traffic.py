"""The migration view's pure parts: who a logon names (Basic, NTLM AUTHENTICATE), the throughput ring,
the rate over the last minute, pairing channels by RTS cookie or client connection, stalls, the
workers' reports added up, and the ledger."""

from __future__ import annotations

import base64
import json
import logging
import struct
import uuid
from types import SimpleNamespace

import pytest
import spnego

from bridge.ops.migration import Ledger, read_ledger
from bridge.ops.report import build_report, render_html
from bridge.ops.status import sparkline, throughput_svg
from bridge.ops.traffic import OpeningReader, Throughput, TrafficView, counter_delta, merge_reports, pair_channels, rate_over
from bridge.protocol import rts
from bridge.protocol.auth import ntlm_authenticate_user, user_of
from bridge.protocol.http1 import parse_request_head

# --------------------------------------------------------------------------- user names


@pytest.fixture(scope="module")
def ntlm_tokens(tmp_path_factory):
    """A real NTLM handshake by pyspnego (client and server): NEGOTIATE, CHALLENGE, AUTHENTICATE."""
    import os

    users = tmp_path_factory.mktemp("ntlm") / "users"
    users.write_text("LAB:alice:Passw0rd!\n")
    before = os.environ.get("NTLM_USER_FILE")
    os.environ["NTLM_USER_FILE"] = str(users)
    try:
        client = spnego.client("LAB\\alice", "Passw0rd!", protocol="ntlm", hostname="lab", service="http")
        server = spnego.server(protocol="ntlm")
        negotiate = client.step()
        challenge = server.step(negotiate)
        authenticate = client.step(challenge)
    finally:
        if before is None:
            os.environ.pop("NTLM_USER_FILE", None)
        else:
            os.environ["NTLM_USER_FILE"] = before
    return negotiate, challenge, authenticate


def authenticate_message(user: bytes, domain: bytes, flags: int, lm: bytes = b"L" * 24, nt: bytes = b"N" * 24) -> bytes:
    """An NTLM AUTHENTICATE message laid out by hand ([MS-NLMP] 2.2.1.3): payload after the 64-byte header."""
    payload = b""
    fields = []
    for value in (lm, nt, domain, user, b"WS", b""):
        fields.append(struct.pack("<HHI", len(value), len(value), 64 + len(payload)))
        payload += value
    return b"NTLMSSP\x00" + struct.pack("<I", 3) + b"".join(fields) + struct.pack("<I", flags) + payload


def test_the_user_of_a_real_ntlm_authenticate_message_and_nothing_of_the_other_legs(ntlm_tokens):
    negotiate, challenge, authenticate = ntlm_tokens
    assert ntlm_authenticate_user(authenticate) == "LAB\\alice"
    assert user_of("NTLM " + base64.b64encode(authenticate).decode()) == "LAB\\alice"
    # Inside a SPNEGO NegTokenResp (Negotiate), the NTLM token is found and read the same way.
    wrapped = b"\xa1\x82\x01\x20\x30\x82\x01\x1c\xa2\x82\x01\x18\x04\x82\x01\x14" + authenticate
    assert user_of("Negotiate " + base64.b64encode(wrapped).decode()) == "LAB\\alice"
    for token in (negotiate, challenge):
        assert ntlm_authenticate_user(token) is None
        assert user_of("NTLM " + base64.b64encode(token).decode()) is None


def test_ntlm_user_fields_in_unicode_and_oem_and_malformed_messages():
    unicode_message = authenticate_message("bob".encode("utf-16-le"), "CUSTOMER".encode("utf-16-le"), flags=0x1)
    assert ntlm_authenticate_user(unicode_message) == "CUSTOMER\\bob"
    oem = authenticate_message(b"carol", b"", flags=0x2)
    assert ntlm_authenticate_user(oem) == "carol"
    assert ntlm_authenticate_user(authenticate_message(b"", b"LAB", flags=0x2)) is None  # anonymous
    truncated = unicode_message[:70]
    assert ntlm_authenticate_user(truncated) is None  # the user field points past the end
    pointing_into_header = bytearray(unicode_message)
    struct.pack_into("<HHI", pointing_into_header, 36, 6, 6, 8)  # UserNameFields into the fixed header
    assert ntlm_authenticate_user(bytes(pointing_into_header)) is None
    assert ntlm_authenticate_user(b"NTLMSSP\x00\x03\x00\x00\x00") is None
    controls = authenticate_message("ev\x00il\r\n".encode("utf-16-le"), b"", flags=0x1)
    assert ntlm_authenticate_user(controls) == "evil"  # no control characters reach the page or the logs


def test_basic_names_the_user_and_never_the_password():
    header = "Basic " + base64.b64encode(b"LAB\\alice:s3cret:with:colons").decode()
    assert user_of(header) == "LAB\\alice"
    assert user_of("Basic " + base64.b64encode("jos\u00e9:pw".encode()).decode()) == "jos\u00e9"
    assert user_of("Basic " + base64.b64encode(b"no-colon").decode()) is None
    assert user_of("Basic !!!") is None
    assert user_of("Bearer abc") is None and user_of(None) is None and user_of("") is None


# --------------------------------------------------------------------------- ring and rate


def test_the_throughput_ring_keeps_24_hours_per_minute_in_a_fixed_size():
    ring = Throughput(size=1440)
    start = 1_700_000_000 // 60 * 60
    ring.observe(start, 0, 0)
    ring.observe(start + 10, 1000, 5000)
    ring.observe(start + 50, 1500, 9000)
    ring.observe(start + 70, 1600, 9100)  # the next minute
    rows = ring.series(start + 70, minutes=3)
    assert rows == [(start - 60, 0, 0), (start, 1500, 9000), (start + 60, 100, 100)]
    # A cumulative counter that restarted (a worker replaced) counts from zero again.
    ring.observe(start + 80, 50, 0)
    assert ring.series(start + 80, minutes=1) == [(start + 60, 150, 100)]
    # A day later the old minutes are gone, the ring did not grow, and a gap reads as zeros.
    ring.observe(start + 86400 + 5, 60, 0)
    assert len(ring.bytes_in) == 1440
    rows = ring.series(start + 86400 + 5)
    assert len(rows) == 1440 and rows[-1] == (start + 86400, 10, 0)
    assert rows[0] == (start + 60, 150, 100)  # 24 hours back: the minute of `start` has left the ring
    assert sum(received for _, received, _ in rows) == 160
    # Far past the ring's span: cleared in one step, no loop over the missed minutes.
    ring.observe(start + 30 * 86400, 60, 7)
    assert sum(sent for _, _, sent in ring.series(start + 30 * 86400)) == 7


def test_counter_delta_and_the_rate_over_the_last_minute():
    assert counter_delta(10, 4) == 6 and counter_delta(3, 10) == 3
    assert rate_over([], 100.0) == 0.0
    assert rate_over([(100.0, 0)], 100.0) == 0.0
    # A channel 10 s old that moved 5000 bytes: 500 B/s over its age.
    assert rate_over([(90.0, 0), (95.0, 2000), (100.0, 5000)], 100.0) == 500.0
    # Older than a minute: against the newest sample at least a minute old.
    samples = [(float(t), t * 100 if t <= 60 else 6000 + (t - 60) * 1000) for t in range(0, 121)]
    assert rate_over(samples, 120.0) == pytest.approx((66000 - 6000) / 60)
    # Stalled: no growth, rate 0.
    assert rate_over([(0.0, 5000), (30.0, 5000), (61.0, 5000)], 61.0) == 0.0


def test_sparkline_and_chart_carry_the_numbers():
    assert sparkline([0, 1, 8]) == " ▂█"
    assert len(sparkline(list(range(1440)), width=72)) == 72
    svg = throughput_svg({"step": 60, "minutes": [[60, 0, 0], [120, 100, 300], [180, 0, 50]]})
    assert 'data-peak="400"' in svg and 'data-total-in="100"' in svg and 'data-total-out="350"' in svg
    assert svg.count('class="minute"') == 2 and 'data-minute="120" data-in="100" data-out="300"' in svg
    assert "<script" not in svg and "http://" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")


# --------------------------------------------------------------------------- pairing and stalls


class FakeExchange(SimpleNamespace):
    pass


def fake_client(peer: str) -> SimpleNamespace:
    return SimpleNamespace(peer=peer, state=SimpleNamespace(data={}))


def rpc_request(method: str, authorization: str | None = None) -> object:
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    return parse_request_head(f"{method} /rpc/rpcproxy.dll?EXCH.lab.local:6001 HTTP/1.1\r\nHost: b\r\n{auth}Content-Length: 1073741824\r\n\r\n".encode())


def exchange() -> FakeExchange:
    import time

    return FakeExchange(bytes_in=0, bytes_out=0, upstream="127.0.0.1:443", status=0, started=time.monotonic())


def test_the_opening_reader_finds_the_cookie_in_pieces_and_gives_up_on_other_bodies():
    cookie = uuid.uuid4()
    a1 = rts.conn_a1(cookie, uuid.uuid4())
    reader = OpeningReader()
    for index in range(0, 70, 7):  # seven bytes at a time, then the rest with more behind it
        assert reader.feed(a1[index : index + 7])
    assert not reader.feed(a1[70:] + b"\x05\x00\x00\x03" * 400)
    assert reader.result == ("CONN/A1", cookie.hex) and reader.data == b""
    b1 = rts.conn_b1(cookie, uuid.uuid4(), uuid.uuid4())
    reader = OpeningReader()
    assert not reader.feed(b1)
    assert reader.result == ("CONN/B1", cookie.hex)
    other = OpeningReader()
    assert not other.feed(b"\0" * 76)  # the lab's sink and source bodies, a plain upload
    assert other.result is None and other.done
    ping = OpeningReader()
    assert not ping.feed(rts.ping())  # an RTS PDU, but not an opening
    assert ping.result is None


def test_channels_pair_by_cookie_across_connections_else_by_client_connection(caplog):
    now = [1000.0]
    view = TrafficView(stall_after=60, clock=lambda: now[0])
    alice = "Basic " + base64.b64encode(b"LAB\\alice:pw").decode()
    cookie = uuid.uuid4()
    out_client, in_client, plain_client = fake_client("192.0.2.1"), fake_client("192.0.2.1"), fake_client("192.0.2.9")
    out_ex, in_ex, plain_ex = exchange(), exchange(), exchange()
    view.begin(rpc_request("RPC_OUT_DATA", alice), out_ex, out_client)
    view.begin(rpc_request("RPC_IN_DATA", alice), in_ex, in_client)
    view.begin(rpc_request("RPC_IN_DATA", "Basic " + base64.b64encode(b"bob:pw").decode()), plain_ex, plain_client)
    view.opening_observer(out_ex)(rts.conn_a1(cookie, uuid.uuid4()))
    view.opening_observer(in_ex)(rts.conn_b1(cookie, uuid.uuid4(), uuid.uuid4()))
    view.opening_observer(plain_ex)(b"\0" * 100)
    for second in range(1, 121):
        now[0] = 1000.0 + second
        out_ex.bytes_out += 10_000
        if second <= 30:
            in_ex.bytes_in += 1000
        view.tick()
    pairs = pair_channels(view.report()["channels"])
    assert len(pairs) == 2
    vc = next(pair for pair in pairs if pair["paired_by"] == "cookie")
    assert vc["pair"] == f"vc:{cookie.hex}" and vc["user"] == "LAB\\alice"
    assert [c["direction"] for c in vc["in"]] == ["IN"] and [c["direction"] for c in vc["out"]] == ["OUT"]
    out = vc["out"][0]
    assert out["rate"] == pytest.approx(10_000) and out["bytes"] == 1_200_000 and not out["stalled"]
    inbound = vc["in"][0]
    assert inbound["rate"] == 0 and inbound["idle_seconds"] == 90 and inbound["stalled"]  # none for 90 s > 60 s
    plain = next(pair for pair in pairs if pair["paired_by"] == "connection")
    assert plain["user"] == "bob" and plain["in"][0]["stalled"]
    assert view.stalls_total == 2
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING and "stalled" in record.getMessage()]
    assert len(warnings) == 2  # once per channel, not once per tick
    # A byte moves: no longer stalled; a second stall is counted but not logged again.
    in_ex.bytes_in += 1
    now[0] += 1
    view.tick()
    assert not next(c for c in view.report()["channels"] if c["id"] == inbound["id"])["stalled"]
    now[0] += 61
    caplog.clear()
    view.tick()
    assert view.stalls_total == 4 and not [r for r in caplog.records if "stalled" in r.getMessage() and "IN" in r.getMessage() and "LAB" in r.getMessage()]
    # Ends: the totals per user are exact, counted live and at the end without double counting.
    out_ex.bytes_out += 5
    for ex, client in ((out_ex, out_client), (in_ex, in_client), (plain_ex, plain_client)):
        view.end(rpc_request("RPC_IN_DATA"), ex, client)
    assert view.users == {"LAB\\alice": [30_001, 1_200_005]}  # bob's channel moved nothing
    assert not view.channels


def test_ntlm_logon_names_the_user_of_later_requests_on_the_connection(ntlm_tokens):
    view = TrafficView()
    client = fake_client("198.51.100.7")
    _, _, authenticate = ntlm_tokens
    first = exchange()
    view.begin(rpc_request("RPC_OUT_DATA", "NTLM " + base64.b64encode(ntlm_tokens[0]).decode()), first, client)
    first.bytes_out, first.status = 341, 401
    view.end(rpc_request("RPC_OUT_DATA", "NTLM " + base64.b64encode(ntlm_tokens[0]).decode()), first, client)
    second = exchange()
    view.begin(rpc_request("RPC_OUT_DATA", "NTLM " + base64.b64encode(authenticate).decode()), second, client)
    second.bytes_out = 1000
    view.end(rpc_request("RPC_OUT_DATA", "NTLM " + base64.b64encode(authenticate).decode()), second, client)
    third = exchange()
    view.begin(rpc_request("RPC_IN_DATA"), third, client)  # no header: the connection's logon
    third.bytes_in = 500
    view.end(rpc_request("RPC_IN_DATA"), third, client)
    assert view.users == {"-": [0, 341], "LAB\\alice": [500, 1000]}
    assert not view.failed  # a challenge is a handshake step, not a failed logon
    wrong = exchange()
    wrong.status = 401
    request = rpc_request("RPC_IN_DATA", "Basic " + base64.b64encode(b"mallory:guess").decode())
    view.begin(request, wrong, fake_client("203.0.113.5"))
    view.end(request, wrong, fake_client("203.0.113.5"))
    assert dict(view.failed) == {("203.0.113.5", "mallory"): 1}
    assert "mallory" not in view.users  # a refused logon's bytes belong to nobody


def test_merged_worker_reports_pair_a_virtual_connection_split_over_two_workers():
    def report(channels, users, stalls=0, first=None):
        return {"channels": channels, "users": users, "failed": [["192.0.2.1", "x", 1]], "first_forwarded": first, "last_forwarded": first, "stalls_total": stalls}

    channel = {"id": 1, "pair": "vc:ab", "paired_by": "cookie", "direction": "IN", "client": "c", "user": "u", "opened": 1.0}
    merged = merge_reports(
        [
            ("w0:", report([channel, dict(channel, id=2, pair="conn:1", paired_by="connection")], {"u": [1, 2]}, 1, 5.0)),
            ("w1:", report([dict(channel, direction="OUT"), dict(channel, id=2, pair="conn:1", paired_by="connection")], {"u": [10, 20], "v": [0, 3]}, 2, 3.0)),
        ]
    )
    assert merged["users"] == {"u": [11, 22], "v": [0, 3]} and merged["stalls_total"] == 3
    assert merged["failed"] == [["192.0.2.1", "x", 2]] and merged["first_forwarded"] == 3.0 and merged["last_forwarded"] == 5.0
    pairs = pair_channels(merged["channels"])
    assert sorted(pair["pair"] for pair in pairs) == ["vc:ab", "w0:conn:1", "w1:conn:1"]
    assert [len(pairs[0]["in"]), len(pairs[0]["out"])] == [1, 1]


# --------------------------------------------------------------------------- the ledger and the report


def test_the_ledger_adds_gains_per_day_survives_a_restart_and_holds_no_credentials(tmp_path):
    day_one = 1_750_000_000.0
    ledger = Ledger.load(tmp_path)
    ledger.start_run(day_one, "bridge.example.com")
    ledger.observe({"users": {"LAB\\alice": [100, 1000]}, "failed": [["192.0.2.1", "mallory", 2]], "first_forwarded": day_one - 5, "last_forwarded": day_one}, day_one)
    ledger.observe({"users": {"LAB\\alice": [150, 1500]}, "failed": [["192.0.2.1", "mallory", 3]], "first_forwarded": day_one - 5, "last_forwarded": day_one + 9}, day_one + 10)
    ledger.observe_bans({"192.0.2.1": SimpleNamespace(since=day_one, until=day_one + 3600, reason="3 failed logons in 600 s", failures=3)})
    ledger.save(day_one + 10, ended=True)
    # A restart: the process's counters begin at zero again; the ledger continues.
    again = Ledger.load(tmp_path)
    again.start_run(day_one + 86400, "bridge.example.com")
    again.observe({"users": {"LAB\\alice": [7, 70], "bob": [1, 1]}, "failed": [], "first_forwarded": day_one + 86400, "last_forwarded": day_one + 86401}, day_one + 86401)
    again.save(day_one + 86401)
    data = read_ledger(tmp_path / "ledger.json")
    assert list(data["days"]) == ["2025-06-15", "2025-06-16"]
    assert again.user_totals() == {"LAB\\alice": [157, 1570], "bob": [1, 1]}
    report = build_report(data)
    assert report["total"] == {"bytes_in": 158, "bytes_out": 1571, "bytes": 1729}
    assert report["window"] == {"first_forwarded": "2025-06-15T15:06:35+00:00", "last_forwarded": "2025-06-16T15:06:41+00:00"}
    assert report["failed_logons_total"] == 3 and report["days"][0]["failed_logons"] == 3
    assert report["bans"][0]["address"] == "192.0.2.1" and len(report["runs"]) == 2 and report["runs"][0]["ended"]
    text = json.dumps(data) + render_html(report)
    assert "password" not in json.dumps(data).lower().replace("no passwords", "")
    assert "no credentials" in report["statement"] and "<script" not in text
    assert (tmp_path / "ledger.json").stat().st_mode & 0o777 == 0o600


def test_an_unreadable_ledger_is_kept_aside_and_a_new_one_begins(tmp_path):
    (tmp_path / "ledger.json").write_text("{not json")
    data = read_ledger(tmp_path / "ledger.json")
    assert data["days"] == {} and list(tmp_path.glob("ledger.json.unreadable-*"))
