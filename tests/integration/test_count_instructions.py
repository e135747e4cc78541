"""scripts/count_instructions.py --haproxy: the same-machine reference for the bridge's instruction count.

The count is deterministic (callgrind counts instructions, not time), so what must hold is that the
script ran HAProxy under callgrind with the benchmark's configuration, sent the requests through it to
the TLS-1.0 nginx, and split the difference by object file, HAProxy's own code and OpenSSL included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, missing_tools

SCRIPT = REPO / "scripts" / "count_instructions.py"
NEEDED = ("valgrind", "callgrind_control", "haproxy", "nginx")


def _missing() -> list[str]:
    return missing_tools(*NEEDED)


@pytest.mark.skipif(bool(_missing()), reason=f"needs {', '.join(_missing())}")
def test_haproxy_is_counted_per_request_and_split_by_object(tmp_path: Path) -> None:
    output = tmp_path / "count.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--haproxy", "--warmup", "5", "--requests-low", "20", "--requests-high", "60", "--settle", "0.5", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["subject"] == "haproxy" and report["haproxy"] not in ("", "?")
    per_object = report["per_object_per_request"]
    # HAProxy's own code and OpenSSL did the work; no Python was involved.
    assert per_object.get("/usr/sbin/haproxy", 0) > 5_000, per_object
    assert any("libcrypto" in name and count > 5_000 for name, count in per_object.items()), per_object
    assert not any("python" in name for name in per_object), per_object
    assert 30_000 < report["instructions_per_request"] < 1_000_000
    assert "instructions per small request:" in result.stdout and "option httplog" in result.stdout


@pytest.mark.skipif(bool(_missing()), reason=f"needs {', '.join(_missing())}")
def test_the_relay_floor_is_counted_in_the_bridges_place(tmp_path: Path) -> None:
    """scripts/relay_floor.py relays the requests (the client checks every answer) and, with no HTTP
    logic, leaves the interpreter a small part of the count."""
    output = tmp_path / "count.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--bridge", "scripts/relay_floor.py", "--warmup", "5", "--requests-low", "20", "--requests-high", "60", "--settle", "0.5", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,  # the relative path as docs/benchmark.md gives it
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(output.read_text())
    per_object = report["per_object_per_request"]
    interpreter = sum(count for name, count in per_object.items() if "python3" in name)
    crypto = sum(count for name, count in per_object.items() if "libcrypto" in name)
    assert crypto > 20_000, per_object  # both legs' TLS, as for the bridge
    assert 0 < interpreter < crypto, per_object  # a relay with no HTTP logic: the interpreter is a small part
