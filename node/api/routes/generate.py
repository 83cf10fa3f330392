"""A request's life on the node: POST /v1/generate (answered whole or as server-sent events), its abort, and
its receipt afterwards."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from common.http import ANSWER_OR_EVENTS, parse_off_loop
from common.wire import error_body, hex0x, sse_frame
from node.api.deps import GatewayKey, Node, NodeApi, OperatorOrGateway
from node.api.errors import ApiError, adapter_error
from node.api.models import GenerateBody, IdPath, json_schema_body, parse_body
from node.engine import (
    AdapterError,
    DuplicateRequestError,
    EngineBusyError,
    FinishEvent,
    GenerationRequest,
    PromptLogprobsEvent,
    PromptTooLongError,
    RequestError,
    SamplingParams,
    SequenceFinishEvent,
    TokenEvent,
    TokenLogprob,
)

log = logging.getLogger(__name__)

# A streaming request whose adapter is not ready within this long (fetched from peers, decoded) gets its
# response headers at once and its adapter's outcome as the stream's first event: the gateway fails a
# node over when it sends nothing for a few seconds, and a node fetching an adapter is slow, not hung.
HEADERS_AFTER_S = 1.0

router = APIRouter()


@router.post("/v1/requests/{request_id}/abort")
async def abort(request_id: IdPath, node: Node, caller: OperatorOrGateway) -> dict:
    """Operator, or the gateway whose key started the request: nobody else may cut a client's stream."""
    book = node.book
    if caller is not None and book.started_by.get(request_id, caller) != caller:
        raise ApiError(
            403, f"request {request_id} was started by another gateway: only it may abort it", "not_request_owner"
        )
    if request_id in book.cold:  # still waiting for its adapter: it will not start
        return book.unserved(request_id, book.cold.pop(request_id), int(time.time() * 1000))
    if caller is not None and request_id not in book.started_by:
        ev = None  # never started by a gateway here (or long forgotten): nothing this caller may touch
    else:
        ev = await node.engine.abort(request_id)
    if ev is None:
        raise ApiError(
            404, f"request {request_id} is not running or recently finished on this node", "request_not_found"
        )
    return book.signed(ev)


@router.get("/v1/requests/{request_id}/receipt")
async def receipt(request_id: IdPath, node: Node) -> dict:
    """Public: request ids are unguessable and a receipt holds only counts."""
    book, public_key = node.book, node.public_key.hex()
    kept = book.receipts.get(request_id)
    if kept is not None:
        return kept | {"public_key": public_key}
    if request_id in book.running:
        # finished in the engine, but nobody read its end (its client left before the stream began)?
        ev = await node.engine.finished(request_id)
        if ev is not None:
            return book.signed(ev) | {"public_key": public_key}
        raise ApiError(409, f"request {request_id} is still running on this node", "request_running")
    raise ApiError(
        404, f"this node has no receipt for request {request_id} (unknown, or long finished)", "receipt_not_found"
    )


@router.post("/v1/generate", openapi_extra=json_schema_body(GenerateBody), responses=ANSWER_OR_EVENTS)
async def generate(request: Request, node: Node, gateway: GatewayKey):
    """Trusted gateways only (signed)."""
    book = node.book
    raw = await request.body()
    body = await parse_off_loop(raw, parse_body, raw, GenerateBody, max_bytes=node.generate_body_bytes)
    rid = body.request_id or hex0x(secrets.token_bytes(32))
    if book.known(rid):
        raise ApiError(409, f"request {rid} was already received by this node", "duplicate_request")
    check_prompt_size(node, body)
    # the id is taken before the first await: a second request with it is a duplicate from here on
    book.take(rid, gateway, body.components)
    try:
        if body.ensemble is not None:
            try:
                node.engine.define_ensemble(body.components)
            except AdapterError as e:
                raise adapter_error(e) from e
        if body.adapter_id is not None:
            prep = asyncio.ensure_future(node.engine.prepare_adapter(body.adapter_id))
            prep.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen, whoever waits on it
            await asyncio.wait({prep}, timeout=HEADERS_AFTER_S if body.stream else None)
            if not prep.done():
                book.cold[rid] = body.adapter_id
                started_at = int(time.time() * 1000)

                def never_started() -> None:
                    if book.cold.pop(rid, None) is not None and rid not in book.receipts:
                        book.unserved(rid, body.adapter_id, started_at)

                return _GuardedStream(_cold_sse(node, rid, body, prep, started_at), never_started, rid)
            try:
                prep.result()
            except AdapterError as e:
                raise adapter_error(e) from e
        stream = await _submit(node, rid, body)
    except BaseException:  # refused, or the client left while the adapter was prepared
        book.release(rid)
        raise
    if body.stream:
        return _GuardedStream(_sse(node, stream), lambda: book.spawn(book.abort_and_keep(stream)), rid)
    try:
        async for ev in stream:
            node.metrics.saw(ev)
    finally:
        if not stream.finished:  # the client went away mid-request
            node.metrics.forget(rid)
            await book.abort_and_keep(stream)
    final = stream.final
    signed = book.signed(final)
    # the answer is built and encoded on a worker thread: 64 sequences with 20 logprobs a token is megabytes
    # of JSON, seconds of the event loop every other stream, receipt and health check of this node waits on
    status, content = await asyncio.to_thread(_whole_answer, rid, body.adapter_id, final, signed)
    return Response(content, status_code=status, media_type="application/json")


