"""Refresher: the one background thread that keeps the index up to the chain, so no page ever waits for it.

It refreshes every `interval` seconds, and at once when woken (each page wakes it, so what was settled just
before a page was asked shows on the next one). A failing chain is logged once per new error, retried on the
next pass, and reported by `last_error` (the overview and /health show it); pages keep serving what the index
holds meanwhile. `stop()` ends the thread between two log queries, not after a whole first index.
"""

from __future__ import annotations

import logging
import threading
import time

from devnet.explorer.index import ChainIndex

log = logging.getLogger(__name__)


class Refresher:
    def __init__(self, index: ChainIndex, interval: float = 1.0) -> None:
        if interval <= 0:
            raise ValueError(f"refresh interval must be positive, got {interval}")
        self.index = index
        self.interval = interval
        self.last_error: str | None = None
        self.passes = 0  # refreshes completed (with or without new blocks)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="explorer-index", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.index.refresh(stop=self._stop.is_set)
                if self.last_error is not None:
                    log.info("explorer index: the chain answers again")
                self.last_error = None
            except Exception as e:  # noqa: BLE001 - the thread must outlive a bad pass; the error is kept and shown
                message = str(e).splitlines()[0] if str(e) else type(e).__name__
                if message != self.last_error:
                    log.warning("explorer index: refresh failed: %s", message, exc_info=log.isEnabledFor(logging.DEBUG))
                self.last_error = message
            self.passes += 1
            self._wake.wait(self.interval)

    def wait_synced(self, timeout: float = 60.0) -> None:
        """Block until the index reaches the chain's head (minus the confirmations) as it is now, on the chain as
        it is now (a reorg at the same height leaves the cursor's number but not its block); for tools and
        tests, never called by a page. TimeoutError names what is missing."""
        with_rpc = self.index.client
        target = with_rpc.block_number() - self.index.confirmations
        deadline = time.monotonic() + timeout
        while True:
            cursor = self.index.cursor()
            if cursor is not None and cursor.block >= target and self.index.on_canonical_chain(cursor):
                return
            if time.monotonic() > deadline:
                got = cursor.block if cursor else None
                raise TimeoutError(f"explorer index at block {got}, not {target}, after {timeout}s: {self.last_error}")
            self.wake()
            time.sleep(0.02)
