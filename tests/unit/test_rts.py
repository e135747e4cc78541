"""Unit tests of bridge.protocol.rts: RTS PDUs (MS-RPCH) and DCE/RPC connection-oriented PDUs.

Three kinds of check:
* byte-exact encodings written out by hand from [MS-RPCH] 2.2.3/2.2.4 and C706 12.6;
* round trips of every builder through the parsers, and the splitter under any chunking;
* a differential test against impacket (a real RPC over HTTP v2 client this project did not write):
  its CONN/A1, CONN/B1, FlowControlAckWithDestination and Ping builders, its RTS command structures,
  its MSRPCBind / MSRPCBindAck / MSRPCRequestHeader / MSRPCRespHeader encodings, its NSPI and RFR
  interface identifiers, and its RPCProxyClient handshake run against this module's server side
  (CONN/A3, CONN/C2, Ping, bind_ack) over in-memory sockets.
"""

from __future__ import annotations

import ipaddress
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.protocol import rts
from bridge.protocol.rts import (
    EMSMDB,
    NDR,
    NSPI,
    RFR,
    ClientVirtualConnection,
    PduReader,
    RpcProtocolError,
)

VC = uuid.UUID("11111111-2222-3333-4444-555555555555")
OUT = uuid.UUID("66666666-7777-8888-9999-aaaaaaaaaaaa")
IN = uuid.UUID("bbbbbbbb-cccc-dddd-eeee-ffffffffffff")
AG = uuid.UUID("01234567-89ab-cdef-0123-456789abcdef")


def rts_header(flags: int, count: int, frag_length: int) -> bytes:
    return bytes([5, 0, 20, 3, 0x10, 0, 0, 0]) + struct.pack("<HHIHH", frag_length, 0, 0, flags, count)


# --------------------------------------------------------------------------------------------------
# Byte-exact expectations, written from the spec


def test_conn_a1_bytes():
    expected = rts_header(0, 4, 76) + struct.pack("<II", 6, 1) + struct.pack("<I", 3) + VC.bytes_le + struct.pack("<I", 3) + OUT.bytes_le + struct.pack("<II", 0, 0x40000)
    assert rts.conn_a1(VC, OUT) == expected
    assert len(expected) == 76


def test_conn_b1_bytes():
    expected = (
        rts_header(0, 6, 104)
        + struct.pack("<II", 6, 1)
        + struct.pack("<I", 3)
        + VC.bytes_le
        + struct.pack("<I", 3)
        + IN.bytes_le
        + struct.pack("<II", 4, 0x40000000)
        + struct.pack("<II", 5, 300_000)
        + struct.pack("<I", 0xC)
        + AG.bytes_le
    )
    assert rts.conn_b1(VC, IN, AG) == expected


def test_conn_a3_and_c2_bytes():
    assert rts.conn_a3(900_000) == rts_header(0, 1, 28) + struct.pack("<II", 2, 900_000)
    assert rts.conn_c2(65536, 120_000) == rts_header(0, 3, 44) + struct.pack("<IIIIII", 6, 1, 0, 65536, 2, 120_000)


def test_cookie_is_the_little_endian_uuid_form():
    pdu = rts.conn_a1(uuid.UUID("00112233-4455-6677-8899-aabbccddeeff"), OUT)
    assert pdu[32:48] == bytes.fromhex("33221100554477668899aabbccddeeff")


def test_ping_bytes():
    assert rts.ping() == rts_header(1, 0, 20)


def test_bind_bytes_for_emsmdb():
    pdu = rts.bind(2, EMSMDB)
    expected = (
        bytes([5, 0, 11, 3, 0x10, 0, 0, 0])
        + struct.pack("<HHI", 72, 0, 2)
        + struct.pack("<HHIBBH", 5840, 5840, 0, 1, 0, 0)
        + struct.pack("<HBB", 0, 1, 0)
        + bytes.fromhex("00dbf1a447ca6710b31f00dd010662da")
        + struct.pack("<HH", 0, 81)
        + bytes.fromhex("045d888aeb1cc9119fe808002b104860")
        + struct.pack("<HH", 2, 0)
    )
    assert pdu == expected


def test_interface_identifiers():
    # [MS-OXCRPC]: EMSMDB a4f1db00-ca47-1067-b31f-00dd010662da version 0.81 (if_version 0x00510000).
    assert EMSMDB.encode()[16:] == struct.pack("<I", 0x00510000)
    assert str(EMSMDB) == "a4f1db00-ca47-1067-b31f-00dd010662da v0.81"
    assert str(NSPI) == "f5cc5a18-4264-101a-8c59-08002b2f8426 v56.0"
    assert str(RFR) == "1544f5e0-613c-11d1-93df-00c04fd7bd09 v1.0"
    assert str(NDR) == "8a885d04-1ceb-11c9-9fe8-08002b104860 v2.0"


