"""Outlook Anywhere end to end on 127.0.0.1: impacket's real RPC over HTTP v2 client (ncacn_http
through an RPC proxy) and the preflight's outlook_anywhere check, against the lab directly and through
an in-process bridge, over real TLS with real NTLM and Basic.

Self-contained: only bridge.*, pytest and impacket. impacket's TLS client is OpenSSL's default
context without verification; on the project's machine it reaches even the TLS-1.0-only lab, but
whether it does depends on the system's OpenSSL policy, so the direct tests use the lab's
TLS-1.2-capable shape, and the bridge sits in front of the TLS-1.0 lab as it would in front of
Exchange 2007.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from typing import Any

import pytest
from impacket import ntlm as impacket_ntlm
from impacket.dcerpc.v5 import transport as impacket_transport
from impacket.dcerpc.v5.rpcrt import DCERPCException
from impacket.http import AUTH_BASIC
from impacket.uuid import uuidtup_to_bin

from bridge.certs.keys import LocalCA, cert_pem, new_private_key, write_pair
from bridge.config import BridgeConfig, LegacyServer
from bridge.lab import rpch
from bridge.lab.server import Lab, LabOptions, start_lab
from bridge.preflight.checks import (
    Report,
    Settings,
    evaluate_outlook_anywhere,
    run_preflight,
)
from bridge.preflight.probe import (
    Credentials,
    HttpTarget,
    legacy_client,
    probe_virtual_connection,
)
from bridge.protocol import rts
from bridge.runtime.app import start_bridge

SERVER = "EXCH2007.lab.local"
BRIDGE_FQDN = "bridge.lab.test"
USERS = {"LAB\\alice": "Passw0rd!", "LAB\\bob": "B0b-second-user!"}
EMSMDB = uuidtup_to_bin(("a4f1db00-ca47-1067-b31f-00dd010662da", "0.81"))
TIMEOUT = 5.0


# --------------------------------------------------------------------------- labs and a bridge on one loop


class Loop:
    """An event loop in a daemon thread: the labs and the bridge live there, clients block elsewhere."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="oa-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def loop():
    running = Loop()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def labs(loop, tmp_path_factory):
    state = tmp_path_factory.mktemp("oa-lab")
    started: dict[str, Lab] = {}

    def lab(name: str, **options: Any) -> Lab:
        if name not in started:
            started[name] = loop.run(start_lab(LabOptions(state_dir=state, users=dict(USERS), **options)))
        return started[name]

    yield lab
    for lab_ in started.values():
        loop.run(lab_.close())


@pytest.fixture(scope="module")
def lab12(labs) -> Lab:
    return labs("tls12", tls_max="1.2")


@pytest.fixture(scope="module")
def lab10(labs) -> Lab:
    return labs("tls10")


@pytest.fixture(scope="module")
def bridge(loop, lab10, tmp_path_factory):
    """A bridge (bridge.runtime.app.start_bridge) in front of the TLS 1.0 lab, certificate from a LocalCA."""
    directory = tmp_path_factory.mktemp("oa-bridge")
    ca = LocalCA.create()
    key = new_private_key("ecdsa-p256")
    cert, key_path = write_pair(directory, ca.issue([BRIDGE_FQDN], key), key)
    config = BridgeConfig(
        fqdn=BRIDGE_FQDN, legacy=[LegacyServer("127.0.0.1", lab10.port)], bind="127.0.0.1", https_port=0, http_port=0, cert=cert, key=key_path, state_dir=directory / "state", status_bind="off"
    )
    running = loop.run(start_bridge(config))
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(cert_pem(ca.cert))
    running.ca_bundle = ca_path  # type: ignore[attr-defined]
    yield running
    loop.run(running.close())