def _whole_answer(rid: str, adapter_id: str | None, final: FinishEvent, signed: dict) -> tuple[int, bytes]:
    """A non-streamed request's answer (status, JSON bytes): its text, choices, usage and signed receipt."""
    out = {
        "request_id": rid,
        "adapter_id": adapter_id,
        "text": final.text,
        "token_ids": list(final.token_ids),
        "finish_reason": signed["receipt"]["finish_reason"],
        "usage": _usage(final),
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "token_ids": list(c.token_ids),
                "finish_reason": c.finish_reason,
                "logprobs": None if c.logprobs is None else [_entry(e) for e in c.logprobs],
            }
            for c in final.choices
        ],
        "prompt_logprobs": None
        if final.prompt_logprobs is None
        else [[_entry(e) for e in entries] if entries is not None else None for entries in final.prompt_logprobs],
    } | signed
    status = 200
    if final.error is not None:
        out, status = error_body(final.error, type="server_error", code=final.error_code) | out, 500
    return status, json.dumps(out, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes any one token stands for (an upper bound: byte-level pieces count 2 per byte)."""
    pieces = list(tokenizer.get_vocab())
    pieces += [str(t) for t in getattr(tokenizer, "all_special_tokens", ())]
    return max((len(p.encode("utf-8", "surrogatepass")) for p in pieces), default=1) or 1


def check_prompt_size(node: NodeApi, body: GenerateBody) -> None:
    """Refuse a prompt that cannot fit the context before the engine tokenizes it (~1.5 us a byte on
    one core, on the event loop: 20 MB held the node 38 s), when its length alone proves it."""
    engine = node.engine
    max_len = engine.max_len
    if body.prompts is not None:
        n = max(len(p) for p in body.prompts)
    else:
        if engine.tokenizer is None:
            return
        if node.prompt_bytes is None:  # computed on first use: the tokenizer's vocabulary is not needed before
            # x4: a normalizer may compose characters into fewer bytes (NFC, at most 3:1) before splitting
            node.prompt_bytes = 4 * max_token_bytes(engine.tokenizer) * max_len
        size = len(body.prompt.encode("utf-8", "surrogatepass"))
        if size <= node.prompt_bytes:
            return
        n = size // (node.prompt_bytes // max_len)  # a lower bound on its tokens
    if n >= max_len:
        raise ApiError(
            400,
            f"the prompt has at least {n} tokens; this node's context holds {max_len} "
            "(prompt + at least one generated token)",
            "context_length_exceeded",
        )


def _usage(ev: FinishEvent) -> dict:
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.completion_tokens,
        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
        # the prompt tokens whose KV the prefix cache held, and those this request wrote into it (not in the
        # receipt: nothing is billed on them)
        "prompt_tokens_details": {"cached_tokens": ev.cached_tokens, "cache_write_tokens": ev.cache_write_tokens},
    }


def _lp(x: float) -> float:
    # JSON has no -inf: a probability that underflowed is reported as vLLM reports it
    return x if x > -9999.0 else -9999.0


def _entry(e: TokenLogprob | None) -> dict | None:
    """A scored position on the wire: {"token_id", "logprob", "top_logprobs": [[id, logprob], ...]}, and a prompt
    position's "rank" (the token's in the vocabulary, 1 the most likely)."""
    if e is None:
        return None
    out = {"token_id": e.token_id, "logprob": _lp(e.logprob), "top_logprobs": [[t, _lp(v)] for t, v in e.top_logprobs]}
    if e.rank is not None:
        out["rank"] = e.rank
    return out


def _prompt_logprobs_frame(ev: PromptLogprobsEvent) -> bytes:
    """One prompt's scored positions as one event: a long prompt with 20 top pairs a position is megabytes."""
    entries = [_entry(e) for e in ev.entries]
    return sse_frame({"type": "prompt_logprobs", "prompt_index": ev.prompt_index, "entries": entries})


def _guided(body: GenerateBody):
    """The body's `guided` as the engine's GuidedSpec (None when absent); its grammar is compiled at submit."""
    if body.guided is None:
        return None
    from node.engine.grammar import GuidedSpec  # the grammar library loads with the first guided request

    return GuidedSpec.from_wire(body.guided)


