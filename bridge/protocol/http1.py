"""HTTP/1.1 without I/O: the one place where the bridge parses and composes HTTP/1.x messages.

Everything here takes bytes and returns values or bytes; nothing reads a socket or awaits. The
front end (request heads and chunked request bodies), the upstream client (response heads and
bodies), the proxy (framing decisions, line cutting, local answers), the preflight probe and the
port-80 listener share it, so each rule of RFC 9112 is written once:

* request heads: ``complete_head_length`` (is a whole head buffered? refuse early what cannot become
  one), ``parse_request_head`` (one pass, raises ``HeadRefused`` carrying the answer);
* response heads: ``response_head_length``, ``parse_response_head`` (raises ``ResponseRefused``, a
  sentence fragment the caller prefixes with the server's name);
* message framing (RFC 9112 section 6): ``request_body_framing``, ``response_body_framing``,
  ``client_framing`` return a ``Framing`` (NONE, LENGTH n, CHUNKED, UNTIL_CLOSE);
* chunked bodies: ``ChunkedDecoder`` (incremental, strict, bounded) and ``encode_chunk``/``LAST_CHUNK``;
* composition: ``local_answer`` (the bridge's own short text/plain answers), ``interim_response``
  (which 1xx goes to the client, and with which lines), ``cut_lines``/``without_lines_named``/
  ``lines_matching`` (header lines removed by spans or by name), ``reason_phrase``.

Performance: request and response heads are checked and searched as one block, never line by line
(one regular expression validates every name, one scan of the lower-case block finds the lines the
bridge acts on); ``find()`` is used rather than ``in`` on bytes, and ``translate()`` + ``count()``
rather than a regular expression for control characters: these choices were measured by
instruction counts and a head's cost barely grows with its number of headers.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# --------------------------------------------------------------------------- limits

MAX_LINE_SIZE = 8190  # a request line
MAX_FIELD_SIZE = 8190  # one header line
MAX_HEADERS = 128  # header lines in a request head
MAX_HEAD_BYTES = 32 * 1024  # all request header lines together (IIS's default MaxRequestBytes is 16 KiB)
MAX_METHOD_LENGTH = 32
REFUSED_METHODS = frozenset({"CONNECT", "TRACE", "TRACK"})
MAX_REQUEST_HEAD = MAX_LINE_SIZE + 2 + MAX_HEAD_BYTES + 4 * MAX_HEADERS + 4
MAX_RESPONSE_HEAD = 64 * 1024  # a whole response head, through CRLF CRLF
MAX_RESPONSE_HEADERS = 200
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions, without the CRLF
MAX_TRAILER_BYTES = 16 * 1024  # the whole trailer section of a chunked body
MAX_CONTENT_LENGTH_DIGITS = 18  # up to 10**18 - 1: a Python int, never a wrap-around elsewhere
MIN_LINE = 4  # the shortest header line in a block: CRLF, a one-letter name, the colon

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"proxy-authorization", b"proxy-authenticate"})
HOP_BY_HOP_BYTES = HOP_BY_HOP  # the name the callers used before
REWRITTEN_RESPONSE = (b"location", b"content-location", b"x-frame-options", b"x-content-type-options")
SECURITY_HEADERS = ((b"X-Frame-Options", b"SAMEORIGIN"), (b"X-Content-Type-Options", b"nosniff"))

# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class HeadProblem:
    status: int
    reason: str  # metrics label, e.g. "malformed-head"
    message: str  # one sentence for the client


class HeadRefused(Exception):
    """A request head the bridge answers itself and forwards nothing of; ``problem`` is the answer."""

    def __init__(self, problem: HeadProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem

    @property
    def status(self) -> int:
        return self.problem.status

    @property
    def reason(self) -> str:
        return self.problem.reason

    @property
    def message(self) -> str:
        return self.problem.message


def refused(status: int, reason: str, message: str) -> HeadRefused:
    return HeadRefused(HeadProblem(status, reason, message))


class ResponseRefused(Exception):
    """A response head that is not acceptable HTTP/1.x. str() is a sentence fragment that goes after
    the server's name: ``f"the legacy server {server} {exc}"``."""


class ChunkedError(Exception):
    """A malformed or oversized chunked body. str() is one lower-case sentence without a final period
    (callers embed it: the client's 400 log line, the upstream's 502 reason)."""


MALFORMED = "The request is not valid HTTP/1.1 (malformed request line or header, or ambiguous message framing)."

# --------------------------------------------------------------------------- shared header helpers

