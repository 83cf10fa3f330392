"""One Triton launch lays an adapter out into its slot row on the device, from the package's tensors
as read (raw bytes copied to the device in one copy): the dtype conversion, B's scaling and
transposition, the rank padding and the fused projections' block-diagonal placement all happen
there, instead of a host pass over the bytes and a second host image (issue 21's cold loads; the
host-side layout is layers.LinearWithLoRA.slot_image, which this must equal).

A plan lists jobs: job j copies a rows x cols block, element (i, k) from
src[src_off + i * src_rs + k * src_cs] to dst[dst_off + i * dst_rs + k], times scale. Every job of
one plan group reads one source dtype (a package may mix them); a group is one launch whose
programs each take one job's BLOCK_K columns, all of its rows (rows <= the slot's rank)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from node.engine.layers.triton_util import check_device

BLOCK_K = 256  # columns a program copies: a 16-row block of bf16 is 8 KiB read and written


@triton.jit
def _slot_layout_kernel(
    src_ptr, dst_ptr, jobs_ptr, progs_ptr, scale_ptr, R_P: tl.constexpr, BLOCK_K: tl.constexpr, TO_BF16: tl.constexpr
):
    pid = tl.program_id(0)
    j = tl.load(progs_ptr + 2 * pid)
    kb = tl.load(progs_ptr + 2 * pid + 1)
    job = jobs_ptr + j * 7
    src_off = tl.load(job)
    rows = tl.load(job + 1)
    cols = tl.load(job + 2)
    src_rs = tl.load(job + 3)
    src_cs = tl.load(job + 4)
    dst_off = tl.load(job + 5)
    dst_rs = tl.load(job + 6)
    scale = tl.load(scale_ptr + j)
    i = tl.arange(0, R_P)[:, None]
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    m = (i < rows) & (k < cols)
    v = tl.load(src_ptr + src_off + i * src_rs + k * src_cs, mask=m, other=0.0)
    out = v.to(tl.float32) * scale
    if TO_BF16:
        # round to nearest even in the bits, as torch does on the host: Triton's interpreter would
        # truncate, so the rounding is spelled out and the CPU tests check the GPU's arithmetic
        bits = out.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True)
    tl.store(dst_ptr + dst_off + i * dst_rs + k, out.to(dst_ptr.dtype.element_ty), mask=m)


@dataclass(frozen=True, slots=True)
class LayoutGroup:
    """The jobs of one source dtype: jobs [J, 7] int64, scales [J] float32, progs [P, 2] int32."""

    dtype: torch.dtype
    jobs: torch.Tensor
    scales: torch.Tensor
    progs: torch.Tensor
    r_p: int


@dataclass(frozen=True, slots=True)
class SlotPlan:
    """How a raw buffer's first `nbytes` bytes become a slot row."""

    groups: tuple[LayoutGroup, ...]
    nbytes: int

    def pinned(self) -> SlotPlan:
        """The plan with its tables in pinned memory (CUDA). From pageable memory a copy to the GPU
        waits for everything queued on its stream first: the slot write's copy stream holds the raw
        copy and waits for the running step, so the engine thread stalled a step (run 4: 19.8 ms
        against a median of 8.45 during a load)."""
        return SlotPlan(
            tuple(
                replace(g, jobs=g.jobs.pin_memory(), scales=g.scales.pin_memory(), progs=g.progs.pin_memory())
                for g in self.groups
            ),
            self.nbytes,
        )


def plan_layout(buffer: torch.Tensor, parts, nbytes: int) -> SlotPlan:
    """`parts`: (src view into `buffer`, transposed, dst_off, dst_rs, scale) per block, as
    LinearWithLoRA.slot_parts gives them. Host work, done once per adapter on the loader thread."""
    by_dtype: dict[torch.dtype, list] = {}
    base = buffer.data_ptr()
    for src, transposed, dst_off, dst_rs, scale in parts:
        esize = src.element_size()
        byte_off = src.data_ptr() - base
        if byte_off % esize:
            raise ValueError(f"a {src.dtype} tensor at byte {byte_off} of the buffer is not aligned")
        if transposed:  # src [cols, rows] read as its transpose
            cols, rows = src.shape
            src_rs, src_cs = src.stride(1), src.stride(0)
        else:
            rows, cols = src.shape
            src_rs, src_cs = src.stride(0), src.stride(1)
        by_dtype.setdefault(src.dtype, []).append(
            (byte_off // esize, rows, cols, src_rs, src_cs, dst_off, dst_rs, scale)
        )
    groups = []
    for dtype, jobs in by_dtype.items():
        table = torch.tensor([job[:7] for job in jobs], dtype=torch.int64)
        # one program per BLOCK_K columns of each job: (job, column block), ~10k rows for the 8B shape
        blocks = (table[:, 2] + BLOCK_K - 1) // BLOCK_K
        job_of = torch.repeat_interleave(torch.arange(len(jobs)), blocks)
        first = torch.repeat_interleave(torch.cumsum(blocks, 0) - blocks, blocks)
        progs = torch.stack([job_of, torch.arange(len(job_of)) - first], 1).to(torch.int32)
        groups.append(
            LayoutGroup(
                dtype,
                table,
                torch.tensor([job[7] for job in jobs], dtype=torch.float32),
                progs,
                triton.next_power_of_2(max(int(table[:, 1].max()), 1)),
            )
        )
    return SlotPlan(tuple(groups), nbytes)


def lay_out_slot(raw: torch.Tensor, row: torch.Tensor, plan: SlotPlan) -> None:
    """Write the plan's blocks of `raw` (uint8, on row's device) into the zeroed slot row `row`.
    One launch per source dtype; on the caller's current stream."""
    check_device(row.device)
    for g in plan.groups:
        if not len(g.progs):
            continue
        src = raw[: raw.numel() // g.dtype.itemsize * g.dtype.itemsize].view(g.dtype)
        jobs = g.jobs.to(row.device, non_blocking=True)
        progs = g.progs.to(row.device, non_blocking=True)
        scales = g.scales.to(row.device, non_blocking=True)
        _slot_layout_kernel[(len(g.progs),)](
            src, row, jobs, progs, scales, R_P=g.r_p, BLOCK_K=BLOCK_K, TO_BF16=row.dtype == torch.bfloat16, num_warps=4
        )
