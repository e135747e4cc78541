"""Clients for the lab (and for a bridge in front of it), reusable by any test.

- ``BackgroundLab``: the lab on its own event loop in a thread, so blocking clients (requests,
  http.client, curl) can talk to it; ``stop()``/``start()`` keep the port, to simulate an outage.
  ``start_background_lab`` starts one; ``LabFactory`` (the ``lab_factory`` fixture) keeps one per
  set of options for a module.
- ``legacy_client_context`` / ``legacy_session`` / ``ntlm_session``: clients that still speak TLS 1.0
  with SHA-1 certificates (OpenSSL 3 refuses both unless told).
- ``RawHttpsConnection``: a TLS socket for byte-exact checks (100-continue, streaming bodies,
  chunked answers, headers in wire order).
- ``negotiate_logon``: an NTLM or SPNEGO handshake over one http.client connection.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import shutil
import socket
import ssl
import subprocess
import threading
import warnings
from dataclasses import replace
from pathlib import Path

import requests
import spnego
import urllib3
from requests.adapters import HTTPAdapter

from bridge.lab.server import Lab, LabOptions, start_lab

LEGACY_CLIENT_CIPHERS = "DEFAULT:AES128-SHA:AES256-SHA:@SECLEVEL=0"
LAB_USER = "LAB\\alice"
LAB_PASSWORD = "Passw0rd!"


class BackgroundLab:
    """A lab served from a private event loop in a daemon thread."""

    def __init__(self, options: LabOptions) -> None:
        self.options = options
        self.lab: Lab | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lab-loop", daemon=True)
        self._thread.start()

    def _call(self, coroutine, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self) -> Lab:
        """Start (again): after the first start the same port is reused."""
        self.lab = self._call(start_lab(self.options))
        self.options = replace(self.options, port=self.lab.port)
        return self.lab

    def stop(self) -> None:
        if self.lab is not None:
            self._call(self.lab.close())

    def shutdown(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def start_background_lab(state_dir: Path, **options) -> BackgroundLab:
    """A started lab on 127.0.0.1 (a free port unless options name one); the caller shuts it down."""
    background = BackgroundLab(LabOptions(state_dir=state_dir, **options))
    background.start()
    return background


class LabFactory:
    """One background lab per set of options, all with one state directory (so one certificate)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.started: dict[tuple, BackgroundLab] = {}

    def background(self, **options) -> BackgroundLab:
        key = tuple(sorted((name, repr(value)) for name, value in options.items()))
        if key not in self.started:
            self.started[key] = start_background_lab(self.state_dir, **options)
        return self.started[key]

    def __call__(self, **options) -> Lab:
        return self.background(**options).lab

    def shutdown(self) -> None:
        for background in self.started.values():
            background.shutdown()


def legacy_client_context(
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str = LEGACY_CLIENT_CIPHERS,
) -> ssl.SSLContext:
    """An unverified client context that can still reach a TLS 1.0, RSA-1024, SHA-1 server."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
    context.set_ciphers(ciphers)
    context.options |= getattr(ssl, "OP_LEGACY_SERVER_CONNECT", 0x4)
    return context


class LegacyTLSAdapter(HTTPAdapter):
    """requests adapter whose urllib3 pools use a given SSLContext (TLS 1.0 and @SECLEVEL=0 by default)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, **kwargs) -> None:
        self.ssl_context = ssl_context or legacy_client_context()
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self.ssl_context
        return super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, *args, **kwargs):
        kwargs["ssl_context"] = self.ssl_context
        return super().proxy_manager_for(*args, **kwargs)


def legacy_session(auth=None, ssl_context: ssl.SSLContext | None = None) -> requests.Session:
    """A requests session for the lab: legacy TLS, no certificate verification, no proxies from the environment."""
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    session = requests.Session()
    session.mount("https://", LegacyTLSAdapter(ssl_context))
    session.verify = False
    session.trust_env = False
    session.auth = auth
    return session


def ntlm_session(user: str = LAB_USER, password: str = LAB_PASSWORD, ssl_context: ssl.SSLContext | None = None) -> requests.Session:
    from requests_ntlm import HttpNtlmAuth

    return legacy_session(HttpNtlmAuth(user, password), ssl_context)


def https_connection(port: int, host: str = "127.0.0.1", context: ssl.SSLContext | None = None, timeout: float = 10.0) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(host, port, context=context or legacy_client_context(), timeout=timeout)


