"""Token buckets per key in the gateways' shared database: requests and tokens per minute, Retry-After from
the refill rate, and one limit across every gateway on the database."""

from __future__ import annotations

import threading

import httpx
import pytest
from sqlmodel import Session, select

from gateway.errors import RateLimited, RateLimitsUnavailable
from gateway.keys import create_key
from gateway.ratelimit import RateLimiter, TokenBucket
from gateway.tables import RateBucket
from ledger.db import init_db, make_engine
from tests.utils.gateway import make_db, start_gateway_process
from tests.utils.postgres import postgres  # noqa: F401 - the module-scoped fixture


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def db(tmp_path):
    return make_db(tmp_path / "gateway.db")


def test_requests_per_minute(db):
    clock = Clock()
    rl = RateLimiter(db, clock)
    for _ in range(3):
        rl.admit(1, rpm=3, tpm=None)
    with pytest.raises(RateLimited, match="3 requests per minute") as ei:
        rl.admit(1, rpm=3, tpm=None)
    assert ei.value.status == 429 and ei.value.headers["Retry-After"] == "20"  # one request refills in 20 s
    rl.admit(2, rpm=3, tpm=None)  # other keys are not affected
    clock.t += 20
    rl.admit(1, rpm=3, tpm=None)


def test_tokens_per_minute_charged_after_the_fact(db):
    clock = Clock()
    rl = RateLimiter(db, clock)
    rl.admit(1, rpm=None, tpm=100)
    rl.charge_tokens(1, 160, tpm=100)  # overdraws the bucket to -60
    with pytest.raises(RateLimited, match="100 tokens per minute") as ei:
        rl.admit(1, rpm=None, tpm=100)
    assert ei.value.retry_after == 37  # (60 + 1) tokens at 100/60 per second
    clock.t += 37
    rl.admit(1, rpm=None, tpm=100)


def test_unlimited_key_never_touches_the_database(db):
    rl = RateLimiter(db, Clock())
    for _ in range(1000):
        rl.admit(1, rpm=None, tpm=None)
    rl.charge_tokens(1, 10**9, tpm=None)
    with Session(db) as s:
        assert s.exec(select(RateBucket)).all() == []


def test_changed_limit_starts_fresh_bucket(db):
    rl = RateLimiter(db, Clock())
    rl.admit(1, rpm=1, tpm=None)
    with pytest.raises(RateLimited):
        rl.admit(1, rpm=1, tpm=None)
    rl.admit(1, rpm=5, tpm=None)


def test_a_refusal_leaves_the_buckets_as_they_were(db):
    clock = Clock()
    rl = RateLimiter(db, clock)
    rl.admit(1, rpm=2, tpm=100)
    rl.charge_tokens(1, 200, tpm=100)  # tokens overdrawn: requests are refused ...
    for _ in range(3):
        with pytest.raises(RateLimited, match="tokens"):
            rl.admit(1, rpm=2, tpm=100)
    clock.t += 61
    rl.admit(1, rpm=2, tpm=100)  # ... and the refused ones took no request from the bucket
    rl.admit(1, rpm=2, tpm=100)


def test_a_clock_behind_does_not_drain_the_bucket(db):
    clock = Clock()
    RateLimiter(db, clock).admit(1, rpm=2, tpm=None)
    behind = Clock()
    behind.t = clock.t - 30  # another gateway's clock, 30 s slow
    RateLimiter(db, behind).admit(1, rpm=2, tpm=None)
    with pytest.raises(RateLimited):
        RateLimiter(db, behind).admit(1, rpm=2, tpm=None)


def test_bucket_refuses_bad_capacity():
    with pytest.raises(ValueError, match="capacity"):
        TokenBucket.full(0, 0.0)


def test_database_down_is_a_503_not_a_free_pass(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'gateway.db'}")
    with pytest.raises(RateLimitsUnavailable) as ei:
        RateLimiter(engine).admit(1, rpm=5, tpm=None)
    assert ei.value.status == 503


def _race(engines, rpm: int, attempts: int) -> int:
    """`attempts` admissions spread over limiters on `engines` (one per gateway), all at once: how many passed."""
    passed, lock, start = [0], threading.Lock(), threading.Barrier(attempts)

    def one(i: int) -> None:
        start.wait()
        try:
            RateLimiter(engines[i % len(engines)]).admit(7, rpm=rpm, tpm=None)
        except RateLimited:
            return
        with lock:
            passed[0] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(attempts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return passed[0]


def test_one_limit_across_gateways_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    engines = [make_engine(url, immediate=True) for _ in range(2)]
    init_db(engines[0])
    assert _race(engines, rpm=5, attempts=16) == 5


@pytest.mark.integration
def test_one_limit_across_gateway_processes_on_postgres(tmp_path, postgres):  # noqa: F811
    """Two `loramesh gateway run` processes on one PostgreSQL database: a key limited to 5 requests a minute
    gets 5 through, whichever gateway it asks (no node is up: an admitted request is a 503, a refused one 429)."""
    url = postgres.new_database("shared_limits")
    engine = make_engine(url)
    init_db(engine)
    assert _race([engine, make_engine(url)], rpm=4, attempts=12) == 4  # the first insert races too
    secret, _ = create_key(engine, name="limited", rpm=5)
    gateways = [start_gateway_process(tmp_path, url, name=f"gateway{i}") for i in range(2)]
    try:
        for proc, gw_url in gateways:
            proc.wait_http(gw_url + "/health")
        statuses = []
        for i in range(10):
            r = httpx.post(
                gateways[i % 2][1] + "/v1/completions",
                headers={"Authorization": f"Bearer {secret}"},
                json={"model": "nobody/none", "prompt": "hi"},
                timeout=10,
            )
            statuses.append(r.status_code)
    finally:
        for proc, _ in gateways:
            proc.stop()
    assert statuses.count(429) == 5 and all(s != 429 for s in statuses[:5]), statuses
