"""One API request's life (an OpenAI completion, chat or Responses request, or a LoRAX generation served as the
completion it is), owned by one object (ServedRequest): parse the body, resolve its model, tokenize the prompt,
route it, fail over before the first token, relay the tokens (and count them: the gateway bills what it
delivered, the tokens it relayed before the client left or the node's stream broke), then abort if needed,
record the end with the node's receipt and charge the key's tokens.

The route hands it the authenticated key and the HTTP request and gets the answer back (a JSON body, or an
event stream that ends the request when it ends); the parts it uses come typed in RequestDeps."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import ExitStack
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from common.http import WriteBoundedStreamingResponse
from common.wire import (
    BAD_WORDS_FEATURE,
    CACHE_SALT_FEATURE,
    GUIDED_FAILED,
    GUIDED_GRAMMAR_FEATURE,
    MAX_BAD_WORD_TOKENS,
    STOP_STRING_FEATURE,
    features_needed,
    hex0x,
)
from gateway.catalog import ModelCatalog
from gateway.chat import ChatTemplates
from gateway.choices import Choices
from gateway.directory import NodeDirectory, NodeEntry
from gateway.errors import (
    AuthError,
    BadRequest,
    GatewayError,
    GrammarFailed,
    NoNodeAvailable,
    OutboxUnavailable,
    UpstreamError,
)
from gateway.keys import Admission, AuthContext, node_cache_salt
from gateway.lorax_api import LoraxAnswer, LoraxGenerate, LoraxGenerateStream, LoraxRequest
from gateway.metrics import GatewayMetrics
from gateway.node_client import NodeClient, NodeRejected, NodeUnavailable, UpstreamStream
from gateway.openai_api import (
    ChatRequest,
    ChunkBuilder,
    CompletionRequest,
    chat_response,
    completion_response,
    parse_request,
    to_node_request,
    usage_dict,
)
from gateway.prompts import blocking, chat_prompt, text_prompts
from gateway.responses_api import ResponseEvents, ResponsesRequest
from gateway.router import Route, Router, Target
from gateway.settings import GatewaySettings
from gateway.tables import RequestStatus
from gateway.usage import RequestEnd
from gateway.usage_book import UsageBook
from node.receipts import FINISH_REASONS

log = logging.getLogger(__name__)

# each endpoint's request body
API_REQUESTS = {
    "completions": CompletionRequest,
    "chat": ChatRequest,
    "responses": ResponsesRequest,
    # LoRAX's /generate, /generate_stream and / (its compat route): served as the completions they are
    "lorax": LoraxGenerate,
    "lorax_stream": LoraxGenerateStream,
    "lorax_compat": LoraxRequest,
}

# after aborting a request, how long the gateway reads the node's stream on to its done event (for the
# receipt it carries; the tokens read meanwhile reach nobody and are not paid) before it settles for the
# abort's own receipt
ABORT_DRAIN_TIMEOUT_S = 5.0
# events other than tokens a node may send in one request (a real node sends an error and a done event at
# most): a node that sends more is cut off, so it cannot hold a request open with events that never end
MAX_OTHER_EVENTS = 64
KEY_REVOKED = "this request's API key was revoked while it ran"
# a whole (not streamed) answer of this many completion tokens (and echoed prompt positions) or more is built and
# encoded on a worker thread
LARGE_ANSWER_TOKENS = 512
HTTP_CLIENT_CLOSED = 499  # the status of an answer its client left before (nginx's; nobody reads it, the logs show it)
_READ_ERRORS = (StopAsyncIteration, ValueError, RuntimeError)  # a broken stream: NodeUnavailable


# a prompt_logprobs event of more scores than this (its entries times the alternatives asked, plus one) is read on a
# worker thread: 32,000 entries of 20 alternatives took the event loop 0.45 s (review), 2,048 of them 30 ms
# (re-attack)
INLINE_PROMPT_SCORES = 8192


def _scores(ev: dict, k: object) -> int:
    entries = ev.get("entries")
    return (len(entries) if isinstance(entries, list) else 0) * ((k if isinstance(k, int) else 0) + 1)


def _log_engine_error(node_id: str, rid: str, message: object) -> None:
    """A node's error event, logged: its text is a stranger's, so the client is told only that the engine failed
    (relayed, it would put a node's words, a link to anywhere included, into the gateway's own error)."""
    log.warning("node %s's engine failed on request %s: %.300r", node_id[:10], rid[:10], message)


class DeadlinePassed(Exception):
    """The request ran past its deadline (settings.request_deadline_s after dispatch)."""


class Background:
    """Tasks that no client's cancellation may end (a request's close and usage record above all); the app
    waits for them on shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Run `coro` on a task of its own that nobody cancels; the app waits for it on shutdown."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for background tasks (usage records of aborted requests above all)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)


@dataclass(frozen=True, slots=True)
class RequestDeps:
    """The parts of one gateway a request uses (gateway.service.Gateway builds them once)."""

    settings: GatewaySettings
    catalog: ModelCatalog  # model -> Target, prices
    templates: ChatTemplates  # tokenizers and chat templates
    router: Router
    directory: NodeDirectory  # live nodes
    nodes: NodeClient  # the node API
    book: UsageBook  # open, move and close records; the outbox's health
    admission: Admission  # the key's token charge
    metrics: GatewayMetrics
    background: Background  # tasks a client's cancellation does not end


async def _written(opening: asyncio.Future) -> bool:
    """Whether the open record was written (waits for the write; the waiter's cancellation leaves it be)."""
    try:
        await asyncio.shield(opening)
    except GatewayError:
        return False
    return True


