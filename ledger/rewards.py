"""Reward queries: what accrued to an address, split by adapter and by role, from chain events.

Base-model records (no adapter) accrue under the zero adapter id (BASE_MODEL_ADAPTER_ID), role node.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from eth_utils import to_checksum_address

from common.wire import hex0x
from ledger.chain import ChainClient
from ledger.types import BASE_MODEL_ADAPTER_ID, Role


@dataclass(slots=True)
class RewardsSummary:
    """accrued is available + withdrawn (the ledger derives it so); the by_* maps, read from the reward events, sum
    to it (checked by `adds_up`)."""

    address: str
    available: int
    accrued: int
    withdrawn: int
    by_role: dict[str, int] = field(default_factory=dict)
    by_adapter: dict[str, dict[str, int]] = field(default_factory=dict)
    batches: int = 0

    @property
    def base_model(self) -> int:
        """What accrued for serving the bare base model (node operators only)."""
        return sum(self.by_adapter.get(BASE_MODEL_ADAPTER_ID, {}).values())

    @property
    def adds_up(self) -> bool:
        return (
            sum(self.by_role.values()) == self.accrued
            and sum(sum(v.values()) for v in self.by_adapter.values()) == self.accrued
        )

    def to_dict(self) -> dict:
        return {
            "address": self.address,
            "available": self.available,
            "accrued": self.accrued,
            "withdrawn": self.withdrawn,
            "by_role": self.by_role,
            "by_adapter": self.by_adapter,
            "batches": self.batches,
            "base_model": self.base_model,
            "adds_up": self.adds_up,
        }


def role_name(role: int) -> str:
    return Role(role).name.lower()


def rewards_summary(client: ChainClient, address: str) -> RewardsSummary:
    """Balances from rewardsOf plus every RewardAccrued event for the address."""
    address = to_checksum_address(address)
    bal = client.rewards_of(address)
    by_role: dict[str, int] = defaultdict(int)
    by_adapter: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    batches = set()
    for ev in client.events("ledger", "RewardAccrued", filters={"account": address}):
        a = ev["args"]
        role = role_name(a["role"])
        by_role[role] += a["amount"]
        by_adapter[hex0x(a["adapterId"])][role] += a["amount"]
        batches.add(bytes(a["batchId"]))
    return RewardsSummary(
        address,
        bal.available,
        bal.accrued,
        bal.withdrawn,
        dict(by_role),
        {k: dict(v) for k, v in by_adapter.items()},
        len(batches),
    )
