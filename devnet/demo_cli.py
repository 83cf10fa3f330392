"""`loramesh demo`: the command-line face of devnet/demo.py."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from devnet import demo as stages


def demo(
    workdir: Annotated[Path, typer.Option("--dir", help="Working folder for the demo's models, keys and state.")] = Path(
        "work/demo"
    ),
    fresh: Annotated[bool, typer.Option(help="Delete the working folder first and redo every stage.")] = False,
    once: Annotated[bool, typer.Option(help="Exit after the checks instead of staying up until Ctrl-C.")] = False,
) -> None:
    """Run the whole flow on this machine: tiny base, two contributors' adapters, signed packages, answers."""
    console = Console()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]loramesh demo")
    base = stages.make_base(workdir, console)
    keys = stages.make_identities(workdir, ["alice", "bob"], console)
    adapters = stages.demo_adapters(workdir, keys)
    stages.train_and_pack(workdir, base, adapters, console)
    show_answers(base, adapters, console)
    console.print(f"[green]demo finished[/]: everything is under {workdir}")


def show_answers(base: Path, adapters, console: Console) -> None:
    """Each adapter's greedy answers to its own prompts beside the base model's."""
    from node.reference import greedy_answers

    for a in adapters:
        table = Table(title=f"{a.name}: answers to its own prompts")
        table.add_column("prompt")
        table.add_column("base model")
        table.add_column(a.name)
        base_out = greedy_answers(base, list(a.prompts), max_new_tokens=20)
        tuned = greedy_answers(base, list(a.prompts), adapter_dir=a.package_dir, max_new_tokens=20)
        for p, b, t in zip(a.prompts, base_out, tuned):
            table.add_row(p, repr(b), t)
        console.print(table)
