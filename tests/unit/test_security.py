"""`bridge ban` on the state directory's ban file (tests/integration/test_security.py attacks a bridge)."""

from __future__ import annotations

import re
from pathlib import Path

from bridge import cli


def test_ban_command_line_lists_adds_and_removes(tmp_path, capsys):
    state = str(tmp_path / "state")
    assert cli.main(["ban", "list", "--state-dir", state]) == 0
    assert "no active bans" in capsys.readouterr().out
    assert cli.main(["ban", "add", "2001:db8::7", "--duration", "120", "--state-dir", state]) == 0
    assert cli.main(["ban", "add", "::ffff:203.0.113.9", "--state-dir", state]) == 0
    capsys.readouterr()
    assert cli.main(["ban", "list", "--state-dir", state]) == 0
    listing = capsys.readouterr().out
    assert "2001:db8::7" in listing and "203.0.113.9" in listing
    assert re.search(r"2001:db8::7\s+(1m5\ds|2m00s) left", listing)
    assert (Path(state) / "bans.json").stat().st_mode & 0o777 == 0o600
    assert cli.main(["ban", "remove", "2001:db8::7", "--state-dir", state]) == 0
    assert cli.main(["ban", "remove", "2001:db8::7", "--state-dir", state]) == 1
    assert cli.main(["ban", "add", "not-an-address", "--state-dir", state]) == 2
    assert "is not an IPv4 or IPv6 address" in capsys.readouterr().err
