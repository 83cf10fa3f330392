"""The full package check: nothing is loaded or served before a package passes all of it."""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from eth_utils import to_checksum_address

from ledger.types import Domain
from node.adapters.basemodel import base_model_id_from_config, read_config
from node.adapters.errors import DamagedFiles, ForeignSignature, PackageError, shown
from node.adapters.manifest import (
    RESERVED_FILES,
    SIGNATURE_FILE,
    Manifest,
    check_file_name,
    parse_manifest_bytes,
    read_manifest,
)
from node.adapters.signing import parse_signature, read_signature, recover_signer, signature_domain
from node.adapters.weights import (
    CONFIG_FILE,
    HALF_MAX,
    WEIGHTS_FILE,
    LoraConfig,
    TensorInfo,
    check_lora_tensors,
    is_pickle_file,
    max_weights_bytes,
    read_lora_buffer,
    read_lora_config,
    read_safetensors_header,
)

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class VerifiedPackage:
    """A package folder that passed every check, with what the checks established."""

    path: Path
    manifest: Manifest
    adapter_id: str
    signer: str | None  # None only for an unsigned package checked with require_signature=False
    lora: LoraConfig
    domain: Domain | None = None  # the registry the signature is for; None: offline or unsigned
    # the weights file's header as verification checked it (name -> dtype, shape, byte range)
    tensors: dict[str, TensorInfo] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def peft_config(self) -> dict:
        from common.wire import parse_json
        from node.adapters.limits import MAX_ADAPTER_CONFIG_BYTES

        return parse_json(
            (self.path / CONFIG_FILE).read_bytes(), max_bytes=MAX_ADAPTER_CONFIG_BYTES, max_depth=8, what=CONFIG_FILE
        )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_files(pkg_dir: Path, manifest: Manifest, *, hashes: bool = True) -> None:
    """The folder holds exactly the manifest's files (plus manifest and signature) with their sizes and hashes."""
    listed = {f.path for f in manifest.files}
    for name in listed:
        if is_pickle_file(name):
            raise PackageError(f"pickle weight file {name!r} refused: only safetensors weights are loaded")
    present = set()
    for entry in pkg_dir.iterdir():
        if entry.name in RESERVED_FILES:
            continue
        if is_pickle_file(entry.name):
            raise PackageError(f"pickle weight file {entry.name!r} refused: only safetensors weights are loaded")
        if not entry.is_file() or entry.is_symlink():
            raise PackageError(f"{entry.name!r} is not a plain file; packages hold plain files only")
        check_file_name(entry.name)
        present.add(entry.name)
    if missing := sorted(listed - present):
        raise DamagedFiles(f"file {missing[0]!r} listed in the manifest is missing")
    if extra := sorted(present - listed):
        raise DamagedFiles(f"file {extra[0]!r} is not listed in the manifest")
    for entry in manifest.files:
        path = pkg_dir / entry.path
        size = path.stat().st_size
        if size != entry.size:
            raise DamagedFiles(f"file {entry.path!r} is {size} bytes, the manifest says {entry.size}")
        if hashes and file_sha256(path) != entry.sha256:
            raise DamagedFiles(
                f"file {entry.path!r} does not match its sha256 in the manifest (modified after signing)"
            )


def check_for_base(manifest: Manifest, base_config: dict) -> None:
    """The manifest is for this base, and its weights file is no larger than its rank and targets make it on this
    base: checked before a byte of the package is fetched, uploaded or hashed."""
    base_id = base_model_id_from_config(base_config)
    if manifest.base_model.id != base_id:
        raise PackageError(
            f"adapter is for base model {manifest.base_model.name} ({manifest.base_model.id}), "
            f"not this base ({base_id})"
        )
    limit = max_weights_bytes(manifest.lora.rank, manifest.lora.targets, base_config)
    size = next((f.size for f in manifest.files if f.path == WEIGHTS_FILE), 0)
    if size > limit:
        raise PackageError(
            f"{WEIGHTS_FILE} is {size} bytes; a rank {manifest.lora.rank} adapter of its "
            f"{len(manifest.lora.targets)} targets on this base is at most {limit}"
        )


