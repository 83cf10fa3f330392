"""Decode on static buffers for bucketed batch sizes (nano-vllm's capture_cudagraph): a batch of B
sequences runs padded to the smallest bucket >= B, reading its inputs, attention tables and LoRA
tables from buffers that never move, so each (bucket, LoRA mode) is captured once as a CUDA graph
and every later step is one host-to-device copy of the inputs plus one graph replay. Without
capture (CPU tests under the Triton interpreter, debugging) the same code runs eagerly.

Padded rows carry token 0 at position 0, no adapter, and write their K/V into the runner's
scratch block; their logits are computed and ignored."""

from __future__ import annotations

import logging
import time

import torch

from node.engine.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
MODES = ("base", "bgmv", "sgmv")


def buckets_for(max_batch: int) -> list[int]:
    """Captured batch sizes: the standard buckets below max_batch, and max_batch itself."""
    return [b for b in BUCKETS if b < max_batch] + [max_batch]


class DecodeGraphs:
    """Static decode buffers and, on CUDA, one captured graph per (bucket, LoRA mode)."""

    def __init__(self, runner, capture: bool) -> None:
        cfg = runner.config
        self.runner = runner
        self.kernel = runner.mapping.kernel
        self.capture = capture
        self.max_batch = cfg.max_num_seqs
        self.buckets = buckets_for(self.max_batch)
        self.block_size = cfg.block_size
        self.max_blocks = min(cfg.blocks_for(cfg.context_len(runner.cfg)), runner.num_blocks)
        self.scratch = runner.scratch_block
        m, dev = self.max_batch, runner.device
        # one int64 buffer: tokens [M] | positions [M] | KV slot per token [M] | context lens [M]
        # | tables [M, max_blocks]
        n = 4 * m + m * self.max_blocks
        self.buf = torch.zeros(n, dtype=torch.int64, device=dev)
        self.host = torch.zeros(n, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self.np = self.host.numpy()
        self.tokens, self.positions = self.buf[:m], self.buf[m : 2 * m]
        self.slot_mapping, self.context_lens = self.buf[2 * m : 3 * m], self.buf[3 * m : 4 * m]
        self.tables = self.buf[4 * m :].view(m, self.max_blocks)
        self._pad_rows(0, m)
        self.buf.copy_(self.host)
        self.logits = torch.empty(m, runner.cfg.vocab_size, dtype=runner.dtype, device=dev)
        s = cfg.num_slots
        self.lora_meta = {
            (b, mode): self.kernel.static_meta(mode, b, s, dev) for b in self.buckets for mode in MODES[1:]
        }
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.pool = None
        if capture:
            self._capture_all()

    # ---- inputs ----
    def _pad_rows(self, lo: int, hi: int) -> None:
        m, mb, a = self.max_batch, self.max_blocks, self.np
        a[lo:hi] = 0
        a[m + lo : m + hi] = 0
        a[2 * m + lo : 2 * m + hi] = self.scratch * self.block_size
        a[3 * m + lo : 3 * m + hi] = 1
        for i in range(lo, hi):
            a[4 * m + i * mb] = self.scratch

    def _fill(self, seqs, bucket: int) -> None:
        m, mb, bs, a = self.max_batch, self.max_blocks, self.block_size, self.np
        for i, s in enumerate(seqs):
            pos = s.num_tokens - 1
            table = s.block_table
            a[i] = s.output_token_ids[-1] if s.output_token_ids else s.prompt_token_ids[-1]
            a[m + i] = pos
            a[2 * m + i] = table[pos // bs] * bs + pos % bs
            a[3 * m + i] = pos + 1
            a[4 * m + i * mb : 4 * m + i * mb + len(table)] = table
        self._pad_rows(len(seqs), bucket)
        n = 4 * m + bucket * mb
        # one copy; the host buffer is reused next step, after this step's tokens came back (a sync)
        self.buf[:n].copy_(self.host[:n], non_blocking=True)

    # ---- the step ----
    def _forward(self, bucket: int, mode: str) -> None:
        r = self.runner
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.tables[:bucket],
            query_index=None,
            query_valid=None,
            mask=None,
            num_seqs=bucket,
            context_lens=self.context_lens[:bucket],
            window=r.cfg.sliding_window,
        )
        r.mapping.set_meta(None if mode == "base" else self.lora_meta[(bucket, mode)])
        hidden = r.model(self.tokens[:bucket], self.positions[:bucket], meta, r.kv_caches)  # [bucket, D]
        self.logits[:bucket].copy_(r.model.compute_logits(hidden))

    @torch.inference_mode()
    def run(self, seqs) -> torch.Tensor:
        """One decode step of `seqs` (at most max_batch); returns logits [B, vocab] (a view of a
        static buffer: use it before the next step)."""
        b = len(seqs)
        bucket = next(x for x in self.buckets if x >= b)
        self._fill(seqs, bucket)
        slots = [s.slot for s in seqs] + [-1] * (bucket - b)
        mode = "base" if all(x < 0 for x in slots) else self.kernel.choose_mode(slots)
        if mode != "base":
            self.kernel.fill(self.lora_meta[(bucket, mode)], slots)
        if self.capture:
            self.graphs[(bucket, mode)].replay()
        else:
            self._forward(bucket, mode)
        return self.logits[:b]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        t0 = time.perf_counter()
        for bucket in reversed(self.buckets):  # largest first: smaller graphs reuse its memory pool
            for mode in MODES:
                self._forward(bucket, mode)  # warm-up: compiles the Triton kernels, fills kernel caches
                torch.cuda.synchronize(self.runner.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, self.pool):
                    self._forward(bucket, mode)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[(bucket, mode)] = graph
        torch.cuda.synchronize(self.runner.device)
        self.runner.mapping.set_meta(None)
        log.info(
            "captured %d decode graphs (buckets %s) in %.1f s", len(self.graphs), self.buckets, time.perf_counter() - t0
        )
