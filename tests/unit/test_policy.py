"""Unit tests of bridge.proxy.policy: which request paths go through (pure functions, no sockets)."""

from __future__ import annotations

import pytest

from bridge.config import DEFAULT_FORWARD_PATHS
from bridge.proxy.policy import NOT_A_PATH, NOT_FORWARDED, UNCLEAN, is_clean_path, is_forwarded, log_path, path_verdict

PREFIXES = tuple(p.lower() for p in DEFAULT_FORWARD_PATHS)


@pytest.mark.parametrize(
    "path",
    ["/owa/", "/owa/auth/logon.aspx", "/EWS/Exchange.asmx", "/rpc/rpcproxy.dll", "/owa/a.b/c", "/owa/.hidden", "/owa/..a", "/owa/a..", "/owa//x", "/owa/a b"],
)
def test_clean_paths(path):
    assert is_clean_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "/owa/../certsrv",
        "/owa/./x",
        "/owa/..",
        "/owa/\\..\\x",
        "/owa/a\x00",
        # Windows trims trailing dots and spaces from a segment: these are ".." (or "." / "") to IIS.
        "/owa/.. /certsrv",
        "/owa/..\t/certsrv",
        "/owa/... /x",
        "/owa/.../x",
        "/owa/. ./x",
        "/owa/ /x",
        "/owa/..\r/x",
        "/owa/..\x0b/x",
    ],
)
def test_unclean_paths(path):
    assert not is_clean_path(path)


@pytest.mark.parametrize(
    ("path", "verdict"),
    [
        ("/owa/", None),
        ("/OWA/auth", None),
        ("/rpc/rpcproxy.dll", None),
        ("owa/", NOT_A_PATH),
        ("*", NOT_A_PATH),
        ("http://evil.example/owa/", NOT_A_PATH),
        ("/owa/%2e%2e/certsrv", UNCLEAN),
        ("/owa/..%20/certsrv/", UNCLEAN),
        ("/owa/..%09/certsrv/", UNCLEAN),
        ("/owa/.%20./certsrv/", UNCLEAN),
        ("/owa/..%2e/x", UNCLEAN),
        ("/owa/%5c..%5cx", UNCLEAN),
        ("/owa/%252e%252e/", UNCLEAN),  # double encoding
        ("/owa/%00", UNCLEAN),
        ("/certsrv/", NOT_FORWARDED),
        ("/owax/", NOT_FORWARDED),
        ("/", NOT_FORWARDED),
    ],
)
def test_path_verdict(path, verdict):
    assert path_verdict(path, PREFIXES) == verdict


def test_is_forwarded_matches_whole_segments_case_insensitively():
    assert is_forwarded("/OWA", ("/owa",)) and is_forwarded("/owa/x", ("/owa",))
    assert not is_forwarded("/owa2/x", ("/owa",)) and not is_forwarded("/ow", ("/owa",))


def test_log_path_keeps_the_query_only_for_the_rpc_proxy():
    assert log_path("/owa/?ae=Item&t=secret") == "/owa/"
    assert log_path("/rpc/rpcproxy.dll?exch.lab.local:6001") == "/rpc/rpcproxy.dll?exch.lab.local:6001"
    assert log_path("/rpc/rpcproxy.dll?" + "x" * 500) == "/rpc/rpcproxy.dll?" + "x" * 100
    assert log_path("/owa/" + "a" * 500) == "/owa/" + "a" * 295
