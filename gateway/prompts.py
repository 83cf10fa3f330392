"""A request's prompts as the token ids the gateway counts: the one place where completions, chat completions and
vLLM's /tokenize turn text into ids, so /tokenize's count is the prompt_tokens the same prompt is billed; and
/detokenize, the other way.

Short work runs on the event loop (a worker thread's round trip costs more); long work, and a base's first
use (it loads the tokenizer), runs in a worker thread."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from gateway.chat import ChatTemplates
from gateway.errors import BadRequest

if TYPE_CHECKING:
    from gateway.openai_api import ChatRequest, DetokenizeRequest, TokenizeRequest
    from gateway.router import Target

# prompts up to this many characters are tokenized on the event loop (tens of microseconds: less than a
# worker thread's round trip); longer ones, and a base's first use (it loads the tokenizer), in a thread
INLINE_TOKENIZE_CHARS = 4096
# a guess at what a chat template writes around one message (its role markers), counted towards that inline
# size: a heuristic for where the work runs, not a bound; a template that writes more only moves a render that
# should have gone to a thread onto the loop, and the rendered text is still checked against the context
TEMPLATE_MARKUP_CHARS = 32


async def blocking(templates: ChatTemplates, size: int, fn, base: str, *args):
    """fn(base, *args) on the event loop when its input is short (`size` characters) and the base's tokenizer
    is loaded, else in a worker thread."""
    if size <= INLINE_TOKENIZE_CHARS and templates.loaded(base):
        return fn(base, *args)
    return await asyncio.to_thread(fn, base, *args)


async def chat_prompt(
    t: ChatTemplates, base: str, req: ChatRequest | TokenizeRequest, *, cut: bool = False
) -> list[int]:
    """A chat's messages (and tools, and the template's own variables) rendered by the base's template, as ids;
    `cut`: the ids are cut to their last ones afterwards (truncate_prompt_tokens), so a chat longer than the
    context is rendered (on a worker thread; the body limit bounds it) and its text tokenized whole all the same, up
    to a bound (ChatTemplates.check_cut)."""
    tools, extra = req.template_tools(), req.chat_template_kwargs
    tool_chars = len(json.dumps(tools)) if tools else 0
    extra_chars = len(json.dumps(extra)) if extra else 0
    # what cannot fit is refused before the messages are read for the template: their texts, names and tool
    # calls' arguments, which it parses (3.8 MB of arguments held the event loop seconds and were refused only
    # once rendered, billed nothing: red team); what the template renders of the rest (its markup) is held to the
    # context by `render` before the text is tokenized, all on a worker thread unless the chat is short
    chars = sum(m.template_chars() for m in req.messages)
    if cut:
        t.check_cut(base, [chars + tool_chars], param=req.PROMPT_FIELD)
    else:
        t.check_length(base, chars + tool_chars, param=req.PROMPT_FIELD)
    given = chars + TEMPLATE_MARKUP_CHARS * len(req.messages) + tool_chars + extra_chars

    def render(base_id: str) -> list[int]:
        messages = req.chat_messages()
        prompt, go_on = req.generation_prompt(), bool(req.continue_final_message)
        return t.render(base_id, messages, tools, extra, prompt, go_on, req.PROMPT_FIELD, cut)

    return await blocking(t, given, render, base)


async def text_prompts(
    t: ChatTemplates, base: str, given: list[str] | list[list[int]], *, cut: bool = False
) -> list[list[int]]:
    """Completion prompts as ids: texts encoded as the node would, ids checked against the vocabulary; `cut`: as
    chat_prompt's."""
    if isinstance(given[0], list):
        for ids in given:
            t.check_ids(base, ids)
        return given
    if cut:
        t.check_cut(base, [len(text) for text in given])
    else:
        for text in given:
            t.check_length(base, len(text))
    return [await blocking(t, len(text), t.encode, base, text) for text in given]


async def tokenize(t: ChatTemplates, target: Target, req: TokenizeRequest) -> dict:
    """vLLM's /tokenize answer: a completion's prompt or a chat's messages as the ids the gateway would bill."""
    base = target.base_model_id
    if req.messages is not None:
        ids = await chat_prompt(t, base, req)
    else:
        ids = (await text_prompts(t, base, [req.prompt]))[0]
    context = t.context_len(base)
    if context is not None and len(ids) >= context:  # no request of it could be served, nor billed
        raise BadRequest(
            f"the prompt has {len(ids)} tokens; the model's context holds {context} (prompt + at least one "
            "generated token)",
            code="context_length_exceeded",
            param="messages" if req.messages is not None else "prompt",
        )
    strs = await blocking(t, len(ids), t.pieces, base, ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": context, "tokens": ids, "token_strs": strs}


async def input_tokens(t: ChatTemplates, target: Target, req: ChatRequest) -> dict:
    """The Responses API's input token count (`POST /v1/responses/input_tokens`, the openai SDK's
    `responses.input_tokens.count`): the `input_tokens` a response to the same request is billed, its chat (`req`,
    what the Responses request is) rendered as /tokenize renders one. (It was taken for a stored response's
    route: a 404 saying no responses are stored; compat audit.)"""
    return {"object": "response.input_tokens", "input_tokens": len(await chat_prompt(t, target.base_model_id, req))}


async def detokenize(t: ChatTemplates, target: Target, req: DetokenizeRequest) -> dict:
    """vLLM's /detokenize answer: token ids as text (special tokens left out, as an echoed prompt of ids)."""
    base = target.base_model_id
    # loads the tokenizer, so the ids are checked against its vocabulary
    if t.knows(base) and await blocking(t, 0, t.vocab, base) is None:
        raise BadRequest(f"base model {base} has no tokenizer to turn ids into text", param="tokens")
    t.check_ids(base, req.tokens, param="tokens", what="tokens")
    context = t.context_len(base)
    if context is not None and len(req.tokens) > context:
        raise BadRequest(f"{len(req.tokens)} tokens are more than the model's context of {context}", param="tokens")
    return {"prompt": await blocking(t, len(req.tokens), t.decode, base, req.tokens)}
