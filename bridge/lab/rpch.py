"""The lab's RPC proxy and RPC server: RPC over HTTP v2 virtual connections ([MS-RPCH]) on
``/rpc/rpcproxy.dll``, as an Exchange 2007 Client Access Server with the RPC over HTTP Proxy answers them.

The message sequence (client = Outlook, the migration service, impacket, or the preflight):

1. ``RPC_OUT_DATA`` whose body is CONN/A1: the OUT channel. The lab answers ``200`` with
   ``Content-Length: 1073741824`` (as IIS's RPC proxy does; the body never really ends) and writes
   CONN/A3 at once.
2. ``RPC_IN_DATA`` whose body starts with CONN/B1 (Content-Length 1 GiB too): the IN channel. Its
   HTTP answer only comes when the virtual connection ends.
3. The two channels are paired by their virtual connection cookie (and the ``server:port`` target);
   once both are there, CONN/C2 goes on the OUT channel.
4. Every PDU the client sends on the IN channel is read as it arrives and answered on the OUT
   channel as soon as it is complete: ``bind`` -> ``bind_ack`` (or ``bind_nak`` with --refuse-bind),
   ``request`` -> ``response`` (fragmented to the client's max_recv_frag) or ``fault``; the client's
   FlowControlAck for the OUT channel opens the OUT window; pings are counted and ignored. When the
   client's IN data passes half the IN window (64 KiB, advertised in CONN/C2) a FlowControlAck for the
   IN channel goes on the OUT channel, as the spec has the inbound proxy send it through the server.
5. Either channel closing ends the virtual connection: the other is closed too.

Interfaces per port, as Exchange 2007 registers them: 6001 the store (EMSMDB), 6002 the referral
service (RFR), 6004 the address book proxy (NSPI and RFR). A bind to another interface gets a provider
rejection (abstract syntax not supported); a target port outside 6001-6004 gets ``503 RPC Error``, as
the RPC proxy answers a port missing from its ValidPorts.

Operations (a real server knows its interface's opnums; the lab knows these few):

- EcDummyRpc (opnum 6) on an EMSMDB context: a 4-byte zero status, what Exchange answers.
- ``LAB_ECHO_OPNUM`` (200) on any context: the request's stub data echoed back.
- ``LAB_SLOW_ECHO_OPNUM`` (201): the same echo written in ``SLOW_FRAGMENTS`` fragments with
  ``SLOW_PAUSE`` seconds between them (the write time of each is kept in ``LabCounters.rpc_slow_writes``)
  so a test can prove a proxy passes each fragment on as it comes.
- anything else: a fault ``nca_s_op_rng_error``; a call on a context that was not bound: ``nca_s_unk_if``.

Both opnums are outside every Exchange interface's range, so a real server answers them with a fault.

The PDU logic (``VirtualConnection.on_in_pdu``) is sans-IO: it returns what to write on the OUT
channel; ``bridge.lab.server`` does the HTTP and the waiting.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

from bridge.protocol import rts

OUT_CHANNEL_CONTENT_LENGTH = 0x40000000  # 1 GiB, what IIS's RPC proxy declares for RPC_OUT_DATA
PAIRING_TIMEOUT = 30.0  # seconds an OUT channel waits for its IN channel
MAX_OPENING = 1024  # an RTS opening PDU longer than this is not CONN/A1 or CONN/B1
VALID_PORTS = (6001, 6002, 6003, 6004)
INTERFACES_BY_PORT: dict[int, tuple[rts.SyntaxId, ...]] = {
    rts.PORT_EMSMDB: (rts.EMSMDB,),
    rts.PORT_RFR: (rts.RFR,),
    rts.PORT_NSPI: (rts.NSPI, rts.RFR),
}
INTERFACE_NAMES = {rts.EMSMDB: "EMSMDB", rts.NSPI: "NSPI", rts.RFR: "RFR"}
LAB_ECHO_OPNUM = 200
LAB_SLOW_ECHO_OPNUM = 201
SLOW_FRAGMENTS = 4
SLOW_PAUSE = 0.25
SERVER_MAX_FRAG = 5840
MAX_REQUEST_STUB = 4 * 1024 * 1024  # a fragmented request larger than this ends the connection


def target_port(target: str) -> int | None:
    """The port of an RPC proxy target (``server:port`` in the query string), None when there is none."""
    _, _, port = target.rpartition(":")
    return int(port) if port.isdigit() else None


def opening_of(prefix: bytes) -> str | None:
    """ "CONN/A1" or "CONN/B1" when these bytes are exactly that RTS PDU, else None."""
    try:
        name = rts.classify(prefix)
    except rts.RpcProtocolError:
        return None
    return name if name in ("CONN/A1", "CONN/B1") else None


def opening_length(prefix: bytes) -> int | None:
    """From the first 20 bytes of a body: the frag_length of the RTS PDU they start, None when they do
    not start an RTS PDU that could be a channel opening."""
    if len(prefix) < rts.RTS_HEADER_SIZE or prefix[0] != rts.RPC_VERS or prefix[2] != rts.PTYPE_RTS:
        return None
    (frag_length,) = struct.unpack_from("<H", prefix, 8)
    return frag_length if rts.RTS_HEADER_SIZE <= frag_length <= MAX_OPENING else None


def fragment_response(call_id: int, stub: bytes, max_frag: int, context_id: int = 0, pieces: int | None = None) -> list[bytes]:
    """A response split into fragments no larger than max_frag (or into ``pieces`` fragments)."""
    room = max(8, max_frag - 24)
    if pieces:
        room = min(room, max(1, -(-len(stub) // pieces)))
    chunks = [stub[i : i + room] for i in range(0, len(stub), room)] or [b""]
    out = []
    left = len(stub)
    for index, chunk in enumerate(chunks):
        flags = (rts.PFC_FIRST_FRAG if index == 0 else 0) | (rts.PFC_LAST_FRAG if index == len(chunks) - 1 else 0)
        out.append(rts.response(call_id, chunk, context_id=context_id, pfc_flags=flags, alloc_hint=left))
        left -= len(chunk)
    return out


@dataclass
class OutItem:
    """One PDU for the OUT channel; ``pause`` seconds are waited before writing it; ``slow`` marks the
    fragments of a slow echo (their write times are recorded)."""

    pdu: bytes
    pause: float = 0.0
    slow: bool = False

    @property
    def flow_controlled(self) -> bool:
        return self.pdu[2] != rts.PTYPE_RTS  # only RPC PDUs count against the window ([MS-RPCH] 3.2.1.1.4)


@dataclass
class VirtualConnection:
    """One virtual connection as the lab's proxy and server see it."""

    target: str
    cookie: uuid.UUID
    port: int
    refuse_bind: bool = False
    out_window: int = rts.DEFAULT_CLIENT_RECEIVE_WINDOW  # the client's, from CONN/A1
    out_channel_cookie: uuid.UUID | None = None
    in_channel_cookie: uuid.UUID | None = None
    contexts: dict[int, rts.SyntaxId] = field(default_factory=dict)
    max_xmit_frag: int = SERVER_MAX_FRAG
    # Tallies (shared with LabCounters when the table is given its dicts): calls, pings, acks, ...
    stats: dict[str, int] = field(default_factory=dict)
    binds: dict[str, int] = field(default_factory=dict)  # accepted binds by interface name

    def __post_init__(self) -> None:
        self.in_window = rts.ReceiveWindow(rts.DEFAULT_PROXY_RECEIVE_WINDOW)
        self._partial: dict[int, tuple[rts.Request, bytearray]] = {}
        self.out_sent = 0  # RPC PDU bytes written on OUT
        self.out_acked = 0  # bytes the client said it received (FlowControlAck)
        self.out_queue: asyncio.Queue[OutItem | None] = asyncio.Queue()
        self.paired = asyncio.Event()
        self.window_opened = asyncio.Event()
        self.transports: dict[str, Any] = {}  # "out" / "in" -> the channel's transport
        self.ended = False

    def count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    # ---- sans-IO: one PDU from the IN channel in, PDUs for the OUT channel out -------------------
    def on_in_pdu(self, pdu: bytes) -> list[OutItem]:
        header = rts.parse_header(pdu)
        if header.ptype == rts.PTYPE_RTS:
            return self._on_rts(rts.parse_rts(pdu))
        out: list[OutItem] = []
        if self.in_window.received(len(pdu)) and self.in_channel_cookie is not None:
            self.count("flow_control_acks_sent")
            out.append(OutItem(rts.flow_control_ack(self.in_window.bytes_received, self.in_window.size, self.in_channel_cookie)))
        if header.ptype in (rts.PTYPE_BIND, rts.PTYPE_ALTER_CONTEXT):
            out.append(OutItem(self._on_bind(rts.parse_bind(pdu))))
        elif header.ptype == rts.PTYPE_REQUEST:
            out += self._on_request(rts.parse_request(pdu))
        else:
            self.count("other_pdus")
        return out

    def _on_rts(self, packet: rts.RtsPdu) -> list[OutItem]:
        name = rts.classify_rts(packet)
        if name == "FlowControlAckWithDestination":
            ack = packet.first(rts.FlowControlAck)
            assert isinstance(ack, rts.FlowControlAck)
            self.count("flow_control_acks_received")
            self.out_acked = max(self.out_acked, ack.bytes_received)
            self.window_opened.set()
        elif name == "Ping":
            self.count("pings_received")
        else:
            self.count("other_rts")
        return []

    def _on_bind(self, bind: rts.Bind) -> bytes:
        if self.refuse_bind:
            self.count("bind_refusals")
            return rts.bind_nak(bind.call_id, rts.NAK_REASON_NOT_SPECIFIED)
        supported = INTERFACES_BY_PORT.get(self.port, ())
        answer = rts.answer_bind(bind, supported, secondary_address=str(self.port), max_frag=SERVER_MAX_FRAG)
        ack = rts.parse_bind_ack(answer)
        self.max_xmit_frag = ack.max_xmit_frag
        for context, result in zip(bind.contexts, ack.results, strict=False):
            if result.accepted:
                self.contexts[context.context_id] = context.abstract_syntax
                name = INTERFACE_NAMES.get(context.abstract_syntax, str(context.abstract_syntax))
                self.binds[name] = self.binds.get(name, 0) + 1
            else:
                self.count("bind_refusals")
        return answer

    def _on_request(self, request: rts.Request) -> list[OutItem]:
        if request.pfc_flags & rts.PFC_FIRST_FRAG:
            self._partial[request.call_id] = (request, bytearray())
        entry = self._partial.get(request.call_id)
        if entry is None:
            raise rts.RpcProtocolError(f"a request fragment for call {request.call_id} came without its first fragment.")
        first, stub = entry
        stub += request.stub
        if len(stub) > MAX_REQUEST_STUB:
            raise rts.RpcProtocolError(f"the request for call {request.call_id} is larger than {MAX_REQUEST_STUB} bytes.")
        if not request.pfc_flags & rts.PFC_LAST_FRAG:
            return []
        del self._partial[request.call_id]
        self.count("calls")
        return self.answer_call(first.call_id, first.context_id, first.opnum, bytes(stub))

    def answer_call(self, call_id: int, context_id: int, opnum: int, stub: bytes) -> list[OutItem]:
        syntax = self.contexts.get(context_id)
        if syntax is None:
            return [OutItem(rts.fault(call_id, rts.NCA_S_UNK_IF, context_id=context_id, did_not_execute=True))]
        if opnum == rts.OPNUM_EC_DUMMY_RPC and syntax == rts.EMSMDB:
            return [OutItem(pdu) for pdu in fragment_response(call_id, b"\x00\x00\x00\x00", self.max_xmit_frag, context_id)]
        if opnum == LAB_ECHO_OPNUM:
            return [OutItem(pdu) for pdu in fragment_response(call_id, stub, self.max_xmit_frag, context_id)]
        if opnum == LAB_SLOW_ECHO_OPNUM:
            pdus = fragment_response(call_id, stub, self.max_xmit_frag, context_id, pieces=SLOW_FRAGMENTS)
            return [OutItem(pdu, SLOW_PAUSE if index else 0.0, slow=True) for index, pdu in enumerate(pdus)]
        return [OutItem(rts.fault(call_id, rts.NCA_S_OP_RNG_ERROR, context_id=context_id, did_not_execute=True))]

    # ---- the OUT channel's flow control ----------------------------------------------------------
    async def wait_for_window(self, size: int) -> None:
        """Wait until the client's receive window has room for ``size`` more bytes of RPC PDUs."""
        while self.out_sent - self.out_acked + size > self.out_window and self.out_sent > self.out_acked:
            self.window_opened.clear()
            await self.window_opened.wait()

    def close(self) -> None:
        """End the virtual connection: both channels' connections close (the OUT writer stops)."""
        self.ended = True
        self.out_queue.put_nowait(None)
        for transport in self.transports.values():
            if transport is not None and not transport.is_closing():
                transport.close()


