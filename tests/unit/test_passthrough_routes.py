"""--passthrough: the spec's parsing and its mistakes (one sentence each), route choice by SNI and Host,
and the PROXY v2 header (bridge.protocol.proxyv2)."""

from __future__ import annotations

import pytest

from bridge.config import ConfigError, PassthroughRoute, build_config, parse_passthrough
from bridge.net.passthrough import TERMINATED, Router
from bridge.protocol import proxyv2

BASE = {"fqdn": "owa.example.com", "legacy": "legacy.example"}


def test_spec_forms():
    assert parse_passthrough("--passthrough", "Mail.Example.com=10.0.0.5:8443") == PassthroughRoute("mail.example.com", "10.0.0.5", 8443)
    assert parse_passthrough("--passthrough", "*.example.org=backend.example:443+proxy") == PassthroughRoute("*.example.org", "backend.example", 443, True)
    assert parse_passthrough("--passthrough", "*=[2001:db8::1]:443") == PassthroughRoute("*", "2001:db8::1", 443)
    assert parse_passthrough("--passthrough", "x.example=10.0.0.1").port == 443
    assert str(parse_passthrough("--passthrough", "*=[2001:db8::1]:443+proxy")) == "*=[2001:db8::1]:443+proxy"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("mail.example.com", "is not NAME=HOST:PORT"),
        ("=10.0.0.1:443", "is not NAME=HOST:PORT"),
        ("mail.example.com=", "is not NAME=HOST:PORT"),
        ("mail.example.com=10.0.0.1:99999", "does not name a backend"),
        ("mail.example.com=10.0.0.1:443+haproxy", "the only one is +proxy"),
        ("bad_name!=10.0.0.1:443", "is not a host name or wildcard"),
        ("10.1.2.3=10.0.0.1:443", "is not a host name or wildcard"),
        ("a.*.example=10.0.0.1:443", "is not a host name or wildcard"),
    ],
)
def test_malformed_spec_is_one_sentence(spec, fragment):
    with pytest.raises(ConfigError) as raised:
        build_config({**BASE, "passthrough": [spec]})
    message = str(raised.value)
    assert fragment in message and message.endswith(".") and "\n" not in message


def test_a_name_routed_twice():
    with pytest.raises(ConfigError, match=r"routes mail.example.com twice \(to 10.0.0.1:443 and to 10.0.0.2:443\)"):
        build_config({**BASE, "passthrough": ["mail.example.com=10.0.0.1", "MAIL.example.com.=10.0.0.2"]})


def test_the_bridges_own_name_as_passthrough():
    with pytest.raises(ConfigError, match=r"the bridge's own name owa.example.com \(--fqdn\)"):
        build_config({**BASE, "passthrough": ["OWA.example.com=10.0.0.1"]})
    with pytest.raises(ConfigError, match=r"\(--terminate\)"):
        build_config({**BASE, "terminate": ["autodiscover.example.com"], "passthrough": ["autodiscover.example.com=10.0.0.1"]})


def test_terminate_needs_routes():
    with pytest.raises(ConfigError, match="only matters beside --passthrough"):
        build_config({**BASE, "terminate": ["autodiscover.example.com"]})


def test_toml_list_of_routes():
    config = build_config({**BASE, "passthrough": ["mail.example.com=10.0.0.1:443+proxy", "*=10.0.0.9:443"], "terminate": "*.owa.example.com"})
    assert [str(route) for route in config.passthrough] == ["mail.example.com=10.0.0.1:443+proxy", "*=10.0.0.9:443"]
    assert config.terminate == ("*.owa.example.com",)


def router(*specs: str, own: tuple[str, ...] = ("owa.example.com",)) -> Router:
    return Router(own, [parse_passthrough("--passthrough", spec) for spec in specs])


def label(route) -> str | None:
    return None if route is None else route.label


def test_choice_exact_then_longest_wildcard_then_default():
    table = router("mail.example.com=10.0.0.1", "*.example.com=10.0.0.2", "*.deep.example.com=10.0.0.3", "*=10.0.0.9", own=("owa.example.com", "*.owa.example.com"))
    assert label(table.choose("owa.example.com")) == TERMINATED
    assert label(table.choose("x.owa.example.com")) == TERMINATED
    assert label(table.choose("mail.example.com")) == "mail.example.com"
    assert label(table.choose("www.example.com")) == "*.example.com"
    assert label(table.choose("a.b.example.com")) == "*.example.com"
    assert label(table.choose("a.deep.example.com")) == "*.deep.example.com"
    assert label(table.choose("example.com")) == "*"
    assert label(table.choose("other.test")) == "*"
    assert label(table.choose(None)) == "*"


def test_without_default_unknown_names_and_no_sni_close():
    table = router("mail.example.com=10.0.0.1")
    assert table.choose("unknown.example.com") is None
    assert table.choose(None) is None


def test_host_header_choice():
    table = router("mail.example.com=10.0.0.1")
    assert label(table.choose_host("MAIL.example.com:80")) == "mail.example.com"
    assert label(table.choose_host("owa.example.com.")) == TERMINATED
    assert table.choose_host("[2001:db8::1]:80") is None
    assert table.choose_host(None) is None


def test_proxy_v2_ipv4():
    data = proxyv2.header(("192.0.2.7", 50123), ("198.51.100.1", 443))
    assert data.startswith(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c")
    assert data[16:] == bytes([192, 0, 2, 7, 198, 51, 100, 1]) + (50123).to_bytes(2, "big") + (443).to_bytes(2, "big")
    parsed = proxyv2.parse(data + b"\x16\x03\x01")
    assert parsed == proxyv2.ProxyHeader(("192.0.2.7", 50123), ("198.51.100.1", 443), 28)


def test_proxy_v2_ipv6_mapped_and_mixed():
    mapped = proxyv2.parse(proxyv2.header(("::ffff:192.0.2.7", 1), ("::ffff:127.0.0.1", 2)))
    assert mapped is not None and mapped.source == ("192.0.2.7", 1) and mapped.length == 28  # sent as TCP4
    six = proxyv2.header(("2001:db8::7", 3), ("2001:db8::1", 443))
    assert six[13] == proxyv2.TCP6 and len(six) == 16 + 36
    assert proxyv2.parse(six).source == ("2001:db8::7", 3)  # type: ignore[union-attr]
    mixed = proxyv2.parse(proxyv2.header(("2001:db8::7", 3), ("127.0.0.1", 443)))
    assert mixed is not None and mixed.destination == ("::ffff:127.0.0.1", 443)


def test_proxy_v2_local_and_incomplete():
    local = proxyv2.header(None, None)
    assert local == proxyv2.SIGNATURE + b"\x20\x00\x00\x00"
    assert proxyv2.parse(local) == proxyv2.ProxyHeader(None, None, 16)
    assert proxyv2.parse(proxyv2.header(("192.0.2.7", 1), ("192.0.2.8", 2))[:20]) is None
    with pytest.raises(proxyv2.ProxyHeaderError):
        proxyv2.parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
