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

    def start(self) -> None:
        self._thread.start()

    async def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, timeout)

    async def status(self) -> dict:
        """The settler's status, at most STATUS_TTL_S old; {"error": ...} when the database cannot say."""
        now = time.monotonic()
        if self._status is None or now - self._status_at >= STATUS_TTL_S:
            try:
                self._status = await asyncio.to_thread(self.settler.status)
            except (SQLAlchemyError, LedgerError) as e:
                log.warning("settlement status unavailable: %s", e)
                self._status = {"error": f"settlement status unavailable: {e.__class__.__name__}"}
            self._status_at = now
            if self._status.get("deposit_low"):
                log.warning("settler %s: deposit low (%s wei left after pending fees)", self._status.get("settler"),
                            self._status.get("deposit_left_wei"))  # fmt: skip
        return self._status
