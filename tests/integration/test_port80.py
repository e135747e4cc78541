"""Port 80 on the bridge's own HTTP/1.1 server: ACME HTTP-01 answers, redirects, and what hostile
or slow clients get (real sockets, curl as a client this project did not write)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.config import BridgeConfig
from bridge.net.front import FrontServer
from bridge.proxy.port80 import Redirector
from bridge.runtime.app import start_redirector

FQDN = "bridge.lab.test"
TOKEN, KEY_AUTHORIZATION = "tok-123_ABC", "tok-123_ABC.thumbprint-xyz"


@pytest.fixture
async def port80(tmp_path: Path) -> AsyncIterator[tuple[Redirector, FrontServer]]:
    config = BridgeConfig(fqdn=FQDN, bind="127.0.0.1", http_port=0, https_port=8443, header_timeout=1.0, state_dir=tmp_path)
    redirector, server = await start_redirector(config, {TOKEN: KEY_AUTHORIZATION})
    yield redirector, server
    await server.cleanup()


async def exchange(port: int, data: bytes, *, read_for: float = 2.0) -> bytes:
    """Send ``data``, then read until the server closes (or ``read_for`` seconds pass)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = b""
    try:
        async with asyncio.timeout(read_for):
            while chunk := await reader.read(65536):
                answer += chunk
    except TimeoutError:
        pass
    writer.close()
    return answer


async def test_acme_challenge_is_answered_and_unknown_tokens_are_404(port80) -> None:
    _, server = port80
    answer = await exchange(server.port, f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\nHost: {FQDN}\r\nConnection: close\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body.strip() == KEY_AUTHORIZATION.encode()
    answer = await exchange(server.port, f"GET /.well-known/acme-challenge/other HTTP/1.1\r\nHost: {FQDN}\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404 ")


async def test_everything_else_redirects_to_https_with_the_path_and_keeps_the_connection(port80) -> None:
    redirector, server = port80
    redirector.set_https_port(443)
    request = f"GET /owa/?a=1 HTTP/1.1\r\nHost: {FQDN}\r\n\r\n".encode()
    answer = await exchange(server.port, request + request.replace(b"/owa/?a=1", b"/EWS/Exchange.asmx") + b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 301 ") == 3, answer
    assert f"Location: https://{FQDN}/owa/?a=1\r\n".encode() in answer
    assert f"Location: https://{FQDN}/EWS/Exchange.asmx\r\n".encode() in answer


async def test_curl_follows_nothing_but_sees_the_redirect(port80) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    redirector, server = port80
    redirector.set_https_port(8443)
    result = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", f"http://127.0.0.1:{server.port}/owa/"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.stdout == f"301 https://{FQDN}:8443/owa/", result.stderr


async def test_a_request_with_a_body_is_answered_and_its_connection_closed(port80) -> None:
    _, server = port80
    answer = await exchange(server.port, f"POST /owa/ HTTP/1.1\r\nHost: {FQDN}\r\nContent-Length: 5\r\n\r\nhello".encode())
    assert answer.startswith(b"HTTP/1.1 301 ") and b"Connection: close" in answer


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 40000 + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", b"400"),
        (b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", b"505"),
    ],
)
async def test_bad_heads_get_one_answer_and_a_close(port80, request_bytes: bytes, status: bytes) -> None:
    _, server = port80
    answer = await exchange(server.port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert answer.count(b"\r\nHTTP/1.") == 0  # one answer, then the close


async def test_a_head_that_drags_on_gets_408_after_the_header_timeout(port80) -> None:
    _, server = port80
    answer = await exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n", read_for=5.0)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert server.guard.rejections["header-timeout"] == 1
