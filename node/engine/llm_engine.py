"""The synchronous engine core: requests in, one scheduled step at a time, token events out.
`AsyncEngine` (async_engine.py) drives it from a background thread for asyncio callers."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future

import torch

from node.engine.block_manager import BlockManager
from node.engine.config import EngineConfig, ModelConfig
from node.engine.layers.logprobs import RawLogprobs, score
from node.engine.layers.sampler import draw_on_device, sample
from node.engine.loader import build_model, checkpoint_tensors
from node.engine.lora.ensemble import EnsembleSpec, combine_lora
from node.engine.lora.kernels.base import LoRAKernel
from node.engine.lora.kernels.torch_ref import TorchLoRAKernel
from node.engine.lora.manager import AdapterManager, Fetcher
from node.engine.lora.mapping import LoRAMapping
from node.engine.lora.weights import LoadedAdapter, decode_lora
from node.engine.model_runner import ModelRunner
from node.engine.request import (
    GUIDED_ERROR_PREFIX,
    SEED_LIMIT,
    Choice,
    DuplicateRequestError,
    FinishEvent,
    GenerationRequest,
    PromptLogprobsEvent,
    PromptTooLongError,
    RequestError,
    SequenceFinishEvent,
    TokenEvent,
)
from node.engine.scheduler import BASE, Scheduler
from node.engine.sequence import SeqStatus, Sequence, SequenceGroup, now_ms
from node.engine.speculative import propose, verify

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
        from node.adapters.basemodel import base_model_id, base_model_name, eos_token_ids

        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.model_cfg = ModelConfig.from_dir(config.model_dir)
        self.dtype = config.torch_dtype(self.model_cfg)
        self.device = torch.device(config.device)
        self.base_model_id = base_model_id(config.model_dir)
        self.base_model_name = base_model_name(config.model_dir)
        self.tokenizer = load_tokenizer(config.model_dir)
        self.eos_ids = eos_token_ids(config.model_dir, self.tokenizer)
        self.mapping = LoRAMapping(config.num_slots, kernel or default_kernel(self.device))
        self.tp = None  # parallel.TensorParallel: this engine is rank 0 of tensor_parallel ranks
        if config.tensor_parallel > 1:
            from node.engine.parallel import TensorParallel

            if weights is not None:
                raise ValueError("tensor_parallel > 1 loads its shards from model_dir, not from given weights")
            self.tp = TensorParallel(config, self.model_cfg)
        shard = self.tp.shard if self.tp is not None else None
        tensors = weights if weights is not None else checkpoint_tensors(config.model_dir)
        try:
            model = build_model(
                self.model_cfg, self.mapping, tensors, self.device, self.dtype, config.quantization, shard
            )
            self.runner = ModelRunner(
                config, shard.local_config() if shard else self.model_cfg, model, self.mapping, self.dtype
            )
            if self.tp is not None:
                self.tp.attach(self.runner)
        except BaseException:
            if self.tp is not None:
                self.tp.close()
            raise
        self.blocks = BlockManager(
            self.runner.num_blocks,
            config.block_size,
            namespace=self.base_model_id,
            enable_caching=config.enable_prefix_caching,
        )
        self.max_len = min(config.context_len(self.model_cfg), self.runner.num_blocks * config.block_size)
        pool = self.runner.host_pool
        self.adapters = AdapterManager(
            num_slots=config.num_slots,
            # with a host pool the cache holds what the pool can, less one adapter decoding and one copying
            cpu_cache_size=config.cpu_cache_size
            if pool is None
            else max(1, min(config.cpu_cache_size, pool.count - 2)),
            store=store,
            base_model_id=self.base_model_id,
            decode=self._decode,
            write_slot=self.runner.write_slot,
            fetcher=fetcher,
            verify_hashes=config.verify_adapter_hashes,
            on_ready=on_ready,
            combine=self._combine,
        )
        self.scheduler = Scheduler(
            self.blocks,
            self.adapters,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        self.requests: dict[str, SequenceGroup] = {}  # running or waiting, by request id
        self._grammars = None  # node.engine.grammar.Grammars, built on the first guided request
        self._grammars_lock = threading.Lock()
        self._steps = 0  # steps run (the step a request's GrammarBudget counts its CPU in)
        self.recent: OrderedDict[str, FinishEvent] = OrderedDict()
        self.usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._rate: deque[tuple[float, int]] = deque()
        # speculative decoding, as vLLM's vllm:spec_decode_num_draft_tokens / _num_accepted_tokens count them
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0
        log.info(
            "engine ready: %s (%s) on %s, %s, %d slots, max_len %d",
            self.base_model_name,
            self.model_cfg.model_type,
            config.device,
            self.dtype,
            config.num_slots,
            self.max_len,
        )

    def _decode(self, pkg, image: bool = True) -> LoadedAdapter:
        """Loader thread: a verified package -> the adapter in host memory, with its slot image when the
        runner prebuilds them (so the engine thread's slot write is one copy)."""
        from node.adapters import load_lora_buffer

        buffer, tensors = load_lora_buffer(pkg, self.runner.host_buffer)
        loaded = decode_lora(
            pkg.adapter_id,
            pkg.name,
            tensors,
            pkg.lora.scaling,
            self.model_cfg,
            self.config.max_lora_rank,
            self.dtype,
            check_values=not self.adapters.verify_hashes,  # else the store's verification checked them
            buffer=buffer,
        )
        return self._with_image(loaded) if image else loaded

    def _with_image(self, loaded: LoadedAdapter) -> LoadedAdapter:
        if not self.runner.prebuilt_images:
            return loaded
        loaded.plan = self.runner.slot_plan(loaded)  # read into a pool buffer: laid out on the device
        if loaded.plan is None:  # else a host image (pinned on CUDA): a slot load is one async copy
            loaded.image = self.runner.slot_image(loaded)
            if self.device.type == "cuda":
                loaded.weights, loaded.buffer = {}, None  # the image holds everything the slot needs
        return loaded

    def _combine(self, spec: EnsembleSpec, parts: list[tuple[LoadedAdapter, float]]) -> LoadedAdapter:
        """Loader thread: an ensemble's loaded components -> one adapter of concatenated rank."""
        # a component cached as a slot image alone (CUDA, outside the host pool): decode its weights again
        parts = [
            (a if a.weights else self._decode(self.adapters.stored_package(a.adapter_id), False), w) for a, w in parts
        ]
        return self._with_image(combine_lora(spec.key, spec.name, parts, self.config.max_lora_rank, self.dtype))

    # ---- requests ----
    def make_group(self, req: GenerationRequest, *, compile: bool = True) -> SequenceGroup:
        """Validate a request and build its sequences, prompts x n in choice order (no engine state changes; any
        thread: a grammar is compiled here, off the engine thread; with `compile` False, one not compiled raises
        node.engine.grammar.NotCompiled instead)."""
        prompts = req.token_prompts()
        vocab = self.model_cfg.vocab_size
        if prompts is not None:
            for p in prompts:
                bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
                if bad:
                    raise RequestError(f"prompt_token_ids holds {bad[0]!r}; expected ints in [0, {vocab})")
        else:
            if self.tokenizer is None:
                raise RequestError("this node's base model has no tokenizer: send prompt_token_ids")
            prompts = [self.tokenizer.encode(req.prompt)]
        for ids in prompts:
            if not ids:
                raise RequestError("the prompt is empty; expected at least one token")
            if len(ids) >= self.max_len:
                raise PromptTooLongError(
                    f"the prompt has {len(ids)} tokens; this node's context holds {self.max_len} "
                    f"(prompt + at least one generated token)"
                )
        params = req.params
        bad = [t for t in params.token_ids() if t >= vocab]
        if bad:
            raise RequestError(
                f"token id {bad[0]} in logit_bias, stop_token_ids or allowed_token_ids is not in the vocabulary "
                f"[0, {vocab})"
            )
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this node's base model has none")
        grammars = budget = None
        if params.guided is not None:
            from node.engine.grammar import GrammarBudget

            grammars = self.grammars()
            budget = GrammarBudget()  # the request's grammar CPU, its sequences together
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seqs = []
        for p, ids in enumerate(prompts):
            for j in range(params.n):
                k = p * params.n + j
                seqs.append(
                    Sequence(
                        req.request_id,
                        req.adapter_id,
                        ids,
                        params,
                        self.tokenizer,
                        self.device,
                        (seed + k) % SEED_LIMIT,
                        index=k,
                        prompt_index=p,
                        matcher=(
                            grammars.matcher(params.guided, budget, req.cache_salt, compile=compile)
                            if grammars is not None
                            else None
                        ),
                        cache_salt=req.cache_salt,
                        end_ids=self.eos_ids,
                    )
                )
        return SequenceGroup(seqs, sum(len(ids) for ids in prompts))

    def costly(self, req: GenerationRequest) -> bool:
        """Whether make_group would tokenize text or compile a grammar (then it runs on the compile thread, not
        the event loop); a grammar compiled already costs a copy per sequence (one evicted since is not compiled
        on the loop: make_group(compile=False) says so, and the caller goes to the compile thread)."""
        if req.prompt is not None:
            return True
        guided = req.params.guided
        return guided is not None and (self._grammars is None or not self._grammars.cached(guided, req.cache_salt))

    def grammars(self):
        """The engine's grammar compiler (node.engine.grammar.Grammars), built on first use (any thread)."""
        with self._grammars_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise RequestError("guided decoding needs a tokenizer, and this node's base model has none")
                from node.engine.grammar import Grammars

                self._grammars = Grammars(self.tokenizer, self.model_cfg.vocab_size, eos_ids=sorted(self.eos_ids))
            return self._grammars

    def add_group(self, group: SequenceGroup) -> None:
        """Queue a validated request's sequences (engine thread)."""
        if group.request_id in self.requests:
            raise DuplicateRequestError(f"request {group.request_id} is already running")
        self.requests[group.request_id] = group
        for s in group.seqs:
            self.scheduler.add(s)

    def add_request(self, req: GenerationRequest) -> SequenceGroup:
        group = self.make_group(req)
        self.add_group(group)
        return group

    def abort(self, request_id: str) -> FinishEvent | None:
        """Stop a request (all its sequences); returns its final event (also for one that just finished), or None."""
        group = self.requests.get(request_id)
        if group is None:
            return self.recent.get(request_id)
        return self._end_group(group, "abort")

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
            quantization=self.config.quantization,  # the base's serving precision (the adapters' is `dtype`)
            kv_cache_dtype=self.config.kv_cache_dtype,
            usage=dict(self.usage),
        )
        return s

    def metrics_snapshot(self) -> dict:
        """The scheduler's and the caches' state for GET /metrics (engine thread, between steps)."""
        sched, slots = self.scheduler, self.adapters.snapshot()
        return {
            "running": len(sched.running),
            "waiting": sched.num_waiting,
            "kv_cache_usage": round(1 - self.blocks.num_free / self.blocks.num_blocks, 6),
            "running_adapters": sorted({s.adapter_id for s in sched.running if s.adapter_id}),
            "waiting_adapters": sorted(k for k, q in sched.queues.items() if q and k != BASE),
            "num_slots": slots["num_slots"],
            "resident": len(slots["resident_adapters"]),
            "cached": len(slots["cached_adapters"]),
            "prompt_tokens": self.usage["prompt_tokens"],
            "completion_tokens": self.usage["completion_tokens"],
            "adapter_counters": dict(self.adapters.counters),
            # tokens, as vLLM's vllm:prefix_cache_queries / vllm:prefix_cache_hits: prompt tokens looked up in
            # the prefix cache at admission (a resumed sequence's too), and how many of them were found there
            "prefix_cache_queries": self.blocks.queries,
            "prefix_cache_hits": self.blocks.hits,
            "spec_draft_tokens": self.spec_draft_tokens,
            "spec_accepted_tokens": self.spec_accepted_tokens,
        }

    # ---- one step ----
    def step(self) -> tuple[list, bool]:
        """Run one scheduled step; returns its events (TokenEvent, PromptLogprobsEvent, SequenceFinishEvent,
        FinishEvent) and whether anything happened."""
        seqs, prefill, failed = self.scheduler.schedule()
        self._steps += 1  # once a step: a retry of its sampling (_sample_apart) counts in the same step
        events: list = []
        for s in failed:
            if s.status != SeqStatus.FINISHED:  # a request's sequences fail together
                events.append(self._end_group(s.group, "error", s.error))
        if not seqs:
            return events, bool(failed)
        try:
            drafts = self._drafts(seqs) if not prefill and self.config.speculative == "ngram" else None
            if drafts is not None and any(drafts):
                results, bad = self._speculative_step(seqs, drafts)
                events += self._end_failed(seqs, bad)  # kept even if the emission below fails the step
                events += self._emit_many(seqs, results)
                return events, True
            prompt_rows = [i for i, s in enumerate(seqs) if s.wants_prompt_logprobs] if prefill else []
            if prompt_rows:  # logits [B, V], and the hidden states of those rows' prompt positions
                logits, prompt_hidden = self.runner.prefill_scoring(seqs, prompt_rows)
            else:
                logits = self.runner.forward(seqs, prefill)  # [B, V]
            for s in seqs:  # their KV is written up to their newest token: full blocks become shareable
                self.blocks.commit(s, s.num_tokens)
            if prompt_rows:
                events += self._prompt_logprobs(seqs, prompt_rows, prompt_hidden)
            tokens, scored, bad = self._sample_apart(seqs, logits)
        except Exception as e:  # fail this step's requests, keep serving everyone else
            log.exception("engine step failed")
            for s in seqs:
                if s.status != SeqStatus.FINISHED:
                    events.append(self._end_group(s.group, "error", f"engine step failed: {type(e).__name__}: {e}"))
            return events, True
        events += self._end_failed(seqs, bad)
        for s, t, lp in zip(seqs, tokens, scored, strict=True):
            if s.status == SeqStatus.FINISHED:  # its request failed, on its sampling or on a sibling's token
                continue
            evs, reason = self._emit(s, t, lp)
            events += evs
            if reason is not None:
                events += self._end_sequence(s, reason)
        self._count(len(seqs))
        return events, True

    def _end_failed(self, seqs: list[Sequence], bad: dict[str, str]) -> list:
        """End the requests whose sampling failed (_apart): {request id: error}."""
        events: list = []
        for s in seqs:
            if s.group.request_id in bad and s.status != SeqStatus.FINISHED:
                events.append(self._end_group(s.group, "error", bad[s.group.request_id]))
        return events

    # ---- speculative decoding (speculative.py) ----
    def _drafts(self, seqs: list[Sequence]) -> list[list[int]]:
        """Each decoding row's n-gram draft ([] for none), its blocks grown to hold it. A draft is cut so that
        the accepted tokens plus the target's own can never pass max_tokens or the context, and dropped when
        the cache has no room for it (a draft never preempts anyone). Grammar rows do not draft."""
        cfg = self.config
        out: list[list[int]] = []
        for s in seqs:
            d: list[int] = []
            room = min(
                cfg.num_speculative_tokens,
                s.params.max_tokens - len(s.output_token_ids) - 1,
                self.max_len - s.num_tokens - 1,
            )
            if s.matcher is None and room > 0:
                d = propose(s.all_token_ids(), room, cfg.ngram_min, cfg.ngram_max)
                if d and self.blocks.can_allocate(s.block_table, s.num_tokens + len(d)):
                    self.blocks.grow(s.block_table, s.num_tokens + len(d))
                else:
                    d = []
            out.append(d)
        return out

    def _speculative_step(
        self, seqs: list[Sequence], drafts: list[list[int]]
    ) -> tuple[list[tuple[list[int], list] | None], dict[str, str]]:
        """One decode forward over every row's newest token and draft; per row, the tokens to emit and their
        logprob entries (None each when not asked), and {request id: error} of the requests whose sampling failed
        (their rows None: _apart, as a plain step's). Rows without a draft sample exactly as a plain step does."""
        logits = self.runner.forward(seqs, False, drafts=drafts)  # [T, V], 1 + len(draft) positions a row
        starts = [0]
        for d in drafts:
            starts.append(starts[-1] + len(d) + 1)
        dev = logits.device

        def sample(rows: list[int]) -> list[tuple[list[int], list]]:
            # gathered copies of the rows' logits: a grammar's mask writes into its copy, never into `logits`
            results: dict[int, tuple[list[int], list]] = {}
            plain = [i for i in rows if not drafts[i]]
            spec = [i for i in rows if drafts[i]]
            if plain:
                idx = torch.tensor([starts[i] for i in plain], device=dev)
                tokens, scored = self._sample([seqs[i] for i in plain], logits[idx])
                for i, t, lp in zip(plain, tokens, scored, strict=True):
                    results[i] = ([t], [lp])
            if spec:
                idx = torch.tensor([r for i in spec for r in range(starts[i], starts[i + 1])], device=dev)
                tokens, _, scored = verify(
                    logits[idx], [seqs[i] for i in spec], [drafts[i] for i in spec], self.eos_ids
                )
                for i, toks, lps in zip(spec, tokens, scored, strict=True):
                    results[i] = (toks, lps if lps is not None else [None] * len(toks))
            return [results[i] for i in rows]

        # verify draws a drafting row's tokens from its own generator, on every device: put back on a retry
        host_draws = any(d and s.params.temperature > 0 for s, d in zip(seqs, drafts, strict=True))
        results, bad = self._apart(seqs, sample, keep_generators=host_draws or self.device.type != "cuda")
        for d, got in zip(drafts, results, strict=True):
            if d and got is not None:  # a row emits its accepted draft and one token of the target's own
                self.spec_draft_tokens += len(d)
                self.spec_accepted_tokens += len(got[0]) - 1
        return results, bad

    def _emit_many(self, seqs: list[Sequence], results: list[tuple[list[int], list]]) -> list:
        """Emit each row's tokens in order, stopping at the first that ends it (the rest are dropped); then
        register its blocks whose KV is now written and accepted, and free the blocks its rejected draft took."""
        events: list = []
        n = 0
        for s, got in zip(seqs, results, strict=True):
            if s.status == SeqStatus.FINISHED:  # its request failed (its sampling, a sibling's token): blocks freed
                continue
            toks, lps = got
            reason = None
            for t, lp in zip(toks, lps, strict=True):
                evs, reason = self._emit(s, t, lp)
                events += evs
                n += 1
                if reason is not None:
                    break
            # KV is written for every token but the newest (the accepted draft's; a rejected one's is past them)
            self.blocks.commit(s, s.num_tokens - 1)
            if reason is not None:
                events += self._end_sequence(s, reason)
            else:
                self.blocks.shrink(s.block_table, s.num_tokens)
        self._count(n)
        return events

    def _emit(self, s: Sequence, t: int, lp) -> tuple[list, str | None]:
        """Append one generated token to a sequence: its TokenEvent, and why the sequence stops there (or None)."""
        s.output_token_ids.append(t)
        if lp is not None:
            s.logprobs.append(lp)
        if t in s.params.stop_token_ids:  # counted, its text not shown (as vLLM's stop_token_ids)
            text, hit_stop, reason = "", False, "stop"
        else:
            text, hit_stop = s.stream.push(t)
            reason = "stop" if hit_stop else None
        # a matcher already failed fails its sequence whatever the token (the mask then allowed only the end
        # tokens: one of the request's stop_token_ids would end it "stop", cut short, as if it matched)
        if s.matcher is not None and (reason is None or s.matcher.error):
            failed_on_mask = bool(s.matcher.error)
            if failed_on_mask or not s.matcher.accept(t):
                # the parser ran out of fuel (a schema whose alternatives outgrow its bounds a few tokens in) on
                # this step's mask (which then allowed only EOS) or on this token; or the grammar refused the
                # token: EOS, where the sampler found nothing else to draw (the grammar's tokens all banned, by
                # min_tokens against a stop token, say), or a bug. The text can no longer be held to the schema:
                # the request fails, where it ended "stop", cut short, as if it matched
                why = s.matcher.error or f"token {t} refused"
                s.error = f"{GUIDED_ERROR_PREFIX}the grammar could not be enforced here: {why}"
                # the library broke on a mask, or on a token its mask allowed: what it learned is shared with every
                # copy of the grammar, which is forgotten. An end token drawn because nothing else was left (the
                # request's own bans emptied the row) breaks nothing shared: forgotten on it, any client could evict
                # any grammar it can name, and every other client's next request would compile it again
                broke = s.matcher.library_failed and (failed_on_mask or t not in self.eos_ids)
                if broke and self._grammars is not None:
                    self._grammars.forget(s.params.guided, s.cache_salt)
                log.warning("request %s: %s", s.request_id, s.error)
                reason = "error"
            elif s.matcher.terminated:  # the text is complete: nothing but EOS may follow
                reason = "stop"
        if reason is None and t in self.eos_ids and not s.params.ignore_eos:
            reason = "stop"
        elif reason is None and (len(s.output_token_ids) >= s.params.max_tokens or s.num_tokens >= self.max_len):
            reason = "length"
        if reason is not None and not hit_stop:
            text += s.stream.flush()
        if lp is None:
            return [TokenEvent(s.request_id, t, text, s.index)], reason
        return [TokenEvent(s.request_id, t, text, s.index, lp.logprob, lp.top_logprobs)], reason

    @torch.inference_mode()  # the logits are an inference tensor: the grammar's mask writes into them
    def _sample_apart(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list, list, dict[str, str]]:
        """_sample for the whole batch, apart by request where it raises (_apart). Returns the tokens and scores
        (None in the rows of a failed request) and {request id: error} of those that failed. A retry starts from
        the rows the failed try's grammar masks wrote into put back (their log-probs are the model's own)."""
        masked = {i: logits[i].clone() for i, s in enumerate(seqs) if s.matcher is not None}

        def sample(rows: list[int]) -> list[tuple[int, object]]:
            # all rows (the first try): the logits as they are; a request's: a gathered copy, which a grammar's mask
            # writes into, not the others' rows
            part = logits if len(rows) == len(seqs) else logits[torch.tensor(rows, device=logits.device)]
            return list(zip(*self._sample([seqs[i] for i in rows], part), strict=True))

        def put_back() -> None:
            for i, row in masked.items():
                logits[i] = row

        results, bad = self._apart(seqs, sample, put_back, keep_generators=self.device.type != "cuda")
        tokens = [None if r is None else r[0] for r in results]
        return tokens, [None if r is None else r[1] for r in results], bad

    def _apart(
        self, seqs: list[Sequence], sample, put_back=None, *, keep_generators: bool
    ) -> tuple[list, dict[str, str]]:
        """`sample(rows)` (one result per row index) for the whole batch; when that raises, again request by
        request, so a request whose parameters break the sampler fails alone rather than every request batched
        beside it. Returns the results (None in the rows of a failed request) and {request id: error} of those that
        failed. A retry starts from what the failed try found: with `keep_generators`, the sequences' generators
        it drew from are put back (a seeded request draws as it would have), and so is what `put_back` restores.
        The CUDA sampler of a plain step draws from seeds and steps, with no state to put back."""
        states = [s.generator.get_state() for s in seqs] if keep_generators else None
        try:
            return sample(list(range(len(seqs)))), {}
        except Exception:
            if len({s.group.request_id for s in seqs}) == 1:
                raise
            log.exception("sampling a step failed; sampling its requests one by one")
        for s, state in zip(seqs, states or (), strict=False):
            s.generator.set_state(state)
        if put_back is not None:
            put_back()
        results: list = [None] * len(seqs)
        bad: dict[str, str] = {}
        rows_of: dict[str, list[int]] = {}
        for i, s in enumerate(seqs):
            rows_of.setdefault(s.group.request_id, []).append(i)
        for rid, rows in rows_of.items():
            try:
                got = sample(rows)
            except Exception as e:
                bad[rid] = f"engine step failed: {type(e).__name__}: {e}"
                continue
            for i, r in zip(rows, got, strict=True):
                results[i] = r
        return results, bad

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list]:
        """One token per row, and its raw log-probabilities for the rows that ask (else None)."""
        params = [s.params for s in seqs]
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw = RawLogprobs(logits, lp_rows, [params[i].logprobs for i in lp_rows]) if lp_rows else None
        guided = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if guided:  # in place, after the raw scores were taken
            from node.engine.grammar import apply_bitmask

            mask = self._grammars.new_bitmask(len(guided))
            for j, i in enumerate(guided):
                seqs[i].matcher.fill(mask, j, self._steps)
            rows = None if len(guided) == len(seqs) else torch.tensor(guided, dtype=torch.int64)  # all: no gather
            apply_bitmask(logits, mask, rows)
        # the token histories only when a penalty needs them (process_logits reads them per row that asks)
        hist = {}
        if any(p.processed for p in params):
            hist = dict(prompts=[s.prompt_seen() for s in seqs], outputs=[s.output_token_ids for s in seqs])
        if self.device.type == "cuda":  # batched on the device, one copy of the ids to the host
            steps = [len(s.output_token_ids) for s in seqs]
            drawn = draw_on_device(logits, params, [s.seed for s in seqs], steps, eos_ids=self.eos_ids, **hist)
            entries = raw.entries(drawn) if raw is not None else []
            tokens = drawn.tolist()
        else:
            tokens = sample(logits, params, [s.generator for s in seqs], eos_ids=self.eos_ids, **hist)
            entries = raw.entries(torch.tensor(tokens, dtype=torch.int64)) if raw is not None else []
        scored: list = [None] * len(seqs)
        for i, e in zip(lp_rows, entries, strict=True):
            scored[i] = e
        return tokens, scored

    def _prompt_logprobs(self, seqs: list[Sequence], rows: list[int], hidden: torch.Tensor) -> list:
        """Score the prompts of `rows` (their prompt positions' hidden states, in order) and emit one event per
        prompt."""
        events, off, logits_of = [], 0, self.runner.model.compute_logits
        for i in rows:
            s = seqs[i]
            ids = s.prompt_token_ids
            k = s.params.prompt_logprobs
            entries = score(hidden[off : off + len(ids) - 1], ids[1:], k, logits_of) if len(ids) > 1 else []
            off += len(ids) - 1
            s.wants_prompt_logprobs = False
            whole = (None, *entries)
            s.group.prompt_logprobs[s.prompt_index] = whole
            events.append(PromptLogprobsEvent(s.request_id, s.prompt_index, whole))
        return events

    def _end_sequence(self, seq: Sequence, reason: str) -> list:
        """One sequence ended ("stop", "length"), and its request with its last sequence; or it failed ("error",
        its `error` says why), and its request with it: a request's sequences fail together (the step's loops
        pass over the siblings this finished)."""
        if reason == "error":
            return [self._end_group(seq.group, "error", seq.error)]
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        group = seq.group
        group.unfinished -= 1
        events: list = [SequenceFinishEvent(seq.request_id, seq.index, reason, seq.stream.stopped)]
        if group.unfinished == 0:
            events.append(self._end_group(group, None))
        return events

    def _end_group(self, group: SequenceGroup, reason: str | None, error: str | None = None) -> FinishEvent:
        """End a request: `reason` "abort" or "error" ends its unfinished sequences so; None when all ended."""
        for s in group.seqs:
            if s.status != SeqStatus.FINISHED:
                self.scheduler.finish(s)
                s.finish_reason = reason
        group.unfinished = 0
        self.requests.pop(group.request_id, None)
        if reason is None:
            reason = "length" if any(s.finish_reason == "length" for s in group.seqs) else "stop"
        first = group.seqs[0]
        choices = tuple(
            Choice(
                s.index,
                s.stream.text,
                tuple(s.output_token_ids),
                s.finish_reason,
                tuple(s.logprobs) if s.logprobs is not None else None,
            )
            for s in group.seqs
        )
        ev = FinishEvent(
            request_id=group.request_id,
            adapter_id=group.adapter_id,
            finish_reason=reason,
            prompt_tokens=group.prompt_tokens,
            completion_tokens=sum(len(s.output_token_ids) for s in group.seqs),
            started_at=group.started_at,
            finished_at=now_ms(),
            text=first.stream.text,
            token_ids=tuple(first.output_token_ids),
            error=error,
            choices=choices,
            prompt_logprobs=tuple(group.prompt_logprobs) if group.prompt_logprobs is not None else None,
            cached_tokens=sum(s.prompt_cached_tokens for s in group.seqs if s.index % s.params.n == 0),
            cache_write_tokens=sum(s.prompt_written_tokens for s in group.seqs if s.index % s.params.n == 0),
        )
        # kept for receipts only (counts and times): the text, tokens and logprobs of n choices and a long prompt's
        # scores could be tens of MB a request, and a thousand are kept
        self.recent[group.request_id] = dataclasses.replace(ev, text="", token_ids=(), choices=(), prompt_logprobs=None)
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
        # read from the event loop (GET /status, heartbeats) while the engine thread appends: a copy made in C, at
        # once (iterating the deque itself raised "deque mutated during iteration", a 500; red team)
        recent = [n for t, n in self._rate.copy() if t >= now - RATE_WINDOW_S]
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
        if self.tp is not None:
            self.tp.close()