def test_bind_ack_bytes_with_secondary_address_and_padding():
    pdu = rts.bind_ack(2, [rts.acceptance()], assoc_group_id=0x1234, secondary_address="6001")
    # 16 + 10 + 5 = 31: one pad byte brings the result list to offset 32.
    body = struct.pack("<HHIH", 5840, 5840, 0x1234, 5) + b"6001\x00" + b"\x00"
    body += struct.pack("<BBH", 1, 0, 0) + struct.pack("<HH", 0, 0) + NDR.encode()
    assert pdu == bytes([5, 0, 12, 3, 0x10, 0, 0, 0]) + struct.pack("<HHI", 16 + len(body), 0, 2) + body


def test_request_response_fault_bytes():
    assert rts.request(3, 6) == bytes([5, 0, 0, 3, 0x10, 0, 0, 0]) + struct.pack("<HHIIHH", 24, 0, 3, 0, 0, 6)
    assert rts.response(3, b"\x00" * 4) == (bytes([5, 0, 2, 3, 0x10, 0, 0, 0]) + struct.pack("<HHIIHBB", 28, 0, 3, 4, 0, 0, 0) + b"\x00" * 4)
    assert rts.fault(3, rts.NCA_S_OP_RNG_ERROR, did_not_execute=True) == (bytes([5, 0, 3, 0x23, 0x10, 0, 0, 0]) + struct.pack("<HHIIHBBII", 32, 0, 3, 0, 0, 0, 0, 0x1C010002, 0))


def test_bind_nak_bytes():
    assert rts.bind_nak(4, rts.NAK_PROTOCOL_VERSION_NOT_SUPPORTED) == (bytes([5, 0, 13, 3, 0x10, 0, 0, 0]) + struct.pack("<HHI", 24, 0, 4) + struct.pack("<HBBB", 4, 1, 5, 0) + b"\x00" * 3)


# --------------------------------------------------------------------------------------------------
# Round trips and recognisers


def test_handshake_round_trips_and_classify():
    a1 = rts.conn_a1(VC, OUT, 65536)
    b1 = rts.conn_b1(VC, IN, AG, channel_lifetime=0x20000, client_keepalive=60_000)
    a3 = rts.conn_a3(120_000)
    c2 = rts.conn_c2(8192, 14_400_000)
    assert [rts.classify(p) for p in (a1, b1, a3, c2)] == ["CONN/A1", "CONN/B1", "CONN/A3", "CONN/C2"]
    assert rts.parse_conn_a1(a1) == rts.ConnA1(1, VC, OUT, 65536)
    assert rts.parse_conn_b1(b1) == rts.ConnB1(1, VC, IN, 0x20000, 60_000, AG)
    assert rts.parse_conn_a3(a3) == rts.ConnA3(120_000)
    assert rts.parse_conn_c2(c2) == rts.ConnC2(1, 8192, 14_400_000)
    assert rts.classify(rts.ping()) == "Ping"
    assert rts.classify(rts.keep_alive(60_000)) == "KeepAlive"
    assert rts.classify(rts.flow_control_ack(1, 2, IN)) == "FlowControlAck"
    assert rts.classify(rts.flow_control_ack(1, 2, OUT, rts.FD_OUT_PROXY)) == "FlowControlAckWithDestination"
    assert rts.classify(rts.RtsPdu(rts.RTS_FLAG_ECHO).encode()) == "Echo"
    assert rts.classify(rts.RtsPdu(rts.RTS_FLAG_OUT_CHANNEL, (rts.Version(),)).encode()) == "RTS"


def test_the_wrong_handshake_pdu_is_refused_by_name():
    with pytest.raises(RpcProtocolError, match="expected a CONN/A1 RTS PDU but got CONN/B1"):
        rts.parse_conn_a1(rts.conn_b1(VC, IN, AG))
    with pytest.raises(RpcProtocolError, match="expected an RTS PDU but got a bind PDU"):
        rts.parse_conn_a3(rts.bind(1, NSPI))


ALL_COMMANDS = [
    rts.ReceiveWindowSize(0x10000),
    rts.FlowControlAck(123456, 65536, OUT),
    rts.ConnectionTimeout(120_000),
    rts.Cookie(VC),
    rts.ChannelLifetime(0x40000000),
    rts.ClientKeepalive(300_000),
    rts.Version(1),
    rts.Empty(),
    rts.Padding(b"\x00" * 7),
    rts.NegativeANCE(),
    rts.ANCE(),
    rts.ClientAddress(ipaddress.IPv4Address("192.0.2.7")),
    rts.ClientAddress(ipaddress.IPv6Address("2001:db8::1")),
    rts.AssociationGroupId(AG),
    rts.Destination(rts.FD_SERVER),
    rts.PingTrafficSentNotify(4096),
]


