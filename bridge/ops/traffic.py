"""The migration view: Outlook Anywhere channels as they run, throughput over time, totals per user.

Each serving process (one process, or each --workers worker) keeps a ``TrafficView`` fed by the
proxy through ``BridgeStats``: ``begin``/``end`` of every request, and the first bytes of each
``RPC_IN_DATA``/``RPC_OUT_DATA`` body as they pass (``opening_observer``: the first RTS PDU, CONN/A1 or
CONN/B1, is copied aside, at most ``MAX_OPENING`` bytes, while the body goes on unchanged and
undelayed). Its virtual connection cookie pairs a channel's IN and OUT sides; without one
(a body that is not RTS, or a channel opened by something else) channels pair by client connection.

The user is the one the request's credentials name (Basic's user, the DOMAIN\\user of an NTLM
AUTHENTICATE message, bare or inside Negotiate; ``bridge.protocol.auth.user_of``), else the one that
last logged on over the same client connection (NTLM authenticates connections). No password, hash
or challenge response is read or kept; the Authorization header is not stored either (only its hash,
to skip parsing a header seen before on the connection).

Once a second ``tick`` samples every open channel: the bytes moved since the last sample go to its
user and its rate meter (bytes over the last minute), and a channel with no byte moved for
--stall-after is flagged stalled (counted, logged once at WARNING). Short requests are counted at
their end. ``report()`` is the plain data a worker sends its parent every second; ``merge_reports``
adds the workers' reports up in the parent.

Throughput over time is ``Throughput``: a fixed ring of per-minute byte counts (24 hours), fed from
the process's cumulative byte totals, so the parent of --workers feeds it from the workers' sums.
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

from bridge.protocol import rts
from bridge.protocol.auth import carries_final_credentials, user_of

log = logging.getLogger("bridge.traffic")

RPC_METHODS = frozenset({"RPC_IN_DATA", "RPC_OUT_DATA"})
MINUTES = 24 * 60  # the throughput ring: one slot per minute for 24 hours
RATE_WINDOW = 60.0  # a channel's rate: bytes over the last minute
SAMPLE_INTERVAL = 1.0
MAX_OPENING = 1024  # an RTS PDU longer than this is not CONN/A1 or CONN/B1
NOBODY = "-"  # the user of requests without credentials (a handshake's first leg, anonymous paths)
USER_KEY = "traffic-user"
AUTH_KEY = "traffic-auth"
CONNECTION_KEY = "traffic-connection"
MAX_NAMES = 10_000  # distinct users (and failed-logon address/user pairs) kept apart; more are added up under OTHERS
OTHERS = "(others)"


# --------------------------------------------------------------------------- pure pieces


def counter_delta(now: int, before: int) -> int:
    """What a cumulative counter gained since ``before``; a counter that went backwards (a restarted
    worker's) has started again from zero."""
    return now - before if now >= before else now


def rate_over(samples: Iterable[tuple[float, int]], now: float, window: float = RATE_WINDOW) -> float:
    """Bytes per second over the last ``window`` seconds from (time, cumulative bytes) samples, oldest
    first: the newest sample against the newest one at least ``window`` old (or the oldest, for a
    channel younger than the window). 0 without two samples apart in time."""
    items = list(samples)
    if len(items) < 2:
        return 0.0
    newest_time, newest = items[-1]
    base_time, base = items[0]
    for sample_time, value in items:
        if sample_time <= now - window:
            base_time, base = sample_time, value
        else:
            break
    elapsed = newest_time - base_time
    return max(0, newest - base) / elapsed if elapsed > 0 else 0.0


def opening_cookie(pdu: bytes) -> tuple[str, str] | None:
    """("CONN/A1" or "CONN/B1", virtual connection cookie in hex) of a channel's first PDU, else None."""
    try:
        name = rts.classify(pdu)
        if name == "CONN/A1":
            return name, rts.parse_conn_a1(pdu).virtual_connection_cookie.hex
        if name == "CONN/B1":
            return name, rts.parse_conn_b1(pdu).virtual_connection_cookie.hex
    except (rts.RpcProtocolError, ValueError, TypeError, IndexError, struct.error):
        return None
    return None


class OpeningReader:
    """Collects a body's first RTS PDU from the pieces that pass (copies, never holds them back)."""

    __slots__ = ("data", "done", "result")

    def __init__(self) -> None:
        self.data = b""
        self.done = False
        self.result: tuple[str, str] | None = None

    def feed(self, piece: bytes) -> bool:
        """Take a piece of the body; True while more is needed."""
        if self.done:
            return False
        self.data += piece[: MAX_OPENING - len(self.data)]
        data = self.data
        if len(data) < rts.RTS_HEADER_SIZE:
            if len(data) >= MAX_OPENING:
                self.done = True
            return not self.done
        (length,) = struct.unpack_from("<H", data, 8)
        if data[0] != rts.RPC_VERS or data[2] != rts.PTYPE_RTS or not rts.RTS_HEADER_SIZE <= length <= MAX_OPENING:
            self.finish(None)
            return False
        if len(data) < length:
            return True
        self.finish(opening_cookie(data[:length]))
        return False

    def finish(self, result: tuple[str, str] | None) -> None:
        self.result, self.done, self.data = result, True, b""


class Throughput:
    """Bytes moved per minute over the last ``size`` minutes, in a fixed ring (no growth, no files)."""

    def __init__(self, size: int = MINUTES) -> None:
        self.size = size
        self.bytes_in = [0] * size
        self.bytes_out = [0] * size
        self.minute: int | None = None  # the newest minute (epoch seconds // 60) the ring holds
        self.seen = (0, 0)  # the cumulative totals last observed (they start at zero with the process)

    def advance(self, minute: int) -> None:
        if self.minute is None:
            self.minute = minute
            return
        if minute <= self.minute:
            return
        for step in range(self.minute + 1, min(minute, self.minute + self.size) + 1):
            self.bytes_in[step % self.size] = self.bytes_out[step % self.size] = 0
        self.minute = minute

    def add(self, now: float, received: int, sent: int) -> None:
        minute = int(now // 60)
        self.advance(minute)
        assert self.minute is not None
        if minute <= self.minute - self.size:
            return  # older than the ring
        slot = minute % self.size
        self.bytes_in[slot] += received
        self.bytes_out[slot] += sent

    def observe(self, now: float, total_in: int, total_out: int) -> None:
        """Feed from cumulative totals: what they gained since the last call goes to this minute."""
        received, sent = counter_delta(total_in, self.seen[0]), counter_delta(total_out, self.seen[1])
        self.seen = (total_in, total_out)
        if received or sent:
            self.add(now, received, sent)
        else:
            self.advance(int(now // 60))

    def series(self, now: float, minutes: int | None = None) -> list[tuple[int, int, int]]:
        """(minute start, epoch seconds; bytes in; bytes out) for the last ``minutes`` minutes, oldest first, this minute last."""
        current = int(now // 60)
        self.advance(current)
        count = min(self.size, minutes or self.size)
        rows = []
        for minute in range(current - count + 1, current + 1):
            slot = minute % self.size
            rows.append((minute * 60, self.bytes_in[slot], self.bytes_out[slot]))
        return rows


# --------------------------------------------------------------------------- one process's channels


class ChannelRecord:
    """One RPC_IN_DATA or RPC_OUT_DATA request in progress."""

    __slots__ = ("number", "exchange", "direction", "client", "user", "target", "connection", "opened", "opening", "samples", "attributed", "last_moved", "stalled", "warned")

    def __init__(self, number: int, exchange: Any, direction: str, client: str, user: str, target: str, connection: int, now: float) -> None:
        self.number = number
        self.exchange = exchange
        self.direction = direction  # "IN" (RPC_IN_DATA: client to server) or "OUT"
        self.client = client
        self.user = user
        self.target = target  # the RPC proxy target, server:port
        self.connection = connection  # the client connection's number in this process
        self.opened = now
        self.opening = OpeningReader()
        self.samples: deque[tuple[float, int]] = deque([(now, 0)])
        self.attributed = (0, 0)  # bytes in and out already added to the user's totals
        self.last_moved = now
        self.stalled = False
        self.warned = False

    @property
    def cookie(self) -> str | None:
        return self.opening.result[1] if self.opening.result else None

    def describe(self, now: float) -> dict[str, Any]:
        exchange = self.exchange
        cookie = self.cookie
        return {
            "id": self.number,
            "pair": f"vc:{cookie}" if cookie else f"conn:{self.connection}",
            "paired_by": "cookie" if cookie else "connection",
            "direction": self.direction,
            "client": self.client,
            "user": self.user,
            "target": self.target,
            "bytes_in": exchange.bytes_in,
            "bytes_out": exchange.bytes_out,
            "bytes": exchange.bytes_in + exchange.bytes_out,
            "rate": round(rate_over(self.samples, now), 1),
            "opened": self.opened,
            "age_seconds": round(now - self.opened, 1),
            "idle_seconds": round(now - self.last_moved, 1),
            "stalled": self.stalled,
        }


class TrafficView:
    """One serving process's live channels and cumulative totals per user (see the module's doc)."""

    def __init__(self, stall_after: float = 600.0, clock: Callable[[], float] = time.time) -> None:
        self.stall_after = stall_after
        self.clock = clock
        self.channels: dict[int, ChannelRecord] = {}
        self.users: dict[str, list[int]] = {}  # user -> [bytes in, bytes out], cumulative
        self.failed: Counter[tuple[str, str]] = Counter()  # (address, user) -> failed logons
        self.first_forwarded: float | None = None
        self.last_forwarded: float | None = None
        self.stalls_total = 0
        self._numbers = itertools.count(1)
        self._connections = itertools.count(1)

    # ---- the proxy's hooks (through BridgeStats) ----------------------------------------------
    def user_for(self, request: Any, client: Any) -> str:
        """The user a request's credentials name, else the last logon on its client connection."""
        data = client.state.data if client is not None else {}
        authorization = request.header("Authorization")
        if authorization:
            key = hash(authorization)
            if data.get(AUTH_KEY) != key:
                data[AUTH_KEY] = key
                named = user_of(authorization)
                if named is not None:
                    data[USER_KEY] = named
        return data.get(USER_KEY, NOBODY)

    def begin(self, request: Any, exchange: Any, client: Any) -> None:
        if request.method not in RPC_METHODS:
            return
        now = self.clock()
        data = client.state.data if client is not None else {}
        connection = data.get(CONNECTION_KEY)
        if connection is None:
            connection = data[CONNECTION_KEY] = next(self._connections)
        target = request.raw_path.partition("?")[2]
        record = ChannelRecord(
            next(self._numbers),
            exchange,
            "IN" if request.method == "RPC_IN_DATA" else "OUT",
            client.peer if client is not None else "",
            self.user_for(request, client),
            target[:200],
            connection,
            now,
        )
        self.channels[id(exchange)] = record

    def opening_observer(self, exchange: Any) -> Callable[[bytes], bool] | None:
        """For an RPC channel's request body: a callable taking each piece as it passes, True while it
        wants more (the first RTS PDU); None for other requests."""
        record = self.channels.get(id(exchange))
        return record.opening.feed if record is not None else None

    def end(self, request: Any, exchange: Any, client: Any) -> None:
        now = self.clock()
        record = self.channels.pop(id(exchange), None)
        if record is not None:
            user, (done_in, done_out) = record.user, record.attributed
        else:
            user, done_in, done_out = self.user_for(request, client), 0, 0
        if exchange.status == 401:  # a refused logon moves bytes for nobody (and names nobody for the connection)
            if carries_final_credentials(request.header("Authorization")):
                key = (client.peer if client is not None else "", user)
                self.failed[key if key in self.failed or len(self.failed) < MAX_NAMES else (OTHERS, OTHERS)] += 1
            if client is not None:
                client.state.data.pop(USER_KEY, None)
            user = NOBODY
        self._add(user, exchange.bytes_in - done_in, exchange.bytes_out - done_out)
        self._forwarded(exchange, now)

    def _forwarded(self, exchange: Any, now: float) -> None:
        """The migration window's ends: a request that reached the legacy server."""
        if exchange.upstream == "-":
            return
        if self.first_forwarded is None:
            self.first_forwarded = now - (time.monotonic() - exchange.started)
        self.last_forwarded = now

    def _add(self, user: str, received: int, sent: int) -> None:
        if not (received or sent):
            return
        totals = self.users.get(user)
        if totals is None:
            if len(self.users) >= MAX_NAMES:
                user = OTHERS
            totals = self.users.setdefault(user, [0, 0])
        totals[0] += received
        totals[1] += sent

    # ---- once a second -----------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        for record in self.channels.values():
            exchange = record.exchange
            received, sent = exchange.bytes_in, exchange.bytes_out
            done_in, done_out = record.attributed
            moved = received - done_in + sent - done_out
            if moved:
                self._add(record.user, received - done_in, sent - done_out)
                record.attributed = (received, sent)
                record.last_moved = now
                record.stalled = False
            elif not record.stalled and now - record.last_moved >= self.stall_after:
                record.stalled = True
                self.stalls_total += 1
                if not record.warned:
                    record.warned = True
                    log.warning(
                        "RPC channel %s %s of %s from %s (user %s) stalled: no byte moved for %d s (--stall-after)",
                        record.direction,
                        record.target or "-",
                        record.cookie or f"connection {record.connection}",
                        record.client,
                        record.user,
                        int(now - record.last_moved),
                    )
            samples = record.samples
            samples.append((now, received + sent))
            while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW:
                samples.popleft()
            self._forwarded(exchange, now)

    def report(self, now: float | None = None) -> dict[str, Any]:
        """Plain data (picklable, JSON-able): the channels and the cumulative counts."""
        now = self.clock() if now is None else now
        return {
            "channels": [record.describe(now) for record in self.channels.values()],
            "users": {user: list(totals) for user, totals in self.users.items()},
            "failed": [[address, user, count] for (address, user), count in self.failed.items()],
            "first_forwarded": self.first_forwarded,
            "last_forwarded": self.last_forwarded,
            "stalls_total": self.stalls_total,
        }


# --------------------------------------------------------------------------- adding reports up


def empty_report() -> dict[str, Any]:
    return {"channels": [], "users": {}, "failed": [], "first_forwarded": None, "last_forwarded": None, "stalls_total": 0}


def merge_reports(reports: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Several processes' reports as one: channels side by side (a channel paired by connection gets
    its process's ``prefix``: connection numbers are per process; cookies are global, so the IN and
    OUT channels of one virtual connection pair across workers), counts added up."""
    merged = empty_report()
    failed: Counter[tuple[str, str]] = Counter()
    for prefix, report in reports:
        for channel in report["channels"]:
            if channel["paired_by"] == "connection" and prefix:
                channel = dict(channel, pair=f"{prefix}{channel['pair']}")
            merged["channels"].append(channel)
        for user, (received, sent) in report["users"].items():
            totals = merged["users"].setdefault(user, [0, 0])
            totals[0] += received
            totals[1] += sent
        for address, user, count in report["failed"]:
            failed[(address, user)] += count
        for name, pick in (("first_forwarded", min), ("last_forwarded", max)):
            value = report[name]
            if value is not None:
                merged[name] = value if merged[name] is None else pick(merged[name], value)
        merged["stalls_total"] += report["stalls_total"]
    merged["failed"] = [[address, user, count] for (address, user), count in failed.items()]
    return merged


def pair_channels(channels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Channels grouped by virtual connection (cookie) or client connection: one entry per pair with
    its ``in`` and ``out`` channels (a list each: a recycled channel may briefly have two), ordered by
    when the pair opened."""
    pairs: dict[str, dict[str, Any]] = {}
    for channel in sorted(channels, key=lambda item: (item["opened"], item["id"])):
        entry = pairs.setdefault(channel["pair"], {"pair": channel["pair"], "paired_by": channel["paired_by"], "client": channel["client"], "user": channel["user"], "in": [], "out": []})
        entry["in" if channel["direction"] == "IN" else "out"].append(channel)
        if entry["user"] == NOBODY and channel["user"] != NOBODY:
            entry["user"] = channel["user"]
    return list(pairs.values())
