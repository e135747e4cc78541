"""Network probes for `bridge preflight`: TLS contexts for each question, resolution and TCP with one
timeout, handshakes, and a small HTTP/1.1 client that can run NTLM on one connection.

Kept apart from the checks (bridge.preflight) so the judgement of answers and the gathering of them
can be read separately.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import spnego

from bridge.config import is_ip_address
from bridge.net.tls import legacy_context
from bridge.net.upstream import response_has_body

USER_AGENT = "exchange-bridge-preflight"
MAX_BODY = 1024 * 1024
MAX_HEAD = 64 * 1024


class ProbeError(Exception):
    """A probe could not get an answer; str() is a short reason."""


@dataclass
class Credentials:
    email: str
    username: str
    password: str = field(repr=False)


# --------------------------------------------------------------------------- network primitives


def quiet_tls_version(context: ssl.SSLContext, minimum: ssl.TLSVersion | None = None, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are what we probe for
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
    return context


def legacy_client() -> ssl.SSLContext:
    """The bridge's own client context for the legacy server (TLS 1.0 and up, unverified)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return legacy_context()


def exact_version_context(version: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    """An unverified client that offers only ``version`` (down to @SECLEVEL=0, for 2007-era servers)."""
    context = legacy_client()
    quiet_tls_version(context, version, version)
    context.set_ciphers(ciphers)
    return context


def unverified_modern_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def trusting_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """The system trust store plus --ca-bundle, with name checking: what Exchange Online would demand."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_bundle is not None:
        context.load_verify_locations(cafile=str(ca_bundle))
    return context


def reason_of(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "no answer within the timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (ConnectionResetError, asyncio.IncompleteReadError)):
        return "the connection was closed"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


async def resolve(host: str, port: int, timeout: float) -> list[str]:
    if is_ip_address(host):
        return [host]
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return addresses


async def tcp_connect(address: str, port: int, timeout: float) -> float:
    started = time.monotonic()
    _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    elapsed = time.monotonic() - started
    writer.close()
    return elapsed


@dataclass
class Handshake:
    version: str
    cipher: str
    der: bytes | None


async def tls_handshake(address: str, port: int, context: ssl.SSLContext, sni: str, timeout: float) -> Handshake:
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(address, port, ssl=context, server_hostname=sni, ssl_handshake_timeout=timeout), timeout
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return Handshake(ssl_object.version(), ssl_object.cipher()[0], ssl_object.getpeercert(binary_form=True))
    finally:
        writer.close()


def refused_handshake(exc: BaseException) -> bool:
    """True when the server answered the ClientHello with a refusal (alert, reset, close), not silence."""
    return isinstance(exc, (ssl.SSLError, ConnectionResetError, asyncio.IncompleteReadError, BrokenPipeError, EOFError))


# --------------------------------------------------------------------------- a small HTTP/1.1 client


@dataclass
class HttpTarget:
    """Where HTTP probes go: an address and port, the TLS name (SNI) and the Host header."""

    address: str
    port: int
    sni: str  # "" sends no SNI
    host_header: str
    context: ssl.SSLContext
    timeout: float


@dataclass
class HttpAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    @property
    def schemes(self) -> list[str]:
        """The authentication schemes offered, one per WWW-Authenticate header, in server order."""
        words = [value.split(" ", 1)[0] for value in self.all("WWW-Authenticate") if value.strip()]
        return list(dict.fromkeys(word for word in words if word))


class HttpConnection:
    def __init__(self, target: HttpTarget, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.target = target
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, target: HttpTarget) -> HttpConnection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    target.address, target.port, ssl=target.context, server_hostname=target.sni,
                    ssl_handshake_timeout=target.timeout, limit=MAX_HEAD,
                ),
                target.timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            raise ProbeError(f"cannot connect ({reason_of(exc)})") from None
        return cls(target, reader, writer)

    def close(self) -> None:
        self.writer.close()

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> HttpAnswer:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.target.host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body or method in ("POST", "RPC_IN_DATA", "RPC_OUT_DATA"):
            lines.append(f"Content-Length: {len(body)}")
        try:
            self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            return await asyncio.wait_for(self._read_answer(method), self.target.timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise ProbeError(f"no HTTP answer to {method} {path.split('?')[0]} ({reason_of(exc)})") from None

    async def _read_answer(self, method: str) -> HttpAnswer:
        while True:
            head = await self.reader.readuntil(b"\r\n\r\n")
            status, headers = parse_head(head)
            if not 100 <= status < 200:
                break
        body = await self._read_body(method, status, headers) if response_has_body(method, status) else b""
        return HttpAnswer(status, headers, body)

    async def _read_body(self, method: str, status: int, headers: list[tuple[str, str]]) -> bytes:
        values = {key.lower(): value for key, value in headers}
        if "chunked" in values.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return b"".join(chunks)[:MAX_BODY]
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
        if "content-length" in values:
            length = int(values["content-length"])
            if length > MAX_BODY:
                raise ValueError(f"a {length}-byte answer is larger than expected")
            return await self.reader.readexactly(length)
        return await self.reader.read(MAX_BODY)


def parse_head(raw: bytes) -> tuple[int, list[tuple[str, str]]]:
    status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.x answer: {status_line[:40]!r}")
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return int(parts[1]), headers


def request_headers(method: str) -> dict[str, str]:
    if method.startswith("RPC_"):
        # What Outlook sends on an echo request.
        return {"User-Agent": "MSRPC", "Accept": "application/rpc", "Cache-Control": "no-cache", "Pragma": "no-cache"}
    return {"User-Agent": USER_AGENT, "Accept": "*/*"}


async def http_exchange(
    target: HttpTarget,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    extra: dict[str, str] | None = None,
    credentials: Credentials | None = None,
    scheme: str | None = None,
) -> HttpAnswer:
    """One request on a fresh connection; with NTLM, the handshake runs on that connection."""
    connection = await HttpConnection.open(target)
    try:
        headers = request_headers(method) | (extra or {})
        if credentials is None or scheme is None:
            return await connection.request(method, path, headers, body)
        if scheme == "basic":
            token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
            return await connection.request(method, path, headers | {"Authorization": f"Basic {token}"}, body)
        return await ntlm_request(connection, method, path, headers, body, credentials)
    finally:
        connection.close()


async def ntlm_request(connection: HttpConnection, method: str, path: str, headers: dict[str, str], body: bytes, credentials: Credentials) -> HttpAnswer:
    host = connection.target.sni or connection.target.address
    client = spnego.client(credentials.username, credentials.password, hostname=host, service="http", protocol="ntlm")
    token = client.step()
    word = "NTLM"
    for _ in range(3):
        answer = await connection.request(method, path, headers | {"Authorization": f"{word} {base64.b64encode(token).decode()}"}, body)  # type: ignore[arg-type]  # an NTLM client's steps always return a token
        challenge = ntlm_challenge(answer)
        if answer.status != 401 or challenge is None:
            return answer
        word, data = challenge
        try:
            token = client.step(data)
        except Exception as exc:  # noqa: BLE001 - pyspnego raises assorted errors on a malformed challenge
            raise ProbeError(f"the NTLM challenge could not be used ({type(exc).__name__})") from None
        if token is None:
            return answer
    return answer


def ntlm_challenge(answer: HttpAnswer) -> tuple[str, bytes] | None:
    for value in answer.all("WWW-Authenticate"):
        word, _, token = value.partition(" ")
        if word.lower() in ("ntlm", "negotiate") and token.strip():
            try:
                return word, base64.b64decode(token.strip())
            except ValueError:
                return None
    return None


def offers(schemes: list[str], scheme: str) -> bool:
    lowered = {s.lower() for s in schemes}
    return "basic" in lowered if scheme == "basic" else bool(lowered & {"ntlm", "negotiate"})
