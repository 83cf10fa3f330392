"""Background tasks of one gateway that no client's cancellation may end (a request's close and usage
record above all); the app waits for them on shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Run `coro` on a task of its own that nobody cancels; the app waits for it on shutdown."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for background tasks (usage records of aborted requests above all)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
