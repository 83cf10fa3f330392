"""Prefix caching: requests whose prompts share full blocks under the same (base, adapter) key share
their KV; every answer equals the answer of an engine without the cache (token for token, logprobs to
rounding), two adapters never share KV, and under memory pressure, preemption and aborts every block
is accounted for after every step and back in the free pool when all requests end."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from node.engine import GenerationRequest, RequestError, SamplingParams
from node.engine.block_manager import BlockManager
from node.engine.sequence import Sequence
from tests.utils.engine import greedy, preload

ATOL = 1e-4  # fp32 on CPU: the cached KV was computed in another batch, so it may differ in the last bits


def _tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


SYSTEM = [1] + _tokens(0, 39)  # a 40-token "system prompt": 5 blocks of 8


def _req(rid: str, adapter_id, ids, n: int = 6, **kw) -> GenerationRequest:
    return greedy(rid, adapter_id, ids, n, logprobs=2, **kw)


def check_pool(engine) -> None:
    """Every block is held by exactly the running sequences whose tables name it, or sits once in the
    free pool; registered blocks and the hash table agree."""
    bm = engine.blocks
    holders = [0] * bm.num_blocks
    for s in engine.scheduler.running:
        assert len(set(s.block_table)) == len(s.block_table), "a table names a block twice"
        for b in s.block_table:
            holders[b] += 1
    for q in engine.scheduler.queues.values():
        assert all(not s.block_table for s in q), "a waiting sequence holds blocks"
    assert holders == bm._ref
    pool = list(bm._free) + list(bm._evictable)
    assert len(pool) == len(set(pool)) == bm.num_free
    assert sorted(pool) == [b for b in range(bm.num_blocks) if holders[b] == 0]
    assert all(bm._hash[b] is None for b in bm._free)
    assert all(bm._hash[b] is not None for b in bm._evictable)
    assert {h: b for b, h in enumerate(bm._hash) if h is not None} == bm._by_hash


def run(engine, requests=(), *, check: bool = True, on_step=None) -> dict:
    """Add `requests` and step until nothing is left, checking the pool after every step."""
    for r in requests:
        engine.add_request(r)
    done = {}
    while engine.has_work():
        events, _ = engine.step()
        done.update({e.request_id: e for e in events if hasattr(e, "finish_reason")})
        if check:
            check_pool(engine)
        if on_step is not None:
            on_step(engine)
    return done


def assert_same(got: dict, want: dict, atol: float = ATOL) -> None:
    assert got.keys() == want.keys()
    for rid, ev in want.items():
        g = got[rid]
        assert g.finish_reason == ev.finish_reason == "length", (rid, g.error, ev.error)
        assert g.token_ids == ev.token_ids, rid
        for a, b in zip(g.choices[0].logprobs, ev.choices[0].logprobs, strict=True):
            assert a.token_id == b.token_id
            assert a.logprob == pytest.approx(b.logprob, abs=atol), rid
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
            assert [p for _, p in a.top_logprobs] == pytest.approx([p for _, p in b.top_logprobs], abs=atol)


def all_returned(engine) -> None:
    bm = engine.blocks
    assert bm.num_free == bm.num_blocks and not any(bm._ref)
    check_pool(engine)


def _engines(world, **kw):
    on, off = world.engine(**kw), world.engine(enable_prefix_caching=False, **kw)
    preload(on, [a.adapter_id for a in world.adapters])
    preload(off, [a.adapter_id for a in world.adapters])
    return on, off


# ---- keys ----
def _seq(adapter_id, ids) -> Sequence:
    return Sequence("r", adapter_id, ids, SamplingParams(), None, torch.device("cpu"), 0)


def test_block_keys_chain_the_base_the_adapter_and_every_earlier_token():
    bm = BlockManager(8, 4, namespace="base-a")
    ids = list(range(3, 15))  # 3 blocks
    key = bm.block_hashes(_seq(None, ids), 3)
    assert len(set(key)) == 3
    assert bm.block_hashes(_seq(None, ids + [7, 8]), 3) == key  # later tokens do not change a block's key
    assert bm.block_hashes(_seq("alice", ids), 3)[0] != key[0]  # an adapter is its own namespace
    assert bm.block_hashes(_seq("bob", ids), 3)[0] != bm.block_hashes(_seq("alice", ids), 3)[0]
    assert BlockManager(8, 4, namespace="base-b").block_hashes(_seq(None, ids), 3)[0] != key[0]
    other_first = [99] + ids[1:]  # same second and third blocks after a different first one
    assert set(bm.block_hashes(_seq(None, other_first), 3)).isdisjoint(key)


def test_free_pool_hands_out_never_cached_blocks_first_then_the_least_recently_released():
    bm = BlockManager(6, 2, namespace="b")
    seqs = [_seq(None, [1, 2, 3, 4, 9]), _seq(None, [5, 6, 7, 8, 9])]  # two full blocks each
    for s in seqs:
        bm.allocate(s, bm.match(s), looked_up=True)  # 3 blocks each, pool now empty
        bm.commit(s, 4)
    assert bm.num_free == 0 and bm.num_cached_blocks == 4
    first, second = (list(s.block_table) for s in seqs)
    bm.free(seqs[0].block_table)  # its third block (unregistered) goes to the never-cached list
    bm.free(seqs[1].block_table)
    t: list[int] = []
    bm.grow(t, 4)  # 2 blocks of 2
    assert t == [first[2], second[2]] and bm.evictions == 0  # never-cached first
    bm.grow(t, 8)  # then LRU, a sequence's tail before its head: [first[1], first[0]]
    assert t[2:] == [first[1], first[0]] and bm.evictions == 2
    assert bm.match(_seq(None, [1, 2, 3, 4, 9])) == []  # evicted: dropped from the table
    assert bm.match(_seq(None, [5, 6, 7, 8, 9])) == second[:2]  # still cached while unreferenced
    bm.free(t)
    assert bm.num_free == 6


def test_a_prompt_block_counts_as_written_once_by_the_request_that_registers_it():
    """cache_write_tokens (OpenAI's usage.prompt_tokens_details): the prompt tokens of the full blocks a
    sequence's commit newly registered; not a block whose key another block holds, not a block holding
    output, not a prompt block registered again when a preempted sequence recomputes it, none with caching off."""
    bm = BlockManager(8, 4, namespace="b")
    ids = list(range(3, 13))  # 10 tokens: 2 full blocks and a partial one
    s, twin = _seq(None, ids), _seq(None, ids)
    bm.allocate(s, bm.match(s), looked_up=True)
    bm.allocate(twin, [], looked_up=False)  # computed in the same step: nothing to match yet
    bm.commit(s, 10)
    bm.commit(twin, 10)
    assert (s.prompt_written_tokens, twin.prompt_written_tokens) == (8, 0)  # twin's copies stay private
    s.output_token_ids += [20, 21]
    bm.commit(s, 12)  # the third block, 2 prompt tokens and 2 output ones, is registered: not counted
    assert bm.num_cached_blocks == 3 and s.prompt_written_tokens == 8
    bm.free(twin.block_table)
    bm.free(s.block_table)  # s is preempted; then every block is handed out again, its keys dropped
    t: list[int] = []
    bm.grow(t, 32)
    bm.free(t)
    assert bm.num_cached_blocks == 0
    bm.allocate(s, bm.match(s), looked_up=True)
    bm.commit(s, 12)  # the resumed sequence registers its prompt blocks again: written once, counted once
    assert bm.num_cached_blocks == 3 and s.prompt_written_tokens == 8
    off, plain = BlockManager(8, 4, namespace="b", enable_caching=False), _seq(None, ids)
    off.allocate(plain, off.match(plain), looked_up=True)
    off.commit(plain, 10)
    assert plain.prompt_written_tokens == 0


@pytest.mark.parametrize("extra", [0, 3])
def test_usage_counts_the_prompt_tokens_a_request_wrote_into_the_cache(llama_world, extra):
    """A prompt of 5 full blocks (and `extra` tokens after them) writes 40 tokens into a cold cache; the same
    prompt again writes none and reads what the first wrote, but its last token's block (a full last block is
    computed again, its key already held: written by nobody). Output blocks are never counted; n sequences of
    one prompt count it once, as cached_tokens does; with the cache off nothing is written."""
    prompt = SYSTEM + _tokens(4, extra)
    on, off = _engines(llama_world)
    try:
        cold = run(on, [_req("cold", None, prompt, 12)])["cold"]  # its output fills blocks the cache registers
        assert (cold.cached_tokens, cold.cache_write_tokens) == (0, 40)
        again = run(on, [_req("again", None, prompt, 12)])["again"]
        assert (again.cached_tokens, again.cache_write_tokens) == (40 if extra else 32, 0)
        other = _tokens(5, 16 + extra)  # 2 full blocks
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, n=3)
        many = run(on, [GenerationRequest("n", None, prompt_token_ids=other, params=params)])["n"]
        assert (many.cached_tokens, many.cache_write_tokens) == (0, 16)
        assert run(off, [_req("off", None, prompt, 4)])["off"].cache_write_tokens == 0
        all_returned(on)
    finally:
        on.close()
        off.close()


# ---- outputs equal without the cache ----
def test_mixed_batch_sharing_a_system_prompt_gives_what_no_cache_gives(llama_world):
    w = llama_world
    qv, ko, alls = w.adapters[0].adapter_id, w.adapters[1].adapter_id, w.adapters[3].adapter_id
    keys = [None, qv, ko, alls]
    warm = [_req(f"w{i}", k, SYSTEM + _tokens(50 + i, 3)) for i, k in enumerate(keys)]
    rows = [None, qv, ko, None, qv, ko, alls]
    mixed = [_req(f"m{i}", k, SYSTEM + _tokens(60 + i, 2 + i)) for i, k in enumerate(rows)]
    on, off = _engines(w)
    try:
        want = {**run(off, warm), **run(off, mixed)}
        got = run(on, warm)
        assert on.metrics_snapshot()["prefix_cache_hits"] == 0  # one request per key: nothing to share yet
        for r in mixed:
            on.add_request(r)
        on.step()  # the whole mixed batch in one prefill, every row's system prompt found cached
        running = on.scheduler.running
        assert len(running) == len(mixed) and all(len(s.output_token_ids) == 1 for s in running)
        assert all(s.num_cached_tokens == len(SYSTEM) for s in running)
        got.update(run(on))
        assert_same(got, want)
        assert all(got[r.request_id].cached_tokens == len(SYSTEM) for r in mixed)
        assert all(got[r.request_id].cached_tokens == 0 for r in warm)
        m = on.metrics_snapshot()
        assert m["prefix_cache_hits"] == len(SYSTEM) * len(mixed)
        assert m["prefix_cache_queries"] == sum(len(r.prompt_token_ids) for r in warm + mixed)
        assert off.metrics_snapshot()["prefix_cache_hits"] == off.metrics_snapshot()["prefix_cache_queries"] == 0
        assert off.blocks.num_cached_blocks == 0
        all_returned(on)
    finally:
        on.close()
        off.close()


def test_two_adapters_with_the_same_prompt_never_share_kv_and_one_adapter_does(llama_world):
    w = llama_world
    qv, ko, mlp = (w.adapters[i].adapter_id for i in (0, 1, 2))
    prompt = SYSTEM + [7, 8, 9, 10, 11]  # 45 tokens: 5 full blocks
    first = _req("a", qv, prompt, 12)
    later = [_req("b", ko, prompt), _req("c", None, prompt), _req("d", mlp, prompt), _req("e", qv, prompt)]
    on, off = _engines(w)
    try:
        want = run(off, [first, *later])
        on.add_request(first)
        on.step()  # a's prefill: its 5 full blocks are written and registered
        assert on.blocks.num_cached_blocks == 5
        for r in later:
            on.add_request(r)
        on.step()  # the others' prefill, while a still holds its blocks
        tables = {s.request_id: list(s.block_table) for s in on.scheduler.running}
        assert set(tables) == set("abcde")
        for x in "bcd":  # other keys: not one block in common with anyone
            for y in "abcde":
                if x != y:
                    assert set(tables[x]).isdisjoint(tables[y]), (x, y)
        assert tables["e"][:5] == tables["a"][:5]  # the same adapter shares every full prompt block
        assert set(tables["e"][5:]).isdisjoint(tables["a"])
        assert on.metrics_snapshot()["prefix_cache_hits"] == 40
        assert_same(run(on), want)
        all_returned(on)
    finally:
        on.close()
        off.close()


def test_an_adapter_never_reads_kv_another_adapter_wrote(llama_world):
    """The attack: the same prompt first under one key, later under another; if the later request read
    the cached KV of the first key, its logits would be those of a mixed model, not of its own."""
    w = llama_world
    keys = [None, *(a.adapter_id for a in w.adapters)]
    prompt = SYSTEM + [5, 6]
    on, off = _engines(w)
    try:
        for i, k in enumerate(keys):
            want = run(off, [_req(f"r{i}", k, prompt, 3)])
            got = run(on, [_req(f"r{i}", k, prompt, 3)])  # every earlier key's prefix is cached by now
            assert_same(got, want)
        assert on.metrics_snapshot()["prefix_cache_hits"] == 0
        assert on.blocks.num_cached_blocks == 5 * len(keys)
        got = run(on, [_req("again", keys[2], prompt, 3)])  # the same key again: found
        assert on.metrics_snapshot()["prefix_cache_hits"] == 40
        assert_same(got, run(off, [_req("again", keys[2], prompt, 3)]))
    finally:
        on.close()
        off.close()


def test_a_cache_salt_is_its_own_namespace(llama_world):
    prompt = SYSTEM + [3, 4]

    def salted(rid, salt):
        return dataclasses.replace(_req(rid, None, prompt), cache_salt=salt)

    on = llama_world.engine()
    try:
        run(on, [salted("a", "tenant-a")])
        other = run(on, [salted("b", "tenant-b"), salted("b2", "tenant-a\0")])
        plain = run(on, [_req("c", None, prompt)])  # unsalted: the shared cache, which holds none of them
        assert on.blocks.hits == 0 and on.blocks.num_cached_blocks == 4 * 5
        again = run(on, [salted("d", "tenant-a")])
        assert on.blocks.hits == 40 and again["d"].cached_tokens == 40
        assert again["d"].token_ids == other["b"].token_ids == plain["c"].token_ids
    finally:
        on.close()
    for bad in ("", "x" * 257, 7):
        with pytest.raises(RequestError, match="cache_salt"):
            salted("e", bad)


# ---- the last token, prompt logprobs, the budget ----
@pytest.mark.parametrize("extra", [0, 1, 5])
def test_a_fully_cached_prompt_still_computes_its_last_token(llama_world, extra):
    w = llama_world
    qv = w.adapters[0].adapter_id
    prompt = SYSTEM + _tokens(3, extra)  # 40 (all 5 blocks full), 41 or 45 tokens
    on, off = _engines(w)
    try:
        want = run(off, [_req("x", qv, prompt)])
        run(on, [_req("warm", qv, prompt)])
        on.add_request(_req("x", qv, prompt))
        seqs, prefill, _ = on.scheduler.schedule()
        cached = seqs[0].num_cached_tokens
        assert cached == (len(prompt) - 1) // 8 * 8 == (32 if extra == 0 else 40)
        assert len(prompt) - cached >= 1
        logits = on.runner.forward(seqs, True, all_logits=True)
        assert logits.shape[0] == len(prompt) - cached  # only the uncached positions ran
        on.scheduler.finish(seqs[0])
        on.requests.clear()
        assert_same(run(on, [_req("x", qv, prompt)]), want)
        all_returned(on)
    finally:
        on.close()
        off.close()


def test_prompt_logprobs_requests_compute_their_whole_prompt(llama_world):
    w = llama_world
    ko = w.adapters[1].adapter_id
    prompt = SYSTEM + [9, 9, 9]
    scored = _req("p", ko, prompt, 3, prompt_logprobs=2)
    on, off = _engines(w)
    try:
        want = run(off, [scored])
        run(on, [_req("warm", ko, prompt)])
        queries = on.blocks.queries
        got = run(on, [scored])
        assert on.blocks.queries == queries  # not looked up
        assert_same(got, want)
        entries, ref = got["p"].prompt_logprobs[0], want["p"].prompt_logprobs[0]
        assert len(entries) == len(prompt) and entries[0] is None
        for a, b in zip(entries[1:], ref[1:], strict=True):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=ATOL)
        run(on, [_req("after", ko, prompt)])  # the cache still serves later plain requests
        assert on.blocks.hits == 40
    finally:
        on.close()
        off.close()


def test_the_prefill_budget_counts_only_uncached_tokens(llama_world):
    w = llama_world
    on = w.engine(max_num_batched_tokens=24)
    try:
        run(on, [_req("warm", None, SYSTEM + [4])])
        reqs = [_req("x", None, SYSTEM + [5, 6]), _req("y", None, _tokens(7, 20)), _req("z", None, _tokens(8, 10))]
        for r in reqs:
            on.add_request(r)
        seqs, prefill, _ = on.scheduler.schedule()
        assert prefill and [s.request_id for s in seqs] == ["x", "y"]  # 2 + 20 uncached tokens <= 24
        assert seqs[0].num_cached_tokens == 40
        run(on)
        all_returned(on)
    finally:
        on.close()


# ---- pressure, preemption, abort ----
def test_eviction_under_pressure_keeps_answers_right_and_leaks_nothing(llama_world):
    w = llama_world
    qv, ko = w.adapters[0].adapter_id, w.adapters[1].adapter_id
    prefixes = {k: [1] + _tokens(70 + i, 23) for i, k in enumerate([None, qv, ko])}  # 6 blocks of 4 each

    def waves():
        order = [[None], [qv], [None, ko], [None], [qv, ko], [None], [ko, qv, None]]
        return [
            [_req(f"w{i}-{j}", k, prefixes[k] + _tokens(100 * i + j, 3)) for j, k in enumerate(wave)]
            for i, wave in enumerate(order)
        ]

    kw = dict(block_size=4, num_kv_blocks=20)  # 80 tokens; one request holds 9 blocks at its end
    on, off = _engines(w, **kw)
    try:
        for got_w, want_w in zip(waves(), waves(), strict=True):
            want = run(off, want_w)
            assert_same(run(on, got_w), want)
            all_returned(on)
        assert on.blocks.evictions > 0  # cached blocks were handed out again
        assert on.blocks.hits > 0
        assert on.blocks.num_cached_blocks <= 20
    finally:
        on.close()
        off.close()


def test_preempting_a_sequence_that_shares_blocks_leaves_them_to_the_others(llama_world):
    w = llama_world
    qv = w.adapters[0].adapter_id
    prefix = [1] + _tokens(80, 15)  # 4 blocks of 4

    def reqs():
        return _req("a", qv, prefix + [5, 6], 30), _req("b", qv, prefix + [7, 8, 9], 30)

    roomy = w.engine(block_size=4, num_kv_blocks=200, enable_prefix_caching=False)
    tight = w.engine(block_size=4, num_kv_blocks=16)  # a and b need 12 blocks each at their end
    preload(roomy, [qv])
    preload(tight, [qv])
    seen = []

    def watch(engine):
        running = {s.request_id: s for s in engine.scheduler.running}
        if "a" in running and "b" not in running and engine.scheduler.num_preemptions and not seen:
            a = running["a"]
            seen.append(list(a.block_table[:4]))
            assert all(engine.blocks.ref_count(b) == 1 for b in a.block_table)  # b's share went, a's stays

    try:
        want = run(roomy, reqs())
        a, b = reqs()
        tight.add_request(a)
        tight.step()  # a's prefill registers the 4 prefix blocks
        tight.add_request(b)
        tight.step()
        b_seq = tight.requests["b"].seqs[0]
        assert b_seq.num_cached_tokens == 16
        shared = b_seq.block_table[:4]
        assert all(tight.blocks.ref_count(x) == 2 for x in shared)
        hits = tight.blocks.hits
        got = run(tight, on_step=watch)
        assert tight.scheduler.num_preemptions > 0 and seen and seen[0] == shared
        assert tight.blocks.hits > hits  # b resumed from what the cache still held of it
        assert_same(got, want)
        all_returned(tight)
    finally:
        roomy.close()
        tight.close()


def test_aborting_the_request_that_wrote_shared_blocks_leaves_them_to_the_others(llama_world):
    w = llama_world
    ko = w.adapters[1].adapter_id
    prompts = {r: SYSTEM + _tokens(90 + i, 3) for i, r in enumerate("abc")}
    on, off = _engines(w)
    try:
        want = run(off, [_req(r, ko, p, 10) for r, p in prompts.items() if r != "a"])
        on.add_request(_req("a", ko, prompts["a"], 10))
        on.step()
        on.add_request(_req("b", ko, prompts["b"], 10))
        on.add_request(_req("c", ko, prompts["c"], 10))
        on.step()
        shared = on.requests["a"].seqs[0].block_table[:5]
        assert all(on.blocks.ref_count(x) == 3 for x in shared)
        assert on.abort("a").finish_reason == "abort"
        check_pool(on)
        assert all(on.blocks.ref_count(x) == 2 for x in shared)
        on.step()
        assert on.abort("c").finish_reason == "abort"  # a waiting or running sharer, mid-decode
        assert all(on.blocks.ref_count(x) == 1 for x in shared)
        got = run(on)
        assert got["b"].token_ids == want["b"].token_ids
        assert_same({"b": got["b"]}, {"b": want["b"]})
        all_returned(on)
        assert all(x in on.blocks._evictable for x in shared)  # released, still cached
    finally:
        on.close()
        off.close()


# ---- the static decode path (the CUDA path's buffers and Triton kernels, under the interpreter) ----
def test_static_decode_reads_shared_blocks(llama_world, triton_device):
    """CPU: the static decode buffers and the Triton kernels under the interpreter; CUDA (marker gpu):
    captured graphs in fp32, which give the CPU's greedy tokens (test_static_decode.py)."""
    from node.engine.lora.kernels.triton import TritonLoRAKernel

    w = llama_world
    qv = w.adapters[0].adapter_id
    prompts = [SYSTEM[:16] + _tokens(110 + i, 2 + i) for i in range(3)]  # 2 shared blocks
    keys = [qv, None, qv]

    def reqs():
        warm = [_req("w0", qv, SYSTEM[:16] + [5], 1), _req("w1", None, SYSTEM[:16] + [6], 1)]
        return warm, [_req(f"r{i}", k, p, 3) for i, (k, p) in enumerate(zip(keys, prompts, strict=True))]

    off = w.engine(enable_prefix_caching=False)
    if triton_device.type == "cuda":
        on = w.engine(device="cuda", dtype="float32", cuda_graphs="auto", max_num_seqs=4)
        assert on.runner.graphs.capture
    else:
        on = w.engine(kernel=TritonLoRAKernel("bgmv"), cuda_graphs="static", max_num_seqs=4)
    try:
        preload(off, [qv])
        preload(on, [qv])
        want = {rid: ev for batch in reqs() for rid, ev in run(off, batch).items()}
        got = {rid: ev for batch in reqs() for rid, ev in run(on, batch).items()}
        assert on.blocks.hits == 3 * 16 and on.runner.graphs is not None
        assert_same(got, want, atol=ATOL if triton_device.type == "cpu" else 1e-3)
    finally:
        on.close()
        off.close()
