#!/usr/bin/env python3
"""Side-by-side benchmark: the bridge against HAProxy, both in front of a TLS-1.0-only nginx.

Everything runs on 127.0.0.1 in a temporary directory:

- nginx (TLS 1.0 only, RSA key exchange CBC suites, an RSA-1024 SHA-1 certificate like Exchange 2007)
  serves /owa/small (1 KiB), /owa/large (a sparse file) and accepts uploads on /EWS/upload;
- the bridge (``python -m bridge.cli up --workers N`` as a subprocess; CPU and RSS are summed over its
  process tree, so they are the proxy alone) and
  HAProxy configured equivalently (TLS 1.2+ front, TLS 1.0 back, 30 min timeouts, one server
  connection per client connection) run side by side;
- both as shipped: the bridge with its default --log-level info (one access-log line per request, its
  stderr to a file as systemd's journal would take it), HAProxy with ``option httplog`` (``log stdout
  format raw`` to a file); ``--no-logs`` runs both without (the bridge at --log-level warning);
- the Outlook Anywhere and IMAP rows go to the lab (``bridge lab``, TLS 1.0, a process of its own)
  through a second bridge (--legacy the lab, --imaps-port) and HAProxy frontends of their own
  (scripts/bench_lab.py); the lab alone, without a proxy, is measured in the same rounds (its ceiling);
- each measurement alternates bridge and HAProxy (and swaps the order every round) so drift cancels.

Usage:  python scripts/bench.py [--quick] [--rounds N] [--no-logs] [--profile] [--bridge-workers N] [--json results.json]
See docs/benchmark.md for what is measured and the figures obtained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_lab  # noqa: E402  (the Outlook Anywhere and IMAP workloads against the lab)
import bench_profile  # noqa: E402  (--profile: where each proxy's CPU goes, from perf)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bridge.certs.keys import LocalCA, cert_pem, legacy_self_signed, new_private_key, write_pair  # noqa: E402
from bridge.net.tls import LEGACY_CIPHERS, fingerprint, pin_flag  # noqa: E402

FQDN = "bench.lab.test"
PASSTHROUGH_NAME = "passthrough.lab.test"  # spliced undecrypted to a TLS 1.2 nginx (SNI routing)
TOOLS = ("haproxy", "nginx", "wrk", "curl", "openssl")
MIB = 1024 * 1024
MB = 1_000_000
GB = 1_000_000_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROXIES = ("bridge", "haproxy")

console = Console()


# ---- the targets ("Performance as shipped": both proxies with their logs on) ---------------------
@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "higher" | "lower"
    target: str  # human-readable target
    check: Callable[[float, float, float], bool] | None  # (bridge, haproxy, ratio) -> met


METRICS = (
    Metric("small_rps", "small requests", "req/s", "higher", "ratio >= 0.5", lambda b, h, r: r >= 0.5),
    Metric("small_p50_ms", "small p50 latency", "ms", "lower", "-", None),
    Metric("small_p99_ms", "small p99 latency", "ms", "lower", "ratio <= 2", lambda b, h, r: r <= 2.0),
    Metric("small_cpu_us_per_request", "small CPU per request", "us", "lower", "-", None),
    Metric("oa_pdus_s", "Outlook Anywhere echoes", "PDUs/s", "higher", "ratio >= 0.8", lambda b, h, r: r >= 0.8),
    Metric("oa_p50_ms", "OA round trip p50", "ms", "lower", "-", None),
    Metric("oa_p99_ms", "OA round trip p99", "ms", "lower", "ratio <= 2", lambda b, h, r: r <= 2.0),
    Metric("oa_cpu_us_per_pdu", "OA CPU per echoed PDU", "us", "lower", "-", None),
    Metric("imap_mb_s", "IMAP FETCH 25 MB", "MB/s", "higher", "ratio >= 0.8", lambda b, h, r: r >= 0.8),
    Metric("imap_cpu_s_per_gb", "IMAP FETCH CPU", "CPU-s/GB", "lower", "-", None),
    Metric("download_mb_s", "download", "MB/s", "higher", "ratio >= 1.2", lambda b, h, r: r >= 1.2),
    Metric("upload_mb_s", "upload", "MB/s", "higher", "ratio >= 1.2", lambda b, h, r: r >= 1.2),
    Metric("download_cpu_s_per_gb", "download CPU", "CPU-s/GB", "lower", "ratio <= 0.85", lambda b, h, r: r <= 0.85),
    Metric("upload_cpu_s_per_gb", "upload CPU", "CPU-s/GB", "lower", "ratio <= 0.85", lambda b, h, r: r <= 0.85),
    Metric("download_rss_growth_mib", "RSS growth, download", "MiB", "lower", "bridge <= 16 MiB", lambda b, h, r: b <= 16),
    Metric("upload_rss_growth_mib", "RSS growth, upload", "MiB", "lower", "bridge <= 16 MiB", lambda b, h, r: b <= 16),
    Metric("passthrough_mb_s", "passthrough download", "MB/s", "higher", "ratio >= 0.9", lambda b, h, r: r >= 0.9),
    Metric("passthrough_cpu_s_per_gb", "passthrough CPU", "CPU-s/GB", "lower", "ratio <= 1.5", lambda b, h, r: r <= 1.5),
    Metric("idle_rss_mib", "RSS with idle connections", "MiB", "lower", "bridge <= 150 MiB", lambda b, h, r: b <= 150),
    Metric("idle_rss_growth_mib", "RSS added by idle connections", "MiB", "lower", "-", None),
    Metric("idle_kib_per_connection", "RSS per idle connection", "KiB", "lower", "ratio <= 2", lambda b, h, r: r <= 2.0),
    Metric("start_rss_mib", "RSS at start", "MiB", "lower", "-", None),
)


# ---- small helpers ------------------------------------------------------------------------------
def missing_tools(tools: tuple[str, ...] = TOOLS) -> list[str]:
    """The programs of ``tools`` found neither on PATH nor in /usr/sbin (where Debian puts nginx and haproxy)."""
    return [tool for tool in tools if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]


def tool_path(tool: str) -> str:
    return shutil.which(tool) or str(Path("/usr/sbin", tool))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before listening on port {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:g} s")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (the bridge's worker processes with --workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(parents.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all threads) and its child processes."""
    total = 0
    for member in process_tree(pid):
        try:
            fields_ = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        total += int(fields_[11]) + int(fields_[12])
    return total / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """VmRSS of the process plus its child processes (shared library pages are counted in each)."""
    total = 0
    for member in process_tree(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:"))
    if not total:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return total


class RssSampler:
    """Samples a process's RSS every few milliseconds while a stream runs; peak - start is the growth."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.start = rss_bytes(pid)
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.start


def command_version(command: list[str], pattern: str) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, result.stdout + result.stderr)
    return match.group(1) if match else "?"


def machine_info() -> dict[str, Any]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = int(line.split()[1]) // 1024
    os_name = "?"
    release = Path("/etc/os-release")
    if release.exists():
        for line in release.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return {"cpu": model, "cores": os.cpu_count(), "memory_mib": memory, "kernel": platform.release(), "os": os_name}


def versions() -> dict[str, str]:
    import aiohttp

    from bridge import __version__

    found = {
        "bridge": __version__,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "python_openssl": ssl.OPENSSL_VERSION,
        "haproxy": command_version([tool_path("haproxy"), "-v"], r"version (\S+)"),
        "nginx": command_version([tool_path("nginx"), "-v"], r"nginx/(\S+)"),
        "wrk": command_version([tool_path("wrk"), "--version"], r"wrk (\S+)"),
        "curl": command_version([tool_path("curl"), "--version"], r"curl (\S+)"),
        "openssl": command_version([tool_path("openssl"), "version"], r"OpenSSL (\S+)"),
    }
    try:
        import uvloop

        found["uvloop"] = uvloop.__version__
    except ImportError:
        found["uvloop"] = "not installed"
    return found


# ---- the test bed -------------------------------------------------------------------------------
@dataclass
class Settings:
    rounds: int
    wrk_seconds: float
    wrk_connections: int
    wrk_threads: int
    stream_bytes: int
    idle_connections: int
    quick: bool
    only: tuple[str, ...] = ("small", "oa", "imap", "download", "upload", "passthrough", "idle")
    bridge_workers: int = 2
    logs: bool = True  # both proxies log every request (as shipped); --no-logs: neither does
    oa_connections: int = 32
    oa_seconds: float = 10.0
    imap_fetches: int = 4
    profile: bool = False  # --profile: perf record each proxy during the small requests and the streams


@dataclass
class Proxy:
    name: str
    port: int
    process: subprocess.Popen
    log: Path
    # SNI routing: the port where PASSTHROUGH_NAME is spliced, and the process doing it (the bridge runs
    # a second instance with --passthrough so that the routes do not touch the other figures).
    passthrough_port: int = 0
    passthrough_process: subprocess.Popen | None = None
    # The lab's workloads (Outlook Anywhere, IMAP): the HTTPS port in front of the lab, the IMAPS port,
    # and the process serving them (a second bridge; HAProxy's one process).
    lab_port: int = 0
    imaps_port: int = 0
    lab_process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Bed:
    directory: Path
    ca_file: Path
    nginx_port: int
    uploads: Path
    passthrough_backend: int = 0  # nginx's TLS 1.2 port, reached by SNI through each proxy
    nginx: subprocess.Popen | None = None
    lab: subprocess.Popen | None = None  # `bridge lab` (TLS 1.0): the Outlook Anywhere and IMAP backend
    lab_port: int = 0
    lab_imap_port: int = 0
    proxies: dict[str, Proxy] = field(default_factory=dict)

    def stop(self) -> None:
        for proxy in self.proxies.values():
            stop_process(proxy.process)
            for extra in (proxy.passthrough_process, proxy.lab_process):
                if extra is not None and extra is not proxy.process:
                    stop_process(extra)
        for backend in (self.nginx, self.lab):
            if backend is not None:
                stop_process(backend)
        if self.uploads.parent != self.directory:
            shutil.rmtree(self.uploads, ignore_errors=True)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


NGINX_CONF = """\
{user}worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    log_format bench '$request_method $uri $status $request_length $bytes_sent $ssl_protocol $ssl_cipher';
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 1800s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1;
        ssl_ciphers AES128-SHA:AES256-SHA:@SECLEVEL=0;
        ssl_prefer_server_ciphers on;
        # Windows' SChannel (Exchange 2007) never negotiates encrypt-then-MAC (RFC 7366); OpenSSL does
        # by default, which would keep both proxies off OpenSSL's stitched AES-CBC-HMAC-SHA1.
        ssl_conf_command Options -EncryptThenMac;
        ssl_session_cache shared:bench:10m;
        root {dir}/www;
        output_buffers 2 256k;
        client_max_body_size 0;
        client_body_timeout 1800s;
        location = /owa/small {{ }}
        location = /owa/large {{ access_log {dir}/nginx-access.log bench; }}
        # Uploads are PUT into a file in memory (tmpfs): nginx answers only once it has read the
        # whole body, and the file's size proves every byte arrived. ("return 200" would answer
        # early and discard the body in the background, which proves nothing.)
        location /EWS/upload/ {{
            access_log {dir}/nginx-access.log bench;
            root {uploads};
            dav_methods PUT;
            create_full_put_path on;
            client_body_temp_path {uploads}/tmp;
            client_body_buffer_size 1m;
        }}
    }}
    # The passthrough backend: a current server with its own certificate (TLS 1.2), reached by SNI.
    server {{
        listen 127.0.0.1:{passthrough_port} ssl;
        ssl_certificate {passthrough_cert};
        ssl_certificate_key {passthrough_key};
        ssl_protocols TLSv1.2;
        root {dir}/www;
        output_buffers 2 256k;
        location = /owa/large {{ }}
    }}
}}
"""

HAPROXY_CONF = """\
global
    maxconn {maxconn}
{global_log}defaults
    mode http
{defaults_log}    timeout connect 10s
    timeout client 30m
    timeout server 30m
    timeout http-keep-alive 30m
    timeout http-request 30m
    # One server connection per client connection, as NTLM needs and as the bridge does.
    http-reuse never
