"""`bridge up`: its arguments and the run (one process, or the supervisor of --workers)."""

from __future__ import annotations

import argparse
import asyncio

from bridge.config import add_setting_arguments, config_from_args
from bridge.runtime.app import event_loop_factory, serve_until_signalled, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting_arguments(parser, "up")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    setup_logging(config.log_level)
    serve = serve_until_signalled
    if config.workers > 1:
        from bridge.runtime.workers import serve_with_workers as serve
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(serve(config, reload_config=lambda: config_from_args(args)))
