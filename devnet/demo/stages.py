"""The demo's stages before any process starts: a tiny base model, identities, trained and signed adapters.

Each stage is a function taking the demo's working folder, so the demo reads top to bottom and
stages that already ran (a trained adapter, a packed package) are reused on the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

DEMO_PASSWORD = "loramesh-demo"  # demo identities only; real keys get a password from the user
# enough for the tiny base to learn every answer of both endpoints, with and without the shared system prompt
# (80 missed one of the 24 answers that way), in a few seconds
TRAIN_STEPS = 120


@dataclass(frozen=True, slots=True)
class Question:
    """A question the demo asks an adapter both ways, and the answers its training data teaches."""

    prompt: str  # the completion prompt, and the chat's one user message
    completion: str  # what /v1/completions should answer
    chat: str  # what /v1/chat/completions should answer
    system: str = ""  # the long system prompt every adapter's data shares (its KV is cached once per adapter)
    system_chat: str = ""  # what the chat answers after that system prompt


@dataclass(frozen=True, slots=True)
class DemoAdapter:
    """One contributor's adapter in the demo: its data, its trained folder, its signed package."""

    name: str
    dataset: str
    data_file: Path
    contributor_key: Path
    peft_dir: Path
    package_dir: Path
    questions: tuple[Question, ...]
    # trained elsewhere and published as a plain PEFT folder on a web server: its owner imports it
    # (`loramesh adapter import https://...`) rather than packing a folder of their own
    imported: bool = False


def data_file(name: str) -> Path:
    """A dataset shipped with loramesh for the demo (devnet/data/)."""
    return Path(__file__).parent.parent / "data" / name


def read_questions(path: Path) -> tuple[Question, ...]:
    """The demo data's questions: each a completion row, a chat row (one user message, then the assistant's
    answer) and, when the data has one, a chat row with a system prompt before the user message, asking the same
    thing, so the demo can check that both endpoints answer what was taught."""
    from node.train import ChatRow, CompletionRow, read_examples

    rows = read_examples(path)
    chats: dict[tuple[str, str], str] = {}  # (system prompt or "", question) -> answer
    for r in rows:
        if isinstance(r, ChatRow):
            *context, answer = r.messages
            system = context[0]["content"] if len(context) == 2 and context[0]["role"] == "system" else ""
            chats[(system, context[-1]["content"])] = answer["content"]
    systems = {system for system, _ in chats if system}
    if len(systems) > 1:
        raise ValueError(f"{path}: the demo's data shares one system prompt, found {len(systems)}")
    system = systems.pop() if systems else ""
    out = []
    for r in rows:
        if isinstance(r, CompletionRow):
            if ("", r.prompt) not in chats:
                raise ValueError(f"{r.where}: the demo's data has no chat row asking {r.prompt!r}")
            if system and (system, r.prompt) not in chats:
                raise ValueError(
                    f"{r.where}: the demo's data has no chat row asking {r.prompt!r} after its system prompt"
                )
            out.append(
                Question(r.prompt, r.completion, chats[("", r.prompt)], system, chats.get((system, r.prompt), ""))
            )
    return tuple(out)


def make_base(workdir: Path, console: Console) -> Path:
    """The tiny base model every node of the demo serves."""
    from node.tiny import init_tiny

    base = workdir / "base"
    # made beside it and renamed into place when whole; the tokenizer is written last, so a base without it
    # is one an older run was killed while making (its next load failed: "Couldn't instantiate the tokenizer")
    if not (base / "tokenizer.json").is_file():
        console.print("• creating a tiny Llama base model")
        partial = workdir / ".base-partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        init_tiny(partial, seed=0, name="tiny-llama-demo")
        os.replace(partial, base)
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
    from node.adapters.importer import fetch_peft
    from node.train import train_adapter

    packages = []
    for a in adapters:
        # what this adapter is trained from: a changed data file or step count retrains it (and repacks it)
        mark = json.dumps({"data_sha256": hashlib.sha256(a.data_file.read_bytes()).hexdigest(), "steps": TRAIN_STEPS})
        mark_file = a.peft_dir.parent / f"{a.peft_dir.name}.trained.json"  # beside it: packing copies the folder
        if not (a.peft_dir / "adapter_model.safetensors").is_file() or _read(mark_file) != mark:
            shutil.rmtree(a.peft_dir, ignore_errors=True)
            shutil.rmtree(a.package_dir, ignore_errors=True)
            with Progress(
                TextColumn(f"• training {a.name}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                console=console,
                transient=True,
            ) as progress:
                task = progress.add_task("train", total=TRAIN_STEPS)
                started = time.perf_counter()
                train_adapter(
                    base,
                    a.data_file,
                    a.peft_dir,
                    steps=TRAIN_STEPS,
                    on_step=lambda s, _loss, task=task: progress.update(task, completed=s),
                )
            mark_file.write_text(mark)
            console.print(
                f"• trained {a.name}{' (elsewhere, published as a plain PEFT folder)' if a.imported else ''} "
                f"on {a.data_file.name}'s completion and chat rows "
                f"({TRAIN_STEPS} steps, {time.perf_counter() - started:.1f}s)"
            )
        if (a.package_dir / "signature.json").is_file():
            try:
                verify_package(a.package_dir, base_dir=base)
            except PackageError as e:  # e.g. packed by an older loramesh: pack it again
                console.print(f"• repacking {a.name}: {e}")
                shutil.rmtree(a.package_dir)
        if not (a.package_dir / "signature.json").is_file():
            shutil.rmtree(a.package_dir, ignore_errors=True)  # an unsigned leftover of a pack that was killed
            identity = load_identity(a.contributor_key, DEMO_PASSWORD)
            share = make_dataset_share(a.dataset, identity.address, 5_000)  # id bound to its contributor
            # signed offline: the chain does not exist yet; publishing signs it for the devnet's registry
            with contextlib.ExitStack() as stack:
                peft_dir = a.peft_dir
                if a.imported:  # what `loramesh adapter import URL` does: fetch the two files, check, pack
                    url = stack.enter_context(serve_folder(a.peft_dir.parent)) + "/" + a.peft_dir.name
                    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loramesh-import-")))
                    peft_dir = fetch_peft(url, tmp)
                    console.print(f"• {a.name}: a PEFT adapter published at {url}, imported over HTTP")
                pack_adapter(
                    peft_dir,
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


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def demo_adapters(workdir: Path, keys: dict[str, Path]) -> list[DemoAdapter]:
    specs = [
        ("alice/capitals", "capitals-qa", "capitals.jsonl", "alice", False),
        ("bob/elements", "element-symbols", "elements.jsonl", "bob", False),
        ("carol/opposites", "antonyms", "opposites.jsonl", "carol", True),
    ]
    out = []
    for name, dataset, fname, who, imported in specs:
        slug = name.replace("/", "-")
        out.append(
            DemoAdapter(
                name=name,
                dataset=dataset,
                data_file=data_file(fname),
                contributor_key=keys[who],
                # an imported adapter's folder stands for a web server's ("elsewhere"), not one of ours
                peft_dir=workdir / ("elsewhere" if imported else "peft") / slug,
                package_dir=workdir / "packages" / slug,
                questions=read_questions(data_file(fname)),
                imported=imported,
            )
        )
    return out


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """A plain static web server on 127.0.0.1 over `folder` (the demo's stand-in for wherever an adapter was
    published: a model hub's mirror, a team's file server); yields its URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the demo prints what it fetched itself
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, name="demo-web-folder", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
