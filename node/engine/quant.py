"""Quantized base weights (`--quantization`): the base matmuls of a node read int8, int4 or fp8 weights,
while the residual stream and every LoRA slot stay in the engine's dtype (QLoRA-style serving:
y = base_q(x) + B(A x), with only base_q changed; the LoRA delta reads the unquantized x).

The kernels are torch's own, chosen by measuring on torch 2.13 (bench/engine.py --sections precision):
  int8  int8 [N, K] weight, one scale per output row (symmetric, absmax/127), each token's input quantized
        at each call (W8A8 dynamic, as vLLM's int8 and fp8): on x86 CPUs fbgemm's int8 x int8 GEMM (torch's
        x86 quantized engine), on CUDA torch._int_mm (cuBLAS's int8 GEMM, int32 sums); elsewhere
        aten._weight_int8pack_mm (weight-only, in bf16). Not that one on CUDA: it is written for a few
        rows, and run 4's precision section (bench/h200), which sent it every prefill row, stalled there
        most likely (no figure told int8 and fp8 apart)
  int4  aten._weight_int4pack_mm_for_cpu (CPU) / aten._weight_int4pack_mm (CUDA, tinygemm): 4-bit
        asymmetric groups of INT4_GROUP along K, a bf16 (scale, zero) per group
  fp8   torch._scaled_mm (CUDA, compute capability >= 8.9): e4m3 weights with a scale per output row, the
        activations cast to e4m3 per token on the fly (vLLM's dynamic per-token fp8)
torchao 0.18 (the current release) was measured on torch 2.13 CPU and not taken: its int8 weight-only linear
(Int8Tensor) ran slower than the unquantized one (2752x512, 16 rows: 48 vs 24 ms fp32, 0.35 vs 0.20 ms
bf16), and its int4 config needs a further package (mslk).

Why int8 x int8 on CPUs: a CPU without bf16 arithmetic (AVX2 here) widens every weight back to floats in a
weight-only product, so at decode batch sizes that product is compute-bound and no faster than fp32 (16 rows,
512 -> 1536, one thread: 0.63 ms weight-only, 0.48 ms fp32, 0.22 ms int8 x int8). The cost is the inputs'
rounding (7 bits a token, see ACT_LEVELS): about twice weight-only int8's logit error on the test bases.
The weight-only CPU int8/int4 kernels are fast only for 16-bit activations (fp32 inputs take a path hundreds
of times slower on torch 2.13: 45 ms vs 0.09 ms for 1024x512 at 16 rows), so they run in bf16 and cast their
output back to the engine's dtype.
The embedding table and the output layer (lm_head) are int8 under int8 and int4: on small-hidden bases
they hold most of the bytes, and the output layer stays at 8 bits under int4 because its error goes
straight into the logits (llama.cpp's 4-bit types keep it above 4 bits for the same reason)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

QUANTIZATIONS = ("none", "int8", "int4", "fp8")
INT4_GROUP = 128  # K elements per int4 (scale, zero); smaller groups are used when K is not a multiple
INT4_GROUPS = (128, 64, 32)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper have fp8 tensor cores; _scaled_mm needs them
COMPUTE_DTYPE = torch.bfloat16
# fbgemm's int8 GEMM on CPU; without AVX-512 VNNI it sums pairs of u8 x s8 products in int16, so activations
# take 7 bits (codes 0..127 around ACT_ZERO) and no pair can saturate: 2 x 127 x 127 < 2^15
CPU_INT8_GEMM = "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
    torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"
)
ACT_LEVELS = 63.5  # a token's activations divided by their largest magnitude span [-1, 1] -> codes [0.5, 127.5]
ACT_ZERO = 64
INT_MM_MIN_ROWS = 17  # cuBLAS's int8 GEMM takes more than 16 rows: fewer are padded with zero rows


class QuantizationError(ValueError):
    """This node cannot serve its base at the precision asked for."""


def check_quantization(scheme: str, device: str) -> None:
    """Refuse, in one line, a scheme this build or device cannot run (called when the engine is configured)."""
    if scheme not in QUANTIZATIONS:
        raise QuantizationError(
            f"--quantization {scheme!r} is not supported; expected one of {', '.join(QUANTIZATIONS)}"
        )
    if scheme != "fp8":
        return
    if not device.startswith("cuda"):
        raise QuantizationError(
            f"--quantization fp8 needs an NVIDIA GPU with fp8 tensor cores (Hopper H100/H200, Ada); "
            f"this node runs on {device}: pick int8 (or int4) there"
        )
    if not torch.cuda.is_available():
        raise QuantizationError("--quantization fp8 needs CUDA, and this torch build has no usable CUDA device")
    cap = torch.cuda.get_device_capability(torch.device(device))
    if cap < FP8_MIN_CAPABILITY:
        raise QuantizationError(
            f"--quantization fp8 needs compute capability >= 8.9 (Hopper H100/H200, Ada); "
            f"{torch.cuda.get_device_name(torch.device(device))} is {cap[0]}.{cap[1]}: pick int8"
        )


class QuantWeight(nn.Module):
    """A base weight W [N, K] stored quantized; linear(x) = x W^T in x's dtype. Buffers, not parameters:
    nothing trains them, and .to() or state_dict() still see them."""

    scheme = "none"

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features

    def linear(self, x: torch.Tensor) -> torch.Tensor:  # x [T, K] -> [T, N]
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def linear_alone(self, x: torch.Tensor) -> torch.Tensor:
        """linear() on this rank alone, with no collective (the load's probe runs on one rank)."""
        return self.linear(x)

    def prepare(self) -> None:
        """Lay the weight out as its kernel reads it (once, at load)."""

    def dequantize(self) -> torch.Tensor:
        """W as fp32 [N, K] (tests and error reports)."""
        raise NotImplementedError


class Int8Weight(QuantWeight):
    """Symmetric int8 per output row: W ~= q * scale[:, None], |q| <= 127. Also an embedding table, whose
    rows are the output rows of a tied lm_head (`rows`: the codes stay for lookups).

    linear() is int8 x int8 on CUDA (int8_dynamic_linear) and on x86 CPUs (see the module docstring), and
    weight-only elsewhere (aten._weight_int8pack_mm in bf16). On x86 CPUs prepare() (at load, else the first
    call) packs the codes into fbgemm's layout, which then holds the only copy of them unless the table is
    also looked up."""

    scheme = "int8"

    def __init__(self, w: torch.Tensor, rows: bool = False) -> None:
        super().__init__(*w.shape)
        wf = w.float()
        scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [N]
        self.register_buffer("q", torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(COMPUTE_DTYPE))  # the kernel wants its input's dtype
        self.rows = rows
        self.packed = None  # fbgemm's packed codes and scales, on CPU once prepared
        self.reduce_max = None  # a row-parallel shard's max over the ranks (quantize_columns)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.reduce_max)

    def linear_alone(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, None)

    def _matmul(self, x: torch.Tensor, reduce_max) -> torch.Tensor:
        if x.device.type == "cpu" and CPU_INT8_GEMM:
            return self._cpu_linear(x, reduce_max)
        if x.device.type == "cuda" and self.in_features % 8 == 0 and self.out_features % 8 == 0:
            return int8_dynamic_linear(x, self.q, self.scale, reduce_max)
        y = torch.ops.aten._weight_int8pack_mm(x.to(COMPUTE_DTYPE), self.q, self.scale)  # [T, N]
        return y.to(x.dtype)

    def _cpu_linear(self, x: torch.Tensor, reduce_max) -> torch.Tensor:
        # per token: x = xn * m with m its largest magnitude, xn in [-1, 1] quantized at a fixed step, so
        # one row's codes never depend on the other rows of the batch
        if self.packed is None:
            self.prepare()
        xf = x.float()
        m = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)  # [T, 1]
        if reduce_max is not None:
            reduce_max(m)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            xf / m, 1.0 / ACT_LEVELS, ACT_ZERO, self.packed
        )
        return (y * m).to(x.dtype)

    def prepare(self) -> None:
        if self.packed is not None or not CPU_INT8_GEMM or self.q.device.type != "cpu":
            return
        n = self.out_features
        with warnings.catch_warnings():
            # torch marks its quantized tensor type deprecated, and fbgemm's prepack takes nothing else
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(
                self.q, self.scale.double(), torch.zeros(n, dtype=torch.long), 0
            )
            self.packed = torch.ops.quantized.linear_prepack(qw, None)
        if not self.rows:
            self.q = self.q.new_empty(0)

    def _codes(self) -> torch.Tensor:
        if self.q.numel() or self.packed is None:
            return self.q
        return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    def packed_bytes(self) -> int:
        """fbgemm's copy: the codes, and per output row a column offset (int32) and a scale (fp64)."""
        return 0 if self.packed is None else self.out_features * (self.in_features + 12)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # ids [T] -> [T, K]: only the batch's rows are dequantized
        return self.q[ids].to(dtype) * self.scale[ids].to(dtype)[:, None]

    def dequantize(self) -> torch.Tensor:
        return self._codes().float() * self.scale.float()[:, None]


