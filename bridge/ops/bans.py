"""Brute-force protection: failed logons per client address, bans kept in the state dir.

A failure is the legacy server answering 401 to a request that carried credentials: Basic, or the
final message of an NTLM/Negotiate handshake (an NTLM type 3 message, or a Negotiate token that
is not the first of its handshake). ``threshold`` failures within ``window`` seconds ban the
address for ``duration`` seconds: the proxy answers 403 without contacting the legacy server.

Bans live in ``STATE_DIR/bans.json`` (written atomically), so they survive restarts, and
``bridge ban list | add IP | remove IP`` edits that file; a running bridge notices within a second.
``--ban-command`` runs ``COMMAND ban IP SECONDS`` / ``COMMAND unban IP`` for each ban and unban
(also at start, for bans still active, so firewall sets that do not survive a reboot are refilled).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import shlex
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bridge.certs.keys import atomic_write
from bridge.config import plain_address
from bridge.errors import ConfigError

log = logging.getLogger("bridge.bans")

BANS_FILE = "bans.json"
MAX_TRACKED_ADDRESSES = 50_000
REFRESH_INTERVAL = 1.0
SWEEP_INTERVAL = 5.0
HOOK_TIMEOUT = 30.0


# --------------------------------------------------------------------------- the file


@dataclass
class Ban:
    until: float  # epoch seconds
    since: float
    failures: int = 0
    reason: str = ""

    def remaining(self, now: float | None = None) -> float:
        return self.until - (time.time() if now is None else now)


def bans_path(state_dir: Path) -> Path:
    return Path(state_dir) / BANS_FILE


def load_bans(path: Path) -> dict[str, Ban] | None:
    """The bans in the file ({} when there is none); None when it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.error("cannot read %s (%s); fix or delete it", path, exc)
        return None
    bans = {}
    for address, entry in (data.get("bans") or {}).items():
        try:
            bans[address] = Ban(float(entry["until"]), float(entry.get("since", 0)), int(entry.get("failures", 0)), str(entry.get("reason", "")))
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed ban entry for %s in %s", address, path)
    return bans


def save_bans(path: Path, bans: dict[str, Ban]) -> None:
    data = {"version": 1, "bans": {address: asdict(ban) for address, ban in sorted(bans.items())}}
    atomic_write(path, (json.dumps(data, indent=1) + "\n").encode(), mode=0o600)


def file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def normalise_address(text: str) -> str:
    """A typed address as the ban file keeps it (ValueError when it is not one)."""
    return str(ipaddress.ip_address(plain_address(text.strip())))


# --------------------------------------------------------------------------- the live guard


@dataclass
class BanPolicy:
    threshold: int
    window: float
    duration: float
    command: str | None = None
    never_ban: tuple[Any, ...] = ()  # ip networks


