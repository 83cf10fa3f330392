"""API keys: stored as sha256 of the secret, shown once, revocable, with limits and private adapters."""

from __future__ import annotations

import hashlib
from unittest.mock import patch

import pytest
from sqlmodel import Session, select

from gateway.keys import (
    ApiKeyError,
    KeyCache,
    create_key,
    hash_secret,
    list_keys,
    lookup_key,
    private_adapter_names,
    revoke_key,
)
from gateway.tables import AdapterGrant, ApiKey
from tests.utils.gateway import make_db


@pytest.fixture
def engine(tmp_path):
    return make_db(tmp_path / "keys.db")


def test_stored_hashed_never_in_clear(engine):
    secret, info = create_key(engine, name="app", rpm=10, tpm=1000, adapters=["acme/a", " acme/b", ""])
    with Session(engine) as s:
        row = s.exec(select(ApiKey)).one()
    assert row.key_hash == "0x" + hashlib.sha256(secret.encode()).hexdigest() == hash_secret(secret)
    assert secret not in (row.key_hash, row.prefix, row.name) and secret.startswith(row.prefix)
    got = lookup_key(engine, secret)
    assert got == info
    assert (got.requests_per_minute, got.tokens_per_minute, got.adapters) == (10, 1000, {"acme/a", "acme/b"})
    assert private_adapter_names(engine) == {"acme/a", "acme/b"}


def test_unknown_secret(engine):
    create_key(engine)
    assert lookup_key(engine, "lm-nope") is None


def test_revoke_by_id_and_prefix(engine):
    s1, k1 = create_key(engine, name="one")
    s2, k2 = create_key(engine, name="two")
    assert revoke_key(engine, str(k1.id)).revoked
    assert revoke_key(engine, k2.prefix).revoked
    assert lookup_key(engine, s1) is None and lookup_key(engine, s2) is None
    assert [k.revoked for k in list_keys(engine)] == [True, True]
    assert revoke_key(engine, k1.id).revoked  # twice is harmless


def test_revoke_unknown(engine):
    with pytest.raises(ApiKeyError, match="no API key"):
        revoke_key(engine, "lm-missing")


def test_bad_limit(engine):
    with pytest.raises(ApiKeyError, match="rpm must be a positive"):
        create_key(engine, rpm=0)


@pytest.mark.parametrize("grant", ["Acme/Secret", "0x" + "a3" * 32, "acme secret"])
def test_a_grant_no_registry_name_can_match_is_refused(engine, grant):
    # privacy is an exact match on the registry's (lower-case) names: such a grant was stored, listed with the
    # key, and hid nothing from any other key
    with pytest.raises(ApiKeyError, match="no registry name matches it") as err:
        create_key(engine, name="insider", adapters=["acme/ok", grant])
    assert ("by its name, not its id" in str(err.value)) == grant.startswith("0x")
    assert list_keys(engine) == []  # nothing written


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_answers_without_the_database_until_ttl(engine):
    secret, info = create_key(engine, name="app", rpm=10, adapters=["acme/a"])
    clock = Clock()
    cache = KeyCache(engine, ttl=2.0, clock=clock)
    assert cache.get(secret) is None  # nothing cached yet: the caller loads
    assert cache.load(secret) == (info, frozenset({"acme/a"}))
    with patch("gateway.keys.lookup_key", side_effect=AssertionError("the database was asked")):
        clock.now += 1.9
        assert cache.get(secret) == (info, frozenset({"acme/a"}))


def test_revoked_key_refused_once_ttl_passed(engine):
    secret, info = create_key(engine, name="app")
    clock = Clock()
    cache = KeyCache(engine, ttl=2.0, clock=clock)
    cache.load(secret)
    revoke_key(engine, info.id)  # as `loramesh gateway keys revoke` does, from another process
    clock.now += 2.0
    assert cache.get(secret) is None
    assert cache.load(secret) == (None, frozenset())
    assert cache.get(secret) is None  # a refused key is not cached either


def test_changed_limits_and_grants_apply_after_ttl(engine):
    secret, info = create_key(engine, name="app", rpm=10)
    clock = Clock()
    cache = KeyCache(engine, ttl=2.0, clock=clock)
    cache.load(secret)
    with Session(engine) as s:
        row = s.get(ApiKey, info.id)
        row.rate_limit_per_minute = 3
        s.add(row)
        s.add(AdapterGrant(key_id=info.id, adapter_name="acme/b"))
        s.commit()
    assert cache.get(secret)[0].requests_per_minute == 10
    clock.now += 2.5
    assert cache.get(secret) is None
    key, private = cache.load(secret)
    assert key.requests_per_minute == 3 and private == {"acme/b"}


def test_unknown_secret_not_cached_and_ttl_zero_caches_nothing(engine):
    clock = Clock()
    cache = KeyCache(engine, ttl=2.0, clock=clock)
    assert cache.load("lm-later") == (None, frozenset())
    assert cache.get("lm-later") is None
    secret, info = create_key(engine)
    assert cache.get(secret) is None and cache.load(secret)[0] == info  # a new key works at once
    off = KeyCache(engine, ttl=0, clock=clock)
    off.load(secret)
    assert off.get(secret) is None


def test_expired_entries_are_dropped(engine):
    clock = Clock()
    cache = KeyCache(engine, ttl=1.0, clock=clock)
    secrets_ = [create_key(engine)[0] for _ in range(3)]
    for s in secrets_:
        cache.load(s)
    clock.now += 5
    cache.load(secrets_[0])
    assert len(cache._entries) == 1
