"""Byte channels with back-pressure: the one protocol both legs of a relayed connection use.

A ``Channel`` keeps what the transport delivered as a list of the received ``bytes`` objects (a
chunk read whole is handed on without a copy), pauses the transport's reading above ``READ_HIGH``
and resumes it below, and lets a writer wait while the transport's write buffer is full. It is
deliberately small: HTTP/1.1 itself lives in bridge.protocol.http1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("bridge.http")

READ_HIGH = 256 * 1024  # buffered received bytes before the transport stops reading
WRITE_HIGH = 256 * 1024  # queued bytes before a writer waits in drain()


class ChannelClosed(ConnectionError):
    """The peer went away while the bridge was writing to it."""


class Channel(asyncio.Protocol):
    # Slots, not a __dict__ per connection: an idle keep-alive connection is two channels (and the
    # bridge may hold a thousand of them).
    __slots__ = ("loop", "transport", "chunks", "buffered", "eof", "lost", "reading_paused", "writing_paused", "waiter", "drain_waiter", "received", "on_data")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.eof = False  # the peer has finished sending (or the connection is gone)
        self.lost = False  # connection_lost has run
        self.reading_paused = False
        self.writing_paused = False
        self.waiter: asyncio.Future | None = None
        self.drain_waiter: asyncio.Future | None = None
        self.received = 0  # bytes delivered by the transport, for idle detection
        self.on_data: Callable[[], None] | None = None  # called instead of waking a reader (bridge.proxy's fast path)

    # ---- transport callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream connection's transport is a Transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]  # as above

    def data_received(self, data: bytes) -> None:
        if not self.keep(data):
            return
        if self.on_data is not None:
            self.on_data()
        else:
            self.wake()

    def keep(self, data: bytes) -> bool:
        """Buffer received bytes (pausing the transport above READ_HIGH); False for none."""
        if not data:
            return False
        self.chunks.append(data)
        self.buffered += len(data)
        self.received += len(data)
        if self.buffered > READ_HIGH and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        return True

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.on_data is not None:
            self.on_data()
        self.wake()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.eof = True
        if self.on_data is not None:
            self.on_data()
        self.wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- reading ---------------------------------------------------------------------------
    async def wait_for_data(self) -> None:
        """Until more bytes arrive or the peer has finished."""
        waiter = self.waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` buffered bytes (b"" when none are buffered)."""
        chunks = self.chunks
        if not chunks:
            return b""
        first = chunks[0]
        if len(first) <= limit:
            del chunks[0]
            data = first
        else:
            data, chunks[0] = first[:limit], first[limit:]
        self.buffered -= len(data)
        if self.reading_paused and self.buffered <= READ_HIGH // 2:
            self.reading_paused = False
            if self.transport is not None and not self.lost:
                self.transport.resume_reading()
        return data

    def peek_all(self) -> bytes:
        """Everything buffered as one bytes object (joined in place, nothing consumed)."""
        chunks = self.chunks
        if len(chunks) > 1:
            chunks[:] = [b"".join(chunks)]
        return chunks[0] if chunks else b""

    def consume(self, count: int) -> None:
        """Drop ``count`` bytes of what peek_all() returned."""
        first = self.chunks[0]
        if count >= len(first):
            del self.chunks[0]
        else:
            self.chunks[0] = first[count:]
        self.buffered -= count
        if self.reading_paused and self.buffered <= READ_HIGH // 2:
            self.reading_paused = False
            if self.transport is not None and not self.lost:
                self.transport.resume_reading()

    def unread(self, data: bytes) -> None:
        """Put bytes taken too far back in front of the buffer (e.g. what follows a chunked body)."""
        if data:
            self.chunks.insert(0, bytes(data))
            self.buffered += len(data)

    async def read_some(self, limit: int) -> bytes:
        """The next bytes (at most ``limit``), waiting for them; b"" once the peer has finished."""
        while not self.chunks:
            if self.eof:
                return b""
            await self.wait_for_data()
        return self.take(limit)

    # ---- writing ---------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is None or self.lost:
            raise ChannelClosed("the connection is closed")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        while self.writing_paused and not self.lost:
            waiter = self.drain_waiter = self.loop.create_future()
            await waiter
        if self.lost:
            raise ChannelClosed("the connection is closed")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def closing(self) -> bool:
        return self.lost or self.transport is None or self.transport.is_closing()


class ConnectionState:
    """Per-client-connection data that must never leak to another connection."""

    __slots__ = ("peer", "data", "_on_close", "closed")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.data: dict[str, Any] = {}
        self._on_close: list[Callable[[], None]] = []
        self.closed = False

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def run_close_callbacks(self) -> None:
        self.closed = True
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a failing cleanup must not stop the others
                log.exception("connection cleanup failed")