frontend passthrough
    # SNI routing in TCP mode, as sites put HAProxy in front of a current Exchange.
    mode tcp
    bind 127.0.0.1:{passthrough_port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req_ssl_hello_type 1 }}
    use_backend passthrough if {{ req_ssl_sni -i {passthrough_name} }}
backend passthrough
    mode tcp
    server current 127.0.0.1:{passthrough_backend}
frontend front
    bind 127.0.0.1:{port} ssl crt {pem} ssl-min-ver TLSv1.2 alpn http/1.1
{http_log}    option forwardfor
    http-request set-header X-Forwarded-Proto https
    default_backend legacy
backend legacy
    server exchange2007 127.0.0.1:{nginx_port} ssl verify none ssl-min-ver TLSv1.0 ciphers {ciphers}
"""

# The lab's side (Outlook Anywhere in HTTP mode as above; IMAPS in TCP mode, TLS on both sides).
HAPROXY_LAB_CONF = """\
frontend rpc
    bind 127.0.0.1:{lab_front} ssl crt {pem} ssl-min-ver TLSv1.2 alpn http/1.1
{http_log}    option forwardfor
    http-request set-header X-Forwarded-Proto https
    default_backend lab
backend lab
    server lab 127.0.0.1:{lab_port} ssl verify none ssl-min-ver TLSv1.0 ciphers {ciphers}
