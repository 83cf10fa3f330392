"""Quantized bases (quant.py) against the full-precision engine on the same tiny random bases and adapters.

The bounds, per scheme, and where they come from:
- One weight: round-to-nearest leaves |W - W_q| <= step / 2, step = row absmax / 127 (int8) or group range
  / 15 (int4); the scales (and int4 zeros) are bf16 and the int4 kernel's output is bf16, which adds at most
  2^-8 (int8) or 2^-7 (int4) of the row's absmax. Asserted element by element.
- The logits: a first-order noise model. Each quantized matrix i perturbs its output by a relative error
  delta_i = ||W - W_q||_F / ||W||_F (measured here from the engine's own weights), and each bf16 cast of
  the activations by u = 2^-9 / sqrt(3) (uniform rounding at half an ulp, 8-bit mantissa). Errors from
  independent roundings add in quadrature and pass through the residual stream and the RMSNorms without
  gain, so the logit error has an rms of about delta = sqrt(sum delta_i^2 + n u^2) times the logits' rms;
  the largest of N such errors is about sqrt(2 ln N) rms. Bound: twice that. On these bases the measured
  maximum is 0.6-0.9 of the model's estimate (int8 about 0.017, int4 about 0.18, logits' rms about 0.23).
  int8 on an x86 CPU also quantizes each matmul's input per token (quant.Int8Weight, fbgemm): a uniform
  rounding of step m / ACT_LEVELS (m the token's largest magnitude) adds a relative error of
  crest / (ACT_LEVELS sqrt(12)) per matrix, crest = m / rms of the token, taken here as the rms over the
  batch's tokens of what each matrix really received (about 2.7, and 5.5 into down_proj, on these bases).
  Measured against the whole model's estimate: 0.55-0.75.
- Top-1: wherever the reference's top-1 margin exceeds twice the measured max error the argmax cannot move,
  so there it must agree everywhere. Overall agreement floors (int8 >= 0.90, int4 >= 0.60; measured
  0.94-0.98 and 0.74-0.81) are low because random tiny bases have nearly flat logits (most margins under
  0.05); trained bases have wider margins and agree more."""

from __future__ import annotations

import math

import pytest
import torch

from node.engine import EngineConfig, quant
from node.engine.config import ModelConfig, ModelConfigError
from node.engine.quant import Int4Weight, Int8Weight, QuantizationError, check_quantization, weight_bytes
from tests.utils.engine import greedy, make_world, preload

BF16_U = 2**-9 / math.sqrt(3)
TOP1_FLOOR = {"int8": 0.90, "int4": 0.60}


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def qworld(request, tmp_path_factory):
    return make_world(tmp_path_factory.mktemp(f"quant-{request.param}"), model_type=request.param)


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [[1] + torch.randint(3, 300, (6 + 3 * i,), generator=g).tolist() for i in range(n)]


def _mixed_batch_logits(world, quantization: str, **kw):
    """All-token prefill logits of one mixed batch (every adapter, base rows, a repeat), and the model."""
    engine = world.engine(quantization=quantization, **kw)
    try:
        preload(engine, [a.adapter_id for a in world.adapters])
        rows = list(world.adapters) + [None, world.adapters[0], None]
        for i, (a, p) in enumerate(zip(rows, _prompts(len(rows)))):
            engine.add_request(greedy(f"r{i}", a.adapter_id if a else None, p, 1))
        seqs, prefill, failed = engine.scheduler.schedule()
        assert prefill and not failed and sorted(s.slot for s in seqs) == [-1, -1, 0, 0, 1, 2, 3]
        assert engine.status()["quantization"] == quantization
        return engine.runner.forward(seqs, True, all_logits=True), engine.runner.model
    finally:
        engine.close()


def _relative_errors(full, quantized) -> list[float]:
    """delta_i of every quantized matrix: the base linears, the embedding and (untied) the lm_head."""
    out = []
    for (_, a), (_, b) in zip(full.lora_layers(), quantized.lora_layers()):
        assert b.weight is None and b.qweight is not None  # no full-precision copy stays resident
        out.append(((a.weight.float() - b.qweight.dequantize()).norm() / a.weight.float().norm()).item())
    pairs = [(full.embed_tokens.weight, quantized.qembed)]
    if full.lm_head is not None:
        pairs.append((full.lm_head.weight, quantized.qhead))
    out += [((w - q.dequantize()).norm() / w.norm()).item() for w, q in pairs]
    return out


