"""The migration window: --expire-at / --expire-after, after which the bridge stops forwarding.

A bridge forgotten after the migration is an open door to the old Exchange server, so it can close
itself. When the deadline passes, new requests on port 443 get 503 with one sentence saying when the
window closed and how to extend it; requests in progress (RPC channels) get --drain-timeout to finish,
as on SIGTERM, and are then cut. Everything else keeps running: port 80 (ACME challenges, redirects),
certificate renewal, the status page (which shows the window) and /metrics. SIGHUP with a later
deadline (or none) re-opens forwarding.

--expire-after counts from the first time the bridge ran with it, kept in ``STATE_DIR/window-started``,
so a restart (or a crash loop) never extends the window; delete that file to count from the next start.
With --workers the parent resolves the deadline and hands it to the workers as an absolute
--expire-at, so all processes close at the same moment; only the parent logs the warnings.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bridge.config import BridgeConfig, format_moment
from bridge.errors import StartupError

log = logging.getLogger("bridge.window")

STARTED_FILE = "window-started"
WARN_BEFORE = (24 * 3600.0, 3600.0)  # besides the start-up line: warnings 24 h and 1 h before
MAX_SLEEP = 30.0  # re-check the wall clock at least this often (it may be set while the bridge runs)


def closed_sentence(deadline: dt.datetime) -> str:
    """The 503 body after the window has closed (one sentence)."""
    return (
        f"This bridge's migration window closed at {format_moment(deadline)}, so it no longer forwards to Exchange; "
        "to extend it, set a later expire_at (--expire-at) or a longer expire_after in the bridge's configuration and reload it with SIGHUP "
        "(systemctl reload exchange-bridge)."
    )


def human_span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"


def first_start(state_dir: Path, now: float) -> dt.datetime:
    """When the bridge first ran with --expire-after: read from the state dir, or recorded now."""
    from bridge.certs.keys import atomic_write

    path = Path(state_dir) / STARTED_FILE
    try:
        return dt.datetime.fromisoformat(path.read_text().strip()).astimezone(dt.UTC)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.error("%s is unreadable (%s); counting --expire-after from now", path, exc)
    started = dt.datetime.fromtimestamp(now, dt.UTC).replace(microsecond=0)
    try:
        atomic_write(path, (started.isoformat() + "\n").encode(), mode=0o644)
    except OSError as exc:
        raise StartupError(f"Cannot record the start of the migration window in {path} ({exc.strerror or exc}); make the state directory writable or use --expire-at.") from None
    return started


def resolve_deadline(config: BridgeConfig, now: float | None = None) -> tuple[dt.datetime | None, str]:
    """The configuration's deadline (aware UTC) and how it was set, for the logs and the status page."""
    now = time.time() if now is None else now
    if config.expire_at is not None:
        return config.expire_at, "expire_at"
    if config.expire_after is not None:
        started = first_start(config.state_dir, now)
        return started + dt.timedelta(seconds=config.expire_after), f"expire_after {human_span(config.expire_after)} from the first start at {format_moment(started)}"
    return None, ""


