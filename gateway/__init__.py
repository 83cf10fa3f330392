"""OpenAI-compatible gateway: node directory, router, usage capture."""

from gateway.app import create_app
from gateway.errors import GatewayError
from gateway.keys import create_key, hash_secret, list_keys, lookup_key, revoke_key
from gateway.settings import GatewaySettings

__all__ = ["GatewayError", "GatewaySettings", "create_app", "create_key", "hash_secret", "list_keys", "lookup_key",
           "revoke_key"]  # fmt: skip
