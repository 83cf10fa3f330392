"""Factories for tests: tiny bases, PEFT adapters with non-zero weights, signed packages."""

from __future__ import annotations

import shutil
from pathlib import Path

from eth_account import Account

from node.adapters import pack_adapter
from node.adapters.basemodel import quiet_transformers
from node.adapters.manifest import MANIFEST_FILE, SIGNATURE_FILE, read_manifest
from node.adapters.pack import build_manifest, write_signed
from node.tiny import init_tiny


def make_base(out_dir: Path, seed: int = 0, **kwargs) -> Path:
    """A tiny deterministic base model folder."""
    return init_tiny(out_dir, seed, **kwargs)


def make_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 4,
    targets=("q_proj", "v_proj"),
    seed: int = 0,
    alpha: float = 8.0,
    std: float = 0.05,
) -> Path:
    """A PEFT LoRA folder saved by PEFT's own save_pretrained, with random A and B so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_package(
    base_dir: Path,
    out_dir: Path,
    *,
    account=None,
    name: str = "test/adapter",
    peft_dir: Path | None = None,
    **adapter_kwargs,
):
    """A signed package (VerifiedPackage) made from a fresh PEFT adapter."""
    account = account or Account.create()
    peft_dir = peft_dir or make_peft_adapter(base_dir, out_dir.parent / f"{out_dir.name}-peft", **adapter_kwargs)
    return pack_adapter(peft_dir, out_dir, name=name, account=account, base_dir=base_dir)


def writable_copy(pkg_dir: Path, dst: Path) -> Path:
    """A private, writable copy of a package folder (store and pack leave files read-only)."""
    shutil.copytree(pkg_dir, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def resign(pkg_dir: Path, base: Path, account) -> None:
    """Sign a package folder as it now is, so the checks behind the hash and signature checks are reached."""
    old = read_manifest(pkg_dir)
    (pkg_dir / MANIFEST_FILE).unlink()
    (pkg_dir / SIGNATURE_FILE).unlink()
    write_signed(pkg_dir, build_manifest(pkg_dir, name=old.name, base_dir=base), account)