def _record_crests(monkeypatch) -> dict[int, float]:
    """{id of an int8 weight: rms over tokens of its inputs' crest factor}, filled as the engine runs."""
    crests: dict[int, float] = {}
    linear = Int8Weight.linear

    def recording(self, x):
        xf = x.float()
        crest = xf.abs().amax(-1) / xf.pow(2).mean(-1).sqrt().clamp(min=1e-30)
        crests[id(self)] = max(crests.get(id(self), 0.0), crest.pow(2).mean().sqrt().item())
        return linear(self, x)

    monkeypatch.setattr(Int8Weight, "linear", recording)
    return crests


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_mixed_batch_stays_within_the_bounds_of_the_full_precision_engine(qworld, scheme, monkeypatch):
    ref, full = _mixed_batch_logits(qworld, "none")
    crests = _record_crests(monkeypatch)
    got, quant_model = _mixed_batch_logits(qworld, scheme)
    deltas = _relative_errors(full, quant_model)
    if scheme == "int8" and quant.CPU_INT8_GEMM:  # int8 x int8: the inputs' rounding too
        assert len(crests) == len(full.lora_layers()) + 1  # every base matrix and the output layer ran
        deltas += [c / (quant.ACT_LEVELS * math.sqrt(12)) for c in crests.values()]
    delta = math.sqrt(sum(d * d for d in deltas) + len(deltas) * BF16_U**2)
    rms = ref.pow(2).mean().sqrt().item()
    bound = 2 * math.sqrt(2 * math.log(ref.numel())) * delta * rms
    err = (got - ref).abs().max().item()
    assert err <= bound, f"{scheme}: max logit error {err:.4f} > bound {bound:.4f}"
    assert err > 0  # the base really is served quantized
    top = ref.topk(2, dim=-1).values
    sure = (top[:, 0] - top[:, 1]) > 2 * err  # rows whose argmax no error of this size can move
    assert torch.equal(got.argmax(-1)[sure], ref.argmax(-1)[sure])
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= TOP1_FLOOR[scheme], f"{scheme}: top-1 agreement {agree:.3f} < {TOP1_FLOOR[scheme]}"
    ratio = weight_bytes(quant_model) / weight_bytes(full)
    assert ratio <= {"int8": 0.30, "int4": 0.20}[scheme], ratio  # fp32 base: int8 ~0.25x, int4 ~0.16x here


