"""Background renewal of the ACME certificate, swapped into the live SSLContext without dropping connections.

When: inside the CA's ACME Renewal Information window (RFC 9773) when the directory offers it, else when a
third of the lifetime is left (half for lifetimes under 10 days). Failures are logged as errors and retried
with a growing back-off; from 14 days before expiry every check warns.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from bridge.certs.acme import AcmeSession, Lineage, StoredCertificate, obtain, open_session
from bridge.certs.keys import inspect_certificate
from bridge.config import BridgeConfig
from bridge.errors import AcmeError, CertificateError
from bridge.net.tls import fingerprint, load_front_certificate

log = logging.getLogger("bridge.renewal")

SHORT_LIFETIME = dt.timedelta(days=10)
EXPIRY_WARNING_DAYS = 14
CHECK_INTERVAL = 6 * 3600.0  # re-read renewal information and the files at least this often
RETRY_FIRST = 60.0
RETRY_MAX = 3 * 3600.0
MIN_RENEWAL_INTERVAL = 3600.0  # a CA window that keeps saying "now" must not turn into a renewal loop


def ratio_renewal_time(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """A third of the lifetime left (half when the lifetime is under 10 days)."""
    lifetime = not_after - not_before
    return not_after - (lifetime / 2 if lifetime < SHORT_LIFETIME else lifetime / 3)


@dataclass
class RenewalPlan:
    due: dt.datetime
    basis: str
    next_check: float  # seconds until the plan should be made again


async def renewal_plan(session: AcmeSession | None, cert: x509.Certificate, now: dt.datetime | None = None) -> RenewalPlan:
    """When to renew cert: a random moment in the CA's ARI window if it offers one, else by lifetime."""
    now = now or dt.datetime.now(dt.UTC)
    ratio_due = ratio_renewal_time(cert.not_valid_before_utc, cert.not_valid_after_utc)
    fallback = RenewalPlan(ratio_due, "a third of the lifetime left", CHECK_INTERVAL)
    if session is None:
        return fallback
    try:
        window = await asyncio.to_thread(session.renewal_window, cert)
    except AcmeError as exc:
        log.warning("renewal information unavailable, renewing by lifetime: %s", exc)
        return fallback
    if window is None:
        return fallback
    due = window.start + (window.end - window.start) * random.random()
    basis = f"the CA's renewal window {window.start:%Y-%m-%d %H:%M} to {window.end:%Y-%m-%d %H:%M} UTC"
    if window.explanation:
        basis += f", see {window.explanation}"
    return RenewalPlan(due, basis, window.retry_after)


def retry_delay(failures: int) -> float:
    """Growing back-off after failed renewals: 1, 2, 4 ... minutes, at most 3 hours."""
    return min(RETRY_FIRST * 2 ** max(failures - 1, 0), RETRY_MAX)


def expiry_warning(cert: x509.Certificate, now: dt.datetime | None = None) -> str | None:
    info = inspect_certificate(cert)
    now = now or dt.datetime.now(dt.UTC)
    days = (info.not_after - now).total_seconds() / 86400
    if days > EXPIRY_WARNING_DAYS:
        return None
    if days <= 0:
        return f"the certificate for {info.sans[0] if info.sans else info.subject} EXPIRED on {info.not_after:%Y-%m-%d %H:%M} UTC; clients refuse the bridge until a renewal succeeds"
    return (
        f"the certificate for {info.sans[0] if info.sans else info.subject} expires in {days:.1f} days ({info.not_after:%Y-%m-%d %H:%M} UTC) "
        "and has not been renewed yet; fix the renewal error logged above or run `bridge cert renew --force`"
    )


