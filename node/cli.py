"""Contributor commands: `loramesh keys`, `loramesh base`, `loramesh adapter` (train, pack, verify)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from node.adapters.limits import MAX_LORA_RANK
from node.train import DEFAULT_TARGETS

console = Console(soft_wrap=True)
keys_app = typer.Typer(help="Create and inspect identity files (EVM account key + Ed25519 node key).",
                       no_args_is_help=True)
base_app = typer.Typer(help="Base models: make a tiny deterministic one for tests and demos.", no_args_is_help=True)
adapter_app = typer.Typer(help="Adapters: train a LoRA, pack and sign it, verify a package.", no_args_is_help=True)

TOKEN_DECIMALS = 18
DEFAULT_DEPLOYMENT = Path(".loramesh/devnet/deployment.json")


def parse_price(text: str) -> int:
    """A price in whole tokens (e.g. '0.002') as an integer amount of the smallest unit."""
    try:
        value = Decimal(text)
    except InvalidOperation as e:
        raise ValueError(f"price {text!r} is not a number") from e
    if value < 0:
        raise ValueError(f"price {text!r} is negative")
    units = value * (10**TOKEN_DECIMALS)
    if units != units.to_integral_value():
        raise ValueError(f"price {text!r} has more than {TOKEN_DECIMALS} decimal places")
    return int(units)


def parse_dataset(spec: str):
    """`NAME=ADDRESS:SHARE_BPS` -> a DatasetShare."""
    from node.adapters import make_dataset_share

    try:
        name, rest = spec.split("=", 1)
        address, bps = rest.rsplit(":", 1)
        return make_dataset_share(name.strip(), address.strip(), int(bps))
    except ValueError as e:
        raise ValueError(f"--dataset {spec!r}: expected NAME=CONTRIBUTOR_ADDRESS:SHARE_BPS ({e})") from e


@keys_app.command("new")
def keys_new(
    out: Annotated[Path, typer.Option("--out", help="Where to write the identity file (mode 0600).")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Make a new identity: an EVM account (eth-account keystore) and an Ed25519 node key, password-protected.

    The password comes from $LORAMESH_KEY_PASSWORD, else it is asked for.
    """
    from common.identity import create_identity

    identity = create_identity(out, overwrite=force)
    console.print(f"wrote [bold]{out}[/] (mode 0600)")
    console.print(f"  address  {identity.address}\n  node id  {identity.node_id}")


@keys_app.command("show")
def keys_show(path: Annotated[Path, typer.Argument(help="An identity file.")]) -> None:
    """Print the address and node id held in an identity file."""
    from common.identity import load_identity

    identity = load_identity(path)
    console.print(f"address  {identity.address}\nnode id  {identity.node_id}")


@base_app.command("init-tiny")
def base_init_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model into.")],
    seed: Annotated[int, typer.Option(help="Seed of the deterministic weights.")] = 0,
    hidden_size: Annotated[int, typer.Option(help="Hidden size (64 to 256 keeps it tiny).")] = 128,
    layers: Annotated[int, typer.Option(help="Number of decoder layers.")] = 2,
    model_type: Annotated[str, typer.Option(help="llama, mistral, qwen2 or qwen3.")] = "llama",
) -> None:
    """Write a tiny Llama-architecture causal LM in Hugging Face format (weights, config, byte-level tokenizer)."""
    from node.adapters.basemodel import base_model_id
    from node.tiny import init_tiny

    init_tiny(out_dir, seed, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_layers=layers,
              model_type=model_type)
    console.print(f"wrote tiny {model_type} base to [bold]{out_dir}[/] (id {base_model_id(out_dir)})")


