#!/usr/bin/env python3
"""Instructions per small request of the real bridge, counted by valgrind's callgrind.

The measurement of docs/benchmark.md, "Counting instructions: the last step", as a script:

- the bench's TLS-1.0-only nginx (scripts/bench.py's configuration, RSA-1024 SHA-1 certificate, CBC
  suites) serves /owa/small (1 KiB) on 127.0.0.1;
- the bridge runs under ``valgrind --tool=callgrind --dump-instr=no`` as ``PYTHON BRIDGE up ...``
  (BRIDGE is the venv's console script, so module moves inside the package do not matter), with a
  throwaway CA's certificate, the legacy certificate pinned, the status listener off and every other
  setting at the bridge's default (one process, uvloop, ``--log-level info``: one access-log line per
  request, written to a file as systemd's journal would take it; ``--log-level warning`` leaves it out);
- after a warm-up connection, this process (the client, not counted) opens one keep-alive TLS
  connection, sends N1 small requests one after another, closes it, and has callgrind dump its
  counters (``callgrind_control --dump``); then the same with N2 requests on a new connection.
  Counters are zeroed before each phase, so each total covers one connection: its two handshakes,
  its requests and its close. (total(N2) - total(N1)) / (N2 - N1) is the cost of one request, with
  the per-connection costs cancelled out.

It prints the interpreter used, the two totals, "instructions per small request: N" and the same
difference split by object file (self cost: the instructions executed in that file's own code;
the rows add up to the total).

With --haproxy it counts HAProxy instead, configured as the benchmark configures it (one thread, so
that one callgrind process sees all its work; ``option httplog`` unless --log-level warning), with the
same client, nginx and requests: the same-machine reference for the bridge's figure.

Usage (from a checkout whose venv has the bridge installed):
    .venv/bin/python scripts/count_instructions.py [--requests-low 400] [--requests-high 1200]
        [--python PATH] [--bridge PATH] [--haproxy] [--json FILE] [--keep]
Needs valgrind (callgrind_control) and nginx: apt-get install -y valgrind nginx.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

import bench  # noqa: E402  (the benchmark's nginx configuration, certificates and process helpers)

SMALL_BODY = 1024
REQUEST = f"GET /owa/small HTTP/1.1\r\nHost: {bench.FQDN}\r\nAccept-Encoding: identity\r\n\r\n".encode()


# ---- the test bed -------------------------------------------------------------------------------
def start_nginx(directory: Path) -> tuple[subprocess.Popen, int, Path]:
    """The bench's TLS-1.0-only nginx (bench.start_bed's first half). Returns (process, port, its certificate)."""
    www = directory / "www" / "owa"
    www.mkdir(parents=True)
    (www / "small").write_bytes(b"x" * (SMALL_BODY - 1) + b"\n")
    uploads = directory / "uploads"
    (uploads / "tmp").mkdir(parents=True)
    legacy_cert, legacy_key = bench.legacy_self_signed(directory / "legacy", ["exchange2007.lab.test"])
    port = bench.free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    # (the bench's second server, its TLS 1.2 passthrough backend, is not used here)
    passthrough_key = bench.new_private_key("ecdsa-p256")
    ca = bench.LocalCA.create("exchange-bridge instruction-count passthrough CA")
    passthrough_cert, passthrough_key_file = bench.write_pair(directory / "passthrough", ca.issue([bench.PASSTHROUGH_NAME], passthrough_key), passthrough_key)
    conf.write_text(
        bench.NGINX_CONF.format(
            user=user,
            dir=directory,
            port=port,
            cert=legacy_cert,
            key=legacy_key,
            uploads=uploads,
            passthrough_port=bench.free_port(),
            passthrough_cert=passthrough_cert,
            passthrough_key=passthrough_key_file,
        )
    )
    process = subprocess.Popen(
        [bench.tool_path("nginx"), "-c", str(conf), "-p", str(directory), "-e", str(directory / "nginx-error.log"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=open(directory / "nginx-stderr.log", "wb"),
    )
    return process, port, legacy_cert


def front_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and the bridge's certificate from it. Returns (cert, key, CA file)."""
    ca = bench.LocalCA.create("exchange-bridge instruction-count CA")
    key = bench.new_private_key("ecdsa-p256")
    cert, key_file = bench.write_pair(directory, ca.issue([bench.FQDN], key), key)
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(bench.cert_pem(ca.cert))
    return cert, key_file, ca_file


