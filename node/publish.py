"""Publishing: register an adapter (and its datasets) on chain, then hand the package to a node.

Re-publishing the same adapter id is a no-op; a new version is a new id whose manifest names its
predecessor, which must already be registered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ledger.chain import ChainClient
from ledger.errors import UnknownAdapter, UnknownDataset
from ledger.types import ZERO_ID
from node.adapters import PackageError, VerifiedPackage, verify_package
from node.upload import tar_package

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """Publishing was refused: the message says by whom and why."""


@dataclass(slots=True)
class PublishResult:
    adapter_id: str
    name: str
    registered: bool  # False: it was already on chain, nothing sent
    datasets_registered: list[str] = field(default_factory=list)
    node_url: str | None = None


def register_package(pkg: VerifiedPackage, client: ChainClient, *, dataset_hashes: dict[str, str] | None = None
                     ) -> PublishResult:
    """Register the package's datasets (if new) and the adapter (if new) from the signer's account."""
    if client.address != pkg.signer:
        raise PublishError(f"package is signed by {pkg.signer}, but the key given is {client.address}")
    m = pkg.manifest
    result = PublishResult(adapter_id=pkg.adapter_id, name=m.name, registered=False)
    try:
        existing = client.get_adapter(pkg.adapter_id)
    except UnknownAdapter:
        existing = None
    if existing is not None:
        if existing.owner != pkg.signer:
            raise PublishError(f"adapter {pkg.adapter_id} is already registered to {existing.owner}")
        log.info("adapter %s is already registered; nothing to do on chain", pkg.adapter_id)
        return result
    for d in m.datasets:
        try:
            client.get_dataset(d.id)
        except UnknownDataset:
            content = (dataset_hashes or {}).get(d.name, ZERO_ID)
            client.register_dataset(d.id, content, payee=d.contributor)
            result.datasets_registered.append(d.name)
    client.register_adapter(
        pkg.adapter_id, name=m.name, version=m.version, base_model=m.base_model.id,
        price_per_1k_tokens=m.price_per_1k_tokens, datasets=[(d.id, d.share_bps) for d in m.datasets],
        predecessor=m.predecessor or ZERO_ID,
    )
    result.registered = True
    return result


def upload_to_node(pkg: VerifiedPackage, node_url: str, *, timeout: float = 120.0) -> dict:
    """Send the package to a node, which verifies it against the chain, stores it and seeds it to peers."""
    url = node_url.rstrip("/") + "/v1/adapters"
    try:
        r = httpx.post(url, content=tar_package(pkg.path), headers={"content-type": "application/x-tar"},
                       timeout=timeout)
    except httpx.HTTPError as e:
        raise PublishError(f"node at {node_url} is unreachable: {e}") from e
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise PublishError(f"node at {node_url} refused the package ({r.status_code}): {message}")
    return r.json()


def publish(pkg_dir: str | Path, client: ChainClient, *, node_url: str | None = None,
            dataset_hashes: dict[str, str] | None = None) -> PublishResult:
    """Verify, register and (optionally) upload a package."""
    try:
        pkg = verify_package(pkg_dir)
    except PackageError as e:
        raise PublishError(f"package refused before publishing: {e}") from e
    result = register_package(pkg, client, dataset_hashes=dataset_hashes)
    if node_url:
        upload_to_node(pkg, node_url)
        result.node_url = node_url
    return result