@adapter_app.command("train")
def adapter_train(
    base: Annotated[Path, typer.Option(help="Base model folder.")],
    data: Annotated[Path, typer.Option(help='JSONL of {"prompt": ..., "completion": ...}.')],
    out: Annotated[Path, typer.Option(help="Folder for the PEFT adapter.")],
    rank: Annotated[int, typer.Option(min=1, max=MAX_LORA_RANK,
                                      help="LoRA rank (at most what nodes serve, so the adapter can be packed).")] = 8,
    targets: Annotated[str, typer.Option(help="Comma-separated target modules.")] = ",".join(DEFAULT_TARGETS),
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 80,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 5e-3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train a LoRA adapter on prompt/completion pairs (CPU is fine) and save a standard PEFT folder."""
    from node.train import train_adapter

    target_list = tuple(t.strip() for t in targets.split(",") if t.strip())
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("train", total=steps, loss="-")
        train_adapter(base, data, out, rank=rank, targets=target_list, steps=steps, lr=lr, seed=seed,
                      on_step=lambda s, loss: progress.update(task, completed=s, loss=f"{loss:.3f}"))
    console.print(f"wrote PEFT adapter to [bold]{out}[/]")


@adapter_app.command("pack")
def adapter_pack(
    peft_dir: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder (save_pretrained output).")],
    name: Annotated[str, typer.Option(help="Adapter name, e.g. 'alice/capitals'.")],
    key: Annotated[Path, typer.Option(help="Identity file of the publisher (signs the manifest).")],
    out: Annotated[Path, typer.Option(help="Folder to write the package into.")],
    base: Annotated[Path | None, typer.Option(help="Base model folder (default: the one the adapter names).")] = None,
    dataset: Annotated[list[str] | None, typer.Option(help="NAME=CONTRIBUTOR_ADDRESS:SHARE_BPS, repeatable.")] = None,
    price_per_1k_tokens: Annotated[str, typer.Option(help="Price per 1,000 tokens, in whole tokens.")] = "0",
    version: Annotated[str, typer.Option(help="Version label.")] = "1",
    predecessor: Annotated[str | None, typer.Option(help="Adapter id of the version this one replaces.")] = None,
    license: Annotated[str, typer.Option(help="License of the weights.")] = "apache-2.0",
    deployment: Annotated[Path | None, typer.Option(
        help="Deployment the signature is for (its chain id and registry); default "
             ".loramesh/devnet/deployment.json when it exists, else an offline signature.")] = None,
) -> None:
    """Wrap a PEFT adapter into a signed loramesh package (manifest + EIP-712 signature).

    The signature is bound to one chain and registry (the deployment's). Without a deployment the
    package is signed offline: `adapter publish` signs it again for the chain it registers on.
    """
    from ledger.deployment import Deployment
    from ledger.types import Domain
    from node.adapters import pack_adapter
    from common.identity import load_identity

    shares = [parse_dataset(s) for s in dataset or []]
    if deployment is None and DEFAULT_DEPLOYMENT.is_file():
        deployment = DEFAULT_DEPLOYMENT
    domain = None
    if deployment is not None:
        d = Deployment.load(deployment)
        domain = Domain(d.chain_id, d.registry)
    identity = load_identity(key)
    pkg = pack_adapter(peft_dir, out, name=name, account=identity.account, base_dir=base, datasets=shares,
                       price_per_1k_tokens=parse_price(price_per_1k_tokens), version=version,
                       predecessor=predecessor, license=license, domain=domain)
    signed_for = f"chain {domain.chain_id}, registry {domain.registry}" if domain else \
        "offline (adapter publish signs it for its chain)"  # fmt: skip
    console.print(f"packed [bold]{pkg.name}[/] -> {out}\n  adapter id  {pkg.adapter_id}\n  signer      {pkg.signer}"
                  f"\n  signed for  {signed_for}")


@adapter_app.command("verify")
def adapter_verify(
    pkg_dir: Annotated[Path, typer.Argument(help="A loramesh package folder.")],
    base: Annotated[Path | None, typer.Option(help="Also check it fits this base model folder.")] = None,
) -> None:
    """Check a package: files and hashes, signature, weights; print its id, name, signer and base model."""
    from node.adapters import verify_package
    from node.adapters.signing import describe

    pkg = verify_package(pkg_dir, base_dir=base)
    m = pkg.manifest
    console.print(f"[green]ok[/] {m.name} v{m.version}")
    console.print(f"  adapter id  {pkg.adapter_id}\n  signer      {pkg.signer}\n  signed for  {describe(pkg.domain)}"
                  f"\n  price       {m.price_per_1k_tokens} (smallest unit) per 1k tokens"
                  f"\n  base model  {m.base_model.name} ({m.base_model.id})"
                  f"\n  lora        rank {m.lora.rank}, targets {', '.join(m.lora.targets)}")
    for d in m.datasets:
        console.print(f"  dataset     {d.name} -> {d.contributor} ({d.share_bps} bps)")


@adapter_app.command("publish")
def adapter_publish(
    pkg_dir: Annotated[Path, typer.Argument(help="A signed loramesh package folder.")],
    key: Annotated[Path, typer.Option(help="Identity file of the signer (pays gas, becomes the owner).")],
    rpc: Annotated[str | None, typer.Option(help="JSON-RPC URL of the chain (default: the deployment's).")] = None,
    deployment: Annotated[Path, typer.Option(help="Deployment file with the contract addresses.")] = Path(
        ".loramesh/devnet/deployment.json"),
    node: Annotated[str | None, typer.Option(help="Node API URL to hand the package to; it seeds it to peers.")] = None,
    operator_token_file: Annotated[Path | None, typer.Option(
        help="The node operator's token file, needed to upload to --node (default: $LORAMESH_NODE_OPERATOR_TOKEN, "
             "or .loramesh/node/operator.token for a node on this machine).")] = None,
    dataset_file: Annotated[list[str] | None, typer.Option(
        help="NAME=FILE: record sha256 of FILE as the dataset's content hash when registering it.")] = None,
) -> None:
    """Register an adapter (and the publisher's own new datasets) on chain as its signer, then hand it to a node.

    A package signed offline or for another deployment is signed again for this one (the key must be
    the one that signed it). Publishing an adapter id that is already registered is a no-op; a name
    belongs to its first publisher, and a new version is a new package whose manifest names its
    predecessor. A dataset of another contributor must be registered by them first, and pay them.
    """
    from ledger.chain import ChainClient
    from node.adapters.verify import file_sha256
    from common.identity import load_identity
    from node.publish import operator_token_for, publish

    hashes = {}
    for spec in dataset_file or []:
        name, _, path = spec.partition("=")
        if not path:
            raise ValueError(f"--dataset-file {spec!r}: expected NAME=FILE")
        hashes[name] = "0x" + file_sha256(Path(path))
    token = operator_token_for(node, operator_token_file) if node else None
    identity = load_identity(key)
    client = ChainClient.from_deployment(deployment, identity.account, rpc_url=rpc)
    result = publish(pkg_dir, client, node_url=node, dataset_hashes=hashes, operator_token=token)
    state = "registered" if result.registered else "already registered (no-op)"
    console.print(f"[green]{state}[/] {result.name}\n  adapter id  {result.adapter_id}")
    if result.signed:
        console.print(f"  signed for  chain {client.deployment.chain_id}, registry {client.deployment.registry}")
    for d in result.datasets_registered:
        console.print(f"  dataset     {d} registered")
    if result.node_url:
        console.print(f"  handed to   {result.node_url}")


@adapter_app.command("register-dataset")
def adapter_register_dataset(
    name: Annotated[str, typer.Argument(help="The dataset's name, as adapters list it (--dataset NAME=...).")],
    key: Annotated[Path, typer.Option(help="Identity file of the contributor (pays gas, is paid the shares).")],
    deployment: Annotated[Path, typer.Option(help="Deployment file with the contract addresses.")] = DEFAULT_DEPLOYMENT,
    rpc: Annotated[str | None, typer.Option(help="JSON-RPC URL of the chain (default: the deployment's).")] = None,
    file: Annotated[Path | None, typer.Option(help="Record sha256 of this file as the dataset's content hash.")] = None,
) -> None:
    """Register your dataset on chain: its id is bound to your address, so only you can, and its
    shares in any adapter that lists it are paid to you. Needed before someone else publishes an
    adapter listing it (a publisher's own datasets are registered by `adapter publish`)."""
    from ledger.chain import ChainClient
    from ledger.errors import UnknownDataset
    from ledger.types import ZERO_ID
    from node.adapters.verify import file_sha256
    from common.identity import load_identity

    identity = load_identity(key)
    client = ChainClient.from_deployment(deployment, identity.account, rpc_url=rpc)
    dataset_id = client.dataset_id(name)
    try:
        info = client.get_dataset(dataset_id)
        console.print(f"already registered: {name}\n  dataset id  {dataset_id}\n  payee       {info.payee}")
        return
    except UnknownDataset:
        pass
    content = "0x" + file_sha256(file) if file is not None else ZERO_ID
    client.register_dataset(name, content)
    console.print(f"[green]registered[/] {name}\n  dataset id  {dataset_id}\n  contributor {identity.address}")


@adapter_app.command("fetch")
def adapter_fetch(
    adapter_id: Annotated[str, typer.Argument(help="Id (0x + 64 hex) of a registered adapter.")],
    store: Annotated[Path, typer.Option(help="Adapter store folder to install it into.")],
    bootstrap: Annotated[list[str], typer.Option(help="Peer multiaddr (…/p2p/<peer id>) to join through; repeatable.")],
    deployment: Annotated[Path, typer.Option(help="Deployment file: the adapter's owner is read from the chain.")] = Path(
        ".loramesh/devnet/deployment.json"),
    rpc: Annotated[str | None, typer.Option(help="Chain JSON-RPC URL (default: the deployment's).")] = None,
    base: Annotated[Path | None, typer.Option(help="Also check the package fits this base model folder.")] = None,
    listen: Annotated[str, typer.Option(help="libp2p listen multiaddr of this short-lived peer.")] = "/ip4/127.0.0.1/tcp/0",
) -> None:
    """Fetch a package from the p2p mesh into a store, verifying every byte and the owner's signature."""
    from ledger.chain import ChainClient
    from node.adapters import AdapterStore
    from node.adapters.manifest import check_id
    from common.identity import Identity
    from node.p2p import P2PConfig, P2PNode
    from node.registration import owner_lookup

    check_id(adapter_id)
    client = ChainClient.from_deployment(deployment, rpc_url=rpc)
    owner_of = owner_lookup(client)
    p2p = P2PNode(seed=Identity.generate().node_seed, store=AdapterStore(store, domain=client.domain), owner_of=owner_of,
                  config=P2PConfig(listen=listen, bootstrap=tuple(bootstrap)), base_dir=base)
    with Progress(TextColumn("{task.fields[state]}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.fields[peer]}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("fetch", total=None, state="discovering", peer="")

        def show(t) -> None:
            progress.update(task, completed=t.done, total=t.total or None, state=t.state,
                            peer=(t.peer_id or "")[:16])

        with p2p:
            pkg = p2p.fetch(adapter_id, on_progress=show)
    console.print(f"[green]fetched[/] {pkg.name} -> {pkg.path}\n  signer      {pkg.signer} (the registered owner)")
