"""Addresses as the ban file keeps them (tests/integration/test_status.py runs the status page)."""

from __future__ import annotations

from bridge.ops.bans import normalise_address


def test_normalised_addresses_for_ban_files():
    assert normalise_address("::ffff:192.0.2.1") == "192.0.2.1"
    assert normalise_address(" 2001:DB8::1 ") == "2001:db8::1"
