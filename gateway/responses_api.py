"""OpenAI's Responses API (`POST /v1/responses`), served by the chat path.

A request is checked in its own shape (each field refused by its own name), then turned into the chat request it
is (`ResponsesChat`: the base's chat template, the tools, the constraints, the bounds and the billing are the chat
endpoint's, not a second copy of them); its answer is written back as a Response object, or as the Responses
event stream (`ResponseEvents`, which takes the same calls as the chat endpoint's ChunkBuilder).

What is served: `input` as text or as items (messages with input_text / output_text parts, function_call and
function_call_output items: a conversation sent whole, as the openai SDK's `input += response.output` builds it),
`instructions` (a system message first), `max_output_tokens`, `temperature`, `top_p`, function `tools` with
`tool_choice` and `parallel_tool_calls`, `text.format` (text, json_object, json_schema), `top_logprobs` with
`include: ["message.output_text.logprobs"]`, and the ensemble's `adapter_weights`. A `text.format` beside tools
the model may call makes the answer that format's JSON or the calls, as on the chat endpoint; beside a tool choice
that forces a call it is dropped (the answer is the call). Nothing is stored: `store: true`,
`previous_response_id`, `conversation`, `background`, stored prompts and `max_tool_calls` are refused by name
(send the conversation in `input`; a stored response's routes answer 404 in one line), as are the built-in tools
(web search, files, computer use), images and files, and `reasoning` (the bases here have no separate
reasoning). Accepted without effect, as on the chat endpoint: `user`,
`safety_identifier`, `prompt_cache_key`, `metadata`, `truncation` ("disabled"), `stream_options.include_obfuscation`,
`text.verbosity` ("medium"); `service_tier` ("auto" / "default") is answered with the tier that served it."""

from __future__ import annotations

import time
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, model_validator

from common.wire import MAX_LOGPROBS, sse_frame
from gateway.errors import BadRequest
from gateway.openai_api import (
    MAX_MESSAGES,
    SERVED_TIER,
    STRICT,
    AdapterWeights,
    ChatRequest,
    Identifier,
    JsonSchemaFormat,
    Schema,
    Temperature,
    TopP,
)
from gateway.tools import NAME, grow

LOGPROBS_INCLUDE = "message.output_text.logprobs"


class ContentPart(BaseModel):
    """Text in a message: a user's input_text, or an earlier answer's output_text sent back (its annotations and
    logprobs are what the SDK gave the client; the template is not shown them)."""

    model_config = STRICT
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None
    logprobs: list | None = None


class MessageItem(BaseModel):
    model_config = STRICT
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)]
    # what an answer's item carries when it is sent back: not used
    id: Identifier | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    """A call an earlier answer made (history)."""

    model_config = STRICT
    type: Literal["function_call"]
    call_id: Identifier
    name: Annotated[str, Field(max_length=64)]
    arguments: str
    id: Identifier | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(BaseModel):
    """What a call returned: the tool message answering `call_id`."""

    model_config = STRICT
    type: Literal["function_call_output"]
    call_id: Identifier
    output: str | Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)]
    id: Identifier | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_type(v: object) -> str | None:
    """An input item's kind: its `type` (a message may leave it out, as EasyInputMessage does)."""
    if isinstance(v, dict):
        return v.get("type", "message")
    return getattr(v, "type", None) or "message"


Item = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(BaseModel):
    """A Responses function tool: the chat API's `function` object, flattened into the tool."""

    model_config = STRICT
    type: Literal["function"]
    name: Annotated[str, Field(pattern=NAME.pattern)]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # every schema is enforced exactly (the node's grammar), strict or not


