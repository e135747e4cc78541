"""Request heads for property-based fuzzing (hypothesis) of bridge.net.front's head reader
(complete_head_length) and parser (parse_request_head): a plausible head, then up to three hostile
mutations, so many heads get past the reader to the framing and Host checks.
"""

from __future__ import annotations

from hypothesis import strategies as st

from bridge.protocol.http1 import HeadRefused, RequestHead, complete_head_length, parse_request_head
from support.bridges import BRIDGE_FQDN

METHODS = ["GET", "POST", "RPC_IN_DATA", "RPC_OUT_DATA", "PROPFIND"]
TARGETS = ["/EWS/Exchange.asmx", "/owa/", "/rpc/rpcproxy.dll?EXCH2007.lab.local:6001", "/Autodiscover/Autodiscover.xml", "/ecp/"]
NAMES = ["Content-Length", "Transfer-Encoding", "Connection", "Expect", "Authorization", "X-Forwarded-For", "Upgrade", "User-Agent", "Host"]
VALUES = ["5", "0", "chunked", "close", "keep-alive", "100-continue", "MSRPC", "203.0.113.9", BRIDGE_FQDN]
HOSTILE_METHODS = ["get", "CONNECT", "TRACE", "G(ET", "GE T", "", "X" * 40, "\x16\x03\x01", "GET\x00"]
HOSTILE_TARGETS = [
    "http://evil.example/owa/",
    "//evil.example/owa",
    "*",
    "/owa/../ecp/",
    "/owa/%2e%2e/ecp",
    "/owa/%252e%252e/",
    "/owa\\..\\x",
    "/owa/#frag",
    "/owa/ x",
    "/owa/\x00",
    "/" + "a" * 9000,
    "127.0.0.1:22",
]
HOSTILE_VERSIONS = ["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/11", "http/1.1", "HTTP/1.1 extra", "HTTP/0.9"]
HOSTILE_NAMES = ["X A", "X:A", " Host", "Host ", "Content-Length\t", "Content-Length ", "X\x00A", "Transfer-Encoding"]
HOSTILE_VALUES = [
    "evil host",
    "5, 5",
    "-1",
    "+5",
    "0x5",
    "99999999999999999999",
    "gzip, chunked",
    "chunked, gzip",
    "identity",
    " chunked",
    "CHUNKED",
    "chunked\x00",
    "keep-alive, Upgrade",
    "websocket",
    "a\rb",
    "a\nb",
    "\xe9t\xe9",
    "x" * 9000,
]
MUTATIONS = ["method", "target", "version", "name", "value", "random-value", "duplicate", "fold", "drop-host", "line-ending"]


@st.composite
def request_heads(draw) -> bytes:
    method, target, version = draw(st.sampled_from(METHODS)), draw(st.sampled_from(TARGETS)), "HTTP/1.1"
    headers = [["Host", BRIDGE_FQDN]] + [list(pair) for pair in draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=3))]
    end, fold = "\r\n", None
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        if mutation == "method":
            method = draw(st.sampled_from(HOSTILE_METHODS))
        elif mutation == "target":
            target = draw(st.sampled_from(HOSTILE_TARGETS))
        elif mutation == "version":
            version = draw(st.sampled_from(HOSTILE_VERSIONS))
        elif mutation == "name":
            headers.append([draw(st.sampled_from(HOSTILE_NAMES)), draw(st.sampled_from(VALUES))])
        elif mutation == "value":
            headers.append([draw(st.sampled_from(NAMES)), draw(st.sampled_from(HOSTILE_VALUES))])
        elif mutation == "random-value":
            headers.append([draw(st.sampled_from(NAMES)), draw(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=12))])
        elif mutation == "duplicate" and headers:
            headers.append(list(draw(st.sampled_from(headers))))
        elif mutation == "fold" and headers:
            fold = draw(st.integers(0, len(headers) - 1)), draw(st.sampled_from([" folded", "\tfolded", " "]))
        elif mutation == "drop-host":
            headers = [pair for pair in headers if pair[0] != "Host"]
        elif mutation == "line-ending":
            end = draw(st.sampled_from(["\n", "\r", "\r\r\n"]))
    lines = [f"{method} {target} {version}"]
    for index, (name, value) in enumerate(headers):
        lines.append(f"{name}: {value}")
        if fold is not None and fold[0] == index:
            lines.append(fold[1])  # obsolete line folding
    head = (end.join(lines) + end + end).encode("utf-8", "surrogateescape")
    return head + body_for(headers)


def body_for(headers: list[list[str]]) -> bytes:
    """A body matching the framing the head announces, so accepted requests complete."""
    for name, _value in headers:
        if name.lower() == "transfer-encoding":
            return b"5\r\nhello\r\n0\r\n\r\n"
    for name, value in headers:
        if name.lower() == "content-length" and value.strip().isdigit():
            return b"hello"[: int(value.strip()[:3])]
    return b""


def parse(data: bytes) -> RequestHead | None:
    """The head the bridge makes of data (None while it would wait for more); raises HeadRefused."""
    data = data.lstrip(b"\r\n")  # as the connection does before a request line
    length = complete_head_length(data)
    return parse_request_head(data[:length]) if length else None


def accepted(data: bytes) -> bool:
    """Would this head go on to the proxy?"""
    try:
        return parse(data) is not None
    except HeadRefused:
        return False
