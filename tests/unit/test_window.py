"""The migration window's pure parts: --expire-at and --expire-after parsing, the deadline kept in the
state dir, warnings and closing by the clock (tests/integration/test_window.py runs a real bridge)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import pytest

from bridge.config import BridgeConfig, ConfigError, build_config, format_moment, load_toml, parse_duration, parse_expire_at
from bridge.ops.window import STARTED_FILE, Window, closed_sentence, resolve_deadline

UTC = dt.UTC
BASE = {"fqdn": "ok.example", "legacy": ["a.example"]}


@pytest.mark.parametrize(
    "text, seconds",
    [("90m", 5400), ("72h", 72 * 3600), ("14d", 14 * 86400), ("2w", 14 * 86400), ("1d12h", 36 * 3600), ("30s", 30), ("1.5h", 5400), ("72H", 72 * 3600)],
)
def test_durations(text, seconds):
    assert parse_duration("--expire-after", text) == seconds


@pytest.mark.parametrize("text", ["72", "h", "3 days", "-2h", "0h", "12x", "1d 2", ""])
def test_bad_durations_are_one_sentence(text):
    with pytest.raises(ConfigError) as caught:
        parse_duration("--expire-after", text)
    message = str(caught.value)
    assert message.startswith("--expire-after") and message.endswith(".") and "72h" in message


def test_expire_at_forms():
    # A date alone: the end of that day, UTC (midnight after it).
    assert parse_expire_at("--expire-at", "2025-07-01") == dt.datetime(2025, 7, 2, tzinfo=UTC)
    # A date-time without a zone is UTC; with one it is converted.
    assert parse_expire_at("--expire-at", "2025-07-01T18:00") == dt.datetime(2025, 7, 1, 18, tzinfo=UTC)
    assert parse_expire_at("--expire-at", "2025-07-01T18:00:00Z") == dt.datetime(2025, 7, 1, 18, tzinfo=UTC)
    assert parse_expire_at("--expire-at", "2025-07-01T20:00+02:00") == dt.datetime(2025, 7, 1, 18, tzinfo=UTC)
    assert parse_expire_at("--expire-at", "2025-07-01 18:30") == dt.datetime(2025, 7, 1, 18, 30, tzinfo=UTC)
    # TOML's own date and date-time values.
    assert parse_expire_at("expire_at", dt.date(2025, 7, 1)) == dt.datetime(2025, 7, 2, tzinfo=UTC)
    assert parse_expire_at("expire_at", dt.datetime(2025, 7, 1, 18)) == dt.datetime(2025, 7, 1, 18, tzinfo=UTC)
    assert format_moment(dt.datetime(2025, 7, 1, 18, tzinfo=UTC)) == "2025-07-01 18:00 UTC"
    assert format_moment(dt.datetime(2025, 7, 1, 18, 0, 5, tzinfo=UTC)) == "2025-07-01 18:00:05 UTC"


@pytest.mark.parametrize("text", ["next friday", "2025-13-01", "01/07/2025", "2025-07-01T25:00"])
def test_bad_expire_at_is_one_sentence(text):
    with pytest.raises(ConfigError, match=r"^--expire-at .* is not an ISO 8601 date or date-time; write e\.g\. 2025-07-01"):
        parse_expire_at("--expire-at", text)


def test_expiry_in_toml_and_not_both(tmp_path):
    path = tmp_path / "bridge.toml"
    path.write_text('fqdn = "ok.example"\nlegacy = ["a.example"]\nexpire_at = 2025-07-01\n')
    assert build_config(load_toml(path)).expire_at == dt.datetime(2025, 7, 2, tzinfo=UTC)
    path.write_text('fqdn = "ok.example"\nlegacy = ["a.example"]\nexpire_after = "14d"\n')
    assert build_config(load_toml(path)).expire_after == 14 * 86400
    with pytest.raises(ConfigError, match="give one of them"):
        build_config({**BASE, "expire_at": "2025-07-01", "expire_after": "3d"})


def test_expire_after_counts_from_the_first_start_kept_in_the_state_dir(tmp_path):
    config = BridgeConfig(state_dir=tmp_path, expire_after=3600.0)
    first = 1_750_000_000.0
    deadline, basis = resolve_deadline(config, now=first)
    assert deadline == dt.datetime.fromtimestamp(first + 3600, UTC)
    assert "from the first start at" in basis
    assert (tmp_path / STARTED_FILE).exists()
    # A restart a day later does not extend the window; a longer duration does (counted from the same start).
    assert resolve_deadline(config, now=first + 86400)[0] == deadline
    config.expire_after = 7200.0
    assert resolve_deadline(config, now=first + 86400)[0] == deadline + dt.timedelta(hours=1)
    # --expire-at is absolute and needs no state.
    at = dt.datetime(2030, 1, 1, tzinfo=UTC)
    assert resolve_deadline(BridgeConfig(state_dir=tmp_path / "other", expire_at=at)) == (at, "expire_at")
    assert not (tmp_path / "other").exists()
    assert resolve_deadline(BridgeConfig(state_dir=tmp_path / "other")) == (None, "")


class FakeProxy:
    closed_message = None


class FakeFront:
    def __init__(self) -> None:
        self.drained: list[float] = []

    async def finish_requests(self, timeout: float) -> int:
        self.drained.append(timeout)
        return 0


async def test_window_warns_closes_and_reopens_on_a_later_deadline(tmp_path, caplog):
    caplog.set_level(logging.INFO, "bridge.window")
    now = 1_750_000_000.0
    deadline = dt.datetime.fromtimestamp(now + 2 * 86400, UTC)
    proxy, front = FakeProxy(), FakeFront()
    window = Window(proxy, [front])
    window.configure(BridgeConfig(state_dir=tmp_path, expire_at=deadline, drain_timeout=7), now=now, starting=True)
    assert "migration window closes at" in caplog.text and "(in 2d 0h; expire_at)" in caplog.text
    # The next thing due: the 24-hour warning.
    assert window.tick(now) == pytest.approx(30.0)  # capped
    caplog.clear()
    window.tick(now + 86400 + 1)
    assert "closes in 23h 59m" in caplog.text
    window.tick(now + 86400 + 2)
    assert caplog.text.count("closes in") == 1  # each warning once
    window.tick(now + 2 * 86400 - 3599)
    assert "closes in 59m" in caplog.text
    assert proxy.closed_message is None and not window.describe(now)["expired"]
    window.tick(now + 2 * 86400 + 1)
    await asyncio.sleep(0)
    assert window.closed and proxy.closed_message == closed_sentence(deadline)
    assert front.drained == [7]
    assert window.describe(now + 2 * 86400 + 1) | {"basis": ""} == {
        "expires_at": deadline.isoformat(),
        "expires": format_moment(deadline),
        "basis": "",
        "seconds_left": 0.0,
        "expired": True,
    }
    message = proxy.closed_message
    assert message.count(". ") == 0 and message.endswith(".") and format_moment(deadline) in message and "--expire-at" in message and "SIGHUP" in message

    caplog.clear()
    later = deadline + dt.timedelta(days=1)
    window.configure(BridgeConfig(state_dir=tmp_path, expire_at=later), now=now + 2 * 86400 + 5)
    assert not window.closed and proxy.closed_message is None
    assert "re-opened until" in caplog.text and "now closes at" in caplog.text


async def test_window_without_deadline_recommends_one_and_a_past_one_closes_at_start(tmp_path, caplog):
    caplog.set_level(logging.INFO, "bridge.window")
    Window(FakeProxy()).configure(BridgeConfig(state_dir=tmp_path), starting=True)
    assert "no migration window set" in caplog.text and "--expire-after" in caplog.text
    proxy = FakeProxy()
    window = Window(proxy)
    window.configure(BridgeConfig(state_dir=tmp_path, expire_at=dt.datetime(2020, 1, 1, tzinfo=UTC)), starting=True)
    assert window.closed and "2020-01-01 00:00 UTC" in proxy.closed_message
    # A worker's window (announce=False) logs nothing at INFO or above.
    caplog.clear()
    Window(FakeProxy(), announce=False).configure(BridgeConfig(state_dir=tmp_path, expire_at=dt.datetime(2020, 1, 1, tzinfo=UTC)), starting=True)
    assert not [record for record in caplog.records if record.levelno >= logging.INFO]