class Renewer:
    """Keeps the served certificate fresh: plans, renews with back-off, hot-swaps into ssl_context."""

    def __init__(self, config: BridgeConfig, challenges: dict[str, str], ssl_context: ssl.SSLContext, *, check_interval: float = CHECK_INTERVAL) -> None:
        self.config = config
        self.challenges = challenges
        self.ssl_context = ssl_context
        self.check_interval = check_interval
        self.lineage = Lineage(config.state_dir, config.fqdn)
        self.failures = 0
        self.renewals = 0
        self.last_renewal: float | None = None  # loop.time() of the last successful renewal
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.loaded = self._on_disk()

    def _on_disk(self) -> str | None:
        stored = self.lineage.load()
        return fingerprint(stored.leaf.public_bytes(Encoding.DER)) if stored else None

    async def run(self) -> None:
        while True:
            try:
                delay = await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end renewals for the rest of the migration
                self.failures += 1
                delay = retry_delay(self.failures)
                log.exception("certificate renewal check failed; next attempt in %.0f s", delay)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass
            self._wake.clear()

    async def check(self) -> float:
        """One round: pick up files renewed elsewhere, plan, renew when due; returns seconds to the next round."""
        self.reload_if_changed()
        stored = self.lineage.load()
        if stored is None:
            renewed = await self.renew(reason="the stored certificate disappeared")
            return 1.0 if renewed else retry_delay(self.failures)
        try:
            session: AcmeSession | None = await open_session(self.config)
        except AcmeError as exc:
            log.warning("cannot reach the CA to read renewal information (%s); renewing by lifetime", exc)
            session = None
        plan = await renewal_plan(session, stored.leaf)
        warning = expiry_warning(stored.leaf)
        if warning:
            log.warning(warning)
        now = dt.datetime.now(dt.UTC)
        if plan.due <= now:
            since = None if self.last_renewal is None else asyncio.get_running_loop().time() - self.last_renewal
            if since is not None and since < MIN_RENEWAL_INTERVAL:
                log.warning("renewal is due again (%s) only %.0f s after the last one; waiting an hour between renewals", plan.basis, since)
                return MIN_RENEWAL_INTERVAL - since
            if await self.renew(reason=f"due: {plan.basis}", stored=stored):
                return 1.0
            return retry_delay(self.failures)
        log.debug("certificate for %s due for renewal at %s (%s)", self.config.fqdn, f"{plan.due:%Y-%m-%d %H:%M}", plan.basis)
        return max(1.0, min((plan.due - now).total_seconds(), plan.next_check, self.check_interval))

    async def renew(self, *, reason: str = "forced renewal", stored: StoredCertificate | None = None) -> bool:
        """Order a new certificate now and swap it in; False (logged loudly) when the CA or the files fail."""
        async with self._lock:
            stored = stored or self.lineage.load()
            try:
                await obtain(self.config, self.challenges, reason=reason, replaces=stored.leaf if stored else None)
                self.swap()
            except (AcmeError, CertificateError) as exc:
                self.failures += 1
                expires = f"; the certificate in use expires {stored.leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC" if stored else ""
                log.error("CERTIFICATE RENEWAL FAILED for %s (attempt %d): %s Next attempt in %.0f s%s.", self.config.fqdn, self.failures, exc, retry_delay(self.failures), expires)
                return False
            self.failures = 0
            self.renewals += 1
            self.last_renewal = asyncio.get_running_loop().time()
            return True

    def swap(self) -> None:
        """Load live/<fqdn>/ into the running context: new handshakes get it, open connections keep theirs."""
        load_front_certificate(self.ssl_context, self.lineage.fullchain, self.lineage.privkey)
        self.loaded = self._on_disk()
        stored = self.lineage.load()
        if stored is not None:
            info = inspect_certificate(stored.leaf)
            log.info("now serving certificate serial %s for %s (valid until %s) to new connections; open connections continue", info.serial, self.config.fqdn, f"{info.not_after:%Y-%m-%d}")

    def reload_if_changed(self) -> None:
        """Pick up a certificate renewed by `bridge cert renew` (or restored by hand)."""
        on_disk = self._on_disk()
        if on_disk is not None and on_disk != self.loaded:
            log.info("the certificate in %s changed on disk; loading it", self.lineage.live)
            self.swap()

    def reload(self) -> None:
        """SIGHUP: re-read the files now and re-plan the renewal."""
        self.swap()
        self._wake.set()
