"""The request bodies of the node API, and how a body becomes one: read by the handler, parsed by the one bounded
JSON parser (common.wire.parse_json), then checked by the pydantic model; FastAPI's own JSON decoding never runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.wire import HEX_ID_PATTERN, UntrustedJSONError, parse_json
from node.api.errors import ApiError, validation_message

ID_PATTERN = f"^{HEX_ID_PATTERN}$"  # anchored: pydantic's pattern searches
SEED_LIMIT = 1 << 64  # seeds are unsigned 64-bit: the device sampler hashes both 32-bit halves
IdPath = Annotated[str, Path(pattern=ID_PATTERN)]


class GenerateBody(BaseModel):
    # strict: a string max_tokens or a bool seed is a client's mistake to hear about, not to guess at
    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: Annotated[str | None, Field(pattern=ID_PATTERN)] = None
    adapter_id: Annotated[str | None, Field(pattern=ID_PATTERN)] = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    seed: Annotated[int | None, Field(ge=0, lt=SEED_LIMIT)] = None
    stop: Annotated[list[str], Field(max_length=4)] = []
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateBody:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt or prompt_token_ids")
        return self


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
