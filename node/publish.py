"""Publishing: sign for the chain, register an adapter (and the publisher's datasets), hand it to a node.

Re-publishing the same adapter id is a no-op. A name belongs to whoever registered it first: only
its owner publishes versions of it, and a new version names its predecessor of the same name. A
dataset's id is bound to its contributor: the publisher registers its own datasets; anyone else's
must already be registered by its contributor (who may since have moved its payouts to another payee:
settlement pays whoever the chain names). A package signed offline or
for another deployment is signed again here for this one (same manifest, same adapter id).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from common.wire import ZERO_ID
from ledger.chain import ChainClient
from ledger.errors import ContractError, UnknownAdapter, UnknownDataset
from node.adapters import PackageError, VerifiedPackage, sign_package, verify_package
from node.adapters.signing import read_signature
from node.operator_token import TOKEN_ENV, OperatorTokenError, local_data_dir, read_operator_token, token_path
from node.request_auth import BearerAuth
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
    signed: bool = False  # True: signature.json was (re)written for this deployment


def sign_for(pkg: VerifiedPackage, client: ChainClient) -> tuple[VerifiedPackage, bool]:
    """The package signed for the client's registry: as it is when it already is, else signed again
    with the client's key (only the key that signed it may). Returns (package, whether it was signed here)."""
    if pkg.signer is not None and pkg.signer != client.address:
        raise PublishError(f"package is signed by {pkg.signer}, but the key given is {client.address}")
    if pkg.signer is not None and pkg.domain == client.domain:
        return pkg, False
    try:
        return sign_package(pkg.path, client.account, client.domain), True
    except (PackageError, OSError) as e:
        raise PublishError(f"cannot sign {pkg.path} for this deployment: {e}") from e


def check_datasets(pkg: VerifiedPackage, client: ChainClient) -> list:
    """The manifest's datasets the publisher still has to register (its own); refuses, in one line, a
    dataset whose contributor on chain is not the manifest's or another contributor's unregistered dataset.
    The payee is the contributor's to move (setDatasetPayee) and is not compared."""
    missing = []
    for d in pkg.manifest.datasets:
        try:
            info = client.get_dataset(d.id)
        except UnknownDataset:
            if d.contributor != client.address:
                raise PublishError(
                    f"dataset {d.name!r} of contributor {d.contributor} is not on chain: its contributor registers it "
                    f"first (loramesh adapter register-dataset {d.name} --key <their key>)"
                ) from None
            missing.append(d)
            continue
        if info.contributor.lower() != d.contributor.lower():
            raise PublishError(
                f"dataset {d.name!r} ({d.id}) belongs to contributor {info.contributor} on chain, but "
                f"the manifest names {d.contributor}: refusing to publish"
            )
    return missing


def check_name(pkg: VerifiedPackage, client: ChainClient) -> None:
    """Refuse, in one line, a version the registry would refuse for its name or predecessor."""
    m = pkg.manifest
    owner = client.name_owner(m.name)
    if owner is not None and owner != client.address:
        raise PublishError(f"name {m.name!r} belongs to {owner}: only its owner publishes versions of it")
    if owner is None and m.predecessor:
        raise PublishError(f"name {m.name!r} has no versions yet, but the package names predecessor {m.predecessor}")
    if owner is not None and not m.predecessor:
        raise PublishError(
            f"name {m.name!r} already has versions: a new one names its predecessor "
            "(adapter pack --version N --predecessor 0x<id>)"
        )
    if m.predecessor:
        try:
            pred = client.get_adapter(m.predecessor)
        except UnknownAdapter:
            raise PublishError(f"predecessor {m.predecessor} is not registered") from None
        if pred.name != m.name:
            raise PublishError(f"predecessor {m.predecessor} is a version of {pred.name!r}, not of {m.name!r}")


