"""What the OpenAI sampling fields cost a decode step, as ratios measured in the same run: rows constrained by a
JSON schema vs free rows, logprobs=5 vs none, penalties vs none, vLLM's allowed_token_ids (4,096 ids, a list of
each row's own) and bad_words (64 words of two tokens, each row's own) vs none; and the grammar's compile time per
schema.

    python bench/sampling.py                     # CPU bench shape (bench/engine.py's "small"), batch 16
    python bench/sampling.py --device cuda       # the same on a GPU (CUDA graphs on: the sampler runs after them)

The base is node.tiny's Llama at the shape of bench/engine.py's CPU default (hidden 512, 4 layers, vocab 32,000),
random weights, with bench/grammar.py's 32,000-token byte-level BPE as its tokenizer (so the grammar masks the
vocabulary a real model has). Every row samples (temperature 1, seeded) and ignores EOS; the guided schema needs
more tokens than are measured, so no row ends while timed. A step time is the median of the decode steps with
all rows running, over --rounds rounds run alternately (so drift on a shared machine hits both sides alike); the
minimum is printed too, as the figure least moved by other processes on a shared machine. Ratios are free rows'
step time / the measured rows' step time: 1.0 costs nothing. No assertions: never run as a test."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8, num_kv_heads=4, vocab_size=32000)
LONG = {  # at least 40 strings: no guided row can finish within the measured steps
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 40}},
    "required": ["items"],
    "additionalProperties": False,
}
COMPILED = {
    "small": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{4}$"},
            "kind": {"enum": ["a", "b", "c"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            "author": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "email": {"type": "string", "format": "email"}},
                "required": ["name"],
            },
            "ok": {"type": "boolean"},
        },
        "required": ["id", "kind", "tags", "author", "ok"],
        "additionalProperties": False,
    },
    "tool-call": {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "properties": {
                "name": {"const": "get_weather"},
                "arguments": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
    },
}


def bpe_tokenizer(vocab: int):
    """bench/grammar.py's byte-level BPE of `vocab` tokens (one recipe for both benches)."""
    spec = importlib.util.spec_from_file_location("bench_grammar", Path(__file__).with_name("grammar.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.tokenizer(vocab)


def build(work: Path) -> Path:
    from node.tiny import init_tiny

    base = init_tiny(work / "base", 0, max_positions=1024, **SHAPE)
    t = time.perf_counter()
    bpe_tokenizer(SHAPE["vocab_size"]).save_pretrained(base)  # replaces node.tiny's ~425-token tokenizer
    print(f"# {SHAPE['vocab_size']}-token BPE tokenizer trained in {time.perf_counter() - t:.1f} s")
    return base


def step_times(engine, make_params, batch: int, steps: int, prompt_len: int, tag: str) -> list[float]:
    """Decode step times (s) of one batch of `batch` rows, while all of them run."""
    from node.engine import GenerationRequest

    g = torch.Generator().manual_seed(1)
    for i in range(batch):
        ids = [1] + torch.randint(300, 30000, (prompt_len - 1,), generator=g).tolist()
        engine.add_request(GenerationRequest(f"{tag}-{i}", None, prompt_token_ids=ids, params=make_params(i)))
    engine.step()  # the prefill
    out = []
    while engine.has_work():
        t = time.perf_counter()
        events, _ = engine.step()
        dt = time.perf_counter() - t
        if len(engine.scheduler.running) + sum(1 for e in events if type(e).__name__ == "FinishEvent") < batch:
            break
        out.append(dt)
        if len(out) >= steps:
            break
    for rid in list(engine.requests):
        engine.abort(rid)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from node.adapters.basemodel import quiet_transformers
    from node.engine import EngineConfig, LLMEngine, SamplingParams
    from node.engine.grammar import Grammars, GuidedSpec

    quiet_transformers()
    work = Path(tempfile.mkdtemp(prefix="bench-sampling-"))
    base = build(work)
    cfg = EngineConfig(
        model_dir=base,
        device=args.device,
        speculative="off",  # a step is one token a row here; bench/spec.py measures speculation
        dtype="float32" if args.device == "cpu" else "bf16",
        num_slots=2,
        max_num_seqs=args.batch,
        max_model_len=512,
        block_size=16,
        num_kv_blocks=args.batch * (args.prompt_len + args.steps + 40) // 16 + args.batch,
    )
    engine = LLMEngine(cfg)
    long = GuidedSpec.from_wire({"type": "json_schema", "schema": LONG})
    g = torch.Generator().manual_seed(7)  # each row its own list, as distinct requests have
    allowed = [tuple(torch.randperm(SHAPE["vocab_size"], generator=g)[:4096].tolist()) for _ in range(args.batch)]
    words = [
        tuple(tuple(w) for w in torch.randint(300, SHAPE["vocab_size"], (64, 2), generator=g).tolist())
        for _ in range(args.batch)
    ]
    mt = args.steps + 8
    sides = {
        "free": lambda i: SamplingParams(max_tokens=mt, temperature=1.0, seed=i, ignore_eos=True),
        "json_schema": lambda i: SamplingParams(max_tokens=mt, temperature=1.0, seed=i, ignore_eos=True, guided=long),
        "logprobs=5": lambda i: SamplingParams(max_tokens=mt, temperature=1.0, seed=i, ignore_eos=True, logprobs=5),
        "penalties": lambda i: SamplingParams(
            max_tokens=mt,
            temperature=1.0,
            seed=i,
            ignore_eos=True,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            repetition_penalty=1.1,
        ),
        "allowed_ids": lambda i: SamplingParams(
            max_tokens=mt, temperature=1.0, seed=i, ignore_eos=True, allowed_token_ids=allowed[i]
        ),
        "bad_words": lambda i: SamplingParams(
            max_tokens=mt, temperature=1.0, seed=i, ignore_eos=True, bad_words=words[i]
        ),
    }
    print(
        f"# device {args.device}, batch {args.batch}, hidden {SHAPE['hidden_size']}, {SHAPE['num_layers']} layers, "
        f"vocab {SHAPE['vocab_size']}, prompt {args.prompt_len}, {args.threads} threads, "
        f"{args.steps} decode steps x {args.rounds} rounds per side"
    )
    step_times(engine, sides["json_schema"], args.batch, 2, args.prompt_len, "warm-g")  # compile, first masks
    step_times(engine, sides["free"], args.batch, 2, args.prompt_len, "warm-f")
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name, make in sides.items():
            times[name] += step_times(engine, make, args.batch, args.steps, args.prompt_len, f"{name}-{r}")
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(f"{'rows':<14}{'median ms':>10}{'min ms':>9}{'steps':>7}{'ratio (median)':>16}{'ratio (min)':>13}  target")
    targets = {"json_schema": ">= 0.85", "logprobs=5": ">= 0.90", "penalties": "", "allowed_ids": "", "bad_words": ""}
    for name in sides:
        print(
            f"{name:<14}{med[name] * 1e3:>10.2f}{best[name] * 1e3:>9.2f}{len(times[name]):>7}"
            f"{med['free'] / med[name]:>16.3f}{best['free'] / best[name]:>13.3f}  {targets.get(name, '')}"
        )

    grammars = Grammars(engine.tokenizer, SHAPE["vocab_size"], eos_ids=sorted(engine.eos_ids))
    print(f"{'schema':<14}{'compile ms (median of 5, cache defeated)':>42}")
    for name, schema in COMPILED.items():
        runs = []
        for i in range(5):  # a distinct title each time: a new cache key, the same grammar
            spec = GuidedSpec.from_wire({"type": "json_schema", "schema": schema | {"title": f"run-{i}"}})
            t = time.perf_counter()
            grammars.matcher(spec)
            runs.append(time.perf_counter() - t)
        print(f"{name:<14}{statistics.median(runs) * 1e3:>42.2f}")
    engine.close()


if __name__ == "__main__":
    main()
