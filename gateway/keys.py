"""API keys: created once and shown once, stored as sha256 of the secret, revocable; a request's key
(`Authorization: Bearer`), admitted within its rate limits and charged its tokens after (Admission)."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from common.wire import sha256_hex
from gateway.errors import AuthError, RateLimited
from gateway.ratelimit import RateLimiter, TokenBucket
from gateway.tables import AdapterGrant, ApiKey, KeyPolicy
from ledger.models import utcnow
from ledger.types import registry_name_problem

log = logging.getLogger(__name__)

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
    max_price_per_1k_tokens: int | None = None  # wei; None: the gateway's default limit applies
    cache_salt: str | None = None  # cache_salt_of its stored hash (None: requests share the nodes' cache)


def cache_salt_of(key_hash: str) -> str:
    """The prefix-cache salt of a key's requests: nodes share cached prompt KV only among requests of one salt,
    so one client cannot learn from its cached_tokens (or its speed) that another sent a prompt. Derived from
    the stored hash, so every gateway on the database gives a key the same salt and its requests share KV
    through any of them; a hash of it, so nodes (strangers) never see what authenticates a key."""
    return sha256_hex(b"loramesh-cache-salt/1\n" + key_hash.encode("ascii"))[2:34]


def node_cache_salt(key_salt: str, node_id: str, client_salt: str | None = None) -> str:
    """The salt a key's request carries to one node, joined to the one its client sent (vLLM's cache_salt):
    requests of one key with different client salts share no KV, and no client salt reaches another key's.
    Each node gets its own (a prefix cache is a node's), so nodes, strangers, pooling what they were sent
    cannot tell one key's requests across the network."""
    parts = [key_salt, node_id] + ([] if client_salt is None else [client_salt])
    return sha256_hex("\n".join(parts).encode())[2:34]


def hash_secret(secret: str) -> str:
    """How a key is stored: sha256 of its UTF-8 secret, 0x-hex."""
    return sha256_hex(secret.encode("utf-8"))


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ApiKeyError(f"{name} must be a positive integer or omitted, got {value}")


def _check_price(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ApiKeyError(f"max price per 1k tokens must be a non-negative integer (wei) or omitted, got {value!r}")


def create_key(
    engine: Engine,
    *,
    name: str = "",
    rpm: int | None = None,
    tpm: int | None = None,
    adapters: list[str] | tuple[str, ...] = (),
    max_price_per_1k_tokens: int | None = None,
) -> tuple[str, KeyInfo]:
    """Create a key; returns (secret, info). The secret is not stored and cannot be shown again.
    max_price_per_1k_tokens (wei): the dearest adapter this key may use; None: the gateway's default."""
    _check_limit("rpm", rpm)
    _check_limit("tpm", tpm)
    _check_price(max_price_per_1k_tokens)
    adapters = sorted({a.strip() for a in adapters if a.strip()})
    for a in adapters:  # privacy is an exact match on the registry's name: a grant no name can be hides nothing
        if (why := registry_name_problem(a)) is not None:
            hint = "; grant an adapter by its name, not its id" if a[:2].lower() == "0x" else ""
            raise ApiKeyError(
                f"adapter grant {a[:80]!r} {why}: no registry name matches it, nothing would be private{hint}"
            )
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with Session(engine) as s:
        row = ApiKey(
            name=name, key_hash=hash_secret(secret), prefix=secret[:SHOWN_PREFIX_LEN], rate_limit_per_minute=rpm
        )
        s.add(row)
        s.flush()
        price = None if max_price_per_1k_tokens is None else str(max_price_per_1k_tokens)
        s.add(KeyPolicy(key_id=row.id, tokens_per_minute=tpm, max_price_per_1k_tokens=price))
        for a in adapters:
            s.add(AdapterGrant(key_id=row.id, adapter_name=a))
        s.commit()
        info = KeyInfo(
            row.id,
            name,
            row.prefix,
            rpm,
            tpm,
            frozenset(adapters),
            max_price_per_1k_tokens=max_price_per_1k_tokens,
            cache_salt=cache_salt_of(row.key_hash),
        )
    return secret, info


def _info(s: Session, row: ApiKey) -> KeyInfo:
    policy = s.get(KeyPolicy, row.id)
    grants = s.exec(select(AdapterGrant.adapter_name).where(AdapterGrant.key_id == row.id)).all()
    price = policy.max_price_per_1k_tokens if policy else None
    return KeyInfo(
        row.id,
        row.name,
        row.prefix,
        row.rate_limit_per_minute,
        policy.tokens_per_minute if policy else None,
        frozenset(grants),
        row.revoked_at is not None,
        max_price_per_1k_tokens=None if price is None else int(price),
        cache_salt=cache_salt_of(row.key_hash),
    )


_UNCHANGED = object()


def _row(s: Session, ident: str | int) -> ApiKey:
    if isinstance(ident, int) or str(ident).isdigit():
        row = s.get(ApiKey, int(ident))
    else:
        rows = s.exec(select(ApiKey).where(ApiKey.prefix == str(ident))).all()
        if len(rows) > 1:
            raise ApiKeyError(f"prefix {ident!r} matches {len(rows)} keys: name it by id")
        row = rows[0] if rows else None
    if row is None:
        raise ApiKeyError(f"no API key with id or prefix {ident!r} (see `loramesh gateway keys list`)")
    return row


def update_key(
    engine: Engine, ident: str | int, *, rpm=_UNCHANGED, tpm=_UNCHANGED, max_price_per_1k_tokens=_UNCHANGED
) -> KeyInfo:
    """Change a key's limits (named by id or shown prefix); a limit given as None goes back to the default
    (unlimited rates; the gateway's default max price). A running gateway sees it within key_cache_ttl_s."""
    if rpm is not _UNCHANGED:
        _check_limit("rpm", rpm)
    if tpm is not _UNCHANGED:
        _check_limit("tpm", tpm)
    if max_price_per_1k_tokens is not _UNCHANGED:
        _check_price(max_price_per_1k_tokens)
    with Session(engine) as s:
        row = _row(s, ident)
        policy = s.get(KeyPolicy, row.id) or KeyPolicy(key_id=row.id)
        if rpm is not _UNCHANGED:
            row.rate_limit_per_minute = rpm
            s.add(row)
        if tpm is not _UNCHANGED:
            policy.tokens_per_minute = tpm
        if max_price_per_1k_tokens is not _UNCHANGED:
            price = max_price_per_1k_tokens
            policy.max_price_per_1k_tokens = None if price is None else str(price)
        s.add(policy)
        s.commit()
        return _info(s, row)


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
        row = _row(s, ident)
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            s.add(row)
            s.commit()
        return _info(s, row)


def private_adapter_names(engine: Engine) -> frozenset[str]:
    """Adapter names listed to some key: the private ones."""
    with Session(engine) as s:
        return frozenset(s.exec(select(AdapterGrant.adapter_name).distinct()).all())


class KeyCache:
    """Authenticated keys, with the private adapter names read alongside, kept `ttl` seconds so that a
    request costs no database round trip. A revoked or deleted key, changed limits or grants take effect
    within `ttl` seconds: keys are revoked by the CLI in another process, so nothing here could be told.
    Unknown secrets are never cached (a key just created works at once); ttl=0 turns caching off."""

    def __init__(self, engine: Engine, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl < 0:
            raise ValueError(f"key cache ttl must be >= 0, got {ttl}")
        self.engine, self.ttl, self.clock = engine, ttl, clock
        self._entries: dict[str, tuple[float, KeyInfo, frozenset[str]]] = {}  # secret hash -> (expiry, ...)
        self._lock = threading.Lock()

    def get(self, secret: str) -> tuple[KeyInfo, frozenset[str]] | None:
        """The cached key and private names when still fresh; None means: call `load` (blocking)."""
        entry = self._entries.get(hash_secret(secret))
        if entry is None or entry[0] <= self.clock():
            return None
        return entry[1], entry[2]

    def load(self, secret: str) -> tuple[KeyInfo | None, frozenset[str]]:
        """Read the key and the private names from the database and cache them (blocking: DB)."""
        digest, now = hash_secret(secret), self.clock()  # before the read: no entry outlives a change by > ttl
        key = lookup_key(self.engine, secret)
        private = private_adapter_names(self.engine) if key is not None else frozenset()
        with self._lock:
            if key is None:
                self._entries.pop(digest, None)
            elif self.ttl > 0:
                # expired entries go whenever one is added, so keys nobody uses any more do not pile up
                self._entries = {h: e for h, e in self._entries.items() if e[0] > now}
                self._entries[digest] = (now + self.ttl, key, private)
        return key, private


# ---- a request's key ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthContext:
    """An authenticated request's key, and the private adapter names (those granted to any key)."""

    key: KeyInfo
    private: frozenset[str]


def _secret(authorization: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` header; AuthError when there is none."""
    if not authorization:
        raise AuthError("missing API key: send it as 'Authorization: Bearer <key>'")
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
    return secret.strip()


# Model-list reads one key may make, in this process: not counted against its requests per minute (UIs ask on
# every page) but bounded, as a list walks every registered adapter on the event loop.
MODEL_LISTS_PER_MINUTE = 600
MODEL_LIST_KEYS_KEPT = 4096


class Admission:
    """API keys (through the key cache) and their rate limits."""

    def __init__(self, keys: KeyCache, limiter: RateLimiter) -> None:
        self.keys = keys
        self.limiter = limiter
        self._lists: OrderedDict[int, TokenBucket] = OrderedDict()  # key id -> its model-list reads
        self._key_tpm: dict[int, int | None] = {}  # key id -> tokens per minute, as last authenticated
        # keys revoked lately (refresh_revoked): their requests still running end at their next token
        self.revoked: frozenset[int] = frozenset()
        # token charges are written after the answer, one at a time, off the caller's thread (the event loop)
        self._charges = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rate-charges")

    def admit_listing(self, key: KeyInfo) -> None:
        """RateLimited (429) past MODEL_LISTS_PER_MINUTE model-list reads of `key` here (no database)."""
        now = time.monotonic()
        bucket = self._lists.pop(key.id, None) or TokenBucket.full(MODEL_LISTS_PER_MINUTE, now)
        self._lists[key.id] = bucket
        while len(self._lists) > MODEL_LIST_KEYS_KEPT:
            self._lists.popitem(last=False)
        bucket.refill(now)
        if (wait := bucket.wait_for(1)) > 0:
            raise RateLimited(
                f"this key's {MODEL_LISTS_PER_MINUTE} model-list reads per minute are used up; retry later",
                retry_after=wait,
            )
        bucket.level -= 1

    def authenticate(self, authorization: str | None) -> AuthContext:
        """The key named by an `Authorization: Bearer` header and the private adapter names (blocking: DB
        unless `cached_auth` would have answered)."""
        secret = _secret(authorization)
        key, private = self.keys.get(secret) or self.keys.load(secret)
        if key is None:
            raise AuthError("invalid API key: unknown or revoked")
        self._key_tpm[key.id] = key.tokens_per_minute
        return AuthContext(key, private)

    def cached_auth(self, authorization: str | None) -> AuthContext | None:
        """`authenticate` from the key cache, without blocking; None when the database must be asked."""
        hit = self.keys.get(_secret(authorization))
        if hit is None:
            return None
        self._key_tpm[hit[0].id] = hit[0].tokens_per_minute
        return AuthContext(*hit)

    @staticmethod
    def limited(key: KeyInfo) -> bool:
        """Whether admitting the key asks the database (it has a limit)."""
        return bool(key.requests_per_minute or key.tokens_per_minute)

    def admit(self, key: KeyInfo) -> dict[str, str]:
        """RateLimited (429) when the key is over its requests or tokens per minute (blocking when `limited`:
        the buckets are shared with the other gateways through the database); the key's x-ratelimit headers."""
        return self.limiter.admit(key.id, rpm=key.requests_per_minute, tpm=key.tokens_per_minute)

    def reserve(self, key: KeyInfo, tokens: int) -> dict[str, str] | None:
        """Take the most tokens a request may use from the key's tokens per minute before it runs (RateLimited,
        429, when they are not there; blocking). None when nothing was taken; else the tokens' x-ratelimit headers
        after it, and what was taken is settled by `charge_tokens(key id, used - tokens)` once the request ended."""
        if not key.tokens_per_minute:
            return None
        return self.limiter.reserve(key.id, tokens, tpm=key.tokens_per_minute)

    def refresh_revoked(self, within_s: float) -> None:
        """Read the keys revoked in the last `within_s` seconds (as long as a request may run): revoking a key
        ended its new requests only, and a stolen key's streams ran on to their max_tokens (blocking: DB)."""
        since = utcnow() - timedelta(seconds=within_s)
        with Session(self.keys.engine) as s:
            rows = s.exec(select(ApiKey.id).where(ApiKey.revoked_at >= since))  # type: ignore[operator]
            self.revoked = frozenset(rows)

    def charge_tokens(self, key_id: int, tokens: int) -> None:
        """Charge a finished request's tokens to its key beyond what it reserved, or give back (negative) what
        it did not use (not blocking: written by a worker thread). A key this process has not authenticated
        (a request of a dead gateway, reconciled here) has its limit read first."""
        if tokens and (key_id not in self._key_tpm or self._key_tpm[key_id]):
            self._charges.submit(self._charge, key_id, tokens, self._key_tpm.get(key_id))

    def _charge(self, key_id: int, tokens: int, tpm: int | None) -> None:
        try:
            if tpm is None:  # a key not authenticated here
                with Session(self.keys.engine) as s:
                    policy = s.get(KeyPolicy, key_id)
                tpm = policy.tokens_per_minute if policy is not None else None
            self.limiter.charge_tokens(key_id, tokens, tpm=tpm)
        except Exception as e:  # noqa: BLE001 - a charge lost to a database outage lets the key run a little over
            log.warning("tokens of key %d not charged to its limit: %s", key_id, e)

    def close(self) -> None:
        """Write the charges still queued."""
        self._charges.shutdown(wait=True)
