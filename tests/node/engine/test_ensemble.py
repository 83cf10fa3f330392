"""Adapter ensembles against PEFT's add_weighted_adapter(combination_type="cat"): logits in a mixed
batch (ensembles, a single adapter, base rows), greedy tokens, keys apart from their parts (slot
table and prefix cache), and the rank limit refused in one line."""

from __future__ import annotations

import pytest
import torch

from node.adapters.ensemble import check_components, ensemble_key
from node.engine.lora.ensemble import EnsembleSpec
from node.engine.lora.errors import AdapterError
from tests.utils.engine import greedy, preload, reference_greedy, reference_logits

ATOL = 1e-4  # as test_lora_correctness: fp32 on CPU against transformers + PEFT

# (component names, weights): disjoint targets (qv + ko, unioned) and overlapping ones (qv + all: q, v twice)
ENSEMBLES = ((("qv-r4", "ko-r8"), (0.7, 0.3)), (("qv-r4", "all-r2"), (1.5, 0.5)))


def _prompts(n: int, seed: int = 11) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 300, (6 + 2 * i,), generator=g).tolist() for i in range(n)]


def _by_name(world):
    return {a.name: a for a in world.adapters}


def _define(engine, world, names, weights) -> str:
    by = _by_name(world)
    spec = EnsembleSpec.of([(by[n].adapter_id, w) for n, w in zip(names, weights)], names=list(names))
    return engine.adapters.define_ensemble(spec)


@pytest.fixture(scope="module")
def peft_ensembles(llama_world, references):
    """The reference model with each ensemble added by PEFT itself; name -> PEFT adapter name."""
    ref = references(llama_world)
    names = {}
    for i, (parts, weights) in enumerate(ENSEMBLES):
        name = f"ens{i}"
        if name not in ref.peft_config:
            ref.add_weighted_adapter(list(parts), list(weights), adapter_name=name, combination_type="cat")
        names[parts] = name
    return ref, names


def test_mixed_batch_logits_match_peft_cat(llama_world, peft_ensembles):
    ref, peft_names = peft_ensembles
    engine = llama_world.engine()
    try:
        keys = [_define(engine, llama_world, parts, w) for parts, w in ENSEMBLES]
        single = _by_name(llama_world)["qv-r4"].adapter_id
        preload(engine, keys + [single])
        # (engine adapter id, PEFT adapter name): two ensembles, one of their parts alone, base rows, a repeat
        rows = [
            (keys[0], peft_names[ENSEMBLES[0][0]]),
            (None, None),
            (keys[1], peft_names[ENSEMBLES[1][0]]),
            (single, "qv-r4"),
            (keys[0], peft_names[ENSEMBLES[0][0]]),
            (None, None),
        ]
        prompts = _prompts(len(rows))
        for i, ((aid, _), p) in enumerate(zip(rows, prompts)):
            engine.add_request(greedy(f"r{i}", aid, p, 1))
        seqs, prefill, failed = engine.scheduler.schedule()
        assert prefill and not failed and len(seqs) == len(rows)
        assert sorted(engine.adapters.slots, key=str) == sorted([keys[0], keys[1], single, None], key=str)
        logits = engine.runner.forward(seqs, True, all_logits=True)
        off = 0
        by_rid = {f"r{i}": row for i, row in enumerate(rows)}
        for s in seqs:
            n = len(s.prompt_token_ids)
            got = logits[off : off + n]
            off += n
            aid, peft_name = by_rid[s.request_id]
            want = reference_logits(ref, peft_name, s.prompt_token_ids)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        # the ensemble is not its first part alone: the comparison above could tell them apart
        p0 = prompts[0]
        ens_ref = reference_logits(ref, peft_names[ENSEMBLES[0][0]], p0)
        assert (ens_ref - reference_logits(ref, "qv-r4", p0)).abs().max() > 1e-2
        assert (ens_ref - reference_logits(ref, "ko-r8", p0)).abs().max() > 1e-2
    finally:
        engine.close()


def test_greedy_matches_peft_cat_beside_parts_and_base(llama_world, peft_ensembles):
    ref, peft_names = peft_ensembles
    engine = llama_world.engine()
    try:
        keys = [_define(engine, llama_world, parts, w) for parts, w in ENSEMBLES]
        by = _by_name(llama_world)
        # the same prompt under an ensemble and under its parts: the prefix cache must keep them apart
        prompt = _prompts(1, seed=5)[0] * 3
        rows = [
            (by["qv-r4"].adapter_id, "qv-r4"),
            (keys[0], peft_names[ENSEMBLES[0][0]]),
            (by["ko-r8"].adapter_id, "ko-r8"),
            (keys[1], peft_names[ENSEMBLES[1][0]]),
            (None, None),
        ]
        for i, (aid, _) in enumerate(rows):
            done = engine.generate([greedy(f"g{i}", aid, prompt, 10)])
            assert list(done[f"g{i}"].token_ids) == reference_greedy(ref, rows[i][1], prompt, 10), rows[i][1]
        # and all at once, in one batch
        done = engine.generate([greedy(f"b{i}", aid, prompt, 10) for i, (aid, _) in enumerate(rows)])
        for i, (_, name) in enumerate(rows):
            assert list(done[f"b{i}"].token_ids) == reference_greedy(ref, name, prompt, 10), name
    finally:
        engine.close()