async def _submit(node: NodeApi, rid: str, body: GenerateBody):
    """Queue the request in the engine (ApiError 400/409 for one it refuses)."""
    try:
        guided = _guided(body)
    except RequestError as e:  # the grammar's own refusals (GrammarError) name the field here
        raise ApiError(400, _named("guided", e), "invalid_request") from e
    try:
        params = SamplingParams(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            seed=body.seed,
            stop=tuple(body.stop),
            stop_token_ids=tuple(body.stop_token_ids),
            allowed_token_ids=None if body.allowed_token_ids is None else tuple(body.allowed_token_ids),
            bad_words=tuple(map(tuple, body.bad_words_token_ids or ())),
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logit_bias={int(t): b for t, b in (body.logit_bias or {}).items()},
            logprobs=body.logprobs,
            prompt_logprobs=body.prompt_logprobs,
            n=body.n,
            guided=guided,
            skip_special_tokens=body.skip_special_tokens,
        )
        req = GenerationRequest(
            rid,
            body.adapter_id,
            prompt=body.prompt,
            prompt_token_ids=body.prompt_token_ids,
            params=params,
            cache_salt=body.cache_salt,
        )
        stream = await node.engine.asubmit(req)
        node.metrics.started(rid)
    except PromptTooLongError as e:
        raise ApiError(400, str(e), "context_length_exceeded") from e
    except DuplicateRequestError as e:
        raise ApiError(409, str(e), "duplicate_request") from e
    except EngineBusyError as e:  # the gateway tries another node (a 503 is busy, not dead)
        raise ApiError(503, str(e), "engine_busy") from e
    except RequestError as e:
        message = _named("guided", e) if guided is not None and _is_grammar_error(e) else str(e)
        raise ApiError(400, message, "invalid_request") from e
    return stream


def _is_grammar_error(e: Exception) -> bool:
    from node.engine.grammar import GrammarError

    return isinstance(e, GrammarError)


def _named(field: str, e: Exception) -> str:
    msg = str(e)
    return msg if msg.startswith(field) else f"{field}: {msg}"


async def _cold_sse(node: NodeApi, rid: str, body: GenerateBody, prep: asyncio.Future, started_at: int):
    """A streaming request whose adapter was not ready at once: the adapter's outcome (and the engine's
    refusal, if any) comes as an error event and a done event with a 0-token receipt, as for an engine
    failure before the first token; then the stream as usual."""
    book = node.book
    err = stream = None
    try:
        try:
            await asyncio.shield(prep)  # shielded: a client that leaves does not stop a fetch others may await
        except AdapterError as e:
            err = adapter_error(e)
        if rid not in book.cold:  # aborted while its adapter was prepared
            err = ApiError(409, f"request {rid} was aborted before it started", "request_aborted")
        if err is None:
            stream = await _submit(node, rid, body)
    except ApiError as e:
        err = e
    except asyncio.CancelledError:  # the client left while the adapter was prepared
        if rid not in book.receipts:
            book.unserved(rid, body.adapter_id, started_at)
        raise
    finally:
        book.cold.pop(rid, None)
    if err is not None:
        log.info("request %s ended before it started: %s", rid, err.message)
        kept = book.receipts.get(rid) or book.unserved(rid, body.adapter_id, started_at)
        yield sse_frame({"type": "error", "message": err.message, "code": err.code})
        yield sse_frame(
            {
                "type": "done",
                "finish_reason": "abort",
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }
            | kept
        )
        return
    async for chunk in _sse(node, stream):
        yield chunk


async def _sse(node: NodeApi, stream):
    book = node.book
    try:
        async for ev in stream:
            node.metrics.saw(ev)
            if isinstance(ev, FinishEvent):
                if ev.error is not None:
                    yield sse_frame({"type": "error", "message": ev.error, "code": ev.error_code})
                s = book.signed(ev)
                if ev.finish_reason == "abort":
                    log.info("request %s aborted: receipt %s", ev.request_id, s["receipt"])
                yield sse_frame(
                    {"type": "done", "finish_reason": s["receipt"]["finish_reason"], "usage": _usage(ev)} | s
                )
            elif isinstance(ev, TokenEvent):
                frame = {"type": "token", "index": ev.index, "text": ev.text, "token_id": ev.token_id}
                if ev.logprob is not None:
                    frame |= {"logprob": _lp(ev.logprob), "top_logprobs": [[t, _lp(v)] for t, v in ev.top_logprobs]}
                yield sse_frame(frame)
            elif isinstance(ev, SequenceFinishEvent):
                frame = {"type": "finish", "index": ev.index, "finish_reason": ev.finish_reason}
                if ev.stop_string is not None:
                    frame["stop_string"] = ev.stop_string
                yield sse_frame(frame)
            elif isinstance(ev, PromptLogprobsEvent):  # a whole prompt's scores: encoded on a worker thread
                yield await asyncio.to_thread(_prompt_logprobs_frame, ev)
    finally:
        if not stream.finished:  # client disconnected: stop generating for it, keep the receipt
            node.metrics.forget(stream.request_id)
            log.info("client of %s disconnected; aborting", stream.request_id)
            await book.abort_and_keep(stream)


class _GuardedStream(StreamingResponse):
    """An SSE response that calls `never_started()` when it ends before its body took a step: Starlette
    cancels a response whose client left before it began, and then no finally of the body's generator
    runs, so a request would stay running (and generating) for nobody."""

    def __init__(self, body, never_started: Callable[[], None], request_id: str) -> None:
        self._started = False
        self._never_started = never_started

        async def tracked():
            self._started = True
            async for chunk in body:
                yield chunk

        super().__init__(
            tracked(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Request-Id": request_id}
        )

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._started:
                self._never_started()
