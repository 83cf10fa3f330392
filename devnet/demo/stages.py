"""The demo's stages before any process starts: a tiny base model, identities, trained and signed adapters.

Each stage is a function taking the demo's working folder, so the demo reads top to bottom and
stages that already ran (a trained adapter, a packed package) are reused on the next run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

DEMO_PASSWORD = "loramesh-demo"  # demo identities only; real keys get a password from the user


@dataclass(frozen=True, slots=True)
class DemoAdapter:
    """One contributor's adapter in the demo: its data, its trained folder, its signed package."""

    name: str
    dataset: str
    data_file: Path
    contributor_key: Path
    peft_dir: Path
    package_dir: Path
    prompts: tuple[str, ...]


def data_file(name: str) -> Path:
    """A dataset shipped with loramesh for the demo (devnet/data/)."""
    return Path(__file__).parent.parent / "data" / name


def read_prompts(path: Path) -> tuple[str, ...]:
    from node.train import read_pairs

    return tuple(p for p, _ in read_pairs(path))


def make_base(workdir: Path, console: Console) -> Path:
    """The tiny base model every node of the demo serves."""
    from node.tiny import init_tiny

    base = workdir / "base"
    if not (base / "model.safetensors").is_file():
        console.print("• creating a tiny Llama base model")
        init_tiny(base, seed=0, name="tiny-llama-demo")
    return base


def make_identities(workdir: Path, names: list[str], console: Console) -> dict[str, Path]:
    """Identity files (EVM + node keys) for each named participant."""
    from common.identity import create_identity

    out = {}
    for name in names:
        path = workdir / "keys" / f"{name}.json"
        if not path.is_file():
            create_identity(path, DEMO_PASSWORD)
            console.print(f"• made identity for {name}")
        out[name] = path
    return out


def train_and_pack(workdir: Path, base: Path, adapters: list[DemoAdapter], console: Console) -> list:
    """Train each adapter on its contributor's data, pack and sign it, and verify the package."""
    from rich.progress import BarColumn, Progress, TextColumn

    from common.identity import load_identity
    from node.adapters import PackageError, make_dataset_share, pack_adapter, verify_package
    from node.train import train_adapter

    packages = []
    for a in adapters:
        if not (a.peft_dir / "adapter_model.safetensors").is_file():
            with Progress(
                TextColumn(f"• training {a.name}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                console=console,
                transient=True,
            ) as progress:
                task = progress.add_task("train", total=80)
                train_adapter(
                    base,
                    a.data_file,
                    a.peft_dir,
                    steps=80,
                    on_step=lambda s, _loss, task=task: progress.update(task, completed=s),
                )
            console.print(f"• trained {a.name}")
        if (a.package_dir / "signature.json").is_file():
            try:
                verify_package(a.package_dir, base_dir=base)
            except PackageError as e:  # e.g. packed by an older loramesh: pack it again
                console.print(f"• repacking {a.name}: {e}")
                shutil.rmtree(a.package_dir)
        if not (a.package_dir / "signature.json").is_file():
            identity = load_identity(a.contributor_key, DEMO_PASSWORD)
            share = make_dataset_share(a.dataset, identity.address, 5_000)  # id bound to its contributor
            # signed offline: the chain does not exist yet; publishing signs it for the devnet's registry
            pack_adapter(
                a.peft_dir,
                a.package_dir,
                name=a.name,
                account=identity.account,
                base_dir=base,
                datasets=[share],
                price_per_1k_tokens=10**15,
            )
            console.print(f"• packed and signed {a.name}")
        pkg = verify_package(a.package_dir, base_dir=base)
        console.print(f"• verified {pkg.name}: id {pkg.adapter_id[:18]}…, signer {pkg.signer}")
        packages.append(pkg)
    return packages


def demo_adapters(workdir: Path, keys: dict[str, Path]) -> list[DemoAdapter]:
    specs = [
        ("alice/capitals", "capitals-qa", "capitals.jsonl", "alice"),
        ("bob/elements", "element-symbols", "elements.jsonl", "bob"),
    ]
    out = []
    for name, dataset, fname, who in specs:
        slug = name.replace("/", "-")
        out.append(
            DemoAdapter(
                name=name,
                dataset=dataset,
                data_file=data_file(fname),
                contributor_key=keys[who],
                peft_dir=workdir / "peft" / slug,
                package_dir=workdir / "packages" / slug,
                prompts=read_prompts(data_file(fname)),
            )
        )
    return out
