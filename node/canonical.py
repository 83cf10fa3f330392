"""Canonical JSON and hashing: the byte forms that ids and signatures are computed over."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """Serialise `obj` as canonical JSON: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def sha256_hex(data: bytes) -> str:
    """Return sha256 of `data` as a 0x-prefixed lowercase hex string (a bytes32 id)."""
    return "0x" + hashlib.sha256(data).hexdigest()


def is_id(value: object) -> bool:
    """True when `value` is a 0x-prefixed 64-hex-digit id string."""
    if not isinstance(value, str) or len(value) != 66 or not value.startswith("0x"):
        return False
    try:
        int(value[2:], 16)
    except ValueError:
        return False
    return value == value.lower()