def test_every_command_round_trips():
    pdu = rts.RtsPdu(rts.RTS_FLAG_OTHER_CMD, tuple(ALL_COMMANDS))
    data = pdu.encode()
    assert struct.unpack_from("<H", data, 8)[0] == len(data)
    assert rts.parse_rts(data) == pdu
    assert {c.TYPE for c in ALL_COMMANDS} == set(range(15))
    assert pdu.first(rts.Cookie) == rts.Cookie(VC)
    assert pdu.first(rts.Cookie).value == VC


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: type(c).__name__)
def test_each_command_alone_round_trips(command):
    data = rts.RtsPdu(rts.RTS_FLAG_NONE, (command,)).encode()
    assert rts.parse_rts(data).commands == (command,)


def test_dce_round_trips():
    bind = rts.parse_bind(rts.bind(7, NSPI, context_id=1, max_xmit_frag=4280, max_recv_frag=4280, assoc_group_id=9))
    assert bind.call_id == 7 and bind.assoc_group_id == 9 and (bind.max_xmit_frag, bind.max_recv_frag) == (4280, 4280)
    assert bind.contexts == (rts.PresentationContext(1, NSPI, (NDR,)),)

    results = (rts.acceptance(), rts.provider_rejection(rts.REASON_ABSTRACT_SYNTAX_NOT_SUPPORTED))
    for address in ("", "6001", "60011", "600"):
        ack = rts.parse_bind_ack(rts.bind_ack(7, results, assoc_group_id=0x55, secondary_address=address))
        assert ack.results == results and ack.secondary_address == address and ack.assoc_group_id == 0x55
    assert ack.results[0].accepted and not ack.results[1].accepted

    nak = rts.parse_bind_nak(rts.bind_nak(7, rts.NAK_LOCAL_LIMIT_EXCEEDED))
    assert nak == rts.BindNak(7, 2, ((5, 0),))

    req = rts.parse_request(rts.request(8, rts.OPNUM_EC_DO_CONNECT_EX, b"stub-data", context_id=1))
    assert (req.call_id, req.opnum, req.stub, req.context_id, req.alloc_hint) == (8, 10, b"stub-data", 1, 9)
    obj = uuid.uuid4()
    req = rts.parse_request(rts.request(8, 0, b"x", object_uuid=obj))
    assert req.object_uuid == obj and req.stub == b"x" and req.pfc_flags == rts.PFC_WHOLE

    resp = rts.parse_response(rts.response(8, b"\x00\x00\x00\x00", context_id=1))
    assert (resp.call_id, resp.stub, resp.context_id, resp.alloc_hint) == (8, b"\x00" * 4, 1, 4)

    flt = rts.parse_fault(rts.fault(8, rts.NCA_S_UNK_IF, did_not_execute=True))
    assert flt.status == rts.NCA_S_UNK_IF and flt.pfc_flags & rts.PFC_DID_NOT_EXECUTE

    for pdu in (rts.bind(1, RFR), rts.bind_ack(1, results), rts.bind_nak(1), rts.request(1, 0), rts.response(1), rts.fault(1, 5), rts.conn_c2()):
        assert rts.parse(pdu).encode() == pdu


def test_auth_verifier_room():
    auth = rts.AuthVerifier(auth_type=10, auth_level=6, auth_context_id=79231, auth_value=b"S" * 16)
    pdu = rts.request(5, 11, b"abc", auth=auth)
    header = rts.parse_header(pdu)
    assert header.auth_length == 16 and header.frag_length == len(pdu)
    # 24-byte request header + 3 stub bytes + 1 pad byte: the sec_trailer starts 4-byte aligned at 28
    assert pdu[24:28] == b"abc\x00" and pdu[28:36] == struct.pack("<BBBBI", 10, 6, 1, 0, 79231)
    parsed = rts.parse_request(pdu)
    assert parsed.stub == b"abc" and parsed.auth == rts.AuthVerifier(10, 6, 79231, b"S" * 16, 1)
    ack = rts.parse_bind_ack(rts.bind_ack(1, [rts.acceptance()], secondary_address="6001", auth=auth))
    assert ack.results == (rts.acceptance(),) and ack.auth.auth_value == b"S" * 16


