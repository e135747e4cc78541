"""``--allow exchange-online``: Microsoft's published Exchange Online address ranges, and `bridge allow`.

The keyword stays a word in the configuration; ``expand_allow`` turns it into networks wherever an
allow-list is applied (the HTTPS front end at start, on SIGHUP, and the --workers parent for its
workers). The ranges come from one of two files, whichever has the later ``date`` (the state
directory's on a tie):

- ``bridge/ops/data/exchange-online.json``, the snapshot shipped in the package;
- ``STATE_DIR/exchange-online.json``, written by `bridge allow refresh` from Microsoft's endpoints
  web service (``https://endpoints.office.com/endpoints/worldwide?clientrequestid=<uuid>``: a JSON
  list of endpoint sets, of which the ``ips`` of every set with ``serviceArea`` ``Exchange`` count).

Both have the shape ``{"source": URL, "date": "YYYY-MM-DD", "ranges": ["40.92.0.0/15", ...]}``.
A refreshed list is validated (each entry an address range, not empty, a plausible count, nothing
implausibly broad) before it is written, atomically; a refresh that fails writes nothing and says why
in one sentence, so the last good list stays in force. A running bridge notices the new file by its
modification time within ``WATCH_INTERVAL`` seconds and applies it to new connections (no signal or
pid needed: the refresh may run as another user, from cron or by hand); SIGHUP re-reads it too.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.config import EXCHANGE_ONLINE, Network
from bridge.errors import AllowListError

log = logging.getLogger("bridge.allow")

PACKAGED = Path(__file__).resolve().parent / "data" / "exchange-online.json"
STATE_FILE = "exchange-online.json"
ENDPOINTS_URL = "https://endpoints.office.com/endpoints/worldwide"
SERVICE_AREA = "Exchange"
MIN_RANGES, MAX_RANGES = 3, 2000  # Microsoft's Exchange list has had a few dozen entries for years
MIN_PREFIX = {4: 8, 6: 16}  # anything broader is not one provider's range
MAX_ANSWER = 8 * 1024 * 1024
WATCH_INTERVAL = 5.0


@dataclass(frozen=True)
class RangeList:
    source: str
    date: str
    ranges: tuple[Network, ...]
    path: Path

    @property
    def packaged(self) -> bool:
        return self.path == PACKAGED

    def counts(self) -> tuple[int, int]:
        v4 = sum(1 for network in self.ranges if network.version == 4)
        return v4, len(self.ranges) - v4


# --------------------------------------------------------------------------- validation (pure)


def validate_ranges(items: Iterable[Any], where: str) -> tuple[Network, ...]:
    """The ranges ``where`` lists, as sorted unique networks; AllowListError (one sentence naming
    ``where``, ending in what the bridge does instead) when they are not a plausible Exchange list."""
    networks: set[Network] = set()
    for item in items:
        try:
            network = ipaddress.ip_network(str(item).strip(), strict=False)
        except ValueError:
            raise AllowListError(f"{where} lists {str(item)[:60]!r}, which is not an address range{KEEPS}") from None
        if network.prefixlen < MIN_PREFIX[network.version]:
            raise AllowListError(f"{where} lists {network}, which is implausibly broad for Exchange Online{KEEPS}")
        networks.add(network)
    if not networks:
        raise AllowListError(f"{where} lists no Exchange address ranges{KEEPS}")
    if not MIN_RANGES <= len(networks) <= MAX_RANGES:
        raise AllowListError(f"{where} lists {len(networks)} Exchange address ranges, which is implausible (expected {MIN_RANGES} to {MAX_RANGES}){KEEPS}")
    return tuple(sorted(networks, key=lambda network: (network.version, network)))


KEEPS = "; the bridge keeps its current list."  # the end of every refusal sentence


def exchange_ips(data: bytes, where: str) -> list[str]:
    """The ``ips`` of every endpoint set with serviceArea Exchange in the web service's JSON answer."""
    try:
        sets = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AllowListError(f"{where} did not answer JSON ({str(exc)[:80]}){KEEPS}") from None
    if not isinstance(sets, list) or not all(isinstance(entry, dict) for entry in sets):
        raise AllowListError(f"{where} did not answer a JSON list of endpoint sets{KEEPS}")
    ips: list[str] = []
    for entry in sets:
        if str(entry.get("serviceArea", "")).lower() == SERVICE_AREA.lower():
            listed = entry.get("ips") or []
            ips.extend(listed if isinstance(listed, list) else [listed])
    if not ips:
        raise AllowListError(f"{where} lists no Exchange address ranges{KEEPS}")
    return ips


