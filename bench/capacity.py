"""Which Llama-family bases fit one 141 GB GPU (H200) at each --quantization, with the KV cache for a batch of
64 rows at 4k context: arithmetic from the shapes of public configs, no weights needed.

    python bench/capacity.py                    # batch 64, context 4096, 141 GB, 16 adapter slots at rank 16
    python bench/capacity.py --batch 32 --context 8192 --gb 80

Bytes per weight as node/engine/quant.py stores them:
  none  bf16 everywhere (2 B)
  int8  base linears int8 + a bf16 scale per output row; embedding and lm_head the same
  int4  base linears 4-bit + a bf16 (scale, zero) per 128-element group (0.53 B); embedding and lm_head int8
  fp8   base linears e4m3 + an fp32 scale per output row; embedding and lm_head bf16
KV cache: bf16 K and V per layer, num_kv_heads * head_dim each, per token (`--kv-cache-dtype auto`); with
`--kv-cache-dtype fp8` (node/engine/layers/attention.py) e4m3 codes plus an fp32 scale per token and kv head,
(head_dim + 4) / (2 head_dim) of bf16's bytes, in its own column. LoRA slots: bf16 A and B of every projection at the
slots' padded rank. Workspace: a flat reserve for the CUDA context, activations of a 64-row step, the
[64, vocab] fp32 logits, sampling and allocator slack."""

from __future__ import annotations

import argparse

# name: (hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied) from each model's config.json
MODELS = {
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128, 128256, False),
    "Qwen3-14B": (5120, 17408, 40, 40, 8, 128, 151936, False),
    "Qwen2.5-32B": (5120, 27648, 64, 40, 8, 128, 152064, False),
    "Llama-3.1-70B": (8192, 28672, 80, 64, 8, 128, 128256, False),
    "Qwen2.5-72B": (8192, 29568, 80, 64, 8, 128, 152064, False),
    "Mistral-Large-2 (123B)": (12288, 28672, 88, 96, 8, 128, 32768, False),
    "Llama-3.1-405B": (16384, 53248, 126, 128, 8, 128, 128256, False),
}
INT4_GROUP = 128


def sizes(shape) -> dict:
    """Parameter counts: the base linears (with their output rows, for per-row scales), and the vocab tables."""
    h, inter, layers, heads, kv, hd, vocab, tied = shape
    q, kvs = heads * hd, kv * hd
    # (in, out) of each base linear of one layer: qkv fused, o, gate_up fused, down
    linears = [(h, q + 2 * kvs), (q, h), (h, 2 * inter), (inter, h)]
    return {
        "linear_params": layers * sum(i * o for i, o in linears),
        "linear_rows": layers * sum(o for _, o in linears),
        "vocab_params": vocab * h * (1 if tied else 2),
        "vocab_rows": vocab * (1 if tied else 2),
        "norm_params": layers * 2 * h + h,
        "kv_bytes_per_token": layers * 2 * kvs * 2,
        "kv_fp8_bytes_per_token": layers * 2 * kv * (hd + 4),
        "lora_per_rank": layers * sum(n * (i + o) for n, (i, o) in zip((3, 1, 2, 1), linears)),
    }


def weight_bytes(s: dict, scheme: str) -> float:
    lin, rows, voc, vrows = s["linear_params"], s["linear_rows"], s["vocab_params"], s["vocab_rows"]
    norms = 2 * s["norm_params"]
    if scheme == "none":
        return 2 * (lin + voc) + norms
    if scheme == "int8":
        return lin + 2 * rows + voc + 2 * vrows + norms
    if scheme == "int4":
        return lin / 2 + 4 * lin / INT4_GROUP + voc + 2 * vrows + norms
    if scheme == "fp8":
        return lin + 4 * rows + 2 * voc + norms
    raise ValueError(scheme)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=141.0, help="device memory, GB (1e9 bytes)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workspace-gb", type=float, default=6.0)
    args = ap.parse_args()
    tokens = args.batch * args.context
    print(
        f"{args.gb:g} GB device, KV cache for batch {args.batch} x {args.context} tokens (bf16; fp8 KV in brackets), "
        f"{args.slots} LoRA slots at rank {args.rank}, {args.workspace_gb:g} GB workspace"
    )
    schemes = ("none", "int8", "fp8", "int4")
    print(f"| {'base':<24} | {'KV GB':>13} | " + " | ".join(f"{s + ' weights/total':>20}" for s in schemes) + " |")
    print("|" + "-" * 26 + "|" + "-" * 15 + "|" + "|".join("-" * 22 for _ in schemes) + "|")
    largest: dict[str, str] = {}  # models are listed smallest first
    largest_fp8kv: dict[str, str] = {}
    for name, shape in MODELS.items():
        s = sizes(shape)
        kv = s["kv_bytes_per_token"] * tokens
        kv8 = s["kv_fp8_bytes_per_token"] * tokens
        fixed = args.slots * args.rank * s["lora_per_rank"] * 2 + args.workspace_gb * 1e9
        cells = []
        for scheme in schemes:
            w = weight_bytes(s, scheme)
            total = w + kv + fixed
            if total <= args.gb * 1e9:
                largest[scheme] = name
            if total - kv + kv8 <= args.gb * 1e9:
                largest_fp8kv[scheme] = name
            cells.append(f"{w / 1e9:6.1f}/{total / 1e9:6.1f} {'fits' if total <= args.gb * 1e9 else 'no':>4}")
        print(f"| {name:<24} | {kv / 1e9:5.1f} [{kv8 / 1e9:5.1f}] | " + " | ".join(f"{c:>20}" for c in cells) + " |")
    print()
    for scheme in schemes:
        print(
            f"largest that fits at {scheme}: {largest.get(scheme, 'none of these')} "
            f"(with an fp8 KV cache: {largest_fp8kv.get(scheme, 'none of these')})"
        )


if __name__ == "__main__":
    main()
