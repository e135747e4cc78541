"""The TLS ClientHello, read without answering it: which name (SNI) a connection asks for.

Sans-IO: ``HelloReader.feed(bytes)`` returns ``None`` while more bytes are needed, a ``Hello`` once
the whole ClientHello is in, or raises ``HelloRefused`` (with a short ``reason`` for the counters)
for anything that is not a TLS ClientHello. The bytes fed are never changed: the caller replays
them to whoever answers the handshake (the bridge's own TLS, or a passthrough backend).

What it reads: TLS records (type 22, version 3.x, at most 2^14 bytes each) carrying the handshake
message, reassembled when a client splits it over several records (and, the caller's business,
over several TCP segments); the ClientHello body (legacy version, random, session id, cipher
suites, compression methods) and its extensions, of which it keeps ``server_name`` (RFC 6066: the
host_name entry) and the offered ALPN protocols. A ClientHello without extensions (an old TLS 1.0
client) is a hello without a name. An SSLv2-compatible hello (the first byte's high bit set) and
anything else are refused. The whole hello is bounded by ``limit`` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RECORD_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
EXTENSION_SERVER_NAME = 0x0000
EXTENSION_ALPN = 0x0010
SERVER_NAME_HOST = 0x00
RECORD_HEADER = 5
MAX_RECORD = 2**14
DEFAULT_LIMIT = 64 * 1024  # a ClientHello with post-quantum key shares is about 2 KiB; TLS allows far more, nobody sends it

VERSIONS = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2"}


class HelloRefused(Exception):
    """Not a TLS ClientHello the bridge can route; ``reason`` is a short label, str() says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Hello:
    """What the ClientHello says that routing needs."""

    server_name: str | None  # lower case, no trailing dot; None without an SNI host_name
    version: int  # the legacy_version field (0x0303 for TLS 1.2 and 1.3, 0x0301 for TLS 1.0)
    alpn: tuple[str, ...] = field(default=())
    length: int = 0  # bytes of the records that carried the hello (the caller holds them all)

    @property
    def version_name(self) -> str:
        return VERSIONS.get(self.version, f"0x{self.version:04x}")


class HelloReader:
    """Feed it the first bytes of a connection; see the module's docstring."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.handshake = bytearray()
        self.offset = 0  # bytes of ``buffer`` taken apart into records so far

    def feed(self, data: bytes) -> Hello | None:
        if not self.buffer and data:
            first_bytes_check(data)
        self.buffer += data
        if len(self.buffer) > self.limit + RECORD_HEADER:
            raise HelloRefused("hello-too-large", f"the ClientHello is larger than {self.limit} bytes")
        while len(self.buffer) - self.offset >= RECORD_HEADER:
            header = self.buffer[self.offset : self.offset + RECORD_HEADER]
            kind, major, length = header[0], header[1], int.from_bytes(header[3:5], "big")
            if kind != RECORD_HANDSHAKE:
                raise HelloRefused("hello-malformed", f"a record of type {kind} arrived before the ClientHello was complete")
            if major != 3:
                raise HelloRefused("not-tls", f"the record version {major}.{header[2]} is not TLS")
            if length == 0 or length > MAX_RECORD:
                raise HelloRefused("hello-malformed", f"a handshake record of {length} bytes")
            end = self.offset + RECORD_HEADER + length
            if len(self.buffer) < end:
                return None
            self.handshake += self.buffer[self.offset + RECORD_HEADER : end]
            self.offset = end
            hello = self._hello()
            if hello is not None:
                return hello
        return None

    def _hello(self) -> Hello | None:
        message = self.handshake
        if len(message) < 4:
            return None
        if message[0] != HANDSHAKE_CLIENT_HELLO:
            raise HelloRefused("hello-malformed", f"the first handshake message is of type {message[0]}, not a ClientHello")
        length = int.from_bytes(message[1:4], "big")
        if length > self.limit:
            raise HelloRefused("hello-too-large", f"the ClientHello announces {length} bytes, more than {self.limit}")
        if len(message) < 4 + length:
            return None
        hello = parse_client_hello(bytes(message[4 : 4 + length]))
        return Hello(hello.server_name, hello.version, hello.alpn, self.offset)


def first_bytes_check(data: bytes) -> None:
    """Refuse at once what cannot begin a TLS ClientHello (the first byte or two are enough)."""
    first = data[0]
    if first & 0x80 and (len(data) < 3 or data[2] == HANDSHAKE_CLIENT_HELLO):
        raise HelloRefused("sslv2-hello", "an SSLv2-compatible ClientHello (no client of this century needs it)")
    if first != RECORD_HANDSHAKE:
        raise HelloRefused("not-tls", "the first bytes are not a TLS handshake record")
    if len(data) >= 2 and data[1] != 3:
        raise HelloRefused("not-tls", f"the record version {data[1]} is not TLS")


class _Cursor:
    """Reads big-endian fields off a ClientHello body; HelloRefused when a field runs past its end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def take(self, count: int) -> bytes:
        end = self.position + count
        if end > len(self.data):
            raise HelloRefused("hello-malformed", "a ClientHello field runs past the end of the message")
        chunk = self.data[self.position : end]
        self.position = end
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    @property
    def left(self) -> int:
        return len(self.data) - self.position


