"""LogReader: contract logs over a long block range, in eth_getLogs queries a provider answers.

Providers bound eth_getLogs in blocks (a range too long is refused: "block range too large", 1,000 to 10,000
blocks on many public and hosted nodes), in logs ("query returned more than 10000 results"), in response size
or in time. A reader asking one fixed span fails for good on a stricter provider, and asks far more queries than
needed of a looser one, so the span (blocks per query) adapts:

- it doubles while answers stay under a quarter of `max_logs`, up to `max_span`;
- a query the node refuses (an error answer, or a read timeout over several blocks) is asked again over half the
  blocks (or the largest span answered before, when that is more), and the span then grows only part way back
  towards the smallest size refused, halving the gap each time: a provider's range limit is fixed, and growing
  into it again would waste every other query. After PROBE_AFTER queries at the largest size not refused, one
  query is asked a block wider, in case the refusal was a passing one;
- a refusal of a size answered before (a rate limit, a slow moment) is passing: that query alone goes on over
  fewer blocks, and the span learned stays, unless three come in a row;
- the first refusal of a `chunks` call is checked by asking for its first block alone: refused too, the refusal
  is not about the range (invalid parameters, a rate limit, a node behind the head) and LogQueryFailed gives the
  node's reason at once, where halving down to one block cost 14 queries (and, against a node that never
  answers, 14 timeouts) and then blamed the range;
- a query returning more than `max_logs` is asked again over fewer blocks, in proportion to how full it was;
- a single block is taken whole, however many logs it holds (it cannot be split); one refused is LogQueryFailed.

The span learned stays with the reader: the next `chunks` call starts from it.

Two ways of asking, each a `query(first, last)` returning the logs or raising Refused with the node's reason:
`raw_query` (the JSON-RPC answer as parsed JSON, hex strings and all, without web3's per-log formatting, for the
explorer's indexer, which decodes the hex itself) and `web3_query` (web3's formatted logs, for ChainClient's
decoded events).
"""

from __future__ import annotations

import logging
import threading
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

# first..last -> the logs of those blocks; raises Refused when the node would not answer that query
LogQuery = Callable[[int, int], list]


class LogQueryFailed(ChainUnavailable):
    """The node refused eth_getLogs even over a single block."""


@dataclass(slots=True)
class LogChunk:
    """The logs of blocks first..last (all of them, in the node's order: block, then log index)."""

    first: int
    last: int
    logs: list


class Refused(Exception):
    """Raised by a LogQuery: the node would not answer that query (the message: its reason, one line)."""


