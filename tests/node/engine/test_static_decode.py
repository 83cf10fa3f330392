"""The GPU decode path end to end: static buffers padded to bucketed batch sizes, Triton LoRA and
attention kernels, slot images (one copy per slot load), the on-device sampler, CUDA graphs.
On CPU the same static-buffer code runs eagerly under the Triton interpreter and must give the
regular engine's greedy tokens exactly; on CUDA (marker gpu) the captured graphs must too."""

from __future__ import annotations

import os
import time

import pytest
import torch

from node.engine import TorchLoRAKernel
from tests.utils.engine import ADAPTER_SPECS, greedy, make_world, preload

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def rows_and_requests(world, tokens=(2, 5, 3, 4)):
    """Four rows (two adapters, one repeated, one base-only) that finish at different steps, so
    the decode batch shrinks through several buckets."""
    a0, a1 = world.adapters[0].adapter_id, world.adapters[3].adapter_id
    adapters = [a0, a1, a0, None]
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 4, 11, 12, 13, 14, 15, 16, 17], [1, 2]]
    return [greedy(f"r{i}", a, p, n) for i, (a, p, n) in enumerate(zip(adapters, prompts, tokens))]


def generate(world, **kwargs) -> dict[str, tuple[int, ...]]:
    engine = world.engine(**kwargs)
    try:
        preload(engine, [a.adapter_id for a in world.adapters])
        done = engine.generate(rows_and_requests(world))
        assert all(ev.finish_reason == "length" for ev in done.values()), [ev.error for ev in done.values()]
        return {k: ev.token_ids for k, ev in done.items()}
    finally:
        engine.close()


@pytest.fixture(scope="module")
def reference_tokens(llama_world):
    return generate(llama_world)  # the regular CPU path: torch kernel, SDPA, per-row sampler


@pytest.mark.parametrize("mode, images", [("bgmv", True), ("sgmv", False)])
def test_static_decode_gives_the_regular_greedy_tokens(llama_world, reference_tokens, triton_device, mode, images):
    from node.engine.lora.kernels.triton import TritonLoRAKernel

    if triton_device.type == "cuda":
        pytest.skip("covered on CUDA by the captured-graph tests")
    engine = llama_world.engine(kernel=TritonLoRAKernel(mode), cuda_graphs="static", slot_images=images, max_num_seqs=4)
    try:
        graphs = engine.runner.graphs
        assert graphs is not None and graphs.buckets == [1, 2, 4] and not graphs.capture
        assert engine.runner.scratch_block == engine.runner.num_blocks  # padded rows' K/V go there
        preload(engine, [a.adapter_id for a in llama_world.adapters])
        done = engine.generate(rows_and_requests(llama_world))
        assert {k: ev.token_ids for k, ev in done.items()} == reference_tokens
    finally:
        engine.close()


def test_prebuilt_slot_images_give_the_same_logits_as_slots_written_in_place(llama_world):
    """Three ways into a slot: laid out in place at the write, a host image built on the loader
    thread, and a raw pool buffer laid out by the device kernel (under the interpreter here)."""

    def logits(mode: str) -> torch.Tensor:
        kw = {"in place": {"slot_images": False}, "image": {"slot_images": True, "host_pool_buffers": 0}}
        engine = llama_world.engine(kernel=TorchLoRAKernel("gather"), **kw.get(mode, {"slot_images": True}))
        try:
            preload(engine, [a.adapter_id for a in llama_world.adapters])
            for r in rows_and_requests(llama_world):
                engine.add_request(r)
            seqs, prefill, _ = engine.scheduler.schedule()
            for a in llama_world.adapters:
                loaded = engine.adapters.load(a.adapter_id).result(30)
                assert (loaded.image is not None, loaded.plan is not None) == (mode == "image", mode == "pool")
            return engine.runner.forward(seqs, prefill, all_logits=True)
        finally:
            engine.close()

    want = logits("in place")
    assert torch.equal(logits("image"), want)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert torch.equal(logits("pool"), want)


