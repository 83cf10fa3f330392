"""Token buckets per key: requests and tokens per minute, Retry-After from the refill rate."""

from __future__ import annotations

import pytest

from gateway.errors import RateLimited
from gateway.ratelimit import RateLimiter, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_requests_per_minute():
    clock = Clock()
    rl = RateLimiter(clock)
    for _ in range(3):
        rl.admit(1, rpm=3, tpm=None)
    with pytest.raises(RateLimited, match="3 requests per minute") as ei:
        rl.admit(1, rpm=3, tpm=None)
    assert ei.value.status == 429 and ei.value.headers["Retry-After"] == "20"  # one request refills in 20 s
    rl.admit(2, rpm=3, tpm=None)  # other keys are not affected
    clock.t += 20
    rl.admit(1, rpm=3, tpm=None)


def test_tokens_per_minute_charged_after_the_fact():
    clock = Clock()
    rl = RateLimiter(clock)
    rl.admit(1, rpm=None, tpm=100)
    rl.charge_tokens(1, 160, tpm=100)  # overdraws the bucket to -60
    with pytest.raises(RateLimited, match="100 tokens per minute") as ei:
        rl.admit(1, rpm=None, tpm=100)
    assert ei.value.retry_after == 37  # (60 + 1) tokens at 100/60 per second
    clock.t += 37
    rl.admit(1, rpm=None, tpm=100)


def test_unlimited_key_never_limited():
    rl = RateLimiter(Clock())
    for _ in range(1000):
        rl.admit(1, rpm=None, tpm=None)
    rl.charge_tokens(1, 10**9, tpm=None)


def test_changed_limit_starts_fresh_bucket():
    rl = RateLimiter(Clock())
    rl.admit(1, rpm=1, tpm=None)
    with pytest.raises(RateLimited):
        rl.admit(1, rpm=1, tpm=None)
    rl.admit(1, rpm=5, tpm=None)


def test_bucket_refuses_bad_capacity():
    with pytest.raises(ValueError, match="capacity"):
        TokenBucket(0)
