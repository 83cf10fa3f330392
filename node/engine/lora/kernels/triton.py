"""Triton LoRA kernels behind the `LoRAKernel` interface: BGMV (one token per program, per-token
slot index, for decode batches where adapters are mostly distinct) and SGMV (tokens sorted into
per-slot tiles, each adapter's weights read once per tile, for prefill and decode batches that
share adapters). Ranks are heterogeneous: every slot is padded to the layer's rank R with zero
rows, and fused projections (q/k/v, gate/up) skip the zero off-diagonal blocks of B. This module
plans each step and launches; the jit kernels and their launch configs are in triton_jit.py.

Runs compiled on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (set before this module is
imported), which is how the tests check it without a GPU.

Layouts (as in kernels/base.py): a [S+1, R, in], b [S+1, R, out] with R = n_slices * rank and
slice i's rows i*rank..(i+1)*rank feeding only its columns; x [T, in]; y [T, >= offset + out]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from node.engine.layers.triton_util import check_device
from node.engine.lora.kernels.triton_jit import (
    _bgmv_expand_kernel,
    _bgmv_shrink_kernel,
    _sgmv_expand_kernel,
    _sgmv_shrink_kernel,
    expand_config,
    shrink_config,
)

# below this many tokens per active adapter BGMV is faster: SGMV's static decode grid is sized for
# the worst case and its tiles are mostly padding (measured: bench/NOTES.md, "The LoRA launch-setting
# sweep"); a long prefill runs faster as SGMV. The crossover is not measured.
SGMV_MIN_TOKENS = 8
MAX_SPLIT = 16  # split-K partials per shrink, unless split_k asks for more
# an eager step whose adapter tokens lie in at most GEMM_MAX_RUNS contiguous runs of one slot each,
# GEMM_MIN_TOKENS or more a run on average (a prompt's prefill), takes two dense GEMMs per run (the
# library's, on tensor cores) instead of SGMV's 16-row tiles: with an adapter, a 512-token prefill ran
# 38.5 ms against 22.2 base-only (bench/NOTES.md), about 16 ms of it LoRA. Thresholds not measured yet.
GEMM_MAX_RUNS = 4
GEMM_MIN_TOKENS = 32


# --------------------------------------------------------------------------------------------------
# per-step metadata
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TritonLoRAMeta:
    """Per-step tables in one int32 device buffer (static when a CUDA graph replays them).
    bgmv: buf = slots [T] (-1 = none). sgmv: buf = tok [T] (tokens sorted by slot) then the tile
    table [3, max_tiles] (slot, start in tok, length; length 0 = unused tile). gemm: no tables,
    `runs` on the host: (slot, first token, end) of each contiguous run of one adapter's tokens."""

    mode: str  # "bgmv" | "sgmv" | "gemm"
    num_tokens: int
    num_slots: int
    buf: torch.Tensor
    max_tiles: int = 0
    runs: tuple[tuple[int, int, int], ...] = ()

    @property
    def slots(self) -> torch.Tensor:
        return self.buf[: self.num_tokens]

    @property
    def tok(self) -> torch.Tensor:
        return self.buf[: self.num_tokens]

    @property
    def tiles(self) -> torch.Tensor:
        return self.buf[self.num_tokens :]


def adapter_runs(host_slots: list[int]) -> list[tuple[int, int, int]]:
    """(slot, first, end) of each maximal run of consecutive tokens with the same slot >= 0."""
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(host_slots):
        if s < 0:
            continue
        if runs and runs[-1][0] == s and runs[-1][2] == i:
            runs[-1] = (s, runs[-1][1], i + 1)
        else:
            runs.append((s, i, i + 1))
    return runs


def max_tiles(num_tokens: int, num_slots: int, block_m: int) -> int:
    """Upper bound of SGMV tiles for any slot assignment: sum_g ceil(n_g / M) <= T // M + groups."""
    return num_tokens // block_m + min(num_tokens, num_slots + 1)