def parse_client_hello(body: bytes) -> Hello:
    """The ClientHello message body (after the 4-byte handshake header)."""
    cursor = _Cursor(body)
    version = cursor.number(2)
    if version >> 8 != 3:
        raise HelloRefused("not-tls", f"the ClientHello's version 0x{version:04x} is not TLS")
    cursor.take(32)  # random
    if len(cursor.vector(1)) > 32:
        raise HelloRefused("hello-malformed", "a session id longer than 32 bytes")
    suites = cursor.vector(2)
    if not suites or len(suites) % 2:
        raise HelloRefused("hello-malformed", "an empty or odd-sized cipher suite list")
    if not cursor.vector(1):
        raise HelloRefused("hello-malformed", "no compression method")
    if cursor.left == 0:  # no extensions (SSL 3.0, old TLS 1.0 clients)
        return Hello(None, version)
    extensions = _Cursor(cursor.vector(2))
    if cursor.left:
        raise HelloRefused("hello-malformed", "bytes after the ClientHello's extensions")
    name: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    while extensions.left:
        kind = extensions.number(2)
        data = extensions.vector(2)
        if kind in seen:
            raise HelloRefused("hello-malformed", f"extension {kind} appears twice")
        seen.add(kind)
        if kind == EXTENSION_SERVER_NAME:
            name = server_name(data)
        elif kind == EXTENSION_ALPN:
            alpn = alpn_protocols(data)
    return Hello(name, version, alpn)


def server_name(data: bytes) -> str | None:
    """The host_name of a server_name extension's body, lower case without a trailing dot."""
    if not data:
        return None  # (a server's empty echo; a client should not send it)
    names = _Cursor(_Cursor(data).vector(2))
    host: str | None = None
    while names.left:
        kind = names.number(1)
        value = names.vector(2)
        if kind != SERVER_NAME_HOST or host is not None:
            continue
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            raise HelloRefused("hello-malformed", "a server name that is not ASCII") from None
        text = text.rstrip(".").lower()
        if not text or len(text) > 253 or not all(c.isalnum() or c in "-._" for c in text):
            raise HelloRefused("hello-malformed", f"the server name {text[:80]!r} is not a host name")
        host = text
    return host


def alpn_protocols(data: bytes) -> tuple[str, ...]:
    entries = _Cursor(_Cursor(data).vector(2))
    protocols = []
    while entries.left:
        protocols.append(entries.vector(1).decode("ascii", "replace"))
    return tuple(protocols)


# --------------------------------------------------------------------------- building hellos (tests, probes)


def client_hello_record(server_name: str | None = None, *, version: int = 0x0303, alpn: tuple[str, ...] = (), extensions: bool = True, record_size: int = MAX_RECORD) -> bytes:
    """A syntactically complete ClientHello in TLS records of at most ``record_size`` bytes (for tests
    and probes; no handshake can complete from it)."""
    body = bytearray(version.to_bytes(2, "big") + bytes(32) + b"\x00" + b"\x00\x04\x13\x01\xc0\x2f" + b"\x01\x00")
    if extensions:
        items = bytearray()
        if server_name is not None:
            name = server_name.encode("ascii")
            entry = b"\x00" + len(name).to_bytes(2, "big") + name
            sni = len(entry).to_bytes(2, "big") + entry
            items += EXTENSION_SERVER_NAME.to_bytes(2, "big") + len(sni).to_bytes(2, "big") + sni
        if alpn:
            listed = b"".join(len(p).to_bytes(1, "big") + p.encode("ascii") for p in alpn)
            value = len(listed).to_bytes(2, "big") + listed
            items += EXTENSION_ALPN.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value
        body += len(items).to_bytes(2, "big") + items
    message = bytes([HANDSHAKE_CLIENT_HELLO]) + len(body).to_bytes(3, "big") + body
    records = bytearray()
    record_version = min(version, 0x0301).to_bytes(2, "big")
    for start in range(0, len(message), record_size):
        chunk = message[start : start + record_size]
        records += bytes([RECORD_HANDSHAKE]) + record_version + len(chunk).to_bytes(2, "big") + chunk
    return bytes(records)
