"""The package manifest `loramesh.json`: its schema, canonical bytes and the adapter id derived from them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from eth_utils import is_checksum_address
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.wire import HEX_ID_PATTERN, ZERO_ID, UntrustedJSONError, canonical_json, is_id, parse_json, sha256_hex
from ledger.types import (
    MAX_DATASETS,
    MAX_PRICE_PER_1K_TOKENS,
    AdapterRegistration,
    adapter_version_problem,
    checked_address,
    dataset_id_for,
    registry_name_problem,
)
from node.adapters.errors import PackageError, shown
from node.adapters.limits import (
    MAX_ADAPTER_CONFIG_BYTES,
    MAX_BASE_NAME_CHARS,
    MAX_EXTRA_BYTES,
    MAX_FILES,
    MAX_LORA_ALPHA,
    MAX_LORA_RANK,
    MAX_MANIFEST_BYTES,
)
from node.adapters.weights import CONFIG_FILE, LORA_TARGETS, WEIGHTS_FILE

MANIFEST_FILE = "loramesh.json"
SIGNATURE_FILE = "signature.json"
RESERVED_FILES = frozenset({MANIFEST_FILE, SIGNATURE_FILE})
FORMAT = "loramesh-adapter/1"
# Flat, plain file names only: no folders, no "..", no hidden files, nothing a shell would expand.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Id = Annotated[str, Field(pattern=f"^{HEX_ID_PATTERN}$")]


def dataset_id(name: str, contributor: str) -> str:
    """A dataset's on-chain id, bound to its contributor: keccak256(abi.encode(contributor,
    keccak256(name))), as AdapterRegistry.registerDataset computes it from the registering address."""
    return dataset_id_for(contributor, name)


def check_adapter_name(name: str) -> str:
    """`name` if the registry accepts it as an adapter name (1..64 bytes of [a-z0-9._/-], starting with
    [a-z0-9], never with "0x"), else a one-line PackageError."""
    if (why := registry_name_problem(name)) is not None:
        raise PackageError(f"adapter name {name!r} {why}: the registry refuses it (e.g. alice/capitals)")
    return name


def check_dataset_name(name: str) -> str:
    """`name` if the registry accepts it as a dataset name (the rule of adapter names), else a one-line
    PackageError."""
    if (why := registry_name_problem(name)) is not None:
        raise PackageError(f"dataset name {name!r} {why}: the registry refuses it (e.g. capitals-qa)")
    return name


def check_adapter_version(version: str) -> str:
    """`version` if the registry accepts it (1..32 bytes of [0-9A-Za-z.+-]), else a one-line PackageError."""
    if (why := adapter_version_problem(version)) is not None:
        raise PackageError(f"adapter version {version!r} {why}: the registry refuses it (e.g. 1.0.0)")
    return version


def check_price(price_per_1k_tokens: int) -> int:
    """`price_per_1k_tokens` if the registry accepts it (0..2**128 - 1 wei), else a one-line PackageError."""
    if not isinstance(price_per_1k_tokens, int) or not 0 <= price_per_1k_tokens <= MAX_PRICE_PER_1K_TOKENS:
        raise PackageError(
            f"price {price_per_1k_tokens!r} per 1,000 tokens is not between 0 and 2**128 - 1 wei: "
            "the registry refuses it"
        )
    return price_per_1k_tokens


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    path: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, Field(ge=0)]

    @field_validator("path")
    @classmethod
    def _safe(cls, v: str) -> str:
        check_file_name(v)
        return v


class DatasetShare(_Strict):
    name: str
    id: Id
    contributor: str
    share_bps: Annotated[int, Field(ge=0, le=10_000)]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # the registry's rule: a package built elsewhere with a name it refuses fails here, not at registration
        if (why := registry_name_problem(v)) is not None:
            raise ValueError(f"dataset name {v!r} {why}")
        return v

    @field_validator("contributor")
    @classmethod
    def _address(cls, v: str) -> str:
        if not is_checksum_address(v):
            raise ValueError(f"contributor {v!r} is not a checksummed EVM address")
        return v


class BaseModelRef(_Strict):
    # a human name, printed by the CLI and in errors: printable, one line (red team: a signed name forged a
    # "signer" line in `adapter verify`, and 500 KB of it went into errors)
    name: Annotated[str, Field(min_length=1, max_length=MAX_BASE_NAME_CHARS)]
    id: Id

    @field_validator("name")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not v.isprintable():
            raise ValueError("a base model's name is printable characters on one line")
        return v


class LoraInfo(_Strict):
    rank: Annotated[int, Field(strict=True, ge=1, le=MAX_LORA_RANK)]
    alpha: Annotated[float, Field(gt=0, le=MAX_LORA_ALPHA, allow_inf_nan=False)]
    targets: tuple[str, ...]

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # as pack writes them (the config's, sorted and unique): what a node's bound on the weights is counted
        # from (review: one target listed 20,000 times made the bound 3,400 times an honest adapter's)
        if not v or any(t not in LORA_TARGETS for t in v) or list(v) != sorted(set(v)):
            raise ValueError(f"targets are one or more of {list(LORA_TARGETS)}, sorted, each once")
        return v


class Manifest(_Strict):
    format: str = FORMAT
    name: str
    version: str
    predecessor: Id | None = None
    base_model: BaseModelRef
    # bounded here, before the entries are read one by one (a fetch's and an upload's own checks came after: 10,000
    # entries with one name twice cost a node's p2p loop 1.1 s; complexity red team)
    files: Annotated[tuple[FileEntry, ...], Field(max_length=MAX_FILES)]
    datasets: tuple[DatasetShare, ...] = ()
    price_per_1k_tokens: Annotated[int, Field(ge=0, le=MAX_PRICE_PER_1K_TOKENS)] = 0
    license: str = "apache-2.0"
    lora: LoraInfo

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v != FORMAT:
            raise ValueError(f"unknown manifest format {v!r}, expected {FORMAT!r}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if (why := registry_name_problem(v)) is not None:
            raise ValueError(f"adapter name {v!r} {why}")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if (why := adapter_version_problem(v)) is not None:
            raise ValueError(f"adapter version {v!r} {why}")
        return v

    @field_validator("files")
    @classmethod
    def _extras(cls, v: tuple[FileEntry, ...]) -> tuple[FileEntry, ...]:
        seen: set[str] = set()
        for f in v:  # two sizes for one name: the bounds would see one, a fetch write both
            if f.path in seen:
                raise ValueError(f"file {f.path!r} is listed twice")
            seen.add(f.path)
        check_extra_bytes([(f.path, f.size) for f in v])
        return v

    @field_validator("datasets")
    @classmethod
    def _shares(cls, v: tuple[DatasetShare, ...]) -> tuple[DatasetShare, ...]:
        if len(v) > MAX_DATASETS:
            raise ValueError(f"{len(v)} datasets: an adapter pays at most {MAX_DATASETS}")
        if sum(d.share_bps for d in v) > 10_000:
            raise ValueError("dataset shares add up to more than 10000 basis points")
        if len({d.id for d in v}) != len(v):
            raise ValueError("a dataset is listed twice")
        for d in v:
            if d.id != dataset_id(d.name, d.contributor):
                raise ValueError(
                    f"dataset {d.name!r} has id {d.id}, expected the id of {d.name!r} contributed by {d.contributor}"
                )
        return v

    def canonical_bytes(self) -> bytes:
        """The bytes the adapter id and the signature are computed over."""
        return canonical_json(self.model_dump(mode="json"))

    @property
    def adapter_id(self) -> str:
        return sha256_hex(self.canonical_bytes())

    def registration(self) -> AdapterRegistration:
        """What registerAdapter registers for this manifest, which is also what the publisher signs."""
        return AdapterRegistration.of(
            self.adapter_id,
            name=self.name,
            version=self.version,
            base_model=self.base_model.id,
            price_per_1k_tokens=self.price_per_1k_tokens,
            datasets=[(d.id, d.share_bps) for d in self.datasets],
            predecessor=self.predecessor or ZERO_ID,
        )


def make_dataset_share(name: str, contributor: str, share_bps: int) -> DatasetShare:
    """A dataset share with its id computed from its name and contributor, the address checksummed; a name the
    registry refuses is a one-line PackageError."""
    check_dataset_name(name)
    try:  # a mixed-case address with a wrong checksum is a typo, refused: this address is paid
        address = checked_address(contributor)
    except ValueError as e:
        raise ValueError(f"contributor {e}") from e
    return DatasetShare(name=name, id=dataset_id(name, address), contributor=address, share_bps=share_bps)


def check_file_name(name: str) -> None:
    """Refuse a package file name that could escape the package folder or is otherwise unsafe."""
    if name.startswith("/") or "\\" in name or ".." in name.split("/") or "/" in name:
        raise PackageError(f"file name {shown(name, 128)} escapes the package folder")
    # fullmatch: `$` under match() also matches before a final newline, which let "adapter_model.bin\n" in
    if not _SAFE_NAME.fullmatch(name) or name in RESERVED_FILES:
        raise PackageError(f"file name {shown(name, 128)} is not allowed in a package")


def check_extra_bytes(files: list[tuple[str, int]]) -> None:
    """Refuse a package whose files (name, size) beside its weights exceed what they may hold: its config
    MAX_ADAPTER_CONFIG_BYTES (what a reader parses), the others MAX_EXTRA_BYTES together."""
    for name, size in files:
        if name == CONFIG_FILE and size > MAX_ADAPTER_CONFIG_BYTES:
            raise PackageError(f"{CONFIG_FILE} is {size} bytes; at most {MAX_ADAPTER_CONFIG_BYTES} are read")
    extra = sum(size for name, size in files if name not in (CONFIG_FILE, WEIGHTS_FILE))
    if extra > MAX_EXTRA_BYTES:
        raise PackageError(
            f"the files beside {CONFIG_FILE} and {WEIGHTS_FILE} hold {extra} bytes; a package holds at most "
            f"{MAX_EXTRA_BYTES} more (a model card, a license)"
        )


def read_manifest(pkg_dir: Path) -> Manifest:
    """Parse and validate `loramesh.json`; every problem becomes a one-line PackageError."""
    path = pkg_dir / MANIFEST_FILE
    if path.is_symlink():
        raise PackageError(f"{MANIFEST_FILE} is a symbolic link; packages hold plain files only")
    if not path.is_file():
        raise PackageError(f"{pkg_dir.name} is not an adapter package: {MANIFEST_FILE} is missing")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise PackageError(f"{MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes")
    return parse_manifest_bytes(path.read_bytes())


def parse_manifest_bytes(data: bytes) -> Manifest:
    """Validate the bytes of a `loramesh.json` from anywhere (a file, an upload, a peer): bounded parse,
    schema, and the bytes must be exactly the manifest's canonical form, so one adapter id has one
    manifest (no duplicate keys, reordering or spacing that the id would not see)."""
    try:
        raw = parse_json(data, max_bytes=MAX_MANIFEST_BYTES, max_depth=8, what=MANIFEST_FILE)
    except UntrustedJSONError as e:
        raise PackageError(str(e)) from None
    manifest = parse_manifest(raw)
    if bytes(data) != manifest.canonical_bytes():
        raise PackageError(
            f"{MANIFEST_FILE} is not in canonical form (sorted keys, no spaces, every field "
            "written out): its bytes are not the ones its adapter id is computed over"
        )
    return manifest


def parse_manifest(raw: object) -> Manifest:
    """Validate a decoded manifest document."""
    if isinstance(raw, dict) and isinstance(raw.get("files"), list):
        for entry in raw["files"]:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                check_file_name(entry["path"])  # a path escape gets its own message, not a schema error
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise PackageError(f"{MANIFEST_FILE} is invalid at {shown(where, 128)[1:-1]}: {first['msg']}") from e


def check_id(value: str, what: str = "adapter id") -> str:
    """Return `value` if it is a 0x + 64 lowercase hex id, else raise ValueError naming it."""
    if not is_id(value):
        raise ValueError(f"{what} {value!r} is not 0x followed by 64 lowercase hex digits")
    return value