def test_key_is_apart_from_parts_and_other_weights(llama_world):
    by = _by_name(llama_world)
    a, b = by["qv-r4"].adapter_id, by["ko-r8"].adapter_id
    k = ensemble_key([(a, 0.7), (b, 0.3)])
    assert k not in (a, b)
    assert k == ensemble_key([(a, 0.7), (b, 0.3)])
    assert len({k, ensemble_key([(a, 0.3), (b, 0.7)]), ensemble_key([(b, 0.3), (a, 0.7)])}) == 3
    engine = llama_world.engine(block_size=8)
    try:
        key = _define(engine, llama_world, ("qv-r4", "ko-r8"), (0.7, 0.3))
        assert key == k
        prompt = _prompts(1, seed=3)[0] * 4  # several full blocks
        engine.generate([greedy("part", a, prompt, 2)])
        root = engine.blocks._root
        assert root(k, None) != root(a, None) and root(k, None) != root(None, None)
    finally:
        engine.close()


def test_concatenated_rank_above_the_slot_rank_is_refused(llama_world):
    engine = llama_world.engine()
    try:
        key = _define(engine, llama_world, ("mlp-r16", "all-r2"), (1.0, 1.0))  # 16 + 2 at gate/up/down
        with pytest.raises(
            AdapterError, match=r"concatenated rank 18 at layer 0 down_proj is above .* max_lora_rank 16"
        ):
            engine.adapters.load(key).result(timeout=60)
        engine.add_request(greedy("x", key, [1, 5, 6], 2))
        done = {}
        while engine.has_work():
            events, _ = engine.step()
            done.update({e.request_id: e for e in events if hasattr(e, "finish_reason")})
        assert done["x"].finish_reason == "error"
    finally:
        engine.close()


def test_weights_that_overflow_the_slots_dtype_are_refused():
    """Each component fits float16 (B x scaling <= 65,504: verify.check_values); times its weight it may not. Two
    such adapters at weight 8 made a float16 slot of inf, whose answers were empty and billed (red team)."""
    from node.engine.lora.ensemble import combine_lora
    from node.engine.lora.errors import AdapterIncompatibleError
    from node.engine.lora.weights import LoadedAdapter

    def hot(i: int, b: float) -> LoadedAdapter:
        w = {(0, "q_proj"): (torch.full((4, 8), 0.01), torch.full((8, 4), b))}
        return LoadedAdapter(adapter_id=f"0x{i}", name=f"a{i}", rank=4, weights=w, scaling=2.0)

    parts = [(hot(1, 30_000.0), 8.0), (hot(2, 30_000.0), 8.0)]
    assert combine_lora("k", "e", parts, 16, torch.float32).weights[(0, "q_proj")][1].isfinite().all()
    with pytest.raises(AdapterIncompatibleError, match="layer 0 q_proj's LoRA B overflow float16"):
        combine_lora("k", "e", parts, 16, torch.float16)
    ok = combine_lora("k", "e", [(hot(1, 30_000.0), 1.0), (hot(2, 1.0), 8.0)], 16, torch.float16)
    assert ok.weights[(0, "q_proj")][1].isfinite().all()


@pytest.mark.parametrize(
    ("components", "message"),
    [
        ([("0x" + "1" * 64, 1.0)], "2 to 4 adapters, got 1"),
        ([("0x" + f"{i}" * 64, 1.0) for i in range(1, 6)], "2 to 4 adapters, got 5"),
        ([("0x" + "1" * 64, 1.0), ("0x" + "1" * 64, 2.0)], "appears twice"),
        ([("0x" + "1" * 64, 1.0), ("0x" + "2" * 64, 0.0)], r"in \(0, 8\], got 0.0"),
        ([("0x" + "1" * 64, 1.0), ("0x" + "2" * 64, float("nan"))], "got nan"),
        ([("0x" + "1" * 64, 1.0), ("0x" + "2" * 64, 9.0)], "got 9.0"),
        ([("0x" + "1" * 64, 1.0), ("alice/x", 1.0)], "'0x' \\+ 64 lowercase hex"),
        ([("0x" + "1" * 64, 1.0), ("0x" + "2" * 64, True)], "must be a number"),
    ],
)
def test_components_are_bounded(components, message):
    with pytest.raises(ValueError, match=message):
        check_components(components)


def test_components_kept_as_slot_images_only_are_decoded_again(llama_world, peft_ensembles):
    """On CUDA a cached adapter keeps only its slot image (its host weights are dropped): the ensemble is then
    built from the packages in the store, and serves the same logits."""
    ref, peft_names = peft_ensembles
    engine = llama_world.engine()
    try:
        by = _by_name(llama_world)
        parts, weights = ENSEMBLES[1]
        preload(engine, [by[n].adapter_id for n in parts])
        for n in parts:  # as LLMEngine._with_image leaves them on CUDA
            engine.adapters._cpu[by[n].adapter_id].weights = {}
        key = _define(engine, llama_world, parts, weights)
        preload(engine, [key])
        prompt = _prompts(1, seed=9)[0]
        engine.add_request(greedy("img", key, prompt, 1))
        seqs, _, failed = engine.scheduler.schedule()
        assert not failed
        logits = engine.runner.forward(seqs, True, all_logits=True)
        torch.testing.assert_close(logits, reference_logits(ref, peft_names[parts], prompt), atol=ATOL, rtol=0)
    finally:
        engine.close()
