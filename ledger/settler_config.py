"""How a settler runs: SettlerConfig, and the test-only crash injection it configures."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CRASH_ENV = "LORAMESH_SETTLER_CRASH_AT"
# in_flight: every batch of a step sent, no receipt awaited yet. "point@k" dies the k-th time there.
CRASH_POINTS = ("before_send", "after_send", "in_flight", "after_receipt")
CRASH_EXIT_CODE = 97


def _parse_crash(spec: str) -> tuple[str, int]:
    name, at, count = spec.partition("@")
    if name not in CRASH_POINTS or (at and not (count.isdigit() and int(count) >= 1)):
        raise ValueError(f"{CRASH_ENV} must be one of {', '.join(CRASH_POINTS)} (optionally @N), got {spec!r}")
    return name, int(count or 1)


# Bounds on what one record may cost (settler side). A price above the bound is a mistake (an adapter
# priced in whole coins rather than wei) or an attack on the gateway's deposit; a record above the token
# bound is a bogus receipt. Either is set aside, never settled, and never holds up other records.
DEFAULT_MAX_PRICE_PER_1K = 10**16  # wei per 1,000 tokens: 0.01 coin, far above any sane price
DEFAULT_MAX_RECORD_TOKENS = 1 << 22  # prompt + completion tokens of one record (4,194,304)
DEFAULT_LOW_DEPOSIT = 10**17  # wei: below this much deposit left (after in-flight batches), warn
DEFAULT_LEASE = 30.0  # seconds a settler's claim on an unfinished batch lasts without renewal


@dataclass(slots=True)
class SettlerConfig:
    """batch_size (N): most records per batch, and a full batch goes out at once; interval (T): a
    partial batch goes out when its oldest record has waited this long (seconds); max_in_flight:
    most batches sent before waiting for their receipts (1 = one batch per receipt, sequential).

    max_price_per_1k (wei) and max_record_tokens bound what one record may cost: records beyond them
    are set aside with the reason. low_deposit (wei): the deposit left, less what in-flight batches will
    take, below which the settler warns (logs, `loramesh settler status`). lease (seconds): how long
    a claim on an unfinished batch holds without renewal (renewed every lease/3 while working on it;
    another settler takes the batch over once it has expired)."""

    batch_size: int = 100
    interval: float = 5.0
    poll: float = 0.2
    max_backoff: float = 15.0
    receipt_timeout: float = 60.0
    max_in_flight: int = 32
    max_price_per_1k: int = DEFAULT_MAX_PRICE_PER_1K
    max_record_tokens: int = DEFAULT_MAX_RECORD_TOKENS
    low_deposit: int = DEFAULT_LOW_DEPOSIT
    lease: float = DEFAULT_LEASE
    crash_at: str | None = field(default_factory=lambda: os.environ.get(CRASH_ENV) or None)

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 5_000:
            raise ValueError(f"batch_size must be 1..5000, got {self.batch_size}")
        if self.interval < 0 or self.poll <= 0:
            raise ValueError(f"interval must be >= 0 and poll > 0, got {self.interval}, {self.poll}")
        if not 1 <= self.max_in_flight <= 256:
            raise ValueError(f"max_in_flight must be 1..256, got {self.max_in_flight}")
        if self.max_price_per_1k < 0 or self.max_record_tokens < 0 or self.low_deposit < 0:
            raise ValueError("max_price_per_1k, max_record_tokens and low_deposit must be >= 0, got "
                             f"{self.max_price_per_1k}, {self.max_record_tokens}, {self.low_deposit}")
        if self.lease < 1.0:
            raise ValueError(f"lease must be at least 1 second, got {self.lease}")
        if self.crash_at is not None:
            _parse_crash(self.crash_at)


class CrashHook:
    """Test-only: called at each crash point, dies there, abruptly, when LORAMESH_SETTLER_CRASH_AT
    names this point (@k: the k-th time it is reached)."""

    def __init__(self, crash_at: str | None) -> None:
        self.crash_at = crash_at
        self._crash = _parse_crash(crash_at) if crash_at else None
        self._crash_seen = 0

    def __call__(self, name: str) -> None:
        if self._crash is None or self._crash[0] != name:
            return
        self._crash_seen += 1
        if self._crash_seen >= self._crash[1]:
            log.warning("crash injection at %s", self.crash_at)
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)
