"""A request's state inside the engine: tokens so far, KV blocks, adapter slot, sampler state."""

from __future__ import annotations

import enum
import time

import torch

from node.engine.detokenizer import TextStream
from node.engine.layers.sampler import seeded_generator
from node.engine.request import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def now_ms() -> int:
    return int(time.time() * 1000)


class Sequence:
    """Prompt plus generated tokens; preemption frees its blocks and keeps everything else, so the
    resumed sequence recomputes its cache and continues with the same sampler state."""

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
    ) -> None:
        self.request_id = request_id
        self.adapter_id = adapter_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.block_table: list[int] = []
        self.status = SeqStatus.WAITING
        self.slot = -1  # adapter slot while running; -1 = base model
        self.generator = seeded_generator(seed, device)
        self.seed = seed  # the on-device sampler draws from (seed, token index) instead
        self.stream = TextStream(tokenizer, params.stop)
        self.finish_reason: str | None = None
        self.started_at = now_ms()
        self.error: str | None = None
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids
