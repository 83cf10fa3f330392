"""Paged KV cache bookkeeping: a free list of fixed-size blocks and per-sequence block tables."""

from __future__ import annotations

import math
from collections import deque


class BlockManager:
    """Hands out cache blocks; a sequence of n tokens holds ceil(n / block_size) blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_allocate(self, table: list[int], num_tokens: int) -> bool:
        """Whether `table` can grow to hold `num_tokens` tokens."""
        return self.blocks_needed(num_tokens) - len(table) <= len(self._free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` until it holds `num_tokens` tokens (caller checked can_allocate)."""
        while len(table) < self.blocks_needed(num_tokens):
            table.append(self._free.popleft())

    def free(self, table: list[int]) -> None:
        self._free.extend(table)
        table.clear()
