"""Real HTTP servers for tests: an ASGI app under uvicorn on 127.0.0.1:<free port>, in a thread of this process."""

from __future__ import annotations

import threading
import time

from common.serving import GracefulServer, server_config
from devnet.anvil import free_port


class ServerThread:
    """The app under a real uvicorn in a daemon thread, stopped as our servers stop (common.serving);
    `start()`/`stop()` or `with ServerThread(app) as s:`."""

    def __init__(self, app, port: int | None = None) -> None:
        self.port = port or free_port()
        # lifespan "on": an app whose start-up fails must fail the test, not serve half-configured
        # the servers' own protocol and keep-alive (common.serving.GuardedHttp)
        self.server = GracefulServer(server_config(app, host="127.0.0.1", port=self.port, graceful_timeout=3))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerThread:
        """Start serving; returns once uvicorn accepts connections (RuntimeError if it cannot)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self, *, cut: bool = False) -> None:
        """Shut down gracefully and wait for the thread; cut=True: as a second Ctrl-C, cut open requests off
        at once rather than wait for them."""
        self.server.should_exit = True
        self.server.force_exit = cut
        self.thread.join(timeout=20)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
