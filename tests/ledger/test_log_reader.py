"""ledger.log_reader.LogReader's span, against providers with a range limit (the reads themselves run against
anvil in tests/ledger/test_chain_client.py and tests/devnet/explorer/test_index.py)."""

import pytest

from ledger.log_reader import PROBE_AFTER, LogQueryFailed, LogReader


class Provider:
    """Refuses a range over `cap` blocks (and the ranges in `fail_once`, once each); a log every 100 blocks."""

    def __init__(self, cap: int, fail_once=()) -> None:
        self.cap, self.fail_once, self.asked = cap, set(fail_once), []

    def __call__(self, first: int, last: int):
        self.asked.append((first, last))
        if last - first + 1 > self.cap or (first, last) in self.fail_once:
            self.fail_once.discard((first, last))
            return None
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
    with pytest.raises(LogQueryFailed, match="refused eth_getLogs for block 5"):
        read(LogReader("http://x", span=8), Provider(0), 5, 9)


def test_a_full_range_is_split_in_proportion_and_a_single_block_taken_whole():
    class Dense:
        def __call__(self, first, last):
            return [b for b in range(first, last + 1) for _ in range(40 if b == 7 else 1)]

    reader = LogReader("http://x", max_logs=8, span=64)
    chunks = list(reader.chunks(1, 30, Dense()))
    assert all(len(c.logs) <= 8 or c.first == c.last == 7 for c in chunks)
    assert [lg for c in chunks for lg in c.logs] == Dense()(1, 30)
