"""The model runner: owns the model, the KV cache tensors and the LoRA mapping; turns a scheduled
batch into flat input tensors, runs one forward pass and returns the last-token logits."""

from __future__ import annotations

import logging

import torch

from node.engine.attention import build_metadata
from node.engine.config import EngineConfig, ModelConfig
from node.engine.lora import LoRAMapping
from node.engine.lora_weights import LoadedAdapter
from node.engine.model import CausalLM
from node.engine.sequence import Sequence

log = logging.getLogger(__name__)

CPU_KV_DEFAULT = 512 << 20


class ModelRunner:
    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, model: CausalLM, mapping: LoRAMapping,
                 dtype: torch.dtype) -> None:
        self.config = config
        self.cfg = model_cfg
        self.model = model
        self.mapping = mapping
        self.dtype = dtype
        self.device = torch.device(config.device)
        for _, layer in model.lora_layers():
            layer.allocate_lora(config.num_slots, config.max_lora_rank)
        self.num_blocks = self._num_blocks()
        shape = (self.num_blocks, config.block_size, model_cfg.num_kv_heads, model_cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                           torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(model_cfg.num_layers)]
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, config.block_size,
                 self.num_blocks * self._block_bytes() / 2**20)

    def _block_bytes(self) -> int:
        c = self.cfg
        return 2 * c.num_layers * self.config.block_size * c.num_kv_heads * c.head_dim * self.dtype.itemsize

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

    def write_slot(self, slot: int, adapter: LoadedAdapter | None) -> None:
        """Copy an adapter's weights into `slot` of every LoRA layer (None clears it)."""
        with torch.no_grad():
            for layer_idx, layer in self.model.lora_layers():
                layer.clear_slot(slot)
                if adapter is None:
                    continue
                for name in layer.names:
                    w = adapter.weights.get((layer_idx, name))
                    if w is not None:
                        layer.set_slot(slot, name, w[0].to(self.device, non_blocking=True),
                                       w[1].to(self.device, non_blocking=True))

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], prefill: bool, all_logits: bool = False) -> torch.Tensor:
        """Run one step: prefill computes every token of each sequence, decode only the newest.
        Returns logits [B, vocab] of each sequence's last token ([T, vocab] when all_logits)."""
        tokens: list[int] = []
        positions: list[list[int]] = []
        slots: list[int] = []
        for s in seqs:
            if prefill:
                ids = s.all_token_ids()
                pos = list(range(len(ids)))
            else:
                ids = [s.output_token_ids[-1] if s.output_token_ids else s.prompt_token_ids[-1]]
                pos = [s.num_tokens - 1]
            tokens.extend(ids)
            positions.append(pos)
            slots.extend([s.slot] * len(ids))
        dev = self.device
        meta = build_metadata(positions, [s.block_table for s in seqs], self.config.block_size,
                              self.cfg.sliding_window, dev)
        token_t = torch.tensor(tokens, dtype=torch.int64).to(dev)  # [T]
        pos_t = torch.tensor([p for ps in positions for p in ps], dtype=torch.int64).to(dev)  # [T]
        self.mapping.set_token_slots(slots, dev)
        hidden = self.model(token_t, pos_t, meta, self.kv_caches)  # [T, D]
        if not all_logits:
            last = torch.tensor([0] + [len(p) for p in positions]).cumsum(0)[1:] - 1
            hidden = hidden[last.to(dev)]  # [B, D]
        return self.model.compute_logits(hidden)
