"""RPC over HTTP v2 (Outlook Anywhere) on the wire: RTS PDUs and DCE/RPC connection-oriented PDUs.

Sans-IO: bytes in, values or events out; no sockets, no asyncio, stdlib only. Both directions are
here: the preflight check opens a virtual connection as Outlook does (client side), the lab plays an
Exchange 2007 RPC proxy (server side).

What is encoded, and from where:

- The common header of every connection-oriented PDU (C706 section 12.6.1): rpc_vers 5, rpc_vers_minor
  0, PTYPE, pfc_flags, packed_drep ``10 00 00 00`` (little-endian integers, ASCII, IEEE floats),
  frag_length, auth_length, call_id. Only little-endian data representation is supported: Windows
  always sends it, and so do the builders here.
- RTS PDUs ([MS-RPCH] 2.2.3 and 2.2.4): PTYPE rts (20), pfc_flags PFC_FIRST_FRAG | PFC_LAST_FRAG,
  auth_length 0, call_id 0, then the RTS header (Flags, NumberOfCommands, 2 bytes each) and the
  commands ([MS-RPCH] 2.2.3.5). The virtual-connection handshake the client sees: CONN/A1 (client to
  outbound proxy, 2.2.4.2), CONN/B1 (client to inbound proxy, 2.2.4.5), CONN/A3 (outbound proxy to
  client, 2.2.4.4: a single ConnectionTimeout command) and CONN/C2 (outbound proxy to client, 2.2.4.9:
  Version, ReceiveWindowSize, ConnectionTimeout). All four carry RTS_FLAG_NONE.
- DCE/RPC PDUs (C706 12.6.4, [MS-RPCE] 2.2.2): bind, bind_ack, bind_nak, request, response, fault.

RPC-level authentication (a sec_trailer and auth_value after the body, C706 13.2.6.1 and [MS-RPCE]
2.2.2.11) is not needed here: the preflight and the lab authenticate at the HTTP layer (NTLM or Basic on
the RPC_IN_DATA / RPC_OUT_DATA requests), so every builder defaults to auth_length 0. Room is kept for
it: every DCE/RPC builder takes ``auth=AuthVerifier(...)`` and every parser splits a present verifier
off the body into ``.auth`` rather than reading it as stub data.

Every malformed input raises ``RpcProtocolError`` whose message is one sentence.
"""

from __future__ import annotations

import ipaddress
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

# ---------------------------------------------------------------------------------------------------
# Errors


class RpcProtocolError(ValueError):
    """Bytes that are not a well-formed PDU (or not the PDU expected); str() is one sentence."""


# ---------------------------------------------------------------------------------------------------
# Common header (C706 12.6.1)

RPC_VERS = 5
RPC_VERS_MINOR = 0
DREP_LE = b"\x10\x00\x00\x00"  # little-endian integers and floats' byte order, ASCII, IEEE floats
COMMON_HEADER_SIZE = 16
RTS_HEADER_SIZE = 20
MIN_FRAG_LENGTH = COMMON_HEADER_SIZE
MAX_FRAG_LENGTH = 0xFFFF  # frag_length is 16 bits; PduReader takes a lower bound (e.g. max_recv_frag)

# PTYPE values (C706 12.6.4.1 and [MS-RPCH] 2.2.3.6.1 for rts).
PTYPE_REQUEST = 0
PTYPE_RESPONSE = 2
PTYPE_FAULT = 3
PTYPE_BIND = 11
PTYPE_BIND_ACK = 12
PTYPE_BIND_NAK = 13
PTYPE_ALTER_CONTEXT = 14
PTYPE_ALTER_CONTEXT_RESP = 15
PTYPE_AUTH3 = 16  # [MS-RPCE] 2.2.2.10
PTYPE_SHUTDOWN = 17
PTYPE_CO_CANCEL = 18
PTYPE_ORPHANED = 19
PTYPE_RTS = 20

PTYPE_NAMES = {
    PTYPE_REQUEST: "request",
    PTYPE_RESPONSE: "response",
    PTYPE_FAULT: "fault",
    PTYPE_BIND: "bind",
    PTYPE_BIND_ACK: "bind_ack",
    PTYPE_BIND_NAK: "bind_nak",
    PTYPE_ALTER_CONTEXT: "alter_context",
    PTYPE_ALTER_CONTEXT_RESP: "alter_context_resp",
    PTYPE_AUTH3: "auth3",
    PTYPE_SHUTDOWN: "shutdown",
    PTYPE_CO_CANCEL: "co_cancel",
    PTYPE_ORPHANED: "orphaned",
    PTYPE_RTS: "rts",
}

# pfc_flags (C706 12.6.3.1; [MS-RPCE] 2.2.2.3 gives 0x04 the meaning PFC_SUPPORT_HEADER_SIGN in binds).
PFC_FIRST_FRAG = 0x01
PFC_LAST_FRAG = 0x02
PFC_PENDING_CANCEL = 0x04
PFC_SUPPORT_HEADER_SIGN = 0x04
PFC_RESERVED_1 = 0x08
PFC_CONC_MPX = 0x10
PFC_DID_NOT_EXECUTE = 0x20
PFC_MAYBE = 0x40
PFC_OBJECT_UUID = 0x80
PFC_WHOLE = PFC_FIRST_FRAG | PFC_LAST_FRAG

_COMMON = struct.Struct("<BBBB4sHHI")


@dataclass(frozen=True)
class CommonHeader:
    """The 16 bytes every connection-oriented PDU starts with."""

    ptype: int
    pfc_flags: int
    frag_length: int
    auth_length: int
    call_id: int

    def encode(self) -> bytes:
        return _COMMON.pack(
            RPC_VERS,
            RPC_VERS_MINOR,
            self.ptype,
            self.pfc_flags,
            DREP_LE,
            self.frag_length,
            self.auth_length,
            self.call_id,
        )


def _check_prefix(data: bytes | bytearray) -> None:
    """Reject what cannot start a PDU as early as the bytes allow (used by parse and the reader)."""
    if len(data) >= 1 and data[0] != RPC_VERS:
        raise RpcProtocolError(f"expected an RPC PDU (version 5) but the data starts with {bytes(data[:12])!r}.")
    if len(data) >= 2 and data[1] != RPC_VERS_MINOR:
        raise RpcProtocolError(f"the RPC PDU has minor version {data[1]}, only 5.0 is spoken here.")
    if len(data) >= 5 and data[4] & 0xF0 != 0x10:
        raise RpcProtocolError("the RPC PDU uses big-endian data representation, which this implementation does not speak.")


def parse_header(pdu: bytes) -> CommonHeader:
    """The common header of one whole PDU (its length must equal frag_length)."""
    if len(pdu) < COMMON_HEADER_SIZE:
        _check_prefix(pdu)
        raise RpcProtocolError(f"an RPC PDU needs at least 16 bytes, got {len(pdu)}.")
    _check_prefix(pdu)
    _v, _m, ptype, flags, _drep, frag_length, auth_length, call_id = _COMMON.unpack_from(pdu)
    if frag_length != len(pdu):
        raise RpcProtocolError(f"the RPC PDU says it is {frag_length} bytes long but {len(pdu)} bytes were given.")
    return CommonHeader(ptype, flags, frag_length, auth_length, call_id)


def ptype_of(pdu: bytes) -> int:
    """The PTYPE of a PDU (after checking its common header)."""
    return parse_header(pdu).ptype


# ---------------------------------------------------------------------------------------------------
# Syntax identifiers and the Exchange interfaces


class SyntaxId(NamedTuple):
    """An interface or transfer syntax: UUID plus version (p_syntax_id_t, C706 12.6.3.1).

    On the wire: the UUID in its little-endian form (16 bytes), then if_version as one 32-bit value
    whose low 16 bits are the major and high 16 bits the minor version.
    """

    uuid: uuid.UUID
    major: int
    minor: int

    def encode(self) -> bytes:
        return self.uuid.bytes_le + struct.pack("<HH", self.major, self.minor)

    @classmethod
    def decode(cls, data: bytes) -> SyntaxId:
        if len(data) != 20:
            raise RpcProtocolError(f"a syntax identifier is 20 bytes, got {len(data)}.")
        major, minor = struct.unpack_from("<HH", data, 16)
        return cls(uuid.UUID(bytes_le=bytes(data[:16])), major, minor)

    def __str__(self) -> str:
        return f"{self.uuid} v{self.major}.{self.minor}"


