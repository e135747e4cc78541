"""`bridge preflight`'s command line, parsed as the command parses it, for the preflight tests."""

from __future__ import annotations

import argparse

from bridge.cli import build_parser

EMAIL = "alice@lab.test"


def parse(*argv: str) -> argparse.Namespace:
    """The arguments of `bridge preflight ARGV`."""
    return build_parser().parse_args(["preflight", *argv])