def int8_dynamic_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, reduce_max=None) -> torch.Tensor:
    """x [T, K] @ (q [N, K] int8 * scale [N])^T with each row of x quantized to int8 by its largest
    magnitude, through torch._int_mm (int32 sums; on CUDA cuBLAS's int8 GEMM, which wants K and N
    multiples of 8). No host sync, so CUDA graphs capture it. `reduce_max(m)` makes a row-parallel
    shard's row maxima the same on every rank, in place, as on CPU."""
    xf = x.float()
    m = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)  # [T, 1]
    if reduce_max is not None:
        reduce_max(m)
    xq = torch.round(xf * (127.0 / m)).clamp_(-127, 127).to(torch.int8)
    rows = xq.shape[0]
    if rows < INT_MM_MIN_ROWS:
        xq = torch.nn.functional.pad(xq, (0, 0, 0, INT_MM_MIN_ROWS - rows))
    acc = torch._int_mm(xq, q.t())[:rows]  # q [N, K] row-major: its transpose is the column-major B cuBLAS takes
    return (acc.float() * (m / 127.0) * scale.float()).to(x.dtype)


def int4_group(in_features: int) -> int | None:
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


class Int4Weight(QuantWeight):
    """Asymmetric 4-bit groups along K: W ~= (q - 8) * scale + zero per (row, group), q in 0..15, packed
    by torch for its tinygemm-style kernels (a layout of the device's own)."""

    scheme = "int4"

    def __init__(self, w: torch.Tensor, name: str = "weight") -> None:
        n, k = w.shape
        super().__init__(n, k)
        g = int4_group(k)
        if g is None or n % 16:
            raise QuantizationError(
                f"quantization int4 cannot pack {name} of shape {n}x{k}: torch's int4 kernels need the output "
                f"size a multiple of 16 and the input size a multiple of 32; pick int8 for this base"
            )
        self.group = g
        wg = w.float().reshape(n, k // g, g)
        lo, hi = wg.amin(-1), wg.amax(-1)  # [N, K/g]
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).reshape(n, k)
        zero = lo + 8.0 * scale  # the kernels compute (q - 8) * scale + zero
        self.register_buffer(
            "scales_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(COMPUTE_DTYPE)
        )
        if w.device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        else:  # the CUDA kernel takes two nibbles per byte, then its own tiled layout
            u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)  # the kernel's K tiling (k % 32 == 0 here)
            packed = torch.ops.aten._convert_weight_to_int4pack(u8, tiles)
        self.register_buffer("packed", packed)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(COMPUTE_DTYPE)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed, self.group, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(xc, self.packed, self.group, self.scales_zeros)
        return y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        # recovered through the kernel itself (the packed layout is torch's): W^T = I W^T
        eye = torch.eye(self.in_features, device=self.packed.device)
        return self.linear(eye).float().t().contiguous()


