"""Network probes for `bridge preflight`: TLS contexts for each question, resolution and TCP with one
timeout, handshakes, and a small HTTP/1.1 client that can run NTLM on one connection (its heads and
bodies are read by the sans-IO core, bridge.protocol.http1, like the bridge's own).

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import spnego

from bridge.config import is_ip_address
from bridge.net.tls import legacy_context
from bridge.protocol import rts
from bridge.protocol.http1 import Body, ChunkedDecoder, ChunkedError, ResponseHead, ResponseRefused, parse_response_head, response_body_framing, response_head_length

USER_AGENT = "exchange-bridge-preflight"
MAX_BODY = 1024 * 1024
MAX_HEAD = 64 * 1024
READ_SIZE = 64 * 1024
# What a malformed answer raises while it is read (each becomes one ProbeError sentence).
BAD_ANSWER = (OSError, asyncio.IncompleteReadError, ValueError, ResponseRefused, ChunkedError)


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
    _, writer = await asyncio.wait_for(asyncio.open_connection(address, port, ssl=context, server_hostname=sni, ssl_handshake_timeout=timeout), timeout)
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
    context: ssl.SSLContext | None  # None: plain HTTP (the bridge's port 80)
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
        self.pushback = b""  # bytes read past the end of the last response

    @classmethod
    async def open(cls, target: HttpTarget) -> HttpConnection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    target.address,
                    target.port,
                    ssl=target.context,
                    server_hostname=target.sni,
                    ssl_handshake_timeout=target.timeout,
                    limit=MAX_HEAD,
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
        except (TimeoutError, *BAD_ANSWER) as exc:
            raise ProbeError(f"no HTTP answer to {method} {path.split('?')[0]} ({reason_of(exc)})") from None

    async def _read_answer(self, method: str) -> HttpAnswer:
        head = await self.read_head()
        while 100 <= head.status < 200:
            head = await self.read_head()
        body = b""
        async for piece in self.body(method, head):
            body += piece
            if len(body) > MAX_BODY:
                raise ValueError(f"an answer of more than {MAX_BODY} bytes is larger than expected")
        return HttpAnswer(head.status, header_fields(head), body)

    async def read_some(self, limit: int) -> bytes:
        """The next bytes of the connection (what the last body left over first); b"" at its end."""
        if self.pushback:
            data, self.pushback = self.pushback[:limit], self.pushback[limit:]
            return data
        return await self.reader.read(limit)

    async def read_head(self) -> ResponseHead:
        """The next response head, parsed by the core; IncompleteReadError if the connection ends first."""
        data, self.pushback = self.pushback, b""
        searched = 0
        while not (length := response_head_length(data, max(0, searched - 3))):
            searched = len(data)
            more = await self.reader.read(READ_SIZE)
            if not more:
                raise asyncio.IncompleteReadError(data, None)
            data += more
        self.pushback = data[length:]
        return parse_response_head(data[:length])

    async def body(self, method: str, head: ResponseHead) -> AsyncIterator[bytes]:
        """The response body as it arrives, framed as the core says (RFC 9112 6.3)."""
        framing = response_body_framing(method, head)
        if framing.kind is Body.LENGTH:
            remaining = framing.length
            while remaining:
                data = await self.read_some(min(remaining, READ_SIZE))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(data)
                yield data
        elif framing.kind is Body.CHUNKED:
            decoder = ChunkedDecoder()
            while not decoder.done:
                data = await self.read_some(READ_SIZE)
                if not data:
                    decoder.finish()  # raises: the body was cut off
                    return
                for piece in decoder.feed(data):
                    yield bytes(piece)
            self.pushback = bytes(decoder.leftover)
        elif framing.kind is Body.UNTIL_CLOSE:
            while data := await self.read_some(READ_SIZE):
                yield data


async def plain_http_get(address: str, port: int, host: str, path: str, timeout: float) -> tuple[dict[str, str], int]:
    """One GET over plain HTTP (the bridge's port 80): its headers (lower-case names) and status."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    connection = HttpConnection(HttpTarget(address, port, "", host, None, timeout), reader, writer)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\nConnection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(connection.read_head(), timeout)
    finally:
        connection.close()
    return {name.lower(): value for name, value in header_fields(head)}, head.status


def header_fields(head: ResponseHead) -> list[tuple[str, str]]:
    """(name, value) of each header line of a parsed head, in order (values stripped)."""
    fields = []
    for line in head.block.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return fields


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


# --------------------------------------------------------------------------- Outlook Anywhere: RPC over HTTP v2
#
# A virtual connection needs what the client above cannot do: a request whose body is sent a PDU at
# a time and never ends (RPC_IN_DATA, Content-Length 1 GiB), and a response read as it arrives
# (RPC_OUT_DATA, also 1 GiB): the channel writes its own request head and reads the answer through
# HttpConnection (the core's head parser and body framing).

RPC_CHANNEL_HEADERS = {"User-Agent": "MSRPC", "Accept": "application/rpc", "Cache-Control": "no-cache", "Pragma": "no-cache", "Connection": "Keep-Alive"}
IN_CHANNEL_LENGTH = rts.DEFAULT_CHANNEL_LIFETIME  # 1 GiB, what Windows declares for RPC_IN_DATA


class ChannelClosed(ProbeError):
    """The peer closed a channel (or the response body ended) before what was awaited came."""


@dataclass
class ChannelHead:
    """What opening a channel got: the final status (None for an IN channel that got its 100 Continue),
    whether a 100 Continue came, and the response headers."""

    status: int | None
    continued: bool
    headers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)