def plan_tables(mode: str, host_slots: list[int], block_m: int, tiles_cap: int | None = None) -> list[int]:
    """The int32 table contents of a step (see TritonLoRAMeta), on the host."""
    if mode == "bgmv":
        return list(host_slots)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(host_slots):
        groups.setdefault(s if s >= 0 else -1, []).append(i)
    tok: list[int] = []
    t_slot: list[int] = []
    t_start: list[int] = []
    t_len: list[int] = []
    for s, idx in groups.items():
        for j in range(0, len(idx), block_m):
            t_slot.append(s)
            t_start.append(len(tok) + j)
            t_len.append(min(block_m, len(idx) - j))
        tok.extend(idx)
    n = len(t_slot) if tiles_cap is None else tiles_cap
    assert len(t_slot) <= n, (len(t_slot), n)
    pad = n - len(t_slot)
    return tok + t_slot + [-1] * pad + t_start + [0] * pad + t_len + [0] * pad


class TritonLoRAKernel:
    """The `LoRAKernel` interface on Triton. mode None picks per step: for an eager step (prepare)
    whose adapter tokens form a few long runs (GEMM_MAX_RUNS, GEMM_MIN_TOKENS), dense GEMMs per
    run ("gemm"); otherwise, and for the CUDA-graph decode steps (choose_mode), SGMV when the
    adapter tokens average >= SGMV_MIN_TOKENS per active slot (each adapter's weights are then read
    once per tile, not once per token), else BGMV. `shrink` returns float32 split-K partials
    [K, T, R] (h = their sum over K), which the same kernel's `expand` reduces on the fly."""

    def __init__(
        self,
        mode: str | None = None,
        *,
        block_m: int = 16,
        split_k: int | None = None,
        shrink_cfg: dict | None = None,
        expand_cfg: dict | None = None,
    ) -> None:
        if mode not in (None, "bgmv", "sgmv", "gemm"):
            raise ValueError(f"mode {mode!r} is not one of bgmv, sgmv, gemm (or None = automatic)")
        if block_m < 16 or block_m & (block_m - 1):
            raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
        if split_k is not None and split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {split_k}")
        self.mode = mode
        self.block_m = block_m
        self.split_k = split_k
        # launch settings laid over the defaults of triton_jit, e.g. {"BLOCK_K": 64, "num_warps": 4}
        # (tests use small tiles; bench/gpu_profile.py sweeps them)
        self.shrink_cfg = dict(shrink_cfg or {})
        self.expand_cfg = dict(expand_cfg or {})
        self._cols: dict[tuple, torch.Tensor] = {}
        self._sms: dict[torch.device, int] = {}

    # ---- planning ----
    def choose_mode(self, host_slots: list[int]) -> str:
        """BGMV or SGMV: the modes a CUDA graph can capture (their tables have a static size)."""
        if self.mode in ("bgmv", "sgmv"):
            return self.mode
        active = [s for s in host_slots if s >= 0]
        return "sgmv" if len(active) >= SGMV_MIN_TOKENS * max(1, len(set(active))) else "bgmv"

    def static_meta(self, mode: str, num_tokens: int, num_slots: int, device: torch.device | str) -> TritonLoRAMeta:
        """Tables of fixed size for `num_tokens` tokens (any slot assignment), for CUDA graphs."""
        mt = max_tiles(num_tokens, num_slots, self.block_m) if mode == "sgmv" else 0
        buf = torch.full((num_tokens + 3 * mt,), -1, dtype=torch.int32, device=device)
        if mode == "sgmv":
            buf[num_tokens + 2 * mt :] = 0
        return TritonLoRAMeta(mode, num_tokens, num_slots, buf, mt)

    def fill(self, meta: TritonLoRAMeta, host_slots: list[int]) -> None:
        """Write a step's tables into a static meta (one host-to-device copy, no sync on CUDA)."""
        assert len(host_slots) == meta.num_tokens, (len(host_slots), meta.num_tokens)
        vals = plan_tables(meta.mode, host_slots, self.block_m, meta.max_tiles if meta.mode == "sgmv" else None)
        meta.buf.copy_(_host_int32(vals, meta.buf.device), non_blocking=True)

    def _gemm_runs(self, host_slots: list[int]) -> list[tuple[int, int, int]] | None:
        if self.mode not in (None, "gemm"):
            return None
        runs = adapter_runs(host_slots)
        if self.mode == "gemm":
            return runs
        n = sum(end - start for _, start, end in runs)
        return runs if runs and len(runs) <= GEMM_MAX_RUNS and n >= GEMM_MIN_TOKENS * len(runs) else None

    def prepare(self, token_slots: torch.Tensor, num_slots: int, host_slots: list[int]) -> TritonLoRAMeta:
        """Plan this step on the host (tables sized exactly) and copy them to the device once."""
        runs = self._gemm_runs(host_slots)
        if runs is not None:
            empty = torch.empty(0, dtype=torch.int32, device=token_slots.device)
            return TritonLoRAMeta("gemm", len(host_slots), num_slots, empty, runs=tuple(runs))
        mode = self.choose_mode(host_slots)
        vals = plan_tables(mode, host_slots, self.block_m)
        dev = token_slots.device
        check_device(dev)
        t = len(host_slots)
        buf = _host_int32(vals, dev).to(dev, non_blocking=True)
        return TritonLoRAMeta(mode, t, num_slots, buf, (len(vals) - t) // 3 if mode == "sgmv" else 0)

    # ---- launch parameters ----
    def _num_sms(self, dev: torch.device) -> int:
        if dev.type != "cuda":
            return 1
        if dev not in self._sms:
            self._sms[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
        return self._sms[dev]

    def _split(self, programs: int, k_in: int, block_k: int, dev: torch.device) -> tuple[int, int]:
        """(splits, k per split): about 8 programs per multiprocessor, so enough weight loads are in
        flight to cover memory latency; no empty split. At most MAX_SPLIT: every expand program
        re-reads all the partials of its tokens (the sweep behind both: bench/NOTES.md)."""
        chunks = triton.cdiv(k_in, block_k)
        want = self.split_k or min(MAX_SPLIT, triton.cdiv(8 * self._num_sms(dev), max(1, programs)))
        split = max(1, min(want, chunks))
        per = triton.cdiv(chunks, split) * block_k
        return triton.cdiv(k_in, per), per

    def _cols_table(self, slices: tuple[int, ...], dev: torch.device) -> torch.Tensor:
        key = (slices, dev)
        if key not in self._cols:
            offs = [0]
            for s in slices:
                offs.append(offs[-1] + s)
            self._cols[key] = torch.tensor(offs, dtype=torch.int32).to(dev)
        return self._cols[key]

    # ---- the interface ----
    def shrink(
        self, x: torch.Tensor, a: torch.Tensor, meta: TritonLoRAMeta, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Semantics: h[t] = A[s_t] @ x[t] for tokens with a slot, h[t] = 0 for s_t = -1; returns
        float32 partials hk [K, T, R] with h = hk.sum(0). x [T, in], a [S+1, R, in]."""
        t, k_in = x.shape
        _, r, k_in_a = a.shape
        assert k_in == k_in_a and t == meta.num_tokens, (x.shape, a.shape, meta.num_tokens)
        assert x.stride(1) == 1 and a.stride(2) == 1, "last dims must be contiguous"
        dev = x.device
        if meta.mode == "gemm":  # h in x's dtype (the library GEMM's output), written in place: 2 ops a run
            covered = sum(end - start for _, start, end in meta.runs) == t
            if out is None:  # base-only tokens outside the runs take h = 0
                h = (torch.empty if covered else torch.zeros)(1, t, r, dtype=x.dtype, device=dev)
            else:
                h = out.zero_()  # any partials past the first stay 0
            for s, start, end in meta.runs:
                if h.dtype == x.dtype:
                    torch.mm(x[start:end], a[s].t(), out=h[0, start:end])
                else:
                    h[0, start:end] = torch.mm(x[start:end], a[s].t())
            return h
        cfg = {**shrink_config(meta.mode, r, x.dtype), **self.shrink_cfg}
        block_r, block_k = cfg["BLOCK_R"], cfg["BLOCK_K"]
        grid_tr = (t if meta.mode == "bgmv" else meta.max_tiles) * triton.cdiv(r, block_r)
        split, per = self._split(grid_tr, k_in, block_k, dev)
        h = out if out is not None else torch.empty(split, t, r, dtype=torch.float32, device=dev)
        assert h.shape == (split, t, r) and h.dtype == torch.float32 and h.stride(2) == 1, h.shape
        if t == 0:
            return h
        if meta.mode == "bgmv":
            _bgmv_shrink_kernel[(t, triton.cdiv(r, block_r), split)](
                x,
                a,
                h,
                meta.slots,
                k_in,
                r,
                per,
                x.stride(0),
                a.stride(0),
                a.stride(1),
                h.stride(0),
                h.stride(1),
                **cfg,
            )
        else:
            _sgmv_shrink_kernel[(meta.max_tiles, triton.cdiv(r, block_r), split)](
                x,
                a,
                h,
                meta.tok,
                meta.tiles,
                meta.max_tiles,
                k_in,
                r,
                per,
                x.stride(0),
                a.stride(0),
                a.stride(1),
                h.stride(0),
                h.stride(1),
                BLOCK_M=self.block_m,
                **cfg,
            )
        return h

    def expand(
        self,
        y: torch.Tensor,
        h: torch.Tensor,
        b: torch.Tensor,
        meta: TritonLoRAMeta,
        offset: int,
        slices: tuple[int, ...] | None = None,
    ) -> None:
        """Semantics: y[t, off:off+out] += B[s_t] @ h[t] for tokens with a slot (others untouched),
        h = hk.sum(0). With `slices` (fused outputs), slice i's columns take only rank rows
        i*R/n..(i+1)*R/n, so B's zero off-diagonal blocks are never read."""
        split, t, r = h.shape
        _, r_b, out = b.shape
        assert r == r_b and t == meta.num_tokens, (h.shape, b.shape, meta.num_tokens)
        assert b.stride(2) == 1 and y.stride(1) == 1, "last dims must be contiguous"
        slices = tuple(slices) if slices else (out,)
        assert sum(slices) == out and r % len(slices) == 0, (slices, out, r)
        if t == 0:
            return
        rank = r // len(slices)
        dev = y.device
        yv = y[:, offset : offset + out]
        if meta.mode == "gemm":  # B whole, its zero off-diagonal blocks too: one GEMM a run
            hs = (h.sum(0) if split > 1 else h[0]).to(b.dtype)  # no copy when shrink made it
            for s, start, end in meta.runs:
                yv[start:end].addmm_(hs[start:end], b[s])
            return
        cols = self._cols_table(slices, dev)
        cfg = {**expand_config(meta.mode, rank, y.dtype), **self.expand_cfg}
        n_tiles = triton.cdiv(max(slices), cfg["BLOCK_N"])
        if meta.mode == "bgmv":
            _bgmv_expand_kernel[(t, len(slices), n_tiles)](
                h,
                b,
                yv,
                meta.slots,
                cols,
                rank,
                split,
                h.stride(0),
                h.stride(1),
                b.stride(0),
                b.stride(1),
                yv.stride(0),
                **cfg,
            )
        else:
            _sgmv_expand_kernel[(meta.max_tiles, len(slices), n_tiles)](
                h,
                b,
                yv,
                meta.tok,
                meta.tiles,
                cols,
                meta.max_tiles,
                rank,
                split,
                h.stride(0),
                h.stride(1),
                b.stride(0),
                b.stride(1),
                yv.stride(0),
                BLOCK_M=self.block_m,
                **cfg,
            )


def _host_int32(vals: list[int], dev: torch.device) -> torch.Tensor:
    # pinned on CUDA so the copy to the device is asynchronous (a pageable copy syncs the stream)
    return torch.tensor(vals, dtype=torch.int32, pin_memory=dev.type == "cuda")
