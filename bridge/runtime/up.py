"""`bridge up`: its arguments and the run (one process, or the supervisor of --workers)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from bridge.config import BridgeConfig, build_config, load_toml, merge
from bridge.runtime.app import event_loop_factory, serve_until_signalled, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with any of these settings (flags win)")
    parser.add_argument("--fqdn", help="public name of the bridge, e.g. clientowa.example.com")
    parser.add_argument("--legacy", action="append", metavar="HOST[:PORT]", help="Exchange 2007 CAS (repeatable)")
    parser.add_argument("--bind", help="address to listen on (default: all)")
    parser.add_argument("--https-port", help="HTTPS port (default 443)")
    parser.add_argument("--http-port", help="HTTP port for redirects and ACME (default 80)")
    parser.add_argument("--cert", help="certificate chain PEM (e.g. certbot's fullchain.pem)")
    parser.add_argument("--key", help="private key PEM (e.g. certbot's privkey.pem)")
    parser.add_argument("--state-dir", help="where certificates and state are kept")
    parser.add_argument("--legacy-fingerprint", metavar="sha256:HEX", help="pin the legacy server's certificate")
    parser.add_argument("--legacy-ca", metavar="FILE", help="verify the legacy certificate against this CA")
    parser.add_argument("--legacy-host-header", metavar="NAME", help="send this Host header to the legacy server")
    parser.add_argument("--idle-timeout", metavar="S", help="seconds without data before a connection closes (default 1800)")
    parser.add_argument("--connect-timeout", metavar="S", help="seconds to connect to the legacy server (default 10)")
    parser.add_argument("--forward-path", dest="forward_paths", action="append", metavar="PREFIX", help="replace the list of forwarded paths (repeatable)")
    add_acme_arguments(parser)
    parser.add_argument("--log-level", help="debug | info | warning")
    ops = parser.add_argument_group("operations and security")
    ops.add_argument("--status-bind", metavar="ADDR:PORT", help="status page and /metrics listener (default 127.0.0.1:8404; off disables)")
    ops.add_argument("--allow", action="append", metavar="CIDR", help="accept connections only from these sources (repeatable; default: any)")
    ops.add_argument("--max-connections", metavar="N", help="open client connections before new ones get 503 (default 1000)")
    ops.add_argument("--header-timeout", metavar="S", help="seconds a client has to send a request head (default 15)")
    ops.add_argument("--drain-timeout", metavar="S", help="on SIGTERM, seconds open requests get to finish (default 30)")
    ops.add_argument("--workers", metavar="N", help="HTTPS worker processes sharing the port, or auto (one per CPU; default 1)")
    ops.add_argument("--ban-threshold", metavar="N", help="failed logons from one address that trigger a ban (default 10)")
    ops.add_argument("--ban-window", metavar="S", help="seconds in which those failures must occur (default 600)")
    ops.add_argument("--ban-duration", metavar="S", help="seconds a ban lasts (default 3600)")
    ops.add_argument("--ban-command", metavar="CMD", help="run 'CMD ban IP SECONDS' and 'CMD unban IP' on each ban and unban")
    ops.add_argument("--never-ban", action="append", metavar="CIDR", help="addresses never banned (repeatable)")


def add_acme_arguments(parser: argparse.ArgumentParser) -> None:
    """Certificate flags, shared by `bridge up` and `bridge cert`."""
    parser.add_argument("--acme-directory", help="letsencrypt | letsencrypt-staging | directory URL")
    parser.add_argument("--acme-email", help="contact e-mail for the ACME account")
    parser.add_argument("--acme-eab-kid", help="External Account Binding key id")
    parser.add_argument("--acme-eab-hmac-key", help="External Account Binding HMAC key")
    parser.add_argument("--acme-ca-bundle", help="CA bundle trusted for the ACME server")
    parser.add_argument("--key-type", help="ecdsa-p256 | rsa-2048 | rsa-3072")


def config_from_args(args: argparse.Namespace) -> BridgeConfig:
    flags = {key: value for key, value in vars(args).items() if not key.startswith("_") and key not in ("command", "config")}
    file_values = load_toml(args.config) if args.config else {}
    return build_config(merge(file_values, flags))


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    setup_logging(config.log_level)
    serve = serve_until_signalled
    if config.workers > 1:
        from bridge.runtime.workers import serve_with_workers as serve
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(serve(config, reload_config=lambda: config_from_args(args)))


