"""The synchronous engine core: requests in, one scheduled step at a time, token events out.
`AsyncEngine` (async_engine.py) drives it from a background thread for asyncio callers."""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future

import torch

from common.wire import parse_json
from node.engine.block_manager import BlockManager
from node.engine.config import EngineConfig, ModelConfig
from node.engine.layers.sampler import sample, sample_on_device
from node.engine.loader import build_model, checkpoint_tensors
from node.engine.lora.kernels.base import LoRAKernel
from node.engine.lora.kernels.torch_ref import TorchLoRAKernel
from node.engine.lora.manager import AdapterManager, Fetcher
from node.engine.lora.mapping import LoRAMapping
from node.engine.lora.weights import LoadedAdapter, decode_lora
from node.engine.model_runner import ModelRunner
from node.engine.request import (
    DuplicateRequestError,
    FinishEvent,
    GenerationRequest,
    PromptTooLongError,
    RequestError,
    TokenEvent,
)
from node.engine.scheduler import Scheduler
from node.engine.sequence import Sequence, now_ms

log = logging.getLogger(__name__)

RECENT_FINISHED = 1024
RATE_WINDOW_S = 10.0


def load_tokenizer(model_dir):
    """The base model's tokenizer, or None when the folder has none (token ids only then)."""
    from pathlib import Path

    if not any((Path(model_dir) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        log.warning("no tokenizer in %s: requests must give prompt_token_ids", model_dir)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def default_kernel(device: torch.device) -> LoRAKernel:
    """The Triton kernels on CUDA (when Triton is installed), the torch reference elsewhere."""
    if device.type == "cuda":
        try:
            from node.engine.lora.kernels.triton import TritonLoRAKernel
        except ImportError:
            log.warning("triton is not installed: LoRA runs on the torch reference kernel, without CUDA graphs")
        else:
            return TritonLoRAKernel()
    return TorchLoRAKernel()


class LLMEngine:
    """Owns the model runner, scheduler, KV blocks, adapter manager and per-request state."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        store=None,
        fetcher: Fetcher | None = None,
        on_ready: Callable[[], None] | None = None,
        weights: Iterable[tuple[str, torch.Tensor]] | None = None,
        kernel: LoRAKernel | None = None,
    ) -> None:
        """`fetcher` brings an adapter the store lacks (lora/manager.py's Fetcher); `on_ready` is called,
        from another thread, whenever an adapter load or slot write ends (a waiting step can run)."""
        from node.adapters.basemodel import base_model_id, base_model_name

        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.model_cfg = ModelConfig.from_dir(config.model_dir)
        self.dtype = config.torch_dtype(self.model_cfg)
        self.device = torch.device(config.device)
        self.base_model_id = base_model_id(config.model_dir)
        self.base_model_name = base_model_name(config.model_dir)
        self.tokenizer = load_tokenizer(config.model_dir)
        self.eos_ids = self._eos_ids()
        self.mapping = LoRAMapping(config.num_slots, kernel or default_kernel(self.device))
        tensors = weights if weights is not None else checkpoint_tensors(config.model_dir)
        model = build_model(self.model_cfg, self.mapping, tensors, self.device, self.dtype)
        self.runner = ModelRunner(config, self.model_cfg, model, self.mapping, self.dtype)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size)
        self.max_len = min(config.context_len(self.model_cfg), self.runner.num_blocks * config.block_size)
        self.adapters = AdapterManager(
            num_slots=config.num_slots,
            cpu_cache_size=config.cpu_cache_size,
            store=store,
            base_model_id=self.base_model_id,
            decode=self._decode,
            write_slot=self.runner.write_slot,
            fetcher=fetcher,
            verify_hashes=config.verify_adapter_hashes,
            on_ready=on_ready,
        )
        self.scheduler = Scheduler(
            self.blocks,
            self.adapters,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        self.seqs: dict[str, Sequence] = {}
        self.recent: OrderedDict[str, FinishEvent] = OrderedDict()
        self.usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._rate: deque[tuple[float, int]] = deque()
        log.info(
            "engine ready: %s (%s) on %s, %s, %d slots, max_len %d",
            self.base_model_name,
            self.model_cfg.model_type,
            config.device,
            self.dtype,
            config.num_slots,
            self.max_len,
        )

    def _eos_ids(self) -> frozenset[int]:
        ids = set(self.model_cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = self.config.model_dir / "generation_config.json"
        if gen.exists():
            from node.adapters.basemodel import MAX_CONFIG_BYTES

            doc = parse_json(gen.read_bytes(), max_bytes=MAX_CONFIG_BYTES, what="generation_config.json")
            eos = doc.get("eos_token_id") if isinstance(doc, dict) else None
            ids.update(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        return frozenset(ids)

    def _decode(self, pkg) -> LoadedAdapter:
        """Loader thread: a verified package -> the adapter in host memory, with its slot image when the
        runner prebuilds them (so the engine thread's slot write is one copy)."""
        from node.adapters import load_lora_tensors

        loaded = decode_lora(
            pkg.adapter_id,
            pkg.name,
            load_lora_tensors(pkg),
            pkg.lora.scaling,
            self.model_cfg,
            self.config.max_lora_rank,
            self.dtype,
        )
        if self.runner.prebuilt_images:
            loaded.image = self.runner.slot_image(loaded)  # pinned on CUDA: a slot load is one async copy
            if self.device.type == "cuda":
                loaded.weights = {}  # the image holds everything the slot needs
        return loaded

    # ---- requests ----
    def make_sequence(self, req: GenerationRequest) -> Sequence:
        """Validate a request and build its sequence (no engine state changes; any thread)."""
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.model_cfg.vocab_size]
            if bad:
                raise RequestError(
                    f"prompt_token_ids holds {bad[0]!r}; expected ints in [0, {self.model_cfg.vocab_size})"
                )
        else:
            if self.tokenizer is None:
                raise RequestError("this node's base model has no tokenizer: send prompt_token_ids")
            ids = self.tokenizer.encode(req.prompt)
        if not ids:
            raise RequestError("the prompt is empty; expected at least one token")
        if len(ids) >= self.max_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens; this node's context holds {self.max_len} "
                f"(prompt + at least one generated token)"
            )
        vocab = self.model_cfg.vocab_size
        bad = [t for t in req.params.token_ids() if t >= vocab]
        if bad:
            raise RequestError(
                f"token id {bad[0]} in logit_bias or stop_token_ids is not in the vocabulary [0, {vocab})"
            )
        if req.params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this node's base model has none")
        seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
        return Sequence(req.request_id, req.adapter_id, ids, req.params, self.tokenizer, self.device, seed)

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a validated sequence (engine thread)."""
        if seq.request_id in self.seqs:
            raise DuplicateRequestError(f"request {seq.request_id} is already running")
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def add_request(self, req: GenerationRequest) -> Sequence:
        seq = self.make_sequence(req)
        self.add_sequence(seq)
        return seq

    def abort(self, request_id: str) -> FinishEvent | None:
        """Stop a request; returns its final event (also for one that just finished), or None."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return self.recent.get(request_id)
        return self._finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- adapters ----
    def prefetch(self, adapter_id: str) -> Future:
        """Start (or join) bringing the adapter into the host cache (any thread); the future yields it,
        or raises the AdapterError that stopped it."""
        return self.adapters.load(adapter_id)

    def make_resident(self, adapter_id: str, pin: bool | None = None) -> int:
        """Put a host-cached adapter into a slot now, pinning or unpinning it (engine thread); its slot."""
        return self.adapters.make_resident(adapter_id, pin)

    def status(self) -> dict:
        """Slot table, host cache, queue and throughput (the node's /status)."""
        s = self.adapters.snapshot()
        s.update(
            queue_depth=self.scheduler.num_waiting,
            running=len(self.scheduler.running),
            tokens_per_s=self.tokens_per_s(),
            device=self.config.device,
            usage=dict(self.usage),
        )
        return s

    # ---- one step ----
    def step(self) -> tuple[list[TokenEvent | FinishEvent], bool]:
        """Run one scheduled step; returns its events and whether anything happened."""
        seqs, prefill, failed = self.scheduler.schedule()
        events: list[TokenEvent | FinishEvent] = [self._finish(s, "error") for s in failed]
        if not seqs:
            return events, bool(failed)
        try:
            logits = self.runner.forward(seqs, prefill)  # [B, V]
            params = [s.params for s in seqs]
            # the token histories only when a penalty needs them (process_logits reads them per row that asks)
            hist = {}
            if any(p.processed for p in params):
                hist = dict(prompts=[s.prompt_token_ids for s in seqs], outputs=[s.output_token_ids for s in seqs])
            if self.device.type == "cuda":  # batched on the device, one copy of the ids to the host
                steps = [len(s.output_token_ids) for s in seqs]
                tokens = sample_on_device(logits, params, [s.seed for s in seqs], steps, eos_ids=self.eos_ids, **hist)
            else:
                tokens = sample(logits, params, [s.generator for s in seqs], eos_ids=self.eos_ids, **hist)
        except Exception as e:  # fail this step's requests, keep serving everyone else
            log.exception("engine step failed")
            for s in seqs:
                s.error = f"engine step failed: {type(e).__name__}: {e}"
                events.append(self._finish(s, "error"))
            return events, True
        for s, t in zip(seqs, tokens):
            s.output_token_ids.append(t)
            if t in s.params.stop_token_ids:  # counted, its text not shown (as vLLM's stop_token_ids)
                text, hit_stop, reason = "", False, "stop"
            else:
                text, hit_stop = s.stream.push(t)
                reason = "stop" if hit_stop else None
            if reason is None and t in self.eos_ids and not s.params.ignore_eos:
                reason = "stop"
            elif reason is None and (len(s.output_token_ids) >= s.params.max_tokens or s.num_tokens >= self.max_len):
                reason = "length"
            if reason is not None and not hit_stop:
                text += s.stream.flush()
            events.append(TokenEvent(s.request_id, t, text))
            if reason is not None:
                events.append(self._finish(s, reason))
        self._count(len(seqs))
        return events, True

    def _finish(self, seq: Sequence, reason: str) -> FinishEvent:
        self.scheduler.finish(seq)
        self.seqs.pop(seq.request_id, None)
        ev = FinishEvent(
            request_id=seq.request_id,
            adapter_id=seq.adapter_id,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_token_ids),
            completion_tokens=len(seq.output_token_ids),
            started_at=seq.started_at,
            finished_at=now_ms(),
            text=seq.stream.text,
            token_ids=tuple(seq.output_token_ids),
            error=seq.error,
        )
        self.recent[seq.request_id] = ev
        while len(self.recent) > RECENT_FINISHED:
            self.recent.popitem(last=False)
        self.usage["requests"] += 1
        self.usage["prompt_tokens"] += ev.prompt_tokens
        self.usage["completion_tokens"] += ev.completion_tokens
        return ev

    def _count(self, n: int) -> None:
        now = time.monotonic()
        self._rate.append((now, n))
        while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
            self._rate.popleft()

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last few seconds."""
        now = time.monotonic()
        recent = [n for t, n in self._rate if t >= now - RATE_WINDOW_S]
        return round(sum(recent) / RATE_WINDOW_S, 2)

    def generate(self, requests: list[GenerationRequest]) -> dict[str, FinishEvent]:
        """Run requests to completion synchronously (tests, benchmarks)."""
        for r in requests:
            self.add_request(r)
        done: dict[str, FinishEvent] = {}
        while self.has_work():
            events, did = self.step()
            if not did:
                time.sleep(0.002)  # waiting for an adapter to load
            done.update({e.request_id: e for e in events if isinstance(e, FinishEvent)})
        return done

    def close(self) -> None:
        self.adapters.close()