# NDR transfer syntax, C706 appendix I (and [MS-RPCE] 2.2.4.12).
NDR = SyntaxId(uuid.UUID("8a885d04-1ceb-11c9-9fe8-08002b104860"), 2, 0)
# The null syntax a provider rejection carries in place of a transfer syntax.
NULL_SYNTAX = SyntaxId(uuid.UUID(int=0), 0, 0)
# EMSMDB, the information store: [MS-OXCRPC] section 1.9 / appendix A, "version 0.81".
EMSMDB = SyntaxId(uuid.UUID("a4f1db00-ca47-1067-b31f-00dd010662da"), 0, 81)
# NSPI, the address book: [MS-OXNSPI] section 1.9 / 6, "version 56.0".
NSPI = SyntaxId(uuid.UUID("f5cc5a18-4264-101a-8c59-08002b2f8426"), 56, 0)
# Referral service (RFR): [MS-OXABREF] section 1.9 / 6, "version 1.0".
RFR = SyntaxId(uuid.UUID("1544f5e0-613c-11d1-93df-00c04fd7bd09"), 1, 0)

# A few operation numbers a preflight or the lab may use ([MS-OXCRPC] 3.1.4, [MS-OXNSPI] 3.1.4.1,
# [MS-OXABREF] 3.1.4). EcDummyRpc takes no arguments and returns a 32-bit status: its request stub
# is empty and its response stub is 4 bytes, which makes it a cheap end-to-end call.
OPNUM_EC_DO_DISCONNECT = 1
OPNUM_EC_DUMMY_RPC = 6
OPNUM_EC_DO_CONNECT_EX = 10
OPNUM_EC_DO_RPC_EXT2 = 11
OPNUM_NSPI_BIND = 0
OPNUM_NSPI_UNBIND = 1
OPNUM_RFR_GET_NEW_DSA = 0
OPNUM_RFR_GET_FQDN_FROM_SERVER_DN = 1

# The ports Exchange 2007 registers behind the RPC proxy (rpcproxy.dll?host:PORT).
PORT_EMSMDB = 6001
PORT_RFR = 6002
PORT_NSPI = 6004


# ---------------------------------------------------------------------------------------------------
# RTS commands ([MS-RPCH] 2.2.3.5)

RTS_FLAG_NONE = 0x0000
RTS_FLAG_PING = 0x0001
RTS_FLAG_OTHER_CMD = 0x0002
RTS_FLAG_RECYCLE_CHANNEL = 0x0004
RTS_FLAG_IN_CHANNEL = 0x0008
RTS_FLAG_OUT_CHANNEL = 0x0010
RTS_FLAG_EOF = 0x0020
RTS_FLAG_ECHO = 0x0040

CMD_RECEIVE_WINDOW_SIZE = 0x0
CMD_FLOW_CONTROL_ACK = 0x1
CMD_CONNECTION_TIMEOUT = 0x2
CMD_COOKIE = 0x3
CMD_CHANNEL_LIFETIME = 0x4
CMD_CLIENT_KEEPALIVE = 0x5
CMD_VERSION = 0x6
CMD_EMPTY = 0x7
CMD_PADDING = 0x8
CMD_NEGATIVE_ANCE = 0x9
CMD_ANCE = 0xA
CMD_CLIENT_ADDRESS = 0xB
CMD_ASSOCIATION_GROUP_ID = 0xC
CMD_DESTINATION = 0xD
CMD_PING_TRAFFIC_SENT_NOTIFY = 0xE

# Forward destinations ([MS-RPCH] 2.2.3.3), the value of a Destination command.
FD_CLIENT = 0
FD_IN_PROXY = 1
FD_SERVER = 2
FD_OUT_PROXY = 3

RPC_OVER_HTTP_VERSION = 1  # the Version command's value ([MS-RPCH] 2.2.3.5.7)

# Defaults, as Windows clients and the IIS RPC proxy send them (values are in the spec's ranges:
# ReceiveWindowSize 8 KiB..256 KiB, ConnectionTimeout 120,000..14,400,000 ms, ChannelLifetime
# 128 KiB..2 GiB, ClientKeepalive 0 or >= 60,000 ms).
DEFAULT_CLIENT_RECEIVE_WINDOW = 0x40000  # 256 KiB, in CONN/A1
DEFAULT_PROXY_RECEIVE_WINDOW = 0x10000  # 64 KiB, in CONN/C2
DEFAULT_CONNECTION_TIMEOUT_MS = 120_000
DEFAULT_CHANNEL_LIFETIME = 0x40000000  # 1 GiB, the Content-Length Windows gives RPC_IN_DATA
DEFAULT_CLIENT_KEEPALIVE_MS = 300_000


class _Cmd:
    TYPE: ClassVar[int]

    def encode(self) -> bytes:  # pragma: no cover - every subclass overrides
        raise NotImplementedError


@dataclass(frozen=True)
class ReceiveWindowSize(_Cmd):
    TYPE: ClassVar[int] = CMD_RECEIVE_WINDOW_SIZE
    value: int

    def encode(self) -> bytes:
        return struct.pack("<II", self.TYPE, self.value)


@dataclass(frozen=True)
class FlowControlAck(_Cmd):
    """Flow control acknowledgment ([MS-RPCH] 2.2.3.4): bytes received, window left, channel cookie."""

    TYPE: ClassVar[int] = CMD_FLOW_CONTROL_ACK
    bytes_received: int
    available_window: int
    channel_cookie: uuid.UUID

    def encode(self) -> bytes:
        return struct.pack("<III", self.TYPE, self.bytes_received, self.available_window) + (self.channel_cookie.bytes_le)


@dataclass(frozen=True)
class ConnectionTimeout(_Cmd):
    TYPE: ClassVar[int] = CMD_CONNECTION_TIMEOUT
    value: int  # milliseconds

    def encode(self) -> bytes:
        return struct.pack("<II", self.TYPE, self.value)


@dataclass(frozen=True)
class Cookie(_Cmd):
    """An RTS cookie ([MS-RPCH] 2.2.3.1): a 16-byte UUID, little-endian form on the wire."""

    TYPE: ClassVar[int] = CMD_COOKIE
    value: uuid.UUID

    def encode(self) -> bytes:
        return struct.pack("<I", self.TYPE) + self.value.bytes_le


@dataclass(frozen=True)
class ChannelLifetime(_Cmd):
    TYPE: ClassVar[int] = CMD_CHANNEL_LIFETIME
    value: int  # bytes

    def encode(self) -> bytes:
        return struct.pack("<II", self.TYPE, self.value)


@dataclass(frozen=True)
class ClientKeepalive(_Cmd):
    TYPE: ClassVar[int] = CMD_CLIENT_KEEPALIVE
    value: int  # milliseconds; 0 means 300,000

    def encode(self) -> bytes:
        return struct.pack("<II", self.TYPE, self.value)


@dataclass(frozen=True)
class Version(_Cmd):
    TYPE: ClassVar[int] = CMD_VERSION
    value: int = RPC_OVER_HTTP_VERSION

    def encode(self) -> bytes:
        return struct.pack("<II", self.TYPE, self.value)


@dataclass(frozen=True)
class Empty(_Cmd):
    TYPE: ClassVar[int] = CMD_EMPTY

    def encode(self) -> bytes:
        return struct.pack("<I", self.TYPE)


@dataclass(frozen=True)
class Padding(_Cmd):
    """ConformanceCount then that many padding bytes ([MS-RPCH] 2.2.3.5.9)."""

    TYPE: ClassVar[int] = CMD_PADDING
    padding: bytes

    def encode(self) -> bytes:
        return struct.pack("<II", self.TYPE, len(self.padding)) + self.padding


