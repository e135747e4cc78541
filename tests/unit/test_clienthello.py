"""bridge.protocol.clienthello: the ClientHello read without answering it (records, reassembly, SNI)."""

from __future__ import annotations

import ssl

import pytest

from bridge.protocol.clienthello import Hello, HelloReader, HelloRefused, client_hello_record, parse_client_hello


def real_client_hello(server_name: str | None, **options) -> bytes:
    """The first flight of Python's own TLS client (OpenSSL), as it would go on the wire."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for name, value in options.items():
        setattr(context, name, value)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        connection.do_handshake()
    return outgoing.read()


def read(data: bytes, step: int | None = None) -> Hello:
    reader = HelloReader()
    step = step or len(data)
    hello = None
    for start in range(0, len(data), step):
        assert hello is None, "a complete hello before its last byte"
        hello = reader.feed(data[start : start + step])
    assert hello is not None
    return hello


def test_openssl_hello_gives_its_name_lower_case_and_alpn():
    data = real_client_hello("Mail.Example.COM")
    hello = read(data)
    assert hello.server_name == "mail.example.com"
    assert hello.version == 0x0303 and hello.length == len(data)


def test_alpn_is_read():
    hello = read(client_hello_record("x.example", alpn=("h2", "http/1.1")))
    assert hello.alpn == ("h2", "http/1.1")


def test_no_sni():
    assert read(real_client_hello(None)).server_name is None
    assert read(client_hello_record(None)).server_name is None


def test_byte_by_byte_over_tcp_segments():
    data = real_client_hello("split.example")
    assert read(data, step=1).server_name == "split.example"


def test_hello_split_across_records_and_segments():
    data = client_hello_record("records.example", record_size=7)
    assert data.count(b"\x16\x03\x01") >= 10
    assert read(data).server_name == "records.example"
    assert read(data, step=3).server_name == "records.example"


def test_trailing_dot_is_dropped():
    assert read(client_hello_record("trail.example.")).server_name == "trail.example"


def test_tls10_hello_with_and_without_extensions():
    hello = read(client_hello_record("old.example", version=0x0301))
    assert (hello.server_name, hello.version_name) == ("old.example", "TLS 1.0")
    bare = read(client_hello_record(None, version=0x0301, extensions=False))
    assert bare.server_name is None and bare.version == 0x0301


def test_openssl_tls10_only_client_is_parsed():
    context_options = {"minimum_version": ssl.TLSVersion.TLSv1, "maximum_version": ssl.TLSVersion.TLSv1}
    try:
        data = real_client_hello("legacy.example", **context_options)
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot build a TLS 1.0 hello")
    assert read(data).server_name == "legacy.example"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + bytes(40), "sslv2-hello"),  # SSLv2-compatible ClientHello
        (b"GET / HTTP/1.1\r\n\r\n", "not-tls"),
        (b"\x00\x01\x02\x03\x04\x05", "not-tls"),
        (b"\x16\x02\x00\x00\x05hello", "not-tls"),  # record version 2.0
        (b"\x16\x03\x01\x00\x00", "hello-malformed"),  # an empty record
        (b"\x16\x03\x01\x40\x01", "hello-malformed"),  # a record over 2^14
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "hello-malformed"),  # a ServerHello first
        (b"\x17\x03\x03\x00\x01\x00", "not-tls"),  # application data first
    ],
)
def test_what_is_not_a_client_hello_is_refused(data, reason):
    with pytest.raises(HelloRefused) as raised:
        HelloReader().feed(data)
    assert raised.value.reason == reason


def test_other_record_type_between_hello_records_is_refused():
    data = client_hello_record("x.example", record_size=20)
    first = data[: 5 + 20]
    reader = HelloReader()
    assert reader.feed(first) is None
    with pytest.raises(HelloRefused, match="type 21"):
        reader.feed(b"\x15\x03\x03\x00\x02\x02\x28")


def test_size_is_bounded():
    reader = HelloReader(limit=1000)
    with pytest.raises(HelloRefused) as raised:
        reader.feed(b"\x16\x03\x01\x00\x04\x01\x00\x10\x00")  # announces a 4096-byte hello
    assert raised.value.reason == "hello-too-large"
    reader = HelloReader(limit=100)
    with pytest.raises(HelloRefused):
        for _ in range(100):
            reader.feed(b"\x16\x03\x01\x00\x01\x01")  # one-byte records, forever


def test_truncated_and_inconsistent_bodies_are_refused():
    good = client_hello_record("x.example")[9:]  # the body after record and handshake headers
    assert parse_client_hello(good).server_name == "x.example"
    for cut in (10, 40, len(good) - 3):
        with pytest.raises(HelloRefused):
            parse_client_hello(good[:cut])
    with pytest.raises(HelloRefused, match="not a host name"):
        parse_client_hello(client_hello_record("bad name!")[9:])
    with pytest.raises(HelloRefused, match="after the ClientHello's extensions"):
        parse_client_hello(good + b"\x00")


def test_bytes_after_the_hello_are_kept_by_the_caller():
    data = client_hello_record("x.example") + b"\x14\x03\x03\x00\x01\x01"  # e.g. a ChangeCipherSpec right behind
    reader = HelloReader()
    hello = reader.feed(data)
    assert hello is not None and bytes(reader.buffer) == data and hello.length == len(data) - 6
