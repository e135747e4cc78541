"""Property-based fuzzing (hypothesis) of request-head handling in-process, a few hundred heads:
bridge.net.front's parser only ever raises HeadRefused (anything else would break the connection
instead of answering), and every head it accepts leaves nothing ambiguous for the legacy server: one
framing, clean names and values, a sane method and target. (tests/integration/test_fuzz_head.py sends
heads through a bridge.)

Bounded for CI: FUZZ_EXAMPLES (default 300) raises the count.
"""

from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, given, settings
from support.fuzz_heads import parse, request_heads

from bridge.protocol.http1 import MAX_HEAD_BYTES, HeadRefused

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(request_heads())
def test_whatever_passes_the_guard_is_unambiguous(data):
    try:
        message = parse(data)
    except HeadRefused as exc:
        assert exc.problem.status in (400, 405, 414, 431, 501, 505)
        return
    if message is None:
        return  # the head is not complete: the connection waits, then answers 408
    assert re.fullmatch(r"[A-Z][A-Z0-9_-]*", message.method) and message.method not in ("CONNECT", "TRACE", "TRACK")
    assert message.version in ((1, 0), (1, 1))
    assert not re.search(r"[\s\x00-\x1f\x7f#]", message.raw_path)
    names = [name.lower() for name, _ in message.raw_headers]
    lengths = [value for name, value in message.raw_headers if name.lower() == b"content-length"]
    codings = [value for name, value in message.raw_headers if name.lower() == b"transfer-encoding"]
    assert not (lengths and codings)
    assert len(lengths) <= 1 and all(value.isdigit() for value in lengths)
    assert codings == [] or [c.lower() for c in codings] == [b"chunked"]
    assert message.chunked == bool(codings) and message.content_length == (int(lengths[0]) if lengths else None)
    assert names.count(b"host") == (1 if message.version == (1, 1) else names.count(b"host")) <= 1
    for name, value in message.raw_headers:
        assert TOKEN.fullmatch(name.decode("latin-1")), name  # no folding, no whitespace in names
        assert not re.search(rb"[\r\n\x00]", value), value
    assert sum(len(line) + 2 for line in message.lines) <= MAX_HEAD_BYTES + 2
