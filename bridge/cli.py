"""The `bridge` command: thin dispatch; each subcommand's arguments and body live in its module.

Every module that provides a subcommand exposes ``add_arguments(parser)`` and ``run(args) -> int``.
User errors are raised as exceptions whose str() is one sentence; they are printed without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from rich.console import Console

from bridge.errors import UserError

SUBCOMMANDS = {
    # name: (module, help)
    "up": ("bridge.runtime.up", "run the bridge: TLS 1.2/1.3 front end reverse-proxying a TLS 1.0 Exchange 2007"),
    "lab": ("bridge.lab.server", "run a simulated Exchange 2007 (TLS 1.0 only, NTLM and Basic) on loopback"),
    "demo": ("bridge.demo", "start the lab and a bridge in front of it, and show NTLM, Basic and RPC going through"),
    "cert": ("bridge.runtime.cert_command", "obtain, renew or show the bridge's certificate"),
    "preflight": ("bridge.preflight.command", "check the legacy server and the bridge before creating the migration batch"),
    "status": ("bridge.ops.status", "show a running bridge's status page (connections, traffic, bans) live in the terminal"),
    "ban": ("bridge.ops.bans", "list, add or lift bans of client addresses (kept in the state dir)"),
    "allow": ("bridge.ops.allowlist", "refresh or show Exchange Online's address ranges for --allow exchange-online"),
    "report": ("bridge.runtime.report_command", "the hand-over report: the migration window, bytes per user and day, failed logons, bans, certificates"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming --help instead of the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see `{self.prog} --help`.\n")


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``chosen``, only that subcommand's module is imported (the bridge's process
    then does not carry the ACME, lab and preflight code in memory)."""
    parser = OneLineParser(prog="bridge", description="exchange-bridge: migrate Exchange 2007 to Exchange Online over a TLS 1.2 bridge.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if chosen is not None and name != chosen:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # subcommand not built yet
            raise
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from bridge import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    console = Console(stderr=True)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors become one sentence, the rest a short report
        if isinstance(exc, UserError):
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            return 2
        logging.getLogger("bridge").debug("unexpected failure", exc_info=True)
        console.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {exc}; rerun with --log-level debug and report it.", highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
