"""ledger.log_reader.LogReader's span, against providers with a range limit (the reads themselves run against
anvil in tests/ledger/test_chain_client.py and tests/devnet/explorer/test_index.py)."""

import random
import socket
import threading

import pytest

from ledger.errors import ChainUnavailable
from ledger.log_reader import PROBE_AFTER, LogQueryFailed, LogReader, Refused, raw_query, web3_query
from ledger.transport import make_web3


class Provider:
    """Refuses a range over `cap` blocks (and the ranges in `fail_once`, once each); a log every 100 blocks."""

    def __init__(self, cap: int, fail_once=(), passing: float = 0.0, seed: int = 0) -> None:
        self.cap, self.fail_once, self.asked = cap, set(fail_once), []
        self.passing, self.rng = passing, random.Random(seed)  # the share of queries refused at random

    def __call__(self, first: int, last: int):
        self.asked.append((first, last))
        if last - first + 1 > self.cap:
            raise Refused(f"query exceeds max block range {self.cap}")
        if (first, last) in self.fail_once or self.rng.random() < self.passing:
            self.fail_once.discard((first, last))
            raise Refused("rate limited")
        return logs(first, last)

    def refused(self) -> int:
        return sum(last - first + 1 > self.cap for first, last in self.asked)


def logs(first: int, last: int) -> list[int]:
    return [b for b in range(first, last + 1) if b % 100 == 0]


def read(reader: LogReader, provider: Provider, first: int, last: int) -> list[int]:
    chunks = list(reader.chunks(first, last, provider))
    assert [c.first for c in chunks[1:]] == [c.last + 1 for c in chunks[:-1]]
    return [lg for c in chunks for lg in c.logs]


def test_a_range_limit_is_found_in_few_refusals_and_kept():
    """A provider capping eth_getLogs at 1,000 blocks, read from a span of 10,000: the span halves to an answered
    size, then searches up towards the refused one; it never grows into the cap again (a fixed span of 10,000
    read nothing at all; one doubling past every answer wasted every other query)."""
    provider, reader = Provider(1000), LogReader("http://x", span=10_000)
    assert read(reader, provider, 1, 200_000) == logs(1, 200_000)
    assert provider.refused() <= 16 and reader.span == 1000
    before = provider.refused()
    assert read(reader, provider, 200_001, 300_000) == logs(200_001, 300_000)
    # one probe a block past the cap every PROBE_AFTER queries at it (100 here)
    assert provider.refused() - before <= 100 // PROBE_AFTER + 1 and reader.span == 1000


def test_a_passing_refusal_is_outgrown_and_a_tightened_limit_is_found_again():
    """A refusal at a size answered before (a rate limit, a slow moment) does not hold the span down for good:
    after PROBE_AFTER queries at the largest size not refused, one query goes a block wider, and when it is
    answered the span grows again. A provider whose limit drops is followed down."""
    provider, reader = Provider(10_000, fail_once={(1, 64)}), LogReader("http://x", span=64)
    read(reader, provider, 1, 1_000_000)
    assert reader.span == 10_000 and provider.refused() == 0 and len(provider.asked) < 100 + PROBE_AFTER + 16
    provider.cap, provider.asked = 500, []
    assert read(reader, provider, 1_000_001, 1_100_000) == logs(1_000_001, 1_100_000)
    assert reader.span == 500 and provider.refused() <= 12


def test_a_block_refused_alone_is_a_clear_error():
    with pytest.raises(LogQueryFailed, match="refused eth_getLogs for block 5: query exceeds max block range 0"):
        read(LogReader("http://x", span=8), Provider(0), 5, 9)


@pytest.mark.parametrize("share", [0.05, 0.1])
def test_passing_refusals_do_not_wear_the_span_down(share):
    """Every refusal lowered the largest span tried, so a provider refusing a few percent of queries at random (a
    rate limit, a slow moment) brought the span down to one block and a refusal there failed the read: 5,000,000
    blocks at 5% failed 20 runs in 20 (red team). A refusal of a size answered before now holds for that query
    alone."""
    for seed in range(3):
        provider, reader = Provider(1000, passing=share, seed=seed), LogReader("http://x", span=10_000)
        assert read(reader, provider, 1, 2_000_000) == logs(1, 2_000_000)
        # 2,042 queries with no passing refusal; up to 2,346 at 5% and 3,031 at 10% (a refused query and the
        # shorter one asked in its place)
        assert reader.span >= 500 and len(provider.asked) < 2_000_000 / 1000 * 1.6


def test_a_refusal_that_is_not_about_the_range_fails_at_once_with_the_nodes_reason():
    """Any error answer was taken for a range too long: an invalid parameter took 14 queries, halving down to one
    block, then failed as "refused eth_getLogs for block 0", the node's reason only in a log line, and left the
    reader asking one block at a time. The first block alone is asked now: refused too, the read fails with the
    node's reason and the span learned stays."""
    reader = LogReader("http://x", span=10_000)
    read(reader, Provider(2000), 1, 100_000)
    learned = (reader.span, reader.ceiling)
    asked = []

    def invalid(first, last):
        asked.append((first, last))
        raise Refused("invalid params: topics")

    with pytest.raises(LogQueryFailed, match="for block 100001: invalid params: topics"):
        read(reader, invalid, 100_001, 200_000)
    assert len(asked) == 2 and (reader.span, reader.ceiling) == learned


def test_a_node_that_never_answers_costs_two_timeouts_not_fourteen():
    """A read timeout over several blocks counts as a range too full to answer in time; against a node that
    accepts and never answers, halving down to one block waited out 14 timeouts (140 s at the 10 s default)."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(8)], daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    try:
        for make in (raw_query, web3_query):
            reader = LogReader(url, span=10_000)
            with pytest.raises(ChainUnavailable, match="unreachable"):
                read(reader, make(make_web3(url, timeout=0.3), url, {"address": []}), 0, 100_000)
            assert reader.queries == 2
    finally:
        for conn, _ in held:
            conn.close()
        server.close()


def test_a_full_range_is_split_in_proportion_and_a_single_block_taken_whole():
    class Dense:
        def __call__(self, first, last):
            return [b for b in range(first, last + 1) for _ in range(40 if b == 7 else 1)]

    reader = LogReader("http://x", max_logs=8, span=64)
    chunks = list(reader.chunks(1, 30, Dense()))
    assert all(len(c.logs) <= 8 or c.first == c.last == 7 for c in chunks)
    assert [lg for c in chunks for lg in c.logs] == Dense()(1, 30)
