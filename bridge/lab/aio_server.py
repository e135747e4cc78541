"""An aiohttp low-level server that accepts any HTTP method token and knows its connections.

aiohttp's compiled (llhttp) request parser answers ``400 Invalid method encountered`` to
Outlook Anywhere's ``RPC_IN_DATA``/``RPC_OUT_DATA``. Its pure-Python parser accepts every RFC 9110
method token, so each connection's handler swaps the parser for the Python one. The low-level
``web.Server`` (no ``Application``) also never answers ``Expect: 100-continue`` on its own, which
lets the proxy relay the origin's decision instead.

It serves the lab (a simulated IIS); the bridge's own ports run bridge.net.front. Each connection
carries a ``ConnectionState`` (reachable as ``request.protocol.state``) whose close callbacks run when
the client goes away: the lab keeps its NTLM state there, bound to the connection as IIS does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from bridge.net.channel import ConnectionState

log = logging.getLogger("bridge.http")

Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]

MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128


class AnyMethodRequestHandler(RequestHandler):
    """RequestHandler using the pure-Python parser (accepts any method token)."""

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        read_bufsize = kwargs.get("read_bufsize", 2**16)
        self._parser = HttpRequestParserPy(
            self,
            loop,
            read_bufsize,
            max_line_size=kwargs.get("max_line_size", MAX_LINE_SIZE),
            max_field_size=kwargs.get("max_field_size", MAX_FIELD_SIZE),
            max_headers=kwargs.get("max_headers", MAX_HEADERS),
            payload_exception=RequestPayloadError,
            auto_decompress=False,
        )
        self.state = ConnectionState(peer="")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.state.peer = peer[0] if peer else ""

    def connection_lost(self, exc: BaseException | None) -> None:
        self.state.run_close_callbacks()
        super().connection_lost(exc)


class AnyMethodServer(web.Server):
    """web.Server whose connections use AnyMethodRequestHandler."""

    def __call__(self) -> RequestHandler:
        return AnyMethodRequestHandler(self, loop=self._loop, **self._kwargs)


def connection_state(request: BaseRequest) -> ConnectionState:
    return request.protocol.state  # type: ignore[attr-defined]  # AnyMethodRequestHandler, the protocol here, adds .state


async def start_site(
    handler: Handler,
    host: str | None,
    port: int,
    *,
    ssl_context: Any = None,
    keepalive_timeout: float = 75.0,
    backlog: int = 1024,
) -> web.ServerRunner:
    """Start serving ``handler`` on host:port (the lab); raises OSError when the port cannot be bound."""
    server = AnyMethodServer(
        handler,
        keepalive_timeout=keepalive_timeout,
        access_log=None,
        max_line_size=MAX_LINE_SIZE,
        max_field_size=MAX_FIELD_SIZE,
        lingering_time=5.0,
        handler_cancellation=True,
    )
    runner = web.ServerRunner(server, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host=host, port=port, ssl_context=ssl_context, backlog=backlog, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.ServerRunner) -> int:
    """The port a runner actually listens on (useful with port 0)."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("runner has no listening socket")
