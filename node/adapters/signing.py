"""EIP-712 signatures over adapter manifests: the publisher's EVM key vouches for a registration.

The signed message is exactly what AdapterRegistry.registerAdapter registers (ledger.types.
AdapterRegistration: adapter id, name, version, predecessor, base model, price, dataset ids and
shares), read from the manifest, under the domain {name "loramesh", version "2", chain id, the
registry's address}. The registry recomputes it and requires the sender to be the signer, so the
chain holds what the manifest says; a node recomputes it from the manifest, so a package whose
manifest differs from what its publisher signed (and registered) is refused.

`signature.json` = {"adapter_id", "signer", "signature", "chain_id", "registry"}. chain_id and
registry are null for an offline signature (made without a deployment: `adapter pack` without one):
it proves who packed it but no registry accepts it; `adapter publish` signs again for its chain.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from common.wire import UntrustedJSONError, canonical_json, parse_json
from ledger.types import EIP712_NAME, EIP712_VERSION, Domain
from node.adapters.errors import ForeignSignature, PackageError, shown
from node.adapters.limits import MAX_SIGNATURE_BYTES
from node.adapters.manifest import SIGNATURE_FILE, Manifest

SIGNATURE_KEYS = frozenset({"adapter_id", "signer", "signature", "chain_id", "registry"})


class _Offline:
    """The EIP-712 domain of an offline signature: name and version only, valid on no registry."""

    chain_id = None
    registry = None

    @staticmethod
    def as_eip712() -> dict:
        return {"name": EIP712_NAME, "version": EIP712_VERSION}


OFFLINE = _Offline()


def describe(domain: Domain | None) -> str:
    """A domain in words, for messages."""
    if domain is None:
        return "no deployment (an offline signature)"
    return f"chain {domain.chain_id}, registry {domain.registry}"


def sign_manifest(manifest: Manifest, account: LocalAccount, domain: Domain | None = None) -> dict:
    """The signature document for `manifest`, valid on `domain`'s registry (None: offline)."""
    reg = manifest.registration()
    signature = reg.sign(account, domain if domain is not None else OFFLINE)
    return {
        "adapter_id": manifest.adapter_id,
        "signer": account.address,
        "signature": signature,
        "chain_id": domain.chain_id if domain else None,
        "registry": domain.registry if domain else None,
    }


def signature_domain(signature_doc: dict) -> Domain | None:
    """The domain a signature document claims (None: offline); PackageError when malformed."""
    chain_id, registry = signature_doc.get("chain_id"), signature_doc.get("registry")
    if chain_id is None and registry is None:
        return None
    try:
        if isinstance(chain_id, bool) or not isinstance(chain_id, int) or not isinstance(registry, str):
            raise ValueError("chain_id must be an integer and registry an address")
        return Domain(chain_id, registry)
    except ValueError as e:
        raise PackageError(f"{SIGNATURE_FILE} names a malformed domain: {e}") from e


def recover_signer(
    manifest: Manifest, signature_doc: dict, *, domain: Domain | None = None, any_domain: bool = True
) -> str:
    """Check the signature document against `manifest` and return the checksummed signer address.

    With `any_domain=False` the signature must be for `domain` (a node's registry); otherwise the
    document's own domain is used, whichever it is."""
    if not isinstance(signature_doc, dict) or set(signature_doc) != SIGNATURE_KEYS:
        if isinstance(signature_doc, dict) and set(signature_doc) == {"adapter_id", "signer", "signature"}:
            raise ForeignSignature(
                f"{SIGNATURE_FILE} is in the old format (not bound to a chain and registry): "
                "sign it again with `loramesh adapter publish`"
            )
        raise PackageError(f"{SIGNATURE_FILE} must hold exactly " + ", ".join(sorted(SIGNATURE_KEYS)))
    if signature_doc["adapter_id"] != manifest.adapter_id:
        raise PackageError(
            f"manifest does not match its signature: it hashes to {manifest.adapter_id}, "
            f"the signature is for {shown(signature_doc['adapter_id'], 80)} (edited after signing?)"
        )
    signed_for = signature_domain(signature_doc)
    if not any_domain and signed_for != domain:
        raise ForeignSignature(
            f"package is signed for {describe(signed_for)}, not for this registry ({describe(domain)}): "
            "publish it there (`loramesh adapter publish` signs it for its deployment)"
        )
    try:
        recovered = manifest.registration().recover(
            signature_doc["signature"], signed_for if signed_for is not None else OFFLINE
        )
        claimed = to_checksum_address(signature_doc["signer"])
    except Exception as e:  # eth-account raises several types for malformed signatures
        raise PackageError(f"{SIGNATURE_FILE} holds a malformed signature: {e}") from e
    if recovered != claimed:
        raise PackageError(f"signature was made by {recovered}, not by the claimed signer {claimed}")
    return recovered


def read_signature(pkg_dir: Path) -> dict:
    """Load `signature.json` from a package folder (a plain file, parsed within limits)."""
    path = pkg_dir / SIGNATURE_FILE
    if path.is_symlink():
        raise PackageError(f"{SIGNATURE_FILE} is a symbolic link; packages hold plain files only")
    if not path.is_file():
        raise PackageError(f"{pkg_dir.name} is not signed: {SIGNATURE_FILE} is missing")
    if path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise PackageError(f"{SIGNATURE_FILE} is larger than {MAX_SIGNATURE_BYTES} bytes")
    return parse_signature(path.read_bytes())


def parse_signature(data: bytes) -> dict:
    """The signature document in `data` (from a file, an upload or a peer), parsed within limits."""
    try:
        doc = parse_json(data, max_bytes=MAX_SIGNATURE_BYTES, max_depth=2, what=SIGNATURE_FILE)
    except UntrustedJSONError as e:
        raise PackageError(str(e)) from None
    if not isinstance(doc, dict):
        raise PackageError(f"{SIGNATURE_FILE} is not a JSON object")
    return doc


def write_signature(pkg_dir: Path, signature_doc: dict) -> None:
    """Write (or replace) `signature.json` atomically; a read-only old one is replaced too."""
    tmp = pkg_dir / f".{SIGNATURE_FILE}.{secrets.token_hex(4)}.tmp"
    tmp.write_bytes(canonical_json(signature_doc))
    os.replace(tmp, pkg_dir / SIGNATURE_FILE)