def test_answer_bind_for_the_lab():
    offered = rts.Bind(
        3,
        (
            rts.PresentationContext(0, EMSMDB, (NDR,)),
            rts.PresentationContext(1, NSPI, (NDR,)),
            rts.PresentationContext(2, EMSMDB, (rts.SyntaxId(uuid.UUID("71710533-beba-4937-8319-b5dbef9ccc36"), 1, 0),)),
        ),
        max_xmit_frag=4280,
        max_recv_frag=5840,
    )
    ack = rts.parse_bind_ack(rts.answer_bind(rts.parse_bind(offered.encode()), [EMSMDB]))
    assert ack.call_id == 3 and ack.secondary_address == "6001" and ack.assoc_group_id != 0
    assert [r.result for r in ack.results] == [0, 2, 2]
    assert [r.reason for r in ack.results] == [0, 1, 2]
    assert ack.results[0].transfer_syntax == NDR and ack.max_recv_frag == 4280


# --------------------------------------------------------------------------------------------------
# Malformed input: one error class, one sentence


@pytest.mark.parametrize(
    "data, message",
    [
        (b"HTTP/1.1 503 RPC Error\r\n", "expected an RPC PDU"),
        (bytes([5, 1]) + b"\x00" * 18, "minor version 1"),
        (bytes([5, 0, 20, 3, 0, 0, 0, 0]) + b"\x00" * 12, "big-endian"),
        (rts.ping()[:-1], "says it is 20 bytes long but 19"),
        (rts.ping()[:12], "at least 16 bytes"),
        (rts.conn_a3()[:24] + b"\x00\x00\x00", "says it is 28"),
        (rts.RtsPdu(0, (rts.Version(),)).encode()[:16] + struct.pack("<HHI", 1, 1, 0x63) + b"\x00" * 4, "unknown command type 0x63"),
        (rts.request(1, 0)[:2] + bytes([99]) + rts.request(1, 0)[3:], "unknown PTYPE 99"),
    ],
)
def test_malformed_pdus_raise_one_error_class(data, message):
    with pytest.raises(RpcProtocolError) as caught:
        rts.classify(data)
    text = str(caught.value)
    assert text.endswith(".") and "\n" not in text and text.count(". ") == 0
    if message:
        assert message in text


def test_malformed_rts_bodies():
    good = rts.conn_c2()
    with pytest.raises(RpcProtocolError, match="bytes after its 3 commands"):
        rts.parse_rts(good[:8] + struct.pack("<H", len(good) + 4) + good[10:] + b"\x00" * 4)
    unknown = rts.RtsPdu(0, (rts.Version(),)).encode()
    unknown = unknown[:20] + struct.pack("<I", 0x63) + unknown[24:]
    with pytest.raises(RpcProtocolError, match="unknown command type 0x63"):
        rts.parse_rts(unknown)
    short = rts.conn_a1(VC, OUT)
    short = short[:8] + struct.pack("<H", 60) + short[10:60]
    with pytest.raises(RpcProtocolError, match="ends inside its"):
        rts.parse_rts(short)
    with pytest.raises(RpcProtocolError, match="first and last fragment with call_id 0"):
        rts.parse_rts(good[:3] + b"\x01" + good[4:])
    with pytest.raises(RpcProtocolError, match="first and last fragment with call_id 0"):
        rts.parse_rts(good[:12] + b"\x01" + good[13:])
    with pytest.raises(RpcProtocolError, match="is too short"):
        rts.parse_bind(rts.bind(1, NSPI)[:8] + struct.pack("<H", 40) + rts.bind(1, NSPI)[10:40])


# --------------------------------------------------------------------------------------------------
# The splitter


STREAM = [
    rts.conn_a3(),
    rts.conn_c2(),
    rts.ping(),
    rts.bind_ack(1, [rts.acceptance()], secondary_address="6001"),
    rts.response(2, bytes(range(256)) * 20),
    rts.fault(3, 5),
    rts.flow_control_ack(100, 65536, IN),
]


def test_splitter_byte_by_byte_equals_one_piece():
    data = b"".join(STREAM)
    whole = PduReader().feed(data)
    reader = PduReader()
    pieces = []
    for i in range(len(data)):
        pieces += reader.feed(data[i : i + 1])
    assert whole == pieces == STREAM
    assert reader.buffered == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=40))
def test_splitter_any_chunking(sizes):
    data = b"".join(STREAM)
    reader, out, at = PduReader(), [], 0
    for size in sizes:
        out += reader.feed(data[at : at + size])
        at += size
    out += reader.feed(data[at:])
    assert out == STREAM


