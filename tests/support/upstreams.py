"""A scripted upstream: a TLS server that answers byte for byte what a test's script writes, for the
framing edge cases a real IIS can produce (the ``scripted_bridges`` fixture puts a bridge in front)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path

from bridge.certs.keys import LocalCA, new_private_key, write_pair


class ScriptedUpstream:
    """A TLS server on its own loop; each connection runs ``script(reader, writer)``."""

    def __init__(self, script, directory: Path, ca: LocalCA) -> None:
        key = new_private_key("ecdsa-p256")
        cert, key_path = write_pair(directory, ca.issue(["upstream.lab.test"], key), key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key_path))
        self.script = script
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def answer_each_request(reader, writer, answer: bytes, seen: list[bytes] | None = None) -> None:
    """A script: the same answer to every request head (each head appended to seen, if given)."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.append(head)
        writer.write(answer)
        await writer.drain()


# Every shape of answer, for one keep-alive connection: (what the upstream writes, status and body the client must get).
ANSWERS = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, b"hello"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nworld", 200, b"world"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", 200, b"abcde"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n" + b"L" * 20000, 200, b"L" * 20000),
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", 304, b""),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok"),
    (b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: NTLM\r\nContent-Length: 0\r\n\r\n", 401, b""),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nend", 200, b"end"),
]
