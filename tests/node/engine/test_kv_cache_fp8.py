"""An fp8 KV cache (`kv_cache_dtype="fp8"`, layers/attention.py) against the engine's own-dtype cache on the same
tiny random bases and adapters, and its smaller blocks.

The bound: e4m3 keeps 3 mantissa bits, so each cached key and value is off by at most half an ulp, 2^-4 of its
magnitude, and by about 2^-4 / sqrt(3) ~= 0.036 of it in rms (uniform rounding; the per-vector scale keeps every
magnitude away from e4m3's subnormals). Attention averages those errors over the context, each layer's output
adds its error to the residual stream, and the logits see the sum; on these bases the largest logit error is
measured at 0.03-0.06 of the logits' largest magnitude (Llama and Mistral 0.031, Qwen2 0.042, Qwen3 0.058), top-1
agreement 0.91-0.97. Asserted: max error <= 0.15 of the largest reference logit (2.5x headroom; a cache read
with each scale applied twice fails it), the argmax equal wherever the reference's top-1 margin exceeds twice
the measured error, and top-1 agreement >= 0.85 overall (random tiny bases have nearly flat logits; trained
ones agree more)."""

from __future__ import annotations

import pytest
import torch

from node.engine import EngineConfig
from tests.utils.engine import greedy, make_world, preload


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def world(request, tmp_path_factory):
    return make_world(tmp_path_factory.mktemp(f"kv8-{request.param}"), model_type=request.param)


def _mixed_batch_logits(world, **kw):
    """All-token prefill logits of one mixed batch (every adapter and a base row), then 4 decode steps' logits:
    prefill attention reads the keys it just wrote back from the cache, and decode reads the whole context."""
    engine = world.engine(**kw)
    try:
        preload(engine, [a.adapter_id for a in world.adapters])
        rows = [a.adapter_id for a in world.adapters] + [None]
        g = torch.Generator().manual_seed(5)
        for i, aid in enumerate(rows):
            engine.add_request(greedy(f"r{i}", aid, [1] + torch.randint(3, 300, (9 + 4 * i,), generator=g).tolist(), 6))
        seqs, prefill, failed = engine.scheduler.schedule()
        assert prefill and not failed
        return engine.runner.forward(seqs, True, all_logits=True), engine
    finally:
        engine.close()


def test_fp8_cache_logits_stay_within_the_bound_of_the_unquantized_cache(world):
    ref, full = _mixed_batch_logits(world)
    got, fp8 = _mixed_batch_logits(world, kv_cache_dtype="fp8")
    assert fp8.runner.kv_caches[0].k.dtype == torch.float8_e4m3fn and fp8.runner.kv_caches[0].quantized
    assert not full.runner.kv_caches[0].quantized
    err = (got - ref).abs().max().item()
    assert 0 < err <= 0.15 * ref.abs().max().item(), (err, ref.abs().max().item())
    top = ref.topk(2, dim=-1).values
    sure = (top[:, 0] - top[:, 1]) > 2 * err
    assert torch.equal(got.argmax(-1)[sure], ref.argmax(-1)[sure])
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.85


def test_fp8_blocks_take_the_bytes_they_claim_and_more_of_them_fit(world):
    """Same kv_cache_memory: the fp8 cache's tensors (codes and scales) use (d + 4) / (4 d) of the fp32 cache's
    bytes a block, so about 3.5x as many blocks fit at head_dim 32."""
    runners = {}
    probe = world.engine()
    mem = 10 * probe.runner._block_bytes()  # ten fp32 blocks: below the cap of every sequence at full length
    probe.close()
    for dtype in ("auto", "fp8"):
        engine = world.engine(kv_cache_dtype=dtype, kv_cache_memory=mem, num_kv_blocks=None)
        try:
            r = engine.runner
            held = sum(t.numel() * t.element_size() for kv in r.kv_caches for t in kv if t is not None)
            runners[dtype] = (r.num_blocks, held / r.num_blocks, r.model.cfg.head_dim)
        finally:
            engine.close()
    (n32, b32, d), (n8, b8, _) = runners["auto"], runners["fp8"]
    assert b8 / b32 == pytest.approx((d + 4) / (4 * d))
    assert n32 == 10 and n8 == int(mem // b8) >= 35 and b8 * n8 <= mem


def test_static_decode_reads_an_fp8_cache_like_the_eager_path(tmp_path_factory):
    """The CUDA path's decode (static buffers, the Triton paged-attention kernel reading e4m3 codes and their
    scales; on CPU under the Triton interpreter, not captured) generates what the eager SDPA path generates
    from the same fp8 cache, token for token."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on CUDA the captured-graph tests cover this path")
    from node.engine.lora.kernels.triton import TritonLoRAKernel

    w = make_world(tmp_path_factory.mktemp("kv8-static"), model_type="llama")
    a0, a1 = w.adapters[0].adapter_id, w.adapters[3].adapter_id
    rows = [(a0, [1, 5, 6, 7, 8], 3), (a1, [1, 9, 10], 5), (a0, [1, 4, 11, 12], 4), (None, [1, 2], 5)]
    outs = []
    for kw in ({}, {"kernel": TritonLoRAKernel("bgmv"), "cuda_graphs": "static", "max_num_seqs": 4}):
        engine = w.engine(kv_cache_dtype="fp8", speculative="off", **kw)
        try:
            preload(engine, [a0, a1])
            done = engine.generate([greedy(f"g{i}", a, p, n) for i, (a, p, n) in enumerate(rows)])
            outs.append({k: ev.token_ids for k, ev in done.items()})
            if kw:
                assert engine.runner.graphs is not None and engine.runner.static_decode
        finally:
            engine.close()
    assert outs[0] == outs[1] and [len(outs[0][f"g{i}"]) for i in range(4)] == [3, 5, 4, 5]


def test_an_unknown_kv_cache_dtype_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"--kv-cache-dtype 'int4' is not supported; expected one of auto, fp8"):
        EngineConfig(model_dir=tmp_path, kv_cache_dtype="int4")
