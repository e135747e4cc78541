"""Unit tests of bridge.protocol.http1, the sans-IO HTTP/1.1 core: request and response heads, framing,
the chunked decoder and encoder, and the composed answers. No sockets."""

from __future__ import annotations

import pytest

from bridge.protocol import http1
from bridge.protocol.http1 import (
    CHUNKED,
    LAST_CHUNK,
    MAX_CHUNK_LINE,
    MAX_LINE_SIZE,
    MAX_RESPONSE_HEAD,
    NO_BODY,
    UNTIL_CLOSE,
    Body,
    ChunkedDecoder,
    ChunkedError,
    Framing,
    HeadRefused,
    ResponseRefused,
    client_framing,
    complete_head_length,
    connection_tokens,
    cut_lines,
    encode_chunk,
    interim_response,
    lines_matching,
    local_answer,
    parse_request_head,
    parse_response_head,
    reason_phrase,
    request_body_framing,
    response_body_framing,
    response_head_length,
    response_keeps_connection,
    without_lines_named,
)

HOST = b"Host: mail.example.com\r\n"


def request(*lines: bytes, start: bytes = b"GET /owa/ HTTP/1.1") -> bytes:
    return start + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def refusal(raw: bytes) -> tuple[int, str]:
    with pytest.raises(HeadRefused) as info:
        parse_request_head(raw)
    return info.value.status, info.value.reason


# --------------------------------------------------------------------------- request heads


def test_a_plain_get_is_parsed():
    head = parse_request_head(request(b"Host: mail.example.com", b"User-Agent: t"))
    assert (head.method, head.raw_path, head.version) == ("GET", "/owa/", (1, 1))
    assert head.request_line == b"GET /owa/ HTTP/1.1"
    assert head.block == b"\r\nHost: mail.example.com\r\nUser-Agent: t"
    assert head.keep_alive and not head.has_body and not head.expect_continue
    assert head.header("user-agent") == "t" and head.header("X-None") is None
    assert head.raw_headers == [(b"Host", b"mail.example.com"), (b"User-Agent", b"t")]
    assert request_body_framing(head) is NO_BODY


def test_http10_goes_upstream_as_http11_and_keeps_alive_only_when_asked():
    head = parse_request_head(request(start=b"GET /owa/ HTTP/1.0"))
    assert head.version == (1, 0) and head.request_line == b"GET /owa/ HTTP/1.1" and not head.keep_alive
    assert parse_request_head(request(b"Connection: Keep-Alive", start=b"GET / HTTP/1.0")).keep_alive


def test_connection_close_and_expect_continue():
    head = parse_request_head(request(HOST[:-2], b"Connection: close, X-Foo", b"Expect: 100-continue", b"Content-Length: 3"))
    assert not head.keep_alive and head.expect_continue
    assert head.connection_tokens == {b"close", b"x-foo"}
    assert request_body_framing(head) == Framing(Body.LENGTH, 3)


def test_rpc_methods_and_fields_spans():
    raw = request(HOST[:-2], b"Content-Length: 1073741824", b"X-Forwarded-For: 1.2.3.4", start=b"RPC_IN_DATA /rpc/rpcproxy.dll?a:6001 HTTP/1.1")
    head = parse_request_head(raw)
    assert head.method == "RPC_IN_DATA" and head.content_length == 1073741824
    assert [(name, head.block[start:end]) for name, start, end in head.fields] == [
        (b"host", b"\r\nHost: mail.example.com"),
        (b"content-length", b"\r\nContent-Length: 1073741824"),
        (b"x-forwarded-for", b"\r\nX-Forwarded-For: 1.2.3.4"),
    ]


