"""`bridge` as a real process: ``BridgeProcess`` runs `bridge up` and collects its log, ``bridge_cli``
runs any `bridge` command to the end; both from this checkout."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from support import REPO
from support.bridges import BRIDGE_FQDN


def bridge_cli(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m bridge.cli ARGS` from this checkout, run to the end (env: the whole environment; None inherits)."""
    environment = {**(os.environ if env is None else env), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO)


def assert_one_sentence_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]  # informational log lines may precede it
    assert message.startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in message, message


def bridge_command(lab_port: int, cert: Path, key: Path, tmp_path: Path, https_port: int, http_port: int, *extra: str) -> list[str]:
    """`bridge up` in front of 127.0.0.1:lab_port on 127.0.0.1 (port 0: the kernel chooses), state in tmp_path/state."""
    return [
        sys.executable,
        "-m",
        "bridge.cli",
        "up",
        "--fqdn",
        BRIDGE_FQDN,
        "--legacy",
        f"127.0.0.1:{lab_port}",
        "--bind",
        "127.0.0.1",
        "--https-port",
        str(https_port),
        "--http-port",
        str(http_port),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--state-dir",
        str(tmp_path / "state"),
        *extra,
    ]


READY = re.compile(r"bridge ready: https://\S+?:(\d+)/")


class BridgeProcess:
    """A `bridge up` subprocess (run from this checkout); its stderr is collected line by line."""

    def __init__(self, command: list[str]) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def find(self, pattern: str) -> re.Match | None:
        return re.search(pattern, self.log)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        """The first log line containing text, once it is logged; AssertionError with the log if it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged; stderr was:\n{self.log}")

    def ready_port(self, timeout: float = 20) -> int:
        """The HTTPS port the ready line names (the kernel's choice for --https-port 0)."""
        match = READY.search(self.wait_for("bridge ready", timeout))
        assert match, "bridge did not start:\n" + self.log
        return int(match.group(1))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        """SIGTERM, then kill if it has not exited within 15 s; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
