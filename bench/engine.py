"""Throughput of our multi-LoRA engine vs PEFT's mixed batch vs transformers base-only, in one process,
on the same random weights, adapters and requests (greedy, EOS ignored, every row its own prompt).

    python bench/engine.py --device cpu                       # 4 layers, hidden 512, 8 adapters, batch 16
    python bench/engine.py --device cuda --shape llama3-8b    # the GPU issue's table (all sections)
    python bench/engine.py --device cpu --shape tiny --sections all   # every section on a toy model

Sections (--sections, comma-separated or "all"; CPU default: throughput, CUDA default: all):
  throughput  ours with N adapters, ours base-only, PEFT mixed batch, transformers base-only (eager)
  distinct    ours with every row on its own adapter (--distinct, 64 on CUDA)
  modes       ours with the LoRA kernel forced to BGMV and to SGMV (Triton kernels only)
  cold        cold load of a 168 MB adapter (store -> host -> slot), alone and under a running batch
  ttft        time to first token, 512-token prompt at batch 1, ours and transformers
  precision   ours with N adapters on the base quantized on load (int8, int4 on CPU; int8, fp8 on CUDA)
              against the full-precision base, and the full-precision base over an fp8 KV cache, every engine
              in the same interleaved rounds: decode tok/s, resident weight bytes, KV bytes a block, greedy
              rows identical; run first, its engines closed before the rest
  hf-static   transformers with a static cache (auto torch.compile on CUDA), base-only; last, as
              its compile is slow

tokens/s = generated tokens / wall time of the whole generate (prefill included); decode tokens/s
= batch * (n - 1) / (t(n tokens) - t(1 token)); step tokens/s = batch / median decode step time
(ours: each engine step; transformers: a logits processor timestamps every step). The floor is
the bytes one decode step must read (weights, active adapters, KV cache) over a device copy
bandwidth measured in the same run. JSON is rewritten after every section. Never run as a test."""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.adapters.weights import LORA_TARGETS, lora_key, module_dims  # noqa: E402

SHAPES = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=1024,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}
TARGETS = list(LORA_TARGETS)  # every projection an adapter may target
PRECISION_PROBE_S = 20.0  # a precision whose first prompt takes longer is reported as such, not measured
SECTIONS = ("precision", "throughput", "distinct", "modes", "cold", "ttft", "hf-static")


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
    """Bytes/s of a device copy (read + write counted), 1 GiB through random data."""
    x = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device, 10)
    return 2 * x.numel() / t


def bandwidth_floor(args, cfg, engine, head_dim: int, with_distinct: bool) -> dict:
    """Step time if a decode step did nothing but read its bytes once at the measured copy bandwidth:
    every weight but the embedding table (a step reads only its batch's rows of it), the adapters in
    use, and the KV cache at the run's mean context length."""
    bw = copy_bandwidth(args.device)
    model = engine.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:  # untied: the embedding table is not the output layer's weight
        emb = model.embed_tokens.weight
        weight_bytes -= emb.numel() * emb.element_size()
    dims = module_dims(cfg.hidden_size, cfg.hidden_size, cfg.num_key_value_heads * head_dim, cfg.intermediate_size)
    adapter_bytes = cfg.num_hidden_layers * sum(args.rank * (i + o) for i, o in dims.values()) * 2  # bf16
    ctx = args.prompt_len + args.new_tokens / 2
    kv_bytes = args.batch * ctx * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2

    def at(n_adapters: int) -> dict:
        step_s = (weight_bytes + n_adapters * adapter_bytes + kv_bytes) / bw
        return {"step_ms": step_s * 1e3, "tokens_per_s": args.batch / step_s}

    floor = {
        "copy_bandwidth_GBps": bw / 1e9,
        "weight_GB": weight_bytes / 1e9,
        "adapter_MB": adapter_bytes / 1e6,
        "kv_GB": kv_bytes / 1e9,
        f"{args.adapters} adapters": at(args.adapters),
        "base-only": at(0),
    }
    if with_distinct:
        floor[f"{args.batch} adapters"] = at(args.batch)
    return floor


def smoke_test(engine, ids, prompts) -> None:
    """A few tokens on every row over all the adapters, in each LoRA mode the kernel has, so a broken
    graph bucket or prefill shape fails here, while the next engine configuration can still be tried."""
    from node.engine import GenerationRequest, SamplingParams

    kernel = engine.mapping.kernel
    modes = ("bgmv", "sgmv", "gemm") if hasattr(kernel, "choose_mode") else (None,)
    saved = getattr(kernel, "mode", None)  # None = chosen per step, which the measured sections must keep
    try:
        for mode in modes:
            if mode is not None:
                kernel.mode = mode
            reqs = [
                GenerationRequest(
                    f"smoke-{mode}-{i}",
                    ids[i % len(ids)],
                    prompt_token_ids=p.tolist(),
                    params=SamplingParams(max_tokens=3, temperature=0.0),
                )
                for i, p in enumerate(prompts)
            ]
            bad = [r.error for r in engine.generate(reqs).values() if r.finish_reason == "error"]
            if bad:
                raise RuntimeError(f"smoke run ({mode or 'torch'}): {bad[0]}")
    finally:
        if modes != (None,):
            kernel.mode = saved


