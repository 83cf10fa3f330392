"""The request bodies of the node API, and how a body becomes one: read by the handler, parsed by the one bounded
JSON parser (common.wire.parse_json), then checked by the pydantic model; FastAPI's own JSON decoding never runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.wire import (
    HEX_ID_PATTERN,
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
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_STOPS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    SEED_LIMIT,
    UntrustedJSONError,
    parse_json,
)
from node.adapters.ensemble import MAX_ENSEMBLE_ADAPTERS, MAX_ENSEMBLE_WEIGHT, check_components, ensemble_key
from node.api.errors import ApiError, validation_message

ID_PATTERN = f"^{HEX_ID_PATTERN}$"  # anchored: pydantic's pattern searches
IdPath = Annotated[str, Path(pattern=ID_PATTERN)]


Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0)]
Logprobs = Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)]


class EnsemblePart(BaseModel):
    """One adapter of an ensemble and its weight (node/adapters/ensemble.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    adapter_id: Annotated[str, Field(pattern=ID_PATTERN)]
    weight: Annotated[float, Field(gt=0, le=MAX_ENSEMBLE_WEIGHT, allow_inf_nan=False)]


# what a generate body holds beside its prompts' ids, at most: a guided schema (64 kB), a grammar (32 kB) or choices
# (256 of 1,024 characters: 1.5 MB at worst, control characters written as 6-byte escapes), 300 logit biases, stop
# strings and ids, 4,096 allowed ids and 4,096 bad-word ids (about 45 kB each), an ensemble, the sampling fields
GENERATE_FIELDS_BYTES = 2 << 20


def generate_body_bytes(context: int, vocab_size: int) -> int:
    """The largest generate body a gateway may send to a node whose context (its engine's max_len: no longer prompt
    is served) and vocabulary are these: MAX_PROMPTS prompts that fill the context, each id written with the most
    digits the vocabulary has and its comma, and the other fields. A fixed limit refused a long-context base's
    valid requests (16 prompts of a 32k context are 3.7 MB of ids), which the gateway took for a node that cannot
    serve (audit)."""
    return MAX_PROMPTS * context * (len(str(vocab_size - 1)) + 1) + GENERATE_FIELDS_BYTES


class GenerateBody(BaseModel):
    """POST /v1/generate (the gateway -> node wire protocol): one prompt (text or token ids) or several (lists of
    token ids), n sequences each, and the sampling, scoring and grammar fields of the OpenAI API as vLLM serves
    them. Token ids are checked against the vocabulary by the engine; a grammar's schema by the grammar library."""

    # strict: a string max_tokens or a bool seed is a client's mistake to hear about, not to guess at
    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: Annotated[str | None, Field(pattern=ID_PATTERN)] = None
    adapter_id: Annotated[str | None, Field(pattern=ID_PATTERN)] = None
    # several adapters with weights, served as one (their weighted sum); adapter_id is then the ensemble's id,
    # filled in here when the caller leaves it out
    ensemble: Annotated[list[EnsemblePart], Field(min_length=2, max_length=MAX_ENSEMBLE_ADAPTERS)] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | list[list[int]] | None = None
    max_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K)] = 0
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    seed: Annotated[int | None, Field(ge=0, lt=SEED_LIMIT)] = None
    stop: Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOPS)] = []
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] = []
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS)] | None = None
    # vLLM's bad_words as the gateway tokenized them (node.adapters.prompts.bad_word_ids)
    bad_words_token_ids: (
        Annotated[
            list[Annotated[list[TokenId], Field(min_length=1, max_length=MAX_BAD_WORD_TOKENS)]],
            Field(max_length=MAX_BAD_WORD_SEQUENCES),
        ]
        | None
    ) = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # vLLM's (common.wire.SKIP_SPECIAL_TOKENS_FEATURE)
    min_tokens: Annotated[int, Field(ge=0)] = 0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False)] = 1.0
    # OpenAI's shape: decimal token ids as keys
    logit_bias: (
        Annotated[
            dict[
                Annotated[str, Field(pattern=r"^[0-9]{1,10}$")],
                Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS, allow_inf_nan=False)],
            ],
            Field(max_length=MAX_LOGIT_BIAS),
        ]
        | None
    ) = None
    logprobs: Logprobs = None
    prompt_logprobs: Logprobs = None
    # {"type": "json_object"} | {"type": "json_schema", "schema": {...}} | {"type": "regex", "pattern": "..."} |
    # {"type": "choice", "choices": [...]}: checked by node.engine.grammar
    guided: dict | None = None
    # requests share cached prompt KV only under the same salt: the gateway gives each API key its own, so no
    # client learns from its cached_tokens (or its speed) what another client's prompts were
    cache_salt: Annotated[str, Field(min_length=1, max_length=MAX_CACHE_SALT)] | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> GenerateBody:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt or prompt_token_ids")
        if self.prompts is not None and len(self.prompts) > MAX_PROMPTS:
            raise ValueError(f"prompt_token_ids holds {len(self.prompts)} prompts; at most {MAX_PROMPTS}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if len(self.prompts or [None]) * self.n > MAX_SEQUENCES:
            raise ValueError(f"n: {len(self.prompts)} prompts x n={self.n} make more than {MAX_SEQUENCES} sequences")
        if self.ensemble is not None:
            key = ensemble_key(self.components)  # ValueError on a repeated adapter
            if self.adapter_id is not None and self.adapter_id != key:
                raise ValueError(f"adapter_id {self.adapter_id} is not the ensemble's id {key}; leave it out")
            self.adapter_id = key
        return self

    @property
    def components(self) -> tuple[tuple[str, float], ...] | None:
        """The ensemble's (adapter id, weight) pairs in order (None for one adapter or the base)."""
        if self.ensemble is None:
            return None
        return check_components((p.adapter_id, p.weight) for p in self.ensemble)

    @property
    def prompts(self) -> list[list[int]] | None:
        """The token-id prompts as a list of prompts (None for a text prompt)."""
        ids = self.prompt_token_ids
        if ids is None:
            return None
        return ids if ids and isinstance(ids[0], list) else [ids]


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    pin: bool | None = None


def parse_body(raw: bytes, model: type[BaseModel], *, max_bytes: int, optional: bool = False):
    """A request body through the one bounded JSON parser, then the pydantic model; ApiError 400 otherwise."""
    if not raw.strip():
        if optional:
            return None
        raise ApiError(400, "request body is missing; expected a JSON object", "invalid_request")
    try:
        return model.model_validate(parse_json(raw, max_bytes=max_bytes, what="request body"))
    except UntrustedJSONError as e:
        raise ApiError(400, str(e), "invalid_request") from None
    except ValidationError as e:
        raise ApiError(400, validation_message(e.errors()), "invalid_request") from None


def json_schema_body(model: type[BaseModel], *, required: bool = True) -> dict:
    """`openapi_extra` declaring a JSON body: the handlers read their bodies themselves (parse_body), so the
    OpenAPI document is told the schema here."""
    return {
        "requestBody": {"required": required, "content": {"application/json": {"schema": model.model_json_schema()}}}
    }
