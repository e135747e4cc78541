"""`bridge cert obtain | renew | show`: the certificate by hand, without a running bridge."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from typing import Any

from rich.console import Console

from bridge.certs.acme import AccountStore, Lineage, directory_url, obtain, open_session, reuse_refusal
from bridge.certs.keys import inspect_certificate
from bridge.certs.renewal import ratio_renewal_time, renewal_plan
from bridge.config import BridgeConfig, add_setting_arguments
from bridge.config import config_from_args as settings_from_args
from bridge.errors import AcmeError, StartupError
from bridge.runtime.app import setup_logging, start_redirector


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in (
        ("obtain", "get a certificate unless a usable one is stored (binds --http-port for HTTP-01)"),
        ("renew", "renew the certificate when it is due (or now, with --force)"),
        ("show", "print the stored certificate: subject, names, issuer, serial, expiry, key, files"),
    ):
        action = actions.add_parser(name, help=help_text, description=help_text)
        add_setting_arguments(action, "cert")
        if name == "renew":
            action.add_argument("--force", action="store_true", help="renew even when the certificate is not due")


def config_from_args(args: argparse.Namespace) -> BridgeConfig:
    return settings_from_args(args, "cert", require_fqdn=args.action != "show", require_legacy=False)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    setup_logging(config.log_level)
    if args.action == "show":
        return show(config)
    return asyncio.run(_obtain_or_renew(config, args.action, force=getattr(args, "force", False)))


async def _obtain_or_renew(config: BridgeConfig, action: str, *, force: bool) -> int:
    console = Console(highlight=False, soft_wrap=True)
    lineage = Lineage(config.state_dir, config.fqdn)
    stored = lineage.load()
    url = directory_url(config)
    refusal = reuse_refusal(stored, config, url)
    if action == "obtain" and refusal is None and not force:
        console.print(f"A usable certificate for {config.fqdn} is already stored in {lineage.live}; nothing to do (use `bridge cert renew --force` for a new one).")
        return 0
    if action == "renew" and stored is None:
        raise AcmeError(f"No certificate for {config.fqdn} is stored in {config.state_dir}; run `bridge cert obtain --fqdn {config.fqdn}` first.")
    reason = refusal or "forced renewal"
    if action == "renew" and refusal is None and not force:
        assert stored is not None
        session = await open_session(config)
        plan = await renewal_plan(session, stored.leaf)
        if plan.due > dt.datetime.now(dt.UTC):
            console.print(f"The certificate for {config.fqdn} is not due for renewal until {plan.due:%Y-%m-%d %H:%M} UTC ({plan.basis}); use --force to renew now.")
            return 0
        reason = f"due: {plan.basis}"
    async with _challenge_listener(config) as challenges:
        new = await obtain(config, challenges, reason=reason, replaces=stored.leaf if stored is not None and refusal is None else None)
    info = inspect_certificate(new.leaf)
    console.print(f"[green]Certificate for {config.fqdn} stored[/] in {lineage.live} (serial {info.serial}, valid until {info.not_after:%Y-%m-%d}).")
    console.print("A running bridge picks it up on its next renewal check; reload it now with `systemctl reload exchange-bridge` (SIGHUP).")
    return 0


class _challenge_listener:
    """The bridge's own port-80 responder, alone, for `bridge cert obtain|renew` while the bridge is stopped."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.challenges: dict[str, str] = {}
        self.runner: Any = None

    async def __aenter__(self) -> dict[str, str]:
        try:
            _, self.runner = await start_redirector(self.config, self.challenges)
        except StartupError as exc:
            if "already in use" in str(exc):
                raise AcmeError(
                    f"Port {self.config.http_port} is already in use, most likely by the running bridge, which obtains and renews its certificate by itself; "
                    "stop it first (systemctl stop exchange-bridge) to run this by hand."
                ) from None
            raise
        return self.challenges

    async def __aexit__(self, *exc_info: object) -> None:
        await self.runner.cleanup()


def show(config: BridgeConfig) -> int:
    console = Console(highlight=False, soft_wrap=True)
    names = [config.fqdn] if config.fqdn else sorted(p.name for p in (config.state_dir / "live").glob("*") if (p / "fullchain.pem").exists())
    if not names:
        raise AcmeError(f"No certificate is stored under {config.state_dir / 'live'}; run `bridge cert obtain --fqdn NAME` or start the bridge without --cert/--key.")
    for fqdn in names:
        lineage = Lineage(config.state_dir, fqdn)
        stored = lineage.load()
        if stored is None:
            raise AcmeError(f"No certificate for {fqdn} is stored in {lineage.live}; run `bridge cert obtain --fqdn {fqdn}` or start the bridge.")
        info = inspect_certificate(stored.leaf)
        days = info.days_left
        colour = "red" if days <= 14 else "yellow" if days <= 30 else "green"
        renew_at = ratio_renewal_time(info.not_before, info.not_after)
        account = AccountStore(config.state_dir, stored.meta["directory"]).dir if stored.meta.get("directory") else None
        rows = [
            ("Certificate", f"[bold]{fqdn}[/]"),
            ("Subject", info.subject),
            ("SANs", ", ".join(info.sans)),
            ("Issuer", info.issuer),
            ("Serial", info.serial),
            ("Not before", f"{info.not_before:%Y-%m-%d %H:%M} UTC"),
            ("Not after", f"{info.not_after:%Y-%m-%d %H:%M} UTC"),
            ("Days left", f"[{colour}]{int(days)}[/]"),
            ("Renewal due", f"{renew_at:%Y-%m-%d %H:%M} UTC (a third of the lifetime left, or earlier if the CA's renewal information says so)"),
            ("Key type", info.key_type),
            ("ACME CA", stored.meta.get("directory", "unknown")),
            ("fullchain", str(lineage.fullchain)),
            ("privkey", str(lineage.privkey)),
            ("cert", str(lineage.cert)),
            ("chain", str(lineage.chain)),
            ("Account", str(account) if account else "unknown"),
        ]
        for label, value in rows:
            console.print(f"[cyan]{label + ':':<13}[/] {value}")
    return 0
