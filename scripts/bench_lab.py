"""The benchmark's workloads against the lab (scripts/bench.py): Outlook Anywhere and a large IMAP FETCH.

- ``outlook_anywhere``: N virtual connections (an RPC_OUT_DATA and an RPC_IN_DATA channel each, as
  Outlook opens them: CONN/A1, CONN/B1, CONN/C2, a bind to EMSMDB), then each sends echo requests
  (the lab's opnum 200: the stub comes back on the OUT channel) one after another for the duration,
  stubs of mixed sizes from 100 B to 64 KiB. Counted: request PDUs echoed per second and the round
  trip of each (request written -> whole echo read).
- ``imap_fetch``: LOGIN, SELECT INBOX, then FETCH of the 25 MB message ``count`` times on one session;
  MB/s of the FETCH answers.

Both run against a proxy (TLS 1.2/1.3 with the bench's CA) or the lab itself (TLS 1.0: its ceiling).
The client is asyncio (uvloop when installed) in the bench process.
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from bridge.lab import rpch
from bridge.protocol import rts

RPC_TARGET = "/rpc/rpcproxy.dll?EXCH2007.lab.local:6001"
IN_CHANNEL_LENGTH = 0x40000000  # 1 GiB: the IN channel's body never ends during the run
USER, PASSWORD = "LAB\\alice", "Passw0rd!"
MIN_STUB, MAX_STUB = 100, 64 * 1024 - 100  # (a request PDU's frag_length is 16 bits)
LARGE_MESSAGE = 5  # the 25 MB message's sequence number in the lab's INBOX


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def stub_sizes(seed: int, count: int) -> list[int]:
    """Log-uniform sizes from MIN_STUB to MAX_STUB (many small PDUs, some large), the same every run."""
    rng = random.Random(seed)
    low, high = math.log(MIN_STUB), math.log(MAX_STUB)
    return [int(math.exp(rng.uniform(low, high))) for _ in range(count)]


def legacy_client_context() -> ssl.SSLContext:
    """A client of the TLS-1.0-only lab (its ceiling, measured without a proxy)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("AES128-SHA:AES256-SHA:@SECLEVEL=0")
    return context


@dataclass
class Target:
    port: int
    context: ssl.SSLContext
    server_hostname: str | None
    host_header: str


@dataclass
class OaResult:
    calls: int = 0
    stub_bytes: int = 0
    round_trips: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head


class OaClient:
    """One virtual connection through the proxy (two TLS connections)."""

    def __init__(self, target: Target, sizes: list[int]) -> None:
        self.target = target
        self.sizes = sizes
        self.vc = rts.ClientVirtualConnection(receive_window_size=0x40000000)
        self.events: list[Any] = []
        self.out_reader: asyncio.StreamReader
        self.in_writer: asyncio.StreamWriter
        self.writers: list[asyncio.StreamWriter] = []

    async def open(self) -> None:
        t = self.target
        authorization = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port, ssl=t.context, server_hostname=t.server_hostname)
        self.writers.append(writer)
        opening = self.vc.out_channel_opening()
        writer.write(f"RPC_OUT_DATA {RPC_TARGET} HTTP/1.1\r\nHost: {t.host_header}\r\nAuthorization: {authorization}\r\nContent-Length: {len(opening)}\r\n\r\n".encode() + opening)
        status, head = await _read_head(reader)
        if status != 200:
            raise RuntimeError(f"RPC_OUT_DATA answered {status}: {head[:200]!r}")
        self.out_reader = reader
        in_reader, in_writer = await asyncio.open_connection("127.0.0.1", t.port, ssl=t.context, server_hostname=t.server_hostname)
        self.writers.append(in_writer)
        self.in_writer = in_writer
        in_writer.write(
            f"RPC_IN_DATA {RPC_TARGET} HTTP/1.1\r\nHost: {t.host_header}\r\nAuthorization: {authorization}\r\nContent-Length: {IN_CHANNEL_LENGTH}\r\n\r\n".encode() + self.vc.in_channel_opening()
        )
        await self.wait_for(rts.ConnC2Received)
        self.send(self.vc.bind(rts.EMSMDB))
        await self.wait_for(rts.BindAckReceived)

    def send(self, pdu: bytes) -> None:
        self.in_writer.write(pdu + self.vc.take_in_channel_bytes())

    async def wait_for(self, kind: type) -> Any:
        while True:
            for index, event in enumerate(self.events):
                if isinstance(event, kind):
                    del self.events[: index + 1]
                    return event
                if isinstance(event, rts.FaultReceived):
                    raise RuntimeError(f"the lab answered a fault: {event}")
            data = await self.out_reader.read(262144)
            if not data:
                raise RuntimeError("the OUT channel closed")
            self.events.extend(self.vc.feed_out(data))

    async def run(self, until: float, result: OaResult, offset: int) -> None:
        pattern = bytes(range(256)) * (MAX_STUB // 256 + 1)
        index = offset
        clock = time.perf_counter
        while clock() < until:
            size = self.sizes[index % len(self.sizes)]
            index += 1
            stub = pattern[:size]
            started = clock()
            self.send(self.vc.request(rpch.LAB_ECHO_OPNUM, stub))
            answer = await self.wait_for(rts.ResponseReceived)
            elapsed = clock() - started
            if len(answer.stub) != size or answer.stub != stub:
                raise RuntimeError(f"the echo of a {size}-byte stub came back as {len(answer.stub)} different bytes")
            result.calls += 1
            result.stub_bytes += size
            result.round_trips.append(elapsed)

    def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()


async def _outlook_anywhere(target: Target, connections: int, seconds: float, warmup: float) -> tuple[OaResult, float]:
    sizes = stub_sizes(2007, 4096)
    clients = [OaClient(target, sizes) for _ in range(connections)]
    semaphore = asyncio.Semaphore(16)

    async def open_one(client: OaClient) -> None:
        async with semaphore:
            await asyncio.wait_for(client.open(), 60)

    try:
        await asyncio.gather(*(open_one(client) for client in clients))
        if warmup > 0:
            warm = OaResult()
            end = time.perf_counter() + warmup
            await asyncio.gather(*(client.run(end, warm, index * 97) for index, client in enumerate(clients)))
        result = OaResult()
        started = time.perf_counter()
        end = started + seconds
        await asyncio.gather(*(client.run(end, result, index * 131) for index, client in enumerate(clients)))
        return result, time.perf_counter() - started
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0.1)