class LogReader:
    """Adaptive spans of eth_getLogs. `queries` and `blocks` count what was asked (tests assert on them).

    One reader may serve several threads (a ChainClient's): what it learns is kept under a lock, and each
    `chunks` call's blocks are its own, so every call reads each of its blocks once."""

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
        self._passing = 0  # refusals in a row of sizes answered before
        self.queries = 0  # eth_getLogs calls made
        self.blocks = 0  # blocks those calls covered (refused and thrown-away ones included)
        self._lock = threading.Lock()  # over what is learned (span, ceiling, _good, _passing, _at_ceiling)

    def chunks(
        self, first: int, last: int, query: LogQuery, stop: Callable[[], bool] = lambda: False
    ) -> Iterator[LogChunk]:
        """Chunks covering first..last in order, each from one query; stops early when `stop()` says so.

        The first refusal of a call is checked by asking for its first block alone: refused too, the node's
        refusal is not about the range (invalid parameters, a rate limit, a node behind), and LogQueryFailed
        says the node's reason at once, leaving the span learned as it was."""
        start, probed, cap = first, False, 0  # cap: this query's own bound after a passing refusal (0: none)
        while start <= last and not stop():
            end = min(last, start + (min(self.span, cap) if cap else self.span) - 1)
            n = end - start + 1
            try:
                logs = self._ask(query, start, end)
            except Refused as e:
                log.info("eth_getLogs %d..%d refused: %s", start, end, e)
                if n == 1:
                    raise self._failed(start, e) from None
                if not probed:  # the first block alone: refused too, the refusal is not about the range
                    probed = True
                    yield LogChunk(start, start, self._alone(query, start))
                    start += 1
                with self._lock:
                    if n > self._good or self._passing >= 2:  # the range: learned for every later read
                        self._refused(n)
                        self._passing = 0
                    else:  # a size answered before: this query alone goes on over fewer blocks
                        self._passing += 1
                        cap = max(1, n // 2)
                continue
            if len(logs) > self.max_logs and n > 1:
                # aim at half the bound, in proportion to how full this range was
                with self._lock:
                    self.span = max(1, min(n // 2, n * self.max_logs // (2 * len(logs))))
                log.debug("eth_getLogs %d..%d: %d logs; span now %d", start, end, len(logs), self.span)
                continue
            yield LogChunk(start, end, logs)
            cap = 0
            with self._lock:
                if n == self.span:
                    self._passing = 0
                    self._answered(n, len(logs))
            start = end + 1

    def _ask(self, query: LogQuery, start: int, end: int) -> list:
        self.queries += 1
        self.blocks += end - start + 1
        return query(start, end)

    def _alone(self, query: LogQuery, block: int) -> list:
        """The logs of one block, asked after a longer range was refused."""
        try:
            return self._ask(query, block, block)
        except Refused as e:
            raise self._failed(block, e) from None

    def _failed(self, block: int, e: Refused) -> LogQueryFailed:
        return LogQueryFailed(f"chain at {shown_url(self.rpc_url)} refused eth_getLogs for block {block}: {e}")

    def _refused(self, n: int) -> None:
        """A query over n blocks was refused: ask again over fewer, between the largest answered and n."""
        self.ceiling, self._at_ceiling = min(self.ceiling, n - 1), 0
        if self._good >= n:  # refused again and again at a size answered before: what was known no longer holds
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


def _asked(rpc_url: str, start: int, end: int, ask: Callable[[], list]) -> list:
    """ask() under rpc_guard; a read timeout over several blocks is a refusal (a range too full to answer in
    time; a connection that cannot be made is the node down, not a refusal)."""
    try:
        with rpc_guard(rpc_url):
            return ask()
    except ChainUnavailable as e:
        cause = e.__cause__
        if isinstance(cause, requests.exceptions.ReadTimeout) and end > start:
            raise Refused(f"no answer in time ({type(cause).__name__})") from None
        raise


def raw_query(w3, rpc_url: str, params: dict) -> LogQuery:
    """eth_getLogs with `params` (address, topics) through the provider: each log as parsed JSON."""

    def ask(start: int, end: int) -> list:
        answer = w3.provider.make_request("eth_getLogs", [{**params, "fromBlock": hex(start), "toBlock": hex(end)}])
        if "error" in answer:
            raise Refused(_reason(answer["error"]))
        result = answer.get("result")
        if not isinstance(result, list):
            raise ChainUnavailable(f"chain at {shown_url(rpc_url)} answered eth_getLogs with no list of logs")
        return result

    return lambda start, end: _asked(rpc_url, start, end, lambda: ask(start, end))


def web3_query(w3, rpc_url: str, params: dict) -> LogQuery:
    """eth_getLogs with `params` (address, topics) through web3: each log formatted (ints, HexBytes)."""

    def ask(start: int, end: int) -> list:
        try:
            return list(w3.eth.get_logs({**params, "fromBlock": start, "toBlock": end}))
        except Web3RPCError as e:  # the node's error answer
            raise Refused(_reason(e.rpc_response.get("error") if e.rpc_response else str(e))) from None
        except ValueError as e:  # an error answer, as web3 raised it before Web3RPCError
            raise Refused(_reason(e.args[0] if e.args else str(e))) from None

    return lambda start, end: _asked(rpc_url, start, end, lambda: ask(start, end))


def _reason(error: object) -> str:
    """A JSON-RPC error (an object with a message, or text) as one short line."""
    text = error.get("message", error) if isinstance(error, dict) else error
    line = " ".join(str(text).split())
    return line if len(line) <= 200 else line[:197] + "..."
