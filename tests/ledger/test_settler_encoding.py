"""The hand-written ABI encoding of records (ledger.merkle.encode_record: settleBatch calldata and the Merkle
leaf) agrees with web3's and eth_abi's encoders; crash-injection specs are checked."""

import pytest
from eth_abi import encode as abi_encode
from eth_utils import keccak
from web3 import Web3

from ledger.artifacts import load_artifact
from ledger.chain import settle_calldata
from ledger.merkle import MerkleTree, encode_record, leaf_hash
from ledger.settler_config import SettlerConfig
from ledger.types import BASE_MODEL_ADAPTER_ID, ZERO_ID, SettleRecord, is_base_model
from tests.utils.chain import rand_id
from tests.utils.crashing_settler import CrashHook


def _records(n):
    # every third record is a base-model one (adapter id zero): same encoding, same leaf format
    return [
        SettleRecord(
            rand_id(), BASE_MODEL_ADAPTER_ID if i % 3 == 1 else rand_id(), rand_id(), (2**64 - 1) - i, i * 7919
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_calldata_matches_web3_encoding(n):
    ledger = Web3().eth.contract(address="0x" + "11" * 20, abi=load_artifact("AttributionLedger")["abi"])
    records, batch_id, root = _records(n), rand_id(), rand_id()
    max_fees = 10**18 + n
    ours = settle_calldata(batch_id, root, [encode_record(r) for r in records], max_fees)
    web3s = ledger.functions.settleBatch(
        bytes.fromhex(batch_id[2:]), bytes.fromhex(root[2:]), [r.as_tuple() for r in records], max_fees
    )._encode_transaction_data()
    assert ours == Web3.to_bytes(hexstr=web3s)


def _abi_leaf(r):
    # the yardstick: eth_abi's generic encoder (the contract's leafOf is held equal in tests/contracts)
    return keccak(abi_encode(["bytes32", "bytes32", "bytes32", "uint64", "uint64"], list(r.as_tuple())))


def test_leaves_and_root_match_eth_abi_encoding():
    records = _records(9)
    leaves = [_abi_leaf(r) for r in records]
    assert [keccak(encode_record(r)) for r in records] == leaves == [leaf_hash(r) for r in records]
    assert MerkleTree(leaves).root == MerkleTree.from_records(records).root


def test_base_model_record_encodes_the_zero_adapter_id():
    r = SettleRecord(rand_id(), BASE_MODEL_ADAPTER_ID, rand_id(), 3, 4)
    assert BASE_MODEL_ADAPTER_ID == ZERO_ID and encode_record(r)[32:64] == bytes(32)
    assert leaf_hash(r) == keccak(encode_record(r)) == _abi_leaf(r)
    assert is_base_model(ZERO_ID) and is_base_model(bytes(32)) and not is_base_model(rand_id())
    assert not is_base_model(None) and not is_base_model("0x00")


def test_encode_record_uses_normalised_ids():
    upper = "0x" + "AB" * 32
    r = SettleRecord(upper, upper, upper, 1, 2)
    assert encode_record(r)[:32] == bytes.fromhex("ab" * 32)


@pytest.mark.parametrize("spec", ["in_flight", "after_send@3", "before_send@1", "after_receipt"])
def test_crash_specs_accepted(spec):
    assert CrashHook(spec).spec == spec


@pytest.mark.parametrize("spec", ["in_flight@0", "after_send@x", "after_send@", "later@2"])
def test_crash_specs_refused(spec):
    with pytest.raises(ValueError, match="crash point"):
        CrashHook(spec)


@pytest.mark.parametrize("n", [0, 257])
def test_max_in_flight_is_checked(n):
    with pytest.raises(ValueError, match="max_in_flight"):
        SettlerConfig(max_in_flight=n)
