"""The node package's commands: `loramesh keys`, `loramesh base`, `loramesh adapter` (train, pack, import,
export, verify, publish, fetch) for contributors, and `loramesh node run` for operators. `python -m node.cli`
runs them on their own (`python -m node.cli node run ...`)."""

from __future__ import annotations

import logging
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from common.help_text import plain_help
from ledger.deployment import DEFAULT_DEPLOYMENT_PATH
from node.adapters.limits import MAX_LORA_RANK
from node.train import DEFAULT_TARGETS

log = logging.getLogger("node.cli")  # not __name__: it is __main__ under python -m
console = Console(soft_wrap=True, emoji=False)  # ":100:" in a name stays as written
keys_app = typer.Typer(
    help="Create and inspect identity files (EVM account key + Ed25519 node key).", no_args_is_help=True
)
base_app = typer.Typer(help="Base models: make a tiny deterministic one for tests and demos.", no_args_is_help=True)
adapter_app = typer.Typer(
    help="Adapters: train a LoRA or import one, pack and sign it, verify, publish, export, fetch a package.",
    no_args_is_help=True,
)
node_app = typer.Typer(
    help="Run a node: the shared-base multi-LoRA engine behind the node HTTP API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

TOKEN_DECIMALS = 18


# a bare price this large is no price in ETH for 1,000 tokens but one in wei, given where ETH is meant (the
# gateway's price limits are in wei): 10^15 signed a package at 10^15 ETH per 1,000 tokens, silently
SURELY_WEI = 1000


def parse_price(text: str) -> int:
    """A price in the chain's coin (ETH, e.g. '0.002', or '0.002eth') or in its smallest unit ('2000000000000000wei')
    as an integer amount of that unit (wei)."""
    t = text.strip().lower()
    if t.endswith("wei"):
        digits = t.removesuffix("wei").strip()
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"price {text!r} is not a whole number of wei (digits only)")
        return int(digits)
    try:
        value = Decimal(t.removesuffix("eth").strip())
    except InvalidOperation as e:
        raise ValueError(f"price {text!r} is not a number") from e
    if not value.is_finite() or value < 0:
        raise ValueError(f"price {text!r} is not a number of 0 or more")
    if value >= SURELY_WEI and not t.endswith("eth"):
        whole = value == value.to_integral_value()
        raise ValueError(
            f"price {text} ETH per 1,000 tokens? "
            + (f"For wei write {int(value)}wei; " if whole else "")
            + f"for ETH write it as ETH (0.001 is 10^15 wei), or {text}eth if you mean it"
        )
    units = value * (10**TOKEN_DECIMALS)
    if units != units.to_integral_value():
        raise ValueError(f"price {text!r} has more than {TOKEN_DECIMALS} decimal places")
    return int(units)


def parse_dataset(spec: str):
    """`NAME=ADDRESS:SHARE_BPS` -> a DatasetShare."""
    from node.adapters import make_dataset_share

    name, eq, rest = spec.partition("=")
    address, colon, bps = rest.rpartition(":")
    if not (eq and colon):
        raise ValueError(f"--dataset {spec!r}: expected NAME=CONTRIBUTOR_ADDRESS:SHARE_BPS (capitals-qa=0xAb..:5000)")
    try:
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
    console.print(f"wrote [bold]{escape(str(out))}[/] (mode 0600)")
    console.print(f"  address  {identity.address}\n  node id  {identity.node_id}")


@keys_app.command("show")
def keys_show(
    path: Annotated[Path, typer.Argument(help="An identity file.")],
    check: Annotated[
        bool, typer.Option("--check", help="Unlock the file (asks for its password) to prove it holds these keys.")
    ] = False,
) -> None:
    """Print the address and node id an identity file holds; no password needed unless --check."""
    from common.identity import load_identity, read_public

    address, node_id = read_public(path)
    if check:
        identity = load_identity(path)
        address, node_id = identity.address, identity.node_id
    console.print(f"address  {address}\nnode id  {node_id}" + ("\nunlocked: the keys match" if check else ""))


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

    init_tiny(
        out_dir,
        seed,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_layers=layers,
        model_type=model_type,
    )
    console.print(f"wrote tiny {model_type} base to [bold]{escape(str(out_dir))}[/] (id {base_model_id(out_dir)})")


