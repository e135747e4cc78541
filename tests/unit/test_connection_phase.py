"""Unit tests of a client connection's lifecycle (bridge.net.front.Phase) and Channel.unread: the
transitions the proxy drives through the connection's methods, without sockets."""

from __future__ import annotations

from types import SimpleNamespace

from bridge.net.channel import Channel
from bridge.net.front import BUSY, ClientConnection, Exchange, Phase
from bridge.protocol.http1 import parse_request_head

GET = b"GET /owa/ HTTP/1.1\r\nHost: bridge.example\r\n\r\n"


class FakeFast:
    def __init__(self) -> None:
        self.started: list = []
        self.abandoned: list = []

    def start_fast(self, client) -> bool:
        self.started.append(client.peek_all())
        return False

    def continue_fast(self, client) -> None:
        pass

    def fast_expired(self, client) -> None:
        pass

    def fast_abandoned(self, client, exchange) -> None:
        self.abandoned.append(exchange)


def connection(fast=None) -> ClientConnection:
    server = SimpleNamespace(guard=SimpleNamespace(header_timeout=15.0), fast=fast, draining=False, keepalive_timeout=60.0, connections=set())
    return ClientConnection(server)  # type: ignore[arg-type]


async def test_a_fast_exchange_moves_through_the_connections_methods():
    fast = FakeFast()
    client = connection(fast)
    assert client.phase is Phase.READING_HEAD and not client.in_request
    client.keep(GET)
    exchange = Exchange(parse_request_head(GET), SimpleNamespace(name="legacy:443"))  # type: ignore[arg-type]
    client.begin_fast(len(GET), exchange, 30.0)
    assert client.phase is Phase.FAST and client.exchange is exchange and client.in_request
    assert client.buffered == 0 and client.requests == 1 and client.idle_limit == 30.0
    assert exchange.upstream == "legacy:443" and exchange.body_done
    client.fall_back()
    assert client.phase is Phase.HANDED_BACK and client.phase in BUSY
    assert await client.read_request_head() == b"pending" and client.phase is Phase.IN_REQUEST


async def test_end_fast_keeps_or_closes_and_offers_pipelined_bytes_to_the_fast_path():
    fast = FakeFast()
    client = connection(fast)
    client.keep(GET)
    client.begin_fast(len(GET), Exchange(parse_request_head(GET)), 30.0)
    client.keep(GET)  # pipelined behind the fast exchange
    client.end_fast(True)
    assert client.phase is Phase.IDLE and client.exchange is None and client.idle_limit == 0.0
    assert fast.started == [GET]  # offered to the fast path (which declined it here)
    client.end_fast(False)
    assert client.phase is Phase.CLOSED and client.finished
    assert await client.read_request_head() is None


async def test_the_sweeper_expires_a_waiting_connection_only():
    client = connection()
    client.phase = Phase.IDLE
    client.idle_since = 0.0
    client.head_since = 0.0
    client.check_deadlines(30.0)
    assert client.phase is Phase.IDLE
    client.check_deadlines(61.0)
    assert client.phase is Phase.EXPIRED
    client.phase = Phase.IN_REQUEST
    client.check_deadlines(1000.0)
    assert client.phase is Phase.IN_REQUEST


async def test_channel_unread_puts_bytes_back_in_front():
    channel = Channel()
    channel.keep(b"world")
    channel.unread(b"hello ")
    assert channel.buffered == 11 and channel.peek_all() == b"hello world"
    channel.unread(b"")
    assert channel.buffered == 11