@dataclass(frozen=True)
class NegativeANCE(_Cmd):
    TYPE: ClassVar[int] = CMD_NEGATIVE_ANCE

    def encode(self) -> bytes:
        return struct.pack("<I", self.TYPE)


@dataclass(frozen=True)
class ANCE(_Cmd):
    TYPE: ClassVar[int] = CMD_ANCE

    def encode(self) -> bytes:
        return struct.pack("<I", self.TYPE)


@dataclass(frozen=True)
class ClientAddress(_Cmd):
    """AddressType (0 IPv4, 1 IPv6), the address (4 or 16 bytes), 12 bytes of padding ([MS-RPCH] 2.2.3.2).

    The address bytes are kept as sent, in network order (``ipaddress``'s ``packed`` form); the spec's
    wording says "little-endian", which for an address is ambiguous, so nothing is reordered.
    """

    TYPE: ClassVar[int] = CMD_CLIENT_ADDRESS
    address: ipaddress.IPv4Address | ipaddress.IPv6Address

    def encode(self) -> bytes:
        kind = 0 if self.address.version == 4 else 1
        return struct.pack("<II", self.TYPE, kind) + self.address.packed + b"\x00" * 12


@dataclass(frozen=True)
class AssociationGroupId(_Cmd):
    TYPE: ClassVar[int] = CMD_ASSOCIATION_GROUP_ID
    value: uuid.UUID

    def encode(self) -> bytes:
        return struct.pack("<I", self.TYPE) + self.value.bytes_le


@dataclass(frozen=True)
class Destination(_Cmd):
    TYPE: ClassVar[int] = CMD_DESTINATION
    value: int  # FD_CLIENT, FD_IN_PROXY, FD_SERVER or FD_OUT_PROXY

    def encode(self) -> bytes:
        return struct.pack("<II", self.TYPE, self.value)


@dataclass(frozen=True)
class PingTrafficSentNotify(_Cmd):
    TYPE: ClassVar[int] = CMD_PING_TRAFFIC_SENT_NOTIFY
    value: int  # bytes

    def encode(self) -> bytes:
        return struct.pack("<II", self.TYPE, self.value)


RtsCommand = (
    ReceiveWindowSize
    | FlowControlAck
    | ConnectionTimeout
    | Cookie
    | ChannelLifetime
    | ClientKeepalive
    | Version
    | Empty
    | Padding
    | NegativeANCE
    | ANCE
    | ClientAddress
    | AssociationGroupId
    | Destination
    | PingTrafficSentNotify
)

COMMAND_NAMES = {
    CMD_RECEIVE_WINDOW_SIZE: "ReceiveWindowSize",
    CMD_FLOW_CONTROL_ACK: "FlowControlAck",
    CMD_CONNECTION_TIMEOUT: "ConnectionTimeout",
    CMD_COOKIE: "Cookie",
    CMD_CHANNEL_LIFETIME: "ChannelLifetime",
    CMD_CLIENT_KEEPALIVE: "ClientKeepalive",
    CMD_VERSION: "Version",
    CMD_EMPTY: "Empty",
    CMD_PADDING: "Padding",
    CMD_NEGATIVE_ANCE: "NegativeANCE",
    CMD_ANCE: "ANCE",
    CMD_CLIENT_ADDRESS: "ClientAddress",
    CMD_ASSOCIATION_GROUP_ID: "AssociationGroupId",
    CMD_DESTINATION: "Destination",
    CMD_PING_TRAFFIC_SENT_NOTIFY: "PingTrafficSentNotify",
}

_U32_COMMANDS: dict[int, type] = {
    CMD_RECEIVE_WINDOW_SIZE: ReceiveWindowSize,
    CMD_CONNECTION_TIMEOUT: ConnectionTimeout,
    CMD_CHANNEL_LIFETIME: ChannelLifetime,
    CMD_CLIENT_KEEPALIVE: ClientKeepalive,
    CMD_VERSION: Version,
    CMD_DESTINATION: Destination,
    CMD_PING_TRAFFIC_SENT_NOTIFY: PingTrafficSentNotify,
}
_BARE_COMMANDS: dict[int, type] = {CMD_EMPTY: Empty, CMD_NEGATIVE_ANCE: NegativeANCE, CMD_ANCE: ANCE}


def _need(body: bytes, offset: int, size: int, what: str) -> None:
    if offset + size > len(body):
        raise RpcProtocolError(f"the RTS PDU ends inside its {what} command.")


def _decode_command(body: bytes, offset: int) -> tuple[RtsCommand, int]:
    _need(body, offset, 4, "next")
    (ctype,) = struct.unpack_from("<I", body, offset)
    offset += 4
    name = COMMAND_NAMES.get(ctype)
    if name is None:
        raise RpcProtocolError(f"the RTS PDU holds an unknown command type {ctype:#x}.")
    if ctype in _U32_COMMANDS:
        _need(body, offset, 4, name)
        (value,) = struct.unpack_from("<I", body, offset)
        return _U32_COMMANDS[ctype](value), offset + 4
    if ctype in _BARE_COMMANDS:
        return _BARE_COMMANDS[ctype](), offset
    if ctype in (CMD_COOKIE, CMD_ASSOCIATION_GROUP_ID):
        _need(body, offset, 16, name)
        value = uuid.UUID(bytes_le=bytes(body[offset : offset + 16]))
        cls = Cookie if ctype == CMD_COOKIE else AssociationGroupId
        return cls(value), offset + 16
    if ctype == CMD_FLOW_CONTROL_ACK:
        _need(body, offset, 24, name)
        received, window = struct.unpack_from("<II", body, offset)
        cookie = uuid.UUID(bytes_le=bytes(body[offset + 8 : offset + 24]))
        return FlowControlAck(received, window, cookie), offset + 24
    if ctype == CMD_PADDING:
        _need(body, offset, 4, name)
        (count,) = struct.unpack_from("<I", body, offset)
        _need(body, offset + 4, count, name)
        return Padding(bytes(body[offset + 4 : offset + 4 + count])), offset + 4 + count
    # CMD_CLIENT_ADDRESS
    _need(body, offset, 4, name)
    (kind,) = struct.unpack_from("<I", body, offset)
    if kind not in (0, 1):
        raise RpcProtocolError(f"the RTS ClientAddress command has unknown address type {kind}.")
    size = 4 if kind == 0 else 16
    _need(body, offset + 4, size + 12, name)
    raw = bytes(body[offset + 4 : offset + 4 + size])
    address = ipaddress.IPv4Address(raw) if kind == 0 else ipaddress.IPv6Address(raw)
    return ClientAddress(address), offset + 4 + size + 12


@dataclass(frozen=True)
class RtsPdu:
    """An RTS PDU: RTS header flags and its commands, in order."""

    flags: int
    commands: tuple[RtsCommand, ...] = ()

    def encode(self) -> bytes:
        body = b"".join(c.encode() for c in self.commands)
        frag_length = RTS_HEADER_SIZE + len(body)
        header = CommonHeader(PTYPE_RTS, PFC_WHOLE, frag_length, 0, 0).encode()
        return header + struct.pack("<HH", self.flags, len(self.commands)) + body

    @property
    def command_types(self) -> tuple[int, ...]:
        return tuple(c.TYPE for c in self.commands)

    def first(self, kind: type) -> RtsCommand | None:
        """The first command of this class, or None."""
        return next((c for c in self.commands if isinstance(c, kind)), None)