frontend imaps
    mode tcp
    bind 127.0.0.1:{imaps_front} ssl crt {pem} ssl-min-ver TLSv1.2
{tcp_log}    default_backend lab_imap
backend lab_imap
    mode tcp
    server lab 127.0.0.1:{lab_imap_port} ssl verify none ssl-min-ver TLSv1.0 ciphers {ciphers}
"""


def upload_directory(directory: Path, size: int) -> Path:
    """Where nginx writes uploads: tmpfs when it has room (no disk writes), else the bench directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * size + 64 * MIB:
        return Path(tempfile.mkdtemp(prefix="bridge-bench-uploads-", dir=shm))
    return directory / "uploads"


def build_bed(directory: Path, settings: Settings) -> Bed:
    """Start nginx, the bridge and HAProxy; on failure, stop whatever was started before raising."""
    bed = Bed(directory, directory / "ca.pem", free_port(), upload_directory(directory, settings.stream_bytes), free_port())
    try:
        start_bed(bed, settings)
    except BaseException:
        bed.stop()
        raise
    return bed


def start_bed(bed: Bed, settings: Settings) -> None:
    directory = bed.directory
    www = directory / "www"
    (www / "owa").mkdir(parents=True)
    (www / "owa" / "small").write_bytes(b"x" * 1023 + b"\n")
    with open(www / "owa" / "large", "wb") as large:
        large.truncate(settings.stream_bytes)  # sparse: reads as zeros from the page cache
    upload = directory / "upload.bin"
    with open(upload, "wb") as handle:
        handle.truncate(settings.stream_bytes)

    legacy_cert, legacy_key = legacy_self_signed(directory / "legacy", ["exchange2007.lab.test"])
    ca = LocalCA.create("exchange-bridge benchmark CA")
    key = new_private_key("ecdsa-p256")
    front_cert, front_key = write_pair(directory, ca.issue([FQDN], key), key)
    passthrough_key = new_private_key("ecdsa-p256")
    passthrough_cert, passthrough_key_path = write_pair(directory / "passthrough", ca.issue([PASSTHROUGH_NAME], passthrough_key), passthrough_key)
    bed.ca_file.write_bytes(cert_pem(ca.cert))
    (directory / "haproxy.pem").write_bytes(front_cert.read_bytes() + front_key.read_bytes())

    (bed.uploads / "tmp").mkdir(parents=True)
    # As root, nginx would switch its workers to "nobody", who cannot read the private temp directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user=user,
            dir=directory,
            port=bed.nginx_port,
            cert=legacy_cert,
            key=legacy_key,
            uploads=bed.uploads,
            passthrough_port=bed.passthrough_backend,
            passthrough_cert=passthrough_cert,
            passthrough_key=passthrough_key_path,
        )
    )
    bed.nginx = subprocess.Popen(
        [tool_path("nginx"), "-c", str(conf), "-p", str(directory), "-e", str(directory / "nginx-error.log"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=open(directory / "nginx-stderr.log", "wb"),
    )
    wait_for_port(bed.nginx_port, bed.nginx, "nginx")

    der = ssl.PEM_cert_to_DER_cert(legacy_cert.read_text())
    pin = pin_flag(fingerprint(der)).split(" ", 1)[1]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start_bridge(name: str, port: int, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bridge.cli",
                "up",
                "--fqdn",
                FQDN,
                "--bind",
                "127.0.0.1",
                "--https-port",
                str(port),
                "--http-port",
                str(free_port()),
                "--cert",
                str(front_cert),
                "--key",
                str(front_key),
                "--state-dir",
                str(directory / f"state-{name}"),
                # As shipped: --log-level info (one access-log line per request) to a file; --no-logs: warning.
                "--log-level",
                "info" if settings.logs else "warning",
                # No status listener (it would take 127.0.0.1:8404); as many connections as HAProxy's maxconn.
                "--status-bind",
                "off",
                "--max-connections",
                str(settings.idle_connections + 1000),
                "--workers",
                str(settings.bridge_workers),
                *extra,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(directory / f"{name}.log", "wb"),
        )

    nginx_legacy = ("--legacy", f"127.0.0.1:{bed.nginx_port}", "--legacy-fingerprint", pin)
    bridge_port, passthrough_port = free_port(), free_port()
    bridge = start_bridge("bridge", bridge_port, *nginx_legacy)
    # A second bridge with the SNI route: with routes, every connection's ClientHello is read before
    # TLS, which the other figures (the bridge as most users run it) must not include.
    routed = start_bridge("bridge-passthrough", passthrough_port, *nginx_legacy, "--passthrough", f"{PASSTHROUGH_NAME}=127.0.0.1:{bed.passthrough_backend}")
    bed.proxies["bridge"] = Proxy("bridge", bridge_port, bridge, directory / "bridge.log", passthrough_port, routed)
    uses_lab = "oa" in settings.only or "imap" in settings.only
    if uses_lab:
        lab_pin = start_lab(bed, env)
        lab_front, imaps_front = free_port(), free_port()
        imap = ("--imaps-port", str(imaps_front), "--imap-upstream", f"127.0.0.1:{bed.lab_imap_port}") if settings.bridge_workers == 1 else ()
        proxy = bed.proxies["bridge"]
        proxy.lab_port, proxy.imaps_port = lab_front, imaps_front if imap else 0
        proxy.lab_process = start_bridge("bridge-lab", lab_front, "--legacy", f"127.0.0.1:{bed.lab_port}", "--legacy-fingerprint", lab_pin, *imap)

    haproxy_port, haproxy_passthrough_port = free_port(), free_port()
    haproxy_lab_port, haproxy_imaps_port = (free_port(), free_port()) if uses_lab else (0, 0)
    haproxy_conf = directory / "haproxy.cfg"
    # As shipped: every request logged (option httplog; tcplog for IMAPS), written to stdout, a file.
    logs = {
        "global_log": "    log stdout format raw local0\n" if settings.logs else "",
        "defaults_log": "    log global\n" if settings.logs else "",
        "http_log": "    option httplog\n" if settings.logs else "",
        "tcp_log": "    option tcplog\n" if settings.logs else "",
    }
    common = {"pem": directory / "haproxy.pem", "ciphers": LEGACY_CIPHERS, **logs}
    text = HAPROXY_CONF.format(
        maxconn=settings.idle_connections + 1000,
        port=haproxy_port,
        nginx_port=bed.nginx_port,
        passthrough_port=haproxy_passthrough_port,
        passthrough_name=PASSTHROUGH_NAME,
        passthrough_backend=bed.passthrough_backend,
        **common,
    )
    if uses_lab:
        text += HAPROXY_LAB_CONF.format(lab_front=haproxy_lab_port, imaps_front=haproxy_imaps_port, lab_port=bed.lab_port, lab_imap_port=bed.lab_imap_port, **common)
    haproxy_conf.write_text(text)
    haproxy_log = directory / "haproxy.log"
    haproxy = subprocess.Popen([tool_path("haproxy"), "-db", "-f", str(haproxy_conf)], stdout=open(directory / "haproxy-access.log", "wb"), stderr=open(haproxy_log, "wb"))
    bed.proxies["haproxy"] = Proxy("haproxy", haproxy_port, haproxy, haproxy_log, haproxy_passthrough_port, haproxy, haproxy_lab_port, haproxy_imaps_port, haproxy if uses_lab else None)
    for proxy in bed.proxies.values():
        wait_for_port(proxy.port, proxy.process, proxy.name)
        wait_for_port(proxy.passthrough_port, proxy.passthrough_process or proxy.process, proxy.name)
        if proxy.lab_process is not None:
            wait_for_port(proxy.lab_port, proxy.lab_process, proxy.name)
            if proxy.imaps_port:
                wait_for_port(proxy.imaps_port, proxy.lab_process, proxy.name)


def start_lab(bed: Bed, env: dict[str, str]) -> str:
    """`bridge lab` (TLS 1.0 only, Exchange 2007's shape) with its IMAP4 service, as a process of its
    own; returns the --legacy-fingerprint value from its ready line."""
    bed.lab_port = free_port()
    bed.lab_imap_port = free_port()
    output = bed.directory / "lab.log"
    bed.lab = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "lab", "--port", str(bed.lab_port), "--imap-port", str(bed.lab_imap_port), "--state-dir", str(bed.directory / "lab"), "--tls-max", "1.0"],
        cwd=REPO,
        env=env,
        stdout=open(output, "wb"),
        stderr=subprocess.STDOUT,
    )
    wait_for_port(bed.lab_port, bed.lab, "the lab", timeout=60)
    wait_for_port(bed.lab_imap_port, bed.lab, "the lab's IMAP4 service", timeout=60)
    for _ in range(100):
        match = re.search(r"--legacy-fingerprint (sha256:[0-9A-F:]+)", output.read_text())
        if match:
            return match.group(1)
        time.sleep(0.05)
    raise RuntimeError(f"the lab printed no fingerprint; see {output}")


