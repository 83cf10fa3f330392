"""The model runner: owns the model, the KV cache tensors and the LoRA mapping; turns a scheduled
batch into flat input tensors, runs one forward pass and returns the last-token logits."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from node.adapters.weights import TENSOR_ALIGN, module_dims
from node.engine.config import EngineConfig, ModelConfig
from node.engine.layers.attention import allocate_kv, build_metadata, kv_bytes_per_token, to_device
from node.engine.lora.host_pool import HostPool
from node.engine.lora.mapping import LoRAMapping
from node.engine.lora.weights import LoadedAdapter
from node.engine.model import CausalLM
from node.engine.sequence import Sequence

if TYPE_CHECKING:
    from node.engine.lora.kernels.slot_layout import SlotPlan

log = logging.getLogger(__name__)

CPU_KV_DEFAULT = 512 << 20
ALIGN = 64  # elements: every stack in the slot buffer starts 128-byte aligned (bf16)
# host memory the adapter pool takes by default (pinned at start on CUDA): 34 buffers of the 8B shape's
# 168 MB (a 32-adapter host cache), 10 of a 70B's 0.8 GB; EngineConfig.host_pool_buffers sets the count
HOST_POOL_BUDGET = 8 << 30


@contextmanager
def _allocating(what: str, nbytes: int, device: torch.device, fix: str):
    """An allocation too large for the device said in one line that names the setting, not torch's
    allocator trace (`node run --slots 100000` asked a CPU for 39 GB)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        raise ValueError(
            f"{what} need {nbytes / 2**30:.1f} GiB of {device} memory, more than it can give: {fix}"
        ) from None


class SlotCopy:
    """A slot write in flight on the copy stream; holds the host image until the copy is done."""

    __slots__ = ("event", "image")

    def __init__(self, event, image: torch.Tensor | None) -> None:
        self.event = event
        self.image = image

    def query(self) -> bool:
        return self.event.query()

    def synchronize(self) -> None:
        self.event.synchronize()


