"""Decode step of an adapter ensemble vs one adapter at the same batch (issue 18's target: an ensemble of 2
costs <= 1.2x the step of one adapter), on bench/engine.py's shapes, in one process and one run.

    python bench/ensemble.py                                 # CPU, the "small" shape, batch 16
    python bench/ensemble.py --device cuda --shape llama3-8b

Two random rank-r adapters on every projection (r = --rank, default 8) and their ensemble (weights 0.7 and
0.3: one slot of rank 2r, node/engine/lora/ensemble.py); the engine's slot rank is 2r, so all three rows
run the same kernels on the same padded slots, and what the ratio shows is everything else an ensemble
adds to a step (nothing, by design: it is one adapter to the engine). Rows, each --batch requests of
--steps greedy tokens with EOS ignored, every row its own prompt:
  one adapter   every row on adapter 0
  ensemble      every row on the ensemble of adapters 0 and 1
  base-only     every row without an adapter (for scale)
  one adapter, rank-r slots  every row on adapter 0, on a second engine whose slots are rank r: a node that
                serves no ensembles, so the second ratio printed counts the wider slots too
A step's time is one LLMEngine.step() of a batch that is all decoding (the prefill step is left out); each
figure is the median over --repeats rounds of the round's median step, the rows interleaved in every round
(a busy machine slows all alike). The ratio is ensemble / one adapter from the same run. Never run as a test."""

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

from bench.engine import SHAPES  # noqa: E402
from node.adapters.weights import LORA_TARGETS  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(args, work: Path):
    """A random base (std 0.02) and two random rank-r adapters on every projection, packed into a store."""
    from eth_account import Account
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from node.adapters import AdapterStore, pack_adapter

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    cfg = LlamaConfig(
        **SHAPES[args.shape], rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2
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
    peft_model = get_peft_model(model, lcfg, adapter_name="a0")
    peft_model.add_adapter("a1", lcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    store = AdapterStore(work / "store")
    account = Account.from_key("0x" + "55" * 32)
    ids = []
    for name in ("a0", "a1"):
        out = work / f"peft-{name}"
        peft_model.save_pretrained(out, selected_adapters=[name])
        src = out / name if (out / name).exists() else out
        pkg = pack_adapter(src, work / f"pkg-{name}", name=f"bench/{name}", account=account, base_dir=base_dir)
        store.install(pkg.path)
        ids.append(pkg.adapter_id)
    del peft_model, model
    return base_dir, store, base_sd, ids, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per round")
    ap.add_argument("--rank", type=int, default=8, help="each adapter's rank (the ensemble's is twice it)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.shape = args.shape or ("llama3-8b" if args.device.startswith("cuda") else "small")
    args.out = args.out or Path(__file__).parent / "results" / f"ensemble-{args.device.split(':')[0]}-{args.shape}.json"
    torch.set_num_threads(args.threads)

    from node.adapters.basemodel import quiet_transformers
    from node.engine import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
    from node.engine.lora.ensemble import EnsembleSpec

    quiet_transformers()
    work = Path(tempfile.mkdtemp(prefix="bench-ensemble-"))
    base_dir, store, base_sd, ids, cfg = build(args, work)
    context = args.prompt + args.steps + 8

    def make_engine(slot_rank: int) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model_dir=base_dir,
                device=args.device,
                speculative="off",  # a step is one token a row here; bench/spec.py measures speculation
                dtype="float32" if args.device == "cpu" else "bf16",
                num_slots=4,
                max_lora_rank=slot_rank,
                block_size=16,
                num_kv_blocks=args.batch * (-(-context // 16)) + 16,
                max_num_seqs=args.batch,
                max_num_batched_tokens=args.batch * args.prompt,
                max_model_len=context,
                enable_prefix_caching=False,  # every round would otherwise find its prompts cached
            ),
            store=store,
            weights=base_sd.items(),
        )

    engine = make_engine(2 * args.rank)  # slots wide enough for the ensemble
    narrow = make_engine(args.rank)  # a node that serves no ensemble: slots of its adapters' rank
    ens = engine.adapters.define_ensemble(EnsembleSpec.of([(ids[0], 0.7), (ids[1], 0.3)], names=["a0", "a1"]))
    for e, aid in ((engine, ids[0]), (engine, ens), (narrow, ids[0])):
        e.adapters.load(aid).result(timeout=600)
    g = torch.Generator().manual_seed(7)
    counter = iter(range(1 << 30))

    def step_times(engine: LLMEngine, adapter_id) -> list[float]:
        """Median-able decode step times of one batch on `adapter_id` (None: base-only)."""
        params = SamplingParams(max_tokens=args.steps + 1, temperature=0.0, ignore_eos=True)
        for _ in range(args.batch):
            ids_ = [1] + torch.randint(3, cfg.vocab_size, (args.prompt - 1,), generator=g).tolist()
            engine.add_request(GenerationRequest(f"r{next(counter)}", adapter_id, prompt_token_ids=ids_, params=params))
        times, first = [], True
        while engine.has_work():
            sync(args.device)
            t0 = time.perf_counter()
            engine.step()
            sync(args.device)
            if not first:
                times.append(time.perf_counter() - t0)
            first = False  # the prefill step
        return times

    rows = {
        "one adapter": (engine, ids[0]),
        "ensemble": (engine, ens),
        "base-only": (engine, None),
        "one adapter, rank-r slots": (narrow, ids[0]),
    }
    load_before = os.getloadavg()
    for e, key in rows.values():  # warm-up of each row (slots loaded, first-call costs paid)
        step_times(e, key)
    rounds: dict[str, list[float]] = {label: [] for label in rows}
    for _ in range(args.repeats):
        for label, (e, key) in rows.items():
            rounds[label].append(statistics.median(step_times(e, key)))
    med = {label: statistics.median(v) * 1e3 for label, v in rounds.items()}
    paired = statistics.median(e / o for e, o in zip(rounds["ensemble"], rounds["one adapter"], strict=True))
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": args.device,
        "shape": args.shape,
        "threads": args.threads,
        "batch": args.batch,
        "rank": args.rank,
        "ensemble rank": engine.adapters._cpu[ens].rank,
        "steps": args.steps,
        "repeats": args.repeats,
        "load average before/after": [list(load_before), list(os.getloadavg())],
        "step ms": med,
        "ensemble / one adapter": med["ensemble"] / med["one adapter"],
        "paired ensemble / one adapter": paired,
        "one adapter / base-only": med["one adapter"] / med["base-only"],
        "ensemble / one adapter in rank-r slots": med["ensemble"] / med["one adapter, rank-r slots"],
        "rounds ms": {k: [round(x * 1e3, 3) for x in v] for k, v in rounds.items()},
    }
    engine.close()
    narrow.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"decode step, batch {args.batch}, {args.shape} on {args.device} (median of {args.repeats} rounds):")
    for label, ms in med.items():
        print(f"  {label:26s} {ms:8.3f} ms")
    print(
        f"  ensemble of 2 / one adapter: {report['ensemble / one adapter']:.3f}x "
        f"(paired {paired:.3f}x; target <= 1.2x)   load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(
        f"  ensemble of 2 / one adapter on a node with rank-{args.rank} slots: "
        f"{report['ensemble / one adapter in rank-r slots']:.3f}x (what making room for ensembles costs too)"
    )
    print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()
