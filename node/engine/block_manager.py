"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, and prefix caching.

Prefix caching: once a full block's KV is written, the block is registered under a chained hash of
(base model, adapter, the request's cache salt if any, the block's tokens and every token before
it), and a later sequence whose first full blocks hash the same borrows them (reference-counted)
instead of computing them again. The adapter is in the key because an adapter changes K and V (on
q/k/v directly, on any other module through the hidden states every later layer reads): the same
tokens under two adapters never share KV; base-only sequences share among themselves.

The free pool holds every block no sequence references. Blocks never registered are handed out
first; then registered ones, least recently released first, each dropped from the hash table as it
goes (LRU eviction), so a prefix seen recently stays findable until memory pressure claims it."""

from __future__ import annotations

import hashlib
import json
import math
from array import array
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.engine.sequence import Sequence

DIGEST = 32  # bytes of BLAKE2b: a prompt's author must not be able to forge another prompt's block key


class BlockManager:
    """Hands out cache blocks; a sequence of n tokens holds ceil(n / block_size) blocks, the first
    ones possibly shared with other sequences (read only: a sequence writes KV only past them)."""

    def __init__(self, num_blocks: int, block_size: int, *, namespace: str = "", enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.namespace = namespace  # the base model's id: part of every key
        self._ref = [0] * num_blocks  # sequences holding each block
        self._hash: list[bytes | None] = [None] * num_blocks  # a registered block's key
        self._by_hash: dict[bytes, int] = {}  # key -> the registered block holding that KV
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, unregistered
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, registered; LRU first
        # tokens, as vLLM's vllm:prefix_cache_queries / _hits count them: prompt tokens looked up, tokens found
        self.queries = 0
        self.hits = 0
        self.evictions = 0  # registered blocks handed out again (dropped from the table)

    @property
    def num_free(self) -> int:
        """Blocks a sequence can take now (cached ones nobody holds included: they are evicted on demand)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # ---- keys ----
    def _root(self, adapter_id: str | None, salt: str | None) -> bytes:
        # JSON: no two (namespace, adapter, salt) triples encode alike, whatever characters a salt holds
        h = hashlib.blake2b(digest_size=DIGEST, person=b"loramesh-kv")
        h.update(json.dumps([self.namespace, adapter_id, salt]).encode())
        return h.digest()

    def block_hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """The keys of the sequence's first n full blocks (n * block_size <= its tokens), each chained on
        the one before; computed once per block and kept on the sequence (its tokens only grow)."""
        hashes = seq.block_hashes
        if len(hashes) < n:
            bs = self.block_size
            tokens = seq.all_token_ids()
            parent = hashes[-1] if hashes else self._root(seq.adapter_id, seq.cache_salt)
            for i in range(len(hashes), n):
                h = hashlib.blake2b(parent, digest_size=DIGEST)
                h.update(array("q", tokens[i * bs : (i + 1) * bs]).tobytes())
                parent = h.digest()
                hashes.append(parent)
        return hashes[:n]

    # ---- allocation ----
    def match(self, seq: Sequence) -> list[int]:
        """The registered blocks holding the sequence's longest cached prefix of full blocks; never its
        last token's block, so a prefill always computes at least that token (its logits are needed)."""
        if not self.enable_caching:
            return []
        found = []
        for h in self.block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            b = self._by_hash.get(h)
            if b is None:
                break
            found.append(b)
        return found

    def can_allocate(self, table: list[int], num_tokens: int, cached: list[int] = ()) -> bool:
        """Whether `table` (extended by the matched `cached` blocks) can grow to hold `num_tokens` tokens."""
        need = self.blocks_needed(num_tokens) - len(table) - len(cached)
        taken = sum(1 for b in cached if self._ref[b] == 0)  # borrowed from the free pool
        return need + taken <= self.num_free

    def allocate(self, seq: Sequence, cached: list[int], *, looked_up: bool) -> None:
        """Give a waiting sequence (empty table) the matched blocks, then fresh ones for the rest of its
        tokens (caller checked can_allocate). `looked_up`: its tokens were looked up (counted)."""
        assert not seq.block_table, "a waiting sequence holds no blocks"
        for b in cached:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
            seq.block_table.append(b)
        seq.num_cached_tokens = len(cached) * self.block_size
        seq.num_committed_blocks = len(cached)
        if looked_up:
            self.queries += seq.num_tokens
            self.hits += seq.num_cached_tokens
        self.grow(seq.block_table, seq.num_tokens)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` until it holds `num_tokens` tokens (caller checked can_allocate)."""
        while len(table) < self.blocks_needed(num_tokens):
            table.append(self._take())

    def shrink(self, table: list[int], num_tokens: int) -> None:
        """Release the blocks past the first ceil(num_tokens / block_size) of `table`: speculative decoding
        grew it for drafted tokens that were rejected. Those blocks were never committed (no key: their
        positions lie past every accepted token), so they go straight back to the free pool."""
        keep = self.blocks_needed(num_tokens)
        while len(table) > keep:
            b = table.pop()
            assert self._hash[b] is None, "a block past the accepted tokens was registered"
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def _take(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:  # evict the least recently released cached block
            b, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash[b]]
            self._hash[b] = None
            self.evictions += 1
        self._ref[b] = 1
        return b

    def free(self, table: list[int]) -> None:
        """Release a sequence's blocks; a block others hold stays theirs. Last blocks first, so a
        sequence's tail (the part least likely shared) is evicted before its head."""
        for b in reversed(table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is None:
                    self._free.append(b)
                else:
                    self._evictable[b] = None
        table.clear()

    def commit(self, seq: Sequence, num_computed: int) -> None:
        """The sequence's KV is written for positions [0, num_computed): register its full blocks not
        registered yet, so later sequences can share them. A block whose key another block already
        holds (two sequences computed the same prefix in one step) stays private.

        The prompt tokens of the blocks registered in its first prefill are counted on the sequence
        (prompt_written_tokens: OpenAI's cache_write_tokens); not a block holding output, and not a prompt
        block a resumed sequence registers again after eviction, so cached + written never pass the prompt."""
        if not self.enable_caching:
            return
        full = num_computed // self.block_size
        if full <= seq.num_committed_blocks:
            return
        hashes = self.block_hashes(seq, full)
        # its first prefill: a sequence has no output before it (a resumed one recomputes what it wrote once)
        prompt_blocks = 0 if seq.output_token_ids else len(seq.prompt_token_ids) // self.block_size
        for i in range(seq.num_committed_blocks, full):
            b, h = seq.block_table[i], hashes[i]
            if self._hash[b] is None and h not in self._by_hash:
                self._hash[b] = h
                self._by_hash[h] = b
                if i < prompt_blocks:
                    seq.prompt_written_tokens += self.block_size
        seq.num_committed_blocks = full
