"""API keys: stored as sha256 of the secret, shown once, revocable, with limits and private adapters."""

from __future__ import annotations

import hashlib

import pytest
from sqlmodel import Session, select

from gateway.keys import ApiKeyError, create_key, hash_secret, list_keys, lookup_key, private_adapter_names, revoke_key
from ledger.models import ApiKey
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
