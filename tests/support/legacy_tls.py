"""Legacy servers OpenSSL 3 cannot talk to, built from TLS records by hand.

``Rc4OnlyServer`` speaks the TLS record layer as a Windows 2003 without KB948963 does on the wire: to a
ClientHello offering one of its RC4 suites it answers with a ServerHello choosing it; to any other it
answers handshake_failure, which is all this machine's OpenSSL (no RC4) ever sees. A bare TCP connect
(a reachability check) gets nothing.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

from support.net import ThreadedServer

RC4_SHA, RC4_MD5 = 0x0005, 0x0004
AES128_SHA = 0x002F
HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x01\x00\x02\x02\x28"


def offered_suites(client_hello: bytes) -> list[int]:
    """The cipher suites of a ClientHello handshake message (the record's body)."""
    body = client_hello[4:]  # handshake type + 24-bit length
    session_id_length = body[34]
    offset = 35 + session_id_length
    length = struct.unpack("!H", body[offset : offset + 2])[0]
    raw = body[offset + 2 : offset + 2 + length]
    return [struct.unpack("!H", raw[i : i + 2])[0] for i in range(0, len(raw), 2)]


def server_hello(suite: int) -> bytes:
    """A TLS 1.0 ServerHello record choosing suite, with no extensions at all."""
    body = b"\x03\x01" + b"\x11" * 32 + b"\x00" + struct.pack("!H", suite) + b"\x00"
    handshake = b"\x02" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def read_record(connection: socket.socket) -> bytes:
    """One TLS record, header included (what came, if the peer closes first)."""
    data = b""
    while len(data) < 5 or len(data) < 5 + struct.unpack("!H", data[3:5])[0]:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


class Rc4OnlyServer(ThreadedServer):
    """A legacy server that offers only RC4 (by default RC4-SHA and RC4-MD5) on 127.0.0.1:port."""

    def __init__(self, suites: tuple[int, ...] = (RC4_SHA, RC4_MD5)) -> None:
        self.suites = suites
        super().__init__()

    def handle(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(2)
            try:
                connection.sendall(self.answer(read_record(connection)))
                time.sleep(0.05)
            except (OSError, IndexError, struct.error):  # a client gone, or a hello too short to parse
                pass

    def answer(self, record: bytes) -> bytes:
        if len(record) < 5 + 42:  # a bare TCP connect sends nothing
            return b""
        chosen = next((suite for suite in offered_suites(record[5:]) if suite in self.suites), None)
        return server_hello(chosen) if chosen else HANDSHAKE_FAILURE_ALERT


async def no_rfc5746_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers any ClientHello with a TLS 1.0 ServerHello choosing AES128-SHA and no extensions at all."""
    try:
        header = await reader.readexactly(5)
        await reader.readexactly(struct.unpack("!H", header[3:5])[0])
        writer.write(server_hello(AES128_SHA))
        await writer.drain()
        await asyncio.sleep(0.2)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
