"""Where each proxy's CPU goes: ``perf record`` while a benchmark measurement runs (``bench.py --profile``).

For the small requests, the download and the upload, ``perf record -F 999`` samples the proxy's
processes (user and kernel) for as long as the measurement runs; ``perf report`` then counts the samples
per shared object and symbol, and this module files them under a few headings that say what the time
was spent on:

- ``cryptography``: libcrypto (AES-GCM in front, AES-CBC and HMAC-SHA1 behind, handshakes);
- ``TLS record layer``: libssl;
- ``copies (memcpy, memset)``: libc's memmove/memcpy/memset (with memory BIOs, as uvloop and Python's
  ``ssl.SSLObject`` use, every byte is also copied into and out of OpenSSL's buffers);
- ``allocator and other libc``: the rest of libc (malloc/free above all);
- ``kernel``: system calls, TCP on loopback, waking the peer;
- ``interpreter``: CPython and its C modules (``_ssl``, ``_asyncio``), the bridge's own code included;
- ``event loop``: uvloop's compiled loop (the bridge) or the ``haproxy`` binary itself;
- ``other``: anything else (vdso, libm).

Shares of the samples, multiplied by the CPU the measurement itself reported (µs per request,
CPU-seconds per GB), give each heading's cost per request or per GB, the same units as the main table.
The parsing and the headings are pure functions (tests/unit/test_bench_profile.py).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

CATEGORIES = (
    "cryptography",
    "TLS record layer",
    "copies (memcpy, memset)",
    "allocator and other libc",
    "kernel",
    "interpreter",
    "event loop",
    "other",
)

# The measurements profiled (bench.py's step names) and the unit of their CPU figure.
PROFILED = {
    "small": ("small_cpu_us_per_request", "µs per request"),
    "download": ("download_cpu_s_per_gb", "CPU-s per GB"),
    "upload": ("upload_cpu_s_per_gb", "CPU-s per GB"),
}

_ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+\[([k.])\]\s+(\S.*?)\s*$")
_COPY = re.compile(r"(^|_)(memmove|memcpy|memset)")


def parse_report(text: str) -> Iterator[tuple[int, str, bool, str]]:
    """(samples, shared object, is kernel, symbol) per row of ``perf report --stdio --sort dso,sym
    -F sample,dso,sym``; comment and blank lines are skipped."""
    for line in text.splitlines():
        match = _ROW.match(line)
        if match:
            yield int(match.group(1)), match.group(2), match.group(3) == "k", match.group(4)


def category(dso: str, kernel: bool, symbol: str) -> str:
    """The heading a sample's shared object and symbol belong under."""
    name = dso.rsplit("/", 1)[-1]
    if kernel or name.startswith("[kernel"):
        return "kernel"
    if name.startswith("libcrypto"):
        return "cryptography"
    if name.startswith("libssl"):
        return "TLS record layer"
    if name.startswith("libc.") or name.startswith("libc-"):
        return "copies (memcpy, memset)" if _COPY.search(symbol) else "allocator and other libc"
    if name.startswith("loop.") or name == "haproxy":  # uvloop's compiled loop; HAProxy's own code
        return "event loop"
    if name.startswith("python") or name.startswith("libpython") or ".cpython-" in name:
        return "interpreter"
    return "other"


def categorise(rows: Iterable[tuple[int, str, bool, str]]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for samples, dso, kernel, symbol in rows:
        counts[category(dso, kernel, symbol)] += samples
    return counts


def shares(counts: Counter[str]) -> dict[str, float]:
    """Each heading's share of all samples (0..1), in CATEGORIES order; empty when nothing was sampled."""
    total = sum(counts.values())
    return {name: counts[name] / total for name in CATEGORIES} if total else {}


def missing() -> str | None:
    """None when perf can record here, else one sentence saying why not and what to do."""
    perf = shutil.which("perf")
    if perf is None:
        return "--profile needs perf; install it with: apt-get install -y linux-perf"
    result = subprocess.run([perf, "record", "-q", "-o", "/dev/null", "--", "true"], capture_output=True, text=True)
    if result.returncode != 0:
        return f"perf cannot record here ({result.stderr.strip()[:120] or 'exit status ' + str(result.returncode)}); run as root or lower /proc/sys/kernel/perf_event_paranoid"
    return None


class Profiler:
    """Records one perf file per (measurement, proxy, round) and adds their samples up per heading."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.perf = shutil.which("perf") or "perf"
        self.counts: dict[str, dict[str, Counter[str]]] = {}  # step -> proxy -> heading -> samples

    @contextmanager
    def record(self, step: str, proxy: str, pids: list[int], round_number: int) -> Iterator[None]:
        if step not in PROFILED:
            yield
            return
        path = self.directory / f"perf-{step}-{proxy}-{round_number}.data"
        command = [self.perf, "record", "-q", "-F", "999", "-p", ",".join(map(str, pids)), "-o", str(path)]
        recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.3)  # perf attaches before the load starts
        try:
            yield
        finally:
            recorder.send_signal(signal.SIGINT)
            try:
                recorder.wait(60)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait(5)
        report = subprocess.run(
            [self.perf, "report", "-i", str(path), "--stdio", "--sort", "dso,sym", "-F", "sample,dso,sym"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        path.unlink(missing_ok=True)  # a few MB each: only the counts are kept
        counts = self.counts.setdefault(step, {}).setdefault(proxy, Counter())
        counts.update(categorise(parse_report(report.stdout)))

    def summary(self, medians: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """step -> proxy -> heading -> {"share": 0..1, "cost": share x the measurement's median CPU figure}.
        ``medians``: proxy -> metric key -> median (bench.py's summary)."""
        result: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        for step, per_proxy in self.counts.items():
            key, _unit = PROFILED[step]
            for proxy, counts in per_proxy.items():
                cpu = medians.get(proxy, {}).get(key, 0.0)
                result.setdefault(step, {})[proxy] = {name: {"share": round(part, 4), "cost": round(part * cpu, 3)} for name, part in shares(counts).items()}
        return result