def check_weights(
    pkg_dir: Path, manifest: Manifest, base_config: dict | None, *, values: bool = True
) -> tuple[LoraConfig, dict[str, TensorInfo]]:
    """PEFT config and safetensors header agree with each other, the manifest and (if given) the base;
    with `values`, every weight is finite and fits a slot of any dtype (reads the tensors). Returns the
    config and the checked header."""
    names = {f.path for f in manifest.files}
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in names:
            raise PackageError(f"package lacks {required}: not a PEFT LoRA adapter")
    lora = read_lora_config(pkg_dir)
    if (lora.rank, lora.alpha, lora.targets) != (manifest.lora.rank, manifest.lora.alpha, manifest.lora.targets):
        raise PackageError("manifest's lora section does not match adapter_config.json")
    tensors = read_safetensors_header(pkg_dir / WEIGHTS_FILE)
    check_lora_tensors(tensors, lora, base_config)
    if values:
        check_values(pkg_dir / WEIGHTS_FILE, tensors, lora)
    return lora, tensors


# Per float dtype: its bits as an unsigned integer, and the bits of +inf. With the sign bit cleared,
# a float's bits order as its magnitude does, and every NaN's bits lie above +inf's.
_FLOAT_BITS = {
    "F64": ("<u8", 0x7FF0000000000000),
    "F32": ("<u4", 0x7F800000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
}
_BITS_TO_FLOAT = {"F64": "<d", "F32": "<f", "F16": "<e"}  # BF16: the top half of an F32


def _largest_magnitude(data: memoryview, dtype: str) -> float:
    """max |x| over the little-endian floats in `data`: inf if any is infinite, nan if any is NaN."""
    import numpy as np

    uint, inf_bits = _FLOAT_BITS[dtype]
    bits = np.frombuffer(data, dtype=uint)
    top = int(np.bitwise_and(bits, np.iinfo(uint).max >> 1).max())
    if top > inf_bits:
        return math.nan
    if dtype == "BF16":
        top, dtype = top << 16, "F32"
    return struct.unpack(_BITS_TO_FLOAT[dtype], top.to_bytes(struct.calcsize(_BITS_TO_FLOAT[dtype]), "little"))[0]


def check_values(path: Path, tensors: dict[str, TensorInfo], lora: LoraConfig) -> None:
    """Every A value, and every B value times the scaling, is finite and fits float16, so the adapter
    loads into a slot of any dtype without turning into inf or NaN.

    Checked plainly (tests/node/adapters/test_check_values.py keeps that version as the reference), the rule
    widens every tensor to float64, scales it and scans it three times with torch: 0.1-0.3 s of CPU for a
    160 MB adapter, the largest part of a p2p install, and seconds on a busy machine, where torch's worker
    threads wait on each other for every small tensor. Here one single-threaded numpy pass per tensor over
    its bits finds the largest magnitude, NaN and inf included; scaling in float64 by a positive factor is monotonic,
    so that magnitude times the scaling is the largest |x * s|. The tensors are read into one
    reused buffer (an mmap would turn a file cut short while we read it into SIGBUS)."""
    buf = bytearray(max((t.nbytes for t in tensors.values()), default=0))
    with path.open("rb") as f:
        for name, info in tensors.items():
            if not info.nbytes:
                continue
            if info.dtype not in _FLOAT_BITS:  # check_lora_tensors ran first and refuses these; say so
                raise PackageError(f"{WEIGHTS_FILE}: tensor {shown(name, 128)} is not a float tensor")
            view = memoryview(buf)[: info.nbytes]
            f.seek(info.offset)
            if f.readinto(view) != info.nbytes:
                raise DamagedFiles(f"{path.name}: tensor {shown(name, 128)} was cut short after it was verified")
            largest = _largest_magnitude(view, info.dtype) * (lora.scaling if ".lora_B." in name else 1.0)
            if not largest <= HALF_MAX:  # also refuses nan
                raise PackageError(
                    f"{WEIGHTS_FILE}: tensor {shown(name, 128)} holds values that are not finite or exceed "
                    f"{HALF_MAX:g} (after lora_alpha / r scaling)"
                )


def verify_package(
    pkg_dir: str | Path,
    *,
    base_dir: str | Path | None = None,
    expected_owner: str | None = None,
    hashes: bool = True,
    domain: Domain | None = None,
    require_signature: bool = True,
    values: bool | None = None,
) -> VerifiedPackage:
    """Run every check on a package folder and return what it proved, or raise PackageError.

    `domain`: the registry the signature must be for (a node's deployment); None accepts any.
    `expected_owner`: the adapter's on-chain publisher, who must be the signer.
    `require_signature=False` lets an unsigned package, or one signed in the old unbound format, pass
    the other checks (signer None).
    `values`: read every weight to check it is finite and in range; None: when `hashes` (the files are
    read whole then anyway), so listing a store stays cheap."""
    pkg_dir = Path(pkg_dir)
    if not pkg_dir.is_dir():
        raise PackageError(f"{pkg_dir} is not a folder")  # the path the caller gave
    manifest = read_manifest(pkg_dir)
    base_config = None
    if base_dir is not None:
        base_config = read_config(base_dir)
        check_for_base(manifest, base_config)
    check_files(pkg_dir, manifest, hashes=hashes)
    signer, signed_for = None, None
    if require_signature or (pkg_dir / SIGNATURE_FILE).exists() or (pkg_dir / SIGNATURE_FILE).is_symlink():
        try:
            signer, signed_for = _check_signature(manifest, read_signature(pkg_dir), domain=domain)
        except ForeignSignature:
            if require_signature:
                raise
    _check_owner(signer, expected_owner)
    lora, tensors = check_weights(pkg_dir, manifest, base_config, values=hashes if values is None else values)
    return VerifiedPackage(
        path=pkg_dir,
        manifest=manifest,
        adapter_id=manifest.adapter_id,
        signer=signer,
        lora=lora,
        domain=signed_for,
        tensors=tensors,
    )


def verify_manifest_and_signature(
    manifest_bytes: bytes,
    signature_bytes: bytes,
    *,
    domain: Domain | None = None,
    expected_owner: str | None = None,
) -> tuple[Manifest, str]:
    """The checks that need no weights: a canonical manifest, a signature over it (for `domain`'s
    registry; None accepts any), made by `expected_owner` (the adapter's on-chain publisher) when given.
    Returns (manifest, signer) or raises PackageError. An upload or a fetch runs this on the first
    bytes it receives, before it writes any weights; verify_package still runs everything afterwards."""
    manifest = parse_manifest_bytes(manifest_bytes)
    signer, _ = _check_signature(manifest, parse_signature(signature_bytes), domain=domain)
    _check_owner(signer, expected_owner)
    return manifest, signer


def _check_signature(manifest: Manifest, doc: dict, *, domain: Domain | None) -> tuple[str, Domain | None]:
    return recover_signer(manifest, doc, domain=domain, any_domain=domain is None), signature_domain(doc)


def _check_owner(signer: str | None, expected_owner: str | None) -> None:
    if expected_owner is not None and signer != to_checksum_address(expected_owner):
        raise PackageError(f"package is signed by {signer}, but the adapter's registered owner is {expected_owner}")


def load_lora_buffer(pkg: VerifiedPackage, alloc=None) -> tuple:
    """The adapter's LoRA tensors, (buffer, {PEFT name: view}) as weights.read_lora_buffer reads them,
    at the byte ranges of the header verification checked (never pickle, never a second parser), so
    what verified is what loads. Not parsed again (4.7 ms of a 34 ms load at the 8B shape): the store's
    files are the node's own, and read_lora_buffer refuses a file cut short since."""
    return read_lora_buffer(pkg.weights_path, pkg.tensors, alloc)
