"""A trio loop on its own thread, callable from plain threads and from asyncio.

py-libp2p is trio-only (a host under asyncio.run fails), while the node's HTTP API and engine are
asyncio: the p2p layer lives on this thread and only small results cross over.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from node.p2p.errors import P2PError

T = TypeVar("T")


class TrioThread:
    """Runs `main(ready)` on a fresh trio loop in a daemon thread until stop()."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, main: Callable[[Callable[[], None]], Awaitable[None]], *, timeout: float) -> None:
        """Start the thread and block until `main` calls ready() (or fails, which is re-raised)."""
        if self._thread is not None:
            raise P2PError("the p2p thread is already running")

        async def _root() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await main(self._ready.set)
                nursery.cancel_scope.cancel()

        async def _guarded() -> None:
            try:
                await _root()
            except BaseException as e:  # reported to start(); the thread ends quietly
                self._error = e
            finally:
                self._nursery = None
                self._ready.set()

        self._thread = threading.Thread(target=trio.run, args=(_guarded,), name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise P2PError(f"the p2p host did not start within {timeout:g}s")
        if self._error is not None:
            cause = _leaf(self._error)
            raise P2PError(f"the p2p host failed to start: {cause}") from cause
        if self._nursery is None:
            raise P2PError("the p2p host stopped right after starting")

    async def wait_stopped(self) -> None:
        """Inside `main`: returns when stop() was called."""
        assert self._stop is not None
        await self._stop.wait()

    def stop(self, *, timeout: float) -> None:
        """Ask `main` to return and join the thread."""
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive() and self._token is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._nursery is not None

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` on the trio loop and block this (non-trio) thread for its result."""
        if not self.running:
            raise P2PError("the p2p node is not started")
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError as e:
            raise P2PError("the p2p host stopped") from e

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` on the trio loop from asyncio; cancelling the await cancels the trio task."""
        if not self.running:
            raise P2PError("the p2p node is not started")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        scope = trio.CancelScope()

        def _deliver(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

        def _send(ok: bool, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(_deliver, ok, value)
            except RuntimeError:  # the asyncio loop is already closed
                pass

        async def _job() -> None:
            sent = False
            try:
                with scope:
                    try:
                        result = await fn(*args)
                    except Exception as e:
                        sent = True
                        _send(False, e)
                        return
                    sent = True
                    _send(True, result)
            finally:
                if not sent:
                    _send(False, asyncio.CancelledError() if scope.cancel_called else P2PError("the p2p host stopped"))

        try:
            trio.from_thread.run_sync(self._nursery.start_soon, _job, trio_token=self._token)
        except trio.RunFinishedError as e:
            raise P2PError("the p2p host stopped") from e
        try:
            return await fut
        except asyncio.CancelledError:
            try:
                trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            raise


def _leaf(e: BaseException) -> BaseException:
    """The single exception inside nested one-member exception groups (trio nurseries wrap errors)."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e