class BanGuard:
    """Counts failures, decides bans, keeps bans.json and the running bridge in step."""

    def __init__(self, state_dir: Path, policy: BanPolicy) -> None:
        self.path = bans_path(state_dir)
        self.policy = policy
        self.failures: dict[str, deque[float]] = {}
        self.bans: dict[str, Ban] = {}
        self.signature: tuple[int, int, int] | None = None
        self.next_refresh = 0.0
        self.failures_total = 0
        self.bans_total = 0
        self.refused_total = 0
        self.failures_by_protocol: Counter[str] = Counter()  # http, imap, ...: which protocol's logons failed
        self._hooks: set[asyncio.Task] = set()
        self.refresh(force=True, announce=False)

    # ---- queries on the request path --------------------------------------------------------
    def has_bans(self) -> bool:
        """Whether any address is banned (no counting; the proxy's fast path asks this)."""
        self.refresh()
        return bool(self.bans)

    def is_banned(self, address: str) -> bool:
        self.refresh()
        address = plain_address(address)
        ban = self.bans.get(address)
        if ban is None or self.exempt(address):
            return False
        if ban.remaining() <= 0:
            self.expire()
            return False
        self.refused_total += 1
        return True

    def exempt(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.policy.never_ban)

    def record_failure(self, address: str, protocol: str = "http") -> Ban | None:
        """Count one failed logon (an HTTP 401, a mail protocol's refused logon); returns the new Ban
        when this one crossed the threshold. Every protocol counts towards the same ban."""
        self.failures_total += 1
        self.failures_by_protocol[protocol] += 1
        address = plain_address(address)
        if not address or self.exempt(address) or address in self.bans:
            return None
        now = time.monotonic()
        recent = self.failures.pop(address, None) or deque()
        self.failures[address] = recent  # re-inserted last: the dict is oldest-first
        recent.append(now)
        while recent and recent[0] < now - self.policy.window:
            recent.popleft()
        while len(self.failures) > MAX_TRACKED_ADDRESSES:
            del self.failures[next(iter(self.failures))]
        # One line per counted failure, nothing a client chose in it (scripts/fail2ban reads it).
        log.info("failed logon from %s over %s (%d of %d within %g s)", address, protocol, len(recent), self.policy.threshold, self.policy.window)
        if len(recent) < self.policy.threshold:
            return None
        count = len(recent)
        del self.failures[address]
        reason = f"{count} failed logons in {self.policy.window:g} s" + ("" if protocol == "http" else f" (the last over {protocol})")
        ban = self.add(address, self.policy.duration, reason, failures=count)
        log.warning("banned %s for %g s after %s", address, self.policy.duration, reason)
        return ban

    # ---- changes --------------------------------------------------------------------------------
    def add(self, address: str, duration: float, reason: str, failures: int = 0) -> Ban:
        self.refresh(force=True)
        now = time.time()
        ban = Ban(until=now + duration, since=now, failures=failures, reason=reason)
        self.bans[address] = ban
        self.bans_total += 1
        self.persist()
        self.run_hook("ban", address, duration)
        return ban

    def remove(self, address: str) -> bool:
        self.refresh(force=True)
        if self.bans.pop(address, None) is None:
            return False
        self.persist()
        self.run_hook("unban", address)
        return True

    def expire(self) -> list[str]:
        """Drop bans whose time is up (and run the unban hook for each)."""
        now = time.time()
        ended = [address for address, ban in self.bans.items() if ban.until <= now]
        if not ended:
            return []
        self.refresh(force=True)
        ended = [address for address, ban in self.bans.items() if ban.until <= now]
        for address in ended:
            del self.bans[address]
            log.info("ban on %s ended", address)
            self.run_hook("unban", address)
        self.persist()
        return ended

    def persist(self) -> None:
        try:
            save_bans(self.path, self.bans)
        except OSError as exc:
            log.error("cannot write %s (%s); bans are kept in memory only", self.path, exc)
            return
        self.signature = file_signature(self.path)

    def refresh(self, force: bool = False, announce: bool = True) -> None:
        """Pick up edits made by `bridge ban` (checked at most once a second)."""
        now = time.monotonic()
        if not force and now < self.next_refresh:
            return
        self.next_refresh = now + REFRESH_INTERVAL
        signature = file_signature(self.path)
        if signature == self.signature:
            return
        self.signature = signature
        on_disk = load_bans(self.path)
        if on_disk is None:
            return  # unreadable: keep the bans we know
        if announce:
            for address in on_disk.keys() - self.bans.keys():
                log.warning("ban on %s added by hand (%s)", address, on_disk[address].reason or "no reason given")
                self.run_hook("ban", address, max(on_disk[address].remaining(), 0))
            for address in self.bans.keys() - on_disk.keys():
                log.info("ban on %s removed by hand", address)
                self.run_hook("unban", address)
        self.bans = on_disk

    # ---- hooks and housekeeping ---------------------------------------------------------------
    def run_hook(self, action: str, address: str, seconds: float | None = None) -> None:
        if not self.policy.command:
            return
        argv = shlex.split(self.policy.command) + [action, address] + ([str(int(seconds))] if seconds is not None else [])
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not serving (e.g. `bridge ban`): the running bridge runs the hook when it notices
        task = loop.create_task(_run_command(argv))
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)

    def restore_hooks(self) -> None:
        """At start: re-run the ban hook for every active ban (firewall sets may not survive a reboot)."""
        self.expire()
        for address, ban in self.bans.items():
            self.run_hook("ban", address, max(ban.remaining(), 0))

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self.refresh()
                self.expire()
            except Exception:  # housekeeping must never die
                log.exception("ban housekeeping failed")

    async def wait_for_hooks(self, timeout: float = 5.0) -> None:
        if self._hooks:
            await asyncio.wait(list(self._hooks), timeout=timeout)

    def active(self) -> dict[str, Ban]:
        now = time.time()
        return {address: ban for address, ban in self.bans.items() if ban.until > now}


