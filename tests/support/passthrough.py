"""Peers for the passthrough tests: a TLS 1.2 echo backend with its own certificate, a raw TCP recorder,
and nginx listening with ``proxy_protocol`` (logging $proxy_protocol_addr)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

from bridge.certs.keys import LocalCA, new_private_key, write_pair
from support.net import ThreadedServer, free_port, wait_until


class TlsEchoServer(ThreadedServer):
    """TLS (1.2 at most) with a certificate for ``name``; echoes every byte back until the client stops."""

    def __init__(self, ca: LocalCA, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        key = new_private_key("ecdsa-p256")
        self.cert, self.key = write_pair(directory, ca.issue([name], key), key)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.maximum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(self.cert, self.key)
        self.connections = 0
        super().__init__()

    def handle(self, connection: socket.socket) -> None:
        self.connections += 1
        try:
            with self.context.wrap_socket(connection, server_side=True) as tls:
                while chunk := tls.recv(1 << 18):
                    tls.sendall(chunk)
        except (OSError, ssl.SSLError):
            pass


class Recorder(ThreadedServer):
    """Plain TCP: keeps what each connection sent (``received``: the connections that sent anything, in
    order; the bridge's health checks send nothing), answers ``reply`` once it has read ``reply_after``
    bytes, and closes when the client does."""

    def __init__(self, reply: bytes = b"", reply_after: int = 1) -> None:
        self.reply = reply
        self.reply_after = reply_after
        self.connections: list[bytearray] = []
        super().__init__()

    @property
    def received(self) -> list[bytearray]:
        return [data for data in self.connections if data]

    def clear(self) -> None:
        self.connections.clear()

    def handle(self, connection: socket.socket) -> None:
        data = bytearray()
        self.connections.append(data)
        replied = False
        with connection:
            try:
                while True:
                    if self.reply and not replied and len(data) >= self.reply_after:
                        connection.sendall(self.reply)
                        replied = True
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    data += chunk
            except OSError:
                return


NGINX_CONF = """\
{user}worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    log_format pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr $ssl_server_name $request_uri';
    access_log {dir}/access.log pp;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl proxy_protocol;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 200 "nginx behind the bridge\\n"; }}
    }}
}}
"""


class ProxyProtocolNginx:
    """nginx on 127.0.0.1 speaking TLS with its own certificate, expecting a PROXY header first."""

    def __init__(self, ca: LocalCA, directory: Path, name: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        key = new_private_key("ecdsa-p256")
        cert, key_path = write_pair(directory, ca.issue([name], key), key)
        self.port = free_port()
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user=user, dir=directory, port=self.port, cert=cert, key=key_path))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(directory), "-e", str(directory / "error.log"), "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(self._listening, timeout=10):
            self.stop()
            raise RuntimeError(f"nginx did not start: {(directory / 'error.log').read_text() if (directory / 'error.log').exists() else ''}")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def access_lines(self) -> list[str]:
        path = self.directory / "access.log"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return path.read_text().splitlines()
            time.sleep(0.05)
        return []

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()


def nginx_available() -> bool:
    return bool(shutil.which("nginx") or Path("/usr/sbin/nginx").exists())


async def stream_through(port: int, context: ssl.SSLContext, server_name: str, size: int) -> tuple[str, str, bytes]:
    """Send ``size`` random-ish bytes over TLS to 127.0.0.1:port (SNI ``server_name``) while reading the
    echo; the SHA-256 of what was sent and of what came back, and the peer's certificate (DER)."""
    import asyncio
    import hashlib

    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_name)
    certificate = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    sent, received = hashlib.sha256(), hashlib.sha256()
    block = hashlib.sha256(b"seed").digest() * 8192  # 256 KiB

    async def write() -> None:
        left = size
        counter = 0
        while left:
            chunk = (counter.to_bytes(8, "big") + block)[: min(len(block), left)]
            counter += 1
            sent.update(chunk)
            writer.write(chunk)
            await writer.drain()
            left -= len(chunk)

    async def read() -> None:
        count = 0
        while count < size:
            chunk = await reader.read(1 << 18)
            if not chunk:
                break
            received.update(chunk)
            count += len(chunk)

    await asyncio.gather(write(), read())
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, ssl.SSLError):
        pass
    return sent.hexdigest(), received.hexdigest(), certificate
