"""LogReader: contract logs over a long block range, in eth_getLogs queries a provider answers.

Providers bound eth_getLogs in blocks (a range too long is refused: "block range too large", 1,000 to 10,000
blocks on many public and hosted nodes), in logs ("query returned more than 10000 results"), in response size
or in time. A reader asking one fixed span fails for good on a stricter provider, and asks far more queries than
needed of a looser one, so the span (blocks per query) adapts:

- it doubles while answers stay under a quarter of `max_logs`, up to `max_span`;
- a query the node refuses (an error answer, or a timeout over several blocks) is asked again over half the
  blocks (or the largest span answered before, when that is more), and the span then grows only part way back
  towards the smallest size refused, halving the gap each time: a provider's range limit is fixed, and growing
  into it again would waste every other query. After PROBE_AFTER queries at the largest size not refused, one
  query is asked a block wider, in case the refusal was a passing one (a rate limit, a slow moment);
- a query returning more than `max_logs` is asked again over fewer blocks, in proportion to how full it was;
- a single block is taken whole, however many logs it holds (it cannot be split); one refused is LogQueryFailed.

The span learned stays with the reader: the next `chunks` call starts from it.

Two ways of asking, each a `query(first, last)` returning the logs or None when refused: `raw_query` (the
JSON-RPC answer as parsed JSON, hex strings and all, without web3's per-log formatting, for the explorer's
indexer, which decodes the hex itself) and `web3_query` (web3's formatted logs, for ChainClient's decoded events).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import requests
from web3.exceptions import Web3RPCError

from ledger.errors import ChainUnavailable
from ledger.transport import rpc_guard, shown_url

log = logging.getLogger(__name__)

MAX_LOGS = 10_000  # per query: the most hosted nodes answer (Infura, Alchemy, QuickNode cap at 10,000)
MAX_SPAN = 10_000  # blocks per query: many public nodes refuse longer ranges
FIRST_SPAN = 16  # blocks in the explorer's first query; small, because one too full is read and then thrown away
PROBE_AFTER = 64  # queries at the largest span not refused before a larger one is tried again

# first..last -> the logs of those blocks, or None when the node refused the query
LogQuery = Callable[[int, int], "list | None"]


class LogQueryFailed(ChainUnavailable):
    """The node refused eth_getLogs even over a single block."""


@dataclass(slots=True)
class LogChunk:
    """The logs of blocks first..last (all of them, in the node's order: block, then log index)."""

    first: int
    last: int
    logs: list


class LogReader:
    """Adaptive spans of eth_getLogs. `queries` and `blocks` count what was asked (tests assert on them)."""

    def __init__(
        self, rpc_url: str, *, max_logs: int = MAX_LOGS, max_span: int = MAX_SPAN, span: int = FIRST_SPAN
    ) -> None:
        if max_logs < 1 or max_span < 1:
            raise ValueError(f"max_logs and max_span must be at least 1, got {max_logs} and {max_span}")
        self.rpc_url = rpc_url
        self.max_logs = max_logs
        self.max_span = max_span
        self.span = max(1, min(span or FIRST_SPAN, max_span))
        self.ceiling = max_span  # under the smallest span refused (max_span while none was)
        self._good = 0  # the largest span answered
        self._at_ceiling = 0  # queries answered at the ceiling since the last probe past it
        self.queries = 0  # eth_getLogs calls made
        self.blocks = 0  # blocks those calls covered (refused and thrown-away ones included)

    def chunks(
        self, first: int, last: int, query: LogQuery, stop: Callable[[], bool] = lambda: False
    ) -> Iterator[LogChunk]:
        """Chunks covering first..last in order, each from one query; stops early when `stop()` says so."""
        start = first
        while start <= last and not stop():
            end = min(last, start + self.span - 1)
            n = end - start + 1
            self.queries += 1
            self.blocks += n
            logs = query(start, end)
            if logs is None:
                if n == 1:
                    raise LogQueryFailed(f"chain at {shown_url(self.rpc_url)} refused eth_getLogs for block {start}")
                self._refused(n)
            elif len(logs) > self.max_logs and n > 1:
                # aim at half the bound, in proportion to how full this range was
                self.span = max(1, min(n // 2, n * self.max_logs // (2 * len(logs))))
                log.debug("eth_getLogs %d..%d: %d logs; span now %d", start, end, len(logs), self.span)
            else:
                yield LogChunk(start, end, logs)
                if n == self.span:
                    self._answered(n, len(logs))
                start = end + 1

    def _refused(self, n: int) -> None:
        """A query over n blocks was refused: ask again over fewer, between the largest answered and n."""
        self.ceiling, self._at_ceiling = min(self.ceiling, n - 1), 0
        if self._good >= n:  # a size answered before is refused now: what was known no longer holds
            self._good = 0
        self.span = max(1, n // 2, self._good)
        log.debug("eth_getLogs over %d blocks refused; span now %d", n, self.span)

    def _answered(self, n: int, logs: int) -> None:
        """A query over n (the span) blocks was answered with `logs` logs: grow the span where it is sparse."""
        self._good = max(self._good, n)
        if n > self.ceiling:  # a probe past the refused size went through: that refusal was a passing one
            self.ceiling = self.max_span
        if logs >= self.max_logs // 4:
            return
        if n >= self.ceiling:
            self._at_ceiling += 1
            if self._at_ceiling >= PROBE_AFTER and self.ceiling < self.max_span:
                self.span, self._at_ceiling = self.ceiling + 1, 0  # one query one block wider
            return
        grown = min(n * 2, self.ceiling)
        if self.ceiling < self.max_span:  # a refused size is known: search between it and n, halving the gap
            grown = min(grown, (n + self.ceiling + 1) // 2)
        self.span = max(n, grown)


def _asked(rpc_url: str, start: int, end: int, ask: Callable[[], list | None]) -> list | None:
    """ask() under rpc_guard; a timeout over several blocks is a refusal (a range too full to answer in time)."""
    try:
        with rpc_guard(rpc_url):
            return ask()
    except ChainUnavailable as e:
        if isinstance(e.__cause__, requests.exceptions.Timeout) and end > start:
            return None
        raise


def raw_query(w3, rpc_url: str, params: dict) -> LogQuery:
    """eth_getLogs with `params` (address, topics) through the provider: each log as parsed JSON."""

    def query(start: int, end: int) -> list | None:
        answer = _asked(rpc_url, start, end, lambda: _raw(w3, params, start, end))
        if answer is None or "error" in answer:
            if answer is not None:
                log.info("eth_getLogs %d..%d refused: %s", start, end, str(answer["error"])[:200])
            return None
        result = answer.get("result")
        if not isinstance(result, list):
            raise ChainUnavailable(f"chain at {shown_url(rpc_url)} answered eth_getLogs with no list of logs")
        return result

    return query


def _raw(w3, params: dict, start: int, end: int) -> dict:
    return w3.provider.make_request("eth_getLogs", [{**params, "fromBlock": hex(start), "toBlock": hex(end)}])


def web3_query(w3, rpc_url: str, params: dict) -> LogQuery:
    """eth_getLogs with `params` (address, topics) through web3: each log formatted (ints, HexBytes)."""

    def ask(start: int, end: int) -> list | None:
        try:
            return list(w3.eth.get_logs({**params, "fromBlock": start, "toBlock": end}))
        except (Web3RPCError, ValueError) as e:  # the node's error answer (web3 raises on it)
            log.info("eth_getLogs %d..%d refused: %s", start, end, str(e)[:200])
            return None

    return lambda start, end: _asked(rpc_url, start, end, lambda: ask(start, end))
