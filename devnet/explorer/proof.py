"""Check one ledger record against its batch's Merkle root on chain, off-chain and by the contract.

The leaf is computed from the database record and its sequence number (its batch's firstSequence, read
from the chain, plus its position) exactly as AttributionLedger.leafOf does (and the contract's own leafOf
is asked too); the proof comes from the batch's records in the database, in leaf order; the root comes
from the chain. A record whose tokens (or ids) were changed after
settlement yields a different leaf, and no proof takes it to the settled root.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from common.wire import hex0x
from ledger.batching import to_settle_record
from ledger.chain import ChainClient
from ledger.merkle import MerkleTree, leaf_hash, verify_proof
from ledger.models import UsageRecord
from ledger.types import SettleRecord


@dataclass(slots=True)
class ProofCheck:
    """verified only when the off-chain check, the contract's verifyRecord and leafOf all agree."""

    verified: bool
    reason: str
    leaf: str | None = None
    contract_leaf: str | None = None
    leaf_index: int | None = None
    proof: list[str] = field(default_factory=list)
    chain_root: str | None = None
    db_root: str | None = None
    offchain_ok: bool | None = None
    onchain_ok: bool | None = None
    pending: bool = False  # not settled yet: nothing to prove against
    differing: list[int] = field(default_factory=list)  # leaves where the database differs from the chain's events


def check_record_proof(
    client: ChainClient,
    row: UsageRecord,
    batch_rows: Sequence[UsageRecord],
    chain_root: str | None,
    settled: Sequence[SettleRecord] = (),
) -> ProofCheck:
    """Prove `row` (a database record) against `chain_root`, the settled root of its batch. `settled`
    (the batch's records as its RecordsSettled log has them, in order) only explains a failure: which
    leaves differ."""
    if row.batch_id is None or row.leaf_index is None:
        return ProofCheck(False, f"not in a batch yet (status {row.status})", pending=True)
    if chain_root is None:
        return ProofCheck(
            False, f"batch {row.batch_id} is not settled on chain yet (status {row.status})", pending=True
        )
    indexes = [r.leaf_index for r in batch_rows]
    if indexes != list(range(len(batch_rows))) or not 0 <= row.leaf_index < len(batch_rows):
        return ProofCheck(
            False,
            f"the database holds leaves {indexes} of batch {row.batch_id}, expected 0..n-1",
            chain_root=chain_root,
        )
    info = client.get_batch(row.batch_id)
    if info is None:
        return ProofCheck(False, f"batch {row.batch_id} is not settled on chain", chain_root=chain_root)
    first = info.first_sequence
    record = to_settle_record(row)
    leaf = leaf_hash(record, first + row.leaf_index)
    tree = MerkleTree.from_records([to_settle_record(r) for r in batch_rows], first)
    proof = tree.proof(row.leaf_index)
    proof_hex = [hex0x(p) for p in proof]
    offchain = verify_proof(leaf, proof, chain_root)
    onchain = client.verify_record(row.batch_id, hex0x(leaf), proof_hex)
    contract_leaf = client.leaf_of(record, first + row.leaf_index)
    check = ProofCheck(
        False,
        "",
        hex0x(leaf),
        contract_leaf,
        row.leaf_index,
        proof_hex,
        chain_root,
        hex0x(tree.root),
        offchain,
        onchain,
    )
    if contract_leaf != check.leaf:
        check.reason = "the contract's leafOf disagrees with the leaf computed here"
    elif offchain and onchain:
        check.verified = True
        check.reason = (
            "the record's leaf and its proof reach the batch's Merkle root on chain "
            "(checked here and by the contract's verifyRecord)"
        )
    elif offchain != onchain:
        check.reason = f"the checks disagree (here: {offchain}, contract verifyRecord: {onchain})"
    else:
        check.differing = [
            i for i, r in enumerate(batch_rows) if i >= len(settled) or to_settle_record(r) != settled[i]
        ]
        check.reason = _why_not(row.leaf_index, check.differing, bool(settled))
    return check


def _why_not(index: int, differing: list[int], have_events: bool) -> str:
    if not have_events or index in differing:
        return (
            "the record's leaf does not reach the batch's Merkle root on chain: the database record differs "
            "from what was settled"
        )
    if differing:
        return (
            f"the proof built from the database does not reach the batch's Merkle root on chain: this record "
            f"matches what was settled, but the database's leaves {differing} of its batch do not"
        )
    return "the proof built from the database does not reach the batch's Merkle root on chain"
