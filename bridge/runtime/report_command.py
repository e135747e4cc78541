"""`bridge report`: the hand-over report from a bridge's ledger, on the console and as JSON and HTML."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bridge.certs.keys import atomic_write
from bridge.config import load_settings
from bridge.errors import ConfigError
from bridge.ops.migration import ledger_path, read_ledger
from bridge.ops.report import build_report, print_report, render_html


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, help="the bridge's state directory (holds ledger.json)")
    parser.add_argument("--config", type=Path, help="the bridge's TOML config, to find state_dir")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--html", type=Path, metavar="FILE", help="also write the report as one self-contained HTML page")


def run(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or load_settings(args.config).state_dir
    path = ledger_path(state_dir)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; give the bridge's --state-dir (the bridge writes its ledger there while it runs and at exit).")
    try:
        report = build_report(read_ledger(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a ledger this version can read ({exc}); check the --state-dir.") from None
    print_report(report)
    try:
        if args.json:
            atomic_write(args.json, (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode(), mode=0o644)
        if args.html:
            atomic_write(args.html, render_html(report).encode(), mode=0o644)
    except OSError as exc:
        raise ConfigError(f"Cannot write the report to {exc.filename} ({exc.strerror}); choose a writable path.") from None
    return 0
