"""What callers hand the engine (GenerationRequest, SamplingParams) and what it streams back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.wire import is_id

MAX_STOP_STRINGS = 4
SEED_LIMIT = 1 << 64  # seeds are unsigned 64-bit integers; every bit of them changes the draws


class RequestError(ValueError):
    """A request the engine refuses before it runs (bad parameters, too long, duplicate id)."""


class PromptTooLongError(RequestError):
    """The prompt does not fit the model's context or the KV cache."""


class DuplicateRequestError(RequestError):
    """A request with this id is already running."""


# Temperatures below this sample as greedy (as vLLM's sampling epsilon does): dividing logits by them
# overflows float32.
MIN_TEMPERATURE = 1e-5


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Per-request sampling: temperature 0 is greedy; top_k 0 is off; seed None draws one."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0 <= self.temperature < math.inf:
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature < MIN_TEMPERATURE:
            # logits / 1e-308 overflow to inf and the draw fails; a temperature this small is greedy anyway
            object.__setattr__(self, "temperature", 0.0)
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT
        ):
            raise RequestError(f"seed must be an integer in [0, 2^64) or null, got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, got {list(self.stop)!r}")


@dataclass(slots=True)
class GenerationRequest:
    """One generation: a prompt (text or token ids) for the base model or one adapter."""

    request_id: str
    adapter_id: str | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise RequestError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if self.adapter_id is not None and not is_id(self.adapter_id):
            raise RequestError(
                f"adapter_id must be '0x' + 64 lowercase hex characters or null, got {self.adapter_id!r}"
            )
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise RequestError("give exactly one of prompt or prompt_token_ids")


@dataclass(slots=True, frozen=True)
class TokenEvent:
    """One generated token; `text` is the newly complete text (may be empty while UTF-8 bytes or
    a possible stop string are pending)."""

    request_id: str
    token_id: int
    text: str


@dataclass(slots=True, frozen=True)
class FinishEvent:
    """The end of a request: why, usage, timestamps (unix ms); `error` set when the engine failed it."""

    request_id: str
    adapter_id: str | None
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int
    started_at: int
    finished_at: int
    text: str = ""
    token_ids: tuple[int, ...] = ()
    error: str | None = None