def parse_rts(pdu: bytes) -> RtsPdu:
    """One whole RTS PDU into flags and commands; anything else raises RpcProtocolError."""
    header = parse_header(pdu)
    if header.ptype != PTYPE_RTS:
        raise RpcProtocolError(f"expected an RTS PDU but got a {PTYPE_NAMES.get(header.ptype, header.ptype)} PDU.")
    if header.auth_length != 0:
        raise RpcProtocolError("the RTS PDU has a non-zero auth_length, which RTS PDUs never have.")
    if header.pfc_flags != PFC_WHOLE or header.call_id != 0:  # [MS-RPCH] 2.2.3.6.1
        raise RpcProtocolError("the RTS PDU is not marked first and last fragment with call_id 0, as RTS PDUs must be.")
    if len(pdu) < RTS_HEADER_SIZE:
        raise RpcProtocolError(f"an RTS PDU needs at least 20 bytes, got {len(pdu)}.")
    flags, count = struct.unpack_from("<HH", pdu, COMMON_HEADER_SIZE)
    body = bytes(pdu[RTS_HEADER_SIZE:])
    commands: list[RtsCommand] = []
    offset = 0
    for _ in range(count):
        command, offset = _decode_command(body, offset)
        commands.append(command)
    if offset != len(body):
        raise RpcProtocolError(f"the RTS PDU has {len(body) - offset} bytes after its {count} commands.")
    return RtsPdu(flags, tuple(commands))


# ---------------------------------------------------------------------------------------------------
# The RTS PDUs of a virtual connection ([MS-RPCH] 2.2.4)

# name -> (RTS header flags, command types in order). Classification is by this exact shape.
_RTS_SHAPES: dict[str, tuple[int, tuple[int, ...]]] = {
    # 2.2.4.2, client -> outbound proxy, first bytes of the RPC_OUT_DATA body.
    "CONN/A1": (RTS_FLAG_NONE, (CMD_VERSION, CMD_COOKIE, CMD_COOKIE, CMD_RECEIVE_WINDOW_SIZE)),
    # 2.2.4.5, client -> inbound proxy, first bytes of the RPC_IN_DATA body.
    "CONN/B1": (
        RTS_FLAG_NONE,
        (CMD_VERSION, CMD_COOKIE, CMD_COOKIE, CMD_CHANNEL_LIFETIME, CMD_CLIENT_KEEPALIVE, CMD_ASSOCIATION_GROUP_ID),
    ),
    # 2.2.4.4, outbound proxy -> client, first PDU of the RPC_OUT_DATA response body.
    "CONN/A3": (RTS_FLAG_NONE, (CMD_CONNECTION_TIMEOUT,)),
    # 2.2.4.9, outbound proxy -> client: the virtual connection is open. (CONN/C1, server -> outbound
    # proxy, 2.2.4.8, has the same shape; a client only ever sees C2.)
    "CONN/C2": (RTS_FLAG_NONE, (CMD_VERSION, CMD_RECEIVE_WINDOW_SIZE, CMD_CONNECTION_TIMEOUT)),
    # 2.2.4.49
    "Ping": (RTS_FLAG_PING, ()),
    # 2.2.4.50, recipient -> sender (e.g. inbound proxy -> client on OUT, for the IN channel).
    "FlowControlAck": (RTS_FLAG_OTHER_CMD, (CMD_FLOW_CONTROL_ACK,)),
    # 2.2.4.51, e.g. client -> outbound proxy on IN (Destination FDOutProxy), for the OUT channel.
    "FlowControlAckWithDestination": (RTS_FLAG_OTHER_CMD, (CMD_DESTINATION, CMD_FLOW_CONTROL_ACK)),
    # 2.2.4.48, client -> inbound proxy, to change the keep-alive interval.
    "KeepAlive": (RTS_FLAG_OTHER_CMD, (CMD_CLIENT_KEEPALIVE,)),
    # 2.2.4.47 (the body of an echo request / response used to probe a proxy).
    "Echo": (RTS_FLAG_ECHO, ()),
}


def classify_rts(rts: RtsPdu) -> str:
    """The [MS-RPCH] 2.2.4 name of a decoded RTS PDU, or "RTS" for one not modelled here."""
    shape = (rts.flags, rts.command_types)
    for name, known in _RTS_SHAPES.items():
        if known == shape:
            return name
    return "RTS"


def classify(pdu: bytes) -> str:
    """What one whole PDU is: "CONN/A1", "CONN/B1", "CONN/A3", "CONN/C2", "Ping", "FlowControlAck",
    "FlowControlAckWithDestination", "KeepAlive", "Echo", "RTS" (any other RTS PDU), or the DCE/RPC
    name of the PTYPE ("bind", "bind_ack", "bind_nak", "request", "response", "fault", ...).

    Raises RpcProtocolError for bytes that are not a well-formed PDU.
    """
    header = parse_header(pdu)
    if header.ptype == PTYPE_RTS:
        return classify_rts(parse_rts(pdu))
    name = PTYPE_NAMES.get(header.ptype)
    if name is None:
        raise RpcProtocolError(f"the RPC PDU has unknown PTYPE {header.ptype}.")
    return name


def _expect(pdu: bytes, name: str) -> list[Any]:
    """The command values of an RTS PDU that must be the one named."""
    rts = parse_rts(pdu)
    got = classify_rts(rts)
    if got != name:
        raise RpcProtocolError(f"expected a {name} RTS PDU but got {got}.")
    return [getattr(c, "value", None) for c in rts.commands]


@dataclass(frozen=True)
class ConnA1:
    version: int
    virtual_connection_cookie: uuid.UUID
    out_channel_cookie: uuid.UUID
    receive_window_size: int


@dataclass(frozen=True)
class ConnB1:
    version: int
    virtual_connection_cookie: uuid.UUID
    in_channel_cookie: uuid.UUID
    channel_lifetime: int
    client_keepalive: int
    association_group_id: uuid.UUID


@dataclass(frozen=True)
class ConnA3:
    connection_timeout: int


@dataclass(frozen=True)
class ConnC2:
    version: int
    receive_window_size: int
    connection_timeout: int


def conn_a1(
    virtual_connection_cookie: uuid.UUID,
    out_channel_cookie: uuid.UUID,
    receive_window_size: int = DEFAULT_CLIENT_RECEIVE_WINDOW,
    version: int = RPC_OVER_HTTP_VERSION,
) -> bytes:
    """CONN/A1 ([MS-RPCH] 2.2.4.2): the client's first bytes on the OUT channel (76 bytes)."""
    return RtsPdu(
        RTS_FLAG_NONE,
        (
            Version(version),
            Cookie(virtual_connection_cookie),
            Cookie(out_channel_cookie),
            ReceiveWindowSize(receive_window_size),
        ),
    ).encode()


def conn_b1(
    virtual_connection_cookie: uuid.UUID,
    in_channel_cookie: uuid.UUID,
    association_group_id: uuid.UUID,
    channel_lifetime: int = DEFAULT_CHANNEL_LIFETIME,
    client_keepalive: int = DEFAULT_CLIENT_KEEPALIVE_MS,
    version: int = RPC_OVER_HTTP_VERSION,
) -> bytes:
    """CONN/B1 ([MS-RPCH] 2.2.4.5): the client's first bytes on the IN channel (104 bytes)."""
    return RtsPdu(
        RTS_FLAG_NONE,
        (
            Version(version),
            Cookie(virtual_connection_cookie),
            Cookie(in_channel_cookie),
            ChannelLifetime(channel_lifetime),
            ClientKeepalive(client_keepalive),
            AssociationGroupId(association_group_id),
        ),
    ).encode()


def conn_a3(connection_timeout: int = DEFAULT_CONNECTION_TIMEOUT_MS) -> bytes:
    """CONN/A3 ([MS-RPCH] 2.2.4.4): outbound proxy -> client, one ConnectionTimeout (28 bytes)."""
    return RtsPdu(RTS_FLAG_NONE, (ConnectionTimeout(connection_timeout),)).encode()


