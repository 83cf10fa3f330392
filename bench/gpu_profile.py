"""Where a decode step's time goes on a GPU (issue 8). Sections (--sections, default step,sweep), one
device call:

  sweep    the LoRA kernels alone, per projection of the shape (qkv, o, gate_up, down) and slot
           pattern (16 adapters x 4 rows, 64 adapters x 1 row), mode (bgmv, sgmv) and launch
           settings; each setting is first checked against a float64 reference, then timed over
           8 layers' worth of weights in turn (so L2 holds none of them, as in a real step), with
           the base GEMM of the same projection as the yardstick
  step     graph replay time of a whole decode step per LoRA mode and pattern (the GPU's share),
           and the engine's step wall time split into its host parts (scheduling, input fill and
           launch, the sampler's wait, bookkeeping)
           (its last part: kernel time of one eager decode step by kind, GEMM, LoRA, attention,
           fused ops, other, and the 40 costliest kernels)
  attention  the paged decode attention alone at the bench's decode shape (mid-decode contexts, the
           bench graph's table width), over 8 layers' caches in turn, per launch setting

    python bench/gpu_profile.py --device cuda                        # the 8B shape: step, sweep
    python bench/gpu_profile.py --device cuda --sections attention
    TRITON_INTERPRET=1 python bench/gpu_profile.py --device cpu --shape tiny --quick   # the script's own check

Writes gpu-profile.json to --out ($OUT on the device machine; one file, as the device tool brings
back at most 8) and prints one line per measurement. Never run as a test."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "bench" / "engine.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def patterns(args) -> dict[str, list[int]]:
    """Slot per row: '16x4' = args.few adapters over the batch in turn (16 x 4 rows on the 8B run),
    '64x1' = every row its own adapter. Keys name the 8B run's shapes, also on the CPU check."""
    t = args.batch
    return {"16x4": [i % args.few for i in range(t)], "64x1": list(range(t))}


def projections(shape: dict) -> dict[str, tuple[int, tuple[int, ...]]]:
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    # the largest first: a sweep cut short by its time budget still covers most of a step's LoRA bytes
    return {"gate_up": (h, (inter, inter)), "down": (inter, (h,)), "qkv": (h, (h, kv, kv)), "o": (h, (h,))}


def candidates(quick: bool) -> dict[str, list[dict]]:
    """Launch settings per (mode, op); 'split' is the kernel's split_k (None = its own rule)."""
    if quick:
        return {
            "bgmv/shrink": [{"BLOCK_K": 32, "split": s} for s in (None, 2)],
            "bgmv/expand": [{"BLOCK_N": 16}, {"BLOCK_N": 32}],
            "sgmv/shrink": [{"BLOCK_K": 32, "split": s} for s in (None, 2)],
            "sgmv/expand": [{"BLOCK_N": 16}, {"BLOCK_N": 32}],
        }
    expand = [
        {"BLOCK_N": n, "num_warps": w}
        for n, w in ((64, 4), (128, 4), (128, 8), (256, 4), (256, 8), (512, 4), (512, 8), (1024, 8))
    ]
    return {
        "bgmv/shrink": [
            {"BLOCK_K": k, "num_warps": w, "split": s}
            for k, w, s in itertools.product((128, 256, 512), (4, 8), (None, 4, 8, 16))
        ],
        "bgmv/expand": expand,
        "sgmv/shrink": [
            {"BLOCK_K": k, "num_warps": w, "split": s}
            for k, w, s in itertools.product((64, 128, 256), (4, 8), (None, 4, 8, 16, 32))
        ],
        "sgmv/expand": expand[:-2],
    }


