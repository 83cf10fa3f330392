"""What callers hand the engine (GenerationRequest, SamplingParams) and what it streams back."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.wire import (
    GUIDED_FAILED,
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORD_SEQUENCES,
    MAX_BAD_WORD_TOKENS,
    MAX_BIAS,
    MAX_CACHE_SALT,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_PENALTY,
    MAX_PROMPTS,
    MAX_REPETITION_PENALTY,
    MAX_SEQUENCES,
    MAX_STOP_TOKEN_IDS,
    MAX_STOPS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    SEED_LIMIT,
    is_id,
)

if TYPE_CHECKING:
    import torch

    from node.engine.grammar import GuidedSpec


# what a guided request's text must be (node.engine.grammar.GuidedSpec): any JSON object, JSON valid against a
# schema, text a regular expression matches whole, JSON of a schema or tool calls, or text a grammar derives
GUIDED_TYPES = ("json_object", "json_schema", "regex", "json_or_tool_calls", "grammar")


class RequestError(ValueError):
    """A request the engine refuses before it runs (bad parameters, too long, duplicate id)."""


class PromptTooLongError(RequestError):
    """The prompt does not fit the model's context or the KV cache."""


class DuplicateRequestError(RequestError):
    """A request with this id is already running."""


class EngineBusyError(RuntimeError):
    """The engine has more requests waiting to be validated than it queues: not the request's fault, retry."""


# Temperatures below this sample as greedy (as vLLM's sampling epsilon does): dividing logits by them
# overflows float32.
MIN_TEMPERATURE = 1e-5


