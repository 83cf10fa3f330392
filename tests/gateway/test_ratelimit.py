"""Token buckets per key in the gateways' shared database: requests and tokens per minute, Retry-After from
the refill rate, and one limit across every gateway on the database."""

from __future__ import annotations

import threading

import httpx
import pytest
from sqlmodel import Session, select

from common.identity import Identity
from gateway.errors import RateLimited, RateLimitsUnavailable
from gateway.keys import create_key
from gateway.ratelimit import RateLimiter, TokenBucket
from gateway.tables import RateBucket
from ledger.db import init_db, make_engine
from node.adapters.basemodel import base_model_id
from tests.gateway import TINY
from tests.utils.clock import Clock
from tests.utils.gateway import StandInNode, gateway_over, make_db, poll, start_gateway_process
from tests.utils.postgres import postgres  # noqa: F401 - the module-scoped fixture

START = 1_800_000_000.0  # the test clock's first reading: a time of day, as the limiter reads time.time


@pytest.fixture
def db(tmp_path):
    return make_db(tmp_path / "gateway.db")


def test_requests_per_minute(db):
    clock = Clock(START)
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
    clock = Clock(START)
    rl = RateLimiter(db, clock)
    rl.admit(1, rpm=None, tpm=100)
    rl.charge_tokens(1, 160, tpm=100)  # overdraws the bucket to -60
    with pytest.raises(RateLimited, match="100 tokens per minute") as ei:
        rl.admit(1, rpm=None, tpm=100)
    assert ei.value.retry_after == 37  # (60 + 1) tokens at 100/60 per second
    clock.t += 37
    rl.admit(1, rpm=None, tpm=100)


def test_tokens_are_reserved_at_admission_and_the_unused_part_given_back(db):
    # a request's most tokens (prompt + max_tokens for every sequence) are taken before it runs: charged
    # only afterwards, any number of requests admitted while the bucket held 1 token ran to their full size
    clock = Clock(START)
    rl = RateLimiter(db, clock)
    rl.reserve(1, 60, tpm=100)
    with pytest.raises(RateLimited, match="100 tokens per minute"):
        rl.reserve(1, 60, tpm=100)  # 40 left
    rl.charge_tokens(1, -50, tpm=100)  # the first used 10 of its 60: 50 back
    rl.reserve(1, 60, tpm=100)
    rl.charge_tokens(1, -1000, tpm=100)  # a refund never fills the bucket past its capacity
    rl.reserve(1, 100, tpm=100)
    with pytest.raises(RateLimited):
        rl.reserve(1, 1, tpm=100)


def test_unlimited_key_never_touches_the_database(db):
    rl = RateLimiter(db, Clock(START))
    for _ in range(1000):
        rl.admit(1, rpm=None, tpm=None)
    rl.charge_tokens(1, 10**9, tpm=None)
    with Session(db) as s:
        assert s.exec(select(RateBucket)).all() == []


def test_changed_limit_starts_fresh_bucket(db):
    rl = RateLimiter(db, Clock(START))
    rl.admit(1, rpm=1, tpm=None)
    with pytest.raises(RateLimited):
        rl.admit(1, rpm=1, tpm=None)
    rl.admit(1, rpm=5, tpm=None)


def test_a_refusal_leaves_the_buckets_as_they_were(db):
    clock = Clock(START)
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
    clock = Clock(START)
    RateLimiter(db, clock).admit(1, rpm=2, tpm=None)
    behind = Clock(START)
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


@pytest.mark.integration
def test_a_burst_cannot_run_past_the_tokens_per_minute(tmp_path, tiny_base):
    # 8 requests at once, each up to 1 + 20 tokens, on a key of 50 tokens a minute: charged afterwards, all 8
    # were admitted (the bucket still held a token at each admission); reserved, 2 run and 6 are refused
    node = StandInNode(Identity.generate(), base_model_id(tiny_base), tokens=20, delay=0.05)
    with gateway_over(node, tmp_path, tiny_base, heartbeat_ttl_s=600) as (gw, engine, _):
        key, _ = create_key(engine, name="metered", tpm=50)
        start = threading.Barrier(8)
        statuses = []

        def one() -> None:
            start.wait()
            r = httpx.post(
                gw.url + "/v1/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": TINY, "prompt": [7], "max_tokens": 20},
                timeout=30,
            )
            statuses.append(r.status_code)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(statuses) == [200] * 2 + [429] * 6, sorted(statuses)


@pytest.mark.integration
def test_what_a_request_reserved_and_did_not_use_is_given_back(tmp_path, tiny_base):
    node = StandInNode(Identity.generate(), base_model_id(tiny_base), tokens=20)
    with gateway_over(node, tmp_path, tiny_base, heartbeat_ttl_s=600) as (gw, engine, _):
        key, _ = create_key(engine, name="metered", tpm=50)
        ask = {"model": TINY, "prompt": [7], "max_tokens": 40}

        def level() -> float:
            with Session(engine) as s:
                return s.exec(select(RateBucket).where(RateBucket.kind == "tokens")).one().level

        headers = {"Authorization": f"Bearer {key}"}
        r = httpx.post(gw.url + "/v1/completions", headers=headers, json=ask | {"max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 4
        r = httpx.post(gw.url + "/v1/completions", headers=headers, json=ask | {"max_tokens": 40}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 21  # the stand-in makes 20 at most
        # 41 were reserved, 21 used: 20 back (and the refill since, 0.83 a second: a slow box may take seconds)
        poll(lambda: 50 - 4 - 21 <= level() < 50 - 4 - 21 + 10, timeout=10)


def test_model_list_reads_are_bounded_per_key_apart_from_its_requests_per_minute():
    """The model list takes nothing from a key's requests per minute (compat audit) but has a bound of its own,
    per key: a list walks every registered adapter on the event loop (review)."""
    from gateway.keys import MODEL_LISTS_PER_MINUTE, Admission, KeyInfo

    admission = Admission(keys=None, limiter=None)
    key, other = (KeyInfo(i, "k", "lm-x", 1, None, frozenset()) for i in (1, 2))
    for _ in range(MODEL_LISTS_PER_MINUTE):
        admission.admit_listing(key)
    with pytest.raises(RateLimited) as e:
        admission.admit_listing(key)
    assert 0 < e.value.retry_after <= 1
    admission.admit_listing(other)  # another key's reads are its own


def test_where_a_keys_buckets_stand_is_said_in_openais_headers(db):
    """OpenAI's x-ratelimit headers, which clients that pace themselves read: after an admission, after a
    reservation, and on a refusal."""
    clock = [1000.0]
    rl = RateLimiter(db, lambda: clock[0])
    assert rl.admit(1, rpm=None, tpm=None) == {}
    first = rl.admit(1, rpm=2, tpm=600)
    assert first == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s",  # one of 2 a minute to refill
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "600",
        "x-ratelimit-reset-tokens": "0s",
    }
    reserved = rl.reserve(1, 450, tpm=600)
    assert reserved["x-ratelimit-remaining-tokens"] == "150" and reserved["x-ratelimit-reset-tokens"] == "45s"
    clock[0] += 0.25
    rl.admit(1, rpm=2, tpm=600)
    with pytest.raises(RateLimited) as e:
        rl.admit(1, rpm=2, tpm=600)
    assert e.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert e.value.headers["x-ratelimit-reset-requests"] == "1m0s" and "Retry-After" in e.value.headers
    assert rl.reserve(1, 1, tpm=600)["x-ratelimit-reset-tokens"] == "45s"  # 448.5 tokens short, at 10 a second
