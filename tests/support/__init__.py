"""Helpers shared by tests/unit and tests/integration (no tests here); pyproject's pythonpath makes
``from support.bridges import ...`` work from both."""

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def missing_tools(*tools: str) -> list[str]:
    """The programs of ``tools`` found neither on PATH nor in /usr/sbin (where Debian puts nginx and haproxy)."""
    return [tool for tool in tools if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
