"""A request's state inside the engine: its sequences (prompts x n), each with tokens so far, KV blocks, adapter
slot, sampler state and grammar matcher; the group ends the request when its last sequence ends."""

from __future__ import annotations

import enum
import time

import torch

from node.adapters.detokenizer import TextStream
from node.engine.layers.sampler import seeded_generator
from node.engine.request import SamplingParams, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def now_ms() -> int:
    return int(time.time() * 1000)


class Sequence:
    """Prompt plus generated tokens; preemption frees its blocks and keeps everything else, so the
    resumed sequence recomputes its cache (but what the prefix cache still holds of it) and continues
    with the same sampler and grammar state."""

    __slots__ = (
        "request_id",
        "adapter_id",
        "prompt_token_ids",
        "output_token_ids",
        "params",
        "block_table",
        "status",
        "slot",
        "generator",
        "stream",
        "finish_reason",
        "started_at",
        "error",
        "num_preemptions",
        "seed",
        "index",
        "prompt_index",
        "group",
        "matcher",
        "logprobs",
        "wants_prompt_logprobs",
        "block_hashes",
        "num_cached_tokens",
        "num_committed_blocks",
        "cache_salt",
        "prompt_cached_tokens",
        "prompt_written_tokens",
        "_prompt_seen",
    )

    def __init__(
        self,
        request_id: str,
        adapter_id: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer,
        device: torch.device,
        seed: int,
        *,
        index: int = 0,
        prompt_index: int = 0,
        matcher=None,
        cache_salt: str | None = None,
        end_ids: frozenset[int] = frozenset(),
    ) -> None:
        """`end_ids`: the base's end tokens, whose text is not shown where special tokens' is (TextStream)."""
        self.request_id = request_id
        self.adapter_id = adapter_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.block_table: list[int] = []
        # prefix caching (block_manager.py): the keys of its full blocks so far; the tokens its last
        # admission found cached (its prefill starts there); its blocks registered or borrowed so far
        self.block_hashes: list[bytes] = []
        self.num_cached_tokens = 0
        self.num_committed_blocks = 0
        self.cache_salt = cache_salt  # part of its blocks' keys (GenerationRequest.cache_salt)
        self.prompt_cached_tokens = 0  # num_cached_tokens of its first prefill (usage: cached prompt tokens)
        # the prompt tokens of the full blocks its first prefill registered (usage: cache_write_tokens)
        self.prompt_written_tokens = 0
        self.status = SeqStatus.WAITING
        self.slot = -1  # adapter slot while running; -1 = base model
        self.generator = seeded_generator(seed, device)
        self.seed = seed  # the on-device sampler draws from (seed, token index) instead
        self.stream = TextStream(
            tokenizer,
            params.stop,
            skip_special_tokens=params.skip_special_tokens,
            unshown=frozenset() if params.ignore_eos else end_ids,
        )
        self.finish_reason: str | None = None
        self.started_at = now_ms()
        self.error: str | None = None
        self.num_preemptions = 0
        self.index = index  # the choice index: prompt_index * n + j
        self.prompt_index = prompt_index
        self.group: SequenceGroup | None = None
        self.matcher = matcher  # node.engine.grammar.Matcher when params.guided is set
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        # the first sequence of each prompt scores the prompt, once (not again after a preemption)
        self.wants_prompt_logprobs = params.prompt_logprobs is not None and index % params.n == 0
        self._prompt_seen: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def prompt_seen(self) -> torch.Tensor:
        """The prompt's distinct token ids (int64, on the host), made once: what the repetition penalty reads of the
        prompt at every step (the prompt's list copied and made a tensor at each step cost 16 rows of a 32k-token
        prompt 80 ms a step; complexity red team)."""
        if self._prompt_seen is None:
            self._prompt_seen = torch.unique(torch.tensor(self.prompt_token_ids, dtype=torch.int64))
        return self._prompt_seen


class SequenceGroup:
    """One request's sequences, in choice order; `unfinished` counts those still running or waiting."""

    __slots__ = ("request_id", "adapter_id", "seqs", "prompt_tokens", "started_at", "unfinished", "prompt_logprobs")

    def __init__(self, seqs: list[Sequence], prompt_tokens: int) -> None:
        first = seqs[0]
        self.request_id = first.request_id
        self.adapter_id = first.adapter_id
        self.seqs = seqs
        self.prompt_tokens = prompt_tokens  # each prompt once, however many sequences continue it
        self.started_at = first.started_at
        self.unfinished = len(seqs)
        n_prompts = seqs[-1].prompt_index + 1
        self.prompt_logprobs: list | None = [None] * n_prompts if first.params.prompt_logprobs is not None else None
        for s in seqs:
            s.group = self
