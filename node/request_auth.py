"""Who may call a node: gateways it trusts (signed requests) and its operator (a bearer token).

A gateway signs each call with its Ed25519 gateway key. The signature covers a domain tag, the
method, the path, a millisecond timestamp, the id of the node it is meant for and the sha256 of the
body, so a captured request cannot be replayed at another node, on another path, with another body,
or after MAX_SKEW_MS. Three headers carry it:

    X-Loramesh-Gateway-Key: 64 hex (the raw Ed25519 public key)
    X-Loramesh-Timestamp:   milliseconds since the epoch
    X-Loramesh-Signature:   128 hex

The node accepts a signed call only from a key on its allow-list (operator configuration, or the
keys of the gateways it is configured to heartbeat to, learned from their heartbeat answers).
Operator endpoints take `Authorization: Bearer <token>` with the token the node keeps in its data
folder (created 0600 on first start).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Collection, Mapping

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DOMAIN = b"loramesh.node-request.v1"
KEY_HEADER = "x-loramesh-gateway-key"
TS_HEADER = "x-loramesh-timestamp"
SIG_HEADER = "x-loramesh-signature"
# the body's sha256, which the signature covers: with it a call is verified from its headers before a byte of its
# body is read, and the body checked against it as it arrives (a gateway of an older release does not send it)
BODY_HASH_HEADER = "x-loramesh-body-sha256"
MAX_SKEW_MS = 60_000
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_SIG_RE = re.compile(r"[0-9a-f]{128}")
_TS_RE = re.compile(r"[0-9]{1,16}")


class RequestAuthError(Exception):
    """A call that is not authenticated (401) or not allowed (403); `status` says which."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def is_gateway_key(text: str) -> bool:
    """Whether `text` is a gateway key as the headers and the operator's trust list write it: 64 lowercase hex."""
    return _KEY_RE.fullmatch(text) is not None


def gateway_public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _message(method: str, path: str, ts_ms: int, node_id: str, digest: str) -> bytes:
    """What a gateway signs: the call's method, path, time and node, and its body's sha256 (`body_hash`)."""
    fields = (method.upper(), path, str(ts_ms), node_id, digest)
    return b"\n".join([DOMAIN, *(f.encode() for f in fields)])


def body_hash(body: bytes) -> str:
    """The body's digest as the signed message holds it (and BODY_HASH_HEADER carries it)."""
    return hashlib.sha256(body).hexdigest()


def sign_request(
    key: Ed25519PrivateKey, *, method: str, path: str, node_id: str, body: bytes = b"", ts_ms: int | None = None
) -> dict[str, str]:
    """The headers that authenticate one call from a gateway to the node `node_id`."""
    ts, digest = int(time.time() * 1000) if ts_ms is None else int(ts_ms), body_hash(body)
    sig = key.sign(_message(method, path, ts, node_id, digest))
    return {
        KEY_HEADER: gateway_public_key_hex(key),
        TS_HEADER: str(ts),
        SIG_HEADER: sig.hex(),
        BODY_HASH_HEADER: digest,
    }


def verify_request(
    headers: Mapping[str, str],
    *,
    method: str,
    path: str,
    node_id: str,
    body: bytes | None,
    trusted: Collection[str],
    now_ms: int | None = None,
) -> str:
    """Check a gateway's signed call; return the gateway's public key (hex). Raises RequestAuthError. body=None:
    from its headers alone, over the body hash BODY_HASH_HEADER says (the caller then holds the body to it,
    `check_body`)."""
    public, signature, ts = check_headers(headers, now_ms=now_ms)
    if body is None:
        digest = headers.get(BODY_HASH_HEADER, "").lower()
        if not _KEY_RE.fullmatch(digest):
            raise RequestAuthError(401, f"{BODY_HASH_HEADER} must be the body's sha256 (64 hex)", "unauthenticated")
    else:
        digest = body_hash(body)
    try:
        public.verify(signature, _message(method, path, ts, node_id, digest))
    except InvalidSignature:
        raise RequestAuthError(401, "gateway signature does not verify", "unauthenticated") from None
    key_hex = headers[KEY_HEADER].lower()
    if key_hex not in trusted:
        raise RequestAuthError(403, "this node does not trust that gateway key", "gateway_not_trusted")
    return key_hex


def check_body(headers: Mapping[str, str], body: bytes) -> None:
    """A body read after its call was verified from its headers: it must be the one signed. RequestAuthError."""
    if body_hash(body) != headers.get(BODY_HASH_HEADER, "").lower():
        raise RequestAuthError(
            401, "gateway signature does not verify: the body is not the one signed", "unauthenticated"
        )


def check_headers(headers: Mapping[str, str], *, now_ms: int | None = None) -> tuple[Ed25519PublicKey, bytes, int]:
    """What can be checked of a signed call before its body is read: the three headers, well formed, and the
    timestamp within MAX_SKEW_MS. (public key, signature, timestamp); RequestAuthError (401) otherwise."""
    key_hex, ts_raw, sig_hex = headers.get(KEY_HEADER), headers.get(TS_HEADER), headers.get(SIG_HEADER)
    if not key_hex or not ts_raw or not sig_hex:
        raise RequestAuthError(
            401, "this endpoint needs a request signed by a gateway the node trusts", "unauthenticated"
        )
    key_hex, sig_hex = key_hex.lower(), sig_hex.lower()
    # exact ASCII forms: str.isdigit() and bytes.fromhex() also take "²", spaces and other spellings
    if not (is_gateway_key(key_hex) and _SIG_RE.fullmatch(sig_hex) and _TS_RE.fullmatch(ts_raw)):
        raise RequestAuthError(401, "malformed gateway signature headers", "unauthenticated")
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
        signature = bytes.fromhex(sig_hex)
    except ValueError:
        raise RequestAuthError(401, "malformed gateway signature headers", "unauthenticated") from None
    ts = int(ts_raw)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if abs(now - ts) > MAX_SKEW_MS:
        raise RequestAuthError(
            401, f"request timestamp is more than {MAX_SKEW_MS // 1000} s from the node's clock", "unauthenticated"
        )
    return public, signature, ts


def check_bearer(authorization: str | None, token: str) -> None:
    """Check `Authorization: Bearer <token>` in constant time. Raises RequestAuthError (401)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise RequestAuthError(
            401, "this endpoint needs the node operator's token (Authorization: Bearer ...)", "unauthenticated"
        )
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise RequestAuthError(401, "wrong operator token", "unauthenticated")


class SignedNodeAuth(httpx.Auth):
    """httpx auth that signs every call to one node (`node_id`) with a gateway key."""

    requires_request_body = True

    def __init__(self, key: Ed25519PrivateKey, node_id: str) -> None:
        self.key, self.node_id = key, node_id

    def auth_flow(self, request: httpx.Request):
        request.headers.update(
            sign_request(
                self.key, method=request.method, path=request.url.path, node_id=self.node_id, body=request.content
            )
        )
        yield request


class BearerAuth(httpx.Auth):
    """httpx auth for the node operator's endpoints."""

    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request):
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request
