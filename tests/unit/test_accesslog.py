"""bridge.net.accesslog: the buffered access-log writer (no sockets; no timing asserted)."""

from __future__ import annotations

import asyncio
import io
import logging
import re

import pytest

from bridge.net import accesslog
from bridge.net.accesslog import AccessLog, FlushingHandler

LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO bridge\.access: (.*)\n")


def test_without_a_stream_lines_go_through_the_logging_module(caplog):
    caplog.set_level(logging.INFO, logger="bridge.access")
    writer = AccessLog()
    writer.write("203.0.113.9 GET /owa 200 in=0 out=5 0.001s upstream=a:443")
    assert [r.getMessage() for r in caplog.records if r.name == "bridge.access"] == ["203.0.113.9 GET /owa 200 in=0 out=5 0.001s upstream=a:443"]


def test_lines_wait_for_the_timer_then_leave_in_one_write():
    stream = io.StringIO()
    writer = AccessLog()
    writer.install(stream)

    async def scenario() -> None:
        writer.write("one")
        writer.write("two")
        assert stream.getvalue() == "" and writer.timer is not None
        await asyncio.sleep(accesslog.FLUSH_INTERVAL * 2)
        assert [LINE.fullmatch(line + "\n").group(1) for line in stream.getvalue().splitlines()] == ["one", "two"]  # type: ignore[union-attr]
        assert writer.timer is None

    asyncio.run(scenario())
    writer.uninstall()


def test_a_full_buffer_is_written_at_once_and_idle_and_close_write_the_rest():
    stream = io.StringIO()
    writer = AccessLog()
    writer.install(stream, "bridge.access[worker 2]")

    async def scenario() -> None:
        for number in range(accesslog.MAX_LINES):
            writer.write(f"line {number}")
        assert stream.getvalue().count("\n") == accesslog.MAX_LINES
        writer.write("after")
        assert stream.getvalue().count("\n") == accesslog.MAX_LINES
        writer.idle()
        assert stream.getvalue().endswith(" INFO bridge.access[worker 2]: after\n")
        writer.write("last")
        writer.close()
        assert stream.getvalue().endswith(": last\n") and writer.timer is None

    asyncio.run(scenario())


def test_without_a_running_loop_a_line_is_written_at_once():
    stream = io.StringIO()
    writer = AccessLog()
    writer.install(stream)
    writer.write("at exit")
    assert LINE.fullmatch(stream.getvalue()).group(1) == "at exit"  # type: ignore[union-attr]


def test_other_log_records_come_after_the_waiting_access_lines(monkeypatch):
    stream = io.StringIO()
    writer = AccessLog()
    monkeypatch.setattr(accesslog, "ACCESS", writer)
    writer.install(stream)
    handler = FlushingHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("bridge.test-accesslog")
    logger.addHandler(handler)
    logger.propagate = False
    try:

        async def scenario() -> None:
            writer.write("request one")
            logger.warning("something else")
            writer.write("request two")
            writer.close()

        asyncio.run(scenario())
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["request one", "something else", "request two"]


@pytest.mark.parametrize("broken", [ValueError, OSError])
def test_a_broken_stream_loses_the_lines_but_never_raises(broken):
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise broken("closed")

    writer = AccessLog()
    writer.install(Broken())
    writer.write("lost")
    assert writer.lines == []
