"""Pure logic of the Outlook Anywhere lab and preflight check: the lab's virtual connection answers
(bridge.lab.rpch, sans-IO) and the preflight's judgement of a virtual connection's steps."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from bridge.config import LegacyServer
from bridge.lab import rpch
from bridge.preflight.checks import Settings, evaluate_outlook_anywhere, planned_checks
from bridge.preflight.probe import Credentials, Step, VirtualConnectionProbe
from bridge.protocol import rts

COOKIE = uuid.UUID("11111111-2222-3333-4444-555555555555")
IN_COOKIE = uuid.UUID("66666666-2222-3333-4444-555555555555")


def vc_for(port: int, **kwargs) -> rpch.VirtualConnection:
    vc = rpch.VirtualConnection(f"EXCH2007.lab.local:{port}", COOKIE, port, **kwargs)
    vc.in_channel_cookie = IN_COOKIE
    return vc


def answers(vc: rpch.VirtualConnection, pdu: bytes) -> list[rts.Pdu]:
    return [rts.parse(item.pdu) for item in vc.on_in_pdu(pdu)]


# --------------------------------------------------------------------------- the lab, sans-IO


def test_openings_are_recognised_only_when_exact():
    a1 = rts.conn_a1(COOKIE, IN_COOKIE)
    b1 = rts.conn_b1(COOKIE, IN_COOKIE, uuid.uuid4())
    assert rpch.opening_length(a1[:20]) == 76 and rpch.opening_of(a1) == "CONN/A1"
    assert rpch.opening_length(b1[:20]) == 104 and rpch.opening_of(b1) == "CONN/B1"
    assert rpch.opening_of(rts.conn_a3()) is None  # an RTS PDU, but not one a client opens with
    assert rpch.opening_length(b"\x00" * 20) is None  # the lab's payload starts with a block index
    assert rpch.opening_length(rts.ping()[:19]) is None
    assert rpch.target_port("EXCH2007.lab.local:6004") == 6004 and rpch.target_port("") is None


@pytest.mark.parametrize(
    ("port", "accepted", "refused"),
    [
        (6001, [rts.EMSMDB], [rts.NSPI, rts.RFR]),
        (6002, [rts.RFR], [rts.EMSMDB, rts.NSPI]),
        (6004, [rts.NSPI, rts.RFR], [rts.EMSMDB]),
    ],
)
def test_binds_follow_exchange_2007_ports(port, accepted, refused):
    vc = vc_for(port)
    for call_id, syntax in enumerate(accepted + refused, start=1):
        (ack,) = answers(vc, rts.bind(call_id, syntax, context_id=call_id))
        assert isinstance(ack, rts.BindAck) and ack.secondary_address == str(port)
        assert ack.results[0].accepted == (syntax in accepted)
    assert sorted(vc.binds) == sorted(rpch.INTERFACE_NAMES[s] for s in accepted)
    assert vc.stats.get("bind_refusals", 0) == len(refused)


def test_refuse_bind_answers_bind_nak():
    vc = vc_for(6001, refuse_bind=True)
    (nak,) = answers(vc, rts.bind(1, rts.EMSMDB))
    assert isinstance(nak, rts.BindNak) and nak.call_id == 1
    assert vc.stats["bind_refusals"] == 1 and not vc.binds


def test_calls_dummy_echo_unknown_and_unbound():
    vc = vc_for(6001)
    answers(vc, rts.bind(1, rts.EMSMDB, context_id=0))
    (dummy,) = answers(vc, rts.request(2, rts.OPNUM_EC_DUMMY_RPC))
    assert isinstance(dummy, rts.Response) and dummy.stub == b"\x00" * 4 and dummy.call_id == 2
    (echo,) = answers(vc, rts.request(3, rpch.LAB_ECHO_OPNUM, b"hello"))
    assert isinstance(echo, rts.Response) and echo.stub == b"hello"
    (unknown,) = answers(vc, rts.request(4, 99))
    assert isinstance(unknown, rts.Fault) and unknown.status == rts.NCA_S_OP_RNG_ERROR
    (unbound,) = answers(vc, rts.request(5, rts.OPNUM_EC_DUMMY_RPC, context_id=7))
    assert isinstance(unbound, rts.Fault) and unbound.status == rts.NCA_S_UNK_IF
    assert vc.stats["calls"] == 4


def test_large_echo_is_fragmented_to_the_clients_max_recv_frag_and_reassembles():
    vc = vc_for(6001)
    client = rts.ClientVirtualConnection()
    client.feed_out(rts.conn_a3() + rts.conn_c2())
    bind = rts.Bind(1, (rts.PresentationContext(0, rts.EMSMDB),), max_xmit_frag=4280, max_recv_frag=4280).encode()
    answers(vc, bind)
    stub = bytes(range(256)) * 256  # 64 KiB
    # The request arrives in fragments too, as impacket sends it.
    pieces = [stub[i : i + 4000] for i in range(0, len(stub), 4000)]
    pdus = []
    for index, piece in enumerate(pieces):
        flags = (rts.PFC_FIRST_FRAG if index == 0 else 0) | (rts.PFC_LAST_FRAG if index == len(pieces) - 1 else 0)
        pdus.append(rts.Request(2, rpch.LAB_ECHO_OPNUM, piece, pfc_flags=flags).encode())
    out = [item for pdu in pdus for item in vc.on_in_pdu(pdu)]
    responses = [item.pdu for item in out if item.pdu[2] == rts.PTYPE_RESPONSE]
    assert len(responses) > 1 and all(len(pdu) <= 4280 for pdu in responses)
    events = client.feed_out(b"".join(responses))
    assert [e for e in events if isinstance(e, rts.ResponseReceived)] == [rts.ResponseReceived(2, stub, 0)]
    # 64 KiB of IN data passed half the 64 KiB IN window: the lab acknowledged it on the OUT channel.
    acks = [rts.classify(item.pdu) for item in out if item.pdu[2] == rts.PTYPE_RTS]
    assert acks == ["FlowControlAck"] and vc.stats["flow_control_acks_sent"] == 1


def test_slow_echo_comes_in_pieces_with_pauses():
    vc = vc_for(6001)
    answers(vc, rts.bind(1, rts.EMSMDB))
    out = vc.on_in_pdu(rts.request(2, rpch.LAB_SLOW_ECHO_OPNUM, b"x" * 400))
    assert len(out) == rpch.SLOW_FRAGMENTS and all(item.slow for item in out)
    assert [item.pause for item in out] == [0.0] + [rpch.SLOW_PAUSE] * (rpch.SLOW_FRAGMENTS - 1)
    flags = [rts.parse_header(item.pdu).pfc_flags for item in out]
    assert flags[0] & rts.PFC_FIRST_FRAG and flags[-1] & rts.PFC_LAST_FRAG and not flags[1] & (rts.PFC_FIRST_FRAG | rts.PFC_LAST_FRAG)


def test_fragment_without_first_is_a_protocol_error():
    vc = vc_for(6001)
    with pytest.raises(rts.RpcProtocolError, match="without its first fragment"):
        vc.on_in_pdu(rts.Request(9, 0, b"x", pfc_flags=rts.PFC_LAST_FRAG).encode())


def test_client_acks_and_pings_on_the_in_channel():
    vc = vc_for(6001)
    assert vc.on_in_pdu(rts.flow_control_ack(5000, 262144, uuid.uuid4(), rts.FD_OUT_PROXY)) == []
    assert vc.on_in_pdu(rts.ping()) == []
    assert vc.out_acked == 5000 and vc.stats["flow_control_acks_received"] == 1 and vc.stats["pings_received"] == 1


def test_out_window_blocks_until_the_client_acknowledges():
    async def scenario() -> None:
        vc = vc_for(6001)
        vc.out_window = 1000
        vc.out_sent = 900
        waiter = asyncio.ensure_future(vc.wait_for_window(200))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        vc.on_in_pdu(rts.flow_control_ack(900, 1000, uuid.uuid4(), rts.FD_OUT_PROXY))
        await asyncio.wait_for(waiter, 1)
        await asyncio.wait_for(vc.wait_for_window(900), 1)  # nothing outstanding: never blocks

    asyncio.run(scenario())


def test_table_pairs_channels_by_target_and_cookie():
    async def scenario() -> None:
        table = rpch.VirtualConnectionTable()
        vc, paired = table.attach("S:6001", COOKIE, "in", None, refuse_bind=False)
        assert not paired and not vc.paired.is_set()
        other, paired_other = table.attach("S:6004", COOKIE, "out", None, refuse_bind=False)
        assert other is not vc and not paired_other  # another port is another virtual connection
        same, paired = table.attach("s:6001", COOKIE, "out", None, refuse_bind=False)
        assert same is vc and paired and vc.paired.is_set()
        with pytest.raises(ValueError):
            table.attach("S:6001", COOKIE, "out", None, refuse_bind=False)
        table.detach(vc)
        assert vc.ended and ("s:6001", COOKIE) not in table.connections

    asyncio.run(scenario())


# --------------------------------------------------------------------------- the preflight's judgement


def steps(*names: str, failed: Step | None = None) -> list[Step]:
    done = [Step(name, True, 1.0, "ok") for name in names]
    return done + ([failed] if failed else [])


HAPPY = ("out_channel", "in_channel", "conn_a3", "conn_c2", "bind")


def probes(emsmdb: list[Step] | None = None, nspi: list[Step] | None = None, rfr: list[Step] | None = None, in_continued: bool = True) -> list[VirtualConnectionProbe]:
    return [
        VirtualConnectionProbe(6001, "EMSMDB", True, emsmdb or steps(*HAPPY, "call", "close"), in_continued),
        VirtualConnectionProbe(6004, "NSPI", True, nspi or steps(*HAPPY, "close"), in_continued),
        VirtualConnectionProbe(6002, "RFR", False, rfr or steps(*HAPPY, "close"), in_continued),
    ]


def evaluate(found: list[VirtualConnectionProbe]):
    return evaluate_outlook_anywhere("EXCH2007.lab.local", "ntlm", found, 0.05)


def test_all_connections_working_pass():
    status, summary, details, fix = evaluate(probes())
    assert status == "pass" and fix == ""
    assert "EMSMDB on 6001 bound and answered EcDummyRpc" in summary and "NSPI on 6004 bound" in summary
    assert details["outcome"] == "ok" and details["binds"] == {"6001 EMSMDB": "accepted", "6004 NSPI": "accepted", "6002 RFR": "accepted"}
    assert [step["step"] for step in details["channels"]["6001"]["steps"]] == list(HAPPY) + ["call", "close"]


def test_rfr_alone_failing_warns():
    rfr = steps("out_channel", "in_channel", "conn_a3", "conn_c2", failed=Step("bind", False, 1, "RFR rejected", "rejected"))
    status, summary, details, fix = evaluate(probes(rfr=rfr))
    assert status == "warn" and "RFR on EXCH2007.lab.local:6002 failed at the bind" in summary
    assert details["binds"]["6002 RFR"] == "rejected" and "migration does not need it" in fix


@pytest.mark.parametrize(
    ("failed", "in_continued", "summary_words", "fix_words"),
    [
        (Step("out_channel", False, 1, "answered 503 instead of 200", "http", 503), True, ["opening the OUT channel", "503"], ["ValidPorts"]),
        (Step("in_channel", False, 1, "answered 401 instead of 100 Continue", "http", 401), None, ["opening the IN channel"], ["Set-OutlookAnywhere -ClientAuthenticationMethod Ntlm", "IN channel"]),
        (Step("conn_a3", False, 1, "no CONN/A3 within --timeout 5 s", "timeout"), True, ["waiting for CONN/A3"], ["buffers", "did get its 100 Continue"]),
        (Step("conn_c2", False, 1, "the RPC_OUT_DATA channel was closed after 28 bytes before CONN/C2", "closed"), True, ["closed after 28 bytes"], ["closed early", "idle-timeout"]),
        (Step("conn_c2", False, 1, "no CONN/C2 within --timeout 5 s", "timeout"), False, ["CONN/C2"], ["CONN/B1", "got no 100 Continue"]),
        (Step("in_channel", False, 1, "no 100 Continue (nor any answer) to RPC_IN_DATA within the timeout", "timeout"), None, ["IN channel"], ["100 Continue"]),
        (Step("bind", False, 1, "bind_nak (reason 0) for EMSMDB", "bind_nak"), True, ["the bind", "bind_nak"], ["EMSMDB interface is not reachable", "MSExchangeIS", "6001"]),
        (Step("call", False, 1, "opnum 6 answered fault 0x1c010002", "fault"), True, ["EcDummyRpc"], ["event log"]),
    ],
)
def test_the_failing_step_is_named_with_its_fix(failed, in_continued, summary_words, fix_words):
    before = HAPPY[: HAPPY.index(failed.name)] if failed.name in HAPPY else HAPPY
    status, summary, details, fix = evaluate(probes(emsmdb=steps(*before, failed=failed), in_continued=in_continued))
    assert status == "fail" and summary.startswith("Outlook Anywhere: EMSMDB on EXCH2007.lab.local:6001 failed at")
    for word in summary_words:
        assert word in summary, (word, summary)
    for word in fix_words:
        assert word in fix, (word, fix)
    assert details["channels"]["6001"]["failed_step"] == failed.name
    assert details["outcome"] == f"6001 EMSMDB: {failed.name} {failed.problem}"


def test_an_http_timeout_opening_a_channel_is_left_to_the_timeout_fix():
    failed = Step("out_channel", False, 1, "no HTTP answer to RPC_OUT_DATA /rpc/rpcproxy.dll (no answer within the timeout)", "timeout")
    _, _, details, _ = evaluate(probes(emsmdb=[failed]))
    assert "no answer within the timeout" in details["error"]  # Preflight.size_timeout_fixes keys on this


def test_planned_on_both_sides_with_credentials_only():
    with_credentials = Settings(LegacyServer("exch", 443), fqdn="bridge.example", credentials=Credentials("a@b", "B\\a", "x"))
    ids = [check_id for check_id, _ in planned_checks(with_credentials)]
    assert ids.index("legacy.outlook_anywhere") == ids.index("legacy.rpc.6004") + 1
    assert "bridge.outlook_anywhere" in ids
    without = [check_id for check_id, _ in planned_checks(Settings(LegacyServer("exch", 443), fqdn="bridge.example"))]
    assert not any("outlook_anywhere" in check_id for check_id in without)


# --------------------------------------------------------------------------- the channel's body framing


def read_all(response: bytes) -> tuple[bytes, str]:
    """The OUT channel's body bytes from a whole response (head and body), and how reading ended."""
    from bridge.preflight.probe import HttpConnection, HttpTarget, RpcChannel

    async def scenario() -> tuple[bytes, str]:
        reader = asyncio.StreamReader()
        reader.feed_data(response)
        reader.feed_eof()
        connection = HttpConnection(HttpTarget("127.0.0.1", 443, "", "exch", None, 5.0), reader, None)  # type: ignore[arg-type]
        channel = RpcChannel(connection, "RPC_OUT_DATA")
        channel.follow(await connection.read_head())
        data = b""
        while True:
            try:
                data += await channel.read()
            except Exception as exc:  # noqa: BLE001 - the end of the body is the point
                return data, str(exc)

    return asyncio.run(scenario())


def out_head(framing: str) -> bytes:
    return f"HTTP/1.1 200 Success\r\nContent-Type: application/rpc\r\n{framing}\r\n\r\n".encode()


def test_out_channel_body_with_content_length_stops_at_its_end():
    pdus = rts.conn_a3() + rts.conn_c2()
    data, end = read_all(out_head(f"Content-Length: {len(pdus)}") + pdus + b"HTTP/1.1 200 next")
    assert data == pdus and "ended after 72 bytes" in end


def test_out_channel_body_re_chunked_by_a_proxy_is_still_read():
    pdus = rts.conn_a3() + rts.conn_c2()
    raw = b"1c\r\n" + pdus[:28] + b"\r\n" + f"{len(pdus) - 28:x}\r\n".encode() + pdus[28:] + b"\r\n0\r\n\r\n"
    data, end = read_all(out_head("Transfer-Encoding: chunked") + raw)
    assert data == pdus and "ended" in end


def test_out_channel_closed_mid_body_says_how_much_came():
    data, end = read_all(out_head(f"Content-Length: {rpch.OUT_CHANNEL_CONTENT_LENGTH}") + rts.conn_a3())
    assert data == rts.conn_a3() and "closed after 28 bytes" in end
