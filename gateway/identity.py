"""The gateway's Ed25519 key: it signs every call the gateway makes to a node (node.request_auth), and nodes
learn which gateways to trust from its public half (GET /internal/gateway-key, the heartbeat answer)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.files import write_private

log = logging.getLogger(__name__)


class GatewayKeyError(ValueError):
    """The gateway key file cannot be read as an Ed25519 private key."""


def load_or_create_gateway_key(path: Path | None) -> Ed25519PrivateKey:
    """The key in `path` (PEM, PKCS#8, unencrypted: the file is the secret, kept 0600), created there when
    missing; with no path, an ephemeral key (nodes must then learn it again after every restart)."""
    if path is None:
        return Ed25519PrivateKey.generate()
    path = Path(path)
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        if write_private(path, pem, replace=False):  # else another gateway made it a moment ago: read its key
            log.info("created gateway key file %s", path.name)
            return key
    if os.stat(path).st_mode & 0o077:
        log.warning("gateway key file %s is readable by others; it should be 0600", path.name)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise GatewayKeyError(f"gateway key file {path.name} is not an unencrypted PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise GatewayKeyError(f"gateway key file {path.name} holds a {type(key).__name__}, not an Ed25519 key")
    return key
