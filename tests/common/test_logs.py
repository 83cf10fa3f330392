"""common.logs.Throttled: a line strangers can cause is written at most once an interval, and says what it left out."""

from __future__ import annotations

import logging

from common.logs import Throttled


def test_a_throttled_line_is_written_once_an_interval_and_counts_the_rest(caplog):
    now = [100.0]
    log = logging.getLogger("common.test_throttled")
    line = Throttled(log, logging.WARNING, interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.DEBUG, logger=log.name):
        for i in range(5):
            line("stream from %s failed", f"peer{i}")
        now[0] += 9.9
        line("stream from %s failed", "peer5")
        now[0] += 0.2
        line("stream from %s failed", "peer6")
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno > logging.DEBUG] == [
        (logging.WARNING, "stream from peer0 failed"),
        (logging.WARNING, "stream from peer6 failed (and 5 more like it since the line before, 10 s ago)"),
    ]
    # each line left out is there at DEBUG, for an operator who asks for it
    left_out = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert left_out == [f"stream from peer{i} failed" for i in range(1, 6)]
