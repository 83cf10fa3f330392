"""The host side of a cold adapter load at the Llama-3.1-8B shape (a 168 MB float32 package, rank 16
on all 7 projections), with no model and no GPU: store -> decoded adapter, the way a node loaded
it before issue 21's changes and the way it loads now, alternated in one run.

- before: the store re-hashed (and value-checked) the package on every load, and decoding converted
  every tensor to the node's dtype with B's scaling on the host (bf16 here, as on a GPU).
- now: the store's stamp from install says the files are the ones it hashed, and the tensors are
  read in one pass into one buffer (a pinned pool buffer on a GPU), with no host conversion; the
  dtype, scaling and layout work runs on the device (kernels/slot_layout.py), which this CPU
  script does not time.

    python bench/cold_load.py [--rounds 5] [--shape llama3-8b]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from eth_account import Account  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from bench.engine import SHAPES, extra_adapters  # noqa: E402
from node.adapters import AdapterStore, load_lora_buffer  # noqa: E402
from node.engine.config import ModelConfig  # noqa: E402
from node.engine.lora.weights import decode_lora  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of each path")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = LlamaConfig(**SHAPES[args.shape], rms_norm_eps=1e-5, tie_word_embeddings=False)
        base_dir = work / "base"
        cfg.save_pretrained(base_dir)  # config only: packing and verifying need the shapes, not weights
        store = AdapterStore(work / "store")
        account = Account.from_key("0x" + "33" * 32)
        t0 = time.perf_counter()
        (aid,) = extra_adapters(
            SimpleNamespace(rank=args.rank), cfg, base_dir, store, account, work, ["cold"], torch.float32
        )
        print(f"built and installed one package in {time.perf_counter() - t0:.1f} s", flush=True)
        weights = store.path_for(aid) / "adapter_model.safetensors"
        print(f"package: {weights.stat().st_size / 1e6:.1f} MB of float32 tensors", flush=True)
        model_cfg = ModelConfig.from_dir(base_dir)

        def before() -> None:
            os.utime(weights)  # a new mtime: the stamp no longer matches, as if the store had none
            pkg = store.get(aid)  # hashes and value-checks every file
            buf, tensors = load_lora_buffer(pkg)
            decode_lora(aid, pkg.name, tensors, pkg.lora.scaling, model_cfg, args.rank, torch.bfloat16, buffer=buf)

        def now(alloc=None) -> None:
            pkg = store.get(aid)  # the stamp matches: sizes and the signature only
            buf, tensors = load_lora_buffer(pkg, alloc)
            decode_lora(
                aid,
                pkg.name,
                tensors,
                pkg.lora.scaling,
                model_cfg,
                args.rank,
                torch.bfloat16,
                check_values=False,
                buffer=buf,
            )

        # what a pool buffer is: allocated (and, pinned, touched) once at start, then reused
        reused = torch.zeros(weights.stat().st_size, dtype=torch.uint8)

        paths = (("before", before), ("now", now), ("now, reused buffer", lambda: now(lambda n: reused[:n])))
        times: dict[str, list[float]] = {name: [] for name, _ in paths}
        for _, fn in paths:  # warm the page cache and the allocator
            fn()
        for _ in range(args.rounds):
            for name, fn in paths:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"\nstore -> host, median of {args.rounds} alternating rounds ({torch.get_num_threads()} threads):")
        print(f"  before (re-hash, host conversion): {med['before']:8.1f} ms")
        print(f"  now (stamp, one read, no conversion): {med['now']:8.1f} ms")
        print(f"  now, into a reused buffer (as the host pool gives): {med['now, reused buffer']:8.1f} ms")
        print(f"  ratio now/before: {med['now'] / med['before']:.2f}")
        print(f"  ratio now (reused buffer)/before: {med['now, reused buffer'] / med['before']:.2f}")


if __name__ == "__main__":
    main()