def close_quietly(engine) -> None:
    if engine is not None:
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - it failed already; freeing its memory is what matters
            pass


def release_memory(device: str) -> None:
    """A failed engine's parts point at each other, so only a collection frees them, and the next
    configuration needs the room (an 8B engine holds ~30 GB)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def build(args, work: Path):
    """HF base model and an AdapterStore (adapters are added by add_adapters / extra_adapters)."""
    from eth_account import Account
    from transformers import AutoModelForCausalLM, LlamaConfig

    from node.adapters import AdapterStore

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    cfg = LlamaConfig(
        **SHAPES[args.shape],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
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

    lcfg = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False
    )
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
        shutil.rmtree(out)  # the store holds its copy (16 x 168 MB on the 8B shape)
        shutil.rmtree(pkg.path)
    peft_model.eval()
    return peft_model, ids


def extra_adapters(args, cfg, base_dir: Path, store, account, work: Path, names: list[str], dtype) -> list[str]:
    """PEFT-format adapters written directly (no PEFT model): rank r on all 7 projections, distinct
    contents per name, saved in `dtype` (fp32: the 168 MB adapter of the 8B shape)."""
    from safetensors.torch import save_file

    from node.adapters import pack_adapter

    h, inter, nl = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    dims = module_dims(h, h, kv, inter)
    g = torch.Generator().manual_seed(5)
    shared = {
        t: (torch.randn(args.rank, d_in, generator=g) * 0.02, torch.randn(d_out, args.rank, generator=g) * 0.02)
        for t, (d_in, d_out) in dims.items()
    }
    conf = {
        "peft_type": "LORA",
        "r": args.rank,
        "lora_alpha": 2 * args.rank,
        "target_modules": TARGETS,
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
    }

    def make(i_name):
        i, name = i_name
        folder = work / f"raw-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(nl):
            for t, (a, b) in shared.items():
                f = 1.0 + 0.01 * (i + 1) + 0.001 * layer  # distinct contents, hence distinct ids
                tensors[lora_key(layer, t, "A")] = (a * f).to(dtype).contiguous()
                tensors[lora_key(layer, t, "B")] = (b * f).to(dtype).contiguous()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(conf))
        pkg = pack_adapter(folder, work / f"pkg-{name}", name=f"bench/{name}", account=account, base_dir=base_dir)
        store.install(pkg.path)
        shutil.rmtree(folder)
        shutil.rmtree(pkg.path)
        return pkg.adapter_id

    with ThreadPoolExecutor(max_workers=8) as pool:  # hashing and file writes release the GIL
        return list(pool.map(make, enumerate(names)))


def make_kernel(name: str):
    if name == "torch":
        from node.engine import TorchLoRAKernel

        return TorchLoRAKernel()
    if name == "triton":  # on CPU this needs TRITON_INTERPRET=1 (a smoke test of the GPU path)
        from node.engine.lora.kernels.triton import TritonLoRAKernel

        return TritonLoRAKernel()
    return None  # the engine's default for the device


class StepTimer:
    """A transformers logits processor that timestamps every generation step (after a sync)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def hf_generate(model, prompts: torch.Tensor, new_tokens: int, timer: StepTimer | None = None, **kw) -> list:
    from transformers import LogitsProcessorList

    if timer is not None:
        kw["logits_processor"] = LogitsProcessorList([timer])
    with torch.no_grad():
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kw,
        )
    return out[:, prompts.shape[1] :].tolist()


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--sections", default=None, help=f"comma-separated of {', '.join(SECTIONS)}, or all")
    ap.add_argument("--adapters", type=int, default=None)
    ap.add_argument("--distinct", type=int, default=None, help="adapters of the distinct section (= batch)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--peft-new-tokens", type=int, default=None, help="PEFT's mixed batch is slow: fewer steps")
    ap.add_argument("--hf-new-tokens", type=int, default=None, help="transformers runs")
    ap.add_argument("--ttft-prompt", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--hf-repeats", type=int, default=None, help="rounds of the transformers/PEFT systems")
    ap.add_argument("--print", dest="print_json", type=Path, default=None, help="print the table of a JSON and exit")
    ap.add_argument(
        "--kernel",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="LoRA kernel of our engine (auto: Triton on CUDA, torch on CPU)",
    )
    ap.add_argument("--cuda-graphs", choices=["auto", "off", "static"], default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("llama3-8b" if cuda else "small")
    sec = args.sections or ("all" if cuda else "throughput")
    args.sections = list(SECTIONS) if sec == "all" else [s.strip() for s in sec.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section {bad[0]!r}; expected {', '.join(SECTIONS)} or all")
    args.adapters = args.adapters or (16 if cuda else 8)
    args.batch = args.batch or (64 if cuda else 16)
    args.distinct = args.distinct or args.batch
    args.prompt_len = args.prompt_len or (128 if cuda else 32)
    args.new_tokens = args.new_tokens or (128 if cuda else 32)
    args.peft_new_tokens = args.peft_new_tokens or (8 if cuda else args.new_tokens)
    args.hf_new_tokens = args.hf_new_tokens or (32 if cuda else args.new_tokens)
    args.repeats = args.repeats or 3
    args.hf_repeats = args.hf_repeats or (1 if cuda else args.repeats)
    args.out = args.out or Path(__file__).parent / "results" / f"engine-{args.device.split(':')[0]}-{args.shape}.json"
    return args


def main() -> None:
    args = parse_args()
    if args.print_json is not None:
        print_table(json.loads(args.print_json.read_text()), args.print_json)
        return
    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)

    from node.adapters.basemodel import quiet_transformers
    from node.engine import EngineConfig, GenerationRequest, LLMEngine, SamplingParams

    quiet_transformers()
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    base_dir, model, store, account, dtype, cfg = build(args, work)
    base_model = copy.deepcopy(model)  # transformers base-only, untouched by PEFT
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), generator=g)
    dev_prompts = prompts.to(args.device)
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    # our engine on the same weights (copied from the HF model) and adapters (from the store)
    peft_model, ids = add_adapters(args, model, base_dir, store, account, work)
    distinct_ids: list[str] = []
    if "distinct" in args.sections:
        more = max(0, args.distinct - len(ids))
        distinct_ids = ids + extra_adapters(
            args, cfg, base_dir, store, account, work, [f"d{i}" for i in range(more)], torch.bfloat16
        )
    cold_ids: list[str] = []
    if "cold" in args.sections:  # fp32 files, the size PEFT saves (168 MB for the 8B shape, rank 16)
        cold_ids = extra_adapters(
            args, cfg, base_dir, store, account, work, ["cold-verify", "cold-trust", "cold-live"], torch.float32
        )
    base_sd = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in peft_model.state_dict().items()
        if "lora_" not in k
    }
    max_len = max(args.prompt_len + args.new_tokens, args.ttft_prompt + 1 if "ttft" in args.sections else 0)
    precision_report = None
    if "precision" in args.sections:
        precision_report = precision(args, base_dir, store, ids, base_sd, prompts)
        release_memory(args.device)
    # the cold section's load under a running batch needs a slot that batch does not hold: without one
    # it measured the wait for the batch to end (run 4: 1.1 s, 16 slots all in use), not the load
    n_slots = max(args.adapters, len(distinct_ids)) + ("cold" in args.sections)
    failures = []
    # on a GPU session a failure here must not cost the whole run: fall back to the eager static
    # path, then to the torch kernel without graphs, and say so in the JSON
    attempts = [(args.kernel, args.cuda_graphs)]
    if cuda:
        attempts += [(args.kernel, "static"), ("torch", "off")]
    engine = None
    for kernel_name, graphs in dict.fromkeys(attempts):
        t0 = time.perf_counter()
        try:
            engine = LLMEngine(
                EngineConfig(
                    model_dir=base_dir,
                    device=args.device,
                    speculative="off",  # a step is one token a row here; bench/spec.py measures speculation
                    dtype="float32" if not cuda else "bf16",
                    num_slots=n_slots,
                    max_lora_rank=args.rank,
                    cpu_cache_size=max(n_slots, len(distinct_ids)) + len(cold_ids),
                    max_num_seqs=args.batch,
                    max_num_batched_tokens=args.batch * args.prompt_len,
                    max_model_len=max_len + 1,
                    # the rounds repeat their prompts: cold, so the rows compare with transformers+PEFT
                    enable_prefix_caching=False,
                    block_size=16,
                    cuda_graphs=graphs,
                ),
                store=store,
                weights=base_sd.items(),
                kernel=make_kernel(kernel_name),
            )
            smoke_test(engine, ids, prompts)
            break
        except Exception as e:  # noqa: BLE001 - reported, then the next attempt
            import traceback

            traceback.print_exc()
            failures.append(f"kernel={kernel_name} cuda_graphs={graphs}: {type(e).__name__}: {e}")
            print(f"engine build failed ({failures[-1]}); trying the next configuration", flush=True)
            close_quietly(engine)
            engine = None
        release_memory(args.device)  # outside the except block: the traceback's frames hold the engine too
    if engine is None:
        raise SystemExit("every engine configuration failed: " + " | ".join(failures))
    engine_build_s = time.perf_counter() - t0
    del base_sd
    kernel = engine.mapping.kernel
    engine.adapters.verify_hashes = False  # bulk preload: hashes were checked at install (cold section measures both)
    for aid in dict.fromkeys(ids + distinct_ids):
        engine.adapters.load(aid).result()
    engine.adapters.verify_hashes = True
    setup_s = time.perf_counter() - t_start

    report = {
        "date": datetime.date.today().isoformat(),
        "median_of": args.repeats,
        "device": args.device,
        "shape": args.shape,
        "torch": torch.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "adapters": args.adapters,
        "rank": args.rank,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "peft_new_tokens": args.peft_new_tokens,
        "hf_new_tokens": args.hf_new_tokens,
        "sections": args.sections,
        "kernel": type(kernel).__name__,
        "lora_mode": getattr(kernel, "mode", None) or "per step",
        "cuda_graphs": engine.runner.graphs is not None and engine.runner.graphs.capture,
        "engine_build_s": engine_build_s,
        "setup_s": setup_s,
        "engine_failures": failures,
        "config": {
            "num_slots": n_slots,
            "block_size": 16,
            "max_model_len": max_len + 1,
            "graph_buckets": engine.runner.graphs.buckets if engine.runner.graphs else None,
        },
        "tokens_per_s": {},
        "decode_tokens_per_s": {},
        "step_tokens_per_s": {},
        "step_ms": {},
        "prefill_s": {},
    }
    if cuda:
        import transformers

        report.update(gpu=torch.cuda.get_device_name(), transformers=transformers.__version__)
        try:
            import triton

            report["triton"] = triton.__version__
        except ImportError:
            pass

    if precision_report is not None:
        report["precision"] = precision_report

    def save() -> None:  # write-then-rename: a run killed mid-write keeps the previous JSON whole
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, args.out)

    if cuda:  # first: a section that fails later must not cost the table its floor
        report["floor"] = bandwidth_floor(args, cfg, engine, head_dim, bool(distinct_ids))
        report["tokens_per_s"]["floor (bandwidth)"] = report["floor"][f"{args.adapters} adapters"]["tokens_per_s"]
    save()

    def section(name: str, fn) -> None:
        """Run one section; an exception is recorded in the JSON and the next section still runs."""
        if name not in args.sections:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one GPU run must bring back every section it can
            import traceback

            traceback.print_exc()
            report.setdefault("section_errors", {})[name] = f"{type(e).__name__}: {e}"
            print(f"section {name} failed: {type(e).__name__}: {e}", flush=True)
        save()

    def make_resident(aids) -> None:
        for aid in aids:
            engine.adapters.load(aid).result()
            engine.adapters.make_resident(aid)

    def ours(names, new_tokens=args.new_tokens, batch_prompts=prompts):
        """(wall s, decode step times, outputs) of one engine run; every request fits one prefill step."""
        reqs = [
            GenerationRequest(
                f"r{i}",
                names[i],
                prompt_token_ids=batch_prompts[i].tolist(),
                params=SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True),
            )
            for i in range(len(names))
        ]
        for r in reqs:
            engine.add_request(r)
        done, steps = {}, []
        t_run = time.perf_counter()
        while engine.has_work():
            ts = time.perf_counter()
            events, did = engine.step()
            if not did:
                time.sleep(0.001)
                continue
            steps.append(time.perf_counter() - ts)
            done.update({e.request_id: e for e in events if hasattr(e, "finish_reason")})
        wall = time.perf_counter() - t_run
        bad = [e.error for e in done.values() if e.finish_reason == "error"]
        assert not bad, bad[0]
        return wall, steps[1:], [list(done[f"r{i}"].token_ids) for i in range(len(names))]

    names16 = [ids[i % len(ids)] for i in range(args.batch)]
    peft_names = [f"a{i % args.adapters}" for i in range(args.batch)]
    ours_key, base_key = f"ours, {args.adapters} adapters", "ours, base-only"
    peft_key, hf_key = f"PEFT mixed batch, {args.adapters} adapters", "transformers base-only"

    def measure(systems: dict, rounds: int) -> dict:
        """Interleaved rounds (machine noise hits every system alike): n-token and 1-token runs."""
        out = {k: fn(n)[2] for k, (fn, n) in systems.items()}  # warm-up + outputs
        times = {k: [] for k in systems}
        first = {k: [] for k in systems}
        steps = {k: [] for k in systems}
        for r in range(rounds):
            for k, (fn, n) in systems.items():
                for m, sink in ((n, times), (1, first)):
                    sync(args.device)
                    t0 = time.perf_counter()
                    _, st, _ = fn(m)
                    sync(args.device)
                    sink[k].append(time.perf_counter() - t0)
                    if m == n:
                        steps[k].extend(st)
            print(
                f"round {r + 1}/{rounds}: "
                + ", ".join(f"{k}: {args.batch * systems[k][1] / v[-1]:,.1f}" for k, v in times.items()),
                flush=True,
            )
        for k, (_, n) in systems.items():
            t_all, t_first = statistics.median(times[k]), statistics.median(first[k])
            report["tokens_per_s"][k] = args.batch * n / t_all
            report["decode_tokens_per_s"][k] = args.batch * (n - 1) / max(t_all - t_first, 1e-9)
            report["prefill_s"][k] = t_first
            if steps[k]:
                med = statistics.median(steps[k])
                report["step_ms"][k] = med * 1e3
                report["step_tokens_per_s"][k] = args.batch / med
        return out

    def hf_system(m, names=None):
        def run(n):
            timer = StepTimer(args.device)
            kw = {} if names is None else {"adapter_names": names}
            out = hf_generate(m, dev_prompts, n, timer, **kw)
            return 0.0, timer.steps(), out

        return run

    def throughput() -> None:
        make_resident(ids)
        hf_systems = {
            peft_key: (hf_system(peft_model, peft_names), args.peft_new_tokens),
            hf_key: (hf_system(base_model), args.hf_new_tokens),
        }
        ours_systems = {
            ours_key: (lambda n: ours(names16, n), args.new_tokens),
            base_key: (lambda n: ours([None] * args.batch, n), args.new_tokens),
        }
        if args.hf_repeats == args.repeats:  # the CPU table: every system in the same interleaved rounds
            outputs = measure({**ours_systems, **hf_systems}, args.repeats)
        else:  # CUDA: PEFT's mixed batch takes ~1 s a step, so fewer rounds for transformers
            outputs = measure(ours_systems, args.repeats)
            save()
            outputs.update(measure(hf_systems, args.hf_repeats))
        k = min(args.new_tokens, args.peft_new_tokens)
        same = sum(a[:k] == b[:k] for a, b in zip(outputs[ours_key], outputs[peft_key]))
        report["greedy rows identical to PEFT"] = f"{same}/{args.batch} (first {k} tokens)"

    def distinct() -> None:
        make_resident(distinct_ids[: args.batch])
        key = f"ours, {args.batch} distinct adapters"
        measure(
            {
                key: (
                    lambda n: ours([distinct_ids[i % len(distinct_ids)] for i in range(args.batch)], n),
                    args.new_tokens,
                )
            },
            args.repeats,
        )

    def modes() -> None:
        if not hasattr(kernel, "choose_mode"):
            return
        saved = kernel.mode
        systems = {}
        for mode in ("bgmv", "sgmv"):
            systems[f"{ours_key} [{mode}]"] = (
                lambda n, m=mode: (setattr(kernel, "mode", m), ours(names16, n))[1],
                args.new_tokens,
            )
            if distinct_ids:
                dn = [distinct_ids[i % len(distinct_ids)] for i in range(args.batch)]
                systems[f"ours, {args.batch} distinct [{mode}]"] = (
                    lambda n, m=mode, dn=dn: (setattr(kernel, "mode", m), ours(dn, n))[1],
                    args.new_tokens,
                )
        make_resident(ids)
        try:
            measure(systems, max(1, args.repeats - 1))
        finally:
            kernel.mode = saved

    def cold() -> None:
        report["cold_load"] = cold_load(args, engine, cold_ids, names16, prompts, ours)

    def first_token() -> None:
        report["ttft_ms"] = ttft(args, engine, ids, cfg, peft_model, base_model)

    def hf_static() -> None:
        key = "transformers static cache, base-only"
        timer = StepTimer(args.device)
        t0 = time.perf_counter()
        hf_generate(base_model, dev_prompts, args.hf_new_tokens, cache_implementation="static")  # compiles
        compile_s = time.perf_counter() - t0
        sync(args.device)
        t0 = time.perf_counter()
        hf_generate(base_model, dev_prompts, args.hf_new_tokens, timer, cache_implementation="static")
        sync(args.device)
        wall = time.perf_counter() - t0
        med = statistics.median(timer.steps())
        report["tokens_per_s"][key] = args.batch * args.hf_new_tokens / wall
        report["step_ms"][key], report["step_tokens_per_s"][key] = med * 1e3, args.batch / med
        report["hf_static_first_call_s"] = compile_s

    for name, fn in (
        ("throughput", throughput),
        ("distinct", distinct),
        ("modes", modes),
        ("cold", cold),
        ("ttft", first_token),
        ("hf-static", hf_static),
    ):  # hf-static last: torch.compile takes minutes
        section(name, fn)
        report["ratios"] = ratios(args, report)
    report["total_s"] = time.perf_counter() - t_start
    save()
    print_table(report, args.out)
    engine.close()
    shutil.rmtree(work, ignore_errors=True)


