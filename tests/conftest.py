"""Every fixture shared by test modules (tests/unit and tests/integration); the helpers they use live
in tests/support/. No test module imports from another."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.bridges import BRIDGE_FQDN, BackgroundBridge, bridge_config
from support.lab import LabFactory
from support.legacy_tls import Rc4OnlyServer
from support.net import free_port
from support.pebble import PebbleServer, require_pebble
from support.processes import BridgeProcess, bridge_command
from support.upstreams import ScriptedUpstream

from bridge.certs.keys import LocalCA, new_private_key, write_pair


@pytest.fixture(scope="module")
def ca() -> LocalCA:
    """A throwaway CA: the bridge's certificate is issued by it and test clients trust only it."""
    return LocalCA.create()


# ---- the lab ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab_state_dir(tmp_path_factory) -> Path:
    """The state directory of the module's labs (so they share one certificate)."""
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(scope="module")
def lab_factory(lab_state_dir):
    """lab_factory(**LabOptions fields) -> Lab: one background lab per set of options, kept for the module."""
    factory = LabFactory(lab_state_dir)
    yield factory
    factory.shutdown()


@pytest.fixture(scope="module")
def lab_server(lab_factory):
    """The default lab (simulated Exchange 2007, TLS 1.0 only) on its own thread; stop()/start() keep the port."""
    return lab_factory.background()


@pytest.fixture(scope="module")
def lab(lab_server):
    return lab_server.lab


# ---- bridges ---------------------------------------------------------------------------------------


@pytest.fixture
def front_cert(ca, tmp_path) -> tuple[Path, Path]:
    """The bridge's certificate and key files, issued by ca for bridge.lab.test."""
    directory = tmp_path / "cert"
    directory.mkdir()
    key = new_private_key("ecdsa-p256")
    return write_pair(directory, ca.issue([BRIDGE_FQDN], key), key)


@pytest.fixture
def start_bridge_process(lab, front_cert, tmp_path):
    """start(*extra flags, cert=, key=) -> (BridgeProcess, https_port, http_port): `bridge up` in front of
    the lab as a real process; stopped after the test."""
    started: list[BridgeProcess] = []

    def start(*extra: str, cert: Path | None = None, key: Path | None = None) -> tuple[BridgeProcess, int, int]:
        https_port, http_port = free_port(), free_port()
        command = bridge_command(lab.port, cert or front_cert[0], key or front_cert[1], tmp_path, https_port, http_port, *extra)
        process = BridgeProcess(command)
        started.append(process)
        return process, https_port, http_port

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def background_bridges():
    """start(config) -> a started in-process bridge (BackgroundBridge), shut down after the test."""
    started: list[BackgroundBridge] = []

    def start(config):
        bridge = BackgroundBridge(config)
        bridge.start()
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.shutdown()


@pytest.fixture
def scripted_bridges(ca, tmp_path):
    """start(script, **config overrides) -> (upstream, bridge): a bridge in front of a ScriptedUpstream."""
    started = []

    def start(script, **overrides):
        upstream = ScriptedUpstream(script, tmp_path, ca)
        bridge = BackgroundBridge(bridge_config(upstream.port, tmp_path, ca, **overrides))
        bridge.start()
        started.append((upstream, bridge))
        return upstream, bridge

    yield start
    for upstream, bridge in started:
        try:
            bridge.shutdown()
        finally:
            upstream.close()


# ---- other peers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> PebbleServer:
    """A real ACME server (Pebble and its DNS) on loopback; fails, never skips, when it is not installed."""
    require_pebble()
    server = PebbleServer(tmp_path_factory.mktemp("pebble"), http_port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def rc4_server():
    """A legacy server that offers only RC4-SHA and RC4-MD5 (see support.legacy_tls)."""
    with Rc4OnlyServer() as server:
        yield server