# ---- measurements -------------------------------------------------------------------------------
def url(proxy: Proxy, path: str) -> str:
    return f"https://{FQDN}:{proxy.port}{path}"


def check_path(bed: Bed, proxy: Proxy) -> None:
    """One request through the proxy, to fail early with a clear message if the chain is broken."""
    result = run_curl(bed, proxy, ["-o", "/dev/null", url(proxy, "/owa/small")])
    if result["http_code"] != 200 or result["size_download"] != 1024:
        raise RuntimeError(f"{proxy.name} answered {result['http_code']} with {result['size_download']} bytes for /owa/small; see {proxy.log}")


def run_curl(bed: Bed, proxy: Proxy, extra: list[str], timeout: float = 900) -> dict[str, Any]:
    command = [
        tool_path("curl"),
        "-sS",
        "--http1.1",
        "--cacert",
        str(bed.ca_file),
        "--resolve",
        f"{FQDN}:{proxy.port}:127.0.0.1",
        "-w",
        "%{http_code} %{size_download} %{size_upload} %{time_total}",
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"curl through {proxy.name} failed: {result.stderr.strip()}")
    code, downloaded, uploaded, total = result.stdout.split()[-4:]
    return {"http_code": int(code), "size_download": int(downloaded), "size_upload": int(uploaded), "time_total": float(total)}


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def measure_small(bed: Bed, proxy: Proxy, settings: Settings) -> dict[str, float]:
    command = [
        tool_path("wrk"),
        f"-t{settings.wrk_threads}",
        f"-c{settings.wrk_connections}",
        f"-d{settings.wrk_seconds:g}s",
        "--latency",
        "-H",
        f"Host: {FQDN}",
        f"https://127.0.0.1:{proxy.port}/owa/small",
    ]
    cpu_before = cpu_seconds(proxy.pid)
    result = subprocess.run(command, capture_output=True, text=True, timeout=settings.wrk_seconds + 60)
    cpu = cpu_seconds(proxy.pid) - cpu_before
    out = result.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    requests = re.search(r"(\d+) requests in", out)
    if result.returncode != 0 or not (rps and p50 and p99 and requests):
        raise RuntimeError(f"wrk through {proxy.name} failed: {(result.stderr or out).strip()[:300]}")
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{proxy.name} answered {non2xx.group(1)} small requests with an error status; see {proxy.log}")
    return {
        "small_rps": float(rps.group(1)),
        "small_p50_ms": _ms(p50.group(1)),
        "small_p99_ms": _ms(p99.group(1)),
        "small_cpu_us_per_request": cpu / max(int(requests.group(1)), 1) * 1e6,
        "small_socket_errors": errors.group(1) if errors else "",
    }