def test_splitter_bounds_and_garbage():
    with pytest.raises(RpcProtocolError, match="less than its own 16-byte header"):
        PduReader().feed(rts.ping()[:8] + struct.pack("<H", 15))
    reader = PduReader(max_frag_length=4096 + 16)
    with pytest.raises(RpcProtocolError, match="more than the 4112 allowed"):
        reader.feed(rts.response(1, b"\x00" * 5000)[:10])
    with pytest.raises(RpcProtocolError):
        reader.feed(rts.ping())  # stays failed
    with pytest.raises(RpcProtocolError, match="expected an RPC PDU"):
        PduReader().feed(rts.ping() + b"<html>")  # an error page after a PDU: caught at its first byte
    # an incomplete PDU is held, not an error
    reader = PduReader()
    assert reader.feed(rts.conn_c2()[:30]) == [] and reader.buffered == 30
    with pytest.raises(ValueError):
        PduReader(max_frag_length=10)


# --------------------------------------------------------------------------------------------------
# The client state machine against this module's server side


def out_channel(*pdus: bytes) -> bytes:
    return b"".join(pdus)


def test_client_virtual_connection_happy_path():
    client = ClientVirtualConnection(VC, OUT, IN, AG)
    a1, b1 = rts.parse_conn_a1(client.out_channel_opening()), rts.parse_conn_b1(client.in_channel_opening())
    # what the lab does: pair the two channels by the virtual connection cookie
    assert a1.virtual_connection_cookie == b1.virtual_connection_cookie == VC
    assert (a1.out_channel_cookie, b1.in_channel_cookie, b1.association_group_id) == (OUT, IN, AG)

    events = client.feed_out(out_channel(rts.conn_a3(900_000), rts.conn_c2(65536, 900_000))[:40])
    assert events == [rts.ConnA3Received(900_000)] and client.state == "a3"
    events = client.feed_out(rts.conn_c2(65536, 900_000)[12:])
    assert events == [rts.ConnC2Received(1, 65536, 900_000)] and client.state == "open"

    bind = rts.parse_bind(client.bind(EMSMDB))
    assert bind.call_id == 1 and bind.contexts[0].abstract_syntax == EMSMDB
    events = client.feed_out(rts.ping() + rts.answer_bind(bind, [EMSMDB]))
    assert events[0].name == "Ping"
    assert isinstance(events[1], rts.BindAckReceived) and events[1].bind_ack.results[0].accepted

    req = rts.parse_request(client.request(rts.OPNUM_EC_DUMMY_RPC))
    assert req.call_id == 2 and req.opnum == 6 and req.stub == b""
    stub = bytes(range(200)) * 10
    fragments = (
        rts.response(2, stub[:700], pfc_flags=rts.PFC_FIRST_FRAG, alloc_hint=len(stub)) + rts.response(2, stub[700:1500], pfc_flags=0) + rts.response(2, stub[1500:], pfc_flags=rts.PFC_LAST_FRAG)
    )
    assert client.feed_out(fragments) == [rts.ResponseReceived(2, stub, 0)]
    events = client.feed_out(rts.fault(3, rts.RPC_S_ACCESS_DENIED))
    assert isinstance(events[0], rts.FaultReceived) and events[0].fault.status == 5
    assert client.take_in_channel_bytes() == b""


def test_client_sends_flow_control_acks_for_the_out_channel():
    client = ClientVirtualConnection(VC, OUT, IN, AG, receive_window_size=8192)
    client.feed_out(rts.conn_a3() + rts.conn_c2())
    big = rts.response(1, b"\x00" * 5000)  # 5024 bytes: more than half of 8192 used
    client.feed_out(big)
    ack = client.take_in_channel_bytes()
    assert rts.classify(ack) == "FlowControlAckWithDestination"
    dest, fca = rts.parse_rts(ack).commands
    assert dest == rts.Destination(rts.FD_OUT_PROXY)
    assert fca == rts.FlowControlAck(len(big), 8192, OUT)
    assert client.take_in_channel_bytes() == b""


def test_client_refuses_out_of_order_handshake():
    client = ClientVirtualConnection()
    with pytest.raises(RpcProtocolError, match="expected a CONN/A3 RTS PDU but got CONN/C2"):
        client.feed_out(rts.conn_c2())
    client = ClientVirtualConnection()
    client.feed_out(rts.conn_a3())
    with pytest.raises(RpcProtocolError, match="without its first fragment"):
        client.feed_out(rts.conn_c2() + rts.response(4, b"x", pfc_flags=rts.PFC_LAST_FRAG))


# --------------------------------------------------------------------------------------------------
# Differential: impacket, a real RPC over HTTP v2 client