def outlook_anywhere(target: Target, connections: int, seconds: float, warmup: float = 1.0) -> dict[str, float]:
    """PDUs/s and round-trip p50/p99 (ms) of ``connections`` virtual connections echoing for ``seconds``."""
    loop = new_loop()
    try:
        result, elapsed = loop.run_until_complete(_outlook_anywhere(target, connections, seconds, warmup))
    finally:
        loop.close()
    trips = sorted(result.round_trips)
    if not trips:
        raise RuntimeError("no Outlook Anywhere call completed")
    return {
        "oa_pdus_s": result.calls / elapsed,
        "oa_p50_ms": trips[len(trips) // 2] * 1000,
        "oa_p99_ms": trips[min(len(trips) - 1, int(len(trips) * 0.99))] * 1000,
        "oa_mb_s": 2 * result.stub_bytes / elapsed / 1e6,
        "oa_calls": result.calls,
    }


# ---- IMAP ---------------------------------------------------------------------------------------
_LITERAL = re.compile(rb"\{(\d+)\}\r\n")


async def _tagged(reader: asyncio.StreamReader, tag: bytes) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise RuntimeError("the IMAP connection closed")
        if line.startswith(tag + b" "):
            if not line.startswith(tag + b" OK"):
                raise RuntimeError(f"IMAP answered {line!r}")
            return line


async def _imap_fetch(target: Target, count: int) -> tuple[int, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port, ssl=target.context, server_hostname=target.server_hostname, limit=1 << 20)
    try:
        greeting = await reader.readline()
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"IMAP greeting {greeting!r}")
        writer.write(f'a1 LOGIN alice "{PASSWORD}"\r\n'.encode())
        await _tagged(reader, b"a1")
        writer.write(b"a2 SELECT INBOX\r\n")
        await _tagged(reader, b"a2")
        moved = 0
        started = time.perf_counter()
        for number in range(count):
            tag = b"f%d" % number
            writer.write(tag + b" FETCH %d BODY.PEEK[]\r\n" % LARGE_MESSAGE)
            line = await reader.readline()
            match = _LITERAL.search(line)
            if not match:
                raise RuntimeError(f"unexpected FETCH answer {line[:200]!r}")
            left = int(match.group(1))
            while left:
                chunk = await reader.read(min(left, 1 << 20))
                if not chunk:
                    raise RuntimeError("the IMAP connection closed inside the literal")
                left -= len(chunk)
            moved += int(match.group(1))
            await _tagged(reader, tag)
        elapsed = time.perf_counter() - started
        writer.write(b"z LOGOUT\r\n")
        return moved, elapsed
    finally:
        writer.transport.abort()


def imap_fetch(target: Target, count: int) -> tuple[int, float]:
    """(bytes of the message literals, seconds) for ``count`` FETCHes of the 25 MB message on one session."""
    loop = new_loop()
    try:
        return loop.run_until_complete(_imap_fetch(target, count))
    finally:
        loop.close()