def start_bridge(directory: Path, args: argparse.Namespace, nginx_port: int, legacy_cert: Path, cert: Path, key: Path) -> tuple[subprocess.Popen, int]:
    der = ssl.PEM_cert_to_DER_cert(legacy_cert.read_text())
    pin = bench.pin_flag(bench.fingerprint(der)).split(" ", 1)[1]
    port = bench.free_port()
    callgrind = ["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={directory}/callgrind.out.%p"]
    command = [
        *callgrind,
        str(args.python),
        str(args.bridge),
        "up",
        "--fqdn",
        bench.FQDN,
        "--legacy",
        f"127.0.0.1:{nginx_port}",
        "--legacy-fingerprint",
        pin,
        "--bind",
        "127.0.0.1",
        "--https-port",
        str(port),
        "--http-port",
        str(bench.free_port()),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--state-dir",
        str(directory / "state"),
        "--status-bind",
        "off",
        "--log-level",
        args.log_level,
    ]
    if args.haproxy:
        command = [*callgrind, *haproxy_command(directory, args, nginx_port, cert, key, port)]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the bridge comes from the venv of --python, nothing else
    if args.hash_seed != "random":
        env["PYTHONHASHSEED"] = args.hash_seed
    process = subprocess.Popen(
        command,
        cwd=directory,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=open(directory / "bridge-stdout.log", "wb"),
        stderr=open(directory / "bridge.log", "wb"),
    )
    return process, port


def haproxy_command(directory: Path, args: argparse.Namespace, nginx_port: int, cert: Path, key: Path, port: int) -> list[str]:
    """--haproxy: HAProxy configured as the benchmark configures it (bench.HAPROXY_CONF: TLS 1.2+ front,
    TLS 1.0 back, one server connection per client connection; ``option httplog`` to stdout, a file,
    unless --log-level warning), with one thread so that one callgrind process sees all its work."""
    pem = directory / "haproxy.pem"
    pem.write_text(cert.read_text() + key.read_text())
    logs = args.log_level == "info"
    text = bench.HAPROXY_CONF.format(
        maxconn=1000,
        global_log="    log stdout format raw local0\n" if logs else "",
        defaults_log="    log global\n" if logs else "",
        http_log="    option httplog\n" if logs else "",
        port=port,
        pem=pem,
        nginx_port=nginx_port,
        ciphers=bench.LEGACY_CIPHERS,
        passthrough_port=bench.free_port(),
        passthrough_name=bench.PASSTHROUGH_NAME,
        passthrough_backend=bench.free_port(),
    )
    conf = directory / "haproxy.cfg"
    conf.write_text(text.replace("global\n", "global\n    nbthread 1\n", 1))
    return [bench.tool_path("haproxy"), "-db", "-f", str(conf)]