def conn_c2(
    receive_window_size: int = DEFAULT_PROXY_RECEIVE_WINDOW,
    connection_timeout: int = DEFAULT_CONNECTION_TIMEOUT_MS,
    version: int = RPC_OVER_HTTP_VERSION,
) -> bytes:
    """CONN/C2 ([MS-RPCH] 2.2.4.9): outbound proxy -> client, the connection is open (44 bytes).

    receive_window_size is the inbound proxy's window for the IN channel: how many bytes of RPC PDUs
    the client may send before it must wait for a FlowControlAck.
    """
    return RtsPdu(
        RTS_FLAG_NONE,
        (
            Version(version),
            ReceiveWindowSize(receive_window_size),
            ConnectionTimeout(connection_timeout),
        ),
    ).encode()


def ping() -> bytes:
    """Ping RTS PDU ([MS-RPCH] 2.2.4.49): flags RTS_FLAG_PING, no commands (20 bytes)."""
    return RtsPdu(RTS_FLAG_PING).encode()


def keep_alive(client_keepalive: int) -> bytes:
    """Keep-Alive RTS PDU ([MS-RPCH] 2.2.4.48), client -> inbound proxy."""
    return RtsPdu(RTS_FLAG_OTHER_CMD, (ClientKeepalive(client_keepalive),)).encode()


def flow_control_ack(
    bytes_received: int,
    available_window: int,
    channel_cookie: uuid.UUID,
    destination: int | None = None,
) -> bytes:
    """FlowControlAck RTS PDU (2.2.4.50), or FlowControlAckWithDestination (2.2.4.51) with destination.

    A client acknowledges the OUT channel with destination=FD_OUT_PROXY and the OUT channel cookie,
    sent on the IN channel; an inbound proxy acknowledges the IN channel to the client (on the OUT
    channel) without a destination and with the IN channel cookie.
    """
    ack = FlowControlAck(bytes_received, available_window, channel_cookie)
    if destination is None:
        return RtsPdu(RTS_FLAG_OTHER_CMD, (ack,)).encode()
    return RtsPdu(RTS_FLAG_OTHER_CMD, (Destination(destination), ack)).encode()


def parse_conn_a1(pdu: bytes) -> ConnA1:
    """The fields of a CONN/A1 (for the lab: the cookies that pair an OUT channel with its IN channel)."""
    c = _expect(pdu, "CONN/A1")
    return ConnA1(*c)


def parse_conn_b1(pdu: bytes) -> ConnB1:
    """The fields of a CONN/B1 (for the lab: the virtual connection cookie pairs it with the A1)."""
    c = _expect(pdu, "CONN/B1")
    return ConnB1(*c)


def parse_conn_a3(pdu: bytes) -> ConnA3:
    c = _expect(pdu, "CONN/A3")
    return ConnA3(*c)


def parse_conn_c2(pdu: bytes) -> ConnC2:
    c = _expect(pdu, "CONN/C2")
    return ConnC2(*c)


# ---------------------------------------------------------------------------------------------------
# DCE/RPC connection-oriented PDUs (C706 12.6.4, [MS-RPCE] 2.2.2)


@dataclass(frozen=True)
class AuthVerifier:
    """sec_trailer plus auth_value (C706 13.2.6.1, [MS-RPCE] 2.2.2.11). Unused here; room for it.

    auth_pad_length is filled in by the encoder (body padded to a 4-byte boundary) and reported by
    the parser.
    """

    auth_type: int
    auth_level: int
    auth_context_id: int
    auth_value: bytes
    auth_pad_length: int = 0


def _encode_pdu(ptype: int, pfc_flags: int, call_id: int, body: bytes, auth: AuthVerifier | None = None) -> bytes:
    trailer = b""
    auth_length = 0
    if auth is not None:
        pad = -(COMMON_HEADER_SIZE + len(body)) % 4
        body += b"\x00" * pad
        trailer = struct.pack("<BBBBI", auth.auth_type, auth.auth_level, pad, 0, auth.auth_context_id) + auth.auth_value
        auth_length = len(auth.auth_value)
    frag_length = COMMON_HEADER_SIZE + len(body) + len(trailer)
    if frag_length > MAX_FRAG_LENGTH:
        raise RpcProtocolError(f"the PDU would be {frag_length} bytes, more than one fragment can hold (65535).")
    return CommonHeader(ptype, pfc_flags, frag_length, auth_length, call_id).encode() + body + trailer


def _split_pdu(pdu: bytes, want: int) -> tuple[CommonHeader, bytes, AuthVerifier | None]:
    """Header, body (between the common header and any auth verifier), verifier."""
    header = parse_header(pdu)
    if header.ptype != want:
        raise RpcProtocolError(f"expected a {PTYPE_NAMES[want]} PDU but got {PTYPE_NAMES.get(header.ptype, f'PTYPE {header.ptype}')}.")
    end = len(pdu)
    auth = None
    if header.auth_length:
        start = end - header.auth_length - 8
        if start < COMMON_HEADER_SIZE:
            raise RpcProtocolError("the PDU's auth_length is larger than the PDU.")
        a_type, a_level, a_pad, _rsv, a_ctx = struct.unpack_from("<BBBBI", pdu, start)
        if start - a_pad < COMMON_HEADER_SIZE:
            raise RpcProtocolError("the PDU's auth padding is larger than its body.")
        auth = AuthVerifier(a_type, a_level, a_ctx, bytes(pdu[start + 8 :]), a_pad)
        end = start - a_pad
    return header, bytes(pdu[COMMON_HEADER_SIZE:end]), auth


def _body_need(body: bytes, size: int, what: str) -> None:
    if len(body) < size:
        raise RpcProtocolError(f"the {what} PDU is too short ({len(body) + 16} bytes).")


@dataclass(frozen=True)
class PresentationContext:
    """p_cont_elem_t: context id, abstract syntax, proposed transfer syntaxes."""

    context_id: int
    abstract_syntax: SyntaxId
    transfer_syntaxes: tuple[SyntaxId, ...] = (NDR,)

    def encode(self) -> bytes:
        return struct.pack("<HBB", self.context_id, len(self.transfer_syntaxes), 0) + (self.abstract_syntax.encode() + b"".join(t.encode() for t in self.transfer_syntaxes))


@dataclass(frozen=True)
class Bind:
    call_id: int
    contexts: tuple[PresentationContext, ...]
    max_xmit_frag: int = 5840
    max_recv_frag: int = 5840
    assoc_group_id: int = 0
    pfc_flags: int = PFC_WHOLE
    auth: AuthVerifier | None = None
    ptype: int = PTYPE_BIND  # or PTYPE_ALTER_CONTEXT, same layout

    def encode(self) -> bytes:
        body = struct.pack(
            "<HHIBBH",
            self.max_xmit_frag,
            self.max_recv_frag,
            self.assoc_group_id,
            len(self.contexts),
            0,
            0,
        ) + b"".join(c.encode() for c in self.contexts)
        return _encode_pdu(self.ptype, self.pfc_flags, self.call_id, body, self.auth)


def bind(
    call_id: int,
    abstract_syntax: SyntaxId,
    *,
    context_id: int = 0,
    transfer_syntax: SyntaxId = NDR,
    max_xmit_frag: int = 5840,
    max_recv_frag: int = 5840,
    assoc_group_id: int = 0,
    auth: AuthVerifier | None = None,
) -> bytes:
    """A bind (PTYPE 11) with one presentation context offering one transfer syntax (NDR by default).

    5840 is the fragment size Windows proposes over ncacn_http.
    """
    return Bind(
        call_id,
        (PresentationContext(context_id, abstract_syntax, (transfer_syntax,)),),
        max_xmit_frag,
        max_recv_frag,
        assoc_group_id,
        auth=auth,
    ).encode()