class ModelRunner:
    def __init__(
        self, config: EngineConfig, model_cfg: ModelConfig, model: CausalLM, mapping: LoRAMapping, dtype: torch.dtype
    ) -> None:
        self.config = config
        self.cfg = model_cfg
        self.model = model
        self.mapping = mapping
        self.dtype = dtype
        self.device = torch.device(config.device)
        self.tp = None  # parallel.TensorParallel on rank 0 of a TP engine: steps and slot writes reach every rank
        cuda = self.device.type == "cuda"
        # build each adapter's slot image on the loader thread, so a slot load is one copy
        self.prebuilt_images = config.slot_images if config.slot_images is not None else cuda
        # slot_buf [S+1, P]: every layer's stacks of one slot, contiguous; slot_layout: (layer, module,
        # A offset, B offset) of each LoRA module in a row
        self.slot_buf, self.slot_layout = self._allocate_slot_buffer()
        # CUDA: slot writes are asynchronous copies on this side stream (see write_slot)
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        # raw adapter buffers, pinned at start, laid out into a slot on the device; None: host-built images
        self.host_pool = self._make_host_pool() if self.prebuilt_images else None
        self.static_decode = self._static_decode_mode()
        model.use_fused_ops(config.fused_ops if config.fused_ops is not None else self.static_decode)
        self.num_blocks = self._num_blocks()
        # static decode pads batches up to a bucket: the padded rows write their K/V into one extra block
        self.scratch_block = self.num_blocks if self.static_decode else None
        total = self.num_blocks + (1 if self.static_decode else 0)
        kv_bytes = total * self._block_bytes()
        with _allocating(f"{self.num_blocks} KV cache blocks", kv_bytes, self.device, "fewer KV blocks"):
            self.kv_caches = [
                allocate_kv(
                    total,
                    config.block_size,
                    model_cfg.num_kv_heads,
                    model_cfg.head_dim,
                    dtype,
                    config.kv_cache_dtype,
                    self.device,
                )
                for _ in range(model_cfg.num_layers)
            ]
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB, %s)",
            self.num_blocks,
            config.block_size,
            self.num_blocks * self._block_bytes() / 2**20,
            "fp8" if config.kv_cache_dtype == "fp8" else str(dtype).removeprefix("torch."),
        )
        self.graphs = None
        if self.static_decode:
            from node.engine.cuda_graph import DecodeGraphs

            self.graphs = DecodeGraphs(self, capture=cuda and config.cuda_graphs == "auto")

    def _static_decode_mode(self) -> bool:
        mode = self.config.cuda_graphs
        triton_kernel = hasattr(self.mapping.kernel, "static_meta")
        if mode == "static" and not triton_kernel:
            raise ValueError("cuda_graphs='static' needs the Triton LoRA kernel (TritonLoRAKernel)")
        return mode == "static" or (mode == "auto" and self.device.type == "cuda" and triton_kernel)

    def _allocate_slot_buffer(self) -> tuple[torch.Tensor, list[tuple[int, object, int, int]]]:
        # one [S+1, P] buffer; each layer's A/B stacks are views [S+1, n*R, in] / [S+1, n*R, out]
        # into it, so a slot is one contiguous row that a single copy fills (row S stays zero: base only)
        r = self.config.max_lora_rank
        layout, p = [], 0
        for idx, layer in self.model.lora_layers():
            (ra, ca), (rb, cb) = layer.lora_shapes(r)
            a_off = p
            p += -(-ra * ca // ALIGN) * ALIGN
            b_off = p
            p += -(-rb * cb // ALIGN) * ALIGN
            layout.append((idx, layer, a_off, b_off))
        s1 = self.config.num_slots + 1
        nbytes = s1 * p * self.dtype.itemsize
        with _allocating(f"{s1 - 1} adapter slots of rank {r}", nbytes, self.device, "fewer slots or a lower rank"):
            buf = torch.zeros(s1, p, dtype=self.dtype, device=self.device)
        for _, layer, a_off, b_off in layout:
            (ra, ca), (rb, cb) = layer.lora_shapes(r)
            layer.attach_lora(
                buf[:, a_off : a_off + ra * ca].view(s1, ra, ca), buf[:, b_off : b_off + rb * cb].view(s1, rb, cb), r
            )
        return buf, layout

    def _make_host_pool(self) -> HostPool | None:
        if self.config.host_pool_buffers == 0 or not _layout_kernel_runs(self.device):
            return None
        c = self.cfg
        dims = module_dims(c.hidden_size, c.q_size, c.kv_size, c.intermediate_size)
        r = self.config.max_lora_rank
        per_layer = sum(r * (d_in + d_out) * 4 + 2 * TENSOR_ALIGN for d_in, d_out in dims.values())
        nbytes = c.num_layers * per_layer
        count = self.config.host_pool_buffers
        if count is None:  # the host cache, one adapter decoding and one copying, within the default budget
            count = min(self.config.cpu_cache_size + 2, max(4, HOST_POOL_BUDGET // nbytes))
        if self.copy_stream is not None:  # the device buffer a slot write copies into, cached by the allocator
            with torch.cuda.stream(self.copy_stream):  # now, not with a batch running: no cudaMalloc then
                torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return HostPool(count, nbytes, pin=self.copy_stream is not None)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """Where the loader reads an adapter's tensors: a pool buffer when one is free and large
        enough (its slot write is then one raw copy and a device layout), else ordinary memory."""
        buf = self.host_pool.take(nbytes) if self.host_pool is not None else None
        return buf if buf is not None else torch.empty(nbytes, dtype=torch.uint8)

    def slot_plan(self, adapter: LoadedAdapter) -> SlotPlan | None:
        """The device layout of an adapter read into a pool buffer (None: it was not)."""
        buf = adapter.buffer
        if self.host_pool is None or buf is None or not self.host_pool.owns(buf):
            return None
        from node.engine.lora.kernels.slot_layout import plan_layout

        jobs = (
            job for idx, layer, a_off, b_off in self.slot_layout for job in layer.slot_jobs(idx, adapter, a_off, b_off)
        )
        plan = plan_layout(buf, jobs, buf.numel())
        return plan.pinned() if self.device.type == "cuda" else plan

    def slot_image(self, adapter: LoadedAdapter) -> torch.Tensor:
        """The adapter laid out as one slot row [P] (pinned on CUDA, so its copy is asynchronous)."""
        image = torch.zeros(self.slot_buf.shape[1], dtype=self.dtype, pin_memory=self.device.type == "cuda")
        self._lay_out(image, adapter)
        return image

    def _lay_out(self, row: torch.Tensor, adapter: LoadedAdapter) -> None:
        """Write the adapter's weights into a zeroed slot row [P]: a host image or a row of slot_buf."""
        r = self.config.max_lora_rank
        for idx, layer, a_off, b_off in self.slot_layout:
            (ra, ca), (rb, cb) = layer.lora_shapes(r)
            layer.slot_image(
                row[a_off : a_off + ra * ca].view(ra, ca), row[b_off : b_off + rb * cb].view(rb, cb), idx, adapter
            )

    def _block_bytes(self) -> int:
        c = self.cfg
        per_token = kv_bytes_per_token(c.num_kv_heads, c.head_dim, self.dtype, self.config.kv_cache_dtype)
        return c.num_layers * self.config.block_size * per_token

    def _num_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        mem = self.config.kv_cache_memory
        if mem is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                mem = int(free * 0.9)
            else:
                mem = CPU_KV_DEFAULT
        # never more than every running sequence at full context needs
        cap = self.config.max_num_seqs * self.config.blocks_for(self.config.context_len(self.cfg))
        n = min(mem // self._block_bytes(), cap)
        if n < 1:
            raise ValueError(f"kv_cache_memory {mem} bytes holds no {self._block_bytes()}-byte KV block")
        return int(n)

    def write_slot(self, slot: int, adapter: LoadedAdapter | None) -> SlotCopy | None:
        """Write an adapter's slot row (every LoRA layer's stacks at once; None clears it). On CUDA this
        is one asynchronous copy of its host image on the copy stream, and the returned SlotCopy says
        when it is done; on CPU the row is written in place before this returns (None)."""
        if self.tp is not None:
            self.tp.write_slot(slot, adapter)
        row = self.slot_buf[slot]
        plan = None if adapter is None else adapter.plan
        if plan is not None:
            return self._write_raw(row, adapter.buffer, plan)
        if self.copy_stream is None:
            with torch.no_grad():
                if adapter is not None and adapter.image is not None:
                    row.copy_(adapter.image)
                else:
                    row.zero_()
                    if adapter is not None:
                        self._lay_out(row, adapter)
            return None
        image = None
        if adapter is not None:
            image = adapter.image if adapter.image is not None else self.slot_image(adapter)
        # the slot is free (no running sequence holds it); ordering after the compute stream costs no host sync
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(self.copy_stream):
            row.zero_() if image is None else row.copy_(image, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return SlotCopy(event, image)

    def _write_raw(self, row: torch.Tensor, buf: torch.Tensor, plan: SlotPlan) -> SlotCopy | None:
        """A pool buffer into a slot: one copy of its raw bytes to the device, the row cleared, and one
        layout launch per source dtype, all on the copy stream (CPU: in place, before returning)."""
        from node.engine.lora.kernels.slot_layout import lay_out_slot

        with torch.no_grad():
            if self.copy_stream is None:
                row.zero_()
                lay_out_slot(buf, row, plan)
                return None
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                raw = torch.empty(plan.nbytes, dtype=torch.uint8, device=self.device)  # the copy stream's memory
                raw.copy_(buf, non_blocking=True)
                row.zero_()
                lay_out_slot(raw, row, plan)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            return SlotCopy(event, (buf, raw))  # the pool buffer goes back only once the copy has read it

    @torch.inference_mode()
    def forward(
        self,
        seqs: list[Sequence],
        prefill: bool,
        all_logits: bool = False,
        drafts: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """Run one step: prefill computes every token of each sequence past its cached prefix
        (num_cached_tokens, whose KV the cache already holds and attention reads), decode only the newest.
        Returns logits [B, vocab] of each sequence's last token ([T, vocab] of the T computed tokens when
        all_logits). A decode with `drafts` (speculative decoding) feeds each row its newest token then its
        drafted tokens (drafts[i], possibly none) and returns the logits of all those positions [T, vocab], row
        after row (never through the CUDA graphs, which hold one query per row)."""
        if drafts is not None:
            all_logits = True  # every drafted position is verified
        if not prefill and not all_logits and self.graphs is not None and len(seqs) <= self.graphs.max_batch:
            return self.graphs.run(seqs)
        hidden, starts = self._hidden(seqs, prefill, drafts)
        if not all_logits:
            hidden = hidden[to_device(starts[1:] - 1, self.device)]  # [B, D]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def prefill_scoring(self, seqs: list[Sequence], prompt_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A prefill step whose `prompt_rows` ask for their prompt's logprobs: the logits [B, vocab] of each
        sequence's last token, and for each of those rows in order the hidden states [P, D] of its prompt
        positions 0..P-2 (what predicted prompt tokens 1..P-1). Hidden states, not logits: `logprobs.score`
        makes the logits a chunk at a time, where a 32,000-token prompt's over a 152,000-token vocabulary were
        9.7 GB at once. Those rows skip the prefix cache: their whole prompt is computed."""
        assert all(seqs[i].num_cached_tokens == 0 for i in prompt_rows), "prompt logprobs skip the cache"
        hidden, starts = self._hidden(seqs, True, None)
        extra = [torch.arange(starts[i], starts[i] + len(seqs[i].prompt_token_ids) - 1) for i in prompt_rows]
        logits = self.model.compute_logits(hidden[to_device(starts[1:] - 1, self.device)])
        return logits, hidden[to_device(torch.cat(extra), self.device)]

    def _hidden(
        self, seqs: list[Sequence], prefill: bool, drafts: list[list[int]] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward pass: hidden [T, D] of every computed token, and where each row's tokens start
        in it ([B + 1], the last the total)."""
        tokens: list[int] = []
        positions: list[list[int]] = []
        slots: list[int] = []
        for s in seqs:
            if prefill:  # from the first position the prefix cache did not hold (its KV is read, not computed)
                start = s.num_cached_tokens
                ids = s.all_token_ids()[start:]
                pos = list(range(start, start + len(ids)))
            else:
                ids = [s.output_token_ids[-1] if s.output_token_ids else s.prompt_token_ids[-1]]
                if drafts is not None:
                    ids += drafts[len(positions)]
                pos = list(range(s.num_tokens - 1, s.num_tokens - 1 + len(ids)))
            tokens.extend(ids)
            positions.append(pos)
            slots.extend([s.slot] * len(ids))
        tables = [s.block_table for s in seqs]
        if self.tp is None:
            hidden = self.run(tokens, positions, slots, tables)  # [T, D]
        else:  # every rank runs the same inputs
            hidden = self.tp.forward(self.run, tokens, positions, slots, [list(t) for t in tables])
        return hidden, torch.tensor([0] + [len(p) for p in positions]).cumsum(0)

    @torch.inference_mode()
    def run(self, tokens: list[int], positions: list[list[int]], slots: list[int], tables: list) -> torch.Tensor:
        """The forward pass over flat inputs -> hidden [T, D] (a tensor-parallel worker runs only this)."""
        dev = self.device
        meta = build_metadata(positions, tables, self.config.block_size, self.cfg.sliding_window, dev)
        token_t = to_device(torch.tensor(tokens, dtype=torch.int64), dev)  # [T]
        pos_t = to_device(torch.tensor([p for ps in positions for p in ps], dtype=torch.int64), dev)  # [T]
        self.mapping.set_token_slots(slots, dev)
        return self.model(token_t, pos_t, meta, self.kv_caches)


def _layout_kernel_runs(device: torch.device) -> bool:
    """Whether kernels/slot_layout.py can lay a slot out on `device` (CUDA, or the interpreter)."""
    try:
        import triton  # noqa: F401

        from node.engine.layers.triton_util import INTERPRET
    except ImportError:
        return False
    return device.type == "cuda" or INTERPRET
