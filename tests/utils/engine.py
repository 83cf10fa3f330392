"""Factories for engine tests: a tiny base plus adapters of different ranks and targets, packed
into an AdapterStore, and the transformers + PEFT reference run one adapter at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from eth_account import Account

from node.adapters import AdapterStore
from node.engine import EngineConfig, GenerationRequest, LLMEngine, SamplingParams
from tests.utils.factories import make_base, make_package, make_peft_adapter

PUBLISHER_KEY = "0x" + "22" * 32
# (name, rank, alpha, targets, use_rslora): every target appears, ranks differ
ADAPTER_SPECS = (
    ("qv-r4", 4, 8.0, ("q_proj", "v_proj")),
    ("ko-r8", 8, 16.0, ("k_proj", "o_proj")),
    ("mlp-r16", 16, 8.0, ("gate_proj", "up_proj", "down_proj")),
    ("all-r2", 2, 4.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
)


@dataclass
class AdapterInfo:
    adapter_id: str
    name: str
    peft_dir: Path
    rank: int


@dataclass
class EngineWorld:
    base_dir: Path
    store: AdapterStore
    adapters: list[AdapterInfo]

    def config(self, **kwargs) -> EngineConfig:
        """Engine config over this base (small KV cache and 4 slots unless given)."""
        kwargs.setdefault("num_kv_blocks", 96)
        kwargs.setdefault("block_size", 8)
        kwargs.setdefault("num_slots", 4)
        return EngineConfig(model_dir=self.base_dir, **kwargs)

    def engine(self, *, kernel=None, fetcher=None, **kwargs) -> LLMEngine:
        """A synchronous engine over this base and store."""
        return LLMEngine(self.config(**kwargs), store=self.store, kernel=kernel, fetcher=fetcher)


def make_world(
    root: Path, *, model_type: str = "llama", specs=ADAPTER_SPECS, seed: int = 0, **base_kwargs
) -> EngineWorld:
    """A tiny base of `model_type` and one packed, installed adapter per spec."""
    kw = dict(model_type=model_type, qkv_bias=False)
    kw.update(base_kwargs)
    base = make_base(root / f"base-{model_type}", seed=seed, **kw)
    store = AdapterStore(root / "store")
    account = Account.from_key(PUBLISHER_KEY)
    infos = []
    for i, (name, rank, alpha, targets) in enumerate(specs):
        peft_dir = make_peft_adapter(
            base, root / f"peft-{name}", rank=rank, alpha=alpha, targets=targets, seed=100 + i, std=0.08
        )
        pkg = make_package(base, root / f"pkg-{name}", account=account, name=f"test/{name}", peft_dir=peft_dir)
        store.install(pkg.path)
        infos.append(AdapterInfo(pkg.adapter_id, name, peft_dir, rank))
    return EngineWorld(base, store, infos)


def reference_model(world: EngineWorld):
    """transformers + PEFT with every adapter loaded under its name (run one at a time)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world.base_dir, dtype=torch.float32).eval()
    first, *rest = world.adapters
    model = PeftModel.from_pretrained(base, str(first.peft_dir), adapter_name=first.name)
    for a in rest:
        model.load_adapter(str(a.peft_dir), adapter_name=a.name)
    return model.eval()


@torch.no_grad()
def reference_logits(model, adapter_name: str | None, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] logits of one prompt under one adapter (None = base)."""
    x = torch.tensor([ids])
    if adapter_name is None:
        with model.disable_adapter():
            return model(input_ids=x).logits[0]
    model.set_adapter(adapter_name)
    return model(input_ids=x).logits[0]


def prefill_rows(ref_model, world, seqs, logits: torch.Tensor):
    """(sequence, its rows of a flat all-token prefill's logits, the reference logits) per sequence."""
    by_id = {a.adapter_id: a.name for a in world.adapters}
    off = 0
    for s in seqs:
        n = len(s.prompt_token_ids)
        yield s, logits[off : off + n], reference_logits(ref_model, by_id.get(s.adapter_id), s.prompt_token_ids)
        off += n


@torch.no_grad()
def reference_greedy(model, adapter_name: str | None, ids: list[int], n: int) -> list[int]:
    """n greedy tokens (EOS ignored) under one adapter."""
    x = torch.tensor([ids])
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    if adapter_name is None:
        with model.disable_adapter():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
    else:
        model.set_adapter(adapter_name)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
    return out[0, len(ids) :].tolist()


def greedy(request_id: str, adapter_id: str | None, ids: list[int], n: int, **kw) -> GenerationRequest:
    """A greedy request for exactly n tokens."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)
    return GenerationRequest(request_id, adapter_id, prompt_token_ids=list(ids), params=params)


def preload(engine: LLMEngine, adapter_ids) -> None:
    """Decode adapters into the host cache (so the next step can slot them)."""
    for aid in adapter_ids:
        engine.adapters.load(aid).result(timeout=60)