def last_nginx_line(bed: Bed, uri: str) -> list[str]:
    log = bed.directory / "nginx-access.log"
    for _ in range(50):  # nginx writes the line when it has finished with the request
        lines = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
        matching = [line for line in lines if len(line) >= 5 and line[1] == uri]
        if matching:
            return matching[-1]
        time.sleep(0.1)
    raise RuntimeError(f"nginx logged no request for {uri}")


def measure_stream(bed: Bed, proxy: Proxy, settings: Settings, direction: str) -> dict[str, float]:
    size = settings.stream_bytes
    log = bed.directory / "nginx-access.log"
    if log.exists():
        log.write_text("")  # nginx appends (O_APPEND): truncating keeps only this stream's line
    if direction == "download":
        extra = ["-o", "/dev/null", url(proxy, "/owa/large")]
    else:
        extra = ["-o", "/dev/null", "-H", "Expect:", "-H", "Content-Type: application/octet-stream", "-T", str(bed.directory / "upload.bin"), url(proxy, "/EWS/upload/blob")]
    cpu_before = cpu_seconds(proxy.pid)
    with RssSampler(proxy.pid) as rss:
        started = time.perf_counter()
        result = run_curl(bed, proxy, extra)
        elapsed = time.perf_counter() - started
    cpu = cpu_seconds(proxy.pid) - cpu_before
    moved = result["size_download"] if direction == "download" else result["size_upload"]
    expected = (200,) if direction == "download" else (201, 204)
    if result["http_code"] not in expected or moved != size:
        raise RuntimeError(f"{direction} through {proxy.name}: status {result['http_code']}, {moved} of {size} bytes; see {proxy.log}")
    line = last_nginx_line(bed, "/owa/large" if direction == "download" else "/EWS/upload/blob")
    if direction == "upload":
        stored = bed.uploads / "EWS" / "upload" / "blob"
        stored_size = stored.stat().st_size
        stored.unlink()
        if stored_size != size:
            raise RuntimeError(f"nginx stored {stored_size} bytes of the {size}-byte upload through {proxy.name}")
    if direction == "download" and int(line[4]) < size:
        raise RuntimeError(f"nginx sent only {line[4]} bytes of the {size}-byte download through {proxy.name}")
    seconds = max(result["time_total"], 1e-6)
    return {
        f"{direction}_mb_s": size / seconds / MB,
        f"{direction}_cpu_s_per_gb": cpu / (size / GB),
        f"{direction}_rss_growth_mib": rss.growth / MIB,
        f"{direction}_wall_s": elapsed,
        f"{direction}_backend_tls": f"{line[5]} {line[6]}" if len(line) > 6 else "?",
    }