def precision(args, base_dir: Path, store, ids: list[str], base_sd: dict, prompts: torch.Tensor) -> dict:
    """The base quantized on load (node/engine/quant.py) against the full-precision base (fp32 on CPU, bf16 on
    CUDA): one engine per precision on the same weights and adapters, N adapters over the batch, measured in
    lockstep (one step of each engine in turn). Decode tok/s = batch / median decode step (wall; and per CPU
    second of the process, which a shared machine's load disturbs less); weight bytes = the model's resident
    parameters and buffers (quant.weight_bytes)."""
    from node.engine import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
    from node.engine.quant import weight_bytes

    cuda = args.device.startswith("cuda")
    # (row, base quantization, KV cache dtype): the last row is the full-precision base over an fp8 KV cache
    variants = [(q, q, "auto") for q in (["none", "int8", "fp8"] if cuda else ["none", "int8", "int4"])]
    variants.append(("fp8 KV cache", "none", "fp8"))
    out: dict = {"baseline": "bf16" if cuda else "fp32", "errors": {}, "rows": {}}
    max_len = args.prompt_len + args.new_tokens + 1
    blocks = args.batch * -(-max_len // 16) + 8  # every row's blocks, fixed: the engines share the device
    engines = {}
    for q, quantization, kv_dtype in variants:
        try:
            engines[q] = LLMEngine(
                EngineConfig(
                    model_dir=base_dir,
                    device=args.device,
                    speculative="off",  # a step is one token a row here; bench/spec.py measures speculation
                    dtype="bf16" if cuda else "float32",
                    num_slots=args.adapters,
                    max_lora_rank=args.rank,
                    cpu_cache_size=args.adapters,
                    max_num_seqs=args.batch,
                    max_num_batched_tokens=args.batch * args.prompt_len,
                    max_model_len=max_len,
                    enable_prefix_caching=False,  # every precision computes every prompt
                    block_size=16,
                    num_kv_blocks=blocks,
                    cuda_graphs=args.cuda_graphs,
                    quantization=quantization,
                    kv_cache_dtype=kv_dtype,
                ),
                store=store,
                weights=base_sd.items(),
                kernel=make_kernel(args.kernel),
            )
            for aid in ids:
                engines[q].adapters.load(aid).result()
                engines[q].adapters.make_resident(aid)
        except Exception as e:  # noqa: BLE001 - reported; the other precisions still run
            out["errors"][q] = f"{type(e).__name__}: {e}"
            print(f"precision {q}: engine build failed: {out['errors'][q]}", flush=True)
    names = [ids[i % len(ids)] for i in range(args.batch)]

    def run(engine, n: int):
        reqs = [
            GenerationRequest(
                f"p{i}",
                names[i],
                prompt_token_ids=prompts[i].tolist(),
                params=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
            )
            for i in range(args.batch)
        ]
        done = engine.generate(reqs)
        return [list(done[f"p{i}"].token_ids) for i in range(args.batch)]

    tokens = {}
    for q, e in list(engines.items()):  # warm-up and the outputs; timed, as run 4 stalled here with no word
        t0 = time.perf_counter()
        probe = GenerationRequest(
            "probe", names[0], prompt_token_ids=prompts[0].tolist(), params=SamplingParams(max_tokens=2)
        )
        e.generate([probe])  # one prompt first: an engine far too slow to measure is left out, not waited on
        took = time.perf_counter() - t0
        if took > PRECISION_PROBE_S:
            out["errors"][q] = f"one {args.prompt_len}-token prompt took {took:.1f} s (limit {PRECISION_PROBE_S} s)"
            print(f"precision {q}: left out: {out['errors'][q]}", flush=True)
            engines.pop(q).close()
            continue
        tokens[q] = run(e, args.new_tokens)
        print(f"precision {q}: first generate {time.perf_counter() - t0:.1f} s", flush=True)
    # lockstep: one step of each engine in turn, so a burst of load from elsewhere on a shared machine hits
    # every precision alike; the median decode step is robust to the bursts that remain
    wall: dict = {q: [] for q in engines}
    cpu: dict = {q: [] for q in engines}
    for r in range(args.repeats):
        for e in engines.values():
            for i in range(args.batch):
                e.add_request(
                    GenerationRequest(
                        f"s{r}-{i}",
                        names[i],
                        prompt_token_ids=prompts[i].tolist(),
                        params=SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True),
                    )
                )
        first = True
        while any(e.has_work() for e in engines.values()):
            for q, e in engines.items():
                if not e.has_work():
                    continue
                sync(args.device)
                w0, c0 = time.perf_counter(), time.process_time()
                _, did = e.step()
                sync(args.device)
                if did and not first:  # the first step of a round is the prefill
                    wall[q].append(time.perf_counter() - w0)
                    cpu[q].append(time.process_time() - c0)
            first = False
        print(
            f"precision round {r + 1}/{args.repeats}: "
            + ", ".join(f"{q}: {args.batch / statistics.median(wall[q]):,.1f} tok/s" for q in engines),
            flush=True,
        )
    for q, e in engines.items():
        same = sum(a == b for a, b in zip(tokens[q], tokens.get("none", tokens[q])))
        out["rows"][q] = {
            "decode_tokens_per_s": args.batch / statistics.median(wall[q]),
            "decode_tokens_per_cpu_s": args.batch / statistics.median(cpu[q]),
            "step_ms": statistics.median(wall[q]) * 1e3,
            "weight_MB": weight_bytes(e.runner.model) / 1e6,
            "kv_MB_per_block": e.runner._block_bytes() / 1e6,
            "greedy rows identical to the baseline": f"{same}/{args.batch}",
        }
        e.close()
    base = out["rows"].get("none")
    if base:
        for row in out["rows"].values():
            row["decode vs baseline"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            row["decode per CPU s vs baseline"] = row["decode_tokens_per_cpu_s"] / base["decode_tokens_per_cpu_s"]
            row["weight bytes vs baseline"] = row["weight_MB"] / base["weight_MB"]
            row["KV bytes vs baseline"] = row["kv_MB_per_block"] / base["kv_MB_per_block"]
    return out


def ratios(args, report) -> dict:
    """The issue's ratios, on step tokens/s (decode) where present."""
    st = report["step_tokens_per_s"]
    ours_key, base_key = f"ours, {args.adapters} adapters", "ours, base-only"
    out = {}

    def put(name, a, b):
        if a in st and b in st:
            out[name] = st[a] / st[b]

    put("ours / PEFT mixed", ours_key, f"PEFT mixed batch, {args.adapters} adapters")
    put("ours / transformers base-only", ours_key, "transformers base-only")
    put("ours / transformers static cache", ours_key, "transformers static cache, base-only")
    put("ours LoRA / ours base-only", ours_key, base_key)
    put(
        f"ours {args.batch} distinct / ours {args.adapters} adapters", f"ours, {args.batch} distinct adapters", ours_key
    )
    floor = report.get("floor") or {}
    if ours_key in st and f"{args.adapters} adapters" in floor:
        out["ours / floor"] = st[ours_key] / floor[f"{args.adapters} adapters"]["tokens_per_s"]
    # whole-generate ratios (prefill included), the CPU table's figures
    tp = report["tokens_per_s"]
    for name, a, b in (
        ("whole: ours / PEFT mixed", ours_key, f"PEFT mixed batch, {args.adapters} adapters"),
        ("whole: ours / transformers base-only", ours_key, "transformers base-only"),
        ("whole: ours LoRA / ours base-only", ours_key, base_key),
    ):
        if a in tp and b in tp:
            out[name] = tp[a] / tp[b]
    return out


def cold_load(args, engine, cold_ids, names16, prompts, ours) -> dict:
    """Store -> host cache -> slot for a never-seen adapter: alone (with and without re-hashing
    the package), and while a batch decodes (its step times before and during the load)."""
    m = engine.adapters
    out = {"adapter_file_MB": (m.store.path_for(cold_ids[0]) / "adapter_model.safetensors").stat().st_size / 1e6}
    m.verify_hashes = True  # the node's default: hash only files changed since the store hashed them
    for aid, rehash in ((cold_ids[0], True), (cold_ids[1], False)):
        if rehash:  # a new mtime: the install's stamp no longer matches, so this load hashes every file
            os.utime(m.store.path_for(aid) / "adapter_model.safetensors")
        t0 = time.perf_counter()
        m.load(aid).result()
        t_host = time.perf_counter() - t0
        slot = m.acquire(aid)
        while slot is None:  # the copy runs on the side stream
            time.sleep(0.0002)
            slot = m.acquire(aid)
        t_total = time.perf_counter() - t0
        m.release(aid)
        tag = "rehash" if rehash else "trusted store"
        out[f"store->host ms ({tag})"] = t_host * 1e3
        out[f"host->slot ms ({tag})"] = (t_total - t_host) * 1e3
        out[f"store->slot ms ({tag})"] = t_total * 1e3
    # under load: a batch of batch-1 rows decodes; after a few steps the last row asks for a cold adapter
    live = cold_ids[2]
    from node.engine import GenerationRequest, SamplingParams

    n = args.batch - 1
    for i in range(n):
        engine.add_request(
            GenerationRequest(
                f"l{i}",
                names16[i],
                prompt_token_ids=prompts[i].tolist(),
                params=SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True),
            )
        )
    steps: list[tuple[float, float, bool]] = []  # (start, duration, cold adapter resident at the end)
    asked = resident_at = first_token_at = None
    k = 0
    while engine.has_work():
        if k == 10 and asked is None:
            asked = time.perf_counter()
            engine.add_request(
                GenerationRequest(
                    "cold",
                    live,
                    prompt_token_ids=prompts[-1].tolist(),
                    params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                )
            )
        ts = time.perf_counter()
        events, did = engine.step()
        te = time.perf_counter()
        if not did:
            time.sleep(0.0005)
            continue
        k += 1
        res = m.slot_of(live) is not None
        if res and resident_at is None and asked is not None:
            resident_at = te
        if first_token_at is None and any(
            getattr(e, "request_id", "") == "cold" and not hasattr(e, "finish_reason") for e in events
        ):
            first_token_at = te
        steps.append((ts, te - ts, res))
    before = [d for ts, d, _ in steps[1:10]]  # decode steps before the request (step 0 is the prefill)
    during = [d for ts, d, res in steps[10:] if not res]
    out.update(
        {
            "under load: ask->resident ms": None if resident_at is None else (resident_at - asked) * 1e3,
            "under load: ask->first token ms": None if first_token_at is None else (first_token_at - asked) * 1e3,
            "under load: step ms before (median)": statistics.median(before) * 1e3 if before else None,
            "under load: step ms during (median)": statistics.median(during) * 1e3 if during else None,
            "under load: step ms during (max)": max(during) * 1e3 if during else None,
            "under load: steps during load": len(during),
        }
    )
    if before and during:
        out["under load: step time change"] = statistics.median(during) / statistics.median(before) - 1
    return out


