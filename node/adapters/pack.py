"""Packing: wrap a PEFT adapter folder into a signed loramesh package."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

from eth_account.signers.local import LocalAccount

from common.wire import canonical_json
from ledger.types import MAX_DATASETS, Domain
from node.adapters.basemodel import base_model_id, base_model_name, read_config
from node.adapters.errors import PackageError
from node.adapters.limits import MAX_FILES
from node.adapters.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BaseModelRef,
    DatasetShare,
    FileEntry,
    LoraInfo,
    Manifest,
    check_adapter_name,
    check_adapter_version,
    check_extra_bytes,
    check_price,
)
from node.adapters.signing import sign_manifest, write_signature
from node.adapters.verify import VerifiedPackage, file_sha256, verify_package
from node.adapters.weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_lora_tensors,
    is_pickle_file,
    read_lora_config,
    read_peft_config,
    read_safetensors_header,
)

log = logging.getLogger(__name__)


def build_manifest(
    pkg_dir: Path,
    *,
    name: str,
    base_dir: Path,
    datasets: Iterable[DatasetShare] = (),
    price_per_1k_tokens: int = 0,
    version: str = "1",
    predecessor: str | None = None,
    license: str = "apache-2.0",
) -> Manifest:
    """A manifest describing the files now in `pkg_dir` (no checks on their contents)."""
    lora = read_lora_config(pkg_dir)
    files = tuple(
        FileEntry(path=p.name, sha256=file_sha256(p), size=p.stat().st_size)
        for p in sorted(pkg_dir.iterdir())
        if p.is_file() and p.name not in (MANIFEST_FILE, SIGNATURE_FILE)
    )
    return Manifest(
        name=name,
        version=version,
        predecessor=predecessor,
        base_model=BaseModelRef(name=base_model_name(base_dir), id=base_model_id(base_dir)),
        files=files,
        datasets=tuple(datasets),
        price_per_1k_tokens=price_per_1k_tokens,
        license=license,
        lora=LoraInfo(rank=lora.rank, alpha=lora.alpha, targets=lora.targets),
    )


def write_signed(pkg_dir: Path, manifest: Manifest, account: LocalAccount, domain: Domain | None = None) -> None:
    """Write the manifest and its signature for `domain`'s registry (None: offline) into `pkg_dir`."""
    (pkg_dir / MANIFEST_FILE).write_bytes(manifest.canonical_bytes())
    (pkg_dir / SIGNATURE_FILE).write_bytes(canonical_json(sign_manifest(manifest, account, domain)))


def sign_package(pkg_dir: str | Path, account: LocalAccount, domain: Domain | None) -> VerifiedPackage:
    """(Re-)sign a package folder for `domain`'s registry: its manifest, hence its adapter id, is
    unchanged; only signature.json is replaced. Refuses a package another key signed."""
    pkg_dir = Path(pkg_dir)
    pkg = verify_package(pkg_dir, require_signature=False)
    if pkg.signer is not None and pkg.signer != account.address:
        raise PackageError(f"package is signed by {pkg.signer}, but the key given is {account.address}")
    write_signature(pkg_dir, sign_manifest(pkg.manifest, account, domain))
    return verify_package(pkg_dir, domain=domain)


def resolve_base_dir(peft_dir: Path, base_dir: str | Path | None) -> Path:
    """The base model folder: the one given, else the one the PEFT config names if it exists here."""
    if base_dir is not None:
        return Path(base_dir)
    read_lora_config(peft_dir)  # bounded parse and the allow-list before any field is used
    named = read_peft_config(peft_dir).get("base_model_name_or_path")
    if isinstance(named, str) and named and (Path(named) / "config.json").is_file():
        return Path(named)
    raise PackageError(f"the base model {named!r} named by the adapter is not a local folder: pass --base DIR")


def _package_files(peft_dir: Path) -> list[Path]:
    """The files of a PEFT folder a package takes: the plain files in it (its config, its weights, a model
    card). A symbolic link is left out, with a warning: a folder cloned from someone else can hold
    README.md -> ~/.ssh/id_ed25519, and the target's bytes would be signed and sent to every node that serves
    the adapter. Subfolders (a training run's checkpoints) are not packed."""
    files = []
    for p in sorted(peft_dir.iterdir()):
        if p.name in (MANIFEST_FILE, SIGNATURE_FILE):
            continue
        if p.is_symlink():
            log.warning("left out %s: a symbolic link (a package takes the files in the folder itself)", p.name)
        elif p.is_file():
            files.append(p)
    return files


def pack_adapter(
    peft_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    account: LocalAccount,
    base_dir: str | Path | None = None,
    datasets: Iterable[DatasetShare] = (),
    price_per_1k_tokens: int = 0,
    version: str = "1",
    predecessor: str | None = None,
    license: str = "apache-2.0",
    domain: Domain | None = None,
) -> VerifiedPackage:
    """Check a PEFT LoRA folder against its base, copy it to `out_dir`, sign it for `domain`'s registry
    (None: an offline signature, which `adapter publish` replaces), and verify the result."""
    peft_dir, out_dir = Path(peft_dir), Path(out_dir)
    check_adapter_name(name)  # what the registry would refuse, refused before anything is written
    check_adapter_version(version)
    check_price(price_per_1k_tokens)
    datasets = tuple(datasets)
    if len(datasets) > MAX_DATASETS:
        raise PackageError(f"{len(datasets)} datasets: an adapter pays at most {MAX_DATASETS} (the registry's limit)")
    if not peft_dir.is_dir():
        raise PackageError(f"{peft_dir} is not a folder")
    for required in (CONFIG_FILE, WEIGHTS_FILE):  # what the package cannot do without is not left out
        if (peft_dir / required).is_symlink():
            raise PackageError(
                f"{peft_dir / required} is a symbolic link: pack a folder that holds the file itself (cp -L)"
            )
    lora = read_lora_config(peft_dir)
    if not (peft_dir / WEIGHTS_FILE).is_file():
        raise PackageError(f"{peft_dir} has no {WEIGHTS_FILE}: not a PEFT LoRA adapter saved with safetensors")
    for p in peft_dir.iterdir():
        if is_pickle_file(p.name):
            raise PackageError(f"pickle weight file {p.name!r} refused: save the adapter with safetensors")
    base = resolve_base_dir(peft_dir, base_dir)
    check_lora_tensors(read_safetensors_header(peft_dir / WEIGHTS_FILE), lora, read_config(base))
    files = _package_files(peft_dir)
    if len(files) > MAX_FILES:  # what every node's manifest check refuses, refused before anything is copied
        raise PackageError(f"{peft_dir} holds {len(files)} files; a package holds at most {MAX_FILES}")
    check_extra_bytes([(p.name, p.stat().st_size) for p in files])
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PackageError(f"output folder {out_dir} is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # written beside it and renamed into place when whole: a process killed mid-pack leaves no half package
    # at out_dir (which the next pack would refuse as not empty)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()  # by the umask, as the folder it becomes
    try:
        for p in files:
            shutil.copyfile(p, tmp / p.name)
        manifest = build_manifest(
            tmp,
            name=name,
            base_dir=base,
            datasets=datasets,
            price_per_1k_tokens=price_per_1k_tokens,
            version=version,
            predecessor=predecessor,
            license=license,
        )
        write_signed(tmp, manifest, account, domain)
        os.replace(tmp, out_dir)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return verify_package(out_dir, base_dir=base, domain=domain)
