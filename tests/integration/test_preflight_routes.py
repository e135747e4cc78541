"""Preflight with SNI routes: each passthrough name reaches its backend's own certificate through the
bridge, a name the running bridge does not route is caught, and --terminate names get the bridge's."""

from __future__ import annotations

import asyncio
import socket

import pytest
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_config
from support.passthrough import TlsEchoServer

from bridge.config import LegacyServer, PassthroughRoute
from bridge.preflight.checks import Report, Settings, run_preflight

MAIL = "mail.lab.test"


@pytest.fixture
def echo(ca, tmp_path):
    server = TlsEchoServer(ca, tmp_path / "echo", MAIL)
    yield server
    server.close()


@pytest.fixture
def bridge(lab, ca, tmp_path, echo):
    routes = (PassthroughRoute("localhost", "127.0.0.1", echo.port), PassthroughRoute("*.lab.test", "127.0.0.1", echo.port))
    running = BackgroundBridge(bridge_config(lab.port, tmp_path, ca, passthrough=routes, terminate=("owa.lab.test",)))
    running.start()
    yield running
    running.shutdown()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(lab, bridge, routes: list[PassthroughRoute], terminate: list[str] | None = None) -> Report:
    settings = Settings(
        legacy=LegacyServer("127.0.0.1", lab.port),
        fqdn=BRIDGE_FQDN,
        bridge_addr="127.0.0.1",
        https_port=bridge.https_port,
        http_port=bridge.http_port,
        timeout=5.0,
        hold=0.0,
        routes=routes,
        terminate=terminate or [],
    )
    return asyncio.run(run_preflight(settings))


def test_passthrough_names_reach_their_backends_own_certificate(lab, bridge, echo):
    report = run(lab, bridge, [PassthroughRoute("localhost", "127.0.0.1", echo.port), PassthroughRoute("*.lab.test", "127.0.0.1", echo.port)], ["owa.lab.test"])
    exact, wildcard = report.get("bridge.route.localhost"), report.get("bridge.route.*.lab.test")
    assert exact is not None and exact.status == "pass" and "127.0.0.1" in exact.details["addresses"], exact
    assert wildcard is not None and wildcard.status == "pass" and wildcard.details["sni"] == "preflight-check.lab.test"
    assert MAIL in wildcard.details["sans"] and BRIDGE_FQDN not in wildcard.details["sans"]  # the backend's certificate, shown
    terminated = report.get("bridge.terminate.owa.lab.test")
    assert terminated is not None and terminated.status == "warn", terminated  # the bridge answers it, but its certificate names only the bridge
    assert "obtain one that also names owa.lab.test" in terminated.fix


def test_a_route_the_running_bridge_does_not_have_is_caught(lab, bridge, echo):
    report = run(lab, bridge, [PassthroughRoute("*.other.test", "127.0.0.1", echo.port)])
    check = report.get("bridge.route.*.other.test")
    assert check is not None and check.status == "fail", check
    assert "no TLS handshake for preflight-check.other.test" in check.summary and "is up and answers TLS" in check.fix


def test_a_name_that_does_not_resolve_to_the_bridge_fails_with_the_dns_fix(lab, bridge, echo):
    report = run(lab, bridge, [PassthroughRoute("nowhere.invalid", "127.0.0.1", echo.port)])
    check = report.get("bridge.route.nowhere.invalid")
    assert check is not None and check.status == "fail" and "A record" in check.fix
