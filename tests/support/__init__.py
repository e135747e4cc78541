"""Helpers shared by tests/unit and tests/integration (no tests here); pyproject's pythonpath makes
``from support.bridges import ...`` work from both."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
