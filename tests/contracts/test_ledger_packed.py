"""AttributionLedger's sequenced, packed settlement against a real anvil: accruals equal the old ledger's
formula on random batches (differential), a batch starts exactly at its settler's next sequence number, a
record keeps its number (a second batch carrying it is refused), reuse of a request id under new numbers is
visible from the chain alone, and the limits on id tables and records hold at their edges."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eth_abi import encode as abi_encode
from web3.logs import DISCARD

from common.wire import hex0x, id_bytes, node_id_of
from ledger import errors as E
from ledger.chain import SETTLE_SELECTOR
from ledger.errors import (
    InvalidPrice,
    MalformedRecords,
    RecordIndexOutOfRange,
    SequenceMismatch,
    TableNotIncreasing,
    TooManyAdapters,
    TooManyNodes,
)
from ledger.merkle import (
    MAX_ADAPTERS_PER_BATCH,
    MAX_NODES_PER_BATCH,
    MerkleTree,
    batch_id_for,
    batch_id_of,
    leaf_hash,
    pack_records,
)
from ledger.types import ZERO_ID, Role, SettleRecord
from tests.contracts.old_accruals import Split, old_accruals
from tests.utils.chain import rand_id, register_sample

pytestmark = pytest.mark.integration


def _accrued_events(env, rcpt) -> dict:
    out: dict = defaultdict(int)
    for e in env.client().ledger.events.RewardAccrued().process_receipt(rcpt, errors=DISCARD):
        a = e["args"]
        out[(a["account"], hex0x(a["adapterId"]), Role(a["role"]), hex0x(a["subjectId"]))] += a["amount"]
    return dict(out)


def _raw_settle(client, batch_id, first, adapters, nodes, packed, root=None, max_prices=None):
    """settleBatch with hand-made tables, records and price bounds (what a broken or hostile settler could
    send); max_prices None: no bound on any adapter entry."""
    data = SETTLE_SELECTOR + abi_encode(
        ["bytes32", "bytes32", "uint64", "bytes32[]", "bytes32[]", "bytes", "uint256[]"],
        [
            id_bytes(batch_id),
            id_bytes(root or rand_id()),
            first,
            [id_bytes(a) for a in adapters],
            [id_bytes(n) for n in nodes],
            packed,
            [2**256 - 1] * len(adapters) if max_prices is None else max_prices,
        ],
    )
    return client.tx.estimate(client.ledger.address, data)


def _register_node(env, operator) -> str:
    key = Ed25519PrivateKey.generate()
    env.client(operator).register_node(
        key, peer_id="p", multiaddrs=[], api_url="http://127.0.0.1:1", base_model=rand_id()
    )
    return node_id_of(key.public_key().public_bytes_raw())


def _register_adapter(env, owner, price: int) -> str:
    adapter = rand_id()
    env.client(owner).register_adapter(
        adapter, name=f"a-{adapter[2:10]}", version="1", base_model=rand_id(), price_per_1k_tokens=price
    )
    return adapter


# ------------------------------------------------------------------ differential: accruals unchanged


def test_accruals_equal_the_old_formula_on_random_batches(anvil_chain):
    env = anvil_chain
    rng = random.Random(19)
    shares = [(3333, 1111, 7), (), (5000,), (9999,)]
    regs = [
        register_sample(env, price=999_999_937, shares=shares[0]),
        register_sample(env, price=10**15 + 1, shares=shares[1], owner=env.users[3]),
        register_sample(env, price=7, shares=shares[2], operator=env.users[4]),  # fees of a few wei: all dust
        register_sample(env, price=123_456_789_012, shares=shares[3], operator=env.users[4]),
    ]
    extra_nodes = [_register_node(env, env.users[5]), _register_node(env, env.users[1])]
    splits = {
        r.adapter_id: Split(r.owner.address, r.price, r.dataset_ids, tuple(p.address for p in r.payees), shares[i])
        for i, r in enumerate(regs)
    }
    operators = {r.node_id: r.operator.address for r in regs} | {
        extra_nodes[0]: env.users[5].address,
        extra_nodes[1]: env.users[1].address,
    }
    nodes = list(operators)
    admin = env.client(env.admin)
    price_before, share_before = admin.base_price(), admin.node_share_bps()
    admin.set_base_price(333_333_331)
    admin.set_node_share_bps(7_777)
    c = env.client()
    try:
        for n in (1, 2, 17, 60, 101):
            records = []
            for _ in range(n):
                adapter = ZERO_ID if rng.random() < 0.15 else rng.choice(regs).adapter_id
                choices = [(0, 0), (1, 0), (rng.randrange(2_000), rng.randrange(500))]
                if adapter != regs[1].adapter_id:  # the largest counts, where the deposit can pay them
                    choices.append((2**32 - 1, 2**32 - 1))
                tokens = rng.choice(choices)
                records.append(SettleRecord(rand_id(), adapter, rng.choice(nodes), *tokens))
            accounts = {
                a
                for k in old_accruals(
                    records, splits=splits, operators=operators, node_share_bps=7_777, base_price=333_333_331
                )[1]
                for a in [k[0]]
            }
            before = {a: c.rewards_of(a).accrued for a in accounts}
            deposit = c.deposit_of(env.settler.address)
            rcpt = env.client(env.settler).settle_batch(None, None, records)
            total, want = old_accruals(
                records, splits=splits, operators=operators, node_share_bps=7_777, base_price=333_333_331
            )
            assert _accrued_events(env, rcpt) == want, n
            got = defaultdict(int)
            for (account, *_), amount in want.items():
                got[account] += amount
            assert {a: c.rewards_of(a).accrued - before[a] for a in accounts} == dict(got)
            assert deposit - c.deposit_of(env.settler.address) == total
            assert sum(want.values()) == total
    finally:
        admin.set_base_price(price_before)
        admin.set_node_share_bps(share_before)


# ------------------------------------------------------------------ exactly once: the settler's sequence


def test_a_batch_starts_exactly_at_the_settlers_next_sequence(anvil_chain):
    env = anvil_chain
    reg = register_sample(env)
    s = env.client(env.settler)
    records = [SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 10 + i, 1) for i in range(3)]
    nxt = s.next_sequence()
    for wrong in (nxt + 1, nxt + 3, max(nxt - 1, 0) if nxt else 2**63):
        with pytest.raises(SequenceMismatch) as err:
            s.settle_batch(None, None, records, first_sequence=wrong)
        assert err.value.args_by_name == {"settler": env.settler.address, "expected": nxt, "given": wrong}
    s.settle_batch(None, None, records, first_sequence=nxt)
    assert s.next_sequence() == nxt + 3
    # every settler has its own sequence, from zero
    other = env.new_account()
    env.client(env.admin).grant_settler(other.address)
    env.client(env.admin).deposit_for(other.address, 10**18)
    o = env.client(other)
    assert o.next_sequence() == 0
    with pytest.raises(SequenceMismatch):
        o.settle_batch(None, None, records[:1], first_sequence=nxt + 3)
    o.settle_batch(None, None, [SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 5, 5)], first_sequence=0)
    assert (o.next_sequence(), s.next_sequence()) == (1, nxt + 3)


def test_a_settled_record_in_a_second_batch_is_refused(anvil_chain):
    """A record keeps the number it was given (the settler writes it before sending): whatever batch it is
    sent in again, differently composed, under another batch id, it is refused."""
    env = anvil_chain
    reg = register_sample(env)
    s = env.client(env.settler)
    records = [SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 20 + i, 3) for i in range(4)]
    first = s.next_sequence()
    s.settle_batch(None, None, records, first_sequence=first)
    deposit = s.deposit_of(env.settler.address)
    fresh = SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 1, 1)
    for again, at in (
        (records, first),  # replayed whole under a new batch id
        (records[2:] + [fresh], first + 2),  # recomposed: records 2 and 3 at their own numbers, plus a new one
        (records[3:], first + 3),
    ):
        with pytest.raises(SequenceMismatch) as err:
            s.settle_batch(batch_id_for(again, 1), None, again, first_sequence=at)  # a new id: another salt
        assert err.value.args_by_name["expected"] == first + 4
    assert s.deposit_of(env.settler.address) == deposit  # nothing paid twice
    assert s.next_sequence() == first + 4


def test_a_request_id_under_two_numbers_is_visible_from_the_chain(anvil_chain):
    """What the chain does not refuse (a storage slot per request id would cost more than a record): a
    dishonest settler giving one request id a second number. Anyone finds it from the chain alone, with
    both leaves proven by verifyRecord as the evidence."""
    env = anvil_chain
    reg = register_sample(env)
    s = env.client(env.settler)
    r = SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 9, 9)
    start = env.client().block_number()
    proofs = []
    for salt in range(2):  # the same record under two salts: two ids
        first, batch_id = s.next_sequence(), batch_id_for([r], salt)
        s.settle_batch(batch_id, None, [r], first_sequence=first)
        proofs.append((batch_id, first))
    seen = [x for x in env.client().settled_records(from_block=start) if x.request_id == r.request_id]
    assert [(x.batch_id, x.sequence) for x in seen] == proofs
    for batch_id, seq in proofs:  # a batch of one: the leaf is the root, the proof empty
        assert env.client().verify_record(batch_id, hex0x(leaf_hash(r, seq)), [])


# ------------------------------------------------------------------ limits and malformed input


def test_id_tables_at_their_limits(anvil_chain):
    env = anvil_chain
    s = env.client(env.settler)
    operators = env.users[1:5]
    adapters = [ZERO_ID] + [_register_adapter(env, env.users[0], 10**9 + i) for i in range(MAX_ADAPTERS_PER_BATCH - 1)]
    nodes = [_register_node(env, operators[i % len(operators)]) for i in range(MAX_NODES_PER_BATCH)]
    records = [
        SettleRecord(rand_id(), adapters[i % len(adapters)], nodes[i], 100 + i, 7) for i in range(MAX_NODES_PER_BATCH)
    ]
    packed = pack_records(records)
    assert (len(packed.adapter_ids), len(packed.node_ids)) == (MAX_ADAPTERS_PER_BATCH, MAX_NODES_PER_BATCH)
    rcpt = s.settle_batch(None, None, records)  # exactly at both limits: settles
    assert rcpt["status"] == 1
    first = s.next_sequence()
    one = [records[0]]
    one_packed = pack_records(one).records
    with pytest.raises(TooManyAdapters) as err:
        _raw_settle(s, rand_id(), first, sorted(adapters + [rand_id()]), [nodes[0]], one_packed)
    assert err.value.args_by_name == {"count": MAX_ADAPTERS_PER_BATCH + 1, "max": MAX_ADAPTERS_PER_BATCH}
    with pytest.raises(TooManyNodes) as err:
        _raw_settle(s, rand_id(), first, [records[0].adapter_id], sorted(nodes + [rand_id()]), one_packed)
    assert err.value.args_by_name == {"count": MAX_NODES_PER_BATCH + 1, "max": MAX_NODES_PER_BATCH}


def test_malformed_batches_are_refused(anvil_chain):
    env = anvil_chain
    reg = register_sample(env)
    other = register_sample(env)
    s = env.client(env.settler)
    first = s.next_sequence()
    records = [SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 3, 4)]
    packed = pack_records(records)
    with pytest.raises(MalformedRecords):
        _raw_settle(s, rand_id(), first, packed.adapter_ids, packed.node_ids, packed.records + b"\0")
    with pytest.raises(E.EmptyBatch):
        _raw_settle(s, rand_id(), first, packed.adapter_ids, packed.node_ids, b"")
    two_adapters = sorted([reg.adapter_id, other.adapter_id])
    with pytest.raises(TableNotIncreasing):  # a table out of order, or naming an id twice
        _raw_settle(s, rand_id(), first, two_adapters[::-1], packed.node_ids, packed.records)
    with pytest.raises(TableNotIncreasing):
        _raw_settle(s, rand_id(), first, [reg.adapter_id, reg.adapter_id], packed.node_ids, packed.records)
    twice = [reg.adapter_id] * 2  # an adapter twice: only at strictly increasing bounds (once per price)
    for bounds in ([2, 1], [3, 3]):
        with pytest.raises(TableNotIncreasing):
            _raw_settle(s, rand_id(), first, twice, packed.node_ids, packed.records, None, bounds)
    with pytest.raises(E.BatchIdMismatch):  # well formed up to its id
        _raw_settle(
            s,
            rand_id(),
            first,
            twice,
            packed.node_ids,
            packed.records,
            MerkleTree.from_records(records, first).root_hex,
            [2**255, 2**256 - 1],
        )
    bad = bytearray(packed.records * 3)
    bad[42 * 2 + 33] = 1  # record 2's node index past a table of one
    with pytest.raises(RecordIndexOutOfRange) as err:
        _raw_settle(s, rand_id(), first, packed.adapter_ids, packed.node_ids, bytes(bad))
    assert err.value.args_by_name == {"record": 2}
    root = MerkleTree.from_records(records, first).root_hex
    with pytest.raises(E.MerkleRootMismatch):  # the right root for other numbers does not pass
        _raw_settle(
            s,
            rand_id(),
            first,
            packed.adapter_ids,
            packed.node_ids,
            packed.records,
            MerkleTree.from_records(records, first + 1).root_hex,
        )
    for wrong in ([], [2**256 - 1] * 2):  # one price bound per adapter entry, no fewer (unchecked), no more
        with pytest.raises(E.MaxPricesMismatch) as err:
            _raw_settle(s, rand_id(), first, packed.adapter_ids, packed.node_ids, packed.records, root, wrong)
        assert err.value.args_by_name == {"adapters": 1, "maxPrices": len(wrong)}
    with pytest.raises(E.BatchIdMismatch):  # an id that does not name the records
        _raw_settle(s, rand_id(), first, packed.adapter_ids, packed.node_ids, packed.records, root)
    named = batch_id_of(packed, 9)
    _raw_settle(s, named, first, packed.adapter_ids, packed.node_ids, packed.records, root)  # well formed


def test_base_price_is_bounded(anvil_chain):
    from devnet.deploy import MAX_BASE_PRICE, check_fees

    with pytest.raises(ValueError, match="base_price"):  # the deploy refuses it before the chain would
        check_fees(None, MAX_BASE_PRICE + 1)
    check_fees(None, MAX_BASE_PRICE)
    admin = anvil_chain.client(anvil_chain.admin)
    before = admin.base_price()
    with pytest.raises(InvalidPrice):
        admin.set_base_price(2**128)
    admin.set_base_price(2**128 - 1)
    admin.set_base_price(before)
