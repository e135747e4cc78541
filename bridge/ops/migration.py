"""The migration's record: the live view the status page shows, and the ledger the hand-over report is made from.

``MigrationView`` lives in the process that owns the status page and the state dir (one process, or
the parent of --workers). Once a second it reads the traffic report (the process's own
``TrafficView``, or the workers' reports added up), feeds the throughput ring from the byte totals
and the ledger from the cumulative counts, and notes the bans and the certificate in use.

The ledger, ``STATE_DIR/ledger.json``, is what `bridge report` reads: the first and last forwarded
request, bytes per user and per day (UTC), failed logons (address, user name, count), bans, the
certificates served, and the bridge's runs. It holds no content and no credentials: user names,
client addresses and byte counts only. It is written atomically at most every --ledger-interval
seconds and at exit, and read back at start, so a restart continues it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.ops.traffic import Throughput, TrafficView, counter_delta, pair_channels

log = logging.getLogger("bridge.migration")

LEDGER_FILE = "ledger.json"
LEDGER_FORMAT = 1
REPORT_NAME = "handover-report"  # STATE_DIR/handover-report.json and .html, written at exit
MIN_CHART_MINUTES = 60
STORED = (
    "Byte counts per user name and day, the first and last forwarded request, failed logons (client address, user name, count), "
    "bans (address, times, reason), the certificates served and the bridge's start and stop times. "
    "No message content, no headers, no passwords, hashes or other credentials are stored."
)


def iso(moment: float | None) -> str | None:
    return None if moment is None else dt.datetime.fromtimestamp(moment, dt.UTC).replace(microsecond=0).isoformat()


def epoch(text: str | None) -> float | None:
    return None if not text else dt.datetime.fromisoformat(text).timestamp()


def day_of(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).date().isoformat()


def ledger_path(state_dir: Path) -> Path:
    return Path(state_dir) / LEDGER_FILE


class Ledger:
    """The persistent counts (see the module's doc); fed with cumulative counts, it stores their gains."""

    def __init__(self, path: Path, data: dict[str, Any] | None = None) -> None:
        self.path = path
        self.data = data or new_ledger()
        self.seen_users: dict[str, list[int]] = {}
        self.seen_failed: dict[tuple[str, str], int] = {}
        self.saved_at = 0.0
        self.dirty = False
        self._certificate_key: tuple[str, float] | None = None
        self._certificate_entry: dict[str, Any] | None = None

    @classmethod
    def load(cls, state_dir: Path) -> Ledger:
        path = ledger_path(state_dir)
        return cls(path, read_ledger(path))

    # ---- what happened -----------------------------------------------------------------------
    def start_run(self, now: float, fqdn: str) -> None:
        self.data["fqdn"] = fqdn
        self.data["runs"].append({"started": iso(now), "last_seen": iso(now), "ended": None})
        self.dirty = True

    def observe(self, report: dict[str, Any], now: float) -> None:
        """The traffic report's cumulative counts: what they gained since the last call is added to today."""
        data = self.data
        today = data["days"].setdefault(day_of(now), {"users": {}, "failed_logons": 0})
        for user, (received, sent) in report["users"].items():
            before = self.seen_users.get(user, [0, 0])
            gained = (counter_delta(received, before[0]), counter_delta(sent, before[1]))
            self.seen_users[user] = [received, sent]
            if gained[0] or gained[1]:
                totals = today["users"].setdefault(user, [0, 0])
                totals[0] += gained[0]
                totals[1] += gained[1]
                self.dirty = True
        failed_entries = data["failed_logons"]
        for address, user, count in report["failed"]:
            gained_count = counter_delta(count, self.seen_failed.get((address, user), 0))
            self.seen_failed[(address, user)] = count
            if gained_count:
                entry = next((item for item in failed_entries if item["address"] == address and item["user"] == user), None)
                if entry is None:
                    entry = {"address": address, "user": user, "count": 0, "last": None}
                    failed_entries.append(entry)
                entry["count"] += gained_count
                entry["last"] = iso(now)
                today["failed_logons"] += gained_count
                self.dirty = True
        for name, pick in (("first_forwarded", min), ("last_forwarded", max)):
            value = report[name]
            if value is None:
                continue
            stored = epoch(data[name])
            chosen = value if stored is None else pick(stored, value)
            if chosen != stored:
                data[name] = iso(chosen)
                self.dirty = True
        if data["runs"]:
            data["runs"][-1]["last_seen"] = iso(now)

    def observe_bans(self, bans: dict[str, Any]) -> None:
        """Active bans (address -> bridge.ops.bans.Ban): each ban is kept once, by address and start."""
        known = {(entry["address"], entry["since"]) for entry in self.data["bans"]}
        for address, ban in bans.items():
            since = iso(ban.since)
            if (address, since) not in known:
                self.data["bans"].append({"address": address, "since": since, "until": iso(ban.until), "reason": ban.reason, "failures": ban.failures})
                self.dirty = True

    def observe_certificate(self, path: Path | None, now: float) -> None:
        """The certificate served (re-read only when the file changes)."""
        if path is None:
            return
        try:
            key = (str(path), Path(path).stat().st_mtime)
        except OSError:
            return
        if key != self._certificate_key:
            try:
                from bridge.certs.keys import inspect_certificate, load_pem_chain

                info = inspect_certificate(load_pem_chain(Path(path))[0])
            except Exception as exc:  # noqa: BLE001 - the ledger must not stop the bridge
                log.debug("certificate not recorded: %s", exc)
                return
            self._certificate_key = key
            entries = self.data["certificates"]
            entry = next((item for item in entries if item["sha256"] == info.sha256), None)
            if entry is None:
                entry = {
                    "subject": info.subject,
                    "names": list(info.sans),
                    "issuer": info.issuer,
                    "serial": info.serial,
                    "sha256": info.sha256,
                    "not_after": info.not_after.isoformat(),
                    "first_used": iso(now),
                    "last_used": iso(now),
                }
                entries.append(entry)
                self.dirty = True
            self._certificate_entry = entry
        if self._certificate_entry is not None:
            self._certificate_entry["last_used"] = iso(now)

    # ---- the file ------------------------------------------------------------------------------
    def save(self, now: float, ended: bool = False) -> None:
        from bridge.certs.keys import atomic_write

        if ended and self.data["runs"]:
            self.data["runs"][-1]["ended"] = iso(now)
        self.data["updated"] = iso(now)
        try:
            atomic_write(self.path, (json.dumps(self.data, indent=1, ensure_ascii=False) + "\n").encode(), mode=0o600)
        except OSError as exc:
            log.error("the ledger %s could not be written (%s); the hand-over report will miss what happened since the last write", self.path, exc.strerror or exc)
            return
        self.saved_at = now
        self.dirty = False

    def maybe_save(self, now: float, interval: float) -> None:
        if self.dirty and now - self.saved_at >= interval:
            self.save(now)

    def user_totals(self) -> dict[str, list[int]]:
        totals: dict[str, list[int]] = {}
        for day in self.data["days"].values():
            for user, (received, sent) in day["users"].items():
                entry = totals.setdefault(user, [0, 0])
                entry[0] += received
                entry[1] += sent
        return totals


def new_ledger() -> dict[str, Any]:
    return {
        "format": LEDGER_FORMAT,
        "stored": STORED,
        "fqdn": "",
        "first_forwarded": None,
        "last_forwarded": None,
        "days": {},
        "failed_logons": [],
        "bans": [],
        "certificates": [],
        "runs": [],
        "updated": None,
    }


def read_ledger(path: Path) -> dict[str, Any]:
    """The ledger file's content; a new one when there is none; an unreadable one is kept aside, not lost."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return new_ledger()
    except (OSError, ValueError) as exc:
        aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        try:
            path.rename(aside)
        except OSError:
            pass
        log.error("the ledger %s is unreadable (%s); kept it as %s and started a new one", path, exc, aside.name)
        return new_ledger()
    ledger = new_ledger()
    if isinstance(data, dict):
        ledger.update({key: value for key, value in data.items() if key in ledger})
    ledger["stored"] = STORED
    return ledger


# --------------------------------------------------------------------------- the live view


class MigrationView:
    """What the status page's migration section shows, and the ledger's feeder (see the module's doc).

    ``source()`` is the traffic report (cumulative counts and live channels); ``bridge`` has ``stats``
    (bytes_in/bytes_out), ``bans``, ``config`` and ``certificate_path``."""

    def __init__(self, bridge: Any, source: Callable[[], dict[str, Any]], local: TrafficView | None = None, clock: Callable[[], float] = time.time) -> None:
        self.bridge = bridge
        self.source = source
        self.local = local  # one process: its own TrafficView, sampled here
        self.clock = clock
        self.started = clock()
        self.throughput = Throughput()
        self.ledger = Ledger.load(bridge.config.state_dir)
        self.ledger.start_run(self.started, bridge.config.fqdn)
        self.finished = False

    def tick(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if self.local is not None:
            self.local.tick(now)
        stats = self.bridge.stats
        self.throughput.observe(now, stats.bytes_in, stats.bytes_out)
        self.ledger.observe(self.source(), now)
        bans = getattr(self.bridge, "bans", None)
        if bans is not None and hasattr(bans, "active"):
            self.ledger.observe_bans(bans.active())
        self.ledger.observe_certificate(getattr(self.bridge, "certificate_path", None) or self.bridge.config.cert, now)
        self.ledger.maybe_save(now, self.bridge.config.ledger_interval)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.tick()
            except Exception:  # the view must never take the bridge down
                log.exception("updating the migration view failed")

    def finish(self) -> list[Path]:
        """At exit: a last sample, the ledger written and the hand-over report beside it (its paths)."""
        if self.finished:
            return []
        self.finished = True
        now = self.clock()
        try:
            self.tick(now)
        except Exception:  # noqa: BLE001 - still write what there is
            log.exception("the last sample of the migration view failed")
        self.ledger.save(now, ended=True)
        from bridge.ops.report import write_report_files

        try:
            paths = write_report_files(self.ledger.data, Path(self.bridge.config.state_dir) / REPORT_NAME)
        except OSError as exc:
            log.error("the hand-over report could not be written (%s); `bridge report` makes it from the ledger", exc.strerror or exc)
            return []
        log.info("hand-over report written to %s (and `bridge report` shows it)", ", ".join(str(path) for path in paths))
        return paths

    def describe(self, now: float | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else now
        report = self.source()
        channels = sorted(report["channels"], key=lambda item: (item["opened"], item["id"]))
        minutes = max(MIN_CHART_MINUTES, min(self.throughput.size, int((now - self.started) // 60) + 1))
        totals = self.ledger.user_totals()
        users: list[dict[str, Any]] = [{"user": user, "bytes_in": received, "bytes_out": sent, "bytes": received + sent} for user, (received, sent) in totals.items()]
        users.sort(key=lambda item: (-item["bytes"], item["user"]))
        total_in = sum(item["bytes_in"] for item in users)
        total_out = sum(item["bytes_out"] for item in users)
        data = self.ledger.data
        return {
            "stall_after": self.bridge.config.stall_after,
            "channels": channels,
            "pairs": pair_channels(channels),
            "channels_open": len(channels),
            "stalled": sum(1 for channel in channels if channel["stalled"]),
            "stalls_total": report["stalls_total"],
            "throughput": {"step": 60, "minutes": [list(row) for row in self.throughput.series(now, minutes)]},
            "users": users,
            "total": {"bytes_in": total_in, "bytes_out": total_out, "bytes": total_in + total_out},
            "first_forwarded": data["first_forwarded"],
            "last_forwarded": data["last_forwarded"],
        }