def ttft(args, engine, ids, cfg, peft_model, base_model) -> dict:
    """Time to first token of one ttft_prompt-token request (median of repeats after a warm-up)."""
    from node.engine import GenerationRequest, SamplingParams

    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(3, cfg.vocab_size, (1, args.ttft_prompt), generator=g)
    dev_prompt = prompt.to(args.device)
    out = {}

    def one(aid):
        p = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        engine.generate([GenerationRequest("t", aid, prompt_token_ids=prompt[0].tolist(), params=p)])

    reps = max(3, args.repeats)
    out["ours, adapter"] = timed(lambda: one(ids[0]), args.device, reps) * 1e3
    kernel = engine.mapping.kernel
    if hasattr(kernel, "choose_mode"):  # the prefill's LoRA as SGMV tiles, against the dense GEMMs chosen above
        saved, kernel.mode = kernel.mode, "sgmv"
        try:
            out["ours, adapter [sgmv prefill]"] = timed(lambda: one(ids[0]), args.device, reps) * 1e3
        finally:
            kernel.mode = saved
    out["ours, base-only"] = timed(lambda: one(None), args.device, reps) * 1e3
    out["transformers base-only"] = timed(lambda: hf_generate(base_model, dev_prompt, 1), args.device, reps) * 1e3
    out["PEFT, adapter"] = (
        timed(lambda: hf_generate(peft_model, dev_prompt, 1, adapter_names=["a0"]), args.device, reps) * 1e3
    )
    return out