@pytest.fixture
def lab_names(monkeypatch):
    """*.lab.test resolves to 127.0.0.1 in this process (so clients send the bridge's name as SNI)."""
    original = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        return original("127.0.0.1" if isinstance(host, str) and host.endswith(".lab.test") else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(autouse=True)
def windows_shaped_ntlmv2(monkeypatch):
    """impacket's NTLMv2 response omits the Z(4) that [MS-NLMP] 3.3.2 puts after the AV pairs (Windows
    sends it; Windows servers hash the blob as sent, so they accept impacket's either way). The lab's
    acceptor, pyspnego, re-serialises the blob and so refuses impacket's shape: give it the Windows one."""
    original = impacket_ntlm.AV_PAIRS.getData
    monkeypatch.setattr(impacket_ntlm.AV_PAIRS, "getData", lambda self: original(self) + b"\x00" * 4)


# --------------------------------------------------------------------------- impacket as the client


def route_url(route: str, lab12: Lab, bridge: Any) -> str:
    return lab12.url if route == "direct" else f"https://{BRIDGE_FQDN}:{bridge.https_port}"


def connect(base_url: str, user: str, auth: str, port: int = rts.PORT_EMSMDB) -> Any:
    """impacket's ncacn_http transport through the RPC proxy at base_url, bound to EMSMDB."""
    transport = impacket_transport.HTTPTransport(SERVER, port)
    transport.set_rpc_proxy_url(f"{base_url}/rpc/rpcproxy.dll?{SERVER}:{port}")
    domain, _, name = user.partition("\\")
    transport.set_credentials(name, USERS[user], domain)
    if auth == "basic":
        transport.set_auth_type(AUTH_BASIC)
    dce = transport.get_dce_rpc()
    dce.connect()
    for sock in (transport.get_socket_in(), transport.get_socket_out()):
        sock.settimeout(TIMEOUT)
    try:
        dce.bind(EMSMDB)
    except BaseException:
        transport.disconnect()
        raise
    return dce


def echo(dce: Any, stub: bytes, opnum: int = rpch.LAB_ECHO_OPNUM) -> bytes:
    dce.call(opnum, stub)
    return dce.recv()


def events(lab: Lab) -> dict[str, int]:
    return dict(lab.counters.rpc_events)


@pytest.mark.parametrize("auth", ["ntlm", "basic"])
@pytest.mark.parametrize("route", ["direct", "bridge"])
def test_impacket_binds_and_makes_calls_of_mixed_sizes(route, auth, lab12, lab10, bridge, lab_names):
    lab = lab12 if route == "direct" else lab10
    before_events, before_vcs = events(lab), lab.counters.rpc_virtual_connections
    before_binds = lab.counters.rpc_binds.get("EMSMDB", 0)
    dce = connect(route_url(route, lab12, bridge), "LAB\\alice", auth)
    try:
        assert echo(dce, b"", rts.OPNUM_EC_DUMMY_RPC) == b"\x00\x00\x00\x00"  # EcDummyRpc
        rng = random.Random(f"{route}-{auth}")
        sizes = [100, 64 * 1024, 4280, 4281, 5840] + [rng.randint(100, 64 * 1024) for _ in range(25)]
        for index, size in enumerate(sizes):
            stub = rng.randbytes(size)
            assert echo(dce, stub) == stub, (index, size)
    finally:
        dce.get_rpc_transport().disconnect()
    after = events(lab)
    assert lab.counters.rpc_virtual_connections == before_vcs + 1
    assert lab.counters.rpc_binds["EMSMDB"] == before_binds + 1
    assert after["calls"] - before_events.get("calls", 0) == 1 + len(sizes)
    # Over 256 KiB went each way: impacket acknowledged the OUT channel, the lab the IN channel.
    assert after.get("flow_control_acks_received", 0) > before_events.get("flow_control_acks_received", 0)
    assert after.get("flow_control_acks_sent", 0) > before_events.get("flow_control_acks_sent", 0)
    wait_for(lambda: lab.counters.rpc_virtual_connections_open == 0)


@pytest.mark.parametrize("route", ["direct", "bridge"])
def test_two_users_at_once_get_only_their_own_answers(route, lab12, lab10, bridge, lab_names):
    lab = lab12 if route == "direct" else lab10
    url = route_url(route, lab12, bridge)
    barrier = threading.Barrier(2)
    errors: list[str] = []

    def session(user: str, auth: str) -> None:
        try:
            dce = connect(url, user, auth)
            try:
                barrier.wait(TIMEOUT)
                for index in range(20):
                    stub = f"{user}#{index}|".encode() * (1 + index * 150)
                    answer = echo(dce, stub)
                    if answer != stub:
                        errors.append(f"{user} call {index}: got {answer[:24]!r}...")
            finally:
                dce.get_rpc_transport().disconnect()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(f"{user}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=session, args=("LAB\\alice", "ntlm")), threading.Thread(target=session, args=("LAB\\bob", "basic"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    wait_for(lambda: lab.counters.rpc_virtual_connections_open == 0)


@pytest.mark.parametrize("route", ["direct", "bridge"])
def test_a_response_written_in_pieces_arrives_piece_by_piece(route, lab12, lab10, bridge, lab_names):
    lab = lab12 if route == "direct" else lab10
    dce = connect(route_url(route, lab12, bridge), "LAB\\alice", "ntlm")
    transport = dce.get_rpc_transport()
    stub = bytes(range(256)) * 16
    try:
        dce.call(rpch.LAB_SLOW_ECHO_OPNUM, stub)
        fragments, arrived = [], []
        while not fragments or not rts.parse_header(fragments[-1]).pfc_flags & rts.PFC_LAST_FRAG:
            fragments.append(transport.recv())  # one PDU of the OUT channel, as it arrives
            arrived.append(time.monotonic())
    finally:
        transport.disconnect()
    written = list(lab.counters.rpc_slow_writes)[-rpch.SLOW_FRAGMENTS :]
    assert len(fragments) == rpch.SLOW_FRAGMENTS
    assert b"".join(rts.parse_response(pdu).stub for pdu in fragments) == stub
    # The first fragment was at the client before the lab had written the last one.
    assert arrived[0] < written[-1] - rpch.SLOW_PAUSE, (arrived, written)
    print(f"\n{route}: first fragment after {arrived[0] - written[0]:.3f} s, last written {written[-1] - written[0]:.3f} s after the first")


def test_impacket_is_refused_the_bind_by_the_refusing_lab(labs):
    # (--close-out-early is not tried with impacket: its OUT channel reader loops forever on EOF.)
    refusing = labs("refuse12", tls_max="1.2", refuse_bind=True)
    with pytest.raises(DCERPCException):
        connect(refusing.url, "LAB\\alice", "ntlm")
    assert refusing.counters.rpc_events.get("bind_refusals", 0) >= 1


# --------------------------------------------------------------------------- the preflight check


def settings_for(lab: Lab, **overrides: Any) -> Settings:
    settings = Settings(legacy=LegacyServer("127.0.0.1", lab.port), credentials=Credentials("alice@lab.test", "LAB\\alice", USERS["LAB\\alice"]), timeout=TIMEOUT, hold=0.0)
    for name, value in overrides.items():
        setattr(settings, name, value)
    return settings


def preflight(settings: Settings) -> tuple[Report, float]:
    started = time.monotonic()
    report = asyncio.run(run_preflight(settings))
    return report, time.monotonic() - started


def step_times(details: dict[str, Any]) -> str:
    return "; ".join(f"{port}: " + ", ".join(f"{s['step']} {s['ms']:.0f}" for s in channel["steps"]) for port, channel in details["channels"].items())


@pytest.mark.parametrize("auth", ["both", "basic"])
def test_preflight_opens_real_virtual_connections_on_the_legacy_side(auth, lab10):
    counters = lab10.counters
    binds_before = dict(counters.rpc_binds)
    vcs_before = counters.rpc_virtual_connections
    report, elapsed = preflight(settings_for(lab10, auth=auth))
    check = report.get("legacy.outlook_anywhere")
    assert check is not None and check.status == "pass", (check.summary if check else None, check.details if check else None)
    assert check.details["scheme"] == ("ntlm" if auth == "both" else "basic")
    assert check.details["binds"] == {"6001 EMSMDB": "accepted", "6004 NSPI": "accepted", "6002 RFR": "accepted"}
    assert [s["step"] for s in check.details["channels"]["6001"]["steps"]] == ["out_channel", "in_channel", "conn_a3", "conn_c2", "bind", "call", "close"]
    assert counters.rpc_virtual_connections == vcs_before + 3
    assert all(counters.rpc_binds.get(name, 0) == binds_before.get(name, 0) + 1 for name in ("EMSMDB", "NSPI", "RFR"))
    print(f"\nlegacy-side preflight against the lab ({auth}): {elapsed:.3f} s; outlook_anywhere {check.details['duration_ms']:.0f} ms ({step_times(check.details)})")
    assert elapsed < 1.0
    wait_for(lambda: counters.rpc_virtual_connections_open == 0)


def test_preflight_through_the_bridge(lab10, bridge, lab_names):
    report, elapsed = preflight(settings_for(lab10, fqdn=BRIDGE_FQDN, bridge_addr="127.0.0.1", https_port=bridge.https_port, http_port=bridge.http_port, ca_bundle=bridge.ca_bundle))
    direct, via = report.get("legacy.outlook_anywhere"), report.get("bridge.outlook_anywhere")
    assert direct is not None and via is not None
    assert direct.status == "pass" and via.status == "pass" and via.summary.startswith("same as direct"), via.summary
    assert via.details["through_bridge"] == {"outcome": "ok", "binds": direct.details["binds"]}
    print(f"\npreflight of both sides with the bridge: {elapsed:.3f} s; through the bridge outlook_anywhere {via.details['duration_ms']:.0f} ms ({step_times(via.details)})")


def test_preflight_names_the_refused_bind(labs):
    lab = labs("refuse10", refuse_bind=True)
    report, _ = preflight(settings_for(lab))
    check = report.get("legacy.outlook_anywhere")
    assert check is not None and check.status == "fail"
    assert check.details["channels"]["6001"]["failed_step"] == "bind" and check.details["binds"]["6001 EMSMDB"] == "bind_nak"
    assert "failed at the bind: bind_nak" in check.summary
    assert "EMSMDB interface is not reachable on EXCH2007.lab.local:6001" in check.fix and "MSExchangeIS" in check.fix
    assert report.get("legacy.rpc.6001").status == "pass"  # the echo cannot tell; the real connection does


def test_preflight_names_the_out_channel_closed_early(labs):
    lab = labs("close10", close_out_early=True)
    report, elapsed = preflight(settings_for(lab))
    check = report.get("legacy.outlook_anywhere")
    assert check is not None and check.status == "fail"
    channel = check.details["channels"]["6001"]
    failed = channel["steps"][-1]
    assert failed["step"] == "conn_c2" and failed["problem"] == "closed", channel
    assert "closed after 28 bytes" in failed["note"]  # CONN/A3 came, then the connection ended
    assert "closed early" in check.fix and "--idle-timeout" in check.fix and "did get its 100 Continue" in check.fix
    assert elapsed < 1.0


def test_probe_names_valid_ports_and_authentication(lab10):
    target = HttpTarget("127.0.0.1", lab10.port, "", f"127.0.0.1:{lab10.port}", legacy_client(), TIMEOUT)
    good = Credentials("alice@lab.test", "LAB\\alice", USERS["LAB\\alice"])

    async def probe(port: int, credentials: Credentials, scheme: str):
        return await probe_virtual_connection(target, SERVER, port, "EMSMDB", rts.EMSMDB, credentials, scheme)

    outside = asyncio.run(probe(6010, good, "ntlm"))
    assert outside.failed is not None and outside.failed.http_status == 503
    _, summary, _, fix = evaluate_outlook_anywhere(SERVER, "ntlm", [outside], 0.01)
    assert "503" in summary and "ValidPorts" in fix

    for scheme in ("ntlm", "basic"):
        refused = asyncio.run(probe(6001, Credentials("alice@lab.test", "LAB\\alice", "wrong"), scheme))
        assert refused.failed is not None and refused.failed.http_status == 401, refused.steps
        _, _, _, fix = evaluate_outlook_anywhere(SERVER, scheme, [refused], 0.01)
        assert f"Set-OutlookAnywhere -ClientAuthenticationMethod {'Ntlm' if scheme == 'ntlm' else 'Basic'}" in fix


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
