"""Decode step time of the engine at tensor_parallel 2 against 1, in one run, on the same random base and
adapters (greedy, EOS ignored, a mixed batch of base-only rows and every adapter).

    python bench/tensor_parallel.py                  # CPU: TP=1 on 2 threads, TP=1 on 1, TP=2 on 1 each

On CPU the ranks are processes over gloo sharing the host's cores, so this measures the overhead of the
split (two all-reduces per layer, the step's inputs pickled to the worker), not a speed-up: TP pays off only
when each rank has its own device (GPUs) or its own cores and memory bandwidth. Never run as a test."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.engine import GenerationRequest, SamplingParams  # noqa: E402
from tests.utils.engine import make_world  # noqa: E402


def decode_step_ms(engine, world, batch: int, tokens: int, rounds: int) -> float:
    """Median wall time of one decode step (ms) over `rounds` generations of `batch` rows."""
    for a in world.adapters:
        engine.prefetch(a.adapter_id).result(timeout=120)
        engine.make_resident(a.adapter_id)
    ids = [None] + [a.adapter_id for a in world.adapters]
    times: list[float] = []
    for r in range(rounds):
        for i in range(batch):
            engine.add_request(
                GenerationRequest(
                    request_id=f"{r}-{i}",
                    adapter_id=ids[i % len(ids)],
                    prompt_token_ids=[5 + (i + j) % 200 for j in range(16)],
                    params=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
                )
            )
        engine.step()  # the prefill
        while engine.has_work():
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = make_world(
            Path(tmp),
            model_type="llama",
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 3,
            num_layers=args.layers,
            num_heads=8,
            num_kv_heads=4,
        )
        rows = []
        for label, kw in (
            ("TP=1, 2 threads", dict(threads=2)),
            ("TP=1, 1 thread", dict(threads=1)),
            ("TP=2, 1 thread per rank", dict(threads=1, tensor_parallel=2)),
        ):
            e = world.engine(num_slots=len(world.adapters), num_kv_blocks=256, **kw)
            try:
                rows.append((label, decode_step_ms(e, world, args.batch, args.tokens, args.rounds)))
            finally:
                e.close()
        base = rows[0][1]
        print(
            f"llama hidden {args.hidden}, {args.layers} layers, 8 heads / 4 kv, batch {args.batch} "
            f"(base-only + {len(world.adapters)} adapters), fp32 CPU"
        )
        for label, ms in rows:
            print(f"  {label:26s} decode step {ms:7.2f} ms   x{base / ms:.2f} of TP=1 on 2 threads")


if __name__ == "__main__":
    main()