class RpcChannel:
    """One RPC_IN_DATA or RPC_OUT_DATA channel on its own TLS connection (NTLM is bound to it).

    ``open`` runs the authentication and sends the request head with the channel's first PDU (CONN/A1
    or CONN/B1); then ``send`` writes more PDUs (IN) and ``read`` returns response body bytes as they
    arrive (OUT)."""

    def __init__(self, connection: HttpConnection, method: str) -> None:
        self.connection = connection
        self.method = method
        self.received = 0  # response body bytes read
        self._chunked = False
        self._body: AsyncIterator[bytes] | None = None  # the response body, once the final head came

    @classmethod
    async def open(
        cls,
        target: HttpTarget,
        method: str,
        path: str,
        credentials: Credentials,
        scheme: str,
        *,
        content_length: int,
        opening: bytes,
        expect_continue: bool,
    ) -> tuple[RpcChannel, ChannelHead]:
        connection = await HttpConnection.open(target)
        channel = cls(connection, method)
        try:
            head = await channel._start(path, credentials, scheme, content_length, opening, expect_continue)
        except BaseException:
            connection.close()
            raise
        return channel, head

    async def _start(self, path: str, credentials: Credentials, scheme: str, length: int, opening: bytes, expect_continue: bool) -> ChannelHead:
        connection, timeout = self.connection, self.connection.target.timeout
        headers = dict(RPC_CHANNEL_HEADERS)
        if scheme == "basic":
            authorization = "Basic " + base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
        else:
            # NTLM's first leg with an empty body, as Outlook and impacket do; the channel is the last leg.
            host = connection.target.sni or connection.target.address
            client = spnego.client(credentials.username, credentials.password, hostname=host, service="http", protocol="ntlm")
            first = await connection.request(self.method, path, headers | {"Authorization": f"NTLM {base64.b64encode(client.step() or b'').decode()}"})
            challenge = ntlm_challenge(first)
            if first.status != 401 or challenge is None:
                return ChannelHead(first.status, False, first.headers)
            try:
                token = client.step(challenge[1])
            except Exception as exc:  # noqa: BLE001 - pyspnego raises assorted errors on a malformed challenge
                raise ProbeError(f"the NTLM challenge could not be used ({type(exc).__name__})") from None
            authorization = f"{challenge[0]} {base64.b64encode(token or b'').decode()}"
        lines = [f"{self.method} {path} HTTP/1.1", f"Host: {connection.target.host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines += [f"Authorization: {authorization}", f"Content-Length: {length}"]
        if expect_continue:
            lines.append("Expect: 100-continue")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            connection.writer.write(head if expect_continue else head + opening)
            continued = False
            while True:
                answer = await asyncio.wait_for(connection.read_head(), timeout)
                status, answer_headers = answer.status, header_fields(answer)
                if status == 100:
                    continued = True
                    if expect_continue:
                        connection.writer.write(opening)
                        await connection.writer.drain()
                        return ChannelHead(None, True, answer_headers)
                    continue
                if 100 < status < 200:
                    continue
                break
        except TimeoutError:
            if expect_continue:
                raise ProbeError(f"no 100 Continue (nor any answer) to {self.method} within the timeout") from None
            raise ProbeError(f"no answer within the timeout to {self.method}") from None
        except BAD_ANSWER as exc:
            raise ProbeError(f"no HTTP answer to {self.method} ({reason_of(exc)})") from None
        self.follow(answer)
        return ChannelHead(status, continued, answer_headers)

    def follow(self, head: ResponseHead) -> None:
        """From now on read() returns the body of the response ``head`` began, as it arrives."""
        self._chunked = head.chunked
        self._body = self.connection.body(self.method, head)

    @property
    def chunked(self) -> bool:
        return self._chunked

    async def send(self, data: bytes) -> None:
        """More of the request body (PDUs on the IN channel)."""
        try:
            self.connection.writer.write(data)
            await self.connection.writer.drain()
        except OSError as exc:
            raise ChannelClosed(f"the {self.method} channel was closed ({reason_of(exc)})") from None

    async def read(self) -> bytes:
        """The next response body bytes as they arrive; ChannelClosed at the end of the body."""
        if self._body is None:
            raise ChannelClosed(f"the {self.method} response ended after {self.received} bytes")
        try:
            data = await anext(self._body, b"")
        except BAD_ANSWER as exc:
            raise ChannelClosed(f"the {self.method} channel was closed after {self.received} bytes ({reason_of(exc)})") from None
        if not data:
            raise ChannelClosed(f"the {self.method} response ended after {self.received} bytes")
        self.received += len(data)
        return data

    async def close(self) -> None:
        """Close the connection (TLS close_notify), waiting briefly for the peer."""
        writer = self.connection.writer
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), min(1.0, self.connection.target.timeout))
        except (TimeoutError, OSError, ssl.SSLError):
            pass


