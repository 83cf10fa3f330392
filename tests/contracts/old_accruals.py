"""The accrual formula of the ledger before packed records (AttributionLedger as of 2026-12-02), kept as a
Python reference for the differential test: the same records must accrue the same amounts to the same
accounts, dust included.

That ledger priced each record on its own, fee = price * (prompt + completion) / 1000 rounded down (the base
price for adapter id zero), gave the serving node's operator fee * nodeShareBps / 10,000 rounded down (all of
a base-model fee), summed the cuts per (adapter, node) and the rest per adapter within the batch, and split
each adapter's rest once per batch: every dataset payee rest * share / 10,000 rounded down, the owner what is
left, dust included.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from ledger.types import ZERO_ID, Role, SettleRecord

MAX_BPS = 10_000


@dataclass(frozen=True)
class Split:
    """An adapter as the registry's adapterSplit returns it."""

    owner: str
    price: int
    dataset_ids: tuple[str, ...] = ()
    payees: tuple[str, ...] = ()
    shares_bps: tuple[int, ...] = ()


def old_accruals(
    records: Iterable[SettleRecord],
    *,
    splits: dict[str, Split],
    operators: dict[str, str],
    node_share_bps: int,
    base_price: int,
) -> tuple[int, dict[tuple[str, str, Role, str], int]]:
    """(total fees, {(account, adapter id, role, subject id): amount}) of one batch, as RewardAccrued
    events of the old ledger reported them (zero amounts were not emitted)."""
    node_groups: dict[tuple[str, str], int] = defaultdict(int)
    rests: dict[str, int] = defaultdict(int)
    total = 0
    for r in records:
        tokens = r.prompt_tokens + r.completion_tokens
        if r.adapter_id == ZERO_ID:
            fee = base_price * tokens // 1000
            node_groups[(ZERO_ID, r.node_id)] += fee
        else:
            fee = splits[r.adapter_id].price * tokens // 1000
            cut = fee * node_share_bps // MAX_BPS
            node_groups[(r.adapter_id, r.node_id)] += cut
            rests[r.adapter_id] += fee - cut
        total += fee
    out: dict[tuple[str, str, Role, str], int] = defaultdict(int)
    for (adapter, node), amount in node_groups.items():
        if amount:
            out[(operators[node], adapter, Role.NODE, node)] += amount
    for adapter, rest in rests.items():
        sp = splits[adapter]
        paid = 0
        for ds, payee, share in zip(sp.dataset_ids, sp.payees, sp.shares_bps, strict=True):
            cut = rest * share // MAX_BPS
            paid += cut
            if cut:
                out[(payee, adapter, Role.DATASET, ds)] += cut
        if rest - paid:
            out[(sp.owner, adapter, Role.ADAPTER_OWNER, adapter)] += rest - paid
    return total, dict(out)
