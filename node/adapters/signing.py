"""EIP-712 signatures over adapter manifests: the publisher's EVM key vouches for the adapter id."""

from __future__ import annotations

import json
from pathlib import Path

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from node.adapters.errors import PackageError
from node.adapters.manifest import SIGNATURE_FILE, Manifest

DOMAIN = {"name": "loramesh", "version": "1"}
TYPES = {
    "AdapterManifest": [
        {"name": "adapterId", "type": "bytes32"},
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
    ]
}


def _typed(manifest: Manifest):
    message = {"adapterId": bytes.fromhex(manifest.adapter_id[2:]), "name": manifest.name, "version": manifest.version}
    return encode_typed_data(domain_data=DOMAIN, message_types=TYPES, message_data=message)


def sign_manifest(manifest: Manifest, account: LocalAccount) -> dict:
    """The signature document for `manifest`: adapter id, signer address and the EIP-712 signature."""
    signed = account.sign_message(_typed(manifest))
    return {"adapter_id": manifest.adapter_id, "signer": account.address, "signature": "0x" + signed.signature.hex()}


def recover_signer(manifest: Manifest, signature_doc: dict) -> str:
    """Check the signature document against `manifest` and return the checksummed signer address."""
    if not isinstance(signature_doc, dict) or set(signature_doc) != {"adapter_id", "signer", "signature"}:
        raise PackageError(f"{SIGNATURE_FILE} must hold exactly adapter_id, signer and signature")
    if signature_doc["adapter_id"] != manifest.adapter_id:
        raise PackageError(
            f"manifest does not match its signature: it hashes to {manifest.adapter_id}, "
            f"the signature is for {signature_doc['adapter_id']} (edited after signing?)"
        )
    try:
        recovered = Account.recover_message(_typed(manifest), signature=signature_doc["signature"])
        claimed = to_checksum_address(signature_doc["signer"])
    except Exception as e:  # eth-account raises several types for malformed signatures
        raise PackageError(f"{SIGNATURE_FILE} holds a malformed signature: {e}") from e
    if recovered != claimed:
        raise PackageError(f"signature was made by {recovered}, not by the claimed signer {claimed}")
    return recovered


def read_signature(pkg_dir: Path) -> dict:
    """Load `signature.json` from a package folder."""
    path = pkg_dir / SIGNATURE_FILE
    if not path.is_file():
        raise PackageError(f"{pkg_dir} is not signed: {SIGNATURE_FILE} is missing")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise PackageError(f"{SIGNATURE_FILE} is not valid JSON: {e}") from e
