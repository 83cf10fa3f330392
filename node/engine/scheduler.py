"""Continuous batching: which sequences run in the next step (a prefill or a decode batch).

Waiting sequences queue per adapter and are admitted round-robin across adapters, so one hot
adapter cannot starve the rest; a sequence waits (without blocking others) while its adapter
loads. Decode preempts the most recently admitted sequence when the KV cache is full; it
resumes later by recomputing its cache.

Prefix caching: a waiting sequence whose first full blocks are cached under its key borrows them
(block_manager.py) and its prefill computes only the rest; the prefill token budget counts only
those uncached tokens."""

from __future__ import annotations

import logging
from collections import OrderedDict, deque

from node.engine.block_manager import BlockManager
from node.engine.lora.errors import AdapterError
from node.engine.lora.manager import AdapterManager
from node.engine.sequence import SeqStatus, Sequence

log = logging.getLogger(__name__)

BASE = ""  # queue key of base-model requests


class Scheduler:
    def __init__(
        self, blocks: BlockManager, adapters: AdapterManager, *, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.blocks = blocks
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.queues: OrderedDict[str, deque[Sequence]] = OrderedDict()  # round-robin order = key order
        self.running: list[Sequence] = []  # admission order
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        # a list made in C, at once: read from the event loop (status) while the engine thread adds queues
        return sum(len(q) for q in list(self.queues.values()))

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        key = seq.adapter_id or BASE
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = deque()
            if front:
                self.queues.move_to_end(key, last=False)
        q.appendleft(seq) if front else q.append(seq)
        seq.status = SeqStatus.WAITING

    def schedule(self) -> tuple[list[Sequence], bool, list[Sequence]]:
        """(sequences to run, whether this is a prefill step, sequences failed by adapter errors)."""
        failed: list[Sequence] = []
        batch = self._admit(failed)
        if batch:
            return batch, True, failed
        return self._decode_batch(), False, failed

    def _admit(self, failed: list[Sequence]) -> list[Sequence]:
        batch: list[Sequence] = []
        tokens = 0
        blocked: set[str] = set()  # adapters that cannot run this step
        while len(self.running) < self.max_num_seqs and len(blocked) < len(self.queues):
            key = next((k for k in self.queues if k not in blocked), None)
            if key is None:
                break
            q = self.queues[key]
            seq = q[0]
            # a prompt-logprobs prefill needs every prompt position's logits, so it computes them all
            look_up = self.blocks.enable_caching and not seq.wants_prompt_logprobs
            cached = self.blocks.match(seq) if look_up else []
            n = seq.num_tokens - len(cached) * self.blocks.block_size  # only uncached tokens count
            if batch and tokens + n > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(seq.block_table, seq.num_tokens, cached):
                break  # keep order: later arrivals must not overtake a sequence waiting for memory
            if seq.adapter_id is not None:
                try:
                    slot = self.adapters.acquire(seq.adapter_id)
                except AdapterError as e:
                    for s in q:
                        s.error = str(e)
                    failed.extend(q)
                    del self.queues[key]
                    continue
                if slot is None:
                    blocked.add(key)
                    continue
                seq.slot = slot
            q.popleft()
            if q:
                self.queues.move_to_end(key)  # next adapter's turn
            else:
                del self.queues[key]
            self.blocks.allocate(seq, cached, looked_up=look_up)
            if not seq.output_token_ids:  # its first prefill (a resumed sequence has output)
                seq.prompt_cached_tokens = seq.num_cached_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append(seq)
            tokens += n
        return batch

    def _decode_batch(self) -> list[Sequence]:
        batch: list[Sequence] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            # the newest token is not cached yet: the cache must hold num_tokens positions
            while not self.blocks.can_allocate(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.block_table, seq.num_tokens)
                batch.append(seq)
                i += 1
                continue
            break
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's cache and slot reference; it goes back to the front of its queue."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        self._release(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        log.info("preempted %s at %d tokens (KV cache full)", seq.request_id, seq.num_tokens)
        self.add(seq, front=True)

    def finish(self, seq: Sequence) -> None:
        """Drop a running or waiting sequence and free what it holds."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status == SeqStatus.WAITING:
            key = seq.adapter_id or BASE
            q = self.queues.get(key)
            if q is not None and seq in q:
                q.remove(seq)
                if not q:
                    del self.queues[key]
        self.blocks.free(seq.block_table)
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        if seq.adapter_id is not None and seq.slot >= 0:
            self.adapters.release(seq.adapter_id)
        seq.slot = -1
