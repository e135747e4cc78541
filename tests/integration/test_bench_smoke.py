"""A short run of scripts/bench.py: it builds nginx, the bridge and HAProxy and writes a complete JSON.

No timing is asserted (the figures depend on the machine); what must hold is that every measurement
ran through both proxies and produced a plausible number, so the benchmark keeps working as the
bridge changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, missing_tools

BENCH = REPO / "scripts" / "bench.py"
TOOLS = ("haproxy", "nginx", "wrk", "curl", "openssl")

METRICS = (
    "small_rps",
    "small_p50_ms",
    "small_p99_ms",
    "small_cpu_us_per_request",
    "oa_pdus_s",
    "oa_p50_ms",
    "oa_p99_ms",
    "oa_cpu_us_per_pdu",
    "imap_mb_s",
    "imap_cpu_s_per_gb",
    "download_mb_s",
    "upload_mb_s",
    "download_cpu_s_per_gb",
    "upload_cpu_s_per_gb",
    "download_rss_growth_mib",
    "upload_rss_growth_mib",
    "passthrough_mb_s",
    "passthrough_cpu_s_per_gb",
    "idle_rss_mib",
    "idle_rss_growth_mib",
    "idle_kib_per_connection",
    "start_rss_mib",
)
# (Not the passthrough's CPU: 16 MiB spliced costs about 10 ms, the clock's tick, so it may read 0.)
POSITIVE = (
    "small_rps",
    "small_p50_ms",
    "small_p99_ms",
    "small_cpu_us_per_request",
    "oa_pdus_s",
    "oa_p50_ms",
    "oa_p99_ms",
    "imap_mb_s",
    "download_mb_s",
    "upload_mb_s",
    "download_cpu_s_per_gb",
    "upload_cpu_s_per_gb",
    "passthrough_mb_s",
    "idle_rss_mib",
    "start_rss_mib",
)


def _missing() -> list[str]:
    return missing_tools(*TOOLS)


@pytest.mark.skipif(bool(_missing()), reason=f"needs {', '.join(_missing())} (apt-get install -y haproxy nginx wrk curl)")
def test_quick_benchmark_writes_every_figure_for_both_proxies(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--stream-mib", "16", "--duration", "1", "--idle", "50", "--oa-connections", "4", "--oa-duration", "1", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(output.read_text())

    assert set(report) >= {"machine", "versions", "settings", "results", "samples"}
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    for tool in ("haproxy", "nginx", "wrk", "python", "aiohttp"):
        assert report["versions"][tool] not in ("", "?"), tool
    assert set(report["results"]) == set(METRICS)
    for key, row in report["results"].items():
        assert set(row) >= {"bridge", "haproxy", "ratio", "unit", "target", "met"}, key
        if key in POSITIVE:
            assert row["bridge"] > 0 and row["haproxy"] > 0, (key, row)
        if row["target"] != "-":
            assert row["met"] in (True, False), key
        # One round: that round's ratio is the ratio of the medians.
        if row["ratio"] is not None:
            assert row["round_ratios"] == [pytest.approx(row["ratio"], abs=0.002)], (key, row)
    # The streams really went through TLS 1.0 with an RSA key exchange CBC suite on the backend leg.
    for proxy in ("bridge", "haproxy"):
        assert report["samples"][proxy]["download_backend_tls"] == ["TLSv1 AES128-SHA"], proxy
    # Both proxies ran as shipped: every request logged (the bridge's lines written by the end).
    assert report["settings"]["logs"] is True
    assert report["log_lines"]["bridge_access"] >= 100 and report["log_lines"]["haproxy"] >= 100, report["log_lines"]
    # The Outlook Anywhere and IMAP workloads also ran against the lab alone (its ceiling).
    assert report["lab_ceiling"]["oa_pdus_s"] > 0 and report["lab_ceiling"]["imap_mb_s"] > 0, report["lab_ceiling"]
    assert report["samples"]["bridge"]["oa_calls"][0] > 0 and report["samples"]["haproxy"]["oa_calls"][0] > 0
    # The printed table names the machine and both proxies.
    assert "machine:" in result.stdout and "HAProxy" in result.stdout and "bridge" in result.stdout


@pytest.mark.skipif(bool(_missing()), reason=f"needs {', '.join(_missing())} (apt-get install -y haproxy nginx wrk curl)")
def test_no_logs_variant_runs_both_proxies_without_request_logs(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--no-logs", "--only", "small", "--duration", "1", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["settings"]["logs"] is False and "no access logs" in result.stdout
    assert report["log_lines"] == {"bridge_access": 0, "haproxy": 0}
    assert report["results"]["small_rps"]["bridge"] > 0 and report["results"]["small_rps"]["haproxy"] > 0


def _perf_unavailable() -> str:
    perf = shutil.which("perf")
    if perf is None:
        return "needs perf (apt-get install -y linux-perf)"
    probe = subprocess.run([perf, "record", "-q", "-o", "/dev/null", "--", "true"], capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"perf cannot record here: {probe.stderr.strip()[:100]}"


@pytest.mark.skipif(bool(_missing()) or bool(_perf_unavailable()), reason=_perf_unavailable() or "needs haproxy nginx wrk curl")
def test_profile_says_where_each_proxys_cpu_goes(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--no-logs", "--only", "small", "--duration", "2", "--profile", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    profile = json.loads(output.read_text())["profile"]
    assert set(profile) == {"small"}  # only what ran is profiled
    bridge, haproxy = profile["small"]["bridge"], profile["small"]["haproxy"]
    for parts in (bridge, haproxy):
        assert abs(sum(part["share"] for part in parts.values()) - 1) < 0.01
        assert parts["cryptography"]["share"] > 0 and parts["kernel"]["share"] > 0
    # The samples are each proxy's own: Python only in the bridge, the haproxy binary only in HAProxy.
    assert bridge["interpreter"]["share"] > 0.05 and haproxy["interpreter"]["share"] == 0
    assert haproxy["event loop"]["share"] > 0
    # Costs are in the row's unit: the shares of the CPU per request the table reports.
    cpu = json.loads(output.read_text())["results"]["small_cpu_us_per_request"]["bridge"]
    assert abs(sum(part["cost"] for part in bridge.values()) - cpu) < 0.02 * cpu
    assert "where the CPU goes" in result.stdout


def test_missing_tools_are_named_in_one_sentence(tmp_path: Path) -> None:
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    (empty_path / "python").symlink_to(sys.executable)
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": str(empty_path), "HOME": str(tmp_path), "COLUMNS": "300"},
    )
    assert result.returncode == 2
    message = (result.stdout + result.stderr).strip()
    assert message.count("\n") == 0, message
    assert "apt-get install -y" in message and "wrk" in message