def test_static_decode_buffers_serve_a_quantized_base_like_eager_decode(tmp_path_factory):
    """The CUDA graph path's static buffers and Triton LoRA kernels (on CPU: not captured, under the Triton
    interpreter) decode a mixed batch of adapters on an int8 base token for token as the eager path does."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on CUDA the captured-graph tests cover this path")
    from node.engine.lora.kernels.triton import TritonLoRAKernel

    world = make_world(tmp_path_factory.mktemp("quant-static"), model_type="llama")
    a0, a1 = world.adapters[0].adapter_id, world.adapters[3].adapter_id
    rows = [(a0, [1, 5, 6, 7, 8], 3), (a1, [1, 9, 10], 5), (a0, [1, 4, 11, 12], 4), (None, [1, 2], 5)]
    outs = []
    for kw in ({}, {"kernel": TritonLoRAKernel("bgmv"), "cuda_graphs": "static", "max_num_seqs": 4}):
        engine = world.engine(quantization="int8", **kw)
        try:
            preload(engine, [a0, a1])
            done = engine.generate([greedy(f"g{i}", a, p, n) for i, (a, p, n) in enumerate(rows)])
            outs.append({k: ev.token_ids for k, ev in done.items()})
            if kw:
                assert engine.runner.graphs is not None and not engine.runner.graphs.capture
        finally:
            engine.close()
    assert outs[0] == outs[1] and [len(outs[0][f"g{i}"]) for i in range(4)] == [3, 5, 4, 5]


@pytest.mark.parametrize("k", [128, 96, 256])
def test_each_quantized_weight_is_within_half_a_step(k):
    torch.manual_seed(k)
    w = torch.randn(64, k) * 0.05
    absmax = w.abs().amax(1, keepdim=True)
    q8 = Int8Weight(w)
    assert q8.q.dtype == torch.int8 and q8.q.abs().max() <= 127
    assert ((w - q8.dequantize()).abs() <= absmax / 254 + absmax * 2**-8).all()
    q4 = Int4Weight(w)
    g = q4.group
    groups = w.view(64, k // g, g)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(g, dim=1)
    assert ((w - q4.dequantize()).abs() <= step / 2 + absmax * 2**-7).all()
    x = torch.randn(5, k)  # the matmul in fp32 in, fp32 out, as the CPU engine runs
    y, exact = q8.linear(x), x @ q8.dequantize().t()
    assert y.dtype == torch.float32
    if quant.CPU_INT8_GEMM:
        # each input rounded to a step of m / ACT_LEVELS (m: its token's largest magnitude) is off by half a
        # step at most, so output (t, n) is off by at most m_t / (2 ACT_LEVELS) * sum_k |W_q[n, k]|
        m = x.abs().amax(1, keepdim=True)
        bound = m / (2 * quant.ACT_LEVELS) * q8.dequantize().abs().sum(1) + 1e-5 * exact.abs().max()
        assert ((y - exact).abs() <= bound).all()
        assert q8.q.numel() == 0 and weight_bytes(q8) >= 64 * k  # fbgemm holds the only copy of the codes
        rows = Int8Weight(w, rows=True)
        torch.testing.assert_close(rows.linear(x), y)
        assert rows.q.shape == (64, k)  # an embedding table keeps its codes to look rows up
    else:
        torch.testing.assert_close(y, exact, atol=0.02, rtol=0.02)


def test_int4_refuses_a_shape_its_kernels_cannot_pack():
    with pytest.raises(QuantizationError, match="int4 cannot pack layers.0.mlp.down_proj.weight of shape 40x64"):
        Int4Weight(torch.randn(40, 64), "layers.0.mlp.down_proj.weight")


def test_fp8_on_cpu_and_unknown_schemes_are_one_line_errors(tmp_path):
    with pytest.raises(QuantizationError) as e:
        check_quantization("fp8", "cpu")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--quantization fp8 needs an NVIDIA GPU") and "pick int8" in msg
    with pytest.raises(ValueError, match="--quantization 'int3' is not supported; expected one of none, int8"):
        EngineConfig(model_dir=tmp_path, quantization="int3")
    with pytest.raises(QuantizationError, match="fp8 needs"):
        EngineConfig(model_dir=tmp_path, quantization="fp8")


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_a_checkpoint_tensor_already_quantized_is_refused_naming_its_dtype(qworld, dtype):
    from node.engine import TorchLoRAKernel
    from node.engine.loader import CheckpointError, build_model, checkpoint_tensors
    from node.engine.lora.mapping import LoRAMapping

    cfg = ModelConfig.from_dir(qworld.base_dir)
    tensors = [(n, t.to(dtype) if n.endswith("o_proj.weight") else t) for n, t in checkpoint_tensors(qworld.base_dir)]
    with pytest.raises(CheckpointError, match=r"checkpoint tensor model\.layers\.\d+\.self_attn\.o_proj\.weight is "):
        build_model(cfg, LoRAMapping(2, TorchLoRAKernel()), tensors, torch.device("cpu"), torch.float32, "int8")


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "fp8", "compressed-tensors"])
def test_a_checkpoint_saved_quantized_is_refused_naming_its_format(method):
    cfg = dict(
        model_type="llama",
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        quantization_config={"quant_method": method, "bits": 4},
    )
    with pytest.raises(ModelConfigError) as e:
        ModelConfig.from_dict(cfg)
    assert str(e.value).startswith(f"the base checkpoint is saved quantized (quant_method {method!r})")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("rows", [1, 16, 17, 40])
def test_int8_dynamic_linear_is_the_int8_product_of_per_token_codes(rows):
    """CUDA's int8 path (quant.int8_dynamic_linear, torch._int_mm; on CPU here): each row of x rounded to
    int8 at its own scale, the int32 sums exact, padding rows (cuBLAS wants more than 16) dropped."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(rows, 64, generator=g) * torch.linspace(0.01, 10, rows)[:, None]  # each row its own scale
    qw = Int8Weight(w)
    got = quant.int8_dynamic_linear(x, qw.q, qw.scale)
    m = x.double().abs().amax(-1, keepdim=True)
    codes = torch.round(x.double() * 127 / m).clamp(-127, 127)
    want = (codes @ qw.q.double().t()) * (m / 127) * qw.scale.double()
    assert got.shape == (rows, 48) and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # and near the float product: each row's codes err by at most half a step of its largest magnitude
    ref = x.double() @ qw.dequantize().double().t()
    bound = (m / 254) * qw.q.double().abs().sum(-1) * qw.scale.double() + 1e-6
    assert ((got.double() - ref).abs() <= bound).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 64, 2048])
def test_int8_weight_on_cuda_is_the_cpu_int8_product(rows):
    """Int8Weight.linear on CUDA (cuBLAS's int8 GEMM through torch._int_mm) against the same per-token
    product computed on CPU: the int32 sums are exact on both, so they part by float rounding alone."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4096, 1024, generator=g)
    x = torch.randn(rows, 1024, generator=g)
    qw = Int8Weight(w)
    want = quant.int8_dynamic_linear(x, qw.q, qw.scale)
    got = Int8Weight(w.cuda()).linear(x.cuda().to(torch.bfloat16))
    torch.testing.assert_close(got.float().cpu(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())