try:
    from impacket import uuid as imp_uuid
    from impacket.dcerpc.v5 import epm as imp_epm
    from impacket.dcerpc.v5 import nspi as imp_nspi
    from impacket.dcerpc.v5 import oxabref as imp_oxabref
    from impacket.dcerpc.v5 import rpch as impacket_rpch
    from impacket.dcerpc.v5 import rpcrt
except ImportError:  # only these tests need it; the rest of the module runs without
    impacket_rpch = None

needs_impacket = pytest.mark.skipif(impacket_rpch is None, reason="impacket is not installed")


@needs_impacket
@settings(max_examples=30, deadline=None)
@given(st.uuids(), st.uuids(), st.uuids(), st.integers(min_value=8192, max_value=262144))
def test_impacket_conn_a1_b1_are_byte_identical(vc, chan, group, window):
    assert rts.conn_a1(vc, chan, window) == impacket_rpch.hCONN_A1(vc.bytes_le, chan.bytes_le, window)
    assert rts.conn_b1(vc, chan, group) == impacket_rpch.hCONN_B1(vc.bytes_le, chan.bytes_le, group.bytes_le)


@needs_impacket
def test_impacket_flow_control_ack_and_ping_are_byte_identical():
    assert rts.flow_control_ack(123456, 262144, OUT, rts.FD_OUT_PROXY) == (impacket_rpch.hFlowControlAckWithDestination(impacket_rpch.FDOutProxy, 123456, 262144, OUT.bytes_le))
    assert rts.ping() == impacket_rpch.hPing()


def _impacket_rts(flags: int, body_structure) -> bytes:
    packet = impacket_rpch.RTSHeader()
    packet["Flags"] = flags
    packet["NumberOfCommands"] = len(body_structure.structure)
    packet["pduData"] = body_structure.getData()
    return packet.getData()


@needs_impacket
def test_impacket_a3_c2_structures_match_and_parse_ours():
    a3 = impacket_rpch.CONN_A3_RTS_PDU()
    a3["ConnectionTimeout"] = impacket_rpch.ConnectionTimeout()
    a3["ConnectionTimeout"]["ConnectionTimeout"] = 900_000
    assert rts.conn_a3(900_000) == _impacket_rts(impacket_rpch.RTS_FLAG_NONE, a3)

    c2 = impacket_rpch.CONN_C2_RTS_PDU()
    c2["Version"] = impacket_rpch.Version()
    c2["ReceiveWindowSize"] = impacket_rpch.ReceiveWindowSize()
    c2["ReceiveWindowSize"]["ReceiveWindowSize"] = 65536
    c2["ConnectionTimeout"] = impacket_rpch.ConnectionTimeout()
    assert rts.conn_c2(65536, 120_000) == _impacket_rts(impacket_rpch.RTS_FLAG_NONE, c2)

    parsed = impacket_rpch.CONN_C2_RTS_PDU(impacket_rpch.RTSHeader(rts.conn_c2(8192, 600_000))["pduData"])
    assert parsed["ReceiveWindowSize"]["ReceiveWindowSize"] == 8192
    assert parsed["ConnectionTimeout"]["ConnectionTimeout"] == 600_000


@needs_impacket
def test_impacket_command_structures_match_ours():
    """impacket parses each of our RTS commands to the same values and re-encodes the same bytes.

    Padding is the exception: impacket's Padding structure cannot parse ('*ConformanceCount' is not a
    valid format), so it is checked against impacket's declared layout by hand.
    """
    checked = {rts.CMD_PADDING}
    assert rts.Padding(b"\xaa" * 3).encode() == struct.pack("<II", 8, 3) + b"\xaa" * 3
    assert [name for name, *_ in impacket_rpch.Padding.structure] == ["CommandType", "ConformanceCount", "Padding"]
    for command in ALL_COMMANDS:
        if isinstance(command, rts.Padding):
            continue
        cls = impacket_rpch.COMMANDS[command.TYPE]
        ours = command.encode()
        theirs = cls(ours)  # impacket parses our bytes ...
        if isinstance(command, rts.FlowControlAck):
            assert theirs["Ack"]["BytesReceived"] == command.bytes_received
            assert theirs["Ack"]["AvailableWindow"] == command.available_window
            assert theirs["Ack"]["ChannelCookie"]["Cookie"] == command.channel_cookie.bytes_le
        elif isinstance(command, rts.Cookie):
            assert theirs["Cookie"]["Cookie"] == command.value.bytes_le
        elif isinstance(command, rts.AssociationGroupId):
            assert theirs["AssociationGroupId"]["Cookie"] == command.value.bytes_le
        elif isinstance(command, rts.ClientAddress):
            assert theirs["ClientAddress"]["ClientAddress"] == command.address.packed
            assert theirs["ClientAddress"]["AddressType"] == (0 if command.address.version == 4 else 1)
        elif hasattr(command, "value"):
            field_name = next(name for name, *_ in cls.structure if name != "CommandType")
            assert theirs[field_name] == command.value
        assert theirs["CommandType"] == command.TYPE
        assert theirs.getData() == ours  # ... and re-encodes them byte for byte
        checked.add(command.TYPE)
    assert checked == set(range(15))


