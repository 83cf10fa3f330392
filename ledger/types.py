"""Plain values read from or sent to the contracts (ids as "0x"+64 hex strings)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

ZERO_ID = "0x" + "00" * 32
# The adapter id of a request to the bare base model (no adapter): stored as such in the outbox and
# sent as such on chain, where AttributionLedger prices it at basePricePer1kTokens, all to the node.
BASE_MODEL_ADAPTER_ID = ZERO_ID


def is_base_model(adapter_id: str | bytes | None) -> bool:
    """Whether an adapter id names the bare base model (the zero id)."""
    if adapter_id is None:
        return False
    try:
        return to_id(adapter_id) == ZERO_ID
    except ValueError:
        return False


def to_id(value: str | bytes) -> str:
    """Normalise a bytes32 id to "0x"+64 lowercase hex; ValueError when it is not 32 bytes."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 32:
            raise ValueError(f"id must be 32 bytes, got {len(value)}")
        return "0x" + bytes(value).hex()
    if not isinstance(value, str):
        raise ValueError(f"id must be a hex string or bytes, got {type(value).__name__}")
    text = value.lower()
    body = text[2:] if text.startswith("0x") else text
    if len(body) != 64 or any(c not in "0123456789abcdef" for c in body):
        raise ValueError(f"id must be 0x followed by 64 hex digits, got {value!r}")
    return "0x" + body


def id_bytes(value: str | bytes) -> bytes:
    """A bytes32 id as 32 raw bytes."""
    return bytes.fromhex(to_id(value)[2:])


class Role(enum.IntEnum):
    """Matches AttributionLedger.Role."""

    NODE = 0
    ADAPTER_OWNER = 1
    DATASET = 2


@dataclass(frozen=True, slots=True)
class SettleRecord:
    """One inference as AttributionLedger.Record (and as the Merkle leaf is computed)."""

    request_id: str
    adapter_id: str
    node_id: str
    prompt_tokens: int
    completion_tokens: int

    def __post_init__(self) -> None:
        for name in ("request_id", "adapter_id", "node_id"):
            object.__setattr__(self, name, to_id(getattr(self, name)))
        for name in ("prompt_tokens", "completion_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v < 2**64:
                raise ValueError(f"{name} must be an integer in [0, 2**64), got {v!r}")

    def as_tuple(self) -> tuple:
        return (id_bytes(self.request_id), id_bytes(self.adapter_id), id_bytes(self.node_id),
                self.prompt_tokens, self.completion_tokens)  # fmt: skip


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    dataset_id: str
    content_hash: str
    payee: str


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    adapter_id: str
    owner: str
    name: str
    version: str
    predecessor: str
    base_model: str
    price_per_1k_tokens: int
    dataset_ids: tuple[str, ...]
    shares_bps: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    operator: str
    active: bool
    base_model: str
    peer_id: str
    api_url: str
    multiaddrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BatchInfo:
    batch_id: str
    merkle_root: str
    settler: str
    settled_block: int
    record_count: int
    total_fees: int


@dataclass(frozen=True, slots=True)
class RewardBalance:
    available: int
    accrued: int
    withdrawn: int