async def _run_command(argv: list[str]) -> None:
    try:
        process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        log.error("--ban-command %s could not start (%s); fix the command", argv[0], exc.strerror or exc)
        return
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), HOOK_TIMEOUT)
    except TimeoutError:
        process.kill()
        log.error("--ban-command %s did not finish within %g s and was killed", " ".join(argv), HOOK_TIMEOUT)
        return
    if process.returncode != 0:
        log.error("--ban-command %s exited with %d: %s", " ".join(argv), process.returncode, stderr.decode(errors="replace").strip()[:300])


def policy_from_config(config: Any) -> BanPolicy:
    return BanPolicy(
        threshold=config.ban_threshold,
        window=config.ban_window,
        duration=config.ban_duration,
        command=config.ban_command,
        never_ban=tuple(config.never_ban),
    )


# --------------------------------------------------------------------------- `bridge ban`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "add", "remove"), help="list the bans, ban an address, or lift a ban")
    parser.add_argument("address", nargs="?", help="the IPv4 or IPv6 address (for add and remove)")
    parser.add_argument("--duration", type=float, default=None, metavar="S", help="ban length in seconds for add (default: the bridge's --ban-duration, 3600)")
    parser.add_argument("--reason", default="added by hand", help="note kept with the ban")
    parser.add_argument("--state-dir", type=Path, help="the bridge's state directory (default: as for bridge up)")
    parser.add_argument("--config", type=Path, help="the bridge's TOML config, to find state_dir and ban_duration")


def _settings(args: argparse.Namespace) -> tuple[Path, float]:
    from bridge.config import load_settings

    settings = load_settings(args.config)
    state_dir = args.state_dir or settings.state_dir
    duration = args.duration if args.duration is not None else settings.ban_duration
    if duration <= 0:
        raise ConfigError(f"--duration {duration:g} is not a positive number of seconds; give e.g. --duration 3600.")
    return state_dir, duration


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    state_dir, duration = _settings(args)
    path = bans_path(state_dir)
    bans = load_bans(path)
    if bans is None:
        raise ConfigError(f"Cannot read {path}; run as the bridge's user (or root), or fix the file.")
    now = time.time()
    if args.action == "list":
        active = {address: ban for address, ban in bans.items() if ban.until > now}
        if not active:
            console.print(f"no active bans ({path})")
            return 0
        for address, ban in sorted(active.items(), key=lambda item: item[1].until):
            console.print(f"{address:<40} {_left(ban.until - now):>9} left  {ban.reason}", highlight=False)
        return 0
    if not args.address:
        raise ConfigError(f"`bridge ban {args.action}` needs an address, e.g. bridge ban {args.action} 203.0.113.7.")
    try:
        address = normalise_address(args.address)
    except ValueError:
        raise ConfigError(f"{args.address!r} is not an IPv4 or IPv6 address; give one such as 203.0.113.7.") from None
    if args.action == "add":
        bans[address] = Ban(until=now + duration, since=now, reason=args.reason)
        _save(path, bans)
        console.print(f"banned {address} for {_left(duration)} ({path}); a running bridge applies it within a second", highlight=False)
        return 0
    if bans.pop(address, None) is None:
        console.print(f"{address} is not banned", highlight=False)
        return 1
    _save(path, bans)
    console.print(f"lifted the ban on {address}; a running bridge applies it within a second", highlight=False)
    return 0


def _save(path: Path, bans: dict[str, Ban]) -> None:
    try:
        save_bans(path, bans)
        if os.geteuid() == 0:  # keep the file the bridge's own (the state dir's owner) when root edits it
            owner = path.parent.stat()
            os.chown(path, owner.st_uid, owner.st_gid)
    except PermissionError:
        raise ConfigError(f"Cannot write {path}: permission denied; run as the bridge's user (or root).") from None


def _left(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def summary(bans: Iterable[tuple[str, Ban]]) -> list[dict[str, Any]]:
    now = time.time()
    return [{"address": address, "seconds_left": int(ban.until - now), "failures": ban.failures, "reason": ban.reason} for address, ban in sorted(bans, key=lambda item: item[1].until)]