@pytest.mark.parametrize(
    "raw, status, reason",
    [
        (request(HOST[:-2], start=b"get / HTTP/1.1"), 400, "bad-method"),
        (request(HOST[:-2], start=b"G(ET / HTTP/1.1"), 400, "bad-method"),
        (request(HOST[:-2], start=b"X" * 40 + b" / HTTP/1.1"), 400, "bad-method"),
        (request(HOST[:-2], start=b"CONNECT a:443 HTTP/1.1"), 405, "refused-method"),
        (request(HOST[:-2], start=b"TRACE / HTTP/1.1"), 405, "refused-method"),
        (request(HOST[:-2], start=b"GET / HTTP/2.0"), 505, "bad-version"),
        (request(HOST[:-2], start=b"GET / http/1.1"), 400, "malformed-head"),
        (request(HOST[:-2], start=b"GET  / HTTP/1.1"), 400, "malformed-head"),
        (request(HOST[:-2], start=b"GET /a#b HTTP/1.1"), 400, "bad-target"),
        (request(HOST[:-2], start=b"GET /caf\xe9 HTTP/1.1"), 400, "malformed-head"),
        (request(HOST[:-2], start=b"GET /\x7f HTTP/1.1"), 400, "malformed-head"),
        (request(HOST[:-2], start=b"GET /" + b"a" * MAX_LINE_SIZE + b" HTTP/1.1"), 414, "target-too-long"),
        (request(), 400, "bad-host"),
        (request(b"Host: a b"), 400, "bad-host"),
        (request(HOST[:-2], HOST[:-2]), 400, "bad-host"),
        (request(HOST[:-2], b"X A: 1"), 400, "malformed-head"),
        (request(HOST[:-2], b"X: 1", b" folded"), 400, "malformed-head"),
        (request(HOST[:-2], b"X : 1"), 400, "malformed-head"),
        (request(HOST[:-2], b"X: a\x00b"), 400, "malformed-head"),
        (request(HOST[:-2], b"X: a\rb"), 400, "malformed-head"),
        (request(HOST[:-2], b"X: a\nb"), 400, "malformed-head"),
        (request(HOST[:-2], b"Content-Length: 5", b"Content-Length: 5"), 400, "smuggling"),
        (request(HOST[:-2], b"Content-Length: 5, 5"), 400, "smuggling"),
        (request(HOST[:-2], b"Content-Length: -1"), 400, "smuggling"),
        (request(HOST[:-2], b"Content-Length: +5"), 400, "smuggling"),
        (request(HOST[:-2], b"Content-Length: 0x5"), 400, "smuggling"),
        (request(HOST[:-2], b"Content-Length: 9999999999999999999"), 400, "smuggling"),
        (request(HOST[:-2], b"Content-Length: 5", b"Transfer-Encoding: chunked"), 400, "smuggling"),
        (request(HOST[:-2], b"Transfer-Encoding: chunked, gzip"), 400, "smuggling"),
        (request(HOST[:-2], b"Transfer-Encoding: gzip, chunked"), 501, "smuggling"),
        (request(HOST[:-2], b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), 400, "smuggling"),
        (request(b"Transfer-Encoding: chunked", start=b"POST / HTTP/1.0"), 400, "smuggling"),
        (request(HOST[:-2], b"Connection: content-length"), 400, "smuggling"),
        (request(HOST[:-2], b"Connection: close, Host"), 400, "smuggling"),
        (request(HOST[:-2], b"X: " + b"a" * 8200), 431, "head-too-large"),
        (request(HOST[:-2], *[b"X-%d: 1" % i for i in range(200)]), 431, "head-too-large"),
        (request(HOST[:-2], *[b"X-%d: " % i + b"a" * 4000 for i in range(9)]), 431, "head-too-large"),
    ],
)
def test_request_refusals(raw, status, reason):
    assert refusal(raw) == (status, reason)


def test_a_control_character_is_malformed_before_any_other_refusal():
    # A refused method, a bad version or too many headers with a NUL: 400 malformed-head, as before.
    assert refusal(request(HOST[:-2], b"X: \x00", start=b"CONNECT a:1 HTTP/1.1")) == (400, "malformed-head")
    assert refusal(request(HOST[:-2], b"X: \x01", start=b"GET / HTTP/3.0")) == (400, "malformed-head")
    assert refusal(request(HOST[:-2], b"X: \x1b", *[b"X-%d: 1" % i for i in range(200)])) == (400, "malformed-head")
    assert refusal(request(HOST[:-2], start=b"GET\x00 / HTTP/1.1")) == (400, "malformed-head")