def test_static_decode_needs_the_triton_kernel(llama_world):
    with pytest.raises(ValueError, match="cuda_graphs='static' needs the Triton LoRA kernel"):
        llama_world.engine(cuda_graphs="static")


def test_unknown_cuda_graphs_setting_is_refused(llama_world):
    with pytest.raises(ValueError, match="cuda_graphs 'always' is not one of auto, off, static"):
        llama_world.config(cuda_graphs="always")


def test_skipping_the_rehash_on_load_is_a_switch(tmp_path):
    """Re-hashing a 168 MB adapter costs ~100 ms per cold load; a node may trust its own store."""
    world = make_world(tmp_path, specs=ADAPTER_SPECS[:1])
    aid = world.adapters[0].adapter_id
    weights = world.store.path_for(aid) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor: same size, different hash
    weights.write_bytes(bytes(data))
    for verify, want in ((True, "error"), (False, "length")):
        engine = world.engine(verify_adapter_hashes=verify)
        try:
            ev = engine.generate([greedy("r", aid, [1, 5, 6], 2)])["r"]
            assert ev.finish_reason == want, ev.error
            if want == "error":
                assert "failed verification" in ev.error
        finally:
            engine.close()


# ---- CUDA ----


@pytest.mark.parametrize("graphs", ["auto", "static"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_cuda_engine_gives_the_cpu_greedy_tokens(llama_world, reference_tokens, device, graphs):
    """fp32 on CUDA: exact fp32 dots in the Triton kernels, so greedy tokens match the CPU run."""
    assert generate(llama_world, device=device, dtype="float32", cuda_graphs=graphs, max_num_seqs=8) == reference_tokens


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_cuda_graphs_replay_what_the_eager_static_path_computes(llama_world, device):
    captured = generate(llama_world, device=device, dtype="bf16", cuda_graphs="auto", max_num_seqs=8)
    eager = generate(llama_world, device=device, dtype="bf16", cuda_graphs="static", max_num_seqs=8)
    assert captured == eager


@pytest.mark.parametrize("pool", [None, 0], ids=["host-pool", "host-image"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_slot_load_is_an_async_copy_that_lands_before_use(llama_world, device, pool):
    engine = llama_world.engine(device=device, dtype="bf16", max_num_seqs=8, host_pool_buffers=pool)
    m = engine.adapters
    try:
        aid = llama_world.adapters[2].adapter_id
        loaded = m.load(aid).result(timeout=60)
        if pool is None:  # read raw into a pinned pool buffer, laid out on the GPU
            assert loaded.plan is not None and loaded.buffer.is_pinned() and loaded.image is None
            # the layout tables too: from pageable memory their copy would wait for the running step
            assert all(t.is_pinned() for g in loaded.plan.groups for t in (g.jobs, g.scales, g.progs))
            want = engine.runner.slot_image(loaded)  # the host layout, for the comparison below
        else:
            assert loaded.image is not None and loaded.image.is_pinned() and loaded.weights == {}
            want = loaded.image
        slot = m.acquire(aid)
        if slot is None:  # the copy was still in flight: the slot is marked loading
            assert m.loading() == [aid] and m.slots.count(aid) == 1
            deadline = time.monotonic() + 10
            while slot is None and time.monotonic() < deadline:
                time.sleep(0.001)
                slot = m.acquire(aid)
        assert slot is not None and m.loading() == []
        assert torch.equal(engine.runner.slot_buf[slot].cpu(), want.cpu())
        m.release(aid)
    finally:
        engine.close()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_seeded_sampling_on_cuda_repeats(llama_world, device):
    from node.engine import GenerationRequest, SamplingParams

    def run() -> list[int]:
        engine = llama_world.engine(device=device, dtype="bf16", max_num_seqs=8)
        try:
            p = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, top_k=40, seed=11, ignore_eos=True)
            ev = engine.generate(
                [GenerationRequest("s", llama_world.adapters[0].adapter_id, prompt_token_ids=[1, 5, 6], params=p)]
            )["s"]
            return list(ev.token_ids)
        finally:
            engine.close()

    assert run() == run()
