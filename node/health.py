"""What a node's GET /health checks, rather than always saying ok: the engine's loop answers between steps,
the adapter store takes writes, and (when the node is on a chain) the chain answers.

A failing engine or store is a 503: the node cannot serve, and a load balancer or orchestrator should stop
sending it requests or restart it. A chain that does not answer leaves the node serving (requests, receipts
and heartbeats need no chain) and is reported as "degraded" with a 200. The endpoint is public, so one check
runs at a time and its answer is reused for `CACHE_S`: a flood of /health costs no more than one probe a
second.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ENGINE_TIMEOUT_S = 10.0  # a CPU step on a long prefill takes seconds; ten without an answer is stuck
CHAIN_TIMEOUT_S = 5.0
CACHE_S = 1.0


class NodeHealth:
    """The node's health checks; `await check()` -> (healthy, document)."""

    def __init__(self, engine, *, store_dir: Path | None = None, block_number: Callable[[], int] | None = None):
        self.engine, self.store_dir, self.block_number = engine, store_dir, block_number
        self._lock = asyncio.Lock()
        self._last: tuple[float, bool, dict] | None = None

    async def check(self) -> tuple[bool, dict]:
        async with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < CACHE_S:
                return self._last[1], self._last[2]
            checks = {"engine": await self._engine()}
            if self.store_dir is not None:
                checks["store"] = await self._store()
            if self.block_number is not None:
                checks["chain"] = await self._chain()
            healthy = checks["engine"] == "ok" and checks.get("store", "ok") == "ok"
            state = "ok" if all(v == "ok" for v in checks.values()) else ("degraded" if healthy else "failing")
            doc = {"status": state, "checks": checks}
            self._last = (time.monotonic(), healthy, doc)
            return healthy, doc

    async def _engine(self) -> str:
        try:
            # shielded: giving up must not cancel the engine's future (the loop sets its result later)
            answer = asyncio.wrap_future(self.engine.call(lambda: None))
            await asyncio.wait_for(asyncio.shield(answer), ENGINE_TIMEOUT_S)
        except TimeoutError:
            return f"the engine loop did not answer within {ENGINE_TIMEOUT_S:.0f} s (a step is stuck, or it stopped)"
        except Exception as e:  # noqa: BLE001 - reported, not raised: /health must answer
            return f"the engine loop failed: {type(e).__name__}: {e}"
        return "ok"

    async def _store(self) -> str:
        def probe() -> None:
            tmp = self.store_dir / ".tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            path = tmp / f"health-{uuid.uuid4().hex}"
            with open(path, "wb") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
            path.unlink()

        try:
            await asyncio.to_thread(probe)
        except OSError as e:
            return f"the adapter store cannot be written: {e.strerror or e}"
        return "ok"

    async def _chain(self) -> str:
        try:
            await asyncio.wait_for(asyncio.to_thread(self.block_number), CHAIN_TIMEOUT_S)
        except TimeoutError:
            return f"the chain did not answer within {CHAIN_TIMEOUT_S:.0f} s"
        except Exception as e:  # noqa: BLE001 - reported, not raised: /health must answer
            return f"the chain cannot be reached: {type(e).__name__}"
        return "ok"