def negotiate_logon(
    connection: http.client.HTTPSConnection,
    path: str,
    *,
    scheme: str = "NTLM",
    protocol: str = "ntlm",
    user: str = LAB_USER,
    password: str = LAB_PASSWORD,
) -> http.client.HTTPResponse:
    """Run an NTLM handshake on one connection; ``protocol="negotiate"`` sends SPNEGO tokens.

    ``scheme`` is the Authorization scheme word, so ``scheme="Negotiate", protocol="ntlm"`` sends raw
    NTLM under Negotiate as some clients do. Returns the final response (body read).
    """
    client = spnego.client(user, password, protocol=protocol, hostname="127.0.0.1", service="http")
    token = client.step()
    while True:
        connection.request("GET", path, headers={"Authorization": f"{scheme} {base64.b64encode(token).decode()}"})
        response = connection.getresponse()
        response.read()
        challenge = _challenge_token(response, scheme)
        if response.status != 401 or challenge is None:
            return response
        token = client.step(challenge)


def _challenge_token(response: http.client.HTTPResponse, scheme: str) -> bytes | None:
    for value in response.headers.get_all("WWW-Authenticate") or []:
        word, _, token = value.partition(" ")
        if word.lower() == scheme.lower() and token:
            return base64.b64decode(token)
    return None


class RawHttpsConnection:
    """A TLS socket with just enough HTTP/1.1 to check bytes on the wire."""

    def __init__(self, port: int, host: str = "127.0.0.1", context: ssl.SSLContext | None = None, timeout: float = 10.0) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = (context or legacy_client_context()).wrap_socket(raw, server_hostname=None)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_head(self, method: str, path: str, headers: dict[str, str]) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{name}: {value}" for name, value in headers.items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    def read_raw_head(self) -> tuple[str, list[tuple[str, str]]]:
        """Status line and headers in wire order, repeated names kept apart."""
        while b"\r\n\r\n" not in self.buffer:
            self._receive()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        return status_line, [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]

    def read_head(self) -> tuple[int, dict[str, str]]:
        """Status and headers (lower-cased names; repeated names joined with ', ')."""
        status_line, lines = self.read_raw_head()
        headers: dict[str, str] = {}
        for name, value in lines:
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return int(status_line.split()[1]), headers

    def read_body(self, length: int) -> bytes:
        while len(self.buffer) < length:
            self._receive()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return body

    def has_pending_bytes(self, wait: float = 0.3) -> bool:
        """True when the server sent something within ``wait`` seconds."""
        if self.buffer:
            return True
        self.sock.settimeout(wait)
        try:
            self._receive()
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(10.0)
        return True

    def read_answer(self) -> tuple[int, dict[str, str], bytes]:
        """One final answer (interim ones skipped): status, headers and its Content-Length or chunked body."""
        status, headers = self.read_head()
        while status < 200:
            status, headers = self.read_head()
        if "content-length" in headers:
            return status, headers, self.read_body(int(headers["content-length"]))
        body = b""
        if headers.get("transfer-encoding") == "chunked":
            while True:
                while b"\r\n" not in self.buffer:
                    self._receive()
                size_line, self.buffer = self.buffer.split(b"\r\n", 1)
                size = int(size_line, 16)
                chunk = self.read_body(size + 2)
                if size == 0:
                    return status, headers, body
                body += chunk[:-2]
        return status, headers, body

    def read_until_close(self, wait: float = 3.0) -> bytes:
        """What is buffered plus everything the server sends until it closes (or falls silent for wait seconds)."""
        self.sock.settimeout(wait)
        data = self.buffer
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        return data

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawHttpsConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def basic_header(user: str = LAB_USER, password: str = LAB_PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def curl_speaks_tls10() -> bool:
    """curl is installed and its OpenSSL still negotiates TLS 1.0 with @SECLEVEL=0."""
    if shutil.which("curl") is None:
        return False
    result = subprocess.run(["curl", "--version"], capture_output=True, text=True)
    return "OpenSSL" in result.stdout and "NTLM" in result.stdout


def curl_legacy(url: str, *extra: str, timeout: float = 15.0) -> subprocess.CompletedProcess:
    """curl forced to TLS 1.0 / AES128-SHA without verification; -w prints the status code last."""
    command = ["curl", "-sS", "-k", "--tlsv1.0", "--tls-max", "1.0", "--ciphers", "AES128-SHA:@SECLEVEL=0", "-o", "/dev/null", "-w", "%{http_code}", *extra, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