def expand_allow(allow: Iterable[Network | str], state_dir: Path) -> tuple[Network, ...]:
    """--allow with its keywords replaced by their ranges (the networks as they are)."""
    networks: list[Network] = []
    for entry in allow:
        if entry == EXCHANGE_ONLINE:
            networks.extend(current_list(state_dir).ranges)
        elif not isinstance(entry, str):
            networks.append(entry)
    return tuple(dict.fromkeys(networks))


# --------------------------------------------------------------------------- the files


def read_list(path: Path) -> RangeList:
    """A stored list; AllowListError when it is unreadable or not a plausible list."""
    where = f"{path}"
    try:
        data = json.loads(path.read_bytes())
        ranges, source, date = data["ranges"], str(data.get("source", "")), str(data.get("date", ""))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AllowListError(f"{where} is not a readable range list ({type(exc).__name__}){KEEPS}") from None
    return RangeList(source, date, validate_ranges(ranges, where), path)


_cache: dict[Path, tuple[int, RangeList | None]] = {}  # path -> (mtime_ns, its list or None when unusable)


def _cached(path: Path) -> RangeList | None:
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    hit = _cache.get(path)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    try:
        loaded: RangeList | None = read_list(path)
    except (AllowListError, OSError) as exc:
        log.error("%s", exc)
        loaded = None
    _cache[path] = (mtime, loaded)
    return loaded


def current_list(state_dir: Path) -> RangeList:
    """The list --allow exchange-online means now: the later-dated of the packaged snapshot and the
    state directory's refreshed copy (the refreshed one on a tie, or when the snapshot is unreadable)."""
    refreshed = _cached(Path(state_dir) / STATE_FILE)
    packaged = _cached(PACKAGED)
    if packaged is None:
        if refreshed is None:
            raise AllowListError(f"Neither {PACKAGED} nor {Path(state_dir) / STATE_FILE} holds a usable Exchange Online list; reinstall the package or run `bridge allow refresh`.")
        return refreshed
    if refreshed is not None and refreshed.date >= packaged.date:
        return refreshed
    return packaged


def describe(allow: Iterable[Network | str], state_dir: Path) -> dict[str, Any]:
    """The allow-list for the status page: its entries and, with exchange-online, the list's date and source."""
    entries = [str(entry) for entry in allow]
    info: dict[str, Any] = {"sources": entries, "exchange_online": None}
    if EXCHANGE_ONLINE in entries:
        try:
            ranges = current_list(state_dir)
        except AllowListError as exc:
            info["exchange_online"] = {"error": str(exc)}
        else:
            v4, v6 = ranges.counts()
            info["exchange_online"] = {"date": ranges.date, "source": ranges.source, "ranges": len(ranges.ranges), "ipv4": v4, "ipv6": v6, "file": str(ranges.path), "packaged": ranges.packaged}
    return info


