"""Per-key rate limits: token buckets for requests and for tokens, kept in the gateways' shared database, so a
key's limit holds across every gateway on that database (each bucket is read and written in one transaction,
under the row's lock: SQLite's write lock taken at BEGIN, PostgreSQL's SELECT ... FOR UPDATE).

Written here rather than with a rate-limit library: the well-kept ones (`limits`, `slowapi`) share state
through Redis, Memcached or MongoDB, and the gateways already share one SQL database for their usage records;
a second service to run for one counter per key was the worse trade. Buckets run on the wall clock (the
processes may be on different machines); a clock skew between gateways shifts a refill by the skew at most."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, select

from gateway.errors import RateLimited, RateLimitsUnavailable
from gateway.tables import RateBucket
from ledger.db import is_postgres

log = logging.getLogger(__name__)

REQUESTS, TOKENS = "requests", "tokens"


@dataclass(slots=True)
class TokenBucket:
    """`capacity` units, refilled at capacity per `period` seconds from `level` at time `stamp`; the level
    may go negative when a cost is charged after the fact (tokens), which then delays the next request."""

    capacity: float
    level: float
    stamp: float
    period: float = 60.0

    def __post_init__(self) -> None:
        if self.capacity <= 0 or self.period <= 0:
            raise ValueError(f"bucket capacity and period must be > 0, got {self.capacity}, {self.period}")

    @classmethod
    def full(cls, capacity: float, now: float) -> TokenBucket:
        return cls(capacity, capacity, now)

    @property
    def rate(self) -> float:
        return self.capacity / self.period

    def refill(self, now: float) -> None:
        # max(): a gateway whose clock is behind the one that wrote the stamp does not drain the bucket
        self.level = min(self.capacity, self.level + max(0.0, now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` units are available (0 when they are now); refill first."""
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.rate


class RateLimiter:
    """Buckets per key id in the database: requests per minute and tokens per minute (None = unlimited).
    Blocking (a transaction per limited request): call it from a worker thread. Keys without limits cost
    nothing."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine, self.clock = engine, clock

    def admit(self, key_id: int, *, rpm: int | None, tpm: int | None) -> dict[str, str]:
        """Count one request, or raise RateLimited (with Retry-After) when either bucket is empty; the key's
        x-ratelimit headers after it ({} for a key without limits)."""
        limits = {k: v for k, v in ((REQUESTS, rpm), (TOKENS, tpm)) if v}
        if not limits:
            return {}
        return self._update(key_id, limits, lambda buckets: _take_request(buckets, rpm, tpm))

    def reserve(self, key_id: int, tokens: int, *, tpm: int | None) -> dict[str, str]:
        """Take the most tokens a request may use before it runs (prompt + max_tokens for every sequence), or
        raise RateLimited when the bucket does not hold them (a request larger than the whole limit needs a full
        bucket). Charged only after the fact, every request admitted while the bucket held one token ran to its
        full size, side by side; `charge_tokens` gives the unused part back once it ended. The tokens bucket's
        x-ratelimit headers after it ({} when nothing was taken)."""
        if not (tpm and tokens > 0):
            return {}
        return self._update(key_id, {TOKENS: tpm}, lambda buckets: _take_tokens(buckets[TOKENS], tokens, tpm))

    def charge_tokens(self, key_id: int, tokens: int, *, tpm: int | None) -> None:
        """Charge tokens a finished request used beyond its reservation; a negative count gives back what it
        reserved and did not use (never past the bucket's capacity)."""
        if tpm and tokens:

            def charge(buckets: dict[str, TokenBucket]) -> None:
                b = buckets[TOKENS]
                b.level = min(b.capacity, b.level - tokens)

            self._update(key_id, {TOKENS: tpm}, charge)

    def _update(
        self, key_id: int, limits: dict[str, int], change: Callable[[dict[str, TokenBucket]], None]
    ) -> dict[str, str]:
        """Lock the key's buckets, refill them to now, apply `change`, write them back, and say where they stand
        (limit_headers); RateLimited from `change` leaves them as they were, and carries where they stand. Two
        gateways creating a key's first bucket at once: one insert loses on the primary key (PostgreSQL locks no
        row that does not exist yet) and is tried again."""
        for attempt in (1, 2):
            try:
                with Session(self.engine, expire_on_commit=False) as session:
                    q = select(RateBucket).where(
                        RateBucket.key_id == key_id,
                        RateBucket.kind.in_(list(limits)),  # type: ignore[attr-defined]
                    )
                    if is_postgres(self.engine):
                        q = q.with_for_update()
                    rows = {r.kind: r for r in session.exec(q)}
                    now = self.clock()
                    buckets = {}
                    for kind, capacity in limits.items():
                        row = rows.get(kind)
                        if row is None or row.capacity != capacity:  # a changed limit starts a fresh bucket
                            buckets[kind] = TokenBucket.full(capacity, now)
                        else:
                            buckets[kind] = TokenBucket(capacity, row.level, row.stamp)
                            buckets[kind].refill(now)
                    try:
                        change(buckets)
                    except RateLimited as e:
                        e.headers.update(limit_headers(buckets))
                        raise
                    for kind, b in buckets.items():
                        row = rows.get(kind) or RateBucket(key_id=key_id, kind=kind)
                        row.capacity, row.level, row.stamp = int(b.capacity), b.level, b.stamp
                        session.add(row)
                    session.commit()
                    return limit_headers(buckets)
            except IntegrityError:
                if attempt == 2:
                    raise _unavailable("a bucket row could not be created") from None
            except SQLAlchemyError as e:
                raise _unavailable(type(e).__name__) from e


def limit_headers(buckets: dict[str, TokenBucket]) -> dict[str, str]:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens} for a key's buckets as they stand: the limit
    per minute, what is left now, and how long until the bucket is full again (read by clients that pace
    themselves: LiteLLM, the OpenAI cookbook's parallel processor)."""
    out = {}
    for kind, b in sorted(buckets.items()):
        out[f"x-ratelimit-limit-{kind}"] = str(int(b.capacity))
        out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(b.level)))
        out[f"x-ratelimit-reset-{kind}"] = _duration(max(0.0, b.capacity - b.level) / b.rate)
    return out


def _duration(seconds: float) -> str:
    """A time as OpenAI's headers write it: "20ms", "1s", "6m0s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def _take_request(buckets: dict[str, TokenBucket], rpm: int | None, tpm: int | None) -> None:
    if rpm and (w := buckets[REQUESTS].wait_for(1)) > 0:
        raise RateLimited(f"this key's limit of {rpm} requests per minute is used up; retry later", retry_after=w)
    if tpm and (w := buckets[TOKENS].wait_for(1)) > 0:
        raise RateLimited(f"this key's limit of {tpm} tokens per minute is used up; retry later", retry_after=w)
    if rpm:
        buckets[REQUESTS].level -= 1


def _take_tokens(bucket: TokenBucket, tokens: int, tpm: int) -> None:
    if (w := bucket.wait_for(tokens)) > 0:
        raise RateLimited(
            f"this key's limit of {tpm} tokens per minute does not hold this request's {tokens} tokens "
            "(its prompt and max_tokens for every choice) right now; retry later",
            retry_after=w,
        )
    bucket.level -= tokens


def _unavailable(why: str) -> RateLimitsUnavailable:
    log.warning("rate limits cannot be read or written: %s", why)
    return RateLimitsUnavailable(
        "this gateway cannot check rate limits right now (its database is unavailable); retry later"
    )
