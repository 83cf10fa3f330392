"""What the adapter_config allow-list admits is served exactly: PEFT adapters saved with the admitted
non-default values (rsLoRA scaling, gaussian init, dropout, no task type) give the same logits through
the engine as through transformers + PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from eth_account import Account

from node.adapters import AdapterStore, pack_adapter
from node.adapters.basemodel import quiet_transformers
from node.engine import EngineConfig, LLMEngine
from tests.utils.engine import greedy

IDS = [1, 17, 99, 23, 250, 8, 77, 31, 140]
VARIANTS = {
    "rslora": dict(use_rslora=True, lora_alpha=16),
    "gaussian-dropout": dict(init_lora_weights="gaussian", lora_dropout=0.1),
    "no-task-type": dict(task_type=None, lora_alpha=4),
}


def _peft(base, out, **kw):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    kw.setdefault("task_type", "CAUSAL_LM")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_admitted_config_values_match_peft(tiny_base, tmp_path, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_dir = _peft(tiny_base, tmp_path / "peft", **VARIANTS[variant])
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert all(cfg[k] == v for k, v in VARIANTS[variant].items())  # PEFT saved what the variant sets
    store = AdapterStore(tmp_path / "store")
    pkg = store.install(
        pack_adapter(peft_dir, tmp_path / "pkg", name="x/v", account=Account.create(), base_dir=tiny_base).path
    )
    engine = LLMEngine(EngineConfig(model_dir=tiny_base, num_kv_blocks=16, block_size=8), store=store)
    try:
        engine.adapters.load(pkg.adapter_id).result(timeout=60)
        engine.add_request(greedy("r", pkg.adapter_id, IDS, 1))
        seqs, _, _ = engine.scheduler.schedule()
        ours = engine.runner.forward(seqs, True, all_logits=True).float()
    finally:
        engine.close()
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    ref = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([IDS])).logits[0]
        with ref.disable_adapter():
            plain = ref(input_ids=torch.tensor([IDS])).logits[0]
    assert (want - plain).abs().max() > 1e-2  # the adapter matters, so a wrong scaling would show
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