async def _disconnected(http: Request) -> None:
    """Returns when the client has closed its connection (its body read: the server's next message is the
    disconnect)."""
    try:
        while (await http.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - a server that cannot say is taken as the client gone: the answer is not sent
        return


class ServedRequest:
    """Lifecycle: `await respond(http)`, once. Before anything reaches the client the request is recorded as
    open (and an error raised instead, with the open record closed as not served); a non-streaming answer
    is the text once the node finished; a streamed one ends the request when its last event is sent or the
    client leaves. `usage` is the gateway's own count: the prompt ids it sent, the token events it relayed."""

    def __init__(self, deps: RequestDeps, auth: AuthContext, *, api: str) -> None:
        """api: a key of API_REQUESTS ("responses": OpenAI's Responses API, served as the chat it is; "lorax*":
        LoRAX's API, served as the completion it is)."""
        self.d, self.auth, self.endpoint = deps, auth, api
        self.chat = api in ("chat", "responses")
        self.key_id: int | None = auth.key.id
        self.req: ChatRequest | CompletionRequest | None = None
        self.responses: ResponsesRequest | None = None  # the request as sent, when it came as a Responses one
        self.lorax: LoraxRequest | None = None  # the request as sent, when it came as a LoRAX one
        self.target: Target | None = None
        self.quote: dict[str, int] = {}  # each record's adapter id -> the price it is admitted at (known ones)
        self.rid = ""
        self.node_body: dict = {}
        self.prompt_tokens = self.max_tokens = self.limit = 0
        self.reserved = 0  # tokens taken from the key's tokens per minute before it ran (Admission.reserve)
        self.context_len: int | None = None
        self.choices: Choices | None = None  # the sequences the node streams, gathered
        self.node: NodeEntry | None = None
        self.up: UpstreamStream | None = None
        self._hold = ExitStack()  # the chosen node's in-flight count (NodeLocal.busy) until the request ends
        self._it: AsyncIterator[dict] | None = None
        self._first: dict | None = None
        self._next: asyncio.Future | None = None  # the read in progress (it survives a cancelled reader)
        self.stream_ok = True  # the node's stream can still be read
        self.attempts = 0
        self.refusals: list[tuple[NodeEntry, NodeRejected]] = []  # nodes that refused the request as invalid (_try)
        # nodes that failed it before its first token, other than by a refusal, and whether of their own (_try)
        self.failed_nodes: list[tuple[NodeEntry, bool]] = []
        self.started = self.deadline = 0.0
        self.ttft: float | None = None
        self.n_tokens = 0  # token events relayed to the client, each sequence's up to max_tokens: what is billed
        self.overrun = 0  # token events past a sequence's max_tokens (not relayed, not counted)
        self.drained = 0  # token events read after the abort: they reached nobody (logged, not billed)
        self.other_events = 0  # events that are neither tokens nor a sequence's end (at most MAX_OTHER_EVENTS)
        self.done: dict | None = None  # the node's done event
        self.engine_error = False  # the node sent an error event (its text is logged, never relayed)
        # that event said the request's own grammar failed it (believed only of a request with one, and only once
        # the node then ended the request as it should: a done event), and the node did: the client's request, not
        # the node, is at fault: the client hears so, and a stream's tokens, sent, are billed (a whole answer's, not
        # sent, are not: finish)
        self._grammar_claim = False
        self.grammar_failed = False
        self.failure: str | None = None  # the node broke off after the first token
        # its key was revoked while it ran (Admission.revoked): the gateway ends it as a client leaving would
        self.key_revoked = False
        self.aborted = False
        self.node_lost = False
        self.finished = False
        self.result: str | None = None
        # the client gets the text only once the request ended well (a non-streaming answer)
        self.buffered = False
        self.lorax_stream: LoraxAnswer | None = None  # a streamed LoRAX answer's writer (it holds a last token)

    # ------------------------------------------------------------------ the answer

    async def respond(self, http: Request) -> Response:
        """Serve one request: the JSON answer, or the event stream (which ends the request itself)."""
        d = self.d
        d.book.check_outbox()  # nothing is served that could not be recorded
        req = await parse_request(API_REQUESTS[self.endpoint], await http.body(), d.settings.max_body_bytes)
        if isinstance(req, ResponsesRequest):
            self.responses, req = req, req.as_chat()
        elif isinstance(req, LoraxRequest):
            self.lorax, req = req, req.as_completion(d.catalog.only_base())
        self.req = req
        try:
            await self._prepare(req)
        finally:  # the error handlers' metrics label: the model it resolved to (a name that resolved to
            # nothing is "-": any string a client sends would otherwise be a time series kept for good)
            if self.target is not None:
                http.state.model = self.target.label
            if self.rid:  # an error from here on carries the request's own id (gateway.main._AnswerHeaders)
                http.state.rid = self.rid
        if self.auth.key.tokens_per_minute:  # the request's most tokens, taken before it runs
            cost = self.prompt_tokens + self.max_tokens
            taken = await asyncio.to_thread(d.admission.reserve, self.auth.key, cost)
            self.reserved = cost if taken is not None else 0
            if taken:  # the tokens left after it, on the answer (gateway.main._AnswerHeaders)
                http.state.ratelimit = getattr(http.state, "ratelimit", {}) | taken
        try:
            await self.start()
        except BaseException:  # nothing was served: the reservation goes back
            if self.reserved:
                d.admission.charge_tokens(self.key_id, -self.reserved)
            raise
        created = int(time.time())
        headers = {"X-Request-Id": self.rid, "X-Loramesh-Node": self.node.node_id}
        if req.stream and self.responses is not None:
            builder = ResponseEvents(self.responses, self.rid, created)
        elif req.stream and self.lorax is not None:
            builder = self.lorax_stream = LoraxAnswer(self.lorax, self.choices, self.prompt_tokens)
        elif req.stream:
            builder = ChunkBuilder(
                chat=self.chat,
                rid=self.rid,
                created=created,
                model=req.model,
                include_usage=req.include_usage,
                usage_so_far=(
                    (
                        lambda: usage_dict(
                            *self.usage, self.cached_tokens if self.done else None, self.cache_write_tokens
                        )
                    )
                    if req.continuous_usage
                    else None
                ),
                service_tier=req.service_tier if self.chat else None,
            )
        if req.stream:
            return WriteBoundedStreamingResponse(
                self._events(builder),
                write_timeout_s=d.settings.client_write_timeout_s,
                # a stream given up before its generator's first step (which holds the `finally` below) still
                # ends the request: aborted at the node, what it made recorded (no-op once `finish` ran)
                on_end=lambda: self.finish_detached(client_gone=True),
                media_type="text/event-stream",
                headers=headers | {"Cache-Control": "no-cache"},
            )
        self.buffered = True  # an error answer, or a client gone before it, gets none of the text: nothing is billed
        try:
            stayed = await self._gather(http)
        except BaseException:
            self.finish_detached(client_gone=True)
            raise
        if not stayed:  # nobody reads the answer: the node is aborted, and nothing is billed (finish)
            await asyncio.shield(d.background.spawn(self.finish(client_gone=True)))
            return Response(status_code=HTTP_CLIENT_CLOSED, headers=headers)
        if self.key_revoked:  # none of the answer is given, and none billed (`withheld`)
            await asyncio.shield(d.background.spawn(self.finish(client_gone=True)))
            raise AuthError(f"{KEY_REVOKED}; nothing of the answer is sent or billed", headers=headers)
        await asyncio.shield(d.background.spawn(self.finish()))
        if self.failure and self.grammar_failed:
            raise GrammarFailed(
                f"{self.failure}; none of its {self.n_tokens} tokens are billed",
                param=self.req.guided_field(),
                headers=headers,
            )
        if self.failure:
            raise UpstreamError(f"{self.failure}; the completion is incomplete", code="node_failed", headers=headers)
        usage = usage_dict(*self.usage, self.cached_tokens, self.cache_write_tokens)

        def render() -> bytes:  # as JSONResponse renders
            if self.responses is not None:
                events = ResponseEvents(self.responses, self.rid, created)
                self.choices.replay(events, self.finish_reason, bool(self.overrun))
                body = events.response(usage)
            elif self.lorax is not None:
                body = LoraxAnswer(self.lorax, self.choices, self.prompt_tokens).whole(
                    self.finish_reason, bool(self.overrun)
                )
            else:
                choices = self.choices.answer(self.finish_reason, bool(self.overrun))
                if self.chat:
                    body = chat_response(
                        self.rid, created, req.model, choices, usage, req.service_tier, self.choices.prompt_logprobs(0)
                    )
                else:
                    body = completion_response(self.rid, created, req.model, choices, usage)
            return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()

        # a long answer (n choices with logprobs: up to tens of MB) is built off the event loop, which it held
        # for seconds (attack review); a short one is not worth the thread hop
        big = self.usage[1] + self.choices.repeated_positions() >= LARGE_ANSWER_TOKENS
        content = await asyncio.to_thread(render) if big else render()
        return Response(content, media_type="application/json", headers=headers)

    async def _gather(self, http: Request) -> bool:
        """A whole answer's tokens from the node, read while watching the client: False when the client went
        away first (the node is then aborted by `finish`, not left making tokens for nobody until max_tokens).
        A streamed answer needs no watch: its response stops when its client goes."""

        async def read_all() -> None:
            async for _ in self.tokens():
                pass

        reading, gone = asyncio.ensure_future(read_all()), asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait((reading, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not reading.done():  # the client left, or this request is cancelled (the gateway stops)
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        if reading.cancelled():
            return False
        reading.result()
        return True

    async def _events(self, b: ChunkBuilder | ResponseEvents | LoraxAnswer):
        # chunks that are ready together go out in one write: each write is a send through the whole
        # ASGI stack and a wake-up of the client, and the bytes on the wire are the same
        c = self.choices
        opening = c.open_all(b)
        try:
            async for k, text, scored in self.tokens():
                chunk = c.close(b, k, None, False) if text is None else c.chunk(b, k, text, scored)
                # a chat's roles go out with the first token even when it holds its text back (a "required"
                # tool answer is sent whole at its end): the client sees the answer begin
                if chunk or (opening and self.chat):
                    yield opening + chunk
                    opening = b""
            await asyncio.shield(self.d.background.spawn(self.finish(client_gone=self.key_revoked)))
            if self.key_revoked:  # what was relayed is billed; the held tool text goes out with it
                message = f"{KEY_REVOKED} after {self.n_tokens} tokens; the response is incomplete"
                failed = b.failed(message, usage_dict(*self.usage, self.cached_tokens, self.cache_write_tokens))
                yield opening + c.release_held(b) + failed
                return
            if self.failure:
                # the tool text held back is billed: it reaches the client before the error
                failed = b.failed(
                    f"{self.failure}; the response is incomplete",
                    usage_dict(*self.usage, self.cached_tokens, self.cache_write_tokens),
                    param=self.req.guided_field() if self.grammar_failed else None,
                )
                yield opening + c.release_held(b) + failed
                return
            usage = usage_dict(*self.usage, self.cached_tokens, self.cache_write_tokens)
            yield opening + c.close_all(b, self.finish_reason, bool(self.overrun)) + b.end(usage)
        finally:
            self.finish_detached(client_gone=True)

    # ------------------------------------------------------------------ before routing

    async def _prepare(self, req: ChatRequest | CompletionRequest) -> None:
        """Resolve the model, check the key's price and the token limits, tokenize the prompts (the node gets
        token ids the gateway made itself: their number is the prompt count), build the node's request."""
        d, key = self.d, self.auth.key
        target = self.target = d.catalog.resolve_request(req.model, req.adapter_weights, key, self.auth.private)
        self.quote = d.catalog.check_price(target, key)
        base, t = target.base_model_id, d.templates
        if not d.directory.live(base):
            raise NoNodeAvailable(f"no live node serves the base model of {req.model!r} right now; retry later")
        context = t.context_len(base)
        prompts, texts = await self._prompts(req, base, context)
        if (cut := req.truncated(prompts, context)) != prompts:
            prompts, texts = cut, None  # an echo shows the prompts as cut (decoded below)
        for ids in prompts:
            if not ids:
                raise BadRequest("the prompt is empty; expected at least one token", param=req.PROMPT_FIELD)
        longest = max(map(len, prompts))
        max_tokens = self._max_tokens(req, longest, context)
        if req.min_tokens is not None and req.min_tokens > max_tokens:
            raise BadRequest(
                f"min_tokens ({req.min_tokens}) is more than max_tokens ({max_tokens})", param="min_tokens"
            )
        show_logprobs = bool(req.logprobs) if self.chat else req.logprobs is not None
        echo = not self.chat and bool(req.echo)
        if req.bias_ids() or req.stop_token_ids or req.allowed_token_ids:
            # ids outside the vocabulary (when known) are the client's mistake
            if t.knows(base):
                await blocking(t, 0, t.vocab, base)
            t.check_ids(base, req.bias_ids(), param="logit_bias", what="logit_bias")
            t.check_ids(base, req.stop_token_ids or [], param="stop_token_ids", what="stop_token_ids")
            t.check_ids(base, req.allowed_token_ids or [], param="allowed_token_ids", what="allowed_token_ids")
        bad_words = None
        if req.bad_words:
            try:
                bad_words = await blocking(t, sum(map(len, req.bad_words)), t.bad_words, base, req.bad_words)
            except ValueError as e:  # a word that is no tokens to this tokenizer
                raise BadRequest(str(e), param="bad_words") from e
            if (n := sum(map(len, bad_words))) > MAX_BAD_WORD_TOKENS:
                raise BadRequest(
                    f"bad_words are {n} tokens in all; at most {MAX_BAD_WORD_TOKENS}",
                    param="bad_words",
                )
        token_texts = await blocking(t, 0, t.texts, base) if req.needs_token_texts() else None
        if echo and texts is None:  # prompts given as token ids are echoed as their text
            texts = [await blocking(t, len(ids), t.decode, base, ids) for ids in prompts]
        self.rid = hex0x(secrets.token_bytes(32))
        # the node scores the prompts once, for the echo's logprobs and vLLM's prompt_logprobs alike
        echo_top = req.logprobs if echo else None
        prompt_logprobs = max((k for k in (echo_top, req.prompt_scores()) if k is not None), default=None)
        self.node_body = to_node_request(
            req,
            target,
            prompts,
            max_tokens=max_tokens,
            request_id=self.rid,
            prompt_logprobs=prompt_logprobs,
            bad_words=bad_words,
        )
        per_prompt = req.sequences_per_prompt() if not self.chat else req.choices
        self.choices = Choices(
            chat=self.chat,
            prompts=prompts,
            per_prompt=per_prompt,
            n=req.choices,
            max_tokens=max_tokens,
            logprobs=show_logprobs,
            echo=echo,
            shown=not (echo and req.echo_only),
            prompt_texts=texts,
            texts=token_texts,
            plan=req.plan if self.chat else None,
            token_chars=t.token_chars(base),
            eos_ids=frozenset() if req.ignore_eos else t.end_ids(base),
            stop_ids=frozenset(req.stop_token_ids or ()),
            stops=tuple(req.stop_list()),
            keep_stop=bool(req.include_stop_str_in_output),
            ids_as_tokens=bool(req.return_tokens_as_token_ids),
            echo_top=echo_top or 0,
            prompt_top=req.prompt_scores(),
        )
        if (repeated := self.choices.repeated_positions()) > d.settings.max_echoed_positions:
            what = "echo repeats" if echo else "prompt_logprobs scores"
            each = "" if self.chat else f" in each of the {req.choices} choices"
            if (w := self.choices.prompt_weight()) > 1:
                each += f" (a position of prompt_logprobs {req.prompt_scores()} counting as {w})"
            raise BadRequest(
                f"{what} the prompts{each}: {repeated} token positions, more than "
                f"this gateway answers ({d.settings.max_echoed_positions}); ask for fewer choices, fewer prompts or "
                "shorter ones",
                param="echo" if echo else "prompt_logprobs",
            )
        seqs = len(self.choices.seqs)
        self.prompt_tokens = sum(map(len, prompts))
        # the most completion tokens the request may bill: max_tokens per sequence (the context holds them all:
        # a prompt that leaves less room was refused above); the record's bound on a receipt's count is that sum,
        # which the context (counted for one sequence) would wrongly cut when there are several
        self.max_tokens = self.limit = max_tokens * seqs
        self.context_len = context if seqs == 1 else None

    async def _prompts(
        self, req: ChatRequest | CompletionRequest, base: str, context: int | None
    ) -> tuple[list[list[int]], list | None]:
        """The request's prompts as token ids, and their texts where the client sent text (completions)."""
        t, keep = self.d.templates, req.truncate_prompt_tokens
        # the ids are cut to their last ones afterwards (truncated; -1 with no context known cuts nothing)
        cut = keep is not None and not (keep == -1 and context is None)
        if self.chat:
            return [await chat_prompt(t, base, req, cut=cut)], None
        given = req.prompt_list()
        return await text_prompts(t, base, given, cut=cut), None if isinstance(given[0], list) else given

    def _max_tokens(self, req: ChatRequest | CompletionRequest, prompt: int, context: int | None) -> int:
        """The tokens each sequence may generate: the request's max_tokens (completions: 16 by default, as
        OpenAI's), or for a chat or a LoRAX generation that names none what the context leaves after the prompt
        (at most max_max_tokens); a prompt plus max_tokens beyond the context is refused with the numbers, as
        OpenAI refuses it."""
        s, wanted = self.d.settings, req.wanted_tokens()
        if wanted is not None and wanted > s.max_max_tokens:
            field = req.tokens_field()
            raise BadRequest(f"{field} {wanted} is more than this gateway allows ({s.max_max_tokens})", param=field)
        if wanted is None and (self.chat or self.lorax is not None):  # LoRAX's max_new_tokens: the room left too
            room = s.max_max_tokens if context is None else context - prompt
            if room >= 1:
                return min(s.max_max_tokens, room)
            wanted = 1  # not even one token fits: refused below
        max_tokens = wanted if wanted is not None else s.default_max_tokens
        if wanted == 0 and context is not None and prompt >= context:
            raise BadRequest(
                f"This model's maximum context length is {context} tokens and your prompt has {prompt}: echo with "
                "max_tokens 0 scores a prompt of at most one token less (the node makes one token to get there, "
                "never shown). Please reduce the length of the prompt.",
                code="context_length_exceeded",
                param=req.PROMPT_FIELD,
            )
        max_tokens = max(max_tokens, 1)  # echo alone (0): the node makes one token, never shown
        if context is not None and prompt + max_tokens > context:
            where = "in your prompt" if req.PROMPT_FIELD == "prompt" else f"in the {req.PROMPT_FIELD}"
            raise BadRequest(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt + max_tokens} tokens ({prompt} {where}, {max_tokens} in the completion). Please reduce "
                f"the length of the {req.PROMPT_FIELD} or completion.",
                code="context_length_exceeded",
                param=req.PROMPT_FIELD,
            )
        return max_tokens

    # ------------------------------------------------------------------ before the first token

    async def start(self) -> None:
        """Route and dispatch: a node has streamed its first event and the request is recorded as open, or an
        error is raised before anything was sent to the client."""
        d, t = self.d, self.target
        self.started = time.monotonic()
        self.deadline = self.started + d.settings.request_deadline_s
        live = d.directory.live(t.base_model_id)
        needs = features_needed(self.node_body)
        route = d.router.route(t.adapter_id, [n for n in live if needs <= n.features], t.components)
        if route is None and live:  # nodes of an older release: the field would be refused, or its effect lost
            raise NoNodeAvailable(
                f"no live node that serves the base model of {t.model!r} takes "
                f"{', '.join(sorted(self._asked_as(f) for f in needs))} right now "
                "(their releases are older); retry later, or leave the field out"
            )
        if route is None:
            raise NoNodeAvailable(f"no live node serves the base model of {t.model!r} right now; retry later")
        d.book.check_outbox()
        # the open record is written while the first node starts on the request (its write is off the
        # time to first token), and nothing reaches the client before it is written: whatever the client
        # is served, a record of it exists
        opening = asyncio.ensure_future(
            d.book.open_request(
                self.rid,
                t,
                route.nodes[0].node_id,
                key_id=self.key_id,
                prompt_tokens=self.prompt_tokens,
                max_tokens=self.max_tokens,
                quote=self.quote,
                reserved_tokens=self.reserved,
                owner=self,
            )
        )
        try:
            await self._dispatch(route, opening)
        except BaseException as e:  # no node took it: close the open record (cancelled too: the client left)
            if await _written(opening):
                error = e.message if isinstance(e, GatewayError) else f"{type(e).__name__}: {e}"
                d.background.spawn(d.book.record(self._end(RequestStatus.NOT_SERVED, served=False, error=error[:500])))
            raise
        if not await _written(opening):  # the outbox refused the record: the node's work goes unserved
            await self._release()
            d.book.check_outbox()
            raise OutboxUnavailable("this gateway cannot record usage right now, so it serves nothing")

    async def _release(self) -> None:
        """Give up a request a node has started on (before anything reached the client)."""
        node, up = self.node, self.up
        self.node = None
        if node is None:
            return
        self._hold.close()
        self.d.background.spawn(self.d.nodes.abort(node.api_url, node.node_id, self.rid))
        self._drop_read()
        try:
            await up.aclose()
        except RuntimeError:
            pass

    def _drop_read(self) -> None:
        """Cancel the read in progress, if any; its outcome (the closed stream's error) is nobody's."""
        if self._next is not None:
            self._next.cancel()
            self._next.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._next = None

    async def _dispatch(self, route: Route, opening: asyncio.Future) -> None:
        d, t = self.d, self.target
        d.metrics.routing.labels(route.decision).inc()
        # not an ensemble's parts: a prefetch loads an adapter into a slot, and the parts' slots would only
        # push out adapters that run; the node taking the request fetches and combines them itself
        if t.adapter_id is not None and t.ensemble is None:
            self._prefetch(t.adapter_id, route)
        errors = []
        tried = route.nodes[: d.settings.max_attempts]
        for i, node in enumerate(tried):
            if i:
                await opening  # the record is written before it is moved (OutboxUnavailable if it was not)
                await d.book.move_request(self.rid, node.node_id)
            self.attempts += 1
            hit = t.adapter_id is not None and t.adapter_id in node.resident  # before this request loads it
            if await self._try(node, errors):
                if t.adapter_id is not None:
                    d.metrics.residency.labels(t.label, "hit" if hit else "miss").inc()
                for liar, _ in self.refusals:  # refused what another node served: routed around for a while
                    log.warning(
                        "node %s refused request %s that node %s served",
                        liar.node_id[:10],
                        self.rid[:10],
                        node.node_id[:10],
                    )
                    d.directory.mark_failed(liar.node_id)
                # the request was no poison: who failed it is routed around until its next heartbeat, and a
                # failure of its own (NodeUnavailable.faulty) is a strike
                for failed, faulty in self.failed_nodes:
                    d.directory.mark_failed(failed.node_id, strike=faulty)
                return
            d.metrics.failovers.inc()
        if self.refusals and len(self.refusals) == len(tried):  # every node asked says it is the client's mistake
            e = self.refusals[-1][1]
            raise BadRequest(str(e), code=e.code, param=self._rejected_param(e)) from e
        raise NoNodeAvailable(f"{len(errors)} node(s) failed before the first token: {'; '.join(errors)}")

    def _prefetch(self, adapter_id: str, route: Route) -> None:
        """Ask the adapter's owners that do not hold it resident to load it (at most once per prefetch_ttl_s)."""
        now = time.monotonic()
        for node in route.nodes:
            if node.node_id not in route.owners or adapter_id in node.resident:
                continue
            asked = node.local.prefetched.get(adapter_id)
            if asked is not None and now - asked < self.d.settings.prefetch_ttl_s:
                continue
            node.local.prefetched[adapter_id] = now
            self.d.background.spawn(_prefetch_one(self.d.nodes, node, adapter_id))

    async def _try(self, node: NodeEntry, errors: list[str]) -> bool:
        d = self.d
        with ExitStack() as hold:  # the node's in-flight count: given back unless the node takes the request
            hold.enter_context(node.local.busy())
            try:
                up = await d.nodes.open_stream(node.api_url, node.node_id, self._body_for(node))
            except NodeRejected as e:
                # A node's 400 is a stranger's word that the request is the client's mistake (a grammar it cannot
                # compile; most else the gateway checked itself). Taken at its word, a node answering every request
                # so failed all of them for the adapters it was first for, or two such nodes of one operator. The
                # client is told only when every node asked (max_attempts, or all the owners there are) refused;
                # a node that refused what another then served is routed around for a while (_dispatch). A
                # client's true mistake costs a few nodes' refusals, each cheap
                self.refusals.append((node, e))
                log.warning("node %s refused request %s as invalid: %.300r", node.node_id[:10], self.rid[:10], e.reason)
                errors.append(f"node {node.node_id[:10]} refused it ({e.code})")
                return False
            except NodeUnavailable as e:
                errors.append(str(e))
                if e.dead:
                    d.directory.mark_failed(node.node_id)
                if not e.excused:
                    self.failed_nodes.append((node, e.faulty))
                if e.maybe_running:  # a hung node may wake up and run it: tell it not to (the request moved on)
                    d.background.spawn(d.nodes.abort(node.api_url, node.node_id, self.rid))
                return False
            it = up.events().__aiter__()
            try:
                # wall clock: a node dripping an unfinished line resets the read timeout with every byte (an
                # honest node sends nothing before its first event, so that timeout bounded it already)
                try:
                    async with asyncio.timeout(d.settings.node_timeout_s):
                        first = await it.__anext__()
                except TimeoutError:
                    # not of its own for sure: an honest node fetching a cold adapter sends nothing until it is
                    # ready (node/api/routes/generate.py:_cold_sse), and a large one can take longer than this
                    raise NodeUnavailable(
                        f"node {node.node_id[:10]} sent no event within {d.settings.node_timeout_s:g} s",
                        dead=True,
                        faulty=False,
                    ) from None
                if first.get("type") == "error":  # the engine failed before any token: read on to done, bounded
                    _log_engine_error(node.node_id, self.rid, first.get("message"))
                    await self._error_end(it, node)
                    # no strike, only routed around until its next heartbeat if another node serves it: an honest
                    # node of less memory can fail what a larger one serves, and a client choosing such requests
                    # must not keep it out of routing (as with a 400)
                    raise NodeUnavailable(f"node {node.node_id[:10]}'s engine failed before the first token")
            except (NodeUnavailable, StopAsyncIteration, ValueError) as e:
                await up.aclose()
                errors.append(str(e) or f"node {node.node_id[:10]} closed the stream")
                if not isinstance(e, NodeUnavailable) or e.dead:
                    d.directory.mark_failed(node.node_id)
                # a stream closed or malformed before its first event is the node's own failure
                self.failed_nodes.append((node, not isinstance(e, NodeUnavailable) or e.faulty))
                return False
            if self.target.adapter_id is not None:
                node.local.saw_loaded(self.target.adapter_id)
            self.node, self.up, self._it, self._first = node, up, it, first
            self.choices.names_stops = STOP_STRING_FEATURE in node.features
            self._hold = hold.pop_all()
            return True

    def _asked_as(self, feature: str) -> str:
        """The request field that brought a generate feature into the node's body (what a client is told)."""
        if feature == GUIDED_GRAMMAR_FEATURE:
            return self.req.guided_field() or feature
        return "bad_words" if feature == BAD_WORDS_FEATURE else feature

    def _body_for(self, node: NodeEntry) -> dict:
        """The generate body for `node`: the key's prefix-cache salt for this node where the node knows the field
        (one key's prompts never warm another key's cache, gateway.keys.node_cache_salt)."""
        salt = self.auth.key.cache_salt
        if salt is None or CACHE_SALT_FEATURE not in node.features:
            return self.node_body
        return self.node_body | {"cache_salt": node_cache_salt(salt, node.node_id, self.req.cache_salt)}

    def _rejected_param(self, e: NodeRejected) -> str | None:
        """The request field a node's refusal is about, where it says: the prompt, or the grammar it could not
        compile (the field that gave it: response_format, structured_outputs, a guided_* field, or tools for
        tool_choice required / a named function)."""
        if e.code == "context_length_exceeded":
            return self.req.PROMPT_FIELD
        if e.reason.startswith("guided.calls"):  # the tools' calls beside a response format (json_or_tool_calls)
            return "tools"
        if "guided" in e.reason:
            return self.req.guided_field()
        return None

    @staticmethod
    async def _error_end(it: AsyncIterator[dict], node: NodeEntry) -> None:
        """After an error event before the first token: read on to the done event, at most MAX_OTHER_EVENTS
        events within ABORT_DRAIN_TIMEOUT_S (NodeUnavailable, the node marked failed, past either)."""
        try:
            async with asyncio.timeout(ABORT_DRAIN_TIMEOUT_S):
                for _ in range(MAX_OTHER_EVENTS):
                    if (await it.__anext__()).get("type") == "done":
                        return
        except TimeoutError:
            pass
        raise NodeUnavailable(
            f"node {node.node_id[:10]} failed before the first token and did not end its "
            f"stream (at most {MAX_OTHER_EVENTS} events in {ABORT_DRAIN_TIMEOUT_S:.0f} s)",
            dead=True,
        )

    # ------------------------------------------------------------------ relaying

    async def _read(self, *, deadline: bool = True) -> dict:
        """The node's next event. The read runs on a future of its own, so a reader cancelled mid-read (the
        client went away), or one past the request's deadline (DeadlinePassed), leaves it to `finish`, which
        reads on to the done event."""
        if self._next is None:
            self._next = asyncio.ensure_future(self._it.__anext__())
        left = self.deadline - time.monotonic() if deadline else None
        try:
            if left is not None and left < self.d.settings.node_timeout_s:
                # (further off, the node client's read timeout ends a read first: no timer per token)
                async with asyncio.timeout(max(0.0, left)):
                    await asyncio.shield(self._next)
            else:
                await asyncio.shield(self._next)
        except asyncio.CancelledError:
            raise  # the read stays in _next, also when it completed at this very moment: its event is not lost
        except TimeoutError:
            if not self._next.done():
                raise DeadlinePassed() from None  # the read stays in _next
            # it completed as the deadline passed: its outcome is taken as usual
        except BaseException:
            self._next = None
            raise
        done, self._next = self._next, None
        return done.result()

    def _token(self, ev: dict) -> tuple[int, str, object] | None:
        """Count one token event as relayed: (sequence, text, its scored position or None). None when it is not
        relayed: its sequence has all its tokens already (overrun), or the request has no such sequence
        (failure)."""
        c = self.choices
        k = c.index_of(ev)
        if k is None:
            # the index is the node's value: the client is told its type, the log gets it (never the client's error)
            index = ev.get("index")
            log.warning(
                "node %s sent request %s a token of choice %.100r", self.node.node_id[:10], self.rid[:10], index
            )
            self.failure = (
                f"node {self.node.node_id[:10]} sent a token of a choice this request does not have "
                f"({type(index).__name__})"
            )
            return None
        if c.full(k):
            self.overrun += 1
            log.warning(
                "node %s streamed past the end of choice %d of request %s (%d tokens relayed, %d allowed)",
                self.node.node_id[:10],
                k,
                self.rid[:10],
                c.seqs[k].count,
                c.max_tokens,
            )
            return None
        if c.too_long(k, ev):
            self.failure = (
                f"node {self.node.node_id[:10]} sent more text for choice {k} than its "
                f"{c.seqs[k].count + 1} tokens can hold (at most {c.token_chars} characters each)"
            )
            return None
        self.n_tokens += 1
        text, scored = c.take_token(k, ev)
        return k, text, scored

    async def tokens(self) -> AsyncIterator[tuple[int, str | None, object]]:
        """The node's stream as (sequence, token text, scored position or None) for each token relayed, and
        (sequence, None, None) when a sequence ended; each sequence's tokens at most max_tokens. Afterwards
        `done` or `failure` says how it ended (neither: the node went past a limit, and `finish` aborts it)."""
        ev, self._first = self._first, None
        c = self.choices
        while True:
            kind = ev.get("type")
            if kind == "token":
                if self.ttft is None:
                    self.ttft = time.monotonic() - self.started
                if self.key_id in self.d.admission.revoked:  # a stolen key's streams end with its revocation
                    self.key_revoked = True
                    return
                got = self._token(ev)
                if got is None:  # stop relaying; finish() aborts
                    return
                yield got
            elif kind == "done":
                self.done = ev
                self.grammar_failed = self._grammar_claim
                if self.grammar_failed:
                    self.failure = (
                        f"the answer could not be held to {self.req.guided_field()} after {self.n_tokens} tokens (the "
                        "node's grammar engine gave up: the grammar costs more than the node allows, or no token "
                        "could follow)"
                    )
                elif self.engine_error:
                    self.failure = f"the node's engine failed after {self.n_tokens} tokens"
                return
            elif kind == "finish" and (k := c.index_of(ev)) is not None and c.take_finish(k, ev):
                yield k, None, None
            elif kind == "prompt_logprobs" and (
                await asyncio.to_thread(c.take_prompt, ev)
                if _scores(ev, self.node_body.get("prompt_logprobs")) > INLINE_PROMPT_SCORES
                else c.take_prompt(ev)
            ):
                pass
            else:
                if kind == "error" and not self.engine_error:
                    self.engine_error = True
                    self._grammar_claim = ev.get("code") == GUIDED_FAILED and self.req.guided() is not None
                    _log_engine_error(self.node.node_id, self.rid, ev.get("message"))
                self.other_events += 1
                if self.other_events > MAX_OTHER_EVENTS:  # a node that never ends its stream: cut it off
                    self.failure = (
                        f"node {self.node.node_id[:10]} sent more than {MAX_OTHER_EVENTS} events "
                        f"that are not tokens after {self.n_tokens} tokens"
                    )
                    self.d.directory.mark_failed(self.node.node_id)
                    return
            try:
                ev = await self._read()
            except DeadlinePassed:
                self.failure = (
                    f"node {self.node.node_id[:10]} did not finish within "
                    f"{self.d.settings.request_deadline_s:.0f} s ({self.n_tokens} tokens)"
                )
                return
            except StopAsyncIteration:
                self.stream_ok = False
                self.failure = f"node {self.node.node_id[:10]} closed the stream after {self.n_tokens} tokens"
                return
            except (ValueError, RuntimeError) as e:
                self.stream_ok = False
                self.failure = f"node {self.node.node_id[:10]} failed after {self.n_tokens} tokens: {e}"
                return

    @property
    def usage(self) -> tuple[int, int]:
        """(prompt, completion) tokens as the gateway counted them, sent and relayed: what the client is
        shown and billed."""
        return self.prompt_tokens, self.n_tokens

    @property
    def cached_tokens(self) -> int:
        """Of the prompt tokens, those the node's prefix cache held, as its done event says (OpenAI's
        usage.prompt_tokens_details.cached_tokens). Only shown, never billed on: a node's claim is taken when
        it is a count within the prompt, else shown as 0."""
        usage = self.done.get("usage") if self.done else None
        details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
        n = details.get("cached_tokens") if isinstance(details, dict) else None
        return n if type(n) is int and 0 <= n <= self.prompt_tokens else 0

    @property
    def cache_write_tokens(self) -> int | None:
        """Of the prompt tokens, those this request wrote into the node's prefix cache, as its done event says
        (OpenAI's usage.prompt_tokens_details.cache_write_tokens); None where the node does not say (one of before
        the count). Only shown, never billed on: a claim is taken when it is a count that, with the cached
        tokens shown, stays within the prompt, else shown as 0."""
        usage = self.done.get("usage") if self.done else None
        details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
        if not isinstance(details, dict) or "cache_write_tokens" not in details:
            return None
        n = details["cache_write_tokens"]
        return n if type(n) is int and 0 <= n and self.cached_tokens + n <= self.prompt_tokens else 0

    @property
    def finish_reason(self) -> str | None:
        if self.done:  # the node's word, shown to the client only when it is one of a receipt's
            reason = self.done.get("finish_reason")
            return reason if reason in FINISH_REASONS else None
        if not self.overrun:
            return None
        return "stop" if all(s.ended or s.reason == "stop" for s in self.choices.seqs) else "length"

    # ------------------------------------------------------------------ the end

    async def _drain(self) -> None:
        """After an abort: read the node's stream on to its done event, for the receipt it carries (and so
        that the connection can be reused). The tokens read meanwhile reached nobody: they are counted in
        `drained`, not billed. Bounded in time and in events."""
        try:
            async with asyncio.timeout(ABORT_DRAIN_TIMEOUT_S):
                c = self.choices
                for _ in range(self.limit + len(c.seqs) + len(c.prompts) + MAX_OTHER_EVENTS + 1):
                    ev = await self._read(deadline=False)
                    if ev.get("type") == "token":
                        self.drained += 1
                    elif ev.get("type") == "done":
                        self.done = ev
                        return
            self.stream_ok = False  # more events than the request can have: it is not read further
        except (TimeoutError, *_READ_ERRORS):
            self.stream_ok = False

    def _end(self, status: str, *, served: bool = True, error: str | None = None, **kw) -> RequestEnd:
        prompt, completion = self.usage
        return RequestEnd(
            request_id=self.rid,
            model=self.target.model,
            adapter_id=self.target.adapter_id,
            node_id=self.node.node_id if self.node else None,
            status=status,
            key_id=self.key_id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            attempts=max(1, self.attempts),
            max_tokens=self.max_tokens,
            context_len=self.context_len,
            served=served,
            error=error,
            ensemble=self.target.ensemble,
            quote=self.quote,
            **kw,
        )

    async def finish(self, *, client_gone: bool = False) -> str:
        """Get the receipt (aborting the request when it did not end on its own), record, release."""
        if self.finished or self.node is None:
            return self.result or "none"
        self.finished = True
        d, node = self.d, self.node
        receipt = signature = None
        if self.done is not None and self.grammar_failed:
            status = RequestStatus.GRAMMAR_FAILED
        elif self.done is not None:
            status = RequestStatus.NODE_FAILED if self.failure else RequestStatus.OK
        else:
            self.aborted = True
            got = await d.nodes.abort(node.api_url, node.node_id, self.rid)
            if self.stream_ok:
                await self._drain()
            if self.done is None and got is not None:
                receipt, signature = got.get("receipt"), got.get("signature")
            if self.overrun and not client_gone:
                status = RequestStatus.OK
            else:
                status = RequestStatus.CLIENT_CLOSED if client_gone else RequestStatus.NODE_FAILED
            if self.done is None and got is None:
                self.node_lost = True  # no receipt will come: the tokens relayed are billed at our count
                if not client_gone:
                    d.directory.mark_failed(node.node_id)
        if self.done is not None:
            receipt, signature = self.done.get("receipt"), self.done.get("signature")
        try:
            await self.up.aclose(drain=self.done is not None)  # a finished stream keeps its connection
        except RuntimeError:
            pass
        self._drop_read()  # one the drain gave up on
        self._hold.close()  # the node's in-flight count
        if self.drained:
            log.info(
                "request %s: %d token(s) read from node %s after the abort reached nobody (not billed)",
                self.rid[:10],
                self.drained,
                node.node_id[:10],
            )
        latency = time.monotonic() - self.started
        try:
            misreported = await self._misreported()
        except Exception:  # the check must never cost the request its record
            log.exception("request %s: the check of node %s's text failed", self.rid[:10], node.node_id[:10])
            misreported = None
        if status == RequestStatus.OK and self.done is not None and misreported is None:
            node.local.served()  # one strike back, if it has any (NodeDirectory.holdoff_s)
        reason = "abort" if client_gone else self.finish_reason
        end = self._end(
            status,
            finish_reason=reason if isinstance(reason, str) else None,
            receipt=receipt,
            signature=signature,
            ttft_ms=None if self.ttft is None else self.ttft * 1000,
            latency_ms=latency * 1000,
            error=self.failure,
            aborted=self.aborted,
            node_lost=self.node_lost,
            # a whole answer not sent (an error instead, the client gone before it) delivered nothing: billed
            # nothing. Billing a client that left what was read until then paid a node that made every token at
            # once and then sent nothing more until the client's timeout; taking a node's word that the request's
            # grammar failed it, one that said so of any guided request (red team)
            withheld=self.buffered and (self.key_revoked or client_gone or bool(self.failure)),
            # (a revoked key's stream is sent what was held back, after this: release_held)
            unsent=self._unsent() if client_gone and not self.buffered and not self.key_revoked else 0,
            misreported=misreported,
        )
        self.result = await d.book.record(end)
        m = d.metrics
        m.requests.labels(self.target.label, status).inc()
        m.latency.labels(self.endpoint).observe(latency)
        if self.ttft is not None:
            m.ttft.labels(self.endpoint).observe(self.ttft)
        m.tokens.labels(self.target.label, "prompt").inc(end.prompt_tokens)
        m.tokens.labels(self.target.label, "completion").inc(end.completion_tokens)
        # what it used beyond its reservation, or (negative) the unused part back; a request a sibling's
        # reconciliation closed first (this gateway taken for dead) was settled by that sibling. What a client had
        # nodes make counts, billed or not: a whole answer it left or its grammar failed, the text held back when
        # it left a stream (refunded, --tpm let a client that left every answer have them made without limit;
        # re-attack); what a failed node made for a whole answer does not
        # (end.counted: the gateway's counts, before the record took out what was not delivered)
        used = sum(end.counted) if client_gone or self.grammar_failed else end.prompt_tokens + end.completion_tokens
        if self.key_id is not None and self.result != "already_closed":
            d.admission.charge_tokens(self.key_id, used - self.reserved)
        return self.result

    def _unsent(self) -> int:
        """Tokens relayed whose text a streaming client that left never got: what tool streams hold back
        (Choices.unsent), and a LoRAX stream's last token, held for the finish that never came (red team: billed)."""
        return self.choices.unsent() + (self.lorax_stream.held() if self.lorax_stream is not None else 0)

    async def _misreported(self) -> str | None:
        """What the node's tokens belie, to be held against it (None: nothing): a token id past any the model
        has, or a sequence whose text is shorter than what an honest node sends for its token ids, or that it says
        a stop string ended when its tokens end on none or another (the gateway runs the node's detokenizer over
        them, with the request's stop strings and stop token ids). The
        gateway counts token events: a node that sent tokens without their text would bill padding nobody
        sees. Run at the end, once per sequence, off the event loop unless the sequences are short."""
        t, base = self.d.templates, self.target.base_model_id
        texts, bound = t.token_texts.get(base), t.id_bound(base)
        if texts is None or bound is None:  # the base's tokenizer is not loaded here: nothing to decode with
            return None
        c, req = self.choices, self.req
        for k, s in enumerate(c.seqs):
            if not all(0 <= i < bound for i in s.ids):
                return f"node sent token ids of choice {k} outside the vocabulary ({bound} ids)"
        if req.allowed_token_ids is not None:
            # the base's end tokens too: an honest node draws one where a row has nothing else left to draw
            allowed = set(req.allowed_token_ids) | t.end_ids(base)
            for k, s in enumerate(c.seqs):
                if (out := next((i for i in s.ids if i not in allowed), None)) is not None:
                    return f"node sent token id {out} of choice {k}, which the request's allowed_token_ids leave out"
        # a sequence the node ended (a finish event, its end token, max_tokens, or the whole request ended on
        # its own) had its held-back text sent; one cut off (the gateway's abort, a broken stream, an engine
        # error, the node operator's abort: a done event "abort") had not
        whole = (
            self.done is not None
            and self.done.get("finish_reason") != "abort"
            and not self.aborted
            and not self.failure
        )
        # the node ended the request itself, "abort" included (its operator's): a sequence whose token completed a stop
        # string had its finish event sent with that token, before any abort could come (review)
        node_ended = self.done is not None and not self.aborted and not self.failure
        stops, stop_ids = req.stop_list(), set(req.stop_token_ids or ())
        # special tokens' text shown (skip_special_tokens false, which only nodes that list it are sent): but for the
        # end tokens' (node.adapters.detokenizer.TextStream)
        skip = req.skip_special_tokens is not False
        unshown = frozenset() if skip else c.eos_ids

        def check() -> str | None:
            for k, s in enumerate(c.seqs):
                # every id, a padded row's (past the tokenizer's, no text) too: the node's detokenizer counts them
                # among the tokens it holds half a character for, and so must its re-run here (red team: leaving
                # them out, the two disagreed on a stop string and an honest node was disputed)
                if not stops and s.chars >= len(t.decode(base, s.ids, skip_special_tokens=skip, unshown=unshown)):
                    continue  # all the text there is (the usual case, one decode); with stop strings, see below
                ended = whole or s.ended or s.reason is not None or s.count >= c.max_tokens
                honest, stop_at, stopped = t.sent_chars(
                    base, s.ids, stops, stop_ids, ended, skip_special_tokens=skip, unshown=unshown
                )
                if stop_at is not None and stop_at < len(s.ids) - 1:
                    return f"node streamed {len(s.ids) - 1 - stop_at} tokens of choice {k} past its stop string"
                if s.named is not None and s.named != stopped:
                    # the stop string the client was told (stop_reason; LoRAX's text ends with it) is the node's
                    # word: it must be the one its tokens complete; so must one it was not told (named for a
                    # sequence of no tokens, or one a stop token id ended, or a string the request's stop strings
                    # do not hold)
                    return f"node named a stop string of choice {k} that its tokens do not end on"
                if c.names_stops and stopped is not None and s.stop_reason is None and (s.reason or node_ended):
                    # a node whose release names them, naming none, said none was met (stop_text): so does one that
                    # says the sequence's length ended it (the engine reads stop strings first), or that sends no
                    # finish event for it (red team: the client was told "length", or not told the stop string)
                    return f"node named no stop string for choice {k}, whose tokens end on one"
                if s.chars < honest:
                    return (
                        f"node's text for choice {k} is {honest - s.chars} characters shorter than an honest node "
                        f"sends for its {len(s.ids)} token ids"
                    )
            return None

        return await blocking(t, 64 * sum(len(s.ids) for s in c.seqs), lambda _base: check(), base)

    def finish_detached(self, *, client_gone: bool) -> None:
        """Finish on a task of its own: the caller is being cancelled (the client went away)."""
        if not self.finished and self.node is not None:
            self.d.background.spawn(self.finish(client_gone=client_gone))


async def _prefetch_one(nodes: NodeClient, node: NodeEntry, adapter_id: str) -> None:
    if await nodes.load(node.api_url, node.node_id, adapter_id):
        node.local.saw_loaded(adapter_id)
