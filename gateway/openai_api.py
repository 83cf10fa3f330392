"""OpenAI wire models (requests we accept) and response/chunk builders (what we send back)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from common.wire import UntrustedJSONError, parse_json, sse_frame
from gateway.errors import BadRequest
from gateway.settings import DEFAULT_MAX_BODY_BYTES

if TYPE_CHECKING:
    from gateway.router import Target

Stop = str | Annotated[list[str], Field(max_length=4)] | None


# Strict types, as OpenAI's API: "16" is not a max_tokens, 1 is not a stream flag (a number where a float
# is expected is still one). Unknown fields are ignored, as OpenAI does.
STRICT = ConfigDict(extra="ignore", strict=True)
# a seed is a 64-bit unsigned number on the node; token ids are 32-bit
Seed = Annotated[int, Field(ge=0, lt=2**64)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI does; fields we cannot honour
    with a non-default value are refused rather than silently dropped."""

    model_config = STRICT

    model: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Seed | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported (leave them out or 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: (
        str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
    )
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, v):
        if v:
            raise ValueError("is not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v is not None:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    tools: list | None = None
    tool_choice: object | None = None
    response_format: dict | None = None

    @field_validator("logprobs", "tools")
    @classmethod
    def _unsupported(cls, v, info: ValidationInfo):
        if v:
            raise ValueError(f"{info.field_name} are not supported")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v and v.get("type") not in (None, "text"):
            raise ValueError("only response_format type 'text' is supported")
        return v

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict]:
        # "developer" is the newer name of "system"; base model templates know only the older roles
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def parse_body(model: type[BaseModel], raw: bytes, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> BaseModel:
    """Validate a request body; BadRequest naming the offending field (OpenAI's `param`) otherwise."""
    try:
        data = parse_json(raw, max_bytes=max_bytes, what="request body")
    except UntrustedJSONError as e:
        raise BadRequest(str(e)) from e
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # a union field reports one error per branch; the one that is not a plain type mismatch says most
        err = next((x for x in errors if not x.get("type", "").endswith("_type")), errors[0])
        loc = [str(p) for p in err.get("loc", ())]
        param = loc[0] if loc else None
        # pydantic's loc for a union names the branch type ("str", "list[int]"); keep the field path only
        path = ".".join(p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int"))
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "is required"
        raise BadRequest(f"{path or 'body'}: {msg}", param=param) from e


def to_node_request(
    req: CompletionRequest | ChatRequest,
    target: Target,
    prompt_token_ids: list[int],
    *,
    max_tokens: int,
    request_id: str,
) -> dict:
    """The node API's generate body for an OpenAI request: the prompt as the token ids the gateway made (their
    number is the prompt count billed), OpenAI's sampling defaults made explicit."""
    return {
        "adapter_id": target.adapter_id,
        "prompt_token_ids": prompt_token_ids,
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "seed": req.seed,
        "stop": req.stop_list(),
        "request_id": request_id,
    }


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(node_reason: str | None) -> str:
    return "length" if node_reason == "length" else "stop"


def completion_response(rid: str, created: int, model: str, text: str, reason: str, usage: dict) -> dict:
    return {
        "id": "cmpl-" + rid[2:],
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
        "usage": usage,
    }


def chat_response(rid: str, created: int, model: str, text: str, reason: str, usage: dict) -> dict:
    return {
        "id": "chatcmpl-" + rid[2:],
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
        ],
        "usage": usage,
    }


class ChunkBuilder:
    """SSE chunks of one streamed response, in OpenAI's shapes for completions or chat."""

    def __init__(self, *, chat: bool, rid: str, created: int, model: str, include_usage: bool) -> None:
        self.chat, self.created, self.model, self.include_usage = chat, created, model, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + rid[2:]
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _chunk(self, choices: list, usage: dict | None = None) -> bytes:
        obj = {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            obj["usage"] = usage
        return sse_frame(obj)

    def role(self) -> bytes:
        """Chat streams open with the assistant role."""
        return self._chunk(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )

    def token(self, text: str) -> bytes:
        if self.chat:
            return self._chunk([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])

    def finish(self, reason: str) -> bytes:
        if self.chat:
            return self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}])
        return self._chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}])

    def usage(self, usage: dict) -> bytes:
        return self._chunk([], usage)
