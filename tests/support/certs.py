"""Certificates for tests that need one with a given lifetime, from a throwaway CA."""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509

from bridge.certs.keys import LocalCA, new_private_key


def local_certificate(days_total: float, days_left: float, fqdn: str = "policy.acme.test") -> tuple[x509.Certificate, Any]:
    """A certificate for fqdn valid for days_total days of which days_left remain, and its key."""
    ca = LocalCA.create()
    key = new_private_key("ecdsa-p256")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=days_total - days_left)
    return ca.issue([fqdn], key, days=days_total, not_before=start), key
