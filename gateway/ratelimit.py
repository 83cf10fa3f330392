"""Per-key rate limits: token buckets for requests and for tokens, in memory (one gateway process)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import RateLimited


@dataclass(slots=True)
class TokenBucket:
    """`capacity` units, refilled at capacity per `period` seconds; the level may go negative when a
    cost is charged after the fact (tokens), which then delays the next request."""

    capacity: float
    period: float = 60.0
    clock: Callable[[], float] = time.monotonic
    level: float = field(init=False)
    stamp: float = field(init=False)

    def __post_init__(self) -> None:
        if self.capacity <= 0 or self.period <= 0:
            raise ValueError(f"bucket capacity and period must be > 0, got {self.capacity}, {self.period}")
        self.level = self.capacity
        self.stamp = self.clock()

    @property
    def rate(self) -> float:
        return self.capacity / self.period

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` units are available (0 when they are now)."""
        self._refill()
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


class RateLimiter:
    """Buckets per key id: requests per minute and tokens per minute (None = unlimited)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._requests: dict[int, TokenBucket] = {}
        self._tokens: dict[int, TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, table: dict[int, TokenBucket], key_id: int, per_minute: int) -> TokenBucket:
        b = table.get(key_id)
        if b is None or b.capacity != per_minute:  # a changed limit starts a fresh bucket
            b = table[key_id] = TokenBucket(per_minute, 60.0, self.clock)
        return b

    def admit(self, key_id: int, *, rpm: int | None, tpm: int | None) -> None:
        """Count one request, or raise RateLimited (with Retry-After) when either bucket is empty."""
        with self._lock:
            req = self._bucket(self._requests, key_id, rpm) if rpm else None
            tok = self._bucket(self._tokens, key_id, tpm) if tpm else None
            if req is not None and (w := req.wait_for(1)) > 0:
                raise RateLimited(
                    f"this key's limit of {rpm} requests per minute is used up; retry later", retry_after=w
                )
            if tok is not None and (w := tok.wait_for(1)) > 0:
                raise RateLimited(f"this key's limit of {tpm} tokens per minute is used up; retry later", retry_after=w)
            if req is not None:
                req.take(1)

    def charge_tokens(self, key_id: int, tokens: int, *, tpm: int | None) -> None:
        """Charge the tokens a finished request used."""
        if not tpm or tokens <= 0:
            return
        with self._lock:
            self._bucket(self._tokens, key_id, tpm).take(tokens)
