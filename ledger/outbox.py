"""The outbox: usage records written by the gateway, read and advanced by the settler."""

from __future__ import annotations

import math
from fractions import Fraction

from eth_utils import keccak
from sqlmodel import Session, func, select

from common.wire import canonical_json, hex0x, id_bytes  # the receipt's canonical form is the node's
from ledger.models import RecordStatus, UsageRecord
from ledger.types import is_uint256, to_id

MAX_TOKENS = 2**64 - 1


class OutboxError(ValueError):
    """A usage record that cannot be settled as given."""


def add_usage_record(
    session: Session,
    *,
    request_id: str,
    adapter_id: str,
    node_id: str,
    prompt_tokens: int,
    completion_tokens: int,
    receipt_json: str | dict | None = None,
    node_signature: str | None = None,
    node_prompt_tokens: int | None = None,
    node_completion_tokens: int | None = None,
    status: str = RecordStatus.PENDING,
    error: str | None = None,
    gateway_key_id: int | None = None,
    quoted_price_per_1k: int | None = None,
) -> UsageRecord:
    """Add one record to the outbox in the caller's session; the caller commits (same transaction as
    its request completion). A second record with the same request id fails at commit (unique).
    A request to the bare base model has adapter_id = the zero id (ledger.types.BASE_MODEL_ADAPTER_ID).

    prompt_tokens / completion_tokens are what is billed (the gateway's count). The node's signed receipt
    and its counts go beside them when there is one; a record without a receipt (the node died
    mid-stream) has both None. status is PENDING (to be settled) or DISPUTED (kept, never settled; the
    reason in `error`). quoted_price_per_1k: the price (wei per 1,000 tokens) the request was admitted at, the
    most it is ever settled at (None: not known)."""
    try:
        ids = {
            name: to_id(v) for name, v in (("request_id", request_id), ("adapter_id", adapter_id), ("node_id", node_id))
        }
    except ValueError as e:
        raise OutboxError(f"usage record: {e}") from e
    for name, v in (
        ("prompt_tokens", prompt_tokens),
        ("completion_tokens", completion_tokens),
        ("node_prompt_tokens", node_prompt_tokens),
        ("node_completion_tokens", node_completion_tokens),
    ):
        if v is None and name.startswith("node_"):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOKENS:
            raise OutboxError(f"usage record: {name} must be an integer in [0, 2**64), got {v!r}")
    if quoted_price_per_1k is not None and not is_uint256(quoted_price_per_1k):
        raise OutboxError(
            f"usage record: quoted_price_per_1k must be an integer in [0, 2**256), got {quoted_price_per_1k!r}"
        )
    if isinstance(receipt_json, dict):
        receipt_json = canonical_json(receipt_json).decode("utf-8")
    if receipt_json is not None and (not isinstance(receipt_json, str) or not receipt_json):
        raise OutboxError("usage record: receipt_json must be the node's receipt as a JSON string or dict, or None")
    if (receipt_json is None) != (node_signature is None):
        raise OutboxError("usage record: a receipt and its signature come together (or neither)")
    if node_signature is not None and (not isinstance(node_signature, str) or not node_signature):
        raise OutboxError("usage record: node_signature must be a non-empty string")
    if status not in (RecordStatus.PENDING, RecordStatus.DISPUTED):
        raise OutboxError(f"usage record: a new record is pending or disputed, not {status!r}")
    if status == RecordStatus.DISPUTED and not error:
        raise OutboxError("usage record: a disputed record says why in `error`")
    record = UsageRecord(
        **ids,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        node_prompt_tokens=node_prompt_tokens,
        node_completion_tokens=node_completion_tokens,
        receipt_json=receipt_json,
        node_signature=node_signature,
        status=status,
        error=error,
        gateway_key_id=gateway_key_id,
        quoted_price_per_1k=None if quoted_price_per_1k is None else str(quoted_price_per_1k),
    )
    session.add(record)
    return record


def component_request_id(request_id: str, index: int) -> str:
    """The record id of component `index` of an ensemble request: keccak256(request id || uint256 index), as
    Solidity's keccak256(abi.encodePacked(bytes32, uint256)). Each component needs its own id because the
    outbox and the ledger settle a record id once; derived, not random, so the same request always yields
    the same records (a resend or a reconciliation cannot bill twice) and anyone holding the request's
    receipt can recompute which records belong to it."""
    if not is_uint256(index):
        raise OutboxError(f"component index must be an integer in [0, 2**256), got {index!r}")
    try:
        rid = id_bytes(to_id(request_id))
    except ValueError as e:
        raise OutboxError(f"usage record: {e}") from e
    return hex0x(keccak(rid + index.to_bytes(32, "big")))


def billed_weights(weights: list[Fraction]) -> list[Fraction]:
    """The weights an ensemble's tokens are billed at: the weights as given, not normalised, where they sum
    to 1 or more, else scaled up to sum to 1. The node adds each adapter's change times its weight, so an
    adapter at weight 1 is billed every token whatever weights its companions have (split in proportion, a
    paid adapter beside free do-nothing ones at weight 8 was billed 1/25 of them); but every token served is
    billed to some adapter: weights of 1e-6 each were served the base model's tokens and billed none."""
    total = sum(weights)
    return weights if total >= 1 else [w / total for w in weights]


def split_by_weight(total: int, weights) -> list[int]:
    """An ensemble's shares of `total` tokens: component i's is total x its billed weight (billed_weights);
    weights that sum to 1 or less split `total` exactly. Rounded together by largest remainder: the shares
    sum to total x the billed weights' sum to the nearest unit (half up), each is the floor of its exact
    quota or one more, and the leftover units go to the largest fractional parts (ties: the earlier weight).
    Exact: floats become Fractions, no rounding."""
    ws = [Fraction(w) for w in weights]
    if not ws or any(w <= 0 for w in ws):
        raise OutboxError(f"weights must be positive, got {list(weights)!r}")
    ws = billed_weights(ws)
    units = math.floor(total * sum(ws) + Fraction(1, 2))
    quotas = [total * w for w in ws]
    shares = [q.numerator // q.denominator for q in quotas]
    left = units - sum(shares)  # 0 to len(ws): the fractional parts' sum, rounded
    by_remainder = sorted(range(len(ws)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in by_remainder[:left]:
        shares[i] += 1
    return shares


def ensemble_usage(usage: dict, components) -> list[dict]:
    """One request's usage (add_usage_record's keywords) as one record per ensemble component: adapter i's
    record has its derived request id, and its share of every count (split_by_weight, each count on its
    own). The receipt and signature go with every record: they are the proof."""
    ids = [aid for aid, _ in components]
    weights = [w for _, w in components]
    split = {
        k: split_by_weight(usage[k], weights) if usage.get(k) is not None else [None] * len(ids)
        for k in ("prompt_tokens", "completion_tokens", "node_prompt_tokens", "node_completion_tokens")
    }
    return [
        usage
        | {"request_id": component_request_id(usage["request_id"], i), "adapter_id": aid}
        | {k: v[i] for k, v in split.items()}
        for i, aid in enumerate(ids)
    ]


def count_by_status(session: Session) -> dict[str, int]:
    """How many records are in each status."""
    rows = session.exec(select(UsageRecord.status, func.count()).group_by(UsageRecord.status)).all()
    return {status: n for status, n in rows}


def batch_records(session: Session, batch_id: str) -> list[UsageRecord]:
    """A batch's records in leaf order."""
    stmt = select(UsageRecord).where(UsageRecord.batch_id == batch_id).order_by(UsageRecord.leaf_index)
    return list(session.exec(stmt).all())
