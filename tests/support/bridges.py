"""A bridge in front of a lab, for any test: ``BackgroundBridge`` runs ``start_bridge`` on its own loop.

ca = LocalCA.create()
config = bridge_config(lab.port, tmp_path, ca)
with BackgroundBridge(config) as bridge:
    session = bridge_session(ca)          # requests.Session trusting only the local CA
    session.get(f"{bridge.url}/owa/")     # https://bridge.lab.test:PORT via resolve-to-127.0.0.1 adapter
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from bridge.certs.keys import LocalCA, cert_pem, new_private_key, write_pair
from bridge.config import BridgeConfig, LegacyServer
from bridge.demo import ResolvedHTTPSConnection
from bridge.runtime.app import RunningBridge, start_bridge
from support.lab import RawHttpsConnection

BRIDGE_FQDN = "bridge.lab.test"


def bridge_config(lab_port: int, directory: Path, ca: LocalCA, *, fqdn: str = BRIDGE_FQDN, **overrides: Any) -> BridgeConfig:
    """Config for a bridge on 127.0.0.1 (kernel-chosen ports) in front of the lab, with a cert from ca."""
    cert_dir = directory / "front-cert"
    cert_dir.mkdir(parents=True, exist_ok=True)
    key = new_private_key("ecdsa-p256")
    cert, key_path = write_pair(cert_dir, ca.issue([fqdn], key), key)
    config = BridgeConfig(
        fqdn=fqdn,
        legacy=[LegacyServer("127.0.0.1", lab_port)],
        bind="127.0.0.1",
        https_port=0,
        http_port=0,
        cert=cert,
        key=key_path,
        state_dir=directory / "state",
        status_bind="off",  # many test bridges run at once; the status tests give their own
    )
    return replace(config, **overrides)


def ca_file(ca: LocalCA, directory: Path) -> Path:
    path = directory / "local-ca.pem"
    path.write_bytes(cert_pem(ca.cert))
    return path


def bridge_client_context(ca: LocalCA, **kwargs: Any) -> ssl.SSLContext:
    """A modern client context trusting only the local CA (checks the name, TLS 1.2+)."""
    context = ssl.create_default_context(cadata=cert_pem(ca.cert).decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for name, value in kwargs.items():
        setattr(context, name, value)
    return context


class _ResolveAdapter(HTTPAdapter):
    """Uses a given SSL context (names resolve through resolve_lab_names)."""

    def __init__(self, context: ssl.SSLContext, **kwargs: Any) -> None:
        self._context = context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


_resolve_lock = threading.Lock()
_original_getaddrinfo = socket.getaddrinfo


def _lab_getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
    if isinstance(host, str) and host.endswith(".lab.test"):
        host = "127.0.0.1"
    return _original_getaddrinfo(host, *args, **kwargs)


def resolve_lab_names() -> None:
    """Make every *.lab.test name resolve to 127.0.0.1 in this process (tests only)."""
    with _resolve_lock:
        socket.getaddrinfo = _lab_getaddrinfo


def bridge_session(ca: LocalCA, auth: Any = None) -> requests.Session:
    resolve_lab_names()
    session = requests.Session()
    session.mount("https://", _ResolveAdapter(bridge_client_context(ca)))
    session.auth = auth
    return session


class BackgroundBridge:
    """A bridge served from a private event loop in a daemon thread."""

    def __init__(self, config: BridgeConfig, loop_factory: Any = asyncio.new_event_loop) -> None:
        self.config = config
        self.bridge: RunningBridge | None = None
        self._loop = loop_factory()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bridge-loop", daemon=True)
        self._thread.start()

    def call(self, coroutine: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self) -> RunningBridge:
        self.bridge = self.call(start_bridge(self.config))
        return self.bridge

    @property
    def https_port(self) -> int:
        assert self.bridge is not None
        return self.bridge.https_port

    @property
    def http_port(self) -> int:
        assert self.bridge is not None
        return self.bridge.http_port

    @property
    def url(self) -> str:
        return f"https://{self.config.fqdn}:{self.https_port}"

    def shutdown(self) -> None:
        if self.bridge is not None:
            self.call(self.bridge.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> BackgroundBridge:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def bridge_connection(port: int, ca: LocalCA, timeout: float | None = None, **context_options: Any) -> ResolvedHTTPSConnection:
    """An http.client connection to https://bridge.lab.test:port that connects to 127.0.0.1 and trusts only ca."""
    connection = ResolvedHTTPSConnection(BRIDGE_FQDN, port, "127.0.0.1", bridge_client_context(ca, **context_options))
    if timeout is not None:
        connection.timeout = timeout
    return connection


def raw_bridge_connection(port: int, ca: LocalCA, timeout: float = 10.0) -> RawHttpsConnection:
    """A byte-level TLS connection to a bridge on 127.0.0.1:port (certificate checked, name not)."""
    return RawHttpsConnection(port, context=bridge_client_context(ca, check_hostname=False), timeout=timeout)
