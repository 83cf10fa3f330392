"""Serving an ASGI app until SIGINT/SIGTERM, shutting down gracefully, and exiting 0 after a clean stop.

uvicorn on its own re-raises the signal after its shutdown, which turns a clean Ctrl-C into exit
code 130; every loramesh server (node, gateway, explorer) uses this instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn

log = logging.getLogger(__name__)


class ServerDidNotStart(RuntimeError):
    """The server never started listening (port taken, start-up failed)."""


class _GracefulServer(uvicorn.Server):
    """A second SIGINT (Ctrl-C again) stops the wait for open connections, as in uvicorn; a second SIGTERM
    (a supervisor repeating itself) changes nothing. Either way the app's own shutdown runs: uvicorn skips
    it on a forced exit, and it is where the gateway records the usage of aborted requests and stops its
    settler, and the node stops its engine."""

    @contextlib.contextmanager
    def capture_signals(self):
        def handle(sig, frame):
            name = signal.Signals(sig).name
            if not self.should_exit:
                self.should_exit = True
                log.info("received %s: shutting down", name)
            elif sig == signal.SIGINT and not self.force_exit:
                self.force_exit = True
                log.warning("received SIGINT again: not waiting for open connections")
            else:
                log.info("received %s again: already shutting down", name)

        old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:  # uvicorn left the app's shutdown out
            await self.lifespan.shutdown()


class _CutOffRequests(logging.Filter):
    """uvicorn logs a request that shutdown cancelled (the graceful timeout ran out, or a second Ctrl-C)
    as an exception in the app, with the traceback of the cancellation: it reads as a crash. One warning
    says what happened instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            record.msg, record.args = "a request still open at shutdown was cut off", ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


# Clients (httpx, hence the official openai client) drop a connection left idle for 5 s, and uvicorn's own
# default closes it after 5 s too: a client could reuse a connection at the instant the server closed it
# and get a ReadError (2 of 2,000 requests in the gateway soak). A server that waits longer than its
# clients never races them.
KEEP_ALIVE_S = 30


def serve(app, *, host: str, port: int, name: str, graceful_timeout: float = 10.0) -> None:
    """Run `app` on host:port until a signal; raise ServerDidNotStart if it never came up."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=graceful_timeout,
        lifespan="on",
        timeout_keep_alive=KEEP_ALIVE_S,
    )  # which sets up uvicorn's loggers: the filter goes on after
    cut_off = _CutOffRequests()
    logging.getLogger("uvicorn.error").addFilter(cut_off)
    server = _GracefulServer(config)
    try:
        server.run()
    finally:
        logging.getLogger("uvicorn.error").removeFilter(cut_off)
    if not server.started:
        raise ServerDidNotStart(
            f"{name} did not start on {host}:{port}: see the log above (port busy? start-up failed?)"
        )
    log.info("%s stopped", name)