def measure_passthrough(bed: Bed, proxy: Proxy, settings: Settings) -> dict[str, float]:
    """A large download from the TLS 1.2 backend, spliced undecrypted by SNI (the bridge's
    --passthrough, HAProxy's TCP mode); the client checks the backend's own certificate."""
    size = settings.stream_bytes
    pid = (proxy.passthrough_process or proxy.process).pid
    command = [
        tool_path("curl"),
        "-sS",
        "--http1.1",
        "--cacert",
        str(bed.ca_file),
        "--resolve",
        f"{PASSTHROUGH_NAME}:{proxy.passthrough_port}:127.0.0.1",
        "-w",
        "%{http_code} %{size_download} %{time_total}",
        "-o",
        "/dev/null",
        f"https://{PASSTHROUGH_NAME}:{proxy.passthrough_port}/owa/large",
    ]
    cpu_before = cpu_seconds(pid)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    cpu = cpu_seconds(pid) - cpu_before
    if result.returncode != 0:
        raise RuntimeError(f"curl through {proxy.name}'s passthrough failed: {result.stderr.strip()}")
    code, downloaded, total = result.stdout.split()[-3:]
    if int(code) != 200 or int(downloaded) != size:
        raise RuntimeError(f"passthrough through {proxy.name}: status {code}, {downloaded} of {size} bytes; see {proxy.log}")
    return {"passthrough_mb_s": size / max(float(total), 1e-6) / MB, "passthrough_cpu_s_per_gb": cpu / (size / GB)}


def lab_target(bed: Bed, proxy: Proxy | None, port: int) -> bench_lab.Target:
    """The client's view of a proxy's lab port (TLS 1.2+, the bench's CA), or of the lab itself (proxy None)."""
    if proxy is None:
        return bench_lab.Target(port, bench_lab.legacy_client_context(), None, "exch2007.lab.test")
    return bench_lab.Target(port, ssl.create_default_context(cafile=str(bed.ca_file)), FQDN, FQDN)


def measure_oa(bed: Bed, proxy: Proxy | None, settings: Settings) -> dict[str, float]:
    """Outlook Anywhere: N virtual connections echoing PDUs of mixed sizes (scripts/bench_lab.py)."""
    process = proxy.lab_process if proxy is not None else bed.lab
    assert process is not None
    port = proxy.lab_port if proxy is not None else bed.lab_port
    cpu_before = cpu_seconds(process.pid)
    result = bench_lab.outlook_anywhere(lab_target(bed, proxy, port), settings.oa_connections, settings.oa_seconds, warmup=min(1.0, settings.oa_seconds / 4))
    cpu = cpu_seconds(process.pid) - cpu_before  # (includes the opening and the warm-up)
    result["oa_cpu_us_per_pdu"] = cpu / max(result["oa_calls"], 1) * 1e6
    return result


def measure_imap(bed: Bed, proxy: Proxy | None, settings: Settings) -> dict[str, float]:
    """A FETCH of the lab's 25 MB message, ``imap_fetches`` times on one IMAPS session."""
    if proxy is not None and not proxy.imaps_port:
        return {}  # the bridge's mail listener runs in the one-process bridge only (--bridge-workers 1)
    process = proxy.lab_process if proxy is not None else bed.lab
    assert process is not None
    port = proxy.imaps_port if proxy is not None else bed.lab_imap_port
    cpu_before = cpu_seconds(process.pid)
    moved, seconds = bench_lab.imap_fetch(lab_target(bed, proxy, port), settings.imap_fetches)
    cpu = cpu_seconds(process.pid) - cpu_before
    return {"imap_mb_s": moved / max(seconds, 1e-6) / MB, "imap_cpu_s_per_gb": cpu / (moved / GB)}


async def _open_idle(port: int, ca_file: Path, count: int) -> tuple[list[asyncio.StreamWriter], int]:
    context = ssl.create_default_context(cafile=str(ca_file))
    request = f"GET /owa/small HTTP/1.1\r\nHost: {FQDN}\r\n\r\n".encode()
    semaphore = asyncio.Semaphore(50)
    writers: list[asyncio.StreamWriter] = []
    failures = 0

    async def one() -> None:
        nonlocal failures
        async with semaphore:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=FQDN), 30)
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                await asyncio.wait_for(reader.readexactly(length), 30)
                if not head.startswith(b"HTTP/1.1 200"):
                    failures += 1
                writers.append(writer)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ssl.SSLError, AttributeError):
                failures += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return writers, failures


def measure_idle(bed: Bed, proxy: Proxy, settings: Settings) -> dict[str, float]:
    """RSS with N open client connections, each having made one request (its upstream pinned)."""
    loop = asyncio.new_event_loop()
    try:
        before = rss_bytes(proxy.pid)
        writers, failures = loop.run_until_complete(_open_idle(proxy.port, bed.ca_file, settings.idle_connections))
        time.sleep(1.0)
        with_idle = rss_bytes(proxy.pid)
        for writer in writers:
            writer.close()
        loop.run_until_complete(asyncio.sleep(0.2))
    finally:
        loop.close()
    if failures:
        raise RuntimeError(f"{failures} of {settings.idle_connections} idle connections through {proxy.name} failed; see {proxy.log}")
    return {
        "idle_rss_mib": with_idle / MIB,
        "idle_rss_growth_mib": (with_idle - before) / MIB,
        "idle_kib_per_connection": (with_idle - before) / 1024 / settings.idle_connections,
    }