@adapter_app.command("train")
def adapter_train(
    base: Annotated[Path, typer.Option(help="Base model folder.")],
    data: Annotated[
        Path,
        typer.Option(
            help='JSON Lines: completion rows {"prompt": ..., "completion": ...} and/or chat rows '
            '{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}.'
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder for the PEFT adapter.")],
    rank: Annotated[
        int,
        typer.Option(
            min=1, max=MAX_LORA_RANK, help="LoRA rank (at most what nodes serve, so the adapter can be packed)."
        ),
    ] = 8,
    targets: Annotated[str, typer.Option(help="Comma-separated target modules.")] = ",".join(DEFAULT_TARGETS),
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 80,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 5e-3,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step (all of them when fewer).")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train a LoRA adapter (CPU is fine) and save a standard PEFT folder.

    Completion rows are learnt as /v1/completions serves them: the prompt encoded with the tokenizer's BOS,
    then the completion and EOS. Chat rows are rendered by the base's chat template exactly as
    /v1/chat/completions renders them (the template writes BOS and opens the assistant's turn); every
    assistant message is learnt, followed by EOS ("weight": 0 on one keeps it as context only). The loss
    covers the answers only."""
    from node.train import train_adapter

    target_list = tuple(t.strip() for t in targets.split(",") if t.strip())
    progress = Progress(
        TextColumn("training"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = None

    def on_step(step: int, loss: float) -> None:
        nonlocal task
        if task is None:  # the bar appears with the first step: a file refused before it shows its error alone
            progress.start()
            task = progress.add_task("train", total=steps, loss="-")
        progress.update(task, completed=step, loss=f"{loss:.3f}")

    try:
        train_adapter(
            base,
            data,
            out,
            rank=rank,
            targets=target_list,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            on_step=on_step,
        )
    finally:
        if task is not None:
            progress.stop()
    console.print(f"wrote PEFT adapter to [bold]{escape(str(out))}[/]")


# the options `adapter pack` and `adapter import` share: what the signed manifest says
NameOpt = Annotated[str, typer.Option(help="Adapter name, e.g. 'alice/capitals'.")]
SignerOpt = Annotated[Path, typer.Option("--key", help="Identity file of the publisher (signs the manifest).")]
OutOpt = Annotated[Path, typer.Option(help="Folder to write the package into.")]
PackBaseOpt = Annotated[Path | None, typer.Option(help="Base model folder (default: the one the adapter names).")]
DatasetOpt = Annotated[list[str] | None, typer.Option(help="NAME=CONTRIBUTOR_ADDRESS:SHARE_BPS, repeatable.")]
PriceOpt = Annotated[
    str,
    typer.Option(
        help="Price per 1,000 tokens served, in the chain's coin (ETH): 0.001 is 10^15 wei; or in wei with the unit "
        "written: 1000000000000000wei."
    ),
]
VersionOpt = Annotated[str, typer.Option(help="Version label.")]
PredecessorOpt = Annotated[str | None, typer.Option(help="Adapter id of the version this one replaces.")]
LicenseOpt = Annotated[str, typer.Option(help="License of the weights.")]
SignForOpt = Annotated[
    Path | None,
    typer.Option(
        help="Deployment the signature is for (its chain id and registry); default "
        f"{DEFAULT_DEPLOYMENT_PATH} when it exists, else an offline signature."
    ),
]


@adapter_app.command("pack")
def adapter_pack(
    peft_dir: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder (save_pretrained output).")],
    name: NameOpt,
    key: SignerOpt,
    out: OutOpt,
    base: PackBaseOpt = None,
    dataset: DatasetOpt = None,
    price_per_1k_tokens: PriceOpt = "0",
    version: VersionOpt = "1",
    predecessor: PredecessorOpt = None,
    license: LicenseOpt = "apache-2.0",
    deployment: SignForOpt = None,
) -> None:
    """Wrap a PEFT adapter into a signed loramesh package (manifest + EIP-712 signature).

    The signature is bound to one chain and registry (the deployment's). Without a deployment the
    package is signed offline: `adapter publish` signs it again for the chain it registers on.
    """
    _pack(peft_dir, name, key, out, base, dataset, price_per_1k_tokens, version, predecessor, license, deployment)


@adapter_app.command("import")
def adapter_import(
    source: Annotated[
        str,
        typer.Argument(
            help="hf://ORG/NAME[@REVISION] (the Hugging Face Hub, through its cache; HF_HUB_OFFLINE=1 reads only "
            "the cache), an http(s):// URL of a folder holding adapter_config.json and adapter_model.safetensors, "
            "or a local folder (file://PATH)."
        ),
    ],
    name: NameOpt,
    key: SignerOpt,
    out: OutOpt,
    base: PackBaseOpt = None,
    dataset: DatasetOpt = None,
    price_per_1k_tokens: PriceOpt = "0",
    version: VersionOpt = "1",
    predecessor: PredecessorOpt = None,
    license: LicenseOpt = "apache-2.0",
    deployment: SignForOpt = None,
) -> None:
    """Import a PEFT LoRA adapter made elsewhere as a package signed by you (then `adapter publish` it).

    Only adapter_config.json and adapter_model.safetensors are fetched (a pickle checkpoint never is), and
    they are checked against the base as any adapter folder is. Give --base when the adapter names a base
    that is not a local folder (a Hub id, say).
    """
    import tempfile

    from node.adapters.importer import fetch_peft

    with tempfile.TemporaryDirectory(prefix="loramesh-import-") as tmp:
        peft_dir = fetch_peft(source, Path(tmp))
        _pack(peft_dir, name, key, out, base, dataset, price_per_1k_tokens, version, predecessor, license, deployment)


def _pack(peft_dir, name, key, out, base, dataset, price, version, predecessor, license, deployment) -> None:
    from common.identity import load_identity
    from ledger.deployment import Deployment
    from ledger.types import Domain
    from node.adapters import pack_adapter

    try:
        price_wei = parse_price(price)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--price-per-1k-tokens") from None
    shares = [parse_dataset(s) for s in dataset or []]
    if deployment is None and DEFAULT_DEPLOYMENT_PATH.is_file():
        deployment = DEFAULT_DEPLOYMENT_PATH
    domain = None
    if deployment is not None:
        d = Deployment.load(deployment)
        domain = Domain(d.chain_id, d.registry)
    identity = load_identity(key)
    pkg = pack_adapter(
        peft_dir,
        out,
        name=name,
        account=identity.account,
        base_dir=base,
        datasets=shares,
        price_per_1k_tokens=price_wei,
        version=version,
        predecessor=predecessor,
        license=license,
        domain=domain,
    )
    signed_for = (
        f"chain {domain.chain_id}, registry {domain.registry}"
        if domain
        else "offline (adapter publish signs it for its chain)"
    )
    eth = f"{Decimal(price_wei).scaleb(-TOKEN_DECIMALS).normalize():f}"
    console.print(
        f"packed [bold]{escape(pkg.name)}[/] -> {escape(str(out))}\n  adapter id  {pkg.adapter_id}"
        f"\n  signer      {pkg.signer}\n  signed for  {signed_for}"
        f"\n  price       {eth} ETH ({price_wei} wei) per 1,000 tokens"
    )


@adapter_app.command("export")
def adapter_export(
    pkg_dir: Annotated[Path, typer.Argument(help="A signed loramesh package folder.")],
    out: Annotated[Path, typer.Option(help="Registry folder (served by any static file server).")],
) -> None:
    """Write a package as <out>/<adapter id>.tar, the layout nodes read with --adapter-source URL.

    The tar is what an upload sends; a node checks every byte of it as it checks an upload's."""
    import os

    from node.adapters import verify_package
    from node.upload import tar_package

    pkg = verify_package(pkg_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{pkg.adapter_id}.tar"
    tmp = target.with_suffix(".tar.tmp")
    tmp.write_bytes(tar_package(pkg_dir))
    os.replace(tmp, target)  # a server never serves half an archive
    console.print(f"exported [bold]{escape(pkg.name)}[/] -> {escape(str(target))}")


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
    console.print(f"[green]ok[/] {escape(m.name)} v{escape(m.version)}")
    console.print(
        f"  adapter id  {pkg.adapter_id}\n  signer      {pkg.signer}\n  signed for  {describe(pkg.domain)}"
        f"\n  price       {m.price_per_1k_tokens} (smallest unit) per 1k tokens"
        f"\n  base model  {escape(m.base_model.name)} ({m.base_model.id})"
        f"\n  lora        rank {m.lora.rank}, targets {', '.join(m.lora.targets)}"
    )
    for d in m.datasets:
        console.print(f"  dataset     {escape(d.name)} -> {d.contributor} ({d.share_bps} bps)")


@adapter_app.command("publish")
def adapter_publish(
    pkg_dir: Annotated[Path, typer.Argument(help="A signed loramesh package folder.")],
    key: Annotated[Path, typer.Option(help="Identity file of the signer (pays gas, becomes the owner).")],
    rpc: Annotated[str | None, typer.Option(help="JSON-RPC URL of the chain (default: the deployment's).")] = None,
    deployment: Annotated[
        Path, typer.Option(help="Deployment file with the contract addresses.")
    ] = DEFAULT_DEPLOYMENT_PATH,
    node: Annotated[str | None, typer.Option(help="Node API URL to hand the package to; it seeds it to peers.")] = None,
    operator_token_file: Annotated[
        Path | None,
        typer.Option(
            help="The node operator's token file, needed to upload to --node (default: the token itself in "
            "$LORAMESH_NODE_OPERATOR_TOKEN, else the file .loramesh/node/operator.token of a node on this machine)."
        ),
    ] = None,
    dataset_file: Annotated[
        list[str] | None,
        typer.Option(help="NAME=FILE: record sha256 of FILE as the dataset's content hash when registering it."),
    ] = None,
) -> None:
    """Register an adapter (and the publisher's own new datasets) on chain as its signer, then hand it to a node.

    A package signed offline or for another deployment is signed again for this one (the key must be
    the one that signed it). Publishing an adapter id that is already registered is a no-op; a name
    belongs to its first publisher, and a new version is a new package whose manifest names its
    predecessor. A dataset of another contributor must be registered by them first, and pay them.
    """
    from common.identity import load_identity
    from ledger.chain import ChainClient
    from node.adapters.verify import file_sha256
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
    console.print(f"[green]{state}[/] {escape(result.name)}\n  adapter id  {result.adapter_id}")
    if result.signed:
        console.print(f"  signed for  chain {client.deployment.chain_id}, registry {client.deployment.registry}")
    for d in result.datasets_registered:
        console.print(f"  dataset     {escape(str(d))} registered")
    if result.node_url:
        console.print(f"  handed to   {escape(str(result.node_url))}")


@adapter_app.command("register-dataset")
def adapter_register_dataset(
    name: Annotated[str, typer.Argument(help="The dataset's name, as adapters list it (--dataset NAME=...).")],
    key: Annotated[Path, typer.Option(help="Identity file of the contributor (pays gas, is paid the shares).")],
    deployment: Annotated[
        Path, typer.Option(help="Deployment file with the contract addresses.")
    ] = DEFAULT_DEPLOYMENT_PATH,
    rpc: Annotated[str | None, typer.Option(help="JSON-RPC URL of the chain (default: the deployment's).")] = None,
    file: Annotated[Path | None, typer.Option(help="Record sha256 of this file as the dataset's content hash.")] = None,
) -> None:
    """Register your dataset on chain: its id is bound to your address, so only you can, and its
    shares in any adapter that lists it are paid to you. Needed before someone else publishes an
    adapter listing it (a publisher's own datasets are registered by `adapter publish`)."""
    from common.identity import load_identity
    from common.wire import ZERO_ID
    from ledger.chain import ChainClient
    from ledger.errors import UnknownDataset
    from ledger.types import registry_name_problem
    from node.adapters.verify import file_sha256

    if (why := registry_name_problem(name)) is not None:
        raise typer.BadParameter(f"{name!r} {why}: the registry refuses it (e.g. capitals-qa)", param_hint="NAME")
    identity = load_identity(key)
    client = ChainClient.from_deployment(deployment, identity.account, rpc_url=rpc)
    dataset_id = client.dataset_id(name)
    try:
        info = client.get_dataset(dataset_id)
        console.print(f"already registered: {escape(name)}\n  dataset id  {dataset_id}\n  payee       {info.payee}")
        return
    except UnknownDataset:
        pass
    content = "0x" + file_sha256(file) if file is not None else ZERO_ID
    client.register_dataset(name, content)
    console.print(f"[green]registered[/] {escape(name)}\n  dataset id  {dataset_id}\n  contributor {identity.address}")


@adapter_app.command("fetch")
def adapter_fetch(
    adapter_id: Annotated[str, typer.Argument(help="Id (0x + 64 hex) of a registered adapter.")],
    store: Annotated[Path, typer.Option(help="Adapter store folder to install it into.")],
    bootstrap: Annotated[list[str], typer.Option(help="Peer multiaddr (…/p2p/<peer id>) to join through; repeatable.")],
    deployment: Annotated[
        Path, typer.Option(help="Deployment file: the adapter's owner is read from the chain.")
    ] = DEFAULT_DEPLOYMENT_PATH,
    rpc: Annotated[str | None, typer.Option(help="Chain JSON-RPC URL (default: the deployment's).")] = None,
    base: Annotated[Path | None, typer.Option(help="Also check the package fits this base model folder.")] = None,
    listen: Annotated[
        str, typer.Option(help="libp2p listen multiaddr of this short-lived peer.")
    ] = "/ip4/127.0.0.1/tcp/0",
) -> None:
    """Fetch a package from the p2p mesh into a store, verifying every byte and the owner's signature."""
    from common.identity import Identity
    from ledger.chain import ChainClient
    from node.adapters import AdapterStore
    from node.adapters.manifest import check_id
    from node.p2p import P2PConfig, P2PNode
    from node.registration import owner_lookup

    check_id(adapter_id)
    client = ChainClient.from_deployment(deployment, rpc_url=rpc)
    owner_of = owner_lookup(client)
    p2p = P2PNode(
        seed=Identity.generate().node_seed,
        store=(into := AdapterStore(store, domain=client.domain)),
        owner_of=owner_of,
        config=P2PConfig(listen=listen, bootstrap=tuple(bootstrap)),
        base_dir=base,
    )
    with Progress(
        TextColumn("{task.fields[state]}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[peer]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("fetch", total=None, state="discovering", peer="")

        def show(t) -> None:
            progress.update(task, completed=t.done, total=t.total or None, state=t.state, peer=(t.peer_id or "")[:16])

        with p2p:
            pkg = p2p.fetch(adapter_id, on_progress=show)
    into.keep(adapter_id)  # fetched by the operator's hand: theirs, not a node's cache
    console.print(
        f"[green]fetched[/] {escape(pkg.name)} -> {escape(str(pkg.path))}"
        f"\n  signer      {pkg.signer} (the registered owner)"
    )


# ---- loramesh node run ----------------------------------------------------------------------------------


@node_app.callback()
def _node_group() -> None:
    """Run a node: the shared-base multi-LoRA engine behind the node HTTP API."""


def _identity(key: Path | None):
    from common.identity import Identity, load_identity

    if key is None:
        log.warning("no --key given: using an ephemeral node key; receipts will not verify after a restart")
        return Identity.generate()
    return load_identity(key)


@node_app.command("run")
def node_run(
    base: Annotated[
        Path | None, typer.Option("--base", help="Base model folder (Hugging Face safetensors). [required]")
    ] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Adapter store folder. [required]")] = None,
    port: Annotated[int | None, typer.Option("--port", min=0, max=65535, help="HTTP port. [required]")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to bind. [default: 127.0.0.1]")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda. [default: cpu]")] = None,
    slots: Annotated[
        int | None, typer.Option("--slots", min=1, help="Adapter slots on the device. [default: 8]")
    ] = None,
    key: Annotated[
        Path | None, typer.Option("--key", help="Identity file (password from LORAMESH_KEY_PASSWORD).")
    ] = None,
    max_lora_rank: Annotated[
        int | None,
        typer.Option(
            "--max-lora-rank",
            min=1,
            max=MAX_LORA_RANK,
            help=(
                "Largest adapter rank served (packages above the network's limit never verify). "
                f"[default: {MAX_LORA_RANK}]"
            ),
        ),
    ] = None,
    kv_blocks: Annotated[
        int | None, typer.Option("--kv-blocks", min=1, help="KV cache blocks (default: from memory).")
    ] = None,
    quantization: Annotated[
        str | None,
        typer.Option(
            "--quantization",
            help=(
                "Base weights' serving precision, quantized on load from the bf16/fp16/fp32 checkpoint; adapters "
                "stay in full precision and serve unchanged. none: full precision. int8: CPU or any GPU, about "
                "1/4 of fp32's (1/2 of bf16's) weight memory and faster decode: the pick on CPU. int4: CPU (and "
                "CUDA), about half of int8's layer bytes, larger logit error. fp8: Hopper (H100/H200) or Ada GPUs "
                "only, refused elsewhere: the pick on those. [default: none]"
            ),
        ),
    ] = None,
    kv_cache_dtype: Annotated[
        str | None,
        typer.Option(
            "--kv-cache-dtype",
            help=(
                "KV cache storage. auto: the activations' dtype. fp8: e4m3 with a scale per token and head, about "
                "half of bf16's bytes (a quarter of fp32's), so about twice the tokens in the same memory, for a "
                "few percent of logit error: CPU, or Hopper (H100/H200) / Ada GPUs. [default: auto]"
            ),
        ),
    ] = None,
    tensor_parallel: Annotated[
        int | None,
        typer.Option(
            "--tensor-parallel",
            min=1,
            help=(
                "Shard the base over N ranks of this host (GPUs cuda:0..N-1 over NCCL with --device cuda, else N "
                "processes over gloo); N must divide the attention heads and the MLP width, and divide the kv "
                "heads or be a multiple of them. Decode runs without CUDA graphs then. [default: 1]"
            ),
        ),
    ] = None,
    host_pool_buffers: Annotated[
        int | None,
        typer.Option(
            "--host-pool-buffers",
            min=0,
            help=(
                "CUDA: host buffers for adapters, pinned at start, each the size of a max-rank float32 package "
                "(168 MB for an 8B base at rank 16); a cold adapter is read into one and laid out on the GPU, "
                "and the host cache holds 2 fewer adapters than there are buffers. 0: none (adapters are laid "
                "out on the host, and pinned as they load). [default: 34, within 8 GiB]"
            ),
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads.")] = None,
    prefix_caching: Annotated[
        bool | None,
        typer.Option(
            "--prefix-caching/--no-prefix-caching",
            help="Share the KV of prompt prefixes across requests of the same adapter (or base-only) [default: on].",
        ),
    ] = None,
    speculative: Annotated[
        str | None,
        typer.Option(
            "--speculative",
            help=(
                "Speculative decoding. ngram: each decoding row drafts the tokens that followed the last earlier "
                "occurrence of its newest tokens in its prompt and output, verified in the same step (several "
                "tokens a step where outputs repeat their input; same greedy output, same sampling distribution). "
                "off: one token a row a step. [default: ngram]"
            ),
        ),
    ] = None,
    deployment: Annotated[
        Path | None,
        typer.Option(
            "--deployment", help="Deployment file: register this node on chain and check adapter owners there."
        ),
    ] = None,
    rpc: Annotated[str | None, typer.Option("--rpc", help="Chain JSON-RPC URL (default: the deployment's).")] = None,
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="libp2p listen multiaddr, e.g. /ip4/127.0.0.1/tcp/4001 (omit: no p2p)."),
    ] = None,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option("--bootstrap", help="Peer multiaddr (…/p2p/<peer id>) to join the mesh through; repeatable."),
    ] = None,
    gateway: Annotated[
        list[str] | None, typer.Option("--gateway", help="Gateway URL to send signed heartbeats to; repeatable.")
    ] = None,
    adapter_source: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter-source",
            help="HTTP registry of adapter packages (URL/<adapter id>.tar, as `adapter export` writes them), tried "
            "after the peers; every byte is checked as an upload is; repeatable.",
        ),
    ] = None,
    api_url: Annotated[
        str | None, typer.Option("--api-url", help="URL gateways use to reach this node (default http://HOST:PORT).")
    ] = None,
    pin: Annotated[list[str] | None, typer.Option("--pin", help="Adapter id to hold in a slot; repeatable.")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Node data folder; holds operator.token (made on first start). Default .loramesh/node. "
            "[env var: LORAMESH_NODE_DATA_DIR]",
        ),
    ] = None,
    trust_gateway_key: Annotated[
        list[str] | None,
        typer.Option(
            "--trust-gateway-key",
            help="Gateway public key (64 hex) whose signed calls are served; repeatable (env: space-separated). "
            "Default: the keys the --gateway URLs announce. "
            "[env var: LORAMESH_NODE_TRUST_GATEWAY_KEYS]",
        ),
    ] = None,
    max_package_bytes: Annotated[
        int | None,
        typer.Option("--max-package-bytes", min=1, help="Largest adapter package accepted by upload (default 4 GiB)."),
    ] = None,
    max_cache_bytes: Annotated[
        int | None,
        typer.Option(
            "--max-cache-bytes",
            min=1,
            help="Disk the adapters this node fetched for requests may take together; past it the least recently "
            "used are deleted (none used in the last minute, loading, or being sent to a peer), else the fetch is "
            "refused (503). Uploads and pins are the operator's: never deleted, not counted. [default: 64 GiB]",
        ),
    ] = None,
    min_free_disk_bytes: Annotated[
        int | None,
        typer.Option(
            "--min-free-disk-bytes",
            min=0,
            help="Free space a fetch leaves on the store's disk, deleting fetched adapters as above to keep it. "
            "[default: 1 GiB]",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML file of settings (the option names with _ for -, lists for repeatable ones: "
            "gateways, pins, bootstrap, trust_gateway_keys); flags and LORAMESH_NODE_<NAME> win over "
            "it.",
        ),
    ] = None,
) -> None:
    """Serve the node API until SIGINT/SIGTERM (in-flight requests are aborted with receipts).

    With --deployment the node registers itself on chain (operator = the key's address) and only
    accepts adapters signed by their registered owner; with --listen it joins the p2p mesh and
    fetches adapters it lacks from peers; with --gateway it heartbeats to those gateways.
    Generation is served only to gateways it trusts (--trust-gateway-key, else the --gateway URLs' keys);
    upload needs the operator's token (`Authorization: Bearer`, from <data dir>/operator.token), which
    load/pin and abort take too.
    """
    from common.serving import listening_socket, serve
    from common.settings import SettingsError
    from common.wire import restore_recursion_limit
    from node.adapters.basemodel import quiet_transformers
    from node.daemon import NodeDaemon
    from node.settings import NodeSettings

    quiet_transformers()
    try:
        settings = NodeSettings.load(
            config,
            base=base,
            store=store,
            port=port,
            host=host,
            device=device,
            slots=slots,
            key=key,
            max_lora_rank=max_lora_rank,
            kv_blocks=kv_blocks,
            threads=threads,
            prefix_caching=prefix_caching,
            speculative=speculative,
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
            tensor_parallel=tensor_parallel,
            host_pool_buffers=host_pool_buffers,
            deployment=deployment,
            rpc=rpc,
            listen=listen,
            bootstrap=bootstrap,
            gateways=gateway,
            adapter_sources=adapter_source,
            api_url=api_url,
            pins=pin,
            data_dir=data_dir,
            trust_gateway_keys=trust_gateway_key,
            max_package_bytes=max_package_bytes,
            max_cache_bytes=max_cache_bytes,
            min_free_disk_bytes=min_free_disk_bytes,
        )
    except SettingsError as e:
        raise typer.BadParameter(str(e)) from None
    if not (settings.base / "config.json").is_file():
        raise typer.BadParameter(
            f"{settings.base} is not a base model folder (config.json missing)", param_hint="--base"
        )
    if settings.deployment is not None and settings.key is None:
        raise typer.BadParameter("registering on chain needs the operator's identity file", param_hint="--key")
    try:  # both before the password is asked for and the weights load
        daemon_config, engine_config = settings.daemon_config(), settings.engine_config()
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    identity = _identity(settings.key)
    # the port before the engine: a busy one is said at once, not after minutes of loading weights
    sock = listening_socket(daemon_config.host, daemon_config.port, "node")
    daemon = NodeDaemon(daemon_config, engine_config, identity)
    restore_recursion_limit()  # py_ecc, imported with the chain libraries, raises it to 100,000
    log.info("node %s serving %s on %s", identity.node_id, daemon.engine.base_model_name, daemon_config.public_url)
    log.info("operator token (for upload, load/pin, abort) is in %s", daemon.operator_token_path)
    if daemon_config.trusted_gateway_keys:
        log.info("serving gateways with keys %s", ", ".join(k[:16] for k in daemon_config.trusted_gateway_keys))
    elif daemon_config.gateways:
        log.info("serving the gateways it heartbeats to, by the keys they announce")
    else:
        log.warning("no --gateway and no --trust-gateway-key: no gateway can send this node requests")
    # shutdown stops the heartbeats, the p2p host, the engine
    serve(daemon.app, host=daemon_config.host, port=daemon_config.port, name="node", sock=sock)


# `python -m node.cli`: this package's commands on their own (the `loramesh` root adds the other packages')
app = typer.Typer(
    help="loramesh node package: identities, base models, adapters, and the node.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(base_app, name="base")
app.add_typer(adapter_app, name="adapter")
app.add_typer(node_app, name="node")


if __name__ == "__main__":
    from common.logs import configure_logging

    configure_logging()
    plain_help(app)()  # here only: the `loramesh` root sets these same commands once, at its start