class Window:
    """The deadline of one process: closes its proxy (503) and drains its front ends when it passes.

    ``proxy`` (bridge.proxy.relay.Proxy) and ``fronts`` (bridge.net.front.FrontServer) are absent in the
    --workers parent, whose window only keeps time for the logs and the status page. ``announce``:
    this process logs the start-up line and the warnings (one process, or the parent)."""

    def __init__(self, proxy: Any = None, fronts: Iterable[Any] = (), *, announce: bool = True) -> None:
        self.proxy = proxy
        self.fronts = list(fronts)
        self.announce = announce
        self.deadline: dt.datetime | None = None
        self.basis = ""
        self.closed = False
        self.closed_at: dt.datetime | None = None
        self.drain_timeout = 30.0
        self.warned: set[float] = set()
        self.changed = asyncio.Event()
        self.drains: list[asyncio.Task] = []

    def _log(self, level: int, message: str, *args: Any) -> None:
        log.log(level if self.announce else logging.DEBUG, message, *args)

    # ---- the deadline --------------------------------------------------------------------------
    def configure(self, config: BridgeConfig, now: float | None = None, starting: bool = False) -> None:
        """The deadline from ``config`` (at start, and on SIGHUP): logs what changed, closes or re-opens."""
        now = time.time() if now is None else now
        deadline, basis = resolve_deadline(config, now)
        self.drain_timeout = config.drain_timeout
        if not starting and deadline == self.deadline:
            self.basis = basis
            return
        self.deadline, self.basis = deadline, basis
        remaining = self.seconds_left(now)
        self.warned = {before for before in WARN_BEFORE if remaining is not None and remaining <= before}
        if deadline is None:
            if starting:
                self._log(logging.INFO, "no migration window set: the bridge forwards until it is stopped; consider --expire-after 14d or --expire-at DATE so that a forgotten bridge closes itself")
            else:
                self._log(logging.WARNING, "migration window removed (SIGHUP): the bridge forwards until it is stopped")
        elif remaining is not None and remaining > 0:
            self._log(
                logging.WARNING,
                "migration window %s at %s (in %s; %s): then new requests get 503 and open ones get %g s (--drain-timeout)",
                "closes" if starting else "now closes",
                format_moment(deadline),
                human_span(remaining),
                basis,
                config.drain_timeout,
            )
        if self.closed and (remaining is None or remaining > 0):
            self.reopen()
        elif self.closed and deadline is not None and self.proxy is not None:  # still over, at another time
            self.closed_at = deadline
            self.proxy.closed_message = closed_sentence(deadline)
        elif not self.closed and remaining is not None and remaining <= 0:
            self.close()
        self.changed.set()

    def seconds_left(self, now: float | None = None) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline.timestamp() - (time.time() if now is None else now)

    # ---- closing and re-opening ------------------------------------------------------------------
    def close(self) -> None:
        assert self.deadline is not None
        self.closed = True
        self.closed_at = self.deadline
        if self.proxy is not None:
            self.proxy.closed_message = closed_sentence(self.deadline)
        self._log(
            logging.WARNING,
            "migration window closed at %s: new requests get 503, open requests get up to %g s to finish (--drain-timeout); "
            "port 80, certificate renewal and the status page keep running; extend it with a later expire_at and SIGHUP",
            format_moment(self.deadline),
            self.drain_timeout,
        )
        for front in self.fronts:
            task = asyncio.get_running_loop().create_task(self.drain(front), name="window-drain")
            self.drains.append(task)
            task.add_done_callback(self.drains.remove)

    async def drain(self, front: Any) -> None:
        cut = await front.finish_requests(self.drain_timeout)
        if cut:
            log.warning("migration window closed: %d open request%s cut after %g s (--drain-timeout)", cut, "" if cut == 1 else "s", self.drain_timeout)

    def reopen(self) -> None:
        self.closed = False
        self.closed_at = None
        for task in list(self.drains):
            task.cancel()
        if self.proxy is not None:
            self.proxy.closed_message = None
        until = f"until {format_moment(self.deadline)}" if self.deadline is not None else "without an end"
        self._log(logging.WARNING, "migration window re-opened %s (SIGHUP): forwarding again", until)

    # ---- the clock ---------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> float:
        """Warn and close when due; the seconds until something is next due (capped)."""
        remaining = self.seconds_left(now)
        if remaining is None or self.closed:
            return MAX_SLEEP
        if remaining <= 0:
            self.close()
            return MAX_SLEEP
        for before in WARN_BEFORE:
            if remaining <= before and before not in self.warned:
                self.warned.add(before)
                assert self.deadline is not None
                self._log(logging.WARNING, "migration window closes in %s, at %s; to extend it, set a later expire_at and send SIGHUP", human_span(remaining), format_moment(self.deadline))
        due = [remaining] + [remaining - before for before in WARN_BEFORE if before not in self.warned]
        return max(0.01, min(MAX_SLEEP, *due))

    async def run(self) -> None:
        while True:
            self.changed.clear()
            try:
                delay = self.tick()
            except Exception:  # the clock must keep running
                log.exception("migration window check failed")
                delay = MAX_SLEEP
            try:
                await asyncio.wait_for(self.changed.wait(), delay)
            except TimeoutError:
                pass

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """For the status page, /status.json and /metrics."""
        remaining = self.seconds_left(now)
        return {
            "expires_at": self.deadline.isoformat() if self.deadline else None,
            "expires": format_moment(self.deadline) if self.deadline else None,
            "basis": self.basis,
            "seconds_left": None if remaining is None else max(0.0, round(remaining, 1)),
            "expired": self.closed,
        }
