"""Cold loads from the host pool: an adapter read raw into a pool buffer and laid out on the device
(kernels/slot_layout.py, under the interpreter on CPU) fills its slot exactly as the host layout
does, serves the same tokens, and its buffer returns to the pool only when nothing can read it."""

from __future__ import annotations

import gc

import pytest
import torch

pytest.importorskip("triton")

from node.engine.lora.host_pool import HostPool  # noqa: E402
from node.engine.lora.kernels.slot_layout import lay_out_slot, plan_layout  # noqa: E402
from tests.node.engine.test_static_decode import generate  # noqa: E402


def slot_after_load(engine, aid) -> torch.Tensor:
    m = engine.adapters
    loaded = m.load(aid).result(timeout=60)
    slot = m.make_resident(aid)
    return loaded, engine.runner.slot_buf[slot].cpu()


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_the_device_layout_fills_the_slot_as_the_host_layout_does(triton_device, world, dtype):
    engine = world.engine(device=str(triton_device), dtype=dtype, slot_images=True)
    try:
        assert engine.runner.host_pool is not None
        for info in world.adapters:
            loaded, row = slot_after_load(engine, info.adapter_id)
            assert loaded.plan is not None and loaded.image is None  # the pool path, not a host image
            want = engine.runner.slot_image(loaded)  # the host layout of the same tensors
            assert torch.equal(row, want.cpu()), info.name
            assert row.abs().sum() > 0
    finally:
        engine.close()


def test_tokens_served_from_pool_loads_equal_the_regular_path(llama_world):
    assert generate(llama_world, slot_images=True) == generate(llama_world)


def test_mixed_dtypes_offsets_and_transposes_against_torch(triton_device):
    """Blocks of every float dtype a package may hold, at aligned offsets of one buffer, some read
    transposed, scaled: against the same arithmetic in torch (float32 multiply, one rounding)."""
    g = torch.Generator().manual_seed(3)
    parts, chunks, off = [], [], 0
    specs = [
        (torch.float32, 3, 40, False, 1.0),
        (torch.float16, 50, 5, True, 0.5),
        (torch.bfloat16, 4, 300, False, 2.0),
    ]
    specs += [(torch.float64, 600, 2, True, 1.5), (torch.float32, 1, 1, True, 3.0)]
    for dt, r, c, _, _ in specs:
        t = torch.randn(r, c, generator=g, dtype=torch.float64).to(dt)
        n = t.numel() * t.element_size()
        chunks.append((off, t))
        off += -(-n // 16) * 16
    buf = torch.zeros(off, dtype=torch.uint8)
    row = torch.zeros(4000, dtype=torch.bfloat16)
    want = torch.zeros_like(row)
    dst = 7
    for (o, t), (_, _, _, transposed, scale) in zip(chunks, specs):
        view = buf[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        rows, cols = (t.shape[1], t.shape[0]) if transposed else t.shape
        dst_rs = cols + 3  # blocks sit inside wider stacks
        parts.append((view, transposed, dst, dst_rs, scale))
        block = (t.t() if transposed else t).float() * scale
        for i in range(rows):
            want[dst + i * dst_rs : dst + i * dst_rs + cols] = block[i].to(row.dtype)
        dst += rows * dst_rs
    plan = plan_layout(buf, parts, off)
    assert len(plan.groups) == 4  # one launch per source dtype
    dev = triton_device
    out = row.to(dev)
    lay_out_slot(buf.to(dev), out, plan)
    assert torch.equal(out.cpu(), want)


def test_pool_buffers_come_back_only_when_nothing_reads_them(llama_world):
    engine = llama_world.engine(slot_images=True, cpu_cache_size=1, host_pool_buffers=2)
    pool = engine.runner.host_pool
    try:
        a, b, c = (info.adapter_id for info in llama_world.adapters[:3])
        held = engine.adapters.load(a).result(timeout=60)
        assert held.plan is not None and pool.free() == 1
        loaded_b = engine.adapters.load(b).result(timeout=60)  # evicts a from the host cache...
        assert loaded_b.plan is not None and engine.adapters.cached() == [b]
        gc.collect()
        assert pool.free() == 0  # ...but `held` still reads a's buffer: it is not lent again
        loaded_c = engine.adapters.load(c).result(timeout=60)  # no buffer free: a host image instead
        assert loaded_c.plan is None and loaded_c.image is not None
        del held, loaded_b, loaded_c
        engine.adapters.load(a).result(timeout=60)  # evicts c; a's old buffer came back when `held` went
        gc.collect()
        assert pool.free() == 1  # one buffer holds a again, b's came back with its eviction
    finally:
        engine.close()


def test_a_package_larger_than_a_pool_buffer_loads_as_a_host_image(llama_world):
    engine = llama_world.engine(slot_images=True)
    try:
        pool = engine.runner.host_pool
        assert pool.take(pool.nbytes + 1) is None
        small = HostPool(1, 16, pin=False)
        engine.runner.host_pool = small  # every package is larger than 16 bytes
        aid = llama_world.adapters[0].adapter_id
        loaded, row = slot_after_load(engine, aid)
        assert loaded.plan is None and loaded.image is not None and torch.equal(row, loaded.image)
        assert small.free() == 1
    finally:
        engine.close()


def test_an_adapter_that_fails_to_load_keeps_no_buffer(llama_world):
    """A refused adapter's error is remembered (the next request for it gets it at once), but not the
    bytes its load read: else every package that verifies and then fails to decode would pin a pool
    buffer, or its size in memory, for as long as its error is remembered."""
    from node.engine.lora.errors import AdapterIncompatibleError

    engine = llama_world.engine(slot_images=True, max_lora_rank=8)
    pool = engine.runner.host_pool = HostPool(2, 1 << 24, pin=False)  # room for the rank-16 package
    try:
        big = next(info for info in llama_world.adapters if info.rank > 8)
        with pytest.raises(AdapterIncompatibleError, match="above this node's max_lora_rank 8"):
            engine.adapters.load(big.adapter_id).result(timeout=60)
        gc.collect()
        assert pool.free() == 2
        with pytest.raises(AdapterIncompatibleError, match="max_lora_rank"):  # still remembered
            engine.adapters.acquire(big.adapter_id)
    finally:
        engine.close()


def test_the_host_cache_holds_what_the_pool_can(llama_world):
    """Each cached adapter holds a pool buffer, so the cache is bounded by the pool (less one adapter
    decoding and one copying), and the default pool stays within its memory budget."""
    from node.engine.model_runner import HOST_POOL_BUDGET

    small = llama_world.engine(slot_images=True, host_pool_buffers=5, cpu_cache_size=32)
    default = llama_world.engine(slot_images=True, cpu_cache_size=32)
    try:
        assert small.adapters.cpu_cache_size == 3
        pool = default.runner.host_pool
        assert pool.count == 34 and default.adapters.cpu_cache_size == 32  # tiny buffers: the budget is far
        assert pool.count * pool.nbytes <= HOST_POOL_BUDGET
    finally:
        small.close()
        default.close()