def register_package(
    pkg: VerifiedPackage, client: ChainClient, *, dataset_hashes: dict[str, str] | None = None
) -> PublishResult:
    """Sign the package for the client's registry if needed, then register the publisher's new datasets and
    the adapter (if new) from the signer's account."""
    if pkg.signer is not None and client.address != pkg.signer:
        raise PublishError(f"package is signed by {pkg.signer}, but the key given is {client.address}")
    m = pkg.manifest
    result = PublishResult(adapter_id=pkg.adapter_id, name=m.name, registered=False)
    try:
        existing = client.get_adapter(pkg.adapter_id)
    except UnknownAdapter:
        existing = None
    pkg, result.signed = sign_for(pkg, client)
    if existing is not None:
        if existing.publisher != pkg.signer:
            raise PublishError(f"adapter {pkg.adapter_id} is already registered to {existing.publisher}")
        log.info("adapter %s is already registered; nothing to do on chain", pkg.adapter_id)
        return result
    check_name(pkg, client)
    for d in check_datasets(pkg, client):
        client.register_dataset(d.name, (dataset_hashes or {}).get(d.name, ZERO_ID))
        result.datasets_registered.append(d.name)
    signature = read_signature(pkg.path)["signature"]
    try:
        client.register_adapter(m.registration(), signature=signature)
    except ContractError as e:
        raise PublishError(f"the registry refused {m.name} v{m.version}: {e}") from e
    result.registered = True
    return result


_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def operator_token_for(node_url: str, token_file: str | Path | None = None) -> str:
    """The operator token to upload to `node_url` with: from `token_file`, else $LORAMESH_NODE_OPERATOR_TOKEN,
    else (for a node on this machine) the default node data folder's operator.token."""
    try:
        if token_file is not None:
            return read_operator_token(token_file)
        if token := os.environ.get(TOKEN_ENV, "").strip():
            return token
        local = token_path(local_data_dir())
        if urlsplit(node_url).hostname in _LOCAL_HOSTS and local.is_file():
            return read_operator_token(local)
    except OperatorTokenError as e:
        raise PublishError(str(e)) from None
    raise PublishError(
        f"uploading to the node at {node_url} needs its operator token: give --operator-token-file "
        f"(the node's <data dir>/operator.token) or set {TOKEN_ENV}"
    )


def upload_to_node(
    pkg: VerifiedPackage, node_url: str, *, operator_token: str | None = None, timeout: float = 120.0
) -> dict:
    """Send the package to a node, which verifies it against the chain, stores it and seeds it to peers.
    `operator_token`: the node operator's token (default: operator_token_for(node_url))."""
    url = node_url.rstrip("/") + "/v1/adapters"
    token = operator_token or operator_token_for(node_url)
    try:
        r = httpx.post(
            url,
            content=tar_package(pkg.path),
            headers={"content-type": "application/x-tar"},
            auth=BearerAuth(token),
            timeout=timeout,
        )
    except httpx.HTTPError as e:
        raise PublishError(f"node at {node_url} is unreachable: {e}") from e
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise PublishError(f"node at {node_url} refused the package ({r.status_code}): {message}")
    return r.json()


def publish(
    pkg_dir: str | Path,
    client: ChainClient,
    *,
    node_url: str | None = None,
    dataset_hashes: dict[str, str] | None = None,
    operator_token: str | None = None,
) -> PublishResult:
    """Verify, sign for the client's deployment if needed, register and (optionally) upload a package
    (with the node operator's token: `operator_token`, else operator_token_for(node_url))."""
    try:
        pkg = verify_package(pkg_dir, require_signature=False)
    except PackageError as e:
        raise PublishError(f"package refused before publishing: {e}") from e
    if node_url:  # known before anything is registered: a missing token stops it all
        operator_token = operator_token or operator_token_for(node_url)
    result = register_package(pkg, client, dataset_hashes=dataset_hashes)
    if node_url:
        upload_to_node(pkg, node_url, operator_token=operator_token)
        result.node_url = node_url
    return result