def _number(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        raise RequestError(f"{name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}")


def _count(name: str, value, lo: int, hi: int | None = None, *, nullable: bool = False) -> None:
    if nullable and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise RequestError(f"{name} must be an integer {bound}{' or null' if nullable else ''}, got {value!r}")


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 is greedy; top_k 0, min_p 0, penalties 0 (repetition 1) are off;
    seed None draws one. Token ids (logit_bias, stop_token_ids, allowed_token_ids) are checked against the
    vocabulary by the engine, which knows it. `logit_bias` may be given as a mapping; it is kept as sorted (id, bias)
    pairs. `allowed_token_ids` (vLLM's): when given, the only ids the sequences may draw (an end token only where
    listed, or where a row has nothing else left to draw, as any row); kept sorted, without repeats. `bad_words`
    (vLLM's bad_words, as token id sequences): a word's last token is banned where the tokens generated so far end
    with the rest of it (the model may still write the word with other tokens, as vLLM's docs warn)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[tuple[int, ...], ...] = ()
    logprobs: int | None = None  # top log-probabilities per generated token (0: only the chosen one's)
    prompt_logprobs: int | None = None  # the same for every prompt position
    n: int = 1  # sequences per prompt
    guided: GuidedSpec | None = None  # the grammar the text must follow (node.engine.grammar)
    skip_special_tokens: bool = True  # vLLM's: special tokens' text left out of the text (the end token's always is)
    # made once a request, for every step of its sequences (layers.logits_processor; a per-step cache keyed by the
    # lists missed every time past its size, and hashed 4,096 ids a row a step where it hit): the one-token bad
    # words, and the longer ones by the token before their last; the mask of ids not allowed per (device, width)
    _words: tuple = field(init=False, default=None, repr=False, compare=False)
    _masks: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise RequestError(
                f"temperature must be a finite number >= 0 and <= {MAX_TEMPERATURE:g}, got {self.temperature!r}"
            )
        if self.temperature < MIN_TEMPERATURE:
            # logits / 1e-308 overflow to inf and the draw fails; a temperature this small is greedy anyway
            object.__setattr__(self, "temperature", 0.0)
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_TOP_K:
            raise RequestError(f"top_k must be an integer in [0, {MAX_TOP_K}] (0 = off), got {str(self.top_k)[:40]}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT
        ):
            raise RequestError(f"seed must be an integer in [0, 2^64) or null, got {self.seed!r}")
        if len(self.stop) > MAX_STOPS or any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"stop must be at most {MAX_STOPS} non-empty strings, got {list(self.stop)!r}")
        _number("min_p", self.min_p, 0, 1)
        _count("min_tokens", self.min_tokens, 0, self.max_tokens)
        _number("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
        _number("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
        _number("repetition_penalty", self.repetition_penalty, 0, MAX_REPETITION_PENALTY, lo_open=True)
        self._check_logit_bias()
        ids = tuple(self.stop_token_ids)
        if len(ids) > MAX_STOP_TOKEN_IDS or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise RequestError(f"stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} token ids, got {list(ids)!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        self._check_allowed()
        self._check_bad_words()
        _count("logprobs", self.logprobs, 0, MAX_LOGPROBS, nullable=True)
        _count("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS, nullable=True)
        _count("n", self.n, 1, MAX_N)
        # a GuidedSpec (checked by its shape: node.engine.grammar imports this module)
        if self.guided is not None and getattr(self.guided, "type", None) not in GUIDED_TYPES:
            raise RequestError(f"guided must be a GuidedSpec or None, got {type(self.guided).__name__}")

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        pairs = list(bias.items()) if isinstance(bias, Mapping) else list(bias)
        if len(pairs) > MAX_LOGIT_BIAS:
            raise RequestError(f"logit_bias holds {len(pairs)} entries; at most {MAX_LOGIT_BIAS}")
        out = {}
        for pair in pairs:
            t, b = pair if isinstance(pair, tuple) and len(pair) == 2 else (pair, None)
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise RequestError(f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
            _number(f"logit_bias[{t}]", b, -MAX_BIAS, MAX_BIAS)
            out[t] = float(b)
        object.__setattr__(self, "logit_bias", tuple(sorted(out.items())))

    def _check_allowed(self) -> None:
        if self.allowed_token_ids is None:
            return
        ids = tuple(self.allowed_token_ids)
        if not 0 < len(ids) <= MAX_ALLOWED_TOKEN_IDS or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids
        ):
            raise RequestError(
                f"allowed_token_ids must be 1 to {MAX_ALLOWED_TOKEN_IDS} token ids (integers >= 0), "
                f"got {str(list(ids))[:80]}"
            )
        object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(ids))))

    def _check_bad_words(self) -> None:
        words = tuple(tuple(w) if isinstance(w, (list, tuple)) else w for w in self.bad_words)
        ok = len(words) <= MAX_BAD_WORD_SEQUENCES and all(
            isinstance(w, tuple) and w and all(type(t) is int and t >= 0 for t in w) for w in words
        )
        if not ok or sum(map(len, words)) > MAX_BAD_WORD_TOKENS:
            raise RequestError(
                f"bad_words must be at most {MAX_BAD_WORD_SEQUENCES} non-empty token id sequences of "
                f"{MAX_BAD_WORD_TOKENS} ids in all, got {str(self.bad_words)[:80]}"
            )
        object.__setattr__(self, "bad_words", words)
        by_last: dict[int, list[tuple[int, ...]]] = {}
        for w in words:
            if len(w) > 1:
                by_last.setdefault(w[-2], []).append(w)
        object.__setattr__(self, "_words", (frozenset(w[0] for w in words if len(w) == 1), by_last))

    def words_ending(self, output: list[int]) -> set[int]:
        """The last tokens of the bad words that `output`'s last tokens would complete (vLLM's rule: a word is
        matched against the generated tokens only, never the prompt)."""
        ones, by_last = self._words
        banned = set(ones)
        for w in by_last.get(output[-1], ()) if output else ():
            n = len(w) - 1
            if n <= len(output) and tuple(output[-n:]) == w[:-1]:
                banned.add(w[-1])
        return banned

    def outside_mask(self, width: int, device) -> torch.Tensor:
        """[width] bool on `device`, True at the ids not allowed: made once a device and width (on the engine
        thread)."""
        mask = self._masks.get((str(device), width))
        if mask is None:
            import torch

            mask = torch.ones(width, dtype=torch.bool)
            mask[[t for t in self.allowed_token_ids if t < width]] = False
            mask = self._masks[(str(device), width)] = mask.to(device)
        return mask

    @property
    def penalized(self) -> bool:
        """Whether a penalty needs this row's token counts."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def processed(self) -> bool:
        """Whether the row's logits change before the draw (bias, min_tokens, allowed ids, penalties): plain rows
        skip it."""
        return (
            bool(self.logit_bias)
            or self.min_tokens > 0
            or self.allowed_token_ids is not None
            or bool(self.bad_words)
            or self.penalized
        )

    def token_ids(self) -> list[int]:
        """Every token id these params name (checked against the vocabulary by the engine)."""
        words = [t for w in self.bad_words for t in w]
        return [t for t, _ in self.logit_bias] + list(self.stop_token_ids) + list(self.allowed_token_ids or ()) + words


@dataclass(slots=True)
class GenerationRequest:
    """One generation: a prompt (text or token ids; or several prompts as lists of token ids) for the base model
    or one adapter. Each prompt gets `params.n` sequences; sequence k (choice index p * n + j) samples with
    seed (seed + k) mod 2^64."""

    request_id: str
    adapter_id: str | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | list[list[int]] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    # requests share cached prompt KV and compiled grammars only under the same salt (vLLM's cache_salt): a caller
    # that gives each tenant its own salt keeps one tenant from timing whether another sent a prompt, and from
    # spending the lexer states of another's grammar (Grammars.compiled); None: the shared cache
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise RequestError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if self.adapter_id is not None and not is_id(self.adapter_id):
            raise RequestError(
                f"adapter_id must be '0x' + 64 lowercase hex characters or null, got {self.adapter_id!r}"
            )
        if self.cache_salt is not None and (
            not isinstance(self.cache_salt, str) or not 0 < len(self.cache_salt) <= MAX_CACHE_SALT
        ):
            raise RequestError(f"cache_salt must be a string of 1 to {MAX_CACHE_SALT} characters or null")
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise RequestError("give exactly one of prompt or prompt_token_ids")
        ids = self.prompt_token_ids
        if ids is not None and ids and isinstance(ids[0], list):
            if len(ids) > MAX_PROMPTS or not all(isinstance(p, list) for p in ids):
                raise RequestError(f"prompt_token_ids must be one list of token ids or at most {MAX_PROMPTS} lists")
        if self.num_prompts * self.params.n > MAX_SEQUENCES:
            raise RequestError(
                f"{self.num_prompts} prompts x n={self.params.n} make more than {MAX_SEQUENCES} sequences"
            )

    @property
    def num_prompts(self) -> int:
        ids = self.prompt_token_ids
        return len(ids) if ids and isinstance(ids[0], list) else 1

    def token_prompts(self) -> list[list[int]] | None:
        """The prompts as lists of token ids (None for a text prompt)."""
        ids = self.prompt_token_ids
        if ids is None:
            return None
        return [list(p) for p in ids] if ids and isinstance(ids[0], list) else [list(ids)]


TopLogprobs = tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """One position's score: the token's log-probability under the model's raw distribution, and the top ones;
    a prompt position's also says the token's rank in the vocabulary (1: the most likely), as vLLM's do."""

    token_id: int
    logprob: float
    top_logprobs: TopLogprobs = ()
    rank: int | None = None


@dataclass(slots=True, frozen=True)
class TokenEvent:
    """One generated token of sequence `index`; `text` is the newly complete text (may be empty while UTF-8
    bytes or a possible stop string are pending). logprob/top_logprobs when the request asked."""

    request_id: str
    token_id: int
    text: str
    index: int = 0
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None


@dataclass(slots=True, frozen=True)
class SequenceFinishEvent:
    """Sequence `index` of a request ended ("stop" | "length"); the request's FinishEvent comes after all.
    `stop_string`: the request's stop string that ended it (a stop token id is the sequence's last token)."""

    request_id: str
    index: int
    finish_reason: str
    stop_string: str | None = None


@dataclass(slots=True, frozen=True)
class PromptLogprobsEvent:
    """Prompt `prompt_index`'s scores: one per prompt token, the first None (nothing precedes it)."""

    request_id: str
    prompt_index: int
    entries: tuple[TokenLogprob | None, ...]


@dataclass(slots=True, frozen=True)
class Choice:
    """One sequence's result: its text, tokens, why it ended, and its tokens' scores when asked."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] | None = None


# How the engine's error begins when a request failed on its own grammar (a mask past the node's CPU bounds, the
# parser out of fuel, a token it refused): the request's grammar, not the engine, is at fault
GUIDED_ERROR_PREFIX = "guided: "


@dataclass(slots=True, frozen=True)
class FinishEvent:
    """The end of a request: why, usage, timestamps (unix ms); `error` set when the engine failed it.
    prompt_tokens counts each prompt once (however many sequences it has), completion_tokens every sequence's
    tokens; text/token_ids are choice 0's. finish_reason: "abort"/"error" when so, else "length" when any
    sequence hit its length, else "stop"."""

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
    choices: tuple[Choice, ...] = ()
    prompt_logprobs: tuple[tuple[TokenLogprob | None, ...], ...] | None = None
    # of prompt_tokens, those whose KV the prefix cache held when each prompt was first computed (OpenAI's
    # usage.prompt_tokens_details.cached_tokens)
    cached_tokens: int = 0
    # of prompt_tokens, those whose KV each prompt's first computing newly put into the prefix cache: its full
    # blocks not found there, less any whose key another sequence's block already held (cache_write_tokens)
    cache_write_tokens: int = 0

    @property
    def error_code(self) -> str | None:
        """The error's code on the wire: GUIDED_FAILED where the request's grammar failed it, else "engine_error"
        (None: no error)."""
        if self.error is None:
            return None
        return GUIDED_FAILED if self.error.startswith(GUIDED_ERROR_PREFIX) else "engine_error"