class Fp8Weight(QuantWeight):
    """e4m3 weights with a scale per output row; activations quantized per token at each call (W8A8
    dynamic, as vLLM's fp8): y = (x_q sx) (w_q sw)^T on the fp8 tensor cores, accumulated in fp32."""

    scheme = "fp8"

    def __init__(self, w: torch.Tensor, name: str = "weight") -> None:
        n, k = w.shape
        super().__init__(n, k)
        if n % 16 or k % 16:
            raise QuantizationError(
                f"quantization fp8 cannot run {name} of shape {n}x{k}: _scaled_mm needs multiples of 16"
            )
        wf = w.float()
        scale = (wf.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)  # [N]
        q = (wf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        self.register_buffer("q_t", q.t())  # [K, N] column-major: the layout _scaled_mm wants for mat2
        self.register_buffer("scale", scale[None, :].contiguous())  # [1, N] fp32

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        sx = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)  # [T, 1]
        xq = (x.float() / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.q_t, scale_a=sx, scale_b=self.scale, out_dtype=COMPUTE_DTYPE)
        return y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.q_t.t().float() * self.scale.t()


def quantize_weight(w: torch.Tensor, scheme: str, name: str = "weight") -> QuantWeight:
    """W [N, K] (on the serving device, any float dtype) -> its quantized form under `scheme`."""
    if scheme == "int8":
        return Int8Weight(w)
    if scheme == "int4":
        return Int4Weight(w, name)
    if scheme == "fp8":
        return Fp8Weight(w, name)
    raise QuantizationError(f"quantization {scheme!r} has no weight format")