@needs_impacket
def test_impacket_interface_identifiers():
    assert NSPI.encode() == imp_nspi.MSRPC_UUID_NSPI
    assert RFR.encode() == imp_oxabref.MSRPC_UUID_OXABREF
    assert NDR.encode() == rpcrt.DCERPC.NDRSyntax
    assert EMSMDB.encode() == imp_uuid.uuidtup_to_bin(("A4F1DB00-CA47-1067-B31F-00DD010662DA", "0.81"))
    # impacket's table of known interfaces, keyed by the UUID string, names the documents
    assert imp_epm.KNOWN_PROTOCOLS[str(EMSMDB.uuid).upper()] == "[MS-OXCRPC]: Wire Format Protocol"
    assert imp_epm.KNOWN_PROTOCOLS[str(RFR.uuid).upper()].startswith("[MS-OXABREF]")


@needs_impacket
@pytest.mark.parametrize("iface, call_id", [(EMSMDB, 1), (NSPI, 2), (RFR, 7)])
def test_impacket_bind_is_byte_identical(iface, call_id):
    # the same steps as impacket's DCERPC_v5.bind() for one context and no auth
    bind = rpcrt.MSRPCBind()
    item = rpcrt.CtxItem()
    item["AbstractSyntax"] = iface.encode()
    item["TransferSyntax"] = imp_uuid.uuidtup_to_bin(("8a885d04-1ceb-11c9-9fe8-08002b104860", "2.0"))
    item["ContextID"] = 0
    item["TransItems"] = 1
    bind.addCtxItem(item)
    packet = rpcrt.MSRPCHeader()
    packet["type"] = rpcrt.MSRPC_BIND
    packet["pduData"] = bind.getData()
    packet["call_id"] = call_id
    assert rts.bind(call_id, iface, max_xmit_frag=4280, max_recv_frag=4280) == packet.get_packet()


@needs_impacket
@pytest.mark.parametrize("address", ["", "6001", "6004", "135"])
def test_impacket_bind_ack_is_byte_identical_and_parses_ours(address):
    # the same steps as impacket's own DCE/RPC server (rpcrt.DCERPCServer.bind)
    resp = rpcrt.MSRPCBindAck()
    resp["type"] = rpcrt.MSRPC_BINDACK
    resp["flags"] = rpcrt.PFC_FIRST_FRAG | rpcrt.PFC_LAST_FRAG
    resp["auth_len"] = 0
    resp["auth_data"] = b""
    resp["call_id"] = 3
    resp["max_tfrag"] = resp["max_rfrag"] = 4280
    resp["assoc_group"] = 0x1234
    resp["SecondaryAddr"] = address
    resp["SecondaryAddrLen"] = len(address) + 1 if address else 0
    result = rpcrt.CtxItemResult()
    result["Result"] = rpcrt.MSRPC_CONT_RESULT_ACCEPT
    result["Reason"] = 0
    result["TransferSyntax"] = NDR.encode()
    resp["ctx_num"] = 1
    resp["ctx_items"] = result.getData()
    # impacket's server fills the alignment pad with b"A"; C706 leaves its content unspecified and
    # this module (like Windows) sends zeros, so the test pads with zeros
    resp["Pad"] = b"\x00" * ((4 - ((resp["SecondaryAddrLen"] + rpcrt.MSRPCBindAck._SIZE) % 4)) % 4)
    resp["frag_len"] = len(resp.getData())
    theirs = resp.getData()
    ours = rts.bind_ack(3, [rts.acceptance()], max_xmit_frag=4280, max_recv_frag=4280, assoc_group_id=0x1234, secondary_address=address)
    if address:  # impacket writes an empty secondary address as a lone NUL with length 0; see report
        assert ours == theirs
    parsed = rpcrt.MSRPCBindAck(ours)
    assert parsed["frag_len"] == len(ours) and parsed["call_id"] == 3
    assert parsed["ctx_num"] == 1 and parsed["assoc_group"] == 0x1234
    item = rpcrt.CtxItemResult(parsed["ctx_items"])
    assert item["Result"] == 0 and item["TransferSyntax"] == NDR.encode()


