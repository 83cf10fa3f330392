"""LogReader: our contracts' logs over a block range, in queries bounded in blocks and in logs.

Each query is a raw `eth_getLogs` through the provider (`make_request`): the JSON-RPC answer as parsed JSON,
hex strings and all, without web3's per-log formatting (AttributeDicts, HexBytes, checksummed addresses),
which cost more than decoding itself (devnet.explorer.decode reads the hex directly).

The span (blocks per query) adapts to how dense the logs are: it doubles while answers stay under a quarter
of `max_logs`, and a query that returns more than `max_logs`, or that the node refuses (providers answer a
range too long or too full with an error: "query returned more than 10000 results", "block range too large",
a response size limit, or a timeout), is asked again over fewer blocks, in proportion. A single block is
taken whole, however many logs it holds: it cannot be split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import requests

from ledger.errors import ChainUnavailable
from ledger.transport import rpc_guard, shown_url

log = logging.getLogger(__name__)

MAX_LOGS = 10_000  # per query: the most hosted nodes answer (Infura, Alchemy, QuickNode cap at 10,000)
MAX_SPAN = 10_000  # blocks per query: many public nodes refuse longer ranges
FIRST_SPAN = 16  # blocks in the first query; small, because one too full is read and then thrown away


class LogQueryFailed(ChainUnavailable):
    """The node refused eth_getLogs even over a single block."""


@dataclass(slots=True)
class LogChunk:
    """The logs of blocks first..last (all of them, in the node's order: block, then log index)."""

    first: int
    last: int
    logs: list[dict]


class LogReader:
    """Bounded eth_getLogs over `addresses`. `queries` and `blocks` count what was asked (tests assert on them)."""

    def __init__(
        self,
        w3,
        rpc_url: str,
        addresses: list[str],
        *,
        max_logs: int = MAX_LOGS,
        max_span: int = MAX_SPAN,
        span: int = FIRST_SPAN,
    ) -> None:
        if max_logs < 1 or max_span < 1:
            raise ValueError(f"max_logs and max_span must be at least 1, got {max_logs} and {max_span}")
        self.w3 = w3
        self.rpc_url = rpc_url
        self.addresses = addresses
        self.max_logs = max_logs
        self.max_span = max_span
        self.span = max(1, min(span or FIRST_SPAN, max_span))
        self.queries = 0  # eth_getLogs calls made
        self.blocks = 0  # blocks those calls covered (refused and thrown-away ones included)

    def chunks(self, first: int, last: int, stop: Callable[[], bool] = lambda: False) -> Iterator[LogChunk]:
        """Chunks covering first..last in order, each from one query; stops early when `stop()` says so."""
        start = first
        while start <= last and not stop():
            end = min(last, start + self.span - 1)
            logs = self._query(start, end)
            if logs is None or (len(logs) > self.max_logs and end > start):
                self._shrink(start, end, logs)
                continue
            yield LogChunk(start, end, logs)
            if len(logs) < self.max_logs // 4 and end - start + 1 == self.span:
                self.span = min(self.max_span, self.span * 2)
            start = end + 1

    def _shrink(self, start: int, end: int, logs: list | None) -> None:
        span = end - start + 1
        if logs is None:
            if span == 1:
                raise LogQueryFailed(f"chain at {shown_url(self.rpc_url)} refused eth_getLogs for block {start}")
            self.span = max(1, span // 2)
        else:  # aim at half the bound, in proportion to how full this range was
            self.span = max(1, min(span // 2, span * self.max_logs // (2 * len(logs))))
        log.debug(
            "eth_getLogs %d..%d: %s; span now %d", start, end, "refused" if logs is None else len(logs), self.span
        )

    def _query(self, start: int, end: int) -> list[dict] | None:
        """The logs of start..end, or None when the node refused (an error answer or a timeout)."""
        self.queries += 1
        self.blocks += end - start + 1
        params = {"address": self.addresses, "fromBlock": hex(start), "toBlock": hex(end)}
        try:
            with rpc_guard(self.rpc_url):
                answer = self.w3.provider.make_request("eth_getLogs", [params])
        except ChainUnavailable as e:
            if isinstance(e.__cause__, requests.exceptions.Timeout) and end > start:
                return None  # a range too full to answer in time: ask again over fewer blocks
            raise
        if "error" in answer:
            log.info("eth_getLogs %d..%d refused: %s", start, end, str(answer["error"])[:200])
            return None
        result = answer.get("result")
        if not isinstance(result, list):
            raise ChainUnavailable(f"chain at {shown_url(self.rpc_url)} answered eth_getLogs with no list of logs")
        return result