def quantize_columns(
    w: torch.Tensor, lo: int, hi: int, scheme: str, name: str = "weight", reduce_max=None
) -> QuantWeight:
    """Columns [lo, hi) of W [N, K] quantized as they are in the whole W (a row-parallel shard under tensor
    parallelism): int8 and fp8 scale each output row over all K, then keep the shard's columns, so the
    shards are the unsharded weight's bits; int4's groups run along K, so the shard is quantized itself.
    `reduce_max` (in place, over the ranks) gives int8 x int8 each token's largest magnitude over the whole
    input, so the shards quantize their columns of it as one device would."""
    if scheme == "int4":
        return Int4Weight(w[:, lo:hi], name)
    qw = quantize_weight(w, scheme, name)
    if isinstance(qw, Int8Weight):
        qw.q = qw.q[:, lo:hi].contiguous()
        qw.reduce_max = reduce_max
    elif isinstance(qw, Fp8Weight):
        qw.q_t = qw.q_t[lo:hi].t().contiguous().t()  # still column-major, as _scaled_mm wants
    qw.in_features = hi - lo
    return qw


_probed: set[tuple[str, str, torch.dtype]] = set()


def probe(weight: QuantWeight, scheme: str, dtype: torch.dtype) -> None:
    """Lay out `weight` for its kernel, and run the scheme's kernel once on this device and activation dtype,
    so a torch build that lacks it fails the load in one line instead of the first request."""
    key = (scheme, weight_device(weight).type, dtype)
    try:
        weight.prepare()
        if key in _probed:
            return
        weight.linear_alone(torch.zeros(1, weight.in_features, dtype=dtype, device=weight_device(weight)))
    except (RuntimeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise QuantizationError(
            f"--quantization {scheme} has no working kernel on {key[1]} in torch {torch.__version__}: {first}"
        ) from e
    _probed.add(key)


def weight_device(weight: QuantWeight) -> torch.device:
    return next(weight.buffers()).device


def vocab_scheme(scheme: str) -> str:
    """The format of the embedding table and lm_head under `scheme`: int8 for int8 and int4 (see the
    module docstring), full precision under fp8 (as vLLM's fp8 leaves them), none under none."""
    return "int8" if scheme in ("int8", "int4") else "none"


def weight_bytes(module: nn.Module) -> int:
    """Resident bytes of a module's weights: parameters and buffers, each counted once, and fbgemm's packed
    int8 weights (held outside torch's buffers)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total + sum(m.packed_bytes() for m in module.modules() if isinstance(m, Int8Weight))