class TextFormat(BaseModel):
    """`text.format`: plain text, any JSON object, or a JSON schema (the chat API's json_schema, flattened)."""

    model_config = STRICT | ConfigDict(populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(pattern=NAME.pattern)] | None = None
    description: str | None = None
    schema_: Schema | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _fields(self) -> TextFormat:
        named = {"name": self.name, "schema": self.schema_, "description": self.description, "strict": self.strict}
        if self.type == "json_schema":
            missing = [f for f in ("name", "schema") if named[f] is None]
            if missing:
                raise ValueError(f"a json_schema format needs {' and '.join(missing)}")
        elif given := [f for f, v in named.items() if v is not None]:
            raise ValueError(f"{', '.join(given)} only go with type json_schema, not {self.type}")
        return self

    def response_format(self) -> dict:
        """The chat API's response_format of this format."""
        if self.type != "json_schema":
            return {"type": self.type}
        fmt = JsonSchemaFormat(name=self.name, description=self.description, schema=self.schema_, strict=self.strict)
        return {"type": "json_schema", "json_schema": fmt.model_dump(by_alias=True, exclude_none=True)}


class TextConfig(BaseModel):
    model_config = STRICT
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only length the answer has: max_output_tokens bounds it


class ResponsesStreamOptions(BaseModel):
    model_config = STRICT
    include_obfuscation: bool | None = None  # nothing is padded


class ResponsesChat(ChatRequest):
    """The chat request a Responses request is: errors about its prompt and its length name the Responses
    fields."""

    PROMPT_FIELD: ClassVar[str] = "input"

    def tokens_field(self) -> str:
        return "max_output_tokens"

    def guided_field(self) -> str | None:
        field = super().guided_field()
        return "text" if field == "response_format" else field