@dataclass
class Step:
    """One step of a virtual connection: what it was, whether it worked, how long it took; when it did
    not, ``problem`` says how (connect, http, no_continue, timeout, closed, protocol, bind_nak, rejected,
    fault) and ``http_status`` the status that came instead of the one expected."""

    name: str
    ok: bool
    ms: float
    note: str = ""
    problem: str = ""
    http_status: int | None = None

    def as_json(self) -> dict[str, object]:
        found: dict[str, object] = {"step": self.name, "ok": self.ok, "ms": round(self.ms, 1), "note": self.note}
        if self.problem:
            found["problem"] = self.problem
        if self.http_status is not None:
            found["http_status"] = self.http_status
        return found


@dataclass
class VirtualConnectionProbe:
    """One virtual connection to one port: its steps in order (the last one failed, if any did)."""

    port: int
    interface: str
    required: bool
    steps: list[Step] = field(default_factory=list)
    in_continued: bool | None = None  # whether the IN channel got its 100 Continue

    @property
    def failed(self) -> Step | None:
        return next((step for step in self.steps if not step.ok), None)


async def probe_virtual_connection(
    target: HttpTarget,
    server: str,
    port: int,
    interface: str,
    syntax: rts.SyntaxId,
    credentials: Credentials,
    scheme: str,
    *,
    call: tuple[int, bytes] | None = None,
    required: bool = True,
) -> VirtualConnectionProbe:
    """Open a virtual connection to ``server:port`` as Outlook does, bind ``syntax``, make ``call``
    (opnum, stub) when given, and close. Every network wait is bounded by the target's timeout."""
    path = f"/rpc/rpcproxy.dll?{server}:{port}"
    result = VirtualConnectionProbe(port, interface, required)
    vc = rts.ClientVirtualConnection()
    timeout = target.timeout
    channels: dict[str, RpcChannel] = {}
    pending: list[rts.Event] = []

    def step(name: str, started: float, ok: bool, note: str, problem: str = "", http_status: int | None = None) -> bool:
        result.steps.append(Step(name, ok, (time.monotonic() - started) * 1000, note, problem, http_status))
        return ok

    async def open_channel(name: str, method: str, length: int, opening: bytes, expect: bool) -> tuple[str, float, RpcChannel | None, ChannelHead | None, str]:
        started = time.monotonic()
        try:
            channel, head = await RpcChannel.open(target, method, path, credentials, scheme, content_length=length, opening=opening, expect_continue=expect)
        except ProbeError as exc:
            return name, started, None, None, str(exc)
        channels[name] = channel
        return name, started, channel, head, ""

    async def next_event(kinds: tuple[type, ...]) -> rts.Event:
        out, inn = channels["out"], channels["in"]
        while True:
            while pending:
                event = pending.pop(0)
                if isinstance(event, kinds):
                    return event
            pending.extend(vc.feed_out(await out.read()))
            owed = vc.take_in_channel_bytes()  # flow control acks for the OUT channel
            if owed:
                await inn.send(owed)

    async def await_step(name: str, what: str, kinds: tuple[type, ...], started: float) -> rts.Event | None:
        received = channels["out"].received
        try:
            return await asyncio.wait_for(next_event(kinds), timeout)
        except TimeoutError:
            body = channels["out"].received - received
            step(name, started, False, f"no {what} within --timeout {timeout:g} s ({channels['out'].received} bytes of the OUT channel's body had come, {body} of them while waiting)", "timeout")
        except ChannelClosed as exc:
            step(name, started, False, f"{exc} before {what}", "closed")
        except rts.RpcProtocolError as exc:
            step(name, started, False, f"the OUT channel carried something that is not RPC: {exc}", "protocol")
        return None

    try:
        opened = await asyncio.gather(
            open_channel("out", "RPC_OUT_DATA", len(vc.out_channel_opening()), vc.out_channel_opening(), False),
            open_channel("in", "RPC_IN_DATA", IN_CHANNEL_LENGTH, vc.in_channel_opening(), True),
        )
        for name, started, channel, head, error in opened:
            label = f"{name}_channel"
            if channel is None or head is None:
                step(label, started, False, error, "timeout" if "within the timeout" in error else "connect")
                return result
            if name == "in":
                result.in_continued = head.continued
            if name == "out" and head.status == 200:
                step(label, started, True, f"200, Content-Length {head.header('Content-Length') or 'none'}" + (", chunked" if channel.chunked else ""))
            elif name == "in" and head.status is None:
                step(label, started, True, "100 Continue, CONN/B1 sent")
            else:
                problem = "http"
                step(label, started, False, f"answered {head.status} instead of {'200' if name == 'out' else '100 Continue'}", problem, head.status)
                return result
        a3_started = time.monotonic()
        if await await_step("conn_a3", "CONN/A3", (rts.ConnA3Received,), a3_started) is None:
            return result
        step("conn_a3", a3_started, True, f"ConnectionTimeout {vc.connection_timeout} ms")
        c2_started = time.monotonic()
        c2 = await await_step("conn_c2", "CONN/C2", (rts.ConnC2Received,), c2_started)
        if c2 is None:
            return result
        assert isinstance(c2, rts.ConnC2Received)
        step("conn_c2", c2_started, True, f"IN window {c2.receive_window_size} bytes, ConnectionTimeout {c2.connection_timeout} ms")
        bind_started = time.monotonic()
        try:
            await channels["in"].send(vc.bind(syntax))
        except ChannelClosed as exc:
            step("bind", bind_started, False, str(exc), "closed")
            return result
        answer = await await_step("bind", f"an answer to the {interface} bind", (rts.BindAckReceived, rts.BindNakReceived, rts.FaultReceived), bind_started)
        if answer is None:
            return result
        if not bind_judged(answer, interface, bind_started, step):
            return result
        if call is not None:
            opnum, stub = call
            call_started = time.monotonic()
            request = vc.request(opnum, stub)
            call_id = rts.parse_header(request).call_id
            try:
                await channels["in"].send(request)
            except ChannelClosed as exc:
                step("call", call_started, False, str(exc), "closed")
                return result
            reply = await await_step("call", f"an answer to call {call_id} (opnum {opnum})", (rts.ResponseReceived, rts.FaultReceived), call_started)
            if reply is None:
                return result
            if isinstance(reply, rts.FaultReceived):
                step("call", call_started, False, f"opnum {opnum} answered fault {reply.fault.status:#010x}", "fault")
                return result
            assert isinstance(reply, rts.ResponseReceived)
            status = int.from_bytes(reply.stub[-4:], "little") if len(reply.stub) >= 4 else None
            step("call", call_started, True, f"opnum {opnum} answered {len(reply.stub)} bytes" + (f", status {status:#010x}" if status is not None else ""))
        close_started = time.monotonic()
        await asyncio.gather(*(channel.close() for channel in channels.values()))
        channels.clear()
        step("close", close_started, True, "both channels closed")
        return result
    finally:
        for channel in channels.values():
            channel.connection.close()


def bind_judged(answer: rts.Event, interface: str, started: float, step: Callable[..., bool]) -> bool:
    if isinstance(answer, rts.BindNakReceived):
        return step("bind", started, False, f"bind_nak (reason {answer.bind_nak.reason}) for {interface}", "bind_nak")
    if isinstance(answer, rts.FaultReceived):
        return step("bind", started, False, f"fault {answer.fault.status:#010x} for the {interface} bind", "fault")
    assert isinstance(answer, rts.BindAckReceived)
    ack = answer.bind_ack
    result = ack.results[0] if ack.results else None
    if result is None or not result.accepted:
        reason = f"result {result.result}, reason {result.reason}" if result is not None else "no result"
        return step("bind", started, False, f"{interface} rejected ({reason})", "rejected")
    where = f", secondary address {ack.secondary_address}" if ack.secondary_address else ""
    return step("bind", started, True, f"bind_ack: {interface} accepted{where}, max_frag {ack.max_xmit_frag}/{ack.max_recv_frag}")
