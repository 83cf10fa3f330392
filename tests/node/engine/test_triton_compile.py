"""Every Triton kernel compiles for sm_90 (the H200) at the launch configurations the engine uses,
on a machine without a GPU: Triton's ahead-of-time path runs its whole pipeline down to a cubin
with the ptxas it ships. The interpreter skips the type checks of that pipeline, so this catches
what the interpreter tests cannot. Runs in a subprocess without TRITON_INTERPRET."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import itertools, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from node.engine.layers import fused as O, triton_attention as A, triton_util as U
    from node.engine.lora.kernels import slot_layout as S, triton as L, triton_jit as J

    assert not U.INTERPRET
    target = GPUTarget("cuda", 90, 32)
    FLOAT_PTRS = {"x_ptr", "a_ptr", "b_ptr", "y_ptr", "q_ptr", "k_ptr", "v_ptr", "out_ptr"}
    INT_PTRS = {"slot_ptr": "*i32", "tok_ptr": "*i32", "tiles_ptr": "*i32", "cols_ptr": "*i32",
                "tables_ptr": "*i64", "ctx_ptr": "*i64", "h_ptr": "*fp32", "pos_ptr": "*i64"}
    FLOAT_PTRS |= {"res_ptr", "w_ptr", "qkv_ptr", "cos_ptr", "sin_ptr", "gu_ptr"}

    def build(fn, cfg, dt, ptrs=None):  # ptrs: types of pointer arguments that differ from the defaults
        cfg = dict(cfg)
        opts = {"num_warps": cfg.pop("num_warps", 4)}
        sig = {}
        for a in fn.arg_names:
            sig[a] = ("constexpr" if a in cfg else (ptrs or {}).get(a) or ("*" + dt if a in FLOAT_PTRS
                      else INT_PTRS.get(a)) or ("fp32" if a in ("scale", "eps") else "i32"))
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cfg), target=target, options=opts)
        assert k.asm["cubin"], fn.__name__
        print("built", fn.__name__, dt, sorted(cfg.items()))

    for dt, tdt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for r, rank in ((48, 16), (32, 16), (16, 16), (6, 2)):  # fused qkv / gate_up, single, tiny
            build(J._bgmv_shrink_kernel, J.shrink_config("bgmv", r, tdt), dt)
            build(J._sgmv_shrink_kernel, dict(J.shrink_config("sgmv", r, tdt), BLOCK_M=16), dt)
            build(J._bgmv_expand_kernel, J.expand_config("bgmv", rank, tdt), dt)
            build(J._sgmv_expand_kernel, dict(J.expand_config("sgmv", rank, tdt), BLOCK_M=16), dt)
        # an fp8 cache: e4m3 codes and an fp32 scale per (token, kv head); otherwise the scale pointers are the caches
        fp8 = {"k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "ks_ptr": "*fp32", "vs_ptr": "*fp32"}
        plain = {"ks_ptr": "*" + dt, "vs_ptr": "*" + dt}
        for (group, d, bs), bn, kv_fp8 in itertools.product(((4, 128, 16), (2, 32, 8), (3, 24, 5)), (A.BLOCK_N, 16),
                                                             (False, True)):
            build(A._paged_decode_kernel, dict(GROUP=group, GROUP_P=16, HEAD_DIM=d,
                  HEAD_P=max(16, triton.next_power_of_2(d)), CACHE_BLOCK=bs, BLOCK_N=bn, DOT_F32=False,
                  PRECISION="ieee" if dt == "fp32" else "tf32", KV_FP8=kv_fp8, num_warps=A.NUM_WARPS), dt,
                  fp8 if kv_fp8 else plain)
        build(O._rmsnorm_kernel, dict(HAS_RES=True, BLOCK=4096, num_warps=16), dt)
        build(O._rmsnorm_kernel, dict(HAS_RES=False, BLOCK=4096, num_warps=16), dt)
        build(O._rope_cache_kernel, dict(HEADS=32, KV_HEADS=8, HEADS_P=32, KV_P=8, HALF=64, HALF_P=64), dt)
        build(O._silu_mul_kernel, dict(BLOCK=1024), dt)
        layout = {"src_ptr": "*fp32", "dst_ptr": "*" + dt, "jobs_ptr": "*i64", "progs_ptr": "*i32",
                  "scale_ptr": "*fp32"}
        for src in ("fp32", "fp16", "bf16", "fp64"):
            build(S._slot_layout_kernel, dict(R_P=16, BLOCK_K=S.BLOCK_K, TO_BF16=dt == "bf16", num_warps=4), dt,
                  dict(layout, src_ptr="*" + src))
    try:
        L.TritonLoRAKernel().prepare(torch.tensor([0]), 1, [0])
    except U.TritonUnavailableError as e:
        print("refused:", e)
    else:
        raise SystemExit("CPU tensors without the interpreter were not refused")
    print("ALL BUILT")
""")


def test_every_kernel_builds_for_sm90_without_a_gpu():
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "ALL BUILT" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "refused: Triton kernels need CUDA tensors (got cpu), or TRITON_INTERPRET=1 set before import" in proc.stdout
