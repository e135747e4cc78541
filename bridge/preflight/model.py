"""What a preflight run produces: checks, the settings they ran with, the report; the TLS versions probed.

Kept apart from the checks (bridge.preflight.checks) so the HTTP checks, the mail checks
(bridge.preflight.mail) and the renderers (bridge.preflight.report) share it without importing each other.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config import LegacyServer, PassthroughRoute
from bridge.preflight.probe import Credentials

SCHEMA = "exchange-bridge-preflight/1"
STATUSES = ("pass", "warn", "fail", "skip")
DEFAULT_TIMEOUT = 10.0
DEFAULT_HOLD = 5.0

TLS_VERSIONS = (
    ("TLS 1.0", ssl.TLSVersion.TLSv1),
    ("TLS 1.1", ssl.TLSVersion.TLSv1_1),
    ("TLS 1.2", ssl.TLSVersion.TLSv1_2),
    ("TLS 1.3", ssl.TLSVersion.TLSv1_3),
)
VERSION_NAMES = {"TLSv1": "TLS 1.0", "TLSv1.1": "TLS 1.1", "TLSv1.2": "TLS 1.2", "TLSv1.3": "TLS 1.3"}
ENUMERATION_CIPHERS = "ALL:@SECLEVEL=0"


# --------------------------------------------------------------------------- results


@dataclass
class Check:
    id: str
    side: str  # "legacy" | "bridge"
    status: str  # pass | warn | fail | skip
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    fix: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "side": self.side, "status": self.status, "summary": self.summary, "details": self.details, "fix": self.fix}


@dataclass
class Settings:
    legacy: LegacyServer
    fqdn: str | None = None
    expect_ip: str | None = None
    bridge_addr: str | None = None
    https_port: int = 443
    http_port: int = 80
    ca_bundle: Path | None = None
    credentials: Credentials | None = None
    auth: str = "both"
    timeout: float = DEFAULT_TIMEOUT
    hold: float = DEFAULT_HOLD
    legacy_fingerprint: str | None = None  # pinned in the bridge config: compared with what is served
    exchange_server: str | None = None  # --exchange-server: the RPC checks' target when Autodiscover cannot tell
    routes: list[PassthroughRoute] = field(default_factory=list)  # the bridge's --passthrough routes (from its --config)
    terminate: list[str] = field(default_factory=list)  # the bridge's --terminate names
    other_legacy: list[LegacyServer] = field(default_factory=list)  # further servers in --config, not probed
    mail: list[Any] = field(default_factory=list)  # --imap/--pop3/--smtp: bridge.preflight.mail.MailTarget each


@dataclass
class Report:
    settings: Settings
    checks: list[Check]
    started: dt.datetime
    duration: float
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        statuses = {check.status for check in self.checks}
        if "fail" in statuses:
            return "fail"
        return "warn" if "warn" in statuses else "pass"

    def by_side(self, side: str) -> list[Check]:
        return [check for check in self.checks if check.side == side]

    def get(self, check_id: str) -> Check | None:
        return next((check for check in self.checks if check.id == check_id), None)


def worst(statuses: list[str]) -> str:
    for status in ("fail", "warn", "pass"):
        if status in statuses:
            return status
    return "skip"