# ---- orchestration ------------------------------------------------------------------------------
def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run_benchmark(settings: Settings, keep: bool = False) -> dict[str, Any]:
    raise_fd_limit(4 * settings.idle_connections + 1024)
    directory = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
    bed: Bed | None = None
    samples: dict[str, dict[str, list[Any]]] = {name: {} for name in (*PROXIES, "lab")}
    profiler = bench_profile.Profiler(directory) if settings.profile else None
    try:
        console.print(f"[dim]building the test bed in {directory} ...[/]")
        bed = build_bed(directory, settings)
        for proxy in bed.proxies.values():
            check_path(bed, proxy)
            samples[proxy.name]["start_rss_mib"] = [rss_bytes(proxy.pid) / MIB]
        steps: list[tuple[str, Callable[[Bed, Proxy, Settings], dict[str, Any]]]] = [
            ("small requests", measure_small),
            ("oa (Outlook Anywhere)", measure_oa),
            ("imap FETCH", measure_imap),
            ("download", lambda b, p, s: measure_stream(b, p, s, "download")),
            ("upload", lambda b, p, s: measure_stream(b, p, s, "upload")),
            ("passthrough", measure_passthrough),
        ]
        steps = [(label, step) for label, step in steps if label.split()[0] in settings.only]
        for round_number in range(settings.rounds):
            order = PROXIES if round_number % 2 == 0 else tuple(reversed(PROXIES))
            for label, step in steps:
                for name in order:
                    console.print(f"[dim]round {round_number + 1}/{settings.rounds}: {label} through {name}[/]")
                    proxy = bed.proxies[name]
                    if profiler is None:
                        measured = step(bed, proxy, settings)
                    else:
                        with profiler.record(label.split()[0], name, process_tree(proxy.pid), round_number):
                            measured = step(bed, proxy, settings)
                    for key, value in measured.items():
                        samples[name].setdefault(key, []).append(value)
                if step in (measure_oa, measure_imap):  # the lab alone, in the same round: its ceiling
                    console.print(f"[dim]round {round_number + 1}/{settings.rounds}: {label} against the lab directly[/]")
                    for key, value in step(bed, None, settings).items():  # type: ignore[arg-type]
                        samples["lab"].setdefault(key, []).append(value)
        for name in PROXIES if "idle" in settings.only else ():  # last: nothing runs after it
            console.print(f"[dim]{settings.idle_connections} idle connections through {name}[/]")
            for key, value in measure_idle(bed, bed.proxies[name], settings).items():
                samples[name].setdefault(key, []).append(value)
        for proxy in bed.proxies.values():
            if proxy.process.poll() is not None:
                raise RuntimeError(f"{proxy.name} exited during the benchmark; see {proxy.log}")
    finally:
        if bed is not None:
            bed.stop()
            log_lines = count_log_lines(directory)
        if keep:
            console.print(f"[dim]kept {directory}[/]")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    report = summarise(samples, settings)
    report["log_lines"] = log_lines
    if profiler is not None:
        medians = {name: {key: statistics.median(values) for key, values in samples[name].items() if values} for name in PROXIES}
        report["profile"] = profiler.summary(medians)
    return report


def count_log_lines(directory: Path) -> dict[str, int]:
    """Lines each proxy logged for requests (after the stop: the bridge writes its buffered lines at exit)."""

    def lines(path: Path, marker: bytes | None) -> int:
        if not path.exists():
            return 0
        with open(path, "rb") as handle:
            return sum(1 for line in handle if marker is None or marker in line)

    bridge = sum(lines(directory / f"{name}.log", b" INFO bridge.access") for name in ("bridge", "bridge-lab", "bridge-passthrough"))
    return {"bridge_access": bridge, "haproxy": lines(directory / "haproxy-access.log", None)}