class ResponsesRequest(BaseModel):
    model_config = STRICT

    model: Annotated[str, Field(min_length=1)]
    input: str | Annotated[list[Item], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    include: list[Literal["message.output_text.logprobs"]] | None = None
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    tools: Annotated[list[dict], Field(max_length=1024)] | None = None
    tool_choice: object | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    adapter_weights: AdapterWeights | None = None
    # refused unless unset (check): nothing is kept between requests, nothing runs in the background
    store: bool | None = None
    previous_response_id: Identifier | None = None
    conversation: object | None = None
    background: bool | None = None
    prompt: object | None = None
    reasoning: object | None = None
    max_tool_calls: object | None = None
    # accepted, no effect (see the module's docstring)
    user: Identifier | None = None
    safety_identifier: Identifier | None = None
    prompt_cache_key: Identifier | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    service_tier: Literal["auto", "default"] | None = None
    truncation: Literal["disabled"] | None = None

    _chat: ResponsesChat | None = PrivateAttr(default=None)

    def check(self) -> None:
        """The fields refused by name, then the chat request this is (checked as a chat request is)."""
        refused = {
            "store": "nothing is kept: send the whole conversation in input",
            "previous_response_id": "no response is kept: send the whole conversation in input",
            "conversation": "no conversation is kept: send the whole conversation in input",
            "background": "responses are served while the client waits",
            "prompt": "no prompt templates are kept: send instructions and input",
            "reasoning": "the models served here do not reason apart from their answer",
            "max_tool_calls": "use parallel_tool_calls: false for one call at most",
        }
        for field, why in refused.items():
            value = getattr(self, field)
            # false, null and {} ask for nothing; any number of tool calls (0 too) asks for something
            if value or (field == "max_tool_calls" and value is not None):
                raise BadRequest(f"{field} is not supported: {why}", param=field)
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed when stream is true", param="stream_options")
        if self.top_logprobs and LOGPROBS_INCLUDE not in (self.include or ()):
            raise BadRequest(f'top_logprobs needs include ["{LOGPROBS_INCLUDE}"]', param="top_logprobs")
        if LOGPROBS_INCLUDE in (self.include or ()) and self.tools and self.tool_choice != "none":
            # a Responses answer has logprobs on its text only, and a streamed answer's tokens are not told apart
            # as text or call until a call closes
            raise BadRequest("logprobs are not given for an answer that may call tools", param="include")
        body = self._chat_body()
        if len(body["messages"]) > MAX_MESSAGES:
            raise BadRequest(
                f"input and instructions make {len(body['messages'])} messages; at most {MAX_MESSAGES}", param="input"
            )
        try:
            chat = ResponsesChat.model_validate(body)
        except ValidationError as e:  # what the Responses shape let through and a chat request refuses
            err = e.errors()[0]
            where = "tools" if err.get("loc", ("",))[0] == "tools" else "input"
            raise BadRequest(
                f"{where}: {err.get('msg', 'invalid value').removeprefix('Value error, ')}", param=where
            ) from e
        chat.check()
        self._chat = chat

    def as_chat(self) -> ResponsesChat:
        return self._chat

    def _chat_body(self) -> dict:
        body: dict = {"model": self.model, "messages": self._messages(), "stream": bool(self.stream)}
        given = {
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "adapter_weights": self.adapter_weights,
            "parallel_tool_calls": self.parallel_tool_calls,
            "metadata": self.metadata,
        }
        body |= {k: v for k, v in given.items() if v is not None}
        if LOGPROBS_INCLUDE in (self.include or ()):
            body |= {"logprobs": True, "top_logprobs": self.top_logprobs or 0}
        forced = self.tools and (self.tool_choice == "required" or isinstance(self.tool_choice, dict))
        if self.text is not None and self.text.format is not None and not forced:
            # an answer the tool choice makes calls has no text for the format to shape (OpenAI takes both, and
            # the Agents SDK sends both for an agent with an output type and a forced tool)
            body["response_format"] = self.text.format.response_format()
        if self.tools:
            body["tools"] = [_chat_tool(i, t) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        return body

    def _messages(self) -> list[dict]:
        """The conversation as chat messages: an answer's calls join the assistant message before them (its text),
        as a chat answer holds both."""
        out: list[dict] = []
        if self.instructions is not None:
            out.append({"role": "system", "content": self.instructions})
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input or []
        for item in items:
            if isinstance(item, MessageItem):
                last = out[-1] if out else None
                if (
                    item.role == "assistant"
                    and last is not None
                    and last["role"] == "assistant"
                    and last.get("tool_calls")
                ):
                    # an answer's texts around its calls are one assistant turn, as a chat answer holds them (two
                    # assistant messages with no call between them stay two, as the client sent them)
                    last["content"] = (last["content"] or "") + item.text()
                else:
                    out.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                last = out[-1] if out else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        return out


def _chat_tool(i: int, tool: dict) -> dict:
    if tool.get("type") != "function":
        raise BadRequest(
            f"tools[{i}]: only function tools are served here, not {str(tool.get('type'))[:40]!r}", param="tools"
        )
    try:
        t = FunctionTool.model_validate(tool)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise BadRequest(f"tools[{i}].{where}: {err.get('msg', 'invalid value')}", param="tools") from e
    fn = {"name": t.name} | {k: v for k, v in (("description", t.description), ("parameters", t.parameters)) if v}
    return {"type": "function", "function": fn}


def _chat_tool_choice(choice: object) -> object:
    """{"type": "function", "name": ...} is the chat API's {"type": "function", "function": {"name": ...}}."""
    if isinstance(choice, dict) and choice.get("type") == "function" and set(choice) == {"type", "name"}:
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice in ("none", "auto", "required"):
        return choice
    raise BadRequest(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}', param="tool_choice"
    )


# ---------------------------------------------------------------------------------------------- the answer


def responses_usage(usage: dict) -> dict:
    """The chat usage object (openai_api.usage_dict) in the Responses API's names."""
    details = usage["prompt_tokens_details"]
    return {
        "input_tokens": usage["prompt_tokens"],
        # cache_write_tokens is required here (the SDK's strict validation refuses a usage without it): a node of
        # before the count, which does not say, is shown as 0, as Chat's usage leaves it out
        "input_tokens_details": {
            "cached_tokens": details["cached_tokens"],
            "cache_write_tokens": details.get("cache_write_tokens", 0),
        },
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


class ResponseShape:
    """One Response object's fields: the request's settings echoed, the output items as they are made."""

    def __init__(self, req: ResponsesRequest, rid: str, created: int) -> None:
        self.req, self.created = req, created
        self.id = "resp_" + rid[2:]
        self._rid = rid[2:26]
        self.output: list[dict] = []

    def item_id(self, kind: str) -> str:
        return f"{kind}_{self._rid}{len(self.output)}"

    def message(self, text: str, status: str, logprobs: list | None) -> dict:
        part = {"type": "output_text", "text": text, "annotations": []}
        if logprobs is not None:
            part["logprobs"] = logprobs
        item = {"id": self.item_id("msg"), "type": "message", "status": status, "role": "assistant"}
        return item | {"content": [part]}

    def call(self, call: dict, status: str) -> dict:
        """A Responses function_call item of a chat tool call."""
        fn = call["function"]
        return {
            "id": self.item_id("fc"),
            "type": "function_call",
            "status": status,
            "call_id": call["id"],
            "name": fn["name"],
            "arguments": fn["arguments"],
        }

    def obj(self, status: str, usage: dict | None = None, error: dict | None = None) -> dict:
        """The Response object; status "completed", "incomplete" (cut at max_output_tokens), "in_progress" or
        "failed"."""
        r = self.req
        tools = [t | {"strict": t.get("strict", True)} for t in r.tools or ()]
        fmt = r.text.format.model_dump(by_alias=True, exclude_none=True) if r.text and r.text.format else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "model": r.model,
            "output": self.output,
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": None,
            "service_tier": SERVED_TIER,
            "store": False,
            "temperature": 1.0 if r.temperature is None else r.temperature,
            "text": {"format": fmt or {"type": "text"}},
            "tool_choice": r.tool_choice if r.tool_choice is not None else "auto",
            "tools": tools,
            "top_p": 1.0 if r.top_p is None else r.top_p,
            "truncation": "disabled",
            "usage": responses_usage(usage) if usage is not None else None,
            "user": r.user,
            "metadata": r.metadata or {},
        }


class ResponseEvents:
    """The Responses event stream of one answer, from the calls the chat path makes of a ChunkBuilder (one
    choice: the Responses API has no `n`): text opens a message item, each tool call a function_call item;
    every event carries its sequence number. A whole answer is built by the same calls (Choices.replay), so it
    holds the items its stream would."""

    def __init__(self, req: ResponsesRequest, rid: str, created: int) -> None:
        self.shape = ResponseShape(req, rid, created)
        self.logprobs = LOGPROBS_INCLUDE in (req.include or ())
        self.seq = 0
        self.open: dict | None = None  # the output item being streamed
        # whitespace (and logprobs of no text) that no message holds yet: it opens none by itself, so the "\n" a
        # template writes between and after calls is no item of its own (as a chat answer's content is stripped)
        self._held: list[tuple[str, list]] = []
        self.cut = False  # the answer reached max_output_tokens

    def _event(self, kind: str, **fields) -> bytes:
        frame = sse_frame({"type": kind, "sequence_number": self.seq} | fields, event=kind)
        self.seq += 1
        return frame

    # the ChunkBuilder calls

    def role(self, index: int = 0) -> bytes:
        """The stream opens: the response is created and in progress."""
        snapshot = self.shape.obj("in_progress")
        return self._event("response.created", response=snapshot) + self._event(
            "response.in_progress", response=snapshot
        )

    def token(self, text: str, index: int = 0, logprobs: dict | None = None) -> bytes:
        return self.delta({"content": text}, index, logprobs)

    def delta(self, delta: dict, index: int = 0, logprobs: dict | None = None) -> bytes:
        out = b""
        if delta.get("content") or logprobs:
            # a token without text of its own (part of a character) still brings its logprobs, as a chat delta does
            # (there are none with tools: ResponsesRequest.check)
            out += self._text(delta.get("content", ""), logprobs["content"] if logprobs else [])
        for call in delta.get("tool_calls", ()):
            fn = call["function"]
            if "id" in call:  # a call's first delta names it (its arguments may come with it)
                self._held = []
                named = call | {"function": fn | {"arguments": ""}}
                out += self._close("completed") + self._add(self.shape.call(named, "in_progress"))
            if fn.get("arguments"):
                grow(self.open, "arguments", fn["arguments"])
                out += self._event(
                    "response.function_call_arguments.delta",
                    item_id=self.open["id"],
                    output_index=len(self.shape.output) - 1,
                    delta=fn["arguments"],
                )
        return out

    def finish(self, reason: str, index: int = 0, *, cut: bool = False, stop_reason: str | int | None = None) -> bytes:
        """The answer's end (the Responses API has no stop_reason)."""
        self.cut = cut or reason == "length"
        status = self._status()
        if not self.shape.output:  # an answer of no text and no call is one message of what it held, maybe empty
            return self._open_message() + self._close(status)
        return self._close(status)

    def end(self, usage: dict) -> bytes:
        status = self._status()
        return self._event(f"response.{status}", response=self.shape.obj(status, usage))

    def response(self, usage: dict) -> dict:
        """The Response object of the answer streamed through this builder (Choices.replay: a whole answer)."""
        return self.shape.obj(self._status(), usage)

    def _status(self) -> str:
        return "incomplete" if self.cut else "completed"

    def failed(self, message: str, usage: dict | None = None, *, param: str | None = None) -> bytes:
        """The stream's end when the node broke off, or the request's own grammar failed it (`param`, its field):
        the items so far (the open one "incomplete") and the usage of what was relayed, which is billed."""
        out = self._open_message() if not self.shape.output and self._held else b""  # what was relayed is shown
        if self.open is not None:
            self.open["status"] = "incomplete"
        error = {"code": "server_error" if param is None else "invalid_prompt", "message": message}
        return out + self._event("response.failed", response=self.shape.obj("failed", usage, error=error))

    # the items

    def _add(self, item: dict) -> bytes:
        self.shape.output.append(item)
        self.open = item
        added = item | ({"content": []} if item["type"] == "message" else {})  # a call's arguments start empty
        return self._event("response.output_item.added", output_index=len(self.shape.output) - 1, item=added)

    def _open_message(self) -> bytes:
        """A message item opened, with the text held for it."""
        out = self._close("completed")
        item = self.shape.message("", "in_progress", [] if self.logprobs else None)
        out += self._add(item)
        out += self._event(
            "response.content_part.added",
            item_id=item["id"],
            output_index=len(self.shape.output) - 1,
            content_index=0,
            part=dict(item["content"][0]),
        )
        held, self._held = self._held, []
        if held:
            out += self._text("".join(t for t, _ in held), [lp for _, lps in held for lp in lps])
        return out

    def _text(self, text: str, logprobs: list) -> bytes:
        out = b""
        if self.open is None or self.open["type"] != "message":
            if not text.strip():
                self._held.append((text, logprobs))
                return b""
            out += self._open_message()
        part = self.open["content"][0]
        grow(part, "text", text)
        if self.logprobs:
            part["logprobs"].extend(logprobs)
        if not text and not logprobs:
            return out
        return out + self._event(
            "response.output_text.delta",
            item_id=self.open["id"],
            output_index=len(self.shape.output) - 1,
            content_index=0,
            delta=text,
            logprobs=logprobs,
        )

    def _close(self, status: str) -> bytes:
        """The open item's closing events (none when no item is open)."""
        item, self.open = self.open, None
        if item is None:
            return b""
        item["status"] = status
        where = {"item_id": item["id"], "output_index": len(self.shape.output) - 1}
        out = b""
        if item["type"] == "message":
            part = item["content"][0]
            out += self._event(
                "response.output_text.done",
                **where,
                content_index=0,
                text=part["text"],
                logprobs=part.get("logprobs", []),
            )
            out += self._event("response.content_part.done", **where, content_index=0, part=part)
        else:
            out += self._event(
                "response.function_call_arguments.done", **where, name=item["name"], arguments=item["arguments"]
            )
        return out + self._event("response.output_item.done", output_index=where["output_index"], item=item)


class InputTokensRequest(ResponsesRequest):
    """`POST /v1/responses/input_tokens` (the openai SDK's `responses.input_tokens.count`): a Responses request
    whose `input` may be left out, its instructions and tools counted alone (as OpenAI's is)."""

    input: str | Annotated[list[Item], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None

    def check(self) -> None:
        if self.input is None and self.instructions is None:
            raise BadRequest("send input or instructions to count", param="input")
        super().check()