class VirtualConnectionTable:
    """The lab's open virtual connections, by target and virtual connection cookie."""

    def __init__(self, stats: dict[str, int] | None = None, binds: dict[str, int] | None = None) -> None:
        self.connections: dict[tuple[str, uuid.UUID], VirtualConnection] = {}
        self.stats = {} if stats is None else stats
        self.binds = {} if binds is None else binds

    def attach(self, target: str, cookie: uuid.UUID, side: str, transport: Any, *, refuse_bind: bool) -> tuple[VirtualConnection, bool]:
        """The virtual connection this channel belongs to (created when it is the first channel) and
        whether this channel completed the pair. A second channel of the same side replaces nothing:
        it raises ValueError."""
        key = (target.lower(), cookie)
        vc = self.connections.get(key)
        if vc is None:
            vc = VirtualConnection(target, cookie, target_port(target) or 0, refuse_bind=refuse_bind, stats=self.stats, binds=self.binds)
            self.connections[key] = vc
        if side in vc.transports:
            raise ValueError(f"the virtual connection already has an {side.upper()} channel")
        vc.transports[side] = transport
        completed = "in" in vc.transports and "out" in vc.transports
        if completed:
            vc.paired.set()
        return vc, completed

    def detach(self, vc: VirtualConnection) -> None:
        if self.connections.get((vc.target.lower(), vc.cookie)) is vc:
            del self.connections[(vc.target.lower(), vc.cookie)]
        vc.close()