def parse_bind(pdu: bytes) -> Bind:
    """A bind (or alter_context) PDU with all its presentation contexts."""
    header = parse_header(pdu)
    want = PTYPE_ALTER_CONTEXT if header.ptype == PTYPE_ALTER_CONTEXT else PTYPE_BIND
    header, body, auth = _split_pdu(pdu, want)
    _body_need(body, 12, "bind")
    max_xmit, max_recv, group, n_ctx = struct.unpack_from("<HHIB", body)
    offset = 12
    contexts = []
    for _ in range(n_ctx):
        _body_need(body, offset + 24, "bind")
        ctx_id, n_ts = struct.unpack_from("<HB", body, offset)
        abstract = SyntaxId.decode(body[offset + 4 : offset + 24])
        offset += 24
        _body_need(body, offset + 20 * n_ts, "bind")
        transfers = tuple(SyntaxId.decode(body[offset + 20 * i : offset + 20 * (i + 1)]) for i in range(n_ts))
        offset += 20 * n_ts
        contexts.append(PresentationContext(ctx_id, abstract, transfers))
    return Bind(header.call_id, tuple(contexts), max_xmit, max_recv, group, header.pfc_flags, auth, want)


# p_cont_def_result_t (C706 12.6.3.1, [MS-RPCE] 2.2.2.4 adds negotiate_ack).
RESULT_ACCEPTANCE = 0
RESULT_USER_REJECTION = 1
RESULT_PROVIDER_REJECTION = 2
RESULT_NEGOTIATE_ACK = 3
# p_provider_reason_t
REASON_NOT_SPECIFIED = 0
REASON_ABSTRACT_SYNTAX_NOT_SUPPORTED = 1
REASON_PROPOSED_TRANSFER_SYNTAXES_NOT_SUPPORTED = 2
REASON_LOCAL_LIMIT_EXCEEDED = 3


@dataclass(frozen=True)
class ContextResult:
    """p_result_t: result, reason, the accepted transfer syntax (null syntax when rejected)."""

    result: int
    reason: int = REASON_NOT_SPECIFIED
    transfer_syntax: SyntaxId = NULL_SYNTAX

    @property
    def accepted(self) -> bool:
        return self.result == RESULT_ACCEPTANCE

    def encode(self) -> bytes:
        return struct.pack("<HH", self.result, self.reason) + self.transfer_syntax.encode()


def acceptance(transfer_syntax: SyntaxId = NDR) -> ContextResult:
    return ContextResult(RESULT_ACCEPTANCE, REASON_NOT_SPECIFIED, transfer_syntax)


def provider_rejection(reason: int) -> ContextResult:
    return ContextResult(RESULT_PROVIDER_REJECTION, reason, NULL_SYNTAX)


@dataclass(frozen=True)
class BindAck:
    call_id: int
    results: tuple[ContextResult, ...]
    max_xmit_frag: int = 5840
    max_recv_frag: int = 5840
    assoc_group_id: int = 0
    secondary_address: str = ""
    pfc_flags: int = PFC_WHOLE
    auth: AuthVerifier | None = None
    ptype: int = PTYPE_BIND_ACK  # or PTYPE_ALTER_CONTEXT_RESP, same layout

    def encode(self) -> bytes:
        # port_any_t: length (counting the NUL) then the string; empty means length 0, no bytes.
        addr = self.secondary_address.encode("ascii") + b"\x00" if self.secondary_address else b""
        head = struct.pack("<HHIH", self.max_xmit_frag, self.max_recv_frag, self.assoc_group_id, len(addr)) + addr
        head += b"\x00" * (-(COMMON_HEADER_SIZE + len(head)) % 4)  # align the result list
        body = head + struct.pack("<BBH", len(self.results), 0, 0) + b"".join(r.encode() for r in self.results)
        return _encode_pdu(self.ptype, self.pfc_flags, self.call_id, body, self.auth)


def bind_ack(
    call_id: int,
    results: Sequence[ContextResult],
    *,
    max_xmit_frag: int = 5840,
    max_recv_frag: int = 5840,
    assoc_group_id: int = 0,
    secondary_address: str = "",
    auth: AuthVerifier | None = None,
) -> bytes:
    """A bind_ack (PTYPE 12): one result per presentation context of the bind, in order.

    secondary_address is the server's port as a string (Exchange answers "6001" on the EMSMDB port).
    """
    return BindAck(
        call_id,
        tuple(results),
        max_xmit_frag,
        max_recv_frag,
        assoc_group_id,
        secondary_address,
        auth=auth,
    ).encode()


def parse_bind_ack(pdu: bytes) -> BindAck:
    header = parse_header(pdu)
    want = PTYPE_ALTER_CONTEXT_RESP if header.ptype == PTYPE_ALTER_CONTEXT_RESP else PTYPE_BIND_ACK
    header, body, auth = _split_pdu(pdu, want)
    _body_need(body, 10, "bind_ack")
    max_xmit, max_recv, group, addr_len = struct.unpack_from("<HHIH", body)
    offset = 10
    _body_need(body, offset + addr_len, "bind_ack")
    secondary = body[offset : offset + addr_len].rstrip(b"\x00").decode("ascii", "replace")
    offset += addr_len
    offset += -(COMMON_HEADER_SIZE + offset) % 4
    _body_need(body, offset + 4, "bind_ack")
    (n_results,) = struct.unpack_from("<B", body, offset)
    offset += 4
    _body_need(body, offset + 24 * n_results, "bind_ack")
    results = []
    for i in range(n_results):
        at = offset + 24 * i
        result, reason = struct.unpack_from("<HH", body, at)
        results.append(ContextResult(result, reason, SyntaxId.decode(body[at + 4 : at + 24])))
    return BindAck(
        header.call_id,
        tuple(results),
        max_xmit,
        max_recv,
        group,
        secondary,
        header.pfc_flags,
        auth,
        want,
    )


# p_reject_reason_t (C706 12.6.3.1; [MS-RPCE] 2.2.2.5 adds 8 and 9).
NAK_REASON_NOT_SPECIFIED = 0
NAK_TEMPORARY_CONGESTION = 1
NAK_LOCAL_LIMIT_EXCEEDED = 2
NAK_CALLED_PADDR_UNKNOWN = 3
NAK_PROTOCOL_VERSION_NOT_SUPPORTED = 4
NAK_DEFAULT_CONTEXT_NOT_SUPPORTED = 5
NAK_USER_DATA_NOT_READABLE = 6
NAK_NO_PSAP_AVAILABLE = 7
NAK_AUTHENTICATION_TYPE_NOT_RECOGNIZED = 8
NAK_INVALID_CHECKSUM = 9


@dataclass(frozen=True)
class BindNak:
    call_id: int
    reason: int
    versions: tuple[tuple[int, int], ...] = ((RPC_VERS, RPC_VERS_MINOR),)

    def encode(self) -> bytes:
        body = struct.pack("<HB", self.reason, len(self.versions)) + b"".join(struct.pack("<BB", major, minor) for major, minor in self.versions)
        body += b"\x00" * (-(COMMON_HEADER_SIZE + len(body)) % 4)
        return _encode_pdu(PTYPE_BIND_NAK, PFC_WHOLE, self.call_id, body)


def bind_nak(call_id: int, reason: int = NAK_REASON_NOT_SPECIFIED) -> bytes:
    """A bind_nak (PTYPE 13) with the reject reason and the supported versions (5.0)."""
    return BindNak(call_id, reason).encode()


def parse_bind_nak(pdu: bytes) -> BindNak:
    header, body, _auth = _split_pdu(pdu, PTYPE_BIND_NAK)
    _body_need(body, 2, "bind_nak")
    (reason,) = struct.unpack_from("<H", body)
    versions: tuple[tuple[int, int], ...] = ()
    if len(body) >= 3:  # versions are optional on the wire (C706: sent with reason 4)
        count = body[2]
        if len(body) >= 3 + 2 * count:
            versions = tuple((body[3 + 2 * i], body[4 + 2 * i]) for i in range(count))
    return BindNak(header.call_id, reason, versions)


@dataclass(frozen=True)
class Request:
    call_id: int
    opnum: int
    stub: bytes = b""
    context_id: int = 0
    alloc_hint: int | None = None  # None: the stub length
    object_uuid: uuid.UUID | None = None
    pfc_flags: int = PFC_WHOLE
    auth: AuthVerifier | None = None

    def encode(self) -> bytes:
        flags = self.pfc_flags | (PFC_OBJECT_UUID if self.object_uuid is not None else 0)
        hint = len(self.stub) if self.alloc_hint is None else self.alloc_hint
        body = struct.pack("<IHH", hint, self.context_id, self.opnum)
        if self.object_uuid is not None:
            body += self.object_uuid.bytes_le
        return _encode_pdu(PTYPE_REQUEST, flags, self.call_id, body + self.stub, self.auth)


