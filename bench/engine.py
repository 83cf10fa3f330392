"""Throughput of our multi-LoRA engine vs PEFT's mixed batch vs transformers base-only, in one process,
on the same random weights, adapters and requests (greedy, EOS ignored, every row its own prompt).

    python bench/engine.py --device cpu                       # 4 layers, hidden 512, 8 adapters, batch 16
    python bench/engine.py --device cuda --shape llama3-8b    # batch 64, 16 adapters, rank 16, bf16

Prints a table (tokens/s = generated tokens / wall time of the whole generate, prefill included) and
writes JSON. Never run as a test."""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median wall seconds of fn() after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device copy (read + write counted)."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device, 5)
    return 2 * x.numel() / t


def build(args, work: Path):
    """HF base model, PEFT model with N adapters, and an AdapterStore holding the same adapters."""
    from eth_account import Account
    from transformers import AutoModelForCausalLM, LlamaConfig

    from node.adapters import AdapterStore

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    cfg = LlamaConfig(**SHAPES[args.shape], rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    base_dir = work / "base"
    cfg.save_pretrained(base_dir)  # config only: weights go to our engine in memory
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.eval()
    store = AdapterStore(work / "store")
    account = Account.from_key("0x" + "33" * 32)
    return base_dir, model, store, account, dtype, cfg


def add_adapters(args, model, base_dir: Path, store, account, work: Path):
    """Wrap `model` with PEFT and N random adapters; pack each into the store. Returns (peft model, ids)."""
    from peft import LoraConfig, get_peft_model

    from node.adapters import pack_adapter

    lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0,
                      init_lora_weights=False)
    peft_model = get_peft_model(model, lcfg, adapter_name="a0")
    for i in range(1, args.adapters):
        peft_model.add_adapter(f"a{i}", lcfg)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ids = []
    for i in range(args.adapters):
        out = work / f"peft-a{i}"
        peft_model.save_pretrained(out, selected_adapters=[f"a{i}"])
        src = out / f"a{i}" if (out / f"a{i}").exists() else out
        pkg = pack_adapter(src, work / f"pkg-a{i}", name=f"bench/a{i}", account=account, base_dir=base_dir)
        store.install(pkg.path)
        ids.append(pkg.adapter_id)
    peft_model.eval()
    return peft_model, ids


