"""A real ACME server for tests: Debian's Pebble 2.4 plus pebble-challtestsrv as its DNS, on loopback.

    with PebbleServer(tmp_path, http_port=free_port()) as pebble:
        pebble.directory_url   # https://127.0.0.1:PORT/dir (trust pebble.ca_bundle for it)
        pebble.root_pem        # the root the issued chains lead to (changes at every start)

``pebble-challtestsrv`` answers every A query with 127.0.0.1, so any test name validates against the
loopback port given as ``http_port`` (Pebble's ``httpPort``: where its validator fetches HTTP-01).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from bridge.certs.keys import LocalCA, cert_pem, new_private_key, write_pair
from support.net import free_port

STARTUP_SECONDS = 15.0
INSTALL_HINT = "Pebble is not installed: run scripts/test.sh (it installs the Debian package pebble), or apt-get install -y pebble."

# The MAC keys of Pebble's own example EAB configuration (base64url, as a CA's account page shows them).
EAB_KEYS = {
    "kid-1": "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W",
    "kid-2": "b10lLJs8l1GPIzsLP0s6pMt8O0XVGnfTaCeROxQM0BIt2XrJMDHJZBM5NuQmQJQH",
}


def require_pebble() -> None:
    """Fail (never skip) when the binaries are missing: CI must run these tests."""
    missing = [name for name in ("pebble", "pebble-challtestsrv") if shutil.which(name) is None]
    if missing:
        raise RuntimeError(INSTALL_HINT)


class PebbleServer:
    """Pebble and its DNS on loopback, with a generated config; stop() kills both."""

    def __init__(
        self,
        directory: Path,
        *,
        http_port: int,
        eab_keys: dict[str, str] | None = None,
        nonce_reject_percent: int | None = None,
        authz_reuse_percent: int = 0,
    ) -> None:
        require_pebble()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port
        self.eab_keys = eab_keys
        self.nonce_reject_percent = nonce_reject_percent
        self.authz_reuse_percent = authz_reuse_percent
        self.acme_port = free_port()
        self.management_port = free_port()
        self.dns_port = free_port(udp_too=True)
        self.dns_management_port = free_port()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.ca_bundle = self.dir / "pebble-tls-ca.pem"
        self.root_pem = b""

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self.management_port}"

    def _tls_material(self) -> tuple[Path, Path]:
        """Pebble's own listener certificate (the package ships none), from a throwaway CA."""
        ca = LocalCA.create("pebble listener test CA")
        key = new_private_key("ecdsa-p256")
        cert, key_path = write_pair(self.dir / "pebble-tls", ca.issue(["127.0.0.1", "localhost"], key), key)
        self.ca_bundle.write_bytes(cert_pem(ca.cert))
        return cert, key_path

    def _config(self, cert: Path, key: Path) -> Path:
        settings: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.acme_port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": self.http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": self.eab_keys is not None,
        }
        if self.eab_keys is not None:
            settings["externalAccountMACKeys"] = self.eab_keys
        path = self.dir / "pebble-config.json"
        path.write_text(json.dumps({"pebble": settings}, indent=2))
        return path

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.dir / f"{name}.log", "wb")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir)
        log.close()
        self.processes.append(process)

    def start(self) -> PebbleServer:
        cert, key = self._tls_material()
        config = self._config(cert, key)
        self._spawn(
            "challtestsrv",
            [
                "pebble-challtestsrv",
                "-dns01",
                f"127.0.0.1:{self.dns_port}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                f"127.0.0.1:{self.dns_management_port}",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ],
        )
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_AUTHZREUSE=str(self.authz_reuse_percent))
        if self.nonce_reject_percent is not None:
            env["PEBBLE_WFE_NONCEREJECT"] = str(self.nonce_reject_percent)
        self._spawn("pebble", ["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{self.dns_port}"], env)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited with {process.returncode}: {self.logs()}")
            try:
                with socket.create_connection(("127.0.0.1", self.dns_management_port), timeout=1):
                    pass
                self.root_pem = self.fetch(f"{self.management_url}/roots/0")
                urllib.request.urlopen(self.directory_url, context=self._context(), timeout=2).read()
                return
            except OSError as exc:
                last_error = exc
                time.sleep(0.05)
        raise RuntimeError(f"Pebble did not start within {STARTUP_SECONDS:.0f} s ({last_error}): {self.logs()}")

    def fetch(self, url: str) -> bytes:
        with urllib.request.urlopen(url, context=self._context(), timeout=5) as response:
            return response.read()

    def directory(self) -> dict[str, Any]:
        return json.loads(self.fetch(self.directory_url))

    def logs(self) -> str:
        return " | ".join((self.dir / f"{name}.log").read_text(errors="replace")[-2000:] for name in ("challtestsrv", "pebble") if (self.dir / f"{name}.log").exists())

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.processes.clear()

    def __enter__(self) -> PebbleServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
