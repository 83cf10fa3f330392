"""Time to first token with a shared prefix, warm vs cold prefix cache, batch 1 (issue 18's target:
>= 5x lower warm on the CPU bench shape), for one adapter and for base-only requests.

    python bench/prefix.py                                  # CPU, bench/engine.py's "small" shape
    python bench/prefix.py --device cuda --shape llama3-8b

Every request is a --prefix-token prefix followed by a --question-token question, max_tokens 1, greedy:
  cold  a prefix never seen before (a fresh random one each time), on the engine with the cache on
  warm  the same prefix each time, cached by an earlier request, with a new question each time
  off   the warm requests on a second engine built with enable_prefix_caching=False
One warm-up of each kind, then --repeats rounds with the kinds interleaved (a busy machine slows all
three alike); each figure is the median wall time of LLMEngine.generate, which includes scheduling,
the prefix lookup and sampling; "paired" is the median over rounds of each round's cold / warm, and
"best" the fastest cold over the fastest warm (a neighbour's load only ever adds time, and comes and
goes between rounds on a shared machine). The warm and off first tokens
must agree (the cache changes no answer). Never run as a test."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import SHAPES as ENGINE_SHAPES  # noqa: E402
from node.adapters.weights import LORA_TARGETS  # noqa: E402

# bench/engine.py's shapes (its "small" is the CPU bench shape), with the context sized per run here
SHAPES = {
    name: {k: v for k, v in shape.items() if k != "max_position_embeddings"} for name, shape in ENGINE_SHAPES.items()
}
BLOCK = 16


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(args, work: Path):
    """A random base (std 0.02) and one random rank-r adapter on every projection, packed into a store."""
    from eth_account import Account
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from node.adapters import AdapterStore, pack_adapter

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    cfg = LlamaConfig(
        **SHAPES[args.shape],
        max_position_embeddings=max(8192 if args.shape == "llama3-8b" else 0, args.context),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    base_dir = work / "base"
    cfg.save_pretrained(base_dir)  # config only: the weights go to the engine in memory
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    peft_model = get_peft_model(model, lcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    peft_model.save_pretrained(work / "peft")
    store = AdapterStore(work / "store")
    pkg = pack_adapter(
        work / "peft", work / "pkg", name="bench/prefix", account=Account.from_key("0x" + "44" * 32), base_dir=base_dir
    )
    store.install(pkg.path)
    del peft_model, model
    return base_dir, store, base_sd, pkg.adapter_id, cfg


def make_engine(args, base_dir, store, base_sd, caching: bool):
    from node.engine import EngineConfig, LLMEngine

    per_request = -(-args.context // BLOCK)
    return LLMEngine(
        EngineConfig(
            model_dir=base_dir,
            device=args.device,
            dtype="float32" if args.device == "cpu" else "bf16",
            num_slots=2,
            max_lora_rank=args.rank,
            block_size=BLOCK,
            num_kv_blocks=8 * per_request,  # room for several prompts: the warm prefix stays cached
            max_num_seqs=4,
            max_num_batched_tokens=args.context,
            max_model_len=args.context,
            enable_prefix_caching=caching,
        ),
        store=store,
        weights=base_sd.items(),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--prefix", type=int, default=1024, help="tokens of the shared prefix")
    ap.add_argument("--question", type=int, default=16, help="tokens after it, new in every request")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.shape = args.shape or ("llama3-8b" if args.device.startswith("cuda") else "small")
    args.context = args.prefix + args.question + 8
    args.out = args.out or Path(__file__).parent / "results" / f"prefix-{args.device.split(':')[0]}-{args.shape}.json"
    torch.set_num_threads(args.threads)

    from node.adapters.basemodel import quiet_transformers
    from node.engine import GenerationRequest, SamplingParams

    quiet_transformers()
    work = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    base_dir, store, base_sd, aid, cfg = build(args, work)
    on = make_engine(args, base_dir, store, base_sd, caching=True)
    off = make_engine(args, base_dir, store, base_sd, caching=False)
    for e in (on, off):
        e.adapters.load(aid).result(timeout=600)
    g = torch.Generator().manual_seed(7)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()

    counter = iter(range(1 << 30))

    def first_token(engine, adapter_id, ids) -> tuple[float, int]:
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        req = GenerationRequest(f"q{next(counter)}", adapter_id, prompt_token_ids=ids, params=params)
        sync(args.device)
        t0 = time.perf_counter()
        done = engine.generate([req])
        sync(args.device)
        return time.perf_counter() - t0, done[req.request_id].token_ids[0]

    load_before = os.getloadavg()
    rows, agree = {}, True
    for label, key in (("adapter", aid), ("base-only", None)):
        shared = [1] + tokens(args.prefix - 1)
        times = {"cold": [], "warm": [], "off": []}
        first_token(on, key, shared + tokens(args.question))  # caches the shared prefix
        for r in range(args.repeats + 1):  # round 0 is the warm-up of each kind
            t_cold, _ = first_token(on, key, [1] + tokens(args.prefix - 1) + tokens(args.question))
            question = tokens(args.question)
            t_warm, tok_warm = first_token(on, key, shared + question)
            t_off, tok_off = first_token(off, key, shared + question)
            agree &= tok_warm == tok_off
            if r:
                times["cold"].append(t_cold)
                times["warm"].append(t_warm)
                times["off"].append(t_off)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows[label] = {
            "cold ms": med["cold"],
            "warm ms": med["warm"],
            "off ms": med["off"],
            "cold / warm": med["cold"] / med["warm"],
            "off / warm": med["off"] / med["warm"],
            "paired cold / warm": statistics.median(c / w for c, w in zip(times["cold"], times["warm"], strict=True)),
            "best cold / best warm": min(times["cold"]) / min(times["warm"]),
            "best ms": {k: min(v) * 1e3 for k, v in times.items()},
            "runs ms": {k: [round(x * 1e3, 2) for x in v] for k, v in times.items()},
        }
    snap = on.metrics_snapshot()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": args.device,
        "shape": args.shape,
        "threads": args.threads,
        "prefix": args.prefix,
        "question": args.question,
        "block_size": BLOCK,
        "repeats": args.repeats,
        "load average before/after": [list(load_before), list(os.getloadavg())],
        "warm and off first tokens agree": agree,
        "prefix_cache_hits": snap["prefix_cache_hits"],
        "prefix_cache_queries": snap["prefix_cache_queries"],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"TTFT, {args.prefix}-token shared prefix + {args.question}-token question, batch 1, {args.shape} on "
        f"{args.device} ({args.threads} threads), median of {args.repeats}; load {load_before[0]:.2f} -> "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(
        "| requests | cold (ms) | warm (ms) | cache off (ms) | cold / warm | off / warm | paired cold / warm "
        "| best cold / best warm (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(
            f"| {label} | {r['cold ms']:.1f} | {r['warm ms']:.1f} | {r['off ms']:.1f} | "
            f"{r['cold / warm']:.1f}x | {r['off / warm']:.1f}x | {r['paired cold / warm']:.1f}x | "
            f"{r['best cold / best warm']:.1f}x ({r['best ms']['cold']:.0f} / {r['best ms']['warm']:.1f}) |"
        )
    print(
        f"warm and off first tokens agree: {agree}; prefix_cache_hits {snap['prefix_cache_hits']} of "
        f"prefix_cache_queries {snap['prefix_cache_queries']} tokens; JSON: {args.out}"
    )
    on.close()
    off.close()
    if not agree:
        sys.exit("the cached and uncached engines disagree on a first token")


if __name__ == "__main__":
    main()