def make_timer(device: str, quick: bool):
    """ms per call of fn: CUDA-graph replays on a GPU (launch gaps as inside our decode graphs)."""
    if device.startswith("cuda"):
        from triton.testing import do_bench_cudagraph

        return lambda fn: do_bench_cudagraph(fn, rep=3, return_mode="median")

    def cpu(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def sweep(args, report: dict) -> None:
    from node.engine.lora.kernels.triton import TritonLoRAKernel

    dev, dt, t, s, r = args.device, torch.bfloat16, args.batch, args.slots, args.rank
    copies = 8 if dev.startswith("cuda") else 2
    timer = make_timer(dev, args.quick)
    g = torch.Generator(device=dev).manual_seed(3)
    rows: list[dict] = []
    report["sweep"] = rows  # saved as it grows
    cands = candidates(args.quick)
    for proj, (k_in, slices) in projections(bench.SHAPES[args.shape]).items():
        if time.monotonic() > args.deadline:
            print(f"sweep: time budget spent, {proj} and later projections skipped", flush=True)
            break
        n_sl, out = len(slices), sum(slices)
        big_r = n_sl * r
        # 8 layers' worth of slot stacks, rotated through so L2 holds none of them (as in a real step)
        rnd = lambda *shape, sd=1.0: (torch.randn(*shape, generator=g, device=dev) * sd).to(dt)  # noqa: E731
        ws = [(rnd(s + 1, big_r, k_in, sd=0.02), rnd(s + 1, big_r, out, sd=0.02)) for _ in range(copies)]
        base_w = [rnd(out, k_in, sd=0.02) for _ in range(copies)]
        x, y = rnd(t, k_in), rnd(t, out)
        ybuf = torch.empty_like(y)
        gemm_ms = timer(lambda: [torch.mm(x, w.t(), out=ybuf) for w in base_w]) / copies
        gemm_bytes = base_w[0].numel() * 2
        rows.append({"proj": proj, "what": "base GEMM", "ms": gemm_ms, "GBps": gemm_bytes / gemm_ms / 1e6})
        for pat, host_slots in patterns(args).items():
            if pat == "64x1" and s < t:
                continue
            ref_h, ref_y = reference(x, y, ws[0], host_slots, slices, r)
            used = len(set(host_slots))
            lora_bytes = used * r * (n_sl * k_in + out) * 2  # each adapter's A and diagonal B blocks, once
            for mode in ("bgmv", "sgmv"):
                default = TritonLoRAKernel(mode)
                meta = default.static_meta(mode, t, s, dev)
                default.fill(meta, host_slots)
                for op in ("shrink", "expand"):
                    best = None
                    for cfg in [{}] + cands[f"{mode}/{op}"]:
                        cfg = dict(cfg)
                        split = cfg.pop("split", None)
                        kern = TritonLoRAKernel(
                            mode, split_k=split, **({"shrink_cfg": cfg} if op == "shrink" else {"expand_cfg": cfg})
                        )
                        try:
                            err = check(kern, meta, x, y, ws[0], slices, ref_h, ref_y)
                            h = kern.shrink(x, ws[0][0], meta)
                            yy = y.clone()
                            if op == "shrink":
                                ms = timer(lambda: [kern.shrink(x, a, meta, out=h) for a, _ in ws]) / copies
                            else:
                                ms = timer(lambda: [kern.expand(yy, h, b, meta, 0, slices) for _, b in ws]) / copies
                        except Exception as e:  # noqa: BLE001 - a setting that fails to build is reported, not fatal
                            rows.append(
                                {
                                    "proj": proj,
                                    "pattern": pat,
                                    "mode": mode,
                                    "op": op,
                                    "cfg": cfg,
                                    "split": split,
                                    "error": f"{type(e).__name__}: {e}"[:200],
                                }
                            )
                            continue
                        row = {
                            "proj": proj,
                            "pattern": pat,
                            "mode": mode,
                            "op": op,
                            "cfg": cfg,
                            "split": split,
                            "splits_used": h.shape[0],
                            "ms": ms,
                            "rel_err": err,
                        }
                        rows.append(row)
                        if err < 2e-2 and (best is None or ms < best["ms"]):
                            best = row
                    if best is None:
                        print(f"{proj:8s} {pat} {mode} {op:6s}: no setting passed its check", flush=True)
                        continue
                    print(
                        f"{proj:8s} {pat} {mode} {op:6s} default {rows_default(rows, proj, pat, mode, op):.4f} ms, "
                        f"best {best['ms']:.4f} ms {best['cfg']} split {best['split']} "
                        f"(LoRA bytes {lora_bytes / 1e6:.1f} MB; GEMM {gemm_ms:.4f} ms)",
                        flush=True,
                    )
    report["sweep"] = rows


def rows_default(rows, proj, pat, mode, op) -> float:
    return next(
        (
            r["ms"]
            for r in rows
            if r.get("proj") == proj
            and r.get("pattern") == pat
            and r.get("mode") == mode
            and r.get("op") == op
            and r.get("cfg") == {}
            and r.get("split") is None
            and "ms" in r
        ),
        float("nan"),
    )


def reference(x, y, w, host_slots, slices, r):
    """float64 h [T, n*r] and y + delta, with slice i's columns fed only by rank rows of slice i."""
    a, b = w[0].double(), w[1].double()
    xd, yd = x.double(), y.double()
    idx = torch.tensor(host_slots, device=x.device)
    h = torch.einsum("tk,trk->tr", xd, a[idx])
    delta = torch.zeros_like(yd)
    c0 = 0
    for i, n in enumerate(slices):
        rows = slice(i * r, (i + 1) * r)
        delta[:, c0 : c0 + n] = torch.einsum("tr,trn->tn", h[:, rows], b[idx][:, rows, c0 : c0 + n])
        c0 += n
    return h, yd + delta


def check(kern, meta, x, y, w, slices, ref_h, ref_y) -> float:
    h = kern.shrink(x, w[0], meta)
    yy = y.clone()
    kern.expand(yy, h, w[1], meta, 0, slices)
    return max(rel_err(h.sum(0), ref_h), rel_err(yy, ref_y))


def attention(args, report: dict) -> None:
    from node.engine.layers.attention import LayerKV
    from node.engine.layers.triton_attention import paged_decode_attention

    shape = bench.SHAPES[args.shape]
    heads, kvh = shape["num_attention_heads"], shape["num_key_value_heads"]
    d, bs, t, dev = shape["hidden_size"] // heads, 16, args.batch, args.device
    contexts = [args.prompt_len + 1 + (i * 37) % args.new_tokens for i in range(t)]  # mid-decode lengths
    width = -(-(4 * args.prompt_len + 2) // bs)  # bench/engine.py's graph tables: max_model_len 514 on the 8B run
    blocks = t * width + 1
    copies = 8 if dev.startswith("cuda") else 1
    g = torch.Generator(device=dev).manual_seed(11)
    caches = [
        LayerKV(
            torch.randn(blocks, bs, kvh, d, generator=g, device=dev).to(torch.bfloat16),
            torch.randn(blocks, bs, kvh, d, generator=g, device=dev).to(torch.bfloat16),
        )
        for _ in range(copies)
    ]
    perm = torch.randperm(blocks - 1, generator=torch.Generator().manual_seed(12))[: t * width].view(t, width)
    tables = perm.to(dev, torch.int64)
    ctx = torch.tensor(contexts, device=dev, dtype=torch.int64)
    q = torch.randn(t, heads, d, generator=g, device=dev).to(torch.bfloat16)
    out = torch.empty_like(q)
    kv_bytes = sum(contexts) * kvh * d * 2 * 2
    timer = make_timer(dev, args.quick)
    ref = paged_decode_attention(q, caches[0], tables, ctx).double()
    rows = []
    # (positions per step, warps): the default (32, 8) first; registers a thread in triton_attention.py
    for block_n, warps in ((None, None), (16, 8), (16, 4), (64, 8)):
        try:
            err = rel_err(paged_decode_attention(q, caches[0], tables, ctx, block_n=block_n, num_warps=warps), ref)
            ms = (
                timer(
                    lambda: [
                        paged_decode_attention(q, kv, tables, ctx, out=out, block_n=block_n, num_warps=warps)
                        for kv in caches
                    ]
                )
                / copies
            )
        except Exception as e:  # noqa: BLE001 - a setting that fails to build is reported, not fatal
            rows.append({"block_n": block_n, "num_warps": warps, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        rows.append(
            {"block_n": block_n, "num_warps": warps, "ms": ms, "GBps": kv_bytes / ms / 1e6, "rel_err_vs_default": err}
        )
        print(
            f"attention BLOCK_N {block_n or 'default'} warps {warps or 'default'}: {ms * 1e3:.1f} us a layer, "
            f"{kv_bytes / ms / 1e6:,.0f} GB/s (rel err vs default {err:.1e})",
            flush=True,
        )
    report["attention"] = {"kv_MB": kv_bytes / 1e6, "settings": rows}


# ---- the whole engine ----


def build_engine(args, work: Path):
    from node.engine import EngineConfig, LLMEngine
    from node.engine.lora.kernels.triton import TritonLoRAKernel

    ns = SimpleNamespace(device=args.device, shape=args.shape, rank=args.rank)
    base_dir, model, store, account, dtype, cfg = bench.build(ns, work)
    ids = bench.extra_adapters(
        ns, cfg, base_dir, store, account, work, [f"p{i}" for i in range(args.slots)], torch.bfloat16
    )
    weights = dict(model.state_dict())
    del model
    cuda = args.device.startswith("cuda")
    engine = LLMEngine(
        EngineConfig(
            model_dir=base_dir,
            device=args.device,
            speculative="off",  # a step is one token a row here; bench/spec.py measures speculation
            dtype="bf16" if cuda else "float32",
            num_slots=args.slots,
            max_lora_rank=args.rank,
            cpu_cache_size=args.slots,
            max_num_seqs=args.batch,
            max_num_batched_tokens=args.batch * args.prompt_len,
            max_model_len=args.prompt_len + args.new_tokens + 2,
            block_size=16,
            cuda_graphs="auto" if cuda else "static",
        ),
        store=store,
        weights=weights.items(),
        kernel=TritonLoRAKernel(),
    )
    del weights
    engine.adapters.verify_hashes = False
    for aid in ids:
        engine.adapters.load(aid).result()
        engine.adapters.make_resident(aid)
    return engine, ids, cfg


def step_parts(engine):
    """Wrap the engine's step stages with wall-clock timers; returns the dict they fill."""

    parts = {"schedule": [], "forward": [], "sample": [], "modes": [], "batch": []}

    def wrap(obj, name, key):
        fn = getattr(obj, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                parts[key].append(time.perf_counter() - t0)

        setattr(obj, name, timed)

    wrap(engine.scheduler, "schedule", "schedule")
    wrap(engine.runner, "forward", "forward")
    wrap(engine, "_sample", "sample")  # the draw and the one copy of the ids to the host
    kernel = engine.mapping.kernel
    choose = kernel.choose_mode

    def recorded(host_slots):  # which LoRA mode each decode step ran, and its batch
        mode = choose(host_slots)
        parts["modes"].append(mode)
        parts["batch"].append(sum(1 for x in host_slots if x >= 0))
        return mode

    kernel.choose_mode = recorded
    return parts


def run_requests(engine, names, prompts, new_tokens, parts) -> dict:
    from node.engine import GenerationRequest, SamplingParams

    for k in parts:
        parts[k].clear()
    for i, name in enumerate(names):
        engine.add_request(
            GenerationRequest(
                f"q{time.monotonic_ns()}-{i}",
                name,
                prompt_token_ids=prompts[i],
                params=SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True),
            )
        )
    walls = []
    while engine.has_work():
        t0 = time.perf_counter()
        _, did = engine.step()
        if did:
            walls.append(time.perf_counter() - t0)
        else:
            time.sleep(0.001)
    # drop the prefill step (first) and the last (finishing) step
    dec = slice(1, -1)
    med = lambda v: statistics.median(v[dec]) * 1e3 if v[dec] else float("nan")  # noqa: E731 - CPU: no device sampler
    out = {
        "step_ms": med(walls),
        "schedule_ms": med(parts["schedule"]),
        "forward_launch_ms": med(parts["forward"]),
        "sample_wait_ms": med(parts["sample"]),
    }
    out["rest_ms"] = out["step_ms"] - out["schedule_ms"] - out["forward_launch_ms"] - out["sample_wait_ms"]
    out["steps"] = len(walls)
    out["modes"] = {m: parts["modes"].count(m) for m in set(parts["modes"])}
    out["adapter_rows"] = sorted(set(parts["batch"]))
    return out


def replay_ms(engine, bucket: int, mode: str, host_slots: list[int] | None, n: int = 20) -> float:
    """GPU time of one decode step (graph replay, no host work between replays)."""
    graphs = engine.runner.graphs
    kernel = engine.mapping.kernel
    if mode != "base":
        kernel.fill(graphs.lora_meta[(bucket, mode)], host_slots)

    def once():
        if graphs.capture:
            graphs.graphs[(bucket, mode)].replay()
        else:
            graphs._forward(bucket, mode)

    once()
    if not engine.device.type == "cuda":
        t0 = time.perf_counter()
        once()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            once()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)


def step_section(args, engine, ids, report: dict) -> None:
    g = torch.Generator().manual_seed(7)
    t = args.batch
    prompts = torch.randint(3, min(1000, engine.model_cfg.vocab_size), (t, args.prompt_len), generator=g).tolist()
    parts = step_parts(engine)
    slot_of = engine.adapters.slot_of
    systems = {
        "base-only": [None] * t,
        "16 adapters (auto)": [ids[i] for i in patterns(args)["16x4"]],
        "64 distinct (auto)": [ids[i] for i in patterns(args)["64x1"]],
    }
    kernel = engine.mapping.kernel
    res = {}
    for name, names in systems.items():
        run_requests(engine, names, prompts, 8, parts)  # warm-up
        res[name] = run_requests(engine, names, prompts, args.new_tokens, parts)
        print(f"engine step, {name}: {res[name]}", flush=True)
    for mode in ("bgmv", "sgmv"):
        kernel.mode = mode
        for name in ("16 adapters", "64 distinct"):
            names = systems[f"{name} (auto)"]
            run_requests(engine, names, prompts, 4, parts)
            res[f"{name} [{mode}]"] = run_requests(engine, names, prompts, args.new_tokens, parts)
            print(f"engine step, {name} [{mode}]: {res[f'{name} [{mode}]']}", flush=True)
    kernel.mode = None
    report["engine_steps"] = res
    # GPU share: replays of the bucket-64 graphs, inputs of a decode in progress (mid-context)
    names = systems["16 adapters (auto)"]
    from node.engine import GenerationRequest, SamplingParams

    for i, name in enumerate(names):
        engine.add_request(
            GenerationRequest(
                f"rp{i}",
                name,
                prompt_token_ids=prompts[i],
                params=SamplingParams(max_tokens=args.new_tokens // 2 + 2, temperature=0.0, ignore_eos=True),
            )
        )
    for _ in range(args.new_tokens // 2):
        engine.step()
    seqs = list(engine.scheduler.running)
    engine.runner.graphs._fill(seqs, t)
    pats = {name: [slot_of(ids[i]) for i in rows] for name, rows in patterns(args).items()}
    rep = {"base": replay_ms(engine, t, "base", None)}
    for mode in ("bgmv", "sgmv"):
        for pat, slots in pats.items():
            rep[f"{mode} {pat}"] = replay_ms(engine, t, mode, slots)
    report["replay_ms"] = rep
    print(f"graph replay ms (bucket {t}): {rep}", flush=True)
    report["profile"] = profile(engine, t, pats["16x4"])
    while engine.has_work():
        engine.step()


KINDS = (
    ("lora", ("bgmv", "sgmv")),
    ("attention", ("paged_attn", "attention")),
    ("fused ops", ("rms_norm", "rope", "silu", "_add_rms")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "sm90_", "xmma", "cublas", "splitk")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile(engine, bucket: int, slots: list[int]) -> dict:
    """Kernel time by kind for one eager decode step (same kernels as the graph, without its launch gaps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    graphs = engine.runner.graphs
    kernel = engine.mapping.kernel
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    result = {}
    for mode in ("base", "bgmv", "sgmv"):
        if mode != "base":
            kernel.fill(graphs.lora_meta[(bucket, mode)], slots)
        with torch.inference_mode():
            graphs._forward(bucket, mode)
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            with tprofile(activities=acts) as prof:
                for _ in range(3):
                    graphs._forward(bucket, mode)
                if engine.device.type == "cuda":
                    torch.cuda.synchronize()
        by_kind: dict[str, float] = {}
        top = []
        for ev in prof.key_averages():
            us = getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0)
            if us <= 0 or ev.key.startswith("aten::") or ev.key.startswith("cuda"):
                continue
            by_kind[kind_of(ev.key)] = by_kind.get(kind_of(ev.key), 0.0) + us / 3 / 1e3
            top.append((us / 3 / 1e3, ev.count // 3, ev.key[:90]))
        top.sort(reverse=True)
        result[mode] = {
            "by_kind_ms": by_kind,
            "total_kernel_ms": sum(by_kind.values()),
            "top": [{"ms": ms, "count": n, "kernel": k} for ms, n, k in top[:40]],
        }
        print(
            f"kernel time per step, {mode}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(by_kind.items())),
            flush=True,
        )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=sorted(bench.SHAPES), default=None)
    ap.add_argument("--sections", default="step,sweep")
    ap.add_argument("--quick", action="store_true", help="two settings per kernel (the CPU check of this script)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    ap.add_argument("--budget-s", type=float, default=600.0, help="the sweep starts no projection after this")
    args = ap.parse_args()
    args.deadline = time.monotonic() + args.budget_s
    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("llama3-8b" if cuda else "tiny")
    args.batch, args.slots, args.rank = (64, 64, 16) if cuda else (8, 8, 4)
    args.prompt_len, args.new_tokens = (128, 64) if cuda else (8, 6)
    args.out.mkdir(parents=True, exist_ok=True)
    args.few = 16 if cuda else 2
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "shape": args.shape,
        "batch": args.batch,
        "rank": args.rank,
        "torch": torch.__version__,
    }
    path = args.out / "gpu-profile.json"
    t0 = time.perf_counter()
    sections = args.sections.split(",")
    for name in sections:
        try:
            if name == "sweep":
                sweep(args, report)
            elif name == "attention":
                attention(args, report)
            elif name == "step":
                with tempfile.TemporaryDirectory(prefix="gpu-profile-") as work:
                    engine, ids, _ = build_engine(args, Path(work))
                    try:
                        step_section(args, engine, ids, report)
                    finally:
                        engine.close()
        except Exception as e:  # noqa: BLE001 - one device call must bring back every section it can
            import traceback

            traceback.print_exc()
            report.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        report[f"{name}_s"] = time.perf_counter() - t0
        path.write_text(json.dumps(report, indent=1, default=str))
    print(f"total {time.perf_counter() - t0:.0f} s; JSON {path}")


if __name__ == "__main__":
    main()
