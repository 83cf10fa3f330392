"""Serving an ASGI app until SIGINT/SIGTERM, shutting down gracefully, and exiting 0 after a clean stop.

uvicorn on its own re-raises the signal after its shutdown, which turns a clean Ctrl-C into exit
code 130; every loramesh server (node, gateway, explorer) uses this instead.
"""

from __future__ import annotations

import contextlib
import logging
import signal

import uvicorn

log = logging.getLogger(__name__)


class ServerDidNotStart(RuntimeError):
    """The server never started listening (port taken, start-up failed)."""


class _GracefulServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        def handle(sig, frame):
            if self.should_exit:  # a second signal: stop waiting for open connections
                self.force_exit = True
            self.should_exit = True
            log.info("received %s: shutting down", signal.Signals(sig).name)

        old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# Clients (httpx, hence the official openai client) drop a connection left idle for 5 s, and uvicorn's own
# default closes it after 5 s too: a client could reuse a connection at the instant the server closed it
# and get a ReadError (2 of 2,000 requests in the gateway soak). A server that waits longer than its
# clients never races them.
KEEP_ALIVE_S = 30


def serve(app, *, host: str, port: int, name: str, graceful_timeout: float = 10.0) -> None:
    """Run `app` on host:port until a signal; raise ServerDidNotStart if it never came up."""
    server = _GracefulServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=graceful_timeout,
            lifespan="on",
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    )
    server.run()
    if not server.started:
        raise ServerDidNotStart(
            f"{name} did not start on {host}:{port}: see the log above (port busy? start-up failed?)"
        )
    log.info("%s stopped", name)