def stop(process: subprocess.Popen | None, grace: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        print(f"warning: pid {process.pid} did not stop within {grace:g} s of SIGTERM; killed", file=sys.stderr)
        process.kill()
        process.wait(10)


# ---- the client ---------------------------------------------------------------------------------
def read_response(sock: ssl.SSLSocket, buffer: bytearray) -> None:
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the bridge closed the connection in the middle of a response")
        buffer += chunk
    head = bytes(buffer[:end])
    del buffer[: end + 4]
    if not head.startswith(b"HTTP/1.1 200 "):
        status_line = head.split(b"\r\n", 1)[0]
        raise RuntimeError(f"the bridge answered {status_line!r} for /owa/small")
    match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if not match or int(match.group(1)) != SMALL_BODY:
        raise RuntimeError(f"unexpected response head for /owa/small: {head!r}")
    while len(buffer) < SMALL_BODY:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the bridge closed the connection in the middle of a body")
        buffer += chunk
    del buffer[:SMALL_BODY]


def one_connection(port: int, ca_file: Path, requests: int, timeout: float) -> None:
    """`requests` small requests, one after the other, on one kept TLS connection; then a clean close."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=bench.FQDN) as sock:
            buffer = bytearray()
            for _ in range(requests):
                sock.sendall(REQUEST)
                read_response(sock, buffer)
            if buffer:
                raise RuntimeError(f"{len(buffer)} unexpected bytes after the last response")
            try:
                sock.unwrap()
            except (OSError, ssl.SSLError):
                pass


# ---- callgrind ----------------------------------------------------------------------------------
def callgrind_control(pid: int, *options: str) -> None:
    result = subprocess.run(["callgrind_control", *options, str(pid)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or "OK" not in result.stdout:
        raise RuntimeError(f"callgrind_control {' '.join(options)} failed: {(result.stdout + result.stderr).strip()[:400]}")


def dump(directory: Path, pid: int, reason: str) -> Path:
    before = set(directory.glob(f"callgrind.out.{pid}.*"))
    callgrind_control(pid, f"--dump={reason}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(directory.glob(f"callgrind.out.{pid}.*")) - before
        for path in new:
            text = path.read_text(errors="replace")
            if re.search(r"^(totals|summary):", text, re.M):
                return path
        time.sleep(0.1)
    raise RuntimeError(f"callgrind wrote no dump for {reason}")


_NAMED = re.compile(r"^\((\d+)\)(?: (.*))?$")


def parse_dump(path: Path) -> tuple[int, dict[str, int]]:
    """(total Ir, self Ir per object file) of one callgrind dump (format of callgrind 3.x)."""
    objects: dict[str, str] = {}  # compressed id -> name (shared by ob= and cob=)
    per_object: dict[str, int] = {}
    total = summary = None
    current = "???"
    after_calls = False

    def name_of(value: str) -> str:
        match = _NAMED.match(value)
        if not match:
            return value
        if match.group(2) is not None:
            objects[match.group(1)] = match.group(2)
        return objects.get(match.group(1), "???")

    for line in path.read_text(errors="replace").splitlines():
        if not line:
            continue
        first = line[0]
        if first.isdigit() or first in "+-*":
            if after_calls:  # the inclusive cost of a call, counted in the callee already
                after_calls = False
                continue
            fields = line.split()
            if len(fields) > 1:
                per_object[current] = per_object.get(current, 0) + int(fields[1])
            continue
        after_calls = False
        if line.startswith("ob="):
            current = name_of(line[3:])
        elif line.startswith("cob="):
            name_of(line[4:])
        elif line.startswith("calls="):
            after_calls = True
        elif line.startswith("totals:"):
            total = int(line.split(":", 1)[1].split()[0])
        elif line.startswith("summary:"):
            summary = int(line.split(":", 1)[1].split()[0])
    if total is None:
        total = summary
    if total is None:
        raise RuntimeError(f"no totals in {path}")
    if summary is not None and abs(total - summary) > 0.005 * max(total, 1):
        print(f"warning: {path.name}: totals {total:,} but summary {summary:,}", file=sys.stderr)
    return total, per_object


def label(path: str) -> str:
    name = os.path.basename(path)
    if re.match(r"python3(\.\d+)?$", name):
        return f"{name} (the interpreter, libpython linked in)"
    return name


# ---- orchestration ------------------------------------------------------------------------------
def interpreter_version(python: Path) -> str:
    result = subprocess.run([str(python), "-c", "import sys; print(sys.version.replace(chr(10), ' '))"], capture_output=True, text=True, timeout=60)
    return result.stdout.strip() or "?"


def checkout_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "?"
    return f"{rev}{' + uncommitted changes' if dirty else ''}" if rev else "?"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="bridge-callgrind-"))
    nginx = bridge = None
    try:
        nginx, nginx_port, legacy_cert = start_nginx(directory)
        bench.wait_for_port(nginx_port, nginx, "nginx")
        cert, key, ca_file = front_certificate(directory)
        bridge, port = start_bridge(directory, args, nginx_port, legacy_cert, cert, key)
        subject = "HAProxy" if args.haproxy else "the bridge"
        print(f"starting {subject} under callgrind (pid {bridge.pid}; log {directory / 'bridge.log'}) ...", flush=True)
        started = time.monotonic()
        bench.wait_for_port(port, bridge, f"{subject} under valgrind", timeout=args.timeout)
        print(f"  listening after {time.monotonic() - started:.0f} s; warm-up: {args.warmup} requests on one connection", flush=True)
        one_connection(port, ca_file, args.warmup, args.timeout)
        totals: dict[int, tuple[int, dict[str, int]]] = {}
        for count in (args.requests_low, args.requests_high):
            time.sleep(args.settle)  # the warm-up's / previous phase's close has finished
            # A dump zeroes every counter (callgrind_control --zero was seen to leave part of the
            # earlier cost in the next dump's per-function costs), so start each phase with one.
            dump(directory, bridge.pid, f"before-{count}-requests")
            started = time.monotonic()
            one_connection(port, ca_file, count, args.timeout)
            time.sleep(args.settle)  # the bridge has closed its legacy connection
            path = dump(directory, bridge.pid, f"{count}-requests")
            totals[count] = parse_dump(path)
            print(f"  {count:>6} requests: {totals[count][0]:>15,} instructions ({time.monotonic() - started:.1f} s)", flush=True)
            if bridge.poll() is not None:
                raise RuntimeError(f"the bridge exited during the measurement; see {directory / 'bridge.log'}")
    except BaseException:
        log = directory / "bridge.log"
        if log.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            if tail:
                print("bridge/valgrind log (last lines):\n  " + "\n  ".join(tail), file=sys.stderr)
        raise
    finally:
        stop(bridge, 120)  # valgrind writes its final dump on exit
        if nginx is not None:
            bench.stop_process(nginx)
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)

    low, high = args.requests_low, args.requests_high
    extra = high - low
    (total_low, objects_low), (total_high, objects_high) = totals[low], totals[high]
    per_object = {name: (objects_high.get(name, 0) - objects_low.get(name, 0)) / extra for name in set(objects_low) | set(objects_high)}
    return {
        "instructions_per_request": round((total_high - total_low) / extra),
        "requests_low": low,
        "requests_high": high,
        "total_low": total_low,
        "total_high": total_high,
        "per_object_per_request": {name: round(value) for name, value in sorted(per_object.items(), key=lambda item: -item[1])},
        "subject": "haproxy" if args.haproxy else "bridge",
        "haproxy": bench.command_version([bench.tool_path("haproxy"), "-v"], r"version (\S+)") if args.haproxy else None,
        "python": str(args.python),
        "python_realpath": os.path.realpath(args.python),
        "python_version": interpreter_version(args.python),
        "bridge": str(args.bridge),
        "checkout": str(REPO),
        "revision": checkout_revision(),
        "valgrind": bench.command_version(["valgrind", "--version"], r"valgrind-(\S+)"),
        "hash_seed": args.hash_seed,
        "log_level": args.log_level,
        "warmup": args.warmup,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def print_report(report: dict[str, Any], top: int) -> None:
    extra = report["requests_high"] - report["requests_low"]
    if report.get("subject") == "haproxy":
        print(f"haproxy {report['haproxy']} (one thread, the benchmark's configuration), valgrind {report['valgrind']}")
        logging = "option httplog" if report["log_level"] == "info" else "no request log"
    else:
        print(f"python: {report['python']} -> {report['python_realpath']} ({report['python_version']})")
        print(f"bridge: {report['bridge']} (checkout {report['checkout']} at {report['revision']}), valgrind {report['valgrind']}")
        logging = f"--log-level {report['log_level']}"
    print(f"instructions per small request: {report['instructions_per_request']:,} ({logging})")
    print(f"  (({report['total_high']:,} - {report['total_low']:,}) / {extra} requests)")
    print("per object file, self instructions per request:")
    rows = list(report["per_object_per_request"].items())
    shown, rest = rows[:top], rows[top:]
    for name, value in shown:
        print(f"  {value:>10,}  {label(name)}")
    if rest:
        print(f"  {sum(value for _, value in rest):>10,}  ({len(rest)} others)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Count the bridge's instructions per small request with callgrind (see docs/benchmark.md).")
    parser.add_argument("--requests-low", type=int, default=400, metavar="N1", help="requests on the first connection (default 400)")
    parser.add_argument("--requests-high", type=int, default=1200, metavar="N2", help="requests on the second connection (default 1200)")
    parser.add_argument("--python", type=Path, default=Path(sys.executable), help="interpreter that runs the bridge (default: this one, %(default)s)")
    parser.add_argument("--bridge", type=Path, help="the bridge's console script (default: `bridge` next to --python)")
    parser.add_argument("--warmup", type=int, default=50, metavar="N", help="requests on a first, uncounted connection (default 50)")
    parser.add_argument("--settle", type=float, default=1.0, metavar="S", help="seconds to let the bridge finish a connection's close before a dump (default 1)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("info", "warning"),
        help="the bridge's --log-level (default info, as shipped: one access-log line per request, to a file as a journal takes it; warning: none)",
    )
    parser.add_argument("--hash-seed", default="0", metavar="SEED", help="PYTHONHASHSEED for the bridge (default 0, for repeatable dict layouts; 'random' to leave it)")
    parser.add_argument("--timeout", type=float, default=300, metavar="S", help="how long the bridge may take to start, and each read (default 300)")
    parser.add_argument("--top", type=int, default=8, metavar="N", help="object files shown in the breakdown (default 8)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (callgrind dumps, logs)")
    parser.add_argument("--haproxy", action="store_true", help="count HAProxy instead (the benchmark's configuration, one thread; --log-level info logs every request as the benchmark does)")
    args = parser.parse_args(argv)
    if not 0 < args.requests_low < args.requests_high:
        parser.error("need 0 < --requests-low < --requests-high")
    if args.bridge is None:
        args.bridge = args.python.parent / "bridge"  # not resolved: a venv's python is a symlink
    args.bridge = args.bridge.absolute()  # the bridge runs in the temporary directory (absolute(): no symlink resolved)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so everything started is stopped
    missing = bench.missing_tools(("valgrind", "callgrind_control", "nginx", *(("haproxy",) if args.haproxy else ())))
    if missing:
        packages = dict.fromkeys("valgrind" if tool == "callgrind_control" else tool for tool in missing)  # (callgrind_control comes with valgrind)
        print(f"error: needs {', '.join(missing)}; install with: apt-get install -y {' '.join(packages)}", file=sys.stderr)
        return 2
    for what, path in (("--python", args.python), ("--bridge", args.bridge)):
        if not path.exists():
            print(f"error: {what} {path} does not exist (run this with the venv's python, or pass --python and --bridge)", file=sys.stderr)
            return 2
    if not args.haproxy:
        print(f"python: {args.python} ({os.path.realpath(args.python)}); bridge: {args.bridge}", flush=True)
    try:
        report = measure(args)
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ssl.SSLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_report(report, args.top)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
