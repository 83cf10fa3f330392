"""API keys: created once and shown once, stored as sha256 of the secret, revocable."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from gateway.models import AdapterGrant, KeyPolicy
from ledger.models import ApiKey, utcnow
from node.canonical import sha256_hex

KEY_PREFIX = "lm-"
SHOWN_PREFIX_LEN = 10


class ApiKeyError(ValueError):
    """A key command that cannot be carried out (unknown key, bad limit)."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the gateway knows about an authenticated key."""

    id: int
    name: str
    prefix: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    adapters: frozenset[str]  # private adapter names listed to this key
    revoked: bool = False


def hash_secret(secret: str) -> str:
    """How a key is stored: sha256 of its UTF-8 secret, 0x-hex."""
    return sha256_hex(secret.encode("utf-8"))


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ApiKeyError(f"{name} must be a positive integer or omitted, got {value}")


def create_key(engine: Engine, *, name: str = "", rpm: int | None = None, tpm: int | None = None,
               adapters: list[str] | tuple[str, ...] = ()) -> tuple[str, KeyInfo]:  # fmt: skip
    """Create a key; returns (secret, info). The secret is not stored and cannot be shown again."""
    _check_limit("rpm", rpm)
    _check_limit("tpm", tpm)
    adapters = sorted({a.strip() for a in adapters if a.strip()})
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with Session(engine) as s:
        row = ApiKey(name=name, key_hash=hash_secret(secret), prefix=secret[:SHOWN_PREFIX_LEN],
                     rate_limit_per_minute=rpm)  # fmt: skip
        s.add(row)
        s.flush()
        s.add(KeyPolicy(key_id=row.id, tokens_per_minute=tpm))
        for a in adapters:
            s.add(AdapterGrant(key_id=row.id, adapter_name=a))
        s.commit()
        info = KeyInfo(row.id, name, row.prefix, rpm, tpm, frozenset(adapters))
    return secret, info


def _info(s: Session, row: ApiKey) -> KeyInfo:
    policy = s.get(KeyPolicy, row.id)
    grants = s.exec(select(AdapterGrant.adapter_name).where(AdapterGrant.key_id == row.id)).all()
    return KeyInfo(row.id, row.name, row.prefix, row.rate_limit_per_minute,
                   policy.tokens_per_minute if policy else None, frozenset(grants), row.revoked_at is not None)


def lookup_key(engine: Engine, secret: str) -> KeyInfo | None:
    """The live key with this secret, or None (unknown or revoked)."""
    with Session(engine) as s:
        row = s.exec(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret))).first()
        if row is None or row.revoked_at is not None:
            return None
        return _info(s, row)


def list_keys(engine: Engine) -> list[KeyInfo]:
    """Every key, revoked ones included, oldest first."""
    with Session(engine) as s:
        return [_info(s, row) for row in s.exec(select(ApiKey).order_by(ApiKey.id)).all()]


def revoke_key(engine: Engine, ident: str | int) -> KeyInfo:
    """Revoke a key named by id or by its shown prefix; revoking twice is harmless."""
    with Session(engine) as s:
        if isinstance(ident, int) or str(ident).isdigit():
            row = s.get(ApiKey, int(ident))
        else:
            rows = s.exec(select(ApiKey).where(ApiKey.prefix == str(ident))).all()
            if len(rows) > 1:
                raise ApiKeyError(f"prefix {ident!r} matches {len(rows)} keys: revoke by id")
            row = rows[0] if rows else None
        if row is None:
            raise ApiKeyError(f"no API key with id or prefix {ident!r} (see `loramesh gateway keys list`)")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            s.add(row)
            s.commit()
        return _info(s, row)


def private_adapter_names(engine: Engine) -> frozenset[str]:
    """Adapter names listed to some key: the private ones."""
    with Session(engine) as s:
        return frozenset(s.exec(select(AdapterGrant.adapter_name).distinct()).all())
