"""Who may ask, and how much: the API key of a request (`Authorization: Bearer`), its per-key rate limits
before the request, and its tokens charged after it."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import AuthError
from gateway.keys import KeyCache, KeyInfo
from gateway.ratelimit import RateLimiter


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


class Admission:
    """API keys (through the key cache) and their rate limits."""

    def __init__(self, keys: KeyCache, limiter: RateLimiter | None = None) -> None:
        self.keys = keys
        self.limiter = limiter or RateLimiter()
        self._key_tpm: dict[int, int | None] = {}  # key id -> tokens per minute, as last authenticated

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

    def admit(self, key: KeyInfo) -> None:
        """RateLimited (429) when the key is over its requests or tokens per minute."""
        self.limiter.admit(key.id, rpm=key.requests_per_minute, tpm=key.tokens_per_minute)

    def charge_tokens(self, key_id: int, tokens: int) -> None:
        self.limiter.charge_tokens(key_id, tokens, tpm=self._key_tpm.get(key_id))
