"""Adapter packages: format, signing, verification and the content-addressed store.

Importing this package is cheap: its names load on first use (PEP 562), so the engine can read
`node.adapters.limits` without loading the signing and chain libraries."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ForeignSignature": "node.adapters.errors",
    "PackageError": "node.adapters.errors",
    "LORA_TARGETS": "node.adapters.weights",
    "MANIFEST_FILE": "node.adapters.manifest",
    "SIGNATURE_FILE": "node.adapters.manifest",
    "DatasetShare": "node.adapters.manifest",
    "Manifest": "node.adapters.manifest",
    "dataset_id": "node.adapters.manifest",
    "make_dataset_share": "node.adapters.manifest",
    "MAX_LORA_RANK": "node.adapters.limits",
    "pack_adapter": "node.adapters.pack",
    "sign_package": "node.adapters.pack",
    "AdapterStore": "node.adapters.store",
    "VerifiedPackage": "node.adapters.verify",
    "load_lora_buffer": "node.adapters.verify",
    "verify_manifest_and_signature": "node.adapters.verify",
    "verify_package": "node.adapters.verify",
    "LoraConfig": "node.adapters.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'node.adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