def print_table(report: dict, path: Path) -> None:
    """The table of a (possibly partial) report."""
    r = report
    print()
    print(
        f"{r['shape']} on {r['device']} ({r.get('gpu', str(r['threads']) + ' threads')}), batch {r['batch']}, "
        f"{r['adapters']} adapters rank {r['rank']}, prompt {r['prompt_len']}, {r['new_tokens']} new tokens "
        f"(PEFT {r['peft_new_tokens']}, transformers {r['hf_new_tokens']}); kernel {r['kernel']}, "
        f"CUDA graphs {r['cuda_graphs']}; {r['date']}"
    )
    print(f"| {'what':<46} | {'tokens/s':>10} | {'decode tok/s':>12} | {'step tok/s':>10} | {'step ms':>8} |")
    print(f"|{'-' * 48}|{'-' * 12}|{'-' * 14}|{'-' * 12}|{'-' * 10}|")
    floor = r.get("floor") or {}
    for k, v in r["tokens_per_s"].items():
        d = r["decode_tokens_per_s"].get(k)
        s = r["step_tokens_per_s"].get(k)
        ms = r["step_ms"].get(k)
        if k == "floor (bandwidth)":
            ms = floor[f"{r['adapters']} adapters"]["step_ms"]
        print(
            f"| {k:<46} | {v:>10,.1f} | {f'{d:,.1f}' if d else '':>12} | {f'{s:,.1f}' if s else '':>10} | "
            f"{f'{ms:.2f}' if ms else '':>8} |"
        )
    for k, v in (r.get("ratios") or {}).items():
        print(f"| {k:<46} | {v:>9.2f}x |")
    if floor:
        print(
            f"floor: copy {floor['copy_bandwidth_GBps']:,.0f} GB/s; weights {floor['weight_GB']:.2f} GB, adapter "
            f"{floor['adapter_MB']:.0f} MB, KV {floor['kv_GB']:.2f} GB; "
            + "; ".join(f"{k} {v['tokens_per_s']:,.0f} tok/s" for k, v in floor.items() if isinstance(v, dict))
        )
    prec = r.get("precision")
    if prec:
        vs = "vs " + prec["baseline"]
        title = f"precision ({r['adapters']} adapters)"
        print(
            f"| {title:<24} | {'decode tok/s':>12} | {vs:>8} | {'per CPU s':>9} | {vs:>8} | {'weights MB':>10} | "
            f"{vs:>8} | {'KV ' + vs:>11} | {'greedy = base':>13} |"
        )
        for q, row in prec["rows"].items():
            name = q if q != "none" else f"{prec['baseline']} (none)"
            dec, wb = row.get("decode vs baseline", 0), row.get("weight bytes vs baseline", 0)
            dcpu, same = row.get("decode per CPU s vs baseline", 0), row["greedy rows identical to the baseline"]
            kvb = row.get("KV bytes vs baseline", 0)
            print(
                f"| {name:<24} | {row['decode_tokens_per_s']:>12,.1f} | {dec:>7.2f}x | "
                f"{row['decode_tokens_per_cpu_s']:>9,.1f} | {dcpu:>7.2f}x | {row['weight_MB']:>10,.1f} | "
                f"{wb:>7.3f}x | {kvb:>10.3f}x | {same:>13} |"
            )
        for q, err in prec["errors"].items():
            print(f"precision {q} failed: {err}")
    for k, v in (r.get("cold_load") or {}).items():
        print(f"cold load: {k}: {round(v, 2) if isinstance(v, float) else v}")
    for k, v in (r.get("ttft_ms") or {}).items():
        print(f"TTFT, batch 1: {k}: {v:.1f} ms")
    if "greedy rows identical to PEFT" in r:
        print(f"greedy rows identical to PEFT: {r['greedy rows identical to PEFT']}")
    if r.get("engine_failures"):
        print("engine fallbacks: " + " | ".join(r["engine_failures"]))
    print(
        f"setup {r['setup_s']:.0f} s (engine build {r['engine_build_s']:.0f} s), total {r.get('total_s', 0):.0f} s; "
        f"JSON: {path}"
    )


if __name__ == "__main__":
    main()
