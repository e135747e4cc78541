#!/usr/bin/env python3
"""The floor of a Python proxy on this stack: bytes relayed between a TLS 1.2/1.3 server side and a
TLS 1.0 client side on uvloop and Python's ``ssl``, and nothing else (no HTTP parsing, no checks, no
access log, no counters). Not a proxy anyone should run: a measuring stick.

It takes ``bridge up``'s arguments (it reads --bind, --https-port, --cert, --key and --legacy and
ignores the rest), so that scripts/count_instructions.py can count it in the bridge's place:

    .venv/bin/python scripts/count_instructions.py --bridge scripts/relay_floor.py

What it counts per small request is what uvloop, Python's ``ssl`` and OpenSSL cost on their own; the
bridge's count less this one is the bridge's own request path (docs/benchmark.md).
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import uvloop


def options(argv: list[str]) -> dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.client.transport.close()  # type: ignore[union-attr]


class Client(asyncio.Protocol):
    def __init__(self, legacy: tuple[str, int], context: ssl.SSLContext) -> None:
        self.legacy = legacy
        self.context = context
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        host, port = self.legacy
        _, upstream = await asyncio.get_running_loop().create_connection(lambda: Upstream(self), host, port, ssl=self.context)
        self.upstream = upstream
        for data in self.pending:
            upstream.transport.write(data)  # type: ignore[union-attr]
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(argv: list[str]) -> None:
    given = options(argv)
    front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    front.minimum_version = ssl.TLSVersion.TLSv1_2
    front.load_cert_chain(given["--cert"], given["--key"])
    legacy = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    legacy.minimum_version = ssl.TLSVersion.TLSv1
    legacy.set_ciphers("DEFAULT:AES128-SHA:AES256-SHA:@SECLEVEL=0")
    legacy.check_hostname = False
    legacy.verify_mode = ssl.CERT_NONE  # a measuring stick on loopback, never a proxy in use
    host, port = given["--legacy"].rsplit(":", 1)
    server = await asyncio.get_running_loop().create_server(lambda: Client((host, int(port)), legacy), given.get("--bind", "127.0.0.1"), int(given["--https-port"]), ssl=front)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(serve(sys.argv[1:]))
