"""The hand-written record formats of ledger.merkle (the packed settleBatch records, the leaf preimage) agree with
web3's and eth_abi's encoders and round-trip; crash-injection specs are checked."""

import pytest
from eth_abi import encode as abi_encode
from eth_utils import keccak
from web3 import Web3

from ledger.artifacts import load_artifact
from ledger.chain import settle_calldata
from ledger.merkle import (
    MAX_ADAPTERS_PER_BATCH,
    MAX_NODES_PER_BATCH,
    RECORD_BYTES,
    BatchTooWide,
    MerkleTree,
    batch_id_for,
    encode_leaf,
    leaf_hash,
    pack_records,
    unpack_records,
)
from ledger.settler_config import SettlerConfig
from ledger.types import BASE_MODEL_ADAPTER_ID, ZERO_ID, SettleRecord, is_base_model
from tests.utils.chain import rand_id
from tests.utils.crashing_settler import CrashHook


def _records(n, *, adapters=5, nodes=3):
    # every third record is a base-model one (adapter id zero): same encoding, same leaf format
    a_ids, n_ids = [rand_id() for _ in range(adapters)], [rand_id() for _ in range(nodes)]
    return [
        SettleRecord(
            rand_id(),
            BASE_MODEL_ADAPTER_ID if i % 3 == 1 else a_ids[i % adapters],
            n_ids[i % nodes],
            (2**32 - 1) - i,
            i * 7919,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_calldata_matches_web3_encoding(n):
    ledger = Web3().eth.contract(address="0x" + "11" * 20, abi=load_artifact("AttributionLedger")["abi"])
    records, batch_id, root = _records(n), rand_id(), rand_id()
    first = 12_345 + n
    max_prices = {r.adapter_id: 10**18 + i for i, r in enumerate(records)}  # one bound per adapter, each its own
    ours = settle_calldata(batch_id, root, first, records, max_prices)
    packed = pack_records(records, max_prices)
    web3s = ledger.functions.settleBatch(
        bytes.fromhex(batch_id[2:]),
        bytes.fromhex(root[2:]),
        first,
        [bytes.fromhex(a[2:]) for a in packed.adapter_ids],
        [bytes.fromhex(x[2:]) for x in packed.node_ids],
        packed.records,
        [max_prices[a] for a in packed.adapter_ids],
    )._encode_transaction_data()
    assert ours == Web3.to_bytes(hexstr=web3s)


def test_packed_records_round_trip():
    records = _records(40)
    packed = pack_records(records)
    assert len(packed.records) == RECORD_BYTES * 40
    assert list(packed.adapter_ids) == sorted(set(packed.adapter_ids)) and ZERO_ID == packed.adapter_ids[0]
    assert list(packed.node_ids) == sorted(set(packed.node_ids))
    back = unpack_records(packed.adapter_ids, packed.node_ids, packed.records)
    assert [SettleRecord("0x" + r.hex(), "0x" + a.hex(), "0x" + x.hex(), p, c) for r, a, x, p, c, _ in back] == records
    assert [packed.adapter_ids[k] for *_, k in back] == [r.adapter_id for r in records]
    with pytest.raises(ValueError, match="multiple"):
        unpack_records(packed.adapter_ids, packed.node_ids, packed.records[:-1])
    with pytest.raises(ValueError, match="id tables"):
        unpack_records(packed.adapter_ids[:1], packed.node_ids, packed.records)


def test_pack_limits():
    pack_records(_records(MAX_ADAPTERS_PER_BATCH * 3, adapters=MAX_ADAPTERS_PER_BATCH - 1))  # + the base model
    with pytest.raises(BatchTooWide, match="adapter entries"):
        pack_records(_records(MAX_ADAPTERS_PER_BATCH * 3, adapters=MAX_ADAPTERS_PER_BATCH))
    pack_records(_records(MAX_NODES_PER_BATCH, nodes=MAX_NODES_PER_BATCH))
    with pytest.raises(BatchTooWide, match="nodes"):
        pack_records(_records(MAX_NODES_PER_BATCH + 1, nodes=MAX_NODES_PER_BATCH + 1))
    with pytest.raises(ValueError, match="token counts"):
        pack_records([SettleRecord(rand_id(), rand_id(), rand_id(), 2**32, 0)])


def test_an_adapter_priced_two_ways_has_an_entry_per_price():
    """Records of one adapter bounded at two prices (quotes under a raise's grace) go in one batch: the adapter's
    entry appears once per bound, entries in increasing (id, bound), each record indexing its own."""
    a, b = sorted([rand_id(), rand_id()])
    node = rand_id()
    records = [SettleRecord(rand_id(), x, node, 1, 1) for x in (a, a, b, a)]
    packed = pack_records(records, [7, 5, 9, 7])
    assert packed.adapter_ids == (a, a, b) and packed.max_prices == (5, 7, 9)
    back = unpack_records(packed.adapter_ids, packed.node_ids, packed.records)
    assert [k for *_, k in back] == [1, 0, 2, 1]
    # the same records at other bounds are another batch; per adapter or per record, one bound each is one batch
    assert batch_id_for(records, max_prices=[7, 5, 9, 7]) != batch_id_for(records, max_prices=[7, 7, 9, 7])
    assert batch_id_for(records, max_prices={a: 7, b: 9}) == batch_id_for(records, max_prices=[7, 7, 9, 7])
    with pytest.raises(ValueError, match="3 bounds for 4 records"):
        pack_records(records, [1, 2, 3])
    # the ledger's table bound counts entries: half as many adapters at two prices each fill it
    ids = [rand_id() for _ in range(MAX_ADAPTERS_PER_BATCH // 2)]
    wide = [SettleRecord(rand_id(), x, node, 1, 1) for x in ids for _ in range(2)]
    pack_records(wide, [i % 2 for i in range(len(wide))])
    with pytest.raises(BatchTooWide, match="adapter entries"):
        pack_records([*wide, SettleRecord(rand_id(), ids[0], node, 1, 1)], [*(i % 2 for i in range(len(wide))), 2])


def _abi_leaf(r, seq):
    # the yardstick: eth_abi's generic encoder (the contract's leafOf is held equal in tests/contracts)
    return keccak(abi_encode(["uint64", "bytes32", "bytes32", "bytes32", "uint32", "uint32"], [seq, *r.as_tuple()]))


def test_leaves_and_root_match_eth_abi_encoding():
    records = _records(9)
    leaves = [_abi_leaf(r, 70 + i) for i, r in enumerate(records)]
    assert [keccak(encode_leaf(r, 70 + i)) for i, r in enumerate(records)] == leaves
    assert leaves == [leaf_hash(r, 70 + i) for i, r in enumerate(records)]
    assert MerkleTree(leaves).root == MerkleTree.from_records(records, 70).root
    assert MerkleTree.from_records(records, 71).root != MerkleTree.from_records(records, 70).root


def test_base_model_record_encodes_the_zero_adapter_id():
    r = SettleRecord(rand_id(), BASE_MODEL_ADAPTER_ID, rand_id(), 3, 4)
    assert BASE_MODEL_ADAPTER_ID == ZERO_ID and encode_leaf(r, 0)[64:96] == bytes(32)
    assert leaf_hash(r, 5) == keccak(encode_leaf(r, 5)) == _abi_leaf(r, 5)
    assert is_base_model(ZERO_ID) and is_base_model(bytes(32)) and not is_base_model(rand_id())
    assert not is_base_model(None) and not is_base_model("0x00")


def test_encode_leaf_uses_normalised_ids():
    upper = "0x" + "AB" * 32
    r = SettleRecord(upper, upper, upper, 1, 2)
    assert encode_leaf(r, 0)[32:64] == bytes.fromhex("ab" * 32)


def test_batch_id_names_the_records_and_ends_with_its_salt():
    # AttributionLedger takes a batch id only when its first 28 bytes are those of
    # keccak256(abi.encode(adapterIds, nodeIds, records, maxPrices)); the last 4 are the settler's salt
    records = _records(7)
    packed = pack_records(records)
    tables = [[bytes.fromhex(i[2:]) for i in ids] for ids in (packed.adapter_ids, packed.node_ids)]
    content = abi_encode(
        ["bytes32[]", "bytes32[]", "bytes", "uint256[]"], [*tables, packed.records, [2**256 - 1] * len(tables[0])]
    )
    assert batch_id_for(records, 3) == "0x" + (keccak(content)[:28] + (3).to_bytes(4, "big")).hex()
    # the bounds are named too: a copy of the batch with lower ones is another batch (the ledger may charge
    # down to them during a price's grace)
    bounds = {a: 5 + i for i, a in enumerate(packed.adapter_ids)}
    content = abi_encode(
        ["bytes32[]", "bytes32[]", "bytes", "uint256[]"], [*tables, packed.records, [*bounds.values()]]
    )
    assert batch_id_for(records, 0, bounds) == "0x" + (keccak(content)[:28] + bytes(4)).hex()
    assert batch_id_for(records, 0, {**bounds, packed.adapter_ids[1]: 5}) != batch_id_for(records, 0, bounds)
    assert batch_id_for(records)[:58] == batch_id_for(records, 3)[:58] and batch_id_for(records).endswith("0" * 8)
    # any field of any record, or their order, is another id
    changed = [*records[:-1], SettleRecord(*records[-1][:4], records[-1].completion_tokens + 1)]
    assert len({batch_id_for(records), batch_id_for(changed), batch_id_for(records[::-1])}) == 3


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
