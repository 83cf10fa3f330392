"""The torch reference of the LoRAKernel interface (kernels/base.py): the CPU path's kernel, and
the yardstick the Triton kernels are tested against."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from node.engine.layers.attention import to_device

# grouped mode runs one matmul per segment (a run of one slot's tokens) once segments average
# this many rows: a few microseconds per op are then small next to the multiply, and there is no
# padding and no copy; below it, one bmm over [G, M] padded groups keeps the ops per layer few
SEGMENT_MIN_ROWS = 16
# ... or once [G, M] would hold more padding than tokens, and more than this many rows
PAD_MAX_ROWS = 64
LAYOUTS = ("padded", "sorted", "runs")


@dataclass(slots=True)
class LoRAMeta:
    """Per-step metadata of the torch reference kernel."""

    num_tokens: int
    num_slots: int
    mode: str  # "grouped" | "dense" | "gather"
    rows: torch.Tensor | None = None  # dense, gather: [T] int64 slot per token, S for base-only tokens
    # grouped mode packs the adapter tokens into rows (see _plan_groups): "padded" as [G, M] groups
    # of slots, one bmm; "runs" and "sorted" as (slot, lo, hi) segments of rows, a matmul each
    layout: str = "padded"
    groups: int = 0  # padded: G (an unused slot inside a range is an all-padding group)
    group_range: tuple[int, int] | None = None  # padded groups are slots lo..hi-1: slice the stacks
    group_slots: torch.Tensor | None = None  # [G] padded groups' slots when they are not a range
    max_per_slot: int = 0  # M
    segments: tuple[tuple[int, int, int], ...] = ()
    tok_idx: torch.Tensor | None = None  # token of each packed row
    identity: bool = False  # packed rows are the tokens: read x and write y in place
    pad: torch.Tensor | None = None  # padded: [G, M, 1] bool, True on padding rows; None if there are none
    # dense mode: rows as [T, 1, 1], expanded per rank for gather/scatter along the slot dim
    dense_idx: torch.Tensor | None = None


class TorchLoRAKernel:
    """Reference kernel with three strategies:
    - grouped (SGMV-like, the automatic choice): only the adapter tokens, packed once per step so
      that each active adapter's weights are read once per layer, in place (never copied per
      token); h stays in the packed order between shrink and expand; the zero blocks of a fused
      B are skipped. On CPU every torch op costs microseconds however small, and a decode step's
      LoRA is mostly reading adapter weights, so the row layout is chosen per step:
        padded  decode-sized groups: [G, M] rows, one bmm per projection (and block), the result
                index-added into y; slots that are a range are a view of the stacks
        runs    long runs of one slot in token order (prefill): one matmul per run, reading x
                and adding into y in place, no gather, no scatter, no padding
        sorted  long or uneven groups otherwise: tokens sorted by slot, one matmul per slot
    - dense: every token times every slot, keep its own: (S+1)*R*in reads and T*(S+1)*R*in
      multiply-adds in one BLAS call.
    - gather (BGMV-like): copies each token's adapter weights, 3*T*R*in traffic.
    dense and gather stay as independent references (tests compare all three); grouped reads no
    more weights than either and multiplies fewer rows in every batch, so automatic picks it."""

    def __init__(self, mode: str | None = None, layout: str | None = None) -> None:
        if mode not in (None, "grouped", "dense", "gather"):
            raise ValueError(f"mode {mode!r} is not one of grouped, dense, gather (or None = automatic)")
        if layout not in (None, *LAYOUTS):
            raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)} (or None = by batch)")
        self.mode = mode
        self.layout = layout  # grouped mode's row layout; None = chosen per step (_plan_groups)

    # ---- planning (host lists, once per step) ----
    def prepare(self, token_slots: torch.Tensor, num_slots: int, host_slots: list[int]) -> LoRAMeta:
        """Plan this step's strategy (dense and gather: map -1 to the zero row S)."""
        meta = LoRAMeta(num_tokens=len(host_slots), num_slots=num_slots, mode=self.mode or "grouped")
        if meta.mode == "grouped":
            _plan_groups(meta, host_slots, token_slots.device, self.layout)
            return meta
        meta.rows = torch.where(token_slots < 0, torch.full_like(token_slots, num_slots), token_slots)
        if meta.mode == "dense":
            meta.dense_idx = meta.rows.view(-1, 1, 1)
        return meta

    # ---- the interface ----
    def shrink(self, x: torch.Tensor, a: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
        """h[t] = A[s_t] @ x[t] (grouped: in packed row order)."""
        if meta.mode == "grouped":
            return _grouped_shrink(x, a, meta)
        s1, r, _ = a.shape
        if meta.mode == "dense":
            # [T, in] @ [in, (S+1)*R] -> [T, S+1, R], then keep each token's own slot
            full = (x @ a.reshape(s1 * r, -1).t()).view(-1, s1, r)
            return full.gather(1, meta.dense_idx.expand(-1, 1, r)).view(-1, r)
        # [T, R, in] @ [T, in, 1] -> [T, R]
        return torch.bmm(a.index_select(0, meta.rows), x.unsqueeze(-1)).squeeze(-1)

    def expand(
        self,
        y: torch.Tensor,
        h: torch.Tensor,
        b: torch.Tensor,
        meta: LoRAMeta,
        offset: int,
        slices: tuple[int, ...] | None = None,
    ) -> None:
        """y[t, off:off+out] += B[s_t] @ h[t] (dense and gather multiply the zero blocks of a fused B)."""
        s1, r, out = b.shape
        ys = y if offset == 0 and out == y.shape[1] else y[:, offset : offset + out]
        if meta.mode == "grouped":
            _grouped_expand(ys, h, b, meta, slices)
            return
        if meta.mode == "dense":
            # scatter h into its slot's columns: [T, (S+1)*R] @ [(S+1)*R, out] -> [T, out]
            wide = h.new_zeros(meta.num_tokens, s1, r)
            wide.scatter_(1, meta.dense_idx.expand(-1, 1, r), h.unsqueeze(1))
            delta = wide.view(meta.num_tokens, s1 * r) @ b.reshape(s1 * r, out)  # a view unless b is strided
        else:
            # [T, 1, R] @ [T, R, out] -> [T, out]
            delta = torch.bmm(h.unsqueeze(1), b.index_select(0, meta.rows)).squeeze(1)
        ys += delta


def _plan_groups(meta: LoRAMeta, host_slots: list[int], dev: torch.device, layout: str | None) -> None:
    """Lay out the adapter tokens (`layout`, or by batch): "runs" = segments in token order when
    runs of one slot are long (prefill: a sequence's tokens are adjacent); "sorted" = segments of
    the tokens sorted by slot (stable) when groups are long or uneven; else "padded"."""
    members: dict[int, list[int]] = {}
    runs: list[tuple[int, int, int]] = []  # (slot, lo, hi) of each run of one slot in token order
    for i, s in enumerate(host_slots):
        if s < 0:
            continue
        members.setdefault(s, []).append(i)
        if runs and runs[-1][0] == s and runs[-1][2] == i:
            runs[-1] = (s, runs[-1][1], i + 1)
        else:
            runs.append((s, i, i + 1))
    if not members:  # every token base-only: no segment, nothing to add
        meta.layout, meta.identity = "runs", True
        return
    n = sum(len(v) for v in members.values())
    meta.max_per_slot = max(len(v) for v in members.values())
    if layout is None:
        pads = len(members) * meta.max_per_slot - n
        if n >= SEGMENT_MIN_ROWS * len(runs):
            layout = "runs"
        elif n >= SEGMENT_MIN_ROWS * len(members) or pads > max(n, PAD_MAX_ROWS):
            layout = "sorted"
        else:
            layout = "padded"
    meta.layout = layout
    if layout == "runs":
        _plan_segments(meta, runs, None, dev)
    elif layout == "sorted":
        _plan_sorted_segments(meta, members, dev)
    else:
        _plan_padded(meta, members, dev)


def _plan_segments(
    meta: LoRAMeta, segments: list[tuple[int, int, int]], order: list[int] | None, dev: torch.device
) -> None:
    """segments (slot, lo, hi) over packed rows; order = token of each packed row, None = the tokens
    themselves (no gather or scatter: each segment reads x and writes y in place)."""
    meta.segments = tuple(segments)
    meta.identity = order is None
    if order is not None:
        meta.tok_idx = to_device(torch.tensor(order, dtype=torch.int64), dev)


def _plan_sorted_segments(meta: LoRAMeta, members: dict[int, list[int]], dev: torch.device) -> None:
    segments, order = [], []
    for s in sorted(members):
        segments.append((s, len(order), len(order) + len(members[s])))
        order += members[s]
    _plan_segments(meta, segments, order, dev)


def _plan_padded(meta: LoRAMeta, members: dict[int, list[int]], dev: torch.device) -> None:
    active = sorted(members)
    g, m = len(active), meta.max_per_slot
    lo, hi = active[0], active[-1] + 1
    # unused slots inside lo..hi become all-padding groups, so the stacks are sliced (a view)
    # instead of gathered: a hole costs M padding rows, a gather about two extra reads of every
    # active adapter's weights (the copy, then the bmm reading it)
    if (hi - lo - g) * m <= 2 * g:
        slots = list(range(lo, hi))
        meta.group_range = (lo, hi)
    else:
        slots = active
        meta.group_slots = to_device(torch.tensor(slots, dtype=torch.int64), dev)
    meta.groups = len(slots)
    # padding rows read token 0 and are zeroed in h, so they add exactly 0 to token 0 in expand
    idx, pad = [], []
    for s in slots:
        v = members.get(s, [])
        idx += v + [0] * (m - len(v))
        pad += [False] * len(v) + [True] * (m - len(v))
    meta.identity = idx == list(range(meta.num_tokens))  # implies no padding
    meta.tok_idx = to_device(torch.tensor(idx, dtype=torch.int64), dev)
    if any(pad):
        meta.pad = to_device(torch.tensor(pad, dtype=torch.bool).view(len(slots), m, 1), dev)


def _stack(w: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
    """[G, ...] stacks of the groups' slots: a view when they are a range."""
    if meta.group_range is not None:
        return w[meta.group_range[0] : meta.group_range[1]]
    return w.index_select(0, meta.group_slots)


@functools.lru_cache(maxsize=256)  # a handful of projection shapes, asked for on every layer call
def _rank_blocks(r: int, out: int, slices: tuple[int, ...] | None) -> list[tuple[slice, slice]]:
    """(rank rows, output columns) of each nonzero block of a block-diagonal B."""
    if not slices or len(slices) == 1 or sum(slices) != out or r % len(slices):
        return [(slice(0, r), slice(0, out))]
    per, col, blocks = r // len(slices), 0, []
    for i, o in enumerate(slices):
        blocks.append((slice(i * per, (i + 1) * per), slice(col, col + o)))
        col += o
    return blocks


def _grouped_shrink(x: torch.Tensor, a: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
    xs = x if meta.identity else x.index_select(0, meta.tok_idx)  # [packed rows, in]
    if meta.layout != "padded":
        h = x.new_empty(xs.shape[0], a.shape[1])  # [rows, R]; rows outside every segment are never read
        for s, lo, hi in meta.segments:
            torch.mm(xs[lo:hi], a[s].t(), out=h[lo:hi])
        return h
    h = torch.bmm(xs.reshape(meta.groups, meta.max_per_slot, -1), _stack(a, meta).transpose(1, 2))  # [G, M, R]
    if meta.pad is not None:
        h.masked_fill_(meta.pad, 0)
    return h


def _grouped_expand(
    ys: torch.Tensor, h: torch.Tensor, b: torch.Tensor, meta: LoRAMeta, slices: tuple[int, ...] | None
) -> None:
    out = b.shape[2]
    blocks = _rank_blocks(b.shape[1], out, slices)
    if meta.layout != "padded":
        # each (segment, block) product lands in its rows and columns: y itself in token order,
        # else a packed buffer that blocks and segments cover exactly, index-added once
        d = ys if meta.identity else h.new_empty(h.shape[0], out)
        for s, lo, hi in meta.segments:
            for rows, cols in blocks:
                if meta.identity:
                    d[lo:hi, cols].addmm_(h[lo:hi, rows], b[s, rows, cols])
                else:
                    torch.mm(h[lo:hi, rows], b[s, rows, cols], out=d[lo:hi, cols])
        if not meta.identity:
            ys.index_add_(0, meta.tok_idx, d)
        return
    wb = _stack(b, meta)
    parts = [torch.bmm(h[..., rows], wb[:, rows, cols]) for rows, cols in blocks]  # [G, M, out_i]
    d = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).view(-1, out)
    if meta.identity:
        ys += d
    else:
        ys.index_add_(0, meta.tok_idx, d)
