"""The one logging set-up, called once by the root `loramesh` command (and by processes started on their
own, such as `python -m node.cli`): every command logs through the same format, level and handler.

LORAMESH_LOG_LEVEL sets the level of loramesh's own loggers (default INFO: what a service did; a one-shot
command's progress goes to the console, not the log); LORAMESH_LOG_FORMAT=json writes one JSON object
per line for log collectors.
"""

from __future__ import annotations

import json
import logging
import os
import time

# the loggers of our packages; third-party ones stay at WARNING so a service's log says what it did
PACKAGES = ("common", "node", "gateway", "ledger", "devnet")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # what --log-level and LORAMESH_LOG_LEVEL take
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str | int | None = None, fmt: str | None = None) -> None:
    """Set up the root handler once and our packages' level; a second call adjusts the level, and the format
    when it names one (the root command's --log-level and --log-format come after the first call)."""
    level = level or os.environ.get("LORAMESH_LOG_LEVEL", "INFO")
    explicit_fmt = fmt is not None
    fmt = fmt or os.environ.get("LORAMESH_LOG_FORMAT", "text")
    if fmt not in ("text", "json"):
        raise ValueError(f"LORAMESH_LOG_FORMAT must be text or json, got {fmt!r}")
    formatter = JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    elif explicit_fmt:
        for handler in root.handlers:
            handler.setFormatter(formatter)
    if isinstance(level, str):
        level = level.upper()
        if level not in logging.getLevelNamesMapping():  # what logging takes (CRITICAL, WARN too); the four named
            raise ValueError(f"LORAMESH_LOG_LEVEL must be one of {', '.join(LEVELS)}, got {level!r}")
    for name in PACKAGES:
        logging.getLogger(name).setLevel(level)


class Throttled:
    """A log line that strangers can make happen (a bad announcement, a failed stream), written at its level at most
    once every `interval` seconds, the next one saying how many were left out meanwhile; those left out are written
    at DEBUG (LORAMESH_LOG_LEVEL=DEBUG shows each). One line per event let a flood of them fill the disk."""

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0, clock=time.monotonic) -> None:
        self.logger, self.level, self.interval, self.clock = logger, level, interval, clock
        self._last = float("-inf")
        self.left_out = 0

    def __call__(self, msg: str, *args) -> None:
        now = self.clock()
        if now - self._last < self.interval:
            self.left_out += 1
            self.logger.debug(msg, *args)
            return
        if self.left_out:
            msg += " (and %d more like it since the line before, %.0f s ago)"
            args = (*args, self.left_out, now - self._last)
        self._last, self.left_out = now, 0
        self.logger.log(self.level, msg, *args)
