"""The asyncio-facing AsyncEngine: streaming, aborting, validation, and a loop that stays responsive."""

from __future__ import annotations

import asyncio

import pytest

from node.engine import (
    AsyncEngine,
    DuplicateRequestError,
    FinishEvent,
    PromptTooLongError,
    SequenceFinishEvent,
    TokenEvent,
)
from tests.utils.engine import greedy


@pytest.fixture(scope="module")
def engine(llama_world):
    eng = AsyncEngine(llama_world.config(num_kv_blocks=64, block_size=8), store=llama_world.store).start()
    yield eng
    eng.close()


def test_stream_yields_tokens_then_finish(engine, llama_world):
    async def go():
        stream = engine.submit(greedy("s1", llama_world.adapters[0].adapter_id, [1, 5, 6, 7], 5))
        return [ev async for ev in stream]

    events = asyncio.run(go())
    assert [type(e) for e in events] == [TokenEvent] * 5 + [SequenceFinishEvent, FinishEvent]
    assert events[-2] == SequenceFinishEvent("s1", 0, "length")
    fin = events[-1]
    assert fin.finish_reason == "length" and fin.completion_tokens == 5 and fin.prompt_tokens == 4
    assert list(fin.token_ids) == [e.token_id for e in events[:-2]]
    assert fin.text == "".join(e.text for e in events[:-2])
    assert fin.finished_at >= fin.started_at


def test_abort_mid_stream_returns_final_event_and_loop_stays_responsive(engine):
    async def go():
        stream = engine.submit(greedy("s2", None, [1, 5, 6, 7], 400))
        first = await stream.__anext__()
        ticks = 0
        for _ in range(5):  # the event loop keeps running while the engine thread works
            await asyncio.sleep(0.01)
            ticks += 1
        final = await engine.abort("s2")
        rest = [ev async for ev in stream]
        again = await engine.abort("s2")  # a finished request answers with its final event
        return first, ticks, final, rest, again

    first, ticks, final, rest, again = asyncio.run(go())
    assert isinstance(first, TokenEvent) and ticks == 5
    assert final.finish_reason == "abort" and 1 <= final.completion_tokens < 400
    assert rest[-1] == final
    # a finished request answers with its final event as kept for its receipt: the counts and times
    assert (again.finish_reason, again.completion_tokens, again.finished_at) == (
        final.finish_reason,
        final.completion_tokens,
        final.finished_at,
    )


def test_closing_a_stream_aborts_the_request(engine):
    async def go():
        stream = engine.submit(greedy("s3", None, [1, 5, 6], 400))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            if await engine.finished("s3"):
                break
            await asyncio.sleep(0.02)
        return await engine.finished("s3")

    assert asyncio.run(go()).finish_reason == "abort"


def test_bad_requests_are_refused_at_submit(engine):
    async def go():
        with pytest.raises(PromptTooLongError, match="the prompt has 600 tokens; this node's context holds"):
            engine.submit(greedy("s4", None, [1] * 600, 2))
        engine.submit(greedy("s5", None, [1, 2], 50))
        with pytest.raises(DuplicateRequestError, match="request s5 is already running"):
            engine.submit(greedy("s5", None, [1, 2], 2))
        await engine.abort("s5")

    asyncio.run(go())


def test_a_caller_that_gives_up_does_not_stop_the_engine_loop(engine, llama_world):
    """A command whose awaiting task is cancelled (a client that hung up on /v1/adapters/{id}/load) cancels
    its future; the loop skips it instead of failing on the result it can no longer set."""
    import threading

    release = threading.Event()
    engine.call(release.wait)  # hold the loop between steps

    async def give_up() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(engine.call(lambda: 42)), 0.05)

    asyncio.run(give_up())
    release.set()

    async def still_serves():
        stream = engine.submit(greedy("after-cancel", None, [1, 5, 6, 7], 3))

        async def drain():
            return [ev async for ev in stream]

        return await asyncio.wait_for(drain(), 30)  # a dead loop never answers

    assert isinstance(asyncio.run(still_serves())[-1], FinishEvent)


def test_requests_that_cost_are_validated_off_the_event_loop(engine, llama_world):
    """A guided request's grammar is compiled (and a text prompt tokenized) on the engine's compile thread, never
    on the event loop, where a hostile schema froze every other request (attack review); plain token-id
    requests are validated on the loop."""
    import threading

    from node.engine import GenerationRequest, SamplingParams
    from node.engine.grammar import GuidedSpec

    seen: list[str] = []
    make_group = engine.core.make_group

    def recording(req, **kw):
        seen.append(threading.current_thread().name)
        return make_group(req, **kw)

    engine.core.make_group = recording
    spec = GuidedSpec.from_wire({"type": "json_schema", "schema": {"enum": ["ab"]}})
    try:

        async def go():
            for rid, params in (("guided", SamplingParams(max_tokens=4, guided=spec)), ("plain", None)):
                req = GenerationRequest(rid, None, prompt_token_ids=[1, 5, 6], params=params or SamplingParams())
                [ev async for ev in await engine.asubmit(req)]
            text = GenerationRequest("text", None, prompt="hello", params=SamplingParams(max_tokens=2))
            [ev async for ev in await engine.asubmit(text)]

        asyncio.run(go())
    finally:
        del engine.core.make_group
    assert seen[0].startswith("request-compiler") and seen[2].startswith("request-compiler")
    assert seen[1] == threading.main_thread().name