def summarise(samples: dict[str, dict[str, list[Any]]], settings: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for metric in METRICS:
        if metric.key not in samples["bridge"] or metric.key not in samples["haproxy"]:
            continue  # left out with --only (or IMAP with --bridge-workers 2)
        bridge = statistics.median(samples["bridge"][metric.key])
        haproxy = statistics.median(samples["haproxy"][metric.key])
        ratio = bridge / haproxy if haproxy > 0 else None  # e.g. no RSS growth at all for HAProxy
        met = metric.check(bridge, haproxy, ratio if ratio is not None else 0.0) if metric.check else None
        if metric.check and ratio is None and metric.target.startswith("ratio"):
            met = bridge <= 0
        # Both proxies are measured once per round, back to back: the same round's ratio shows how far
        # the machine's drift moves the figure (the median ratio above is of the medians).
        pairs = zip(samples["bridge"][metric.key], samples["haproxy"][metric.key], strict=False)
        round_ratios = [round(b / h, 3) for b, h in pairs if isinstance(b, (int, float)) and isinstance(h, (int, float)) and h > 0] if ratio is not None else []
        results[metric.key] = {
            "label": metric.label,
            "unit": metric.unit,
            "bridge": round(bridge, 3),
            "haproxy": round(haproxy, 3),
            "ratio": round(ratio, 3) if ratio is not None else None,
            "round_ratios": round_ratios,
            "target": metric.target,
            "met": met,
        }
    lab = {key: round(statistics.median(values), 3) for key, values in samples["lab"].items()}
    return {
        "machine": machine_info(),
        "versions": versions(),
        "settings": vars(settings),
        "results": results,
        "lab_ceiling": lab,  # the same workloads against the lab directly (no proxy), medians
        "samples": samples,
    }


def print_report(report: dict[str, Any]) -> None:
    machine, found = report["machine"], report["versions"]
    console.print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_mib']} MiB, {machine['os']}, Linux {machine['kernel']}")
    console.print("versions: " + ", ".join(f"{name} {version}" for name, version in found.items()))
    s = report["settings"]
    console.print(
        f"settings: {s['rounds']} round(s), wrk {s['wrk_threads']} threads x {s['wrk_connections']} connections x {s['wrk_seconds']:g} s, "
        f"streams of {s['stream_bytes'] / MIB:g} MiB, {s['idle_connections']} idle connections, bridge --workers {s.get('bridge_workers', 1)}, "
        f"Outlook Anywhere {s.get('oa_connections', 0)} virtual connections x {s.get('oa_seconds', 0):g} s, IMAP {s.get('imap_fetches', 0)} FETCHes of 25 MB; medians shown"
    )
    logs = "access logs on (as shipped)" if s.get("logs", True) else "no access logs (--no-logs)"
    table = Table(title=f"bridge vs HAProxy (same run), {logs}")
    for column in ("metric", "unit", "bridge", "HAProxy", "ratio (rounds)", "target", "met"):
        table.add_column(column, justify="left" if column in ("metric", "unit", "target") else "right")
    for row in report["results"].values():
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[row["met"]]
        spread = row.get("round_ratios") or []
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        if row["ratio"] is not None and len(spread) > 1:
            ratio += f" ({min(spread):.2f}-{max(spread):.2f})"
        table.add_row(row["label"], row["unit"], f"{row['bridge']:,.2f}", f"{row['haproxy']:,.2f}", ratio, row["target"], met)
    console.print(table)
    lab = report.get("lab_ceiling") or {}
    if lab:
        parts = []
        if "oa_pdus_s" in lab:
            parts.append(f"Outlook Anywhere {lab['oa_pdus_s']:,.0f} PDUs/s (p50 {lab['oa_p50_ms']:.1f} ms, p99 {lab['oa_p99_ms']:.1f} ms)")
        if "imap_mb_s" in lab:
            parts.append(f"IMAP FETCH {lab['imap_mb_s']:,.1f} MB/s")
        console.print("the lab alone (no proxy, TLS 1.0, same client): " + "; ".join(parts))
    if report.get("profile"):
        print_profile(report["profile"])


def print_profile(profile: dict[str, Any]) -> None:
    """--profile: each heading's share of the proxy's samples and its cost in the measurement's unit."""
    table = Table(title="where the CPU goes (perf samples of each proxy, all rounds): share, and cost in the row's unit")
    table.add_column("heading")
    steps = [step for step in bench_profile.PROFILED if step in profile]
    for step in steps:
        unit = bench_profile.PROFILED[step][1]
        for name in PROXIES:
            table.add_column(f"{step}, {name} ({unit})", justify="right")
    for heading in bench_profile.CATEGORIES:
        cells = []
        for step in steps:
            for name in PROXIES:
                part = profile[step].get(name, {}).get(heading)
                cells.append("-" if part is None else f"{part['share'] * 100:.1f} % ({part['cost']:,.2f})")
        table.add_row(heading, *cells)
    console.print(table, width=max(console.width, 150))  # seven columns: wider than a terminal's 80


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the bridge against HAProxy in front of a TLS-1.0-only nginx.")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 64 MiB streams, 2 s wrk, 100 idle connections, 1 round")
    parser.add_argument("--rounds", type=int, help="alternating rounds per measurement (default 3, --quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10, --quick 2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk keep-alive connections (default 50)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--stream-mib", type=int, help="size of the download and the upload in MiB (default 1024, --quick 64)")
    parser.add_argument("--idle", type=int, help="idle client connections for the memory figure (default 1000, --quick 100)")
    parser.add_argument("--bridge-workers", type=int, default=1, metavar="N", help="the bridge's --workers (default 1, as bridge up; 2 matches HAProxy's 2 threads on 2 cores)")
    parser.add_argument("--only", help="comma-separated subset of small,oa,imap,download,upload,passthrough,idle (default: all)")
    parser.add_argument("--no-logs", action="store_true", help="neither proxy logs requests (the bridge at --log-level warning, HAProxy without httplog); default: both as shipped")
    parser.add_argument("--oa-connections", type=int, default=32, metavar="N", help="Outlook Anywhere virtual connections (default 32)")
    parser.add_argument("--oa-duration", type=float, metavar="S", help="seconds of Outlook Anywhere echoes per run (default 10, --quick 2)")
    parser.add_argument("--imap-fetches", type=int, metavar="N", help="FETCHes of the 25 MB message per run (default 4, --quick 1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs) for inspection")
    parser.add_argument("--profile", action="store_true", help="perf record each proxy during the small requests, the download and the upload, and print where the CPU goes (needs perf)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so the servers are stopped
    missing = missing_tools()
    if missing:
        console.print(f"[bold red]error:[/] the benchmark needs {', '.join(missing)}; install with: apt-get install -y {' '.join(missing)}", highlight=False)
        return 2
    settings = Settings(
        rounds=args.rounds or (1 if args.quick else 3),
        wrk_seconds=args.duration or (2.0 if args.quick else 10.0),
        wrk_connections=args.connections,
        wrk_threads=args.threads,
        stream_bytes=(args.stream_mib or (64 if args.quick else 1024)) * MIB,
        idle_connections=args.idle or (100 if args.quick else 1000),
        quick=args.quick,
        bridge_workers=max(1, args.bridge_workers),
        logs=not args.no_logs,
        oa_connections=max(1, args.oa_connections),
        oa_seconds=args.oa_duration or (2.0 if args.quick else 10.0),
        imap_fetches=args.imap_fetches or (1 if args.quick else 4),
        profile=args.profile,
    )
    if args.profile:
        unavailable = bench_profile.missing()
        if unavailable:
            console.print(f"[bold red]error:[/] {unavailable}", highlight=False)
            return 2
    if args.only:
        settings.only = tuple(part.strip() for part in args.only.split(","))
        unknown = set(settings.only) - {"small", "oa", "imap", "download", "upload", "passthrough", "idle"}
        if unknown:
            console.print(f"[bold red]error:[/] --only takes small, oa, imap, download, upload, passthrough and idle, not {', '.join(sorted(unknown))}.", highlight=False)
            return 2
    try:
        report = run_benchmark(settings, keep=args.keep)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 1
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
