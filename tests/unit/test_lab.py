"""The lab's deterministic RPC payload (tests/integration/test_lab.py talks to the lab)."""

from __future__ import annotations

import hashlib

from bridge.lab.server import lab_payload, payload_sha256


def test_lab_payload_is_deterministic_and_indexed():
    size = 5 * 65536 + 17
    chunks = list(lab_payload(size))
    assert sum(map(len, chunks)) == size
    assert [int.from_bytes(chunk[:8], "big") for chunk in chunks] == list(range(6))
    assert chunks[0][8:] == chunks[1][8:]
    assert payload_sha256(size) == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert payload_sha256(size, seed=1) != payload_sha256(size)
