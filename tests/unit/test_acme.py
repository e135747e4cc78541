"""Certificate renewal policy and storage, in-process: when to renew, back-off, the expiry warning, and
the lineage's atomic swap of key and chain (tests/integration/test_acme.py talks to a real ACME server)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from support.certs import local_certificate

from bridge.certs.acme import Lineage
from bridge.certs.keys import cert_pem, key_pem, new_private_key
from bridge.certs.renewal import expiry_warning, ratio_renewal_time, retry_delay
from bridge.net.tls import front_context

# ------------------------------------------------------------------------------------------ renewal policy


def test_renewal_time_is_a_third_of_the_lifetime_left_or_half_for_short_lifetimes() -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert ratio_renewal_time(start, start + dt.timedelta(days=90)) == start + dt.timedelta(days=60)
    assert ratio_renewal_time(start, start + dt.timedelta(days=45)) == start + dt.timedelta(days=30)
    assert ratio_renewal_time(start, start + dt.timedelta(days=6)) == start + dt.timedelta(days=3)


def test_retry_back_off_grows_and_is_capped() -> None:
    delays = [retry_delay(n) for n in range(1, 12)]
    assert delays[:4] == [60, 120, 240, 480]
    assert all(a <= b for a, b in zip(delays, delays[1:], strict=False))
    assert delays[-1] == 3 * 3600


def test_expiry_warning_from_fourteen_days() -> None:
    assert expiry_warning(local_certificate(90, 20)[0]) is None
    warning = expiry_warning(local_certificate(90, 10)[0])
    assert warning and "expires in 10.0 days" in warning


# ------------------------------------------------------------------------------------------ storage


def test_storage_swaps_key_and_chain_together_and_survives_a_crash_mid_write(tmp_path: Path) -> None:
    fqdn = "store.acme.test"
    lineage = Lineage(tmp_path, fqdn)
    first, first_key = local_certificate(90, 80, fqdn)
    lineage.save(cert_pem(first).decode(), key_pem(first_key), {"key_type": "ecdsa-p256"})
    assert lineage.live.is_symlink() and (tmp_path / "archive" / fqdn).stat().st_mode & 0o777 == 0o700
    assert lineage.privkey.stat().st_mode & 0o777 == 0o600

    # A crash after writing the next version's key but before the live link moved: live still pairs up.
    crashed = tmp_path / "archive" / fqdn / "0002"
    crashed.mkdir()
    (crashed / "privkey.pem").write_bytes(key_pem(new_private_key("ecdsa-p256")))
    stored = lineage.load()
    assert stored is not None and stored.leaf == first
    front_context(lineage.fullchain, lineage.privkey)  # raises CertificateError when key and chain do not match

    second, second_key = local_certificate(90, 80, fqdn)
    lineage.save(cert_pem(second).decode(), key_pem(second_key), {"key_type": "ecdsa-p256"})
    assert os.readlink(lineage.live).endswith("0003")
    assert lineage.load().leaf == second  # type: ignore[union-attr]
    front_context(lineage.fullchain, lineage.privkey)
    assert not list(lineage.live.parent.glob(".*")), "no temporary link may be left behind"


def test_mail_fqdn_is_a_second_name_a_stored_certificate_must_cover(tmp_path: Path) -> None:
    from bridge.certs.acme import StoredCertificate, reuse_refusal
    from bridge.config import build_config

    config = build_config({"fqdn": "bridge.acme.test", "legacy": "a.example", "mail_fqdn": "imap.acme.test"}, require_legacy=False)
    assert config.certificate_names == ["bridge.acme.test", "imap.acme.test"]
    cert, _ = local_certificate(90, 80, "bridge.acme.test")
    stored = StoredCertificate(chain=[cert], meta={})
    assert reuse_refusal(stored, config, "https://acme.test/dir") == "the stored certificate covers bridge.acme.test, not imap.acme.test"
    config.mail_fqdn = None
    assert reuse_refusal(stored, config, "https://acme.test/dir") is None
