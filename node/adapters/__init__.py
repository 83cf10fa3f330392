"""Adapter packages: format, signing, verification and the content-addressed store."""

from node.adapters.errors import ForeignSignature, PackageError
from node.adapters.manifest import (
    LORA_TARGETS,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    DatasetShare,
    Manifest,
    dataset_id,
    make_dataset_share,
)
from node.adapters.pack import pack_adapter, sign_package
from node.adapters.store import AdapterStore
from node.adapters.verify import VerifiedPackage, load_lora_tensors, verify_package
from node.adapters.weights import LoraConfig

__all__ = [
    "LORA_TARGETS",
    "MANIFEST_FILE",
    "SIGNATURE_FILE",
    "AdapterStore",
    "DatasetShare",
    "ForeignSignature",
    "LoraConfig",
    "Manifest",
    "PackageError",
    "VerifiedPackage",
    "dataset_id",
    "load_lora_tensors",
    "make_dataset_share",
    "pack_adapter",
    "sign_package",
    "verify_package",
]