class RangeWatcher:
    """Notices a refreshed STATE_DIR/exchange-online.json (by its modification time) and calls ``on_change``."""

    def __init__(self, state_dir: Path, on_change: Callable[[], None]) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self.on_change = on_change
        self.seen = self._stamp()

    def _stamp(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def check(self) -> bool:
        stamp = self._stamp()
        if stamp == self.seen:
            return False
        self.seen = stamp
        try:
            self.on_change()
        except Exception:  # housekeeping must never die
            log.exception("applying the refreshed Exchange Online list failed")
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            self.check()


def apply_to_guard(bridge: Any) -> None:
    """The refreshed list reaches a one-process bridge's HTTPS allow-list (new connections)."""
    config = bridge.config
    if EXCHANGE_ONLINE not in config.allow or bridge.guard is None:
        return
    networks = expand_allow(config.allow, config.state_dir)
    bridge.guard.apply(networks, config.max_connections, config.header_timeout)
    announce_list(config.state_dir, "applied")


def announce_list(state_dir: Path, verb: str) -> None:
    ranges = current_list(state_dir)
    v4, v6 = ranges.counts()
    log.info("Exchange Online ranges %s: %d IPv4 and %d IPv6 ranges of %s from %s", verb, v4, v6, ranges.date, "the packaged snapshot" if ranges.packaged else ranges.path)


# --------------------------------------------------------------------------- `bridge allow refresh`


def endpoints_url(url: str | None) -> str:
    """--endpoints-url as given, else Microsoft's worldwide instance with a fresh client request id."""
    if url:
        return url
    query = urllib.parse.urlencode({"serviceAreas": SERVICE_AREA, "clientrequestid": str(uuid.uuid4())})
    return f"{ENDPOINTS_URL}?{query}"


def fetch_ranges(url: str, timeout: float = 20.0, ca_bundle: Path | None = None) -> tuple[Network, ...]:
    """Fetch and validate the Exchange ranges from the endpoints web service at ``url``."""
    parts = urllib.parse.urlsplit(url)
    where = f"The endpoints service at {parts.scheme}://{parts.netloc}{parts.path}"
    context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "exchange-bridge"})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            data = response.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as exc:
        raise AllowListError(f"{where} answered HTTP {exc.code}{KEEPS}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise AllowListError(f"{where} is unreachable ({reason}){KEEPS}") from None
    if len(data) > MAX_ANSWER:
        raise AllowListError(f"{where} answered more than {MAX_ANSWER // 1024 // 1024} MiB, which is not the endpoints list{KEEPS}")
    return validate_ranges(exchange_ips(data, where), where)


def store(state_dir: Path, source: str, ranges: tuple[Network, ...], today: dt.date | None = None) -> Path:
    from bridge.certs.keys import atomic_write

    path = Path(state_dir) / STATE_FILE
    day = today or dt.datetime.now(dt.UTC).date()
    document = {
        "note": f"Exchange Online address ranges fetched from Microsoft's endpoints web service by `bridge allow refresh` on {day.isoformat()}.",
        "source": source,
        "date": day.isoformat(),
        "ranges": [str(network) for network in ranges],
    }
    atomic_write(path, (json.dumps(document, indent=1) + "\n").encode(), mode=0o644)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("refresh", "show"), help="fetch the current Exchange Online ranges into the state dir, or show the list in use")
    parser.add_argument("--state-dir", type=Path, help="the bridge's state directory (default: as for bridge up)")
    parser.add_argument("--config", type=Path, help="the bridge's TOML config, to find state_dir")
    parser.add_argument("--endpoints-url", metavar="URL", help=f"the endpoints web service (default: Microsoft's worldwide instance, {ENDPOINTS_URL}?serviceAreas=Exchange&clientrequestid=<new uuid>)")
    parser.add_argument("--ca-bundle", type=Path, metavar="FILE", help="trust for the endpoints service (default: the system store)")
    parser.add_argument("--timeout", type=float, default=20.0, metavar="S", help="seconds to wait for the endpoints service (default 20)")


def run(args: argparse.Namespace) -> int:
    from bridge.config import load_settings

    state_dir = args.state_dir or load_settings(args.config).state_dir
    if args.action == "show":
        listed = current_list(state_dir)
        v4, v6 = listed.counts()
        print(f"Exchange Online ranges of {listed.date} from {listed.source}")
        print(f"  file: {listed.path}{' (packaged snapshot)' if listed.packaged else ''}; {v4} IPv4 and {v6} IPv6 ranges")
        for network in listed.ranges:
            print(f"  {network}")
        return 0
    url = endpoints_url(args.endpoints_url)
    try:
        before: set[Network] = set(current_list(state_dir).ranges)
    except AllowListError:
        before = set()
    ranges = fetch_ranges(url, args.timeout, args.ca_bundle)
    path = store(state_dir, url, ranges)
    added, removed = len(set(ranges) - before), len(before - set(ranges))
    v4 = sum(1 for network in ranges if network.version == 4)
    print(
        f"stored {len(ranges)} Exchange Online ranges ({v4} IPv4, {len(ranges) - v4} IPv6; {added} added, {removed} removed) in {path}; "
        f"a running bridge applies them to new connections within {WATCH_INTERVAL:g} s"
    )
    return 0
