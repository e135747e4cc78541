"""`bridge preflight`: its arguments, the settings they make, and the run that prints and writes reports."""

from __future__ import annotations

import argparse
import getpass
import os
import re
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.config import BY_NAME, MAIL_UPSTREAM_PORTS, LegacyServer, is_ip_address, load_toml, merge, parse_fingerprint, parse_legacy, parse_passthrough, parse_route_name, validate_fqdn
from bridge.errors import PreflightUsageError
from bridge.preflight.mail import MailTarget
from bridge.preflight.model import DEFAULT_HOLD, DEFAULT_TIMEOUT, SCHEMA, Settings
from bridge.preflight.probe import Credentials
from bridge.preflight.report import print_report, run_with_progress, write_html, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="a bridge TOML (as for `bridge up`): legacy, fqdn and ports come from it; flags win")
    parser.add_argument("--legacy", metavar="HOST[:PORT]", help="the Exchange 2007 Client Access Server")
    parser.add_argument("--fqdn", help="the bridge's public name: checks the bridge too")
    parser.add_argument("--expect-ip", metavar="IP", help="the address the bridge's name must resolve to")
    parser.add_argument("--bridge-addr", metavar="IP", help="probe the bridge at this address (SNI and Host stay the FQDN), e.g. before DNS is published")
    parser.add_argument("--https-port", type=int, help="the bridge's HTTPS port (default 443)")
    parser.add_argument("--http-port", type=int, help="the bridge's HTTP port (default 80)")
    parser.add_argument("--ca-bundle", type=Path, metavar="FILE", help="also trust this CA for the bridge certificate (e.g. Let's Encrypt staging)")
    parser.add_argument("--email", metavar="ADDR", help="a mailbox to test Autodiscover and the RPC proxy with (needs --username)")
    parser.add_argument("--username", metavar="USER", help="logon name for that mailbox: DOMAIN\\user or user@domain")
    parser.add_argument("--password-env", metavar="VAR", help="environment variable holding the password (default: ask at a prompt)")
    parser.add_argument("--auth", choices=("basic", "ntlm", "both"), default="both", help="authentication to test (default both)")
    parser.add_argument("--exchange-server", metavar="NAME", help="the Exchange server's internal name for the RPC checks when Autodiscover cannot give it (manual endpoint settings)")
    services = (("--imap", "IMAP4 (default: the legacy host, 993)"), ("--pop3", "POP3 (default: the legacy host, 995)"), ("--smtp", "SMTP submission (default: the legacy host, 587, STARTTLS)"))
    for flag, what in services:
        parser.add_argument(flag, nargs="?", const="", metavar="HOST[:PORT]", help=f"also check Exchange 2007's {what}, and with --fqdn the bridge's listeners for it")
    parser.add_argument("--json", type=Path, metavar="FILE", help=f"write the report as JSON ({SCHEMA}, see docs/preflight-schema.md)")
    parser.add_argument("--html", type=Path, metavar="FILE", help="write a self-contained HTML report for the customer")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S", help=f"seconds per network step (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--hold", type=float, default=DEFAULT_HOLD, metavar="S", help=f"seconds an idle connection to the bridge must survive (default {DEFAULT_HOLD:g}; 960 proves 15 min)")


def settings_from_args(args: argparse.Namespace, read_password: Callable[[str], str] | None = None) -> Settings:
    file_values: dict[str, Any] = load_toml(args.config) if args.config else {}
    values = merge(file_values, {"legacy": args.legacy, "fqdn": args.fqdn, "https_port": args.https_port, "http_port": args.http_port})
    legacy = values.get("legacy")
    listed = [str(item) for item in (legacy if isinstance(legacy, list) else [legacy] if legacy else [])]
    if not listed:
        raise PreflightUsageError("No legacy server given: pass --legacy with the Exchange 2007 host (e.g. --legacy owa.customer.example) or --config with the bridge's TOML.")
    settings = Settings(legacy=parse_legacy(listed[0]), other_legacy=[parse_legacy(item) for item in listed[1:]])
    if values.get("fqdn"):
        settings.fqdn = validate_fqdn(str(values["fqdn"]))
    for name in ("https_port", "http_port"):
        if values.get(name) is not None:
            setattr(settings, name, port_number(f"--{name.replace('_', '-')}", values[name]))
    if values.get("legacy_fingerprint"):
        settings.legacy_fingerprint = parse_fingerprint(str(values["legacy_fingerprint"]))
    # SNI routes of the bridge's TOML: each is checked through the bridge (with --fqdn).
    routes = values.get("passthrough") or []
    settings.routes = [parse_passthrough("passthrough", item) for item in (routes if isinstance(routes, list) else [routes])]
    names = values.get("terminate") or []
    settings.terminate = [parse_route_name("terminate", item) for item in (names if isinstance(names, list) else [names])]
    settings.expect_ip = ip_flag("--expect-ip", args.expect_ip)
    settings.bridge_addr = ip_flag("--bridge-addr", args.bridge_addr)
    if (settings.expect_ip or settings.bridge_addr) and not settings.fqdn:
        raise PreflightUsageError("--expect-ip and --bridge-addr describe the bridge: give its name with --fqdn too.")
    settings.ca_bundle = ca_bundle_flag(args.ca_bundle)
    settings.auth = args.auth
    if args.exchange_server:
        if not args.email:
            raise PreflightUsageError("--exchange-server is used by the logon checks: give --email and --username too.")
        name = args.exchange_server.strip().rstrip(".")
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", name):
            raise PreflightUsageError(f"--exchange-server {args.exchange_server!r} is not a host name; give the Exchange server's internal name, e.g. --exchange-server exch01.corp.local.")
        settings.exchange_server = name
    if not args.timeout > 0:
        raise PreflightUsageError(f"--timeout must be a positive number of seconds, not {args.timeout:g}.")
    if args.hold < 0:
        raise PreflightUsageError(f"--hold must be zero or more seconds, not {args.hold:g}.")
    settings.timeout, settings.hold = args.timeout, args.hold
    for flag, path in (("--json", args.json), ("--html", args.html)):
        if path is not None and not path.resolve().parent.is_dir():
            raise PreflightUsageError(f"{flag} {path}: the directory {path.resolve().parent} does not exist; create it or choose another path.")
    settings.credentials = credentials_from_args(args, read_password or prompt_password)
    settings.mail = mail_targets(args, values, settings.legacy)
    return settings


def mail_targets(args: argparse.Namespace, values: dict[str, Any], legacy: LegacyServer) -> list[MailTarget]:
    """The mail services to check: each --imap/--pop3/--smtp flag, and each mail listener of the bridge's
    --config (its upstream settings and ports); the flag's HOST[:PORT] wins over the config's upstream."""
    bridge_ports = {"imap": {"imap": ("imaps_port", 993)}, "pop3": {"pop3": ("pop3s_port", 995)}, "smtp": {"smtp": ("smtps_port", 465), "submission": ("submission_port", 587)}}
    targets = []
    for protocol, listeners in bridge_ports.items():
        flag_value = getattr(args, protocol, None)
        configured = {label: int(values[key]) for label, (key, _) in listeners.items() if values.get(key)}
        if flag_value is None and not configured:
            continue
        mode = BY_NAME[f"{protocol}_upstream_tls"].parse(f"--{protocol}-upstream-tls", values.get(f"{protocol}_upstream_tls") or BY_NAME[f"{protocol}_upstream_tls"].default)
        upstream = flag_value or values.get(f"{protocol}_upstream")
        server = parse_legacy(str(upstream), f"--{protocol}", default_port=0) if upstream else LegacyServer(legacy.host, 0)
        implicit_port, other_port = MAIL_UPSTREAM_PORTS[protocol]
        port = server.port or (implicit_port if mode == "implicit" else other_port)
        ports = configured or {label: default for label, (_, default) in listeners.items()}
        targets.append(MailTarget(protocol, LegacyServer(server.host, port), mode, ports))
    return targets


def port_number(flag: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if not 0 < number < 65536:
        raise PreflightUsageError(f"{flag} must be a port number from 1 to 65535, not {value!r}.")
    return number


def ip_flag(flag: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not is_ip_address(value.strip()):
        raise PreflightUsageError(f"{flag} {value!r} is not an IP address; give the bridge's address, e.g. {flag} 203.0.113.10.")
    return value.strip()


def ca_bundle_flag(path: Path | None) -> Path | None:
    if path is None:
        return None
    if not path.is_file():
        raise PreflightUsageError(f"--ca-bundle {path} does not exist; give the PEM file of the CA to trust.")
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError):
        raise PreflightUsageError(f"--ca-bundle {path} holds no PEM certificate; give the CA certificate in PEM form.") from None
    return path


def credentials_from_args(args: argparse.Namespace, read_password: Callable[[str], str]) -> Credentials | None:
    if not args.email and not args.username:
        if args.password_env:
            raise PreflightUsageError("--password-env needs --email and --username: name the mailbox to test with.")
        return None
    if not (args.email and args.username):
        raise PreflightUsageError("--email and --username go together: give the mailbox address and the logon name (DOMAIN\\user or UPN).")
    if "@" not in args.email:
        raise PreflightUsageError(f"--email {args.email!r} is not an e-mail address; give the mailbox's primary SMTP address.")
    if args.password_env:
        password = os.environ.get(args.password_env)
        if not password:
            raise PreflightUsageError(f"The environment variable {args.password_env} named by --password-env is not set or empty; export it first.")
    else:
        password = read_password(args.username)
    return Credentials(args.email, args.username, password)


def prompt_password(username: str) -> str:
    if not sys.stdin.isatty():
        raise PreflightUsageError("No terminal to ask for the password: put it in an environment variable and name it with --password-env.")
    password = getpass.getpass(f"Password for {username}: ")
    if not password:
        raise PreflightUsageError("An empty password was given; rerun and type the mailbox password.")
    return password


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    outcome = run_with_progress(settings)
    print_report(outcome)
    if args.json:
        write_json(outcome, args.json)
    if args.html:
        write_html(outcome, args.html)
    return 1 if outcome.verdict == "fail" else 0