def hf_generate(model, prompts: torch.Tensor, new_tokens: int, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kw)[:, prompts.shape[1]:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--adapters", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("llama3-8b" if cuda else "small")
    args.adapters = args.adapters or (16 if cuda else 8)
    args.batch = args.batch or (64 if cuda else 16)
    args.prompt_len = args.prompt_len or (128 if cuda else 32)
    args.new_tokens = args.new_tokens or (64 if cuda else 32)
    args.repeats = args.repeats or 3
    args.out = args.out or Path(__file__).parent / "results" / f"engine-{args.device.split(':')[0]}-{args.shape}.json"
    torch.set_num_threads(args.threads)

    from node.basemodel import quiet_transformers
    from node.engine import EngineConfig, GenerationRequest, LLMEngine, SamplingParams

    quiet_transformers()
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    base_dir, model, store, account, dtype, cfg = build(args, work)
    base_model = copy.deepcopy(model)  # transformers base-only, untouched by PEFT
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), generator=g)
    dev_prompts = prompts.to(args.device)
    n_tokens = args.batch * args.new_tokens

    # our engine on the same weights (copied from the HF model) and adapters (from the store)
    peft_model, ids = add_adapters(args, model, base_dir, store, account, work)
    base_sd = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in peft_model.state_dict().items() if "lora_" not in k}
    max_len = args.prompt_len + args.new_tokens
    engine = LLMEngine(EngineConfig(model_dir=base_dir, device=args.device, dtype="float32" if not cuda else "bf16",
                                    num_slots=args.adapters, max_lora_rank=args.rank, cpu_cache_size=args.adapters,
                                    max_num_seqs=args.batch, max_num_batched_tokens=args.batch * args.prompt_len,
                                    max_model_len=max_len + 1, block_size=16),
                       store=store, weights=base_sd.items())
    for aid in ids:
        engine.adapters.load(aid).result()

    def ours(names=None, new_tokens=args.new_tokens):
        reqs = [GenerationRequest(f"r{i}", ids[i % len(ids)] if names is None else names[i],
                                  prompt_token_ids=prompts[i].tolist(),
                                  params=SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
                for i in range(args.batch)]
        done = engine.generate(reqs)
        return [list(done[f"r{i}"].token_ids) for i in range(args.batch)]

    names = [f"a{i % args.adapters}" for i in range(args.batch)]
    systems = {
        f"ours, {args.adapters} adapters": lambda n: ours(None, n),
        "ours, base-only": lambda n: ours([None] * args.batch, n),
        f"PEFT mixed batch, {args.adapters} adapters":
            lambda n: hf_generate(peft_model, dev_prompts, n, adapter_names=names).tolist(),
        "transformers base-only": lambda n: hf_generate(base_model, dev_prompts, n),
    }
    outputs = {k: fn(args.new_tokens) for k, fn in systems.items()}  # warm-up + the agreement check
    times = {k: [] for k in systems}
    first = {k: [] for k in systems}  # one new token: prefill (time to first token of the batch)
    for r in range(args.repeats):  # interleaved rounds: machine noise hits every system alike
        for k, fn in systems.items():
            for n, sink in ((args.new_tokens, times), (1, first)):
                sync(args.device)
                t0 = time.perf_counter()
                fn(n)
                sync(args.device)
                sink[k].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k}: {n_tokens / v[-1]:,.1f}" for k, v in times.items()),
              flush=True)
    t_all = {k: statistics.median(v) for k, v in times.items()}
    t_first = {k: statistics.median(v) for k, v in first.items()}
    results = {k: n_tokens / t for k, t in t_all.items()}
    decode = {k: args.batch * (args.new_tokens - 1) / max(t_all[k] - t_first[k], 1e-9) for k in t_all}
    same = sum(a == b for a, b in zip(outputs[f"ours, {args.adapters} adapters"],
                                      outputs[f"PEFT mixed batch, {args.adapters} adapters"]))

    floor = None
    if cuda:
        bw = copy_bandwidth(args.device)
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
        lora_bytes = args.adapters * sum(
            (layer.lora_a[0].numel() + sum(b[0].numel() for b in layer.lora_b)) * 2
            for _, layer in engine.runner.model.lora_layers())
        ctx = args.prompt_len + args.new_tokens / 2
        kv_bytes = args.batch * ctx * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (
            cfg.hidden_size // cfg.num_attention_heads) * 2
        step_s = (weight_bytes + lora_bytes + kv_bytes) / bw
        floor = {"copy_bandwidth_GBps": bw / 1e9, "step_ms": step_s * 1e3, "tokens_per_s": args.batch / step_s}
        results["floor (bandwidth)"] = floor["tokens_per_s"]

    ours_key = f"ours, {args.adapters} adapters"
    peft_key = f"PEFT mixed batch, {args.adapters} adapters"
    report = {
        "date": datetime.date.today().isoformat(), "median_of": args.repeats, "device": args.device, "shape": args.shape,
        "torch": torch.__version__, "threads": args.threads, "batch": args.batch, "adapters": args.adapters,
        "rank": args.rank, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "tokens_per_s": results, "decode_tokens_per_s": decode, "prefill_s": t_first, "floor": floor,
        "ratios": {"ours / PEFT mixed": results[ours_key] / results[peft_key],
                   "ours / transformers base-only": results[ours_key] / results["transformers base-only"],
                   "ours LoRA / ours base-only": results[ours_key] / results["ours, base-only"]},
        "decode_ratios": {"ours / PEFT mixed": decode[ours_key] / decode[peft_key],
                          "ours / transformers base-only": decode[ours_key] / decode["transformers base-only"],
                          "ours LoRA / ours base-only": decode[ours_key] / decode["ours, base-only"]},
        "greedy rows identical to PEFT": f"{same}/{args.batch}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print()
    print(f"{args.shape} on {args.device} ({args.threads} threads), batch {args.batch}, {args.adapters} adapters "
          f"rank {args.rank}, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"| {'what':<34} | {'tokens/s':>10} | {'decode tokens/s':>15} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 17}|")
    for k, v in results.items():
        d = decode.get(k)
        print(f"| {k:<34} | {v:>10,.1f} | {f'{d:,.1f}' if d else '':>15} |")
    for k, v in report["ratios"].items():
        print(f"| {k:<34} | {v:>9.2f}x | {report['decode_ratios'][k]:>14.2f}x |")
    print(f"greedy rows identical to PEFT: {same}/{args.batch}; JSON: {args.out}")
    engine.close()


if __name__ == "__main__":
    main()