def request(
    call_id: int,
    opnum: int,
    stub: bytes = b"",
    *,
    context_id: int = 0,
    object_uuid: uuid.UUID | None = None,
    auth: AuthVerifier | None = None,
) -> bytes:
    """A request (PTYPE 0), one fragment, stub data as given (already NDR-encoded)."""
    return Request(call_id, opnum, stub, context_id, None, object_uuid, auth=auth).encode()


def parse_request(pdu: bytes) -> Request:
    header, body, auth = _split_pdu(pdu, PTYPE_REQUEST)
    _body_need(body, 8, "request")
    hint, ctx, opnum = struct.unpack_from("<IHH", body)
    offset = 8
    obj = None
    if header.pfc_flags & PFC_OBJECT_UUID:
        _body_need(body, 24, "request")
        obj = uuid.UUID(bytes_le=body[8:24])
        offset = 24
    flags = header.pfc_flags & ~PFC_OBJECT_UUID
    return Request(header.call_id, opnum, body[offset:], ctx, hint, obj, flags, auth)


@dataclass(frozen=True)
class Response:
    call_id: int
    stub: bytes = b""
    context_id: int = 0
    alloc_hint: int | None = None
    cancel_count: int = 0
    pfc_flags: int = PFC_WHOLE
    auth: AuthVerifier | None = None

    def encode(self) -> bytes:
        hint = len(self.stub) if self.alloc_hint is None else self.alloc_hint
        body = struct.pack("<IHBB", hint, self.context_id, self.cancel_count, 0) + self.stub
        return _encode_pdu(PTYPE_RESPONSE, self.pfc_flags, self.call_id, body, self.auth)


def response(
    call_id: int,
    stub: bytes = b"",
    *,
    context_id: int = 0,
    pfc_flags: int = PFC_WHOLE,
    alloc_hint: int | None = None,
    auth: AuthVerifier | None = None,
) -> bytes:
    """A response (PTYPE 2). For a reply split over fragments pass PFC_FIRST_FRAG / PFC_LAST_FRAG."""
    return Response(call_id, stub, context_id, alloc_hint, 0, pfc_flags, auth).encode()


def parse_response(pdu: bytes) -> Response:
    header, body, auth = _split_pdu(pdu, PTYPE_RESPONSE)
    _body_need(body, 8, "response")
    hint, ctx, cancels = struct.unpack_from("<IHB", body)
    return Response(header.call_id, body[8:], ctx, hint, cancels, header.pfc_flags, auth)


# A few fault statuses (C706 appendix E, [MS-RPCE] 2.2.2.7).
NCA_S_OP_RNG_ERROR = 0x1C010002
NCA_S_UNK_IF = 0x1C010003
NCA_S_PROTO_ERROR = 0x1C01000B
RPC_S_ACCESS_DENIED = 0x00000005
NCA_S_FAULT_UNSPEC = 0x1C000012


@dataclass(frozen=True)
class Fault:
    call_id: int
    status: int
    context_id: int = 0
    cancel_count: int = 0
    stub: bytes = b""
    pfc_flags: int = PFC_WHOLE
    alloc_hint: int = 0

    def encode(self) -> bytes:
        body = struct.pack("<IHBBII", self.alloc_hint, self.context_id, self.cancel_count, 0, self.status, 0) + self.stub
        return _encode_pdu(PTYPE_FAULT, self.pfc_flags, self.call_id, body)


def fault(call_id: int, status: int, *, context_id: int = 0, did_not_execute: bool = False) -> bytes:
    """A fault (PTYPE 3) with a status (e.g. NCA_S_OP_RNG_ERROR), optionally PFC_DID_NOT_EXECUTE."""
    flags = PFC_WHOLE | (PFC_DID_NOT_EXECUTE if did_not_execute else 0)
    return Fault(call_id, status, context_id, pfc_flags=flags).encode()


def parse_fault(pdu: bytes) -> Fault:
    header, body, _auth = _split_pdu(pdu, PTYPE_FAULT)
    _body_need(body, 16, "fault")
    hint, ctx, cancels, _rsv, status, _rsv2 = struct.unpack_from("<IHBBII", body)
    return Fault(header.call_id, status, ctx, cancels, body[16:], header.pfc_flags, hint)


Pdu = RtsPdu | Bind | BindAck | BindNak | Request | Response | Fault

_PARSERS: dict[int, Callable[[bytes], Pdu]] = {
    PTYPE_RTS: parse_rts,
    PTYPE_BIND: parse_bind,
    PTYPE_ALTER_CONTEXT: parse_bind,
    PTYPE_BIND_ACK: parse_bind_ack,
    PTYPE_ALTER_CONTEXT_RESP: parse_bind_ack,
    PTYPE_BIND_NAK: parse_bind_nak,
    PTYPE_REQUEST: parse_request,
    PTYPE_RESPONSE: parse_response,
    PTYPE_FAULT: parse_fault,
}


def parse(pdu: bytes) -> Pdu:
    """Any PDU modelled here, decoded; RpcProtocolError for malformed or unmodelled ones."""
    ptype = ptype_of(pdu)
    parser = _PARSERS.get(ptype)
    if parser is None:
        raise RpcProtocolError(f"the {PTYPE_NAMES.get(ptype, f'PTYPE {ptype}')} PDU is not one this implementation reads.")
    return parser(pdu)


def answer_bind(
    bind_pdu: Bind,
    supported: Iterable[SyntaxId],
    *,
    assoc_group_id: int = 0x12345,
    secondary_address: str = str(PORT_EMSMDB),
    max_frag: int = 5840,
) -> bytes:
    """The bind_ack a server gives this bind: each context accepted when its abstract syntax is
    supported and NDR is among its transfer syntaxes, otherwise a provider rejection with the reason.
    (For the lab.)"""
    supported = set(supported)
    results = []
    for ctx in bind_pdu.contexts:
        if ctx.abstract_syntax not in supported:
            results.append(provider_rejection(REASON_ABSTRACT_SYNTAX_NOT_SUPPORTED))
        elif NDR not in ctx.transfer_syntaxes:
            results.append(provider_rejection(REASON_PROPOSED_TRANSFER_SYNTAXES_NOT_SUPPORTED))
        else:
            results.append(acceptance(NDR))
    group = bind_pdu.assoc_group_id or assoc_group_id
    ptype = PTYPE_ALTER_CONTEXT_RESP if bind_pdu.ptype == PTYPE_ALTER_CONTEXT else PTYPE_BIND_ACK
    return BindAck(
        bind_pdu.call_id,
        tuple(results),
        min(max_frag, bind_pdu.max_recv_frag),
        min(max_frag, bind_pdu.max_xmit_frag),
        group,
        secondary_address,
        ptype=ptype,
    ).encode()


# ---------------------------------------------------------------------------------------------------
# Framing: whole PDUs out of a byte stream