def test_a_grammar_evicted_after_the_loop_found_it_compiled_is_compiled_off_the_loop(engine, llama_world):
    """Between costly() finding a grammar compiled and make_group asking for it, a compile (or a failure that made the
    engine forget it) may evict it: it is then compiled on the compile thread, never on the event loop (red team:
    GBNF's conversion holds the loop for up to tens of ms)."""
    import threading

    from node.engine import GenerationRequest, SamplingParams
    from node.engine.grammar import GuidedSpec

    spec = GuidedSpec.from_wire({"type": "grammar", "grammar": 'root ::= "a" "b"'})
    compiled_on: list[str] = []
    grammars = engine.core.grammars()
    compile_ = grammars._compile

    def recording(sp):
        compiled_on.append(threading.current_thread().name)
        return compile_(sp)

    grammars._compile = recording
    engine.core.costly = lambda req: False  # "compiled already", as it was when asked: then evicted
    try:
        req = GenerationRequest(
            "evicted", None, prompt_token_ids=[1, 5, 6], params=SamplingParams(max_tokens=4, guided=spec)
        )

        async def go():
            return [ev async for ev in await engine.asubmit(req)]

        asyncio.run(go())
    finally:
        del engine.core.costly
        del grammars._compile
    assert len(compiled_on) == 1 and compiled_on[0].startswith("request-compiler"), compiled_on


def test_a_finished_request_is_remembered_by_its_counts_only(engine, llama_world):
    """What the engine keeps of a finished request (for its receipt) holds no text, tokens or logprobs: a
    thousand kept requests with n=16 and logprobs were gigabytes (attack review)."""
    from node.engine import GenerationRequest, SamplingParams

    async def go():
        # ignore_eos: a sampled choice may draw EOS early, and this test counts tokens (CI saw 13 for 18)
        params = SamplingParams(max_tokens=6, n=3, logprobs=2, prompt_logprobs=2, ignore_eos=True)
        req = GenerationRequest("kept", None, prompt_token_ids=[1, 5, 6, 7], params=params)
        events = [ev async for ev in engine.submit(req)]
        return events[-1], await engine.finished("kept")

    streamed, kept = asyncio.run(go())
    assert streamed.choices and streamed.prompt_logprobs  # the stream's last event is whole
    assert (kept.prompt_tokens, kept.completion_tokens, kept.finished_at) == (4, 18, streamed.finished_at)
    assert kept.text == "" and kept.token_ids == () and kept.choices == () and kept.prompt_logprobs is None


def test_a_compiled_grammar_skips_the_compile_queue_and_a_full_queue_refuses_at_once(engine, monkeypatch):
    """New schemas wait for the one compile thread, at most MAX_QUEUED_COMPILES of them: one more is refused at
    once (EngineBusyError: the node answers 503 and the gateway tries another), so a flood of costly schemas
    cannot hold a request past the gateway's first-byte timeout; a schema compiled already never queues."""
    import node.engine.async_engine as async_engine
    from node.engine import EngineBusyError, GenerationRequest, SamplingParams
    from node.engine.grammar import GuidedSpec

    monkeypatch.setattr(async_engine, "MAX_QUEUED_COMPILES", 1)

    def req(rid: str, word: str) -> GenerationRequest:
        spec = GuidedSpec.from_wire({"type": "json_schema", "schema": {"enum": [word]}})
        return GenerationRequest(
            rid, None, prompt_token_ids=[1, 5, 6], params=SamplingParams(max_tokens=4, guided=spec)
        )

    async def go():
        [ev async for ev in await engine.asubmit(req("warm", "cd"))]  # compiles {"enum": ["cd"]}
        got = await asyncio.gather(
            engine.asubmit(req("new1", "ef")),  # waits for the compile thread: the queue is full
            engine.asubmit(req("new2", "gh")),  # refused at once
            engine.asubmit(req("cached", "cd")),  # compiled already: validated on the loop, no queue
            return_exceptions=True,
        )
        for stream in got:
            if not isinstance(stream, BaseException):
                [ev async for ev in stream]
        return got

    new1, new2, cached = asyncio.run(go())
    assert isinstance(new2, EngineBusyError), new2
    assert not isinstance(new1, BaseException) and not isinstance(cached, BaseException), (new1, cached)
    assert engine._compiles == 0  # every place given back