@needs_impacket
def test_impacket_request_response_fault_nak():
    req = rpcrt.MSRPCRequestHeader()
    req["op_num"] = 10
    req["ctx_id"] = 0
    req["call_id"] = 4
    req["pduData"] = b"\x01\x02\x03\x04\x05"
    req["alloc_hint"] = len(req["pduData"])
    assert rts.request(4, 10, b"\x01\x02\x03\x04\x05") == req.get_packet()

    resp = rpcrt.MSRPCRespHeader()
    resp["call_id"] = 4
    resp["pduData"] = b"\x00" * 8
    resp["alloc_hint"] = 8
    assert rts.response(4, b"\x00" * 8) == resp.get_packet()
    parsed = rpcrt.MSRPCRespHeader(rts.response(4, b"abcdefgh", context_id=2))
    assert parsed["pduData"] == b"abcdefgh" and parsed["ctx_id"] == 2 and parsed["alloc_hint"] == 8

    # impacket reads a fault's status as the first 4 bytes after the response header
    parsed = rpcrt.MSRPCRespHeader(rts.fault(4, rpcrt.MSRPC_STATUS_CODE_NCA_S_UNK_IF))
    assert parsed["type"] == rpcrt.MSRPC_FAULT
    assert struct.unpack("<L", parsed["pduData"][:4])[0] == 0x1C010003

    header = rpcrt.MSRPCHeader(rts.bind_nak(4, rts.NAK_TEMPORARY_CONGESTION))
    assert header["type"] == rpcrt.MSRPC_BINDNAK
    assert rpcrt.MSRPCBindNak(header["pduData"])["RejectedReason"] == 1


class _FakeSocket:
    def __init__(self, incoming: bytes = b"") -> None:
        self.incoming = bytearray(incoming)
        self.sent = bytearray()

    def send(self, data: bytes) -> int:
        self.sent += data
        return len(data)

    def recv(self, n: int) -> bytes:
        chunk = bytes(self.incoming[:n])
        del self.incoming[:n]
        return chunk


class _FakeChannel:
    def __init__(self, sock: _FakeSocket) -> None:
        self.sock = sock

    def close(self) -> None:
        pass


@needs_impacket
def test_impacket_client_opens_a_virtual_connection_against_our_server_side():
    """impacket's RPCProxyClient.create_tunnel() sends its CONN/A1 and CONN/B1 and reads CONN/A3 and
    CONN/C2; we play the RPC proxy with this module (parse A1/B1, pair by cookie, answer A3/C2, then a
    Ping and a bind_ack), over in-memory sockets."""
    out_body = rts.conn_a3(900_000) + rts.conn_c2(65536, 900_000)
    out_sock = _FakeSocket(b"HTTP/1.1 200 Success\r\nContent-Length: 1073741824\r\n\r\n" + out_body)
    in_sock = _FakeSocket()
    client = impacket_rpch.RPCProxyClient(remoteName="exch2007", dstport=6001)
    client._RPCProxyClient__channels = {"RPC_IN_DATA": _FakeChannel(in_sock), "RPC_OUT_DATA": _FakeChannel(out_sock)}

    client.create_tunnel()

    assert client._RPCProxyClient__serverConnectionTimeout == 900_000
    assert client._RPCProxyClient__serverReceiveWindowSize == 65536
    a1 = rts.parse_conn_a1(bytes(out_sock.sent))
    b1 = rts.parse_conn_b1(bytes(in_sock.sent))
    assert a1.virtual_connection_cookie == b1.virtual_connection_cookie  # the lab pairs on this
    assert a1.virtual_connection_cookie.bytes_le == client._RPCProxyClient__virtualConnectionCookie
    assert a1.out_channel_cookie.bytes_le == client._RPCProxyClient__outChannelCookie
    assert b1.in_channel_cookie.bytes_le == client._RPCProxyClient__inChannelCookie
    assert b1.association_group_id.bytes_le == client._RPCProxyClient__associationGroupId
    assert (a1.version, a1.receive_window_size) == (1, 262144)
    assert (b1.channel_lifetime, b1.client_keepalive) == (0x40000000, 300_000)

    # impacket's recv() skips RTS PDUs (answering a Ping with Pings on IN) and returns the bind_ack
    in_sock.sent.clear()
    out_sock.incoming += rts.ping() + rts.bind_ack(1, [rts.acceptance()], secondary_address="6001")
    data = client.recv()
    assert rts.classify(data) == "bind_ack"
    assert client.rts_ping_received
    assert [rts.classify(p) for p in PduReader().feed(bytes(in_sock.sent))] == ["Ping", "Ping"]
    ack = rpcrt.MSRPCBindAck(data)
    assert ack["SecondaryAddr"] in ("6001", b"6001") and rpcrt.CtxItemResult(ack["ctx_items"])["Result"] == 0