class PduReader:
    """Cuts a byte stream (an RPC_OUT_DATA response body, an RPC_IN_DATA request body) into whole PDUs
    by frag_length. Bounded: at most one PDU (max_frag_length bytes) is ever buffered.

    A stream that is not PDUs (for example an HTTP error page in the middle of a channel) fails at the
    first bytes that cannot be a PDU header; after an error the reader stays failed.
    """

    def __init__(self, max_frag_length: int = MAX_FRAG_LENGTH) -> None:
        if not MIN_FRAG_LENGTH <= max_frag_length <= MAX_FRAG_LENGTH:
            raise ValueError(f"max_frag_length must be in 16..65535, not {max_frag_length}")
        self.max_frag_length = max_frag_length
        self._buffer = bytearray()
        self._error: RpcProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole PDU (0 at a PDU boundary)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; returns the PDUs they complete, in order (possibly none)."""
        if self._error is not None:
            raise self._error
        self._buffer += data
        out: list[bytes] = []
        try:
            while True:
                buf = self._buffer
                _check_prefix(buf[:5])
                if len(buf) < 10:
                    break
                (frag_length,) = struct.unpack_from("<H", buf, 8)
                if frag_length < MIN_FRAG_LENGTH:
                    raise RpcProtocolError(f"an RPC PDU says it is {frag_length} bytes long, less than its own 16-byte header.")
                if frag_length > self.max_frag_length:
                    raise RpcProtocolError(f"an RPC PDU says it is {frag_length} bytes long, more than the {self.max_frag_length} allowed.")
                if len(buf) < frag_length:
                    break
                out.append(bytes(buf[:frag_length]))
                del buf[:frag_length]
        except RpcProtocolError as error:
            self._error = error
            self._buffer.clear()
            raise
        return out


# ---------------------------------------------------------------------------------------------------
# Flow control ([MS-RPCH] 3.2.1.1.4 and 3.2.2.4.1) and the client side of a virtual connection


class ReceiveWindow:
    """The receiver's side of one channel's flow control: counts RPC PDU bytes (RTS PDUs do not count)
    and says when to acknowledge: once less than half the advertised window is left.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.bytes_received = 0
        self._available = size

    def received(self, n: int) -> bool:
        """Count n bytes of RPC PDUs; True when a FlowControlAck is due (the window is then reset)."""
        self.bytes_received += n
        self._available -= n
        if self._available < self.size // 2:
            self._available = self.size
            return True
        return False


@dataclass(frozen=True)
class ConnA3Received:
    connection_timeout: int


@dataclass(frozen=True)
class ConnC2Received:
    """The virtual connection is open; receive_window_size bounds what may be sent on IN unacked."""

    version: int
    receive_window_size: int
    connection_timeout: int


@dataclass(frozen=True)
class BindAckReceived:
    bind_ack: BindAck


@dataclass(frozen=True)
class BindNakReceived:
    bind_nak: BindNak


@dataclass(frozen=True)
class ResponseReceived:
    """A whole response: the stub of all its fragments joined."""

    call_id: int
    stub: bytes
    context_id: int


@dataclass(frozen=True)
class FaultReceived:
    fault: Fault


@dataclass(frozen=True)
class RtsReceived:
    """Any RTS PDU after CONN/C2 (Ping, FlowControlAck, ...), with its name from classify."""

    name: str
    rts: RtsPdu


Event = ConnA3Received | ConnC2Received | BindAckReceived | BindNakReceived | ResponseReceived | FaultReceived | RtsReceived


@dataclass
class ClientVirtualConnection:
    """A client's virtual connection as Outlook opens it (sans-IO).

    1. Send ``out_channel_opening()`` as the start of the RPC_OUT_DATA request body and
       ``in_channel_opening()`` as the start of the RPC_IN_DATA request body.
    2. Feed every byte of the RPC_OUT_DATA response body to ``feed_out``; it returns events:
       ConnA3Received, then ConnC2Received (state "open"), then BindAckReceived / ResponseReceived /
       FaultReceived / ... as they come.
    3. Send ``bind(...)`` and ``request(...)`` bytes on the IN channel; also send
       ``take_in_channel_bytes()`` there after each feed (flow control acknowledgments for the OUT
       channel, which the outbound proxy waits for once half its window is used).
    """

    virtual_connection_cookie: uuid.UUID = field(default_factory=uuid.uuid4)
    out_channel_cookie: uuid.UUID = field(default_factory=uuid.uuid4)
    in_channel_cookie: uuid.UUID = field(default_factory=uuid.uuid4)
    association_group_id: uuid.UUID = field(default_factory=uuid.uuid4)
    receive_window_size: int = DEFAULT_CLIENT_RECEIVE_WINDOW
    max_frag_length: int = MAX_FRAG_LENGTH
    state: str = field(default="opening", init=False)  # -> "a3" (CONN/A3 seen) -> "open" (CONN/C2 seen)
    connection_timeout: int | None = field(default=None, init=False)  # from CONN/A3, milliseconds
    in_window: int | None = field(default=None, init=False)  # from CONN/C2: IN channel bytes unacked

    def __post_init__(self) -> None:
        self._reader = PduReader(self.max_frag_length)
        self._window = ReceiveWindow(self.receive_window_size)
        self._in_outbox = bytearray()
        self._next_call_id = 1
        self._partial: dict[int, bytearray] = {}

    def out_channel_opening(self) -> bytes:
        return conn_a1(self.virtual_connection_cookie, self.out_channel_cookie, self.receive_window_size)

    def in_channel_opening(self) -> bytes:
        return conn_b1(self.virtual_connection_cookie, self.in_channel_cookie, self.association_group_id)

    def _call_id(self, call_id: int | None) -> int:
        if call_id is None:
            call_id = self._next_call_id
        self._next_call_id = max(self._next_call_id, call_id + 1)
        return call_id

    def bind(self, abstract_syntax: SyntaxId, *, call_id: int | None = None, context_id: int = 0) -> bytes:
        """A bind for the IN channel (send it once the connection is open)."""
        return bind(self._call_id(call_id), abstract_syntax, context_id=context_id)

    def request(self, opnum: int, stub: bytes = b"", *, call_id: int | None = None, context_id: int = 0) -> bytes:
        return request(self._call_id(call_id), opnum, stub, context_id=context_id)

    def take_in_channel_bytes(self) -> bytes:
        """RTS PDUs the client owes on the IN channel (flow control acks); empty when none."""
        data = bytes(self._in_outbox)
        self._in_outbox.clear()
        return data

    def feed_out(self, data: bytes) -> list[Event]:
        """Bytes of the RPC_OUT_DATA response body; returns what they completed."""
        events: list[Event] = []
        for pdu in self._reader.feed(data):
            events.extend(self._handle(pdu))
        return events

    def _handle(self, pdu: bytes) -> list[Event]:
        header = parse_header(pdu)
        if self.state == "opening":
            a3 = parse_conn_a3(pdu)  # the first PDU on the OUT channel must be CONN/A3
            self.state = "a3"
            self.connection_timeout = a3.connection_timeout
            return [ConnA3Received(a3.connection_timeout)]
        if self.state == "a3":
            c2 = parse_conn_c2(pdu)  # then CONN/C2
            self.state = "open"
            self.in_window = c2.receive_window_size
            return [ConnC2Received(c2.version, c2.receive_window_size, c2.connection_timeout)]
        if header.ptype == PTYPE_RTS:
            rts = parse_rts(pdu)
            return [RtsReceived(classify_rts(rts), rts)]
        if self._window.received(len(pdu)):
            self._in_outbox += flow_control_ack(
                self._window.bytes_received,
                self.receive_window_size,
                self.out_channel_cookie,
                FD_OUT_PROXY,
            )
        parsed = parse(pdu)
        if isinstance(parsed, BindAck):
            return [BindAckReceived(parsed)]
        if isinstance(parsed, BindNak):
            return [BindNakReceived(parsed)]
        if isinstance(parsed, Fault):
            self._partial.pop(parsed.call_id, None)
            return [FaultReceived(parsed)]
        if isinstance(parsed, Response):
            if parsed.pfc_flags & PFC_FIRST_FRAG:
                self._partial[parsed.call_id] = bytearray()
            buf = self._partial.get(parsed.call_id)
            if buf is None:
                raise RpcProtocolError(f"a response fragment for call {parsed.call_id} came without its first fragment.")
            buf += parsed.stub
            if not parsed.pfc_flags & PFC_LAST_FRAG:
                return []
            del self._partial[parsed.call_id]
            return [ResponseReceived(parsed.call_id, bytes(buf), parsed.context_id)]
        raise RpcProtocolError(f"a {PTYPE_NAMES.get(header.ptype, header.ptype)} PDU is not one a client receives.")
