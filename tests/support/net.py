"""Sockets for any test: free loopback ports, polling, a TLS client socket to a bridge, reading raw
HTTP/1.1 answers off a socket, and a small threaded TCP server to build fake peers on."""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from typing import Any

from bridge.certs.keys import LocalCA
from support.bridges import BRIDGE_FQDN, bridge_client_context


def free_port(udp_too: bool = False) -> int:
    """A loopback port free for TCP (and UDP, for DNS) right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            if not udp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port found")


def wait_until(condition: Any, timeout: float = 5.0, step: float = 0.05) -> Any:
    """Poll condition() until it is truthy or timeout seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def receive_line(sock: socket.socket) -> bytes:
    """One line (through its LF) read a byte at a time, so nothing after it is consumed; what came if the peer closed first."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            return data
        data += chunk
    return data


def greeted_tls_connection(port: int, ca: LocalCA, timeout: float = 10.0) -> tuple[ssl.SSLSocket, bytes]:
    """A TLS socket to a mail listener of a bridge on 127.0.0.1:port, and the greeting line it sent."""
    tls = tls_connection(port, ca, timeout=timeout)
    return tls, receive_line(tls)


def tls_connection(port: int, ca: LocalCA, source: str | None = None, timeout: float = 5.0) -> ssl.SSLSocket:
    """A TLS socket to a bridge on 127.0.0.1:port (from source, if given), trusting only ca."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None)
    return bridge_client_context(ca).wrap_socket(raw, server_hostname=BRIDGE_FQDN)


# ---- raw HTTP/1.1 answers -------------------------------------------------------------------------


def _receive_head(sock: socket.socket, data: bytearray) -> int:
    """Receive into data until a whole head is in; return where it ends. ConnectionError if the peer closes first."""
    while (end := data.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {bytes(data)!r}")
        data += chunk
    return end


def _receive_response(sock: socket.socket, data: bytearray) -> int:
    """Receive into data one head and its Content-Length body (what came, if the peer closes early); return the head's end."""
    head_end = _receive_head(sock, data)
    match = re.search(rb"(?im)^content-length:\s*(\d+)", bytes(data[:head_end]))
    end = head_end + 4 + (int(match.group(1)) if match else 0)
    while len(data) < end:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return head_end


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def read_head(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """Status, head and whatever body bytes came with it."""
    data = bytearray()
    end = _receive_head(sock, data)
    return _status(bytes(data[:end])), bytes(data[:end]), bytes(data[end + 4 :])


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and Content-Length body of one answer; ConnectionError if the server closes before its head."""
    data = bytearray()
    end = _receive_response(sock, data)
    return _status(bytes(data[:end])), bytes(data[end + 4 :])


def response_bytes(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One answer as bytes: the head and a Content-Length body, or what came before the server closed,
    failed or fell silent (b"" if it closed without answering)."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        _receive_response(sock, data)
    except (ConnectionError, ssl.SSLError, TimeoutError):
        pass
    return bytes(data)


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or the timeout)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionError, ssl.SSLError, TimeoutError):
        pass
    return data


def status_of(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


# ---- fake peers -----------------------------------------------------------------------------------


class ThreadedServer:
    """A TCP listener on 127.0.0.1 whose accepted connections go to handle() on their own threads."""

    def __init__(self, backlog: int = 64) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(connection,), daemon=True).start()

    def handle(self, connection: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
