"""The in-process settler, as /health and /metrics show it: its thread, and its status (ledger.settler
.settler_status: records by state, fees pending, deposit left and whether it is low), read at most
every STATUS_TTL_S seconds (one GROUP BY and one eth_call), never on the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from sqlalchemy.exc import SQLAlchemyError

from ledger.errors import LedgerError

log = logging.getLogger(__name__)

STATUS_TTL_S = 5.0
# the record counts /metrics exports as loramesh_gateway_settlement_records{state}
RECORD_STATES = ("pending", "in_flight", "set_aside", "disputed", "settled")


class InProcessSettler:
    """Runs a ledger Settler on a thread of the gateway's process; `start`, `stop`, `status`."""

    def __init__(self, settler) -> None:
        self.settler = settler
        self._stop = threading.Event()
        self._thread = threading.Thread(target=settler.run, args=(self._stop,), name="settler", daemon=True)
        self._status: dict | None = None
        self._status_at = 0.0
        self._lock = asyncio.Lock()

    def start(self) -> None:
        self._thread.start()

    async def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, timeout)

    async def status(self) -> dict:
        """The settler's status, at most STATUS_TTL_S old; {"error": ...} when the database cannot say.
        One refresh at a time for all callers (/health and /metrics are unauthenticated: a crowd of them
        during a slow chain must not each start a database scan and an eth_call on the shared worker
        threads); while one runs, callers that have a value get it as it is."""
        if self._status is not None and (time.monotonic() - self._status_at < STATUS_TTL_S or self._lock.locked()):
            return self._status
        async with self._lock:
            if self._status is None or time.monotonic() - self._status_at >= STATUS_TTL_S:
                await self._refresh()
        return self._status

    async def _refresh(self) -> None:
        try:
            self._status = await asyncio.to_thread(self.settler.status)
        except (SQLAlchemyError, LedgerError) as e:
            log.warning("settlement status unavailable: %s", e)
            self._status = {"error": f"settlement status unavailable: {e.__class__.__name__}"}
        self._status_at = time.monotonic()
        if self._status.get("deposit_low"):
            log.warning(
                "settler %s: deposit low (%s wei left after pending fees)",
                self._status.get("settler"),
                self._status.get("deposit_left_wei"),
            )
