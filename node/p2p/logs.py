"""Route py-libp2p's logger into ours.

`import libp2p` sets its logger to propagate=False with no handler, so its warnings reach stderr
through logging.lastResort, bypassing the node's logging config (notes/libp2p.md, pitfall 7).
We forward its records into `node.p2p.libp2p` instead, demoting known-benign noise to DEBUG.
"""

from __future__ import annotations

import logging
import os

TARGET = "node.p2p.libp2p"
# Messages py-libp2p logs as warnings during normal operation (peers closing DHT or pubsub streams).
BENIGN = (
    "Failed to read DHT message",
    "Stream closed",
    "stream reset",
    "Error reading from stream",
    "Connection closed",
    "add_conn failed",  # two peers dialling each other at once: one connection loses, harmlessly
)


class _Forward(logging.Handler):
    def __init__(self, min_level: int) -> None:
        super().__init__()
        self.min_level = min_level

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < self.min_level:  # some libp2p modules set their own INFO level
            return
        msg = record.getMessage()
        if record.levelno < logging.ERROR and any(b.lower() in msg.lower() for b in BENIGN):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        if record.levelno < logging.ERROR and self.min_level > logging.DEBUG:
            record.exc_info = record.exc_text = None  # a library warning is one line; LIBP2P_DEBUG shows the rest
        target = logging.getLogger(TARGET)
        if target.isEnabledFor(record.levelno):
            target.handle(record)


def route_libp2p_logging() -> None:
    """Forward the `libp2p` logger's records to `node.p2p.libp2p` (idempotent)."""
    lib = logging.getLogger("libp2p")
    if any(isinstance(h, _Forward) for h in lib.handlers):
        return
    debug = bool(os.environ.get("LIBP2P_DEBUG"))
    if not debug:
        lib.handlers.clear()
        lib.setLevel(logging.WARNING)
    lib.propagate = False
    lib.addHandler(_Forward(logging.DEBUG if debug else logging.WARNING))