_TOKENS: dict[bytes, frozenset[bytes]] = {}


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The lower-case tokens of a Connection header value (the few values peers send are cached)."""
    tokens = _TOKENS.get(value)
    if tokens is None:
        tokens = frozenset(token.strip(b" \t").lower() for token in value.split(b",")) - {b""}
        if len(_TOKENS) < 64:
            _TOKENS[value] = tokens
    return tokens


def header_values(block: bytes, lowered: bytes, key: bytes) -> list[bytes]:
    """The values of the header lines starting with ``key`` (CRLF, lower-case name, colon), stripped."""
    values = []
    start = lowered.find(key)
    while start >= 0:
        begin = start + len(key)
        end = block.find(b"\r\n", begin)
        if end < 0:
            end = len(block)
        values.append(block[begin:end].strip(b" \t"))
        start = lowered.find(key, end)
    return values


HOST_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def valid_host(value: str) -> bool:
    """A Host value the bridge accepts: a DNS name or a bracketed IPv6 literal (or an IPv4 address), optional port."""
    return HOST_VALUE.fullmatch(value) is not None


# Control characters other than HTAB, and CR or LF that are not part of a CRLF line end.
BAD_HEAD_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
NOT_CONTROL = bytes(c for c in range(256) if c == 0x09 or 0x20 <= c != 0x7F)


def has_only_clean_line_ends(raw: bytes) -> bool:
    """No control characters but HTAB, and CR and LF only as CRLF pairs (faster than BAD_HEAD_BYTES)."""
    return len(raw.translate(None, NOT_CONTROL)) == 2 * raw.count(b"\r\n")


# --------------------------------------------------------------------------- request heads

METHOD_TOKEN = re.compile(rb"[A-Z][A-Z0-9_-]*")
# Anything but VCHAR in the target, and "#" (RFC 9112 3.2: the target is URI syntax, ASCII only).
BAD_TARGET_BYTES = re.compile(rb"[^\x21-\x22\x24-\x7e]")
VERSIONS = {b"HTTP/1.1": (1, 1), b"HTTP/1.0": (1, 0)}
ANY_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
COMMON_METHODS = {m.encode(): m for m in ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "RPC_IN_DATA", "RPC_OUT_DATA", "PROPFIND", "SEARCH")}
VALID_HOSTS: set[bytes] = set()  # Host values seen and found valid (clients repeat one or two)
# Each line: CRLF, a token name directly followed by a colon (no whitespace, no obsolete folding), a
# value of VCHAR, obs-text, SP and HTAB. So no control character, bare CR or bare LF gets through
# (this positive class is scanned faster than "[^\r]", and spares a separate pass over the head).
HEADER_BLOCK = re.compile(rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]++:[\t\x20-\x7e\x80-\xff]*+)*+")

# The request header lines the bridge acts on, found in one scan of the lower-case block: the framing
# fields, and those the upstream head leaves out or replaces (hop-by-hop, X-Forwarded-*, Host).
# Group 1: the name; group 2: the value, lower-case, not stripped.
REQUEST_FIELD_NAMES = HOP_BY_HOP | {b"content-length", b"host", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-port"}
_REQUEST_NAMES: list[bytes] = sorted(REQUEST_FIELD_NAMES, key=len, reverse=True)  # longest first
REQUEST_FIELDS = re.compile(rb"\r\n(" + b"|".join(_REQUEST_NAMES) + rb"):([^\r]*)")
EMPTY_TOKENS: frozenset[bytes] = frozenset()
END_TO_END = frozenset({b"content-length", b"host"})


@dataclass(slots=True)
class RequestHead:
    """One parsed request head: the header lines as received, plus what the proxy decides on."""

    method: str
    raw_path: str
    version: tuple[int, int]
    request_line: bytes  # the request line to send upstream (always HTTP/1.1)
    block: bytes  # the header lines as received, each preceded by CRLF
    lowered: bytes  # the same, lower-case (for finding names)
    content_length: int | None
    chunked: bool
    keep_alive: bool
    expect_continue: bool
    connection_tokens: frozenset[bytes]  # lower-case
    fields: list[tuple[bytes, int, int]]  # (lower-case name, start, end) of each REQUEST_FIELDS line in the block

    @property
    def lines(self) -> list[bytes]:
        return self.block.split(b"\r\n")[1:]

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(line[: line.find(b":")], line[line.find(b":") + 1 :].strip(b" \t")) for line in self.lines]

    def header(self, name: str) -> str | None:
        """The first value of a header (for the rare lookups outside the parse)."""
        values = header_values(self.block, self.lowered, b"\r\n" + name.lower().encode("latin-1") + b":")
        return values[0].decode("latin-1") if values else None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def remember_valid_host(host: bytes) -> bool:
    if not valid_host(host.decode("latin-1")):
        return False
    if len(VALID_HOSTS) >= 256:
        VALID_HOSTS.clear()
    VALID_HOSTS.add(host)
    return True


def parse_request_head(raw: bytes) -> RequestHead:
    """Parse and check a request head (the request line through CRLF CRLF); raises HeadRefused with the answer.

    The header lines are checked and searched as one block (one regular expression checks every
    name, one scan of the lower-case block finds the REQUEST_FIELDS lines), not line by line: a
    head's cost barely grows with its number of headers.

    Every byte is checked by the request line's checks and HEADER_BLOCK; a head with a control
    character or a bare CR or LF anywhere is refused as malformed-head (400) before any other
    refusal, but that is only worked out once some check has failed (no pass over a good head)."""
    try:
        return _parse_request_head(raw)
    except HeadRefused:
        if not has_only_clean_line_ends(raw):
            raise refused(400, "malformed-head", MALFORMED) from None
        raise


def _parse_request_head(raw: bytes) -> RequestHead:
    line_end = raw.find(b"\r\n")
    request_line = raw[:line_end]
    if line_end > MAX_LINE_SIZE:
        raise refused(414, "target-too-long", "The request line is too long.")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise refused(400, "malformed-head", MALFORMED)
    method_bytes, target_bytes, version_bytes = parts
    method = COMMON_METHODS.get(method_bytes)
    if method is None:  # (no common method is refused: the refusal is only looked up for the others)
        if len(method_bytes) > MAX_METHOD_LENGTH or not METHOD_TOKEN.fullmatch(method_bytes):
            raise refused(400, "bad-method", "The request method is not a valid method token.")
        method = method_bytes.decode("ascii")
        if method in REFUSED_METHODS:
            raise refused(405, "refused-method", f"The bridge does not relay {method} requests.")
    version = VERSIONS.get(version_bytes)
    if version is None:
        if ANY_VERSION.fullmatch(version_bytes):
            raise refused(505, "bad-version", "Only HTTP/1.0 and HTTP/1.1 are supported.")
        raise refused(400, "malformed-head", MALFORMED)
    if BAD_TARGET_BYTES.search(target_bytes):
        if target_bytes.find(b"#") >= 0:
            raise refused(400, "bad-target", "The request target may not contain a fragment.")
        raise refused(400, "malformed-head", MALFORMED)
    block = raw[line_end:-4]
    size = len(block)
    if size > MIN_LINE * MAX_HEADERS and block.count(b"\r\n") > MAX_HEADERS:
        raise refused(431, "head-too-large", "The request header fields are too large.")
    if size > MAX_HEAD_BYTES:  # the header lines with their CRLFs
        raise refused(431, "head-too-large", "The request header fields are too large.")
    if not HEADER_BLOCK.fullmatch(block):
        raise refused(400, "malformed-head", MALFORMED)
    if size > MAX_FIELD_SIZE + 2 and max(map(len, block.split(b"\r\n"))) > MAX_FIELD_SIZE:
        raise refused(431, "head-too-large", "The request header fields are too large.")
    lowered = block.lower()
    if version == (1, 0):
        request_line = method_bytes + b" " + target_bytes + b" HTTP/1.1"

    content_length = None
    chunked = False
    fields = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    hosts: list[bytes] = []
    connection = b""
    expect = b""
    for match in REQUEST_FIELDS.finditer(lowered):
        name, value = match.group(1, 2)
        fields.append((name, *match.span()))
        if name == b"host":
            hosts.append(value.strip(b" \t"))
        elif name == b"connection":
            connection = connection + b"," + value if connection else value
        elif name == b"content-length":
            lengths.append(value.strip(b" \t"))
        elif name == b"transfer-encoding":
            codings.append(value.strip(b" \t"))
        elif name == b"expect":
            expect = value
    if lengths or codings:
        content_length, chunked = request_framing(lengths, codings, version)
    if len(hosts) > 1 or (hosts and hosts[0] not in VALID_HOSTS and not remember_valid_host(hosts[0])):
        raise refused(400, "bad-host", "The Host header is not a valid host name.")
    if not hosts and version == (1, 1):
        raise refused(400, "bad-host", "An HTTP/1.1 request must have a Host header.")
    tokens = EMPTY_TOKENS
    if connection:
        tokens = connection_tokens(connection)
        if not tokens.isdisjoint(END_TO_END):
            # Dropping them as hop-by-hop would change the framing the legacy server sees (smuggling).
            raise refused(400, "smuggling", "The Connection header may not name Content-Length or Host.")
    return RequestHead(
        method,
        target_bytes.decode("latin-1"),
        version,
        request_line,
        block,
        lowered,
        content_length,
        chunked,
        b"close" not in tokens if version == (1, 1) else b"keep-alive" in tokens,
        expect.strip(b" \t") == b"100-continue",
        tokens,
        fields,
    )


def request_framing(lengths: list[bytes], codings: list[bytes], version: tuple[int, int]) -> tuple[int | None, bool]:
    """(Content-Length, chunked) of a request with a body, from its stripped Content-Length and
    (lower-case) Transfer-Encoding values; raises HeadRefused when the framing is ambiguous (RFC 9112
    6.3: the request smuggling cases)."""
    if len(lengths) > 1:
        raise refused(400, "smuggling", "The request has more than one Content-Length.")
    if codings and lengths:
        raise refused(400, "smuggling", "The request has both Content-Length and Transfer-Encoding.")
    if codings:
        if version == (1, 0):
            raise refused(400, "smuggling", "HTTP/1.0 requests may not use Transfer-Encoding.")
        final_coding = codings[0].rsplit(b",", 1)[-1].strip(b" \t") if len(codings) == 1 else b""
        if final_coding != b"chunked":  # no way to tell where the body ends (RFC 9112 6.3)
            raise refused(400, "smuggling", "The request's Transfer-Encoding does not end in chunked.")
        if codings[0] != b"chunked":
            raise refused(501, "smuggling", "Only Transfer-Encoding: chunked is supported.")
        return None, True
    if not lengths[0].isdigit() or len(lengths[0]) > MAX_CONTENT_LENGTH_DIGITS:
        raise refused(400, "smuggling", "The Content-Length is not a number.")
    return int(lengths[0]), False


def complete_head_length(data: bytes, scanned: int = 0) -> int:
    """The length of the request head that starts ``data`` (through CRLF CRLF), or 0 while more bytes
    are needed; raises HeadRefused as soon as no acceptable head can come of it. ``scanned``: how many
    bytes of ``data`` an earlier call already checked (a head trickling in is not rescanned whole).
    (Empty lines before a request line are the caller's to skip, RFC 9112 2.2.)"""
    end = data.find(b"\r\n\r\n", max(0, scanned - 3))
    if end >= 0:
        return end + 4
    size = len(data)
    if size > MAX_LINE_SIZE and data.find(b"\r\n", 0, MAX_LINE_SIZE + 2) < 0:
        raise refused(414, "target-too-long", "The request line is too long.")
    if size > MAX_REQUEST_HEAD:
        raise refused(431, "head-too-large", "The request header fields are too large.")
    # (A CR at the very end may be the start of a CRLF: not judged yet.)
    if BAD_HEAD_BYTES.search(data, max(0, scanned - 1), size - 1 if data.endswith(b"\r") else size):
        raise refused(400, "malformed-head", MALFORMED)  # e.g. bare LF line ends: no CRLF CRLF will come
    return 0


# --------------------------------------------------------------------------- response heads

STATUS_LINE = re.compile(rb"HTTP/(1\.[0-9]) ([1-9][0-9]{2})(?: ([\t\x20-\x7e\x80-\xff]*))?")
# Each line: CRLF, a token name directly followed by its colon, a value of VCHAR, obs-text, SP and
# HTAB: no control character, bare CR or bare LF gets through (what is relayed to clients is clean).
RESPONSE_BLOCK = HEADER_BLOCK
# The response header lines the bridge acts on, found in one scan of the lower-case block (a scan
# costs about as much as several find() calls). Group 1: the name; group 2: the value, lower-case,
# not stripped.
_RESPONSE_NAMES: list[bytes] = sorted((*HOP_BY_HOP, b"content-length", *REWRITTEN_RESPONSE), key=len, reverse=True)
RESPONSE_FIELDS = re.compile(rb"\r\n(" + b"|".join(_RESPONSE_NAMES) + rb"):([^\r]*)")


@dataclass(slots=True)
class ResponseHead:
    version: str  # "1.0", "1.1" (any "1.x")
    status: int
    reason: bytes
    block: bytes  # the header lines as received, each preceded by CRLF
    lowered: bytes  # the same, lower-case (for finding names)
    chunked: bool = False  # the final transfer coding is chunked
    # The body length when framed by Content-Length (None with any Transfer-Encoding: it wins).
    content_length: int | None = None
    connection_tokens: frozenset[bytes] = frozenset()  # the Connection header's tokens, lower-case
    # (lower-case name, start, end) of each line of RESPONSE_FIELDS in the block, in order.
    fields: list[tuple[bytes, int, int]] = field(default_factory=list)
    # The Transfer-Encoding values, joined by commas, lower-case (b"" without one). Non-empty and not
    # ending in chunked: the body runs to the connection's end (RFC 9112 6.3 item 3).
    codings: bytes = b""


def response_head_length(data: bytes, start: int = 0) -> int:
    """The length of the response head that starts ``data`` (through CRLF CRLF), or 0 while more bytes
    are needed; raises ResponseRefused when it is already larger than MAX_RESPONSE_HEAD.
    ``start``: where to resume the search (bytes already searched, less 3)."""
    end = data.find(b"\r\n\r\n", start)
    if end >= 0:
        if end + 4 > MAX_RESPONSE_HEAD:
            raise ResponseRefused(f"sent a response header larger than {MAX_RESPONSE_HEAD // 1024} KiB")
        return end + 4
    if len(data) >= MAX_RESPONSE_HEAD:
        raise ResponseRefused(f"sent a response header larger than {MAX_RESPONSE_HEAD // 1024} KiB")
    return 0


def parse_response_head(raw: bytes) -> ResponseHead:
    """Parse a response head (the status line through CRLF CRLF): status line, framing headers, the
    block as received; raises ResponseRefused (prefix it with the server's name)."""
    line_end = raw.find(b"\r\n")
    status = STATUS_LINE.fullmatch(raw, 0, line_end)
    if status is None:
        status_line = raw[:line_end].decode("latin-1")
        raise ResponseRefused(f"answered something that is not HTTP/1.x ({status_line[:40]!r})")
    block = raw[line_end:-4]
    if len(block) > MIN_LINE * MAX_RESPONSE_HEADERS and block.count(b"\r\n") > MAX_RESPONSE_HEADERS:
        raise ResponseRefused(f"sent more than {MAX_RESPONSE_HEADERS} response headers")
    if not RESPONSE_BLOCK.fullmatch(block):
        raise ResponseRefused("sent a malformed response header line")
    lowered = block.lower()
    version, code, reason = status.groups(b"")
    head = ResponseHead(version.decode("latin-1"), int(code), reason, block, lowered)
    fields = head.fields
    lengths: list[bytes] = []
    connection = b""
    codings = b""
    for match in RESPONSE_FIELDS.finditer(lowered):
        name, value = match.group(1, 2)
        fields.append((name, *match.span()))
        if name == b"content-length":
            lengths.append(value.strip(b" \t"))
        elif name == b"transfer-encoding":
            value = value.strip(b" \t")
            if value:
                codings = codings + b", " + value if codings else value
        elif name == b"connection":
            connection = connection + b"," + value if connection else value
    if codings:
        head.codings = codings
        # Chunked only when it is the final coding (RFC 9112 6.3): "chunked, gzip" runs to the close.
        head.chunked = codings == b"chunked" or codings.rsplit(b",", 1)[-1].strip(b" \t") == b"chunked"
    elif lengths:
        head.content_length = response_content_length(lengths)
    if connection:
        head.connection_tokens = connection_tokens(connection)
    return head


def response_content_length(lengths: list[bytes]) -> int:
    """The one Content-Length of a response (repeats must agree, RFC 9110 8.6), from its stripped
    values; anything else raises ResponseRefused."""
    if len(lengths) == 1 and lengths[0].isdigit() and len(lengths[0]) <= MAX_CONTENT_LENGTH_DIGITS:
        return int(lengths[0])  # the usual case: one plain Content-Length
    values = {v.strip(b" \t").decode("latin-1") for value in lengths for v in value.split(b",")}
    value = next(iter(values))
    if len(values) != 1 or not value.isascii() or not value.isdigit() or len(value) > MAX_CONTENT_LENGTH_DIGITS:
        raise ResponseRefused(f"sent an invalid Content-Length ({', '.join(sorted(values))[:40]})")
    return int(value)


def response_has_body(method: str, status: int) -> bool:
    return not (method == "HEAD" or 100 <= status < 200 or status in (204, 304))


def response_keeps_connection(head: ResponseHead) -> bool:
    """Whether the origin keeps the connection open after this response (its framing aside)."""
    tokens = head.connection_tokens
    if b"close" in tokens:
        return False
    if head.version == "1.0":
        # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing: close after it.
        return b"keep-alive" in tokens and not head.codings
    return True


# --------------------------------------------------------------------------- framing (RFC 9112 section 6)


class Body(enum.Enum):
    NONE = "none"  # no body at all
    LENGTH = "length"  # exactly Framing.length bytes (may be 0)
    CHUNKED = "chunked"  # chunked transfer coding: decode with ChunkedDecoder
    UNTIL_CLOSE = "until-close"  # everything until the connection ends (responses only)


@dataclass(frozen=True, slots=True)
class Framing:
    kind: Body
    length: int = 0  # with Body.LENGTH

    @property
    def has_body(self) -> bool:
        return self.kind is not Body.NONE and (self.kind is not Body.LENGTH or self.length > 0)


NO_BODY = Framing(Body.NONE)
CHUNKED = Framing(Body.CHUNKED)
UNTIL_CLOSE = Framing(Body.UNTIL_CLOSE)
EMPTY_BODY = Framing(Body.LENGTH, 0)


def request_body_framing(head: RequestHead) -> Framing:
    """A checked request's body: CHUNKED, LENGTH n (n > 0) or NONE (no framing field, or Content-Length: 0).
    A request never runs to the connection's end (RFC 9112 6.3 item 7)."""
    if head.chunked:
        return CHUNKED
    if head.content_length:
        return Framing(Body.LENGTH, head.content_length)
    return NO_BODY


def response_body_framing(method: str, head: ResponseHead) -> Framing:
    """How the origin frames the body of its response to a ``method`` request (RFC 9112 6.3): NONE for
    HEAD, 1xx, 204 and 304; CHUNKED when chunked is the final transfer coding; UNTIL_CLOSE for any
    other Transfer-Encoding or when neither field is present; else LENGTH n (Content-Length: 0 gives
    LENGTH 0)."""
    if not response_has_body(method, head.status):
        return NO_BODY
    if head.chunked:
        return CHUNKED
    if head.content_length is not None:
        return Framing(Body.LENGTH, head.content_length) if head.content_length else EMPTY_BODY
    return UNTIL_CLOSE


def client_framing(origin: Framing, client_version: tuple[int, int]) -> Framing:
    """How the bridge frames a relayed response body for the client: a length stays a length; a
    chunked body stays chunked for HTTP/1.1 clients and runs to the close for HTTP/1.0 ones (they do
    not know chunked); a body until close stays until close."""
    if origin.kind is Body.CHUNKED and client_version < (1, 1):
        return UNTIL_CLOSE
    return origin


# --------------------------------------------------------------------------- chunked bodies

HEXDIGITS = rb"[0-9A-Fa-f]"
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# chunk = chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )
CHUNK_LINE = re.compile(rb"(" + HEXDIGITS + rb"{1,16})(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*")
CHUNK_SIZE_ONLY = re.compile(HEXDIGITS + rb"{1,16}")
# A trailer field line: a token name, its colon, a value of VCHAR, obs-text, SP and HTAB.
TRAILER_LINE = re.compile(_TOKEN + rb":[\t\x20-\x7e\x80-\xff]*")

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """Incremental, strict decoder of one chunked message body (RFC 9112 7.1), for request and
    response bodies alike. Sans-IO: ``feed(data)`` returns the body pieces found in ``data`` (the
    input object itself when it is all chunk data, else slices of it: one copy at C speed, none with
    ``views=True``, which returns memoryview slices). When the last chunk and the trailer section
    are through, ``done`` is True and ``leftover`` holds the input that followed (the next message).

    Strict: a chunk-size is 1 to 16 hex digits and nothing else (no sign, "0x", "_" or spaces);
    extensions follow ``*( BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ] )`` and nothing
    else may follow; each line ends in CRLF (a bare LF is an error) and is at most ``max_line`` bytes;
    chunk data is followed by exactly CRLF; trailer lines are header lines (token, colon, value; no
    obsolete folding) within ``max_trailer`` bytes in all. The trailer fields are kept in
    ``trailers`` as (name, value) pairs for information; the bridge forwards none of them. Every
    violation raises ChunkedError.
    """

    __slots__ = ("_state", "_remaining", "_line", "_crlf", "_trailer_bytes", "_views", "max_line", "max_trailer", "trailers", "leftover")

    def __init__(self, *, views: bool = False, max_line: int = MAX_CHUNK_LINE, max_trailer: int = MAX_TRAILER_BYTES) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._line = b""  # a partial line carried over from the previous feed
        self._crlf = 0  # bytes of the CRLF after chunk data matched so far
        self._trailer_bytes = 0
        self._views = views
        self.max_line = max_line
        self.max_trailer = max_trailer
        self.trailers: list[tuple[bytes, bytes]] = []
        self.leftover = b""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def remaining(self) -> int:
        """Bytes of chunk data still due in the current chunk (0 between chunks): a caller may read
        no more than this to leave the data on the fast path."""
        return self._remaining if self._state == _DATA else 0

    def feed(self, data: bytes) -> list:
        """The body pieces in ``data`` (bytes or bytearray); raises ChunkedError."""
        pieces: list = []
        size = len(data)
        if self._state == _DONE:
            self.leftover += data
            return pieces
        if self._state == _DATA and self._remaining >= size:  # the common case for a large chunk
            if size:
                self._remaining -= size
                pieces.append(data)
                if not self._remaining:
                    self._state = _DATA_END
            return pieces
        view = memoryview(data) if self._views else data
        position = 0
        while position < size:
            state = self._state
            if state == _DATA:
                end = position + self._remaining
                if end >= size:
                    end = size
                pieces.append(data if position == 0 and end == size else view[position:end])
                self._remaining -= end - position
                position = end
                if not self._remaining:
                    self._state = _DATA_END
            elif state == _DATA_END:
                matched = self._crlf
                need = 2 - matched
                got = data[position : position + need]
                if got != b"\r\n"[matched : matched + len(got)]:
                    raise ChunkedError("a chunk's data is not followed by CRLF (the chunk is longer than its declared size)")
                position += len(got)
                matched += len(got)
                if matched == 2:
                    self._crlf = 0
                    self._state = _SIZE
                else:
                    self._crlf = matched
            else:  # a line: a chunk-size line or a trailer line
                limit = self.max_line if state == _SIZE else self.max_trailer - self._trailer_bytes
                carried = len(self._line)
                lf = data.find(b"\n", position, position + limit - carried + 2)
                if lf < 0:
                    if size - position + carried > limit + 1:  # (CR of the CRLF may be the last byte)
                        raise ChunkedError(self._too_long(state))
                    self._line += data[position:]
                    return pieces
                line = data[position:lf]
                if carried:
                    line = self._line + line
                    self._line = b""
                position = lf + 1
                if not line.endswith(b"\r"):
                    raise ChunkedError("a line of the chunked body ends in a bare LF instead of CRLF")
                line = line[:-1]
                if len(line) > limit:
                    raise ChunkedError(self._too_long(state))
                if state == _SIZE:
                    self._size_line(line)
                else:
                    self._trailer_line(line)
                    if self._state == _DONE:
                        self.leftover = data[position:]
                        return pieces
        return pieces

    def _size_line(self, line: bytes) -> None:
        match = CHUNK_SIZE_ONLY.fullmatch(line) or CHUNK_LINE.fullmatch(line)
        if match is None:
            digits = len(line) - len(line.lstrip(b"0123456789abcdefABCDEF"))
            if not 0 < digits <= 16:
                raise ChunkedError("a chunk size is not 1 to 16 hexadecimal digits")
            raise ChunkedError("a chunk size is followed by something other than chunk extensions")
        size = int(match.group(1) if match.re is CHUNK_LINE else line, 16)
        if size:
            self._remaining = size
            self._state = _DATA
        else:
            self._state = _TRAILER

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self._state = _DONE
            return
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes + 2 > self.max_trailer:
            raise ChunkedError(self._too_long(_TRAILER))
        if TRAILER_LINE.fullmatch(line) is None:
            raise ChunkedError("a trailer line is not a header field (name, colon, value; no folding)")
        name, _, value = line.partition(b":")
        self.trailers.append((name, value.strip(b" \t")))

    def _too_long(self, state: int) -> str:
        if state == _SIZE:
            return f"a chunk-size line is longer than {self.max_line} bytes"
        return f"the trailer section is longer than {self.max_trailer} bytes"

    def finish(self) -> None:
        """The input has ended (the connection closed): raises ChunkedError unless the body was complete."""
        if self._state != _DONE:
            raise ChunkedError("the connection ended inside the chunked body")


LAST_CHUNK = b"0\r\n\r\n"


def encode_chunk(data: bytes) -> bytes:
    """One chunk carrying ``data`` (one copy: a single write and one TLS record); b"" for no data (an
    empty chunk would end the body)."""
    if not data:
        return b""
    return b"".join((b"%x\r\n" % len(data), data, b"\r\n"))


# --------------------------------------------------------------------------- composing heads

# RFC 9110's phrases (Python's http.HTTPStatus still has some of RFC 2616's).
REASON_PHRASES: dict[int, str] = {
    100: "Continue",
    101: "Switching Protocols",
    102: "Processing",
    103: "Early Hints",
    200: "OK",
    201: "Created",
    202: "Accepted",
    203: "Non-Authoritative Information",
    204: "No Content",
    205: "Reset Content",
    206: "Partial Content",
    207: "Multi-Status",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    411: "Length Required",
    412: "Precondition Failed",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    417: "Expectation Failed",
    421: "Misdirected Request",
    422: "Unprocessable Content",
    426: "Upgrade Required",
    428: "Precondition Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
_CLASS_PHRASES = {1: "Informational", 2: "Success", 3: "Redirection", 4: "Client Error", 5: "Server Error"}


def reason_phrase(status: int) -> str:
    """The RFC 9110 reason phrase, or the status class's name for codes without one."""
    phrase = REASON_PHRASES.get(status)
    if phrase is None:
        phrase = _CLASS_PHRASES.get(status // 100, "Error")
    return phrase


def local_answer(
    status: int,
    message: str,
    *,
    keep_alive: bool = False,
    version: tuple[int, int] = (1, 1),
    with_body: bool = True,
    extra_headers: Iterable[tuple[str, str]] = (),
    security_headers: bool = True,
) -> bytes:
    """The bytes of one of the bridge's own short answers: a status line with ``version`` (the
    client's) and the standard phrase, ``text/plain`` with ``message`` and a newline as the body
    (left out when ``with_body`` is false, e.g. for HEAD, the Content-Length still announcing it),
    ``extra_headers`` (e.g. Retry-After, Location), the security headers, and Connection as
    ``keep_alive`` needs it for that version (close for 1.1, keep-alive for 1.0). Raises ValueError
    when an extra header would break the head (CR, LF or another control character)."""
    body = (message + "\n").encode()
    lines = [
        b"HTTP/1.%d %d %s" % (version[1], status, reason_phrase(status).encode("ascii")),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
    ]
    if version >= (1, 1):
        if not keep_alive:
            lines.append(b"Connection: close")
    elif keep_alive:
        lines.append(b"Connection: keep-alive")
    for name, value in extra_headers:
        line = f"{name}: {value}".encode("latin-1")
        if TRAILER_LINE.fullmatch(line) is None:  # a token name, a colon, no control character
            raise ValueError(f"not a valid header line: {line[:60]!r}")
        lines.append(line)
    if security_headers:
        lines.extend(b"%s: %s" % pair for pair in SECURITY_HEADERS)
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body if with_body else b"")


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS_LINE = re.compile(rb"\r\nlink:[^\r]*")


def interim_response(head: ResponseHead, client_version: tuple[int, int]) -> bytes:
    """What the client gets of the origin's interim (1xx) response ``head``: b"" for an HTTP/1.0
    client (RFC 9110 15.2: never a 1xx); ``HTTP/1.1 100 Continue`` and nothing else for 100; for 103
    Early Hints, the status line and the origin's Link lines (unless its Connection names Link);
    for other 1xx codes (102), the status line alone. No other line of an interim response is relayed:
    hop-by-hop lines, framing lines, cookies and authentication headers have no business in a 1xx.
    101 Switching Protocols raises ResponseRefused: the bridge relays no tunnel (the client's Upgrade
    is hop-by-hop and never reaches the origin, so a 101 is a protocol violation)."""
    status = head.status
    if status == 101:
        raise ResponseRefused("tried to switch protocols, which the bridge does not relay")
    if client_version < (1, 1):
        return b""
    if status == 100:
        return CONTINUE
    block = b""
    if status == 103 and b"link" not in head.connection_tokens:
        block = b"".join(head.block[start:end] for start, end in (m.span() for m in EARLY_HINTS_LINE.finditer(head.lowered)))
    return b"HTTP/1.1 %d %s%s\r\n\r\n" % (status, reason_phrase(status).encode("ascii"), block)


# --------------------------------------------------------------------------- cutting header lines


def lines_matching(names: Iterable[bytes]) -> re.Pattern[bytes]:
    """Matches whole header lines (with the CRLF before them) whose name is one of ``names`` (any case).
    (For fixed name sets only: compile once; never per peer-supplied set.)"""
    alternatives = b"|".join(re.escape(name) for name in sorted(set(names), key=len, reverse=True))
    return re.compile(rb"\r\n(?:" + alternatives + rb")[ \t]*:[^\r\n]*", re.IGNORECASE)


REWRITTEN_RESPONSE_NAMES = frozenset(REWRITTEN_RESPONSE)


def cut_lines(block: bytes, fields: list[tuple[bytes, int, int]], keep: frozenset[bytes] = REWRITTEN_RESPONSE_NAMES) -> tuple[bytes, tuple[bytes, ...]]:
    """The block less the lines of ``fields`` (the (name, start, end) spans a parse found) whose name
    is not in ``keep``, and the names of the ``keep`` lines met, in order. For a response head's
    fields: the block less its hop-by-hop and Content-Length lines (the bridge sets the framing), and
    the names of the lines it keeps but may rewrite (Location, the security headers)."""
    pieces = []
    kept: tuple[bytes, ...] = ()
    position = 0
    for name, start, end in fields:
        if name in keep:
            kept += (name,)
            continue
        pieces.append(block[position:start])
        position = end
    if not pieces:
        return block, kept
    pieces.append(block[position:])
    return b"".join(pieces), kept


cut_response_lines = cut_lines


def without_lines_named(block: bytes, names: frozenset[bytes]) -> bytes:
    """The block (CRLF before each line) less the lines whose lower-case name is in ``names``. A loop,
    not a regular expression: the names come from a peer's Connection header and vary, and compiling a
    pattern per set would let a peer spend the bridge's CPU and memory at will."""
    lines = block.split(b"\r\n")
    return b"".join(b"\r\n" + line for line in lines[1:] if line[: line.find(b":")].lower() not in names)