def test_head_refused_carries_the_answer():
    with pytest.raises(HeadRefused) as info:
        parse_request_head(request(start=b"TRACE / HTTP/1.1"))
    exc = info.value
    assert exc.problem == http1.HeadProblem(405, "refused-method", "The bridge does not relay TRACE requests.")
    assert str(exc) == exc.message and exc.message.endswith(".")


def test_chunked_request_framing():
    head = parse_request_head(request(HOST[:-2], b"Transfer-Encoding: Chunked", start=b"POST /EWS/x HTTP/1.1"))
    assert head.chunked and head.content_length is None and head.has_body
    assert request_body_framing(head) is CHUNKED


def test_complete_head_length():
    raw = request(HOST[:-2])
    assert complete_head_length(raw + b"GET") == len(raw)
    assert complete_head_length(raw[:-1]) == 0
    assert complete_head_length(b"GET / HTTP/1.1\r") == 0  # a CR at the end may start a CRLF
    with pytest.raises(HeadRefused) as info:
        complete_head_length(b"GET / HTTP/1.1\nHost: a\n")
    assert info.value.status == 400
    with pytest.raises(HeadRefused) as info:
        complete_head_length(b"GET /" + b"a" * (MAX_LINE_SIZE + 10))
    assert info.value.status == 414
    with pytest.raises(HeadRefused) as info:
        complete_head_length(b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * (http1.MAX_REQUEST_HEAD // 6 + 1))
    assert info.value.status == 431
    # a trickling head is not rescanned from the start, and the CRLF CRLF across two reads is found
    assert complete_head_length(raw, len(raw) - 2) == len(raw)


def test_connection_tokens_are_lower_case_and_cached():
    assert connection_tokens(b"Keep-Alive, ,Upgrade\t") == {b"keep-alive", b"upgrade"}
    assert connection_tokens(b"Keep-Alive, ,Upgrade\t") is connection_tokens(b"Keep-Alive, ,Upgrade\t")


# --------------------------------------------------------------------------- response heads


def response(*lines: bytes, start: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return start + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def test_a_plain_response_is_parsed():
    head = parse_response_head(response(b"Content-Length: 12", b"Server: IIS", b"Location: https://x/"))
    assert (head.version, head.status, head.reason) == ("1.1", 200, b"OK")
    assert head.content_length == 12 and not head.chunked and head.codings == b""
    assert [name for name, _, _ in head.fields] == [b"content-length", b"location"]
    assert response_keeps_connection(head)
    assert response_body_framing("GET", head) == Framing(Body.LENGTH, 12)
    assert response_body_framing("HEAD", head) is NO_BODY


@pytest.mark.parametrize(
    "codings, framing",
    [
        (b"chunked", CHUNKED),
        (b"Chunked", CHUNKED),
        (b"gzip, chunked", CHUNKED),
        (b"chunked, gzip", UNTIL_CLOSE),  # RFC 9112 6.3: chunked is not the final coding
        (b"gzip", UNTIL_CLOSE),
        (b"xchunked", UNTIL_CLOSE),
        (b"chunkedx", UNTIL_CLOSE),
    ],
)
def test_a_response_is_chunked_only_when_chunked_is_the_final_coding(codings, framing):
    head = parse_response_head(response(b"Transfer-Encoding: " + codings, b"Content-Length: 10"))
    assert head.content_length is None  # Transfer-Encoding overrides Content-Length
    assert response_body_framing("GET", head) == framing


def test_transfer_encoding_over_several_lines_is_one_list():
    head = parse_response_head(response(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"))
    assert head.chunked and head.codings == b"gzip, chunked"
    head = parse_response_head(response(b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"))
    assert not head.chunked and response_body_framing("GET", head) is UNTIL_CLOSE


def test_response_framing_without_fields_and_without_body():
    assert response_body_framing("GET", parse_response_head(response())) is UNTIL_CLOSE
    for status in (b"204 No Content", b"304 Not Modified", b"100 Continue"):
        assert response_body_framing("GET", parse_response_head(response(b"Content-Length: 5", start=b"HTTP/1.1 " + status))) is NO_BODY
    empty = response_body_framing("GET", parse_response_head(response(b"Content-Length: 0")))
    assert empty == Framing(Body.LENGTH, 0) and not empty.has_body


def test_client_framing():
    assert client_framing(CHUNKED, (1, 1)) is CHUNKED
    assert client_framing(CHUNKED, (1, 0)) is UNTIL_CLOSE
    assert client_framing(Framing(Body.LENGTH, 4), (1, 0)) == Framing(Body.LENGTH, 4)


def test_repeated_equal_content_lengths_are_one():
    assert parse_response_head(response(b"Content-Length: 7, 7", b"Content-Length: 7")).content_length == 7


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "answered something that is not HTTP/1.x ('SSH-2.0-OpenSSH')"),
        (response(start=b"HTTP/2.0 200 OK"), "not HTTP/1.x"),
        (response(start=b"HTTP/1.1 20 OK"), "not HTTP/1.x"),
        (response(start=b"HTTP/1.1 099 Odd"), "not HTTP/1.x"),
        (response(start=b"HTTP/1.1 200 O\x00K"), "not HTTP/1.x"),
        (response(b"Content-Length: 5", b"Content-Length: 6"), "sent an invalid Content-Length (5, 6)"),
        (response(b"Content-Length: -1"), "invalid Content-Length"),
        (response(b"Content-Length: 0x5"), "invalid Content-Length"),
        (response(b"Content-Length: \xb2"), "invalid Content-Length"),
        (response(b"Content-Length: 9999999999999999999"), "invalid Content-Length"),
        (response(b"Content-Length:"), "invalid Content-Length"),
        (response(b"Bad Name: 1"), "sent a malformed response header line"),
        (response(b"X: 1", b" folded"), "malformed response header line"),
        (response(b"X: a\x00b"), "malformed response header line"),
        (response(b"X: a\nb"), "malformed response header line"),
        (response(b"X: a\rb"), "malformed response header line"),
        (response(*[b"X: 1"] * 201), "sent more than 200 response headers"),
    ],
)
def test_response_refusals_are_sentence_fragments(raw, fragment):
    with pytest.raises(ResponseRefused) as info:
        parse_response_head(raw)
    assert fragment in str(info.value)
    assert f"the legacy server owa:443 {info.value}".count("the legacy server") == 1


def test_response_head_length():
    raw = response(b"Content-Length: 0")
    assert response_head_length(raw + b"HTTP") == len(raw)
    assert response_head_length(raw[:-2]) == 0
    with pytest.raises(ResponseRefused, match="larger than 64 KiB"):
        response_head_length(b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * (MAX_RESPONSE_HEAD // 6))


def test_keep_alive_of_responses():
    assert not response_keeps_connection(parse_response_head(response(b"Connection: close")))
    assert not response_keeps_connection(parse_response_head(response(start=b"HTTP/1.0 200 OK")))
    assert response_keeps_connection(parse_response_head(response(b"Connection: Keep-Alive", start=b"HTTP/1.0 200 OK")))
    # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing: close after it
    assert not response_keeps_connection(parse_response_head(response(b"Connection: keep-alive", b"Transfer-Encoding: chunked", start=b"HTTP/1.0 200 OK")))


# --------------------------------------------------------------------------- interim responses


def test_100_continue_is_relayed_bare():
    head = parse_response_head(response(b"Set-Cookie: a=b", b"Connection: keep-alive", b"Content-Length: 0", start=b"HTTP/1.1 100 Go ahead"))
    assert interim_response(head, (1, 1)) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert interim_response(head, (1, 0)) == b""  # never a 1xx to an HTTP/1.0 client


def test_103_keeps_only_link_lines_unless_connection_names_them():
    head = parse_response_head(response(b"Link: </a.css>; rel=preload", b"Upgrade: h2c", b"Set-Cookie: s=1", b"link: </b.js>", b"Keep-Alive: 5", start=b"HTTP/1.1 103 Early Hints"))
    assert interim_response(head, (1, 1)) == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nlink: </b.js>\r\n\r\n"
    named = parse_response_head(response(b"Link: </a.css>", b"Connection: Link", start=b"HTTP/1.1 103 Early Hints"))
    assert interim_response(named, (1, 1)) == b"HTTP/1.1 103 Early Hints\r\n\r\n"


def test_other_interim_codes_are_bare_and_101_is_refused():
    head = parse_response_head(response(b"X-Progress: 5", b"Transfer-Encoding: chunked", start=b"HTTP/1.1 102 Working"))
    assert interim_response(head, (1, 1)) == b"HTTP/1.1 102 Processing\r\n\r\n"
    with pytest.raises(ResponseRefused, match="switch protocols"):
        interim_response(parse_response_head(response(b"Upgrade: websocket", b"Connection: Upgrade", start=b"HTTP/1.1 101 Switching")), (1, 1))


# --------------------------------------------------------------------------- the chunked decoder


def decode_whole(data: bytes, **options) -> tuple[bytes, ChunkedDecoder]:
    decoder = ChunkedDecoder(**options)
    return b"".join(bytes(piece) for piece in decoder.feed(data)), decoder


def decode_bytewise(data: bytes, **options) -> tuple[bytes, ChunkedDecoder]:
    decoder = ChunkedDecoder(**options)
    pieces = []
    for index in range(len(data)):
        pieces += decoder.feed(data[index : index + 1])
    return b"".join(bytes(piece) for piece in pieces), decoder


def outcome(decode, data: bytes):
    """What a decoding yields: (body, done, leftover, trailers) or the error."""
    try:
        body, decoder = decode(data)
    except ChunkedError as exc:
        return ("error", str(exc))
    return (body, decoder.done, bytes(decoder.leftover), decoder.trailers)


VALID_BODIES = [
    (b"0\r\n\r\n", b""),
    (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
    (b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
    (b"0000000000000005\r\nhello\r\n0\r\n\r\n", b"hello"),  # 16 digits: the bound, inclusive
    (b"5;name\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b"5;name=value\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b'5;name="quoted \\" value"\r\nhello\r\n0\r\n\r\n', b"hello"),
    (b"5;a;b=c;d=\"\"\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b"5 ;ext\r\nhello\r\n0\r\n\r\n", b"hello"),  # BWS before ";"
    (b"5\t; ext = v\r\nhello\r\n0\r\n\r\n", b"hello"),  # BWS around ";" and "="
    (b"5\r\nhello\r\n0;last=1\r\n\r\n", b"hello"),
    (b"5\r\nhello\r\n0\r\nExpires: never\r\nX-Sum:\t 1 \r\n\r\n", b"hello"),
    (b"5\r\n\r\n\r\n\r\r\n0\r\n\r\n", b"\r\n\r\n\r"),  # chunk data is opaque
]


@pytest.mark.parametrize("data, body", VALID_BODIES)
def test_valid_chunked_bodies(data, body):
    whole = outcome(decode_whole, data + b"NEXT")
    assert whole[:3] == (body, True, b"NEXT")
    assert outcome(decode_bytewise, data + b"NEXT") == whole
    assert outcome(lambda d: decode_whole(d, views=True), data + b"NEXT") == whole


def test_trailers_are_exposed_not_forwarded():
    _, decoder = decode_whole(b"0\r\nExpires: never\r\nX-Sum:\t 1 \r\n\r\n")
    assert decoder.trailers == [(b"Expires", b"never"), (b"X-Sum", b"1")]


INVALID_BODIES = [
    b"-1\r\nhello\r\n0\r\n\r\n",  # int(x, 16) took it: everything after it became body
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    b" 5\r\nhello\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",  # whitespace without an extension
    b"5\t\r\nhello\r\n0\r\n\r\n",
    b"5;\x00\r\nhello\r\n0\r\n\r\n",
    b"5;\r\nhello\r\n0\r\n\r\n",  # an empty extension name
    b"5;a=\r\nhello\r\n0\r\n\r\n",
    b'5;a="x\r\nhello\r\n0\r\n\r\n',
    b"5;a b\r\nhello\r\n0\r\n\r\n",
    b"5;a=b c\r\nhello\r\n0\r\n\r\n",
    b"5;a=b \r\nhello\r\n0\r\n\r\n",
    b"5,a\r\nhello\r\n0\r\n\r\n",
    b"\r\nhello\r\n0\r\n\r\n",  # no size at all
    b"g\r\nhello\r\n0\r\n\r\n",
    b"\xd9\r\nhello\r\n0\r\n\r\n",  # a non-ASCII digit
    b"10000000000000000\r\n",  # 17 digits
    b"00000000000000005\r\nhello\r\n0\r\n\r\n",  # 17 digits, even with leading zeros
    b"5\nhello\r\n0\r\n\r\n",  # a bare LF ends the size line
    b"5\r\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloX\r\n0\r\n\r\n",  # the chunk is longer than declared
    b"5\r\nhello\n0\r\n\r\n",  # no CR after the data
    b"5\r\nhello\r0\r\n\r\n",
    b"5\r\nhello0\r\n\r\n",  # no CRLF after the data
    b"0\r\nX: 1\n\r\n",  # a bare LF in the trailers
    b"0\r\nX: 1\r\n\n",
    b"0\r\n\n",
    b"0\r\nX: 1\r\n folded\r\n\r\n",  # obsolete line folding
    b"0\r\n\tfolded\r\n\r\n",
    b"0\r\nGET /owa/ HTTP/1.1\r\n\r\n",  # a request line smuggled into the trailers
    b"0\r\nX : 1\r\n\r\n",
    b"0\r\nX: a\x00b\r\n\r\n",
    b"0\r\nX: a\rb\r\n\r\n",
]


@pytest.mark.parametrize("data", INVALID_BODIES)
def test_invalid_chunked_bodies(data):
    whole = outcome(decode_whole, data)
    assert whole[0] == "error", whole
    assert outcome(decode_bytewise, data) == whole  # the same verdict, the same message


def test_huge_sizes_are_bounded_but_accepted_up_to_16_digits():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"ffffffffffffffff\r\nabc") == [b"abc"]
    assert decoder.remaining == 0xFFFFFFFFFFFFFFFF - 3 and not decoder.done


def test_line_length_is_bounded():
    long_extension = b"5;" + b"a" * MAX_CHUNK_LINE + b"\r\nhello\r\n0\r\n\r\n"
    for decode in (decode_whole, decode_bytewise):
        with pytest.raises(ChunkedError, match="longer than 4096"):
            decode(long_extension)
    # the error comes as soon as the bound is passed, before any line end arrives
    with pytest.raises(ChunkedError):
        ChunkedDecoder().feed(b"5" + b" " * (MAX_CHUNK_LINE + 5))
    ok = b"5;" + b"a" * (MAX_CHUNK_LINE - 2) + b"\r\nhello\r\n0\r\n\r\n"
    assert decode_whole(ok)[0] == decode_bytewise(ok)[0] == b"hello"


def test_trailer_section_is_bounded():
    decoder = ChunkedDecoder(max_trailer=64)
    with pytest.raises(ChunkedError, match="trailer section"):
        decoder.feed(b"0\r\n" + b"X-A: 1234567890\r\n" * 10 + b"\r\n")
    decoder = ChunkedDecoder(max_trailer=64)
    with pytest.raises(ChunkedError, match="trailer section"):
        decoder.feed(b"0\r\nX: " + b"a" * 100)  # no line end yet


def test_a_large_chunk_passes_without_copies():
    payload = bytes(range(256)) * 1024  # 256 KiB
    decoder = ChunkedDecoder()
    assert decoder.feed(b"40000\r\n") == []
    assert decoder.remaining == len(payload)
    pieces = decoder.feed(payload)
    assert len(pieces) == 1 and pieces[0] is payload  # the input object itself
    assert decoder.feed(b"\r\n0\r\n\r\n") == [] and decoder.done
    # in one piece with the framing around it: one slice (a single memcpy), or a view with views=True
    data = b"40000\r\n" + payload + b"\r\n0\r\n\r\n"
    pieces = ChunkedDecoder().feed(data)
    assert pieces == [payload]
    views = ChunkedDecoder(views=True).feed(data)
    assert len(views) == 1 and isinstance(views[0], memoryview) and views[0].obj is data and views[0] == payload


def test_chunk_data_split_at_every_point():
    data = b"3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nT: 1\r\n\r\nrest"
    for cut in range(len(data) + 1):
        decoder = ChunkedDecoder()
        pieces = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert b"".join(pieces) == b"abcdefg" and decoder.done and decoder.leftover == b"rest", cut


def test_feeding_after_the_end_only_adds_to_the_leftover():
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n\r\nGET")
    assert decoder.feed(b" / HTTP/1.1") == [] and decoder.leftover == b"GET / HTTP/1.1"


def test_finish():
    decoder = ChunkedDecoder()
    decoder.feed(b"5\r\nhel")
    with pytest.raises(ChunkedError, match="ended inside"):
        decoder.finish()
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n\r\n")
    decoder.finish()


def test_encoder_round_trip():
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"") == b""  # never an accidental last chunk
    assert encode_chunk(memoryview(b"x" * 300)) == b"12c\r\n" + b"x" * 300 + b"\r\n"
    pieces = [b"a", b"b" * 17, b"c" * 4096]
    body, decoder = decode_whole(b"".join(map(encode_chunk, pieces)) + LAST_CHUNK)
    assert body == b"".join(pieces) and decoder.done


# --------------------------------------------------------------------------- composition


def test_local_answer_http11_close():
    answer = local_answer(404, "Not found: the bridge forwards only Exchange virtual directories.")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert body == b"Not found: the bridge forwards only Exchange virtual directories.\n"
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 404 Not Found",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
        b"X-Frame-Options: SAMEORIGIN",
        b"X-Content-Type-Options: nosniff",
    ]
    parsed = parse_response_head(head + b"\r\n\r\n")
    assert parsed.content_length == len(body) and not response_keeps_connection(parsed)


def test_local_answer_versions_keep_alive_head_and_extras():
    keep11 = local_answer(403, "No.", keep_alive=True)
    assert b"Connection" not in keep11 and keep11.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    keep10 = local_answer(502, "Down.", keep_alive=True, version=(1, 0))
    assert keep10.startswith(b"HTTP/1.0 502 Bad Gateway\r\n") and b"\r\nConnection: keep-alive\r\n" in keep10
    close10 = local_answer(502, "Down.", version=(1, 0))
    assert b"Connection" not in close10  # HTTP/1.0 closes by default
    head_only = local_answer(404, "Nope.", with_body=False, keep_alive=True)
    assert head_only.endswith(b"\r\n\r\n") and b"Content-Length: 6\r\n" in head_only
    busy = local_answer(503, "Busy.", extra_headers=[("Retry-After", "10")], security_headers=False)
    assert b"\r\nRetry-After: 10\r\n" in busy and b"X-Frame-Options" not in busy
    assert local_answer(400, "caf\u00e9").endswith("caf\u00e9\n".encode())
    for bad in [("Location", "https://x/\r\nSet-Cookie: a=b"), ("Bad Name", "x"), ("X", "a\x00b"), ("X", "\u20ac")]:
        with pytest.raises(ValueError):
            local_answer(301, "Moved.", extra_headers=[bad])


def test_reason_phrases():
    assert reason_phrase(414) == "URI Too Long" and reason_phrase(413) == "Content Too Large"
    assert reason_phrase(431) == "Request Header Fields Too Large"
    assert reason_phrase(499) == "Client Error" and reason_phrase(299) == "Success" and reason_phrase(999) == "Error"


def test_cut_lines_and_without_lines_named():
    head = parse_response_head(response(b"Connection: X-A, close", b"Location: /a", b"X-A: 1", b"Content-Length: 3", b"Keep-Alive: 5", b"X-B: 2", b"X-Frame-Options: DENY"))
    block, kept = cut_lines(head.block, head.fields)
    assert block == b"\r\nLocation: /a\r\nX-A: 1\r\nX-B: 2\r\nX-Frame-Options: DENY"
    assert kept == (b"location", b"x-frame-options")
    assert without_lines_named(block, head.connection_tokens) == b"\r\nLocation: /a\r\nX-B: 2\r\nX-Frame-Options: DENY"
    assert cut_lines(b"\r\nA: 1", []) == (b"\r\nA: 1", ())


def test_lines_matching():
    pattern = lines_matching({b"location", b"content-location"})
    block = b"\r\nLocation: /a\r\nX: 1\r\ncontent-LOCATION : /b"
    assert [m.group(0) for m in pattern.finditer(block)] == [b"\r\nLocation: /a", b"\r\ncontent-LOCATION : /b"]
