"""The access log: one line per request, without the logging module's cost per record.

``logging.Logger.info`` costs a request about as much as parsing its head: it looks up the caller's
frame, builds a ``LogRecord`` (thirty-odd attributes, the thread, the process), takes the handler's
lock, formats the time from scratch and writes and flushes the stream: one system call per line.
``bridge up`` installs an ``AccessLog`` writer instead (``install``): the line is formatted once with
``%`` (the same fields and the same ``asctime LEVEL name: message`` shape as every other line, from a
time stamp made once per second), appended to a list, and the list is written in one call

- on a short timer (``FLUSH_INTERVAL`` after the first line of a batch),
- when ``MAX_LINES`` are waiting,
- when the last open connection ends (the bridge goes idle: ``idle()``),
- before any other log record is written (``FlushingHandler``: the lines stay in time order),
- and at exit (``close()`` after the drain on SIGTERM, and ``atexit`` for any other way out).

Without ``install`` (the tests, a library user) ``write`` hands the line to the ``bridge.access``
logger, so handlers and ``caplog`` see it as before.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
from typing import TextIO

access_logger = logging.getLogger("bridge.access")
INFO = logging.INFO

FLUSH_INTERVAL = 0.25  # seconds a line may wait in the buffer
MAX_LINES = 256  # lines that are written at once, whatever the timer


class AccessLog:
    """The buffered writer of the access-log lines (one per process: ``ACCESS``)."""

    __slots__ = ("stream", "lines", "timer", "prefix", "second", "stamp", "at_exit")

    def __init__(self) -> None:
        self.stream: TextIO | None = None  # None: lines go through the logging module
        self.lines: list[str] = []
        self.timer: asyncio.TimerHandle | None = None
        self.prefix = " INFO bridge.access: "
        self.second = -1
        self.stamp = ""
        self.at_exit = False

    @staticmethod
    def enabled() -> bool:
        """Whether access lines are wanted (the ``bridge.access`` logger at INFO: --log-level info or debug)."""
        return access_logger.isEnabledFor(INFO)

    def install(self, stream: TextIO, name: str = "bridge.access") -> None:
        """Write lines to ``stream`` from now on (buffered), as ``name`` (e.g. with a worker's number)."""
        self.flush()
        self.stream = stream
        self.prefix = f" INFO {name}: "
        if not self.at_exit:
            self.at_exit = True
            atexit.register(self.flush)

    def uninstall(self) -> None:
        self.flush()
        self.stream = None

    def write(self, line: str) -> None:
        """One access-log line (without its time stamp and newline)."""
        stream = self.stream
        if stream is None:
            access_logger.info("%s", line)
            return
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        lines = self.lines
        lines.append(f"{self.stamp},{int((now - second) * 1000):03d}{self.prefix}{line}\n")
        if len(lines) >= MAX_LINES:
            self.flush()
        elif self.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (at exit): at once
                self.flush()
                return
            self.timer = loop.call_later(FLUSH_INTERVAL, self.flush)

    def idle(self) -> None:
        """Nothing is in progress: write what waits now rather than on the timer."""
        if self.lines:
            self.flush()

    def flush(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()
        lines = self.lines
        if not lines:
            return
        self.lines = []
        stream = self.stream
        if stream is None:  # (uninstall() wrote them before; nothing is buffered without a stream)
            return
        try:
            stream.write("".join(lines))
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing better to do with the lines
            pass

    def close(self) -> None:
        """At exit: write everything (called after the drain)."""
        self.flush()


ACCESS = AccessLog()


class FlushingHandler(logging.StreamHandler):
    """The stream handler of ``bridge up``: writes the waiting access lines before its own record, so
    the stream stays in time order."""

    def emit(self, record: logging.LogRecord) -> None:
        if ACCESS.lines and ACCESS.stream is self.stream:
            ACCESS.flush()
        super().emit(record)
