"""Attribution records, the outbox, the chain client, settlement and rewards."""

from ledger.chain import ChainClient
from ledger.db import init_db, make_engine
from ledger.deployment import Deployment
from ledger.errors import ChainUnavailable, ContractError, DeploymentMismatch, LedgerError
from ledger.merkle import MerkleTree, leaf_hash, verify_proof
from ledger.models import ApiKey, SettlementBatch, UsageRecord
from ledger.outbox import OutboxError, add_usage_record
from ledger.rewards import RewardsSummary, rewards_summary
from ledger.settler import Settler
from ledger.settler_config import SettlerConfig
from ledger.types import SettleRecord

__all__ = [
    "ApiKey", "ChainClient", "ChainUnavailable", "ContractError", "Deployment", "DeploymentMismatch",
    "LedgerError", "MerkleTree", "OutboxError", "RewardsSummary", "SettleRecord", "SettlementBatch",
    "Settler", "SettlerConfig", "UsageRecord", "add_usage_record", "init_db", "leaf_hash", "make_engine",
    "rewards_summary", "verify_proof",
]  # fmt: skip
