"""AttributionLedger against a real anvil: admin, deposits, settlement, proofs, withdrawals, money."""

import pytest
from web3.logs import DISCARD

from common.wire import hex0x
from devnet.deploy import _deploy_contract
from ledger import errors as E
from ledger.chain import RECORDS_SETTLED_TOPIC, decode_records_settled
from ledger.merkle import MerkleTree, batch_id_for, leaf_hash, verify_proof
from ledger.transport import revert_data
from ledger.types import ZERO_ID, Role, SettleRecord
from tests.utils.chain import ETHER, rand_id, register_sample

pytestmark = pytest.mark.integration


def _records(reg, n, *, prompt=100, completion=23):
    return [SettleRecord(rand_id(), reg.adapter_id, reg.node_id, prompt + i, completion) for i in range(n)]


def _root(records, first: int) -> str:
    return MerkleTree.from_records(records, first).root_hex


def _settle(env, records, batch_id=None, *, first=None):
    """Settle as env.settler at its next sequence number (or `first`); returns (batch id, receipt)."""
    batch_id = batch_id or batch_id_for(records)
    rcpt = env.client(env.settler).settle_batch(batch_id, None, records, first_sequence=first)
    return batch_id, rcpt


def _settled(rcpt) -> list:
    """The records of the receipt's RecordsSettled log (SettledRecord), decoded as any reader does."""
    logs = [lg for lg in rcpt["logs"] if hex0x(bytes(lg["topics"][0])) == RECORDS_SETTLED_TOPIC]
    assert len(logs) == 1  # one log per batch
    return decode_records_settled(logs[0])


def _events(env, name, rcpt):
    return [e["args"] for e in env.client().ledger.events[name]().process_receipt(rcpt, errors=DISCARD)]


def _deploy_rejecting_payee(env):
    c = env.client(env.admin)
    rcpt = _deploy_contract(c.w3, env.admin, env.deployment.chain_id, "RejectingPayee")
    from ledger.artifacts import load_artifact

    return c.w3.eth.contract(address=rcpt["contractAddress"], abi=load_artifact("RejectingPayee")["abi"])


# ------------------------------------------------------------------ constructor and admin


def test_constructor_reverts(anvil_chain):
    env = anvil_chain
    c = env.client(env.admin)
    for args, cls in [
        ((env.deployment.registry, env.admin.address, 10_001, 0), E.InvalidShare),
        (("0x" + "00" * 20, env.admin.address, 1, 0), E.ZeroAddress),
        ((env.deployment.registry, "0x" + "00" * 20, 1, 0), E.ZeroAddress),
        ((env.deployment.registry, env.admin.address, 1, 2**128), E.InvalidPrice),
    ]:
        with pytest.raises(Exception) as err:
            _deploy_contract(c.w3, env.admin, env.deployment.chain_id, "AttributionLedger", args)
        assert isinstance(c.decoder.decode(revert_data(err.value)), cls)


def test_admin_functions_refuse_others(anvil_chain):
    env = anvil_chain
    other = env.client(env.users[0])
    for call in (
        lambda: other.grant_settler(env.users[0].address),
        lambda: other.revoke_settler(env.settler.address),
        lambda: other.set_node_share_bps(1),
        lambda: other.transfer_admin(env.users[0].address),
    ):
        with pytest.raises(E.NotAdmin) as err:
            call()
        assert err.value.args_by_name["caller"] == env.users[0].address


def test_admin_functions_and_events(anvil_chain):
    env = anvil_chain
    admin = env.client(env.admin)
    with pytest.raises(E.ZeroAddress):
        admin.grant_settler("0x" + "00" * 20)
    with pytest.raises(E.ZeroAddress):
        admin.transfer_admin("0x" + "00" * 20)
    with pytest.raises(E.InvalidShare):
        admin.set_node_share_bps(10_001)
    s = env.users[7].address
    assert _events(env, "SettlerGranted", admin.grant_settler(s))[0]["settler"] == s
    assert admin.is_settler(s)
    assert _events(env, "SettlerRevoked", admin.revoke_settler(s))[0]["settler"] == s
    assert not admin.is_settler(s)
    before = admin.node_share_bps()
    assert _events(env, "NodeShareChanged", admin.set_node_share_bps(1234))[0]["nodeShareBps"] == 1234
    admin.set_node_share_bps(before)
    new_admin = env.users[7]
    ev = _events(env, "AdminTransferred", admin.transfer_admin(new_admin.address))[0]
    assert (ev["previousAdmin"], ev["newAdmin"]) == (env.admin.address, new_admin.address)
    with pytest.raises(E.NotAdmin):
        admin.set_node_share_bps(1)
    env.client(new_admin).transfer_admin(env.admin.address)


# ------------------------------------------------------------------ deposits


def test_deposit_and_reclaim(anvil_chain):
    env = anvil_chain
    payer, gateway = env.client(env.users[0]), env.users[5]
    with pytest.raises(E.ZeroAddress):
        payer.deposit_for("0x" + "00" * 20, 1)
    with pytest.raises(E.ZeroAmount):
        payer.deposit_for(gateway.address, 0)
    ev = _events(env, "Deposited", payer.deposit_for(gateway.address, 5 * ETHER))[0]
    assert (ev["settler"], ev["from"], ev["amount"]) == (gateway.address, env.users[0].address, 5 * ETHER)
    g = env.client(gateway)
    assert g.deposit_of(gateway.address) == 5 * ETHER
    with pytest.raises(E.ZeroAmount):
        g.reclaim_deposit(0)
    with pytest.raises(E.InsufficientDeposit) as err:
        g.reclaim_deposit(6 * ETHER)
    assert err.value.args_by_name["available"] == 5 * ETHER
    bal = g.balance(gateway.address)
    rcpt = g.reclaim_deposit(2 * ETHER)
    assert _events(env, "DepositReclaimed", rcpt)[0]["amount"] == 2 * ETHER
    assert g.deposit_of(gateway.address) == 3 * ETHER
    gas = rcpt["gasUsed"] * rcpt["effectiveGasPrice"]
    assert g.balance(gateway.address) == bal + 2 * ETHER - gas


def test_reclaim_to_a_rejecting_account_fails(anvil_chain):
    env = anvil_chain
    payee = _deploy_rejecting_payee(env)
    admin = env.client(env.admin)
    admin.deposit_for(payee.address, ETHER)
    data = admin.ledger.encode_abi("reclaimDeposit", args=[ETHER])
    with pytest.raises(E.TransferFailed) as err:
        admin.tx.transact(payee.functions.callAs(admin.ledger.address, data))
    assert err.value.args_by_name == {"to": payee.address, "amount": ETHER}


# ------------------------------------------------------------------ settlement


def test_settlement_splits_fees_exactly(anvil_chain):
    env = anvil_chain
    # Prices and tokens chosen so every division leaves dust: the owner must get it.
    reg = register_sample(env, price=999_999_937, shares=(3333, 1111))
    records = [SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 101 + 7 * i, 13 + i) for i in range(9)]
    c = env.client()
    share = c.node_share_bps()
    before = {a.address: c.rewards_of(a.address).accrued for a in (reg.owner, reg.operator, *reg.payees)}
    deposit_before = c.deposit_of(env.settler.address)
    batch_id, rcpt = _settle(env, records)

    fees = [reg.price * (r.prompt_tokens + r.completion_tokens) // 1000 for r in records]
    node_cut = sum(f * share // 10_000 for f in fees)
    rest = sum(fees) - node_cut
    ds_cuts = [rest * s // 10_000 for s in (3333, 1111)]
    owner_cut = rest - sum(ds_cuts)

    settled = _settled(rcpt)
    assert [e.request_id for e in settled] == [r.request_id for r in records]
    assert [e.fee for e in settled] == fees
    assert all(e.batch_id == batch_id and e.node_id == reg.node_id for e in settled)
    first = settled[0].sequence
    assert [e.sequence for e in settled] == list(range(first, first + 9))
    accrued = {
        (e["account"], Role(e["role"]), hex0x(e["subjectId"])): e["amount"] for e in _events(env, "RewardAccrued", rcpt)
    }
    assert accrued == {
        (reg.operator.address, Role.NODE, reg.node_id): node_cut,
        (reg.payees[0].address, Role.DATASET, reg.dataset_ids[0]): ds_cuts[0],
        (reg.payees[1].address, Role.DATASET, reg.dataset_ids[1]): ds_cuts[1],
        (reg.owner.address, Role.ADAPTER_OWNER, reg.adapter_id): owner_cut,
    }
    assert sum(accrued.values()) == sum(fees)
    batch_ev = _events(env, "BatchSettled", rcpt)[0]
    assert (batch_ev["recordCount"], batch_ev["totalFees"], hex0x(batch_ev["merkleRoot"])) == (
        9,
        sum(fees),
        _root(records, first),
    )
    assert c.deposit_of(env.settler.address) == deposit_before - sum(fees)
    assert c.rewards_of(reg.owner.address).accrued - before[reg.owner.address] == owner_cut
    assert c.rewards_of(reg.operator.address).accrued - before[reg.operator.address] == node_cut
    info = c.get_batch(batch_id)
    assert (info.record_count, info.total_fees, info.settler, info.merkle_root, info.first_sequence) == (
        9,
        sum(fees),
        env.settler.address,
        _root(records, first),
        first,
    )
    assert c.next_sequence(env.settler.address) == first + 9
    assert c.is_settled(batch_id) and not c.is_settled(rand_id()) and c.get_batch(rand_id()) is None


def test_mixed_adapters_and_nodes_in_one_batch(anvil_chain):
    env = anvil_chain
    a, b = register_sample(env, price=10**9, shares=(5000,)), register_sample(env, price=3 * 10**9, shares=())
    records = []
    for i in range(12):
        reg = (a, b)[i % 2]
        node = (a.node_id, b.node_id)[(i // 2) % 2]
        records.append(SettleRecord(rand_id(), reg.adapter_id, node, 50 + i, 5))
    _, rcpt = _settle(env, records)
    accrued = _events(env, "RewardAccrued", rcpt)
    fees = _settled(rcpt)
    assert sum(e["amount"] for e in accrued) == sum(e.fee for e in fees)
    node_groups = {(hex0x(e["adapterId"]), hex0x(e["subjectId"])) for e in accrued if e["role"] == Role.NODE}
    assert len(node_groups) == 4  # each (adapter, node) pair accrues once per batch


def test_settle_reverts(anvil_chain):
    env = anvil_chain
    reg = register_sample(env)
    records = _records(reg, 3)
    s = env.client(env.settler)
    with pytest.raises(E.ZeroId):
        s.settle_batch(ZERO_ID, None, records)
    with pytest.raises(E.EmptyBatch):
        s.settle_batch(None, rand_id(), [], first_sequence=s.next_sequence())
    with pytest.raises(E.MerkleRootMismatch) as err:
        s.settle_batch(None, rand_id(), records)
    assert hex0x(err.value.args_by_name["computed"]) == _root(records, s.next_sequence())
    bad_adapter = [SettleRecord(rand_id(), rand_id(), reg.node_id, 1, 1)]
    with pytest.raises(E.UnknownAdapter):
        s.settle_batch(None, None, bad_adapter)
    bad_node = [SettleRecord(rand_id(), reg.adapter_id, rand_id(), 1, 1)]
    with pytest.raises(E.UnknownNode):
        s.settle_batch(None, None, bad_node)


def test_unauthorised_and_revoked_settler(anvil_chain):
    env = anvil_chain
    reg = register_sample(env)
    records = _records(reg, 2)
    stranger = env.users[6]
    env.client(env.admin).deposit_for(stranger.address, ETHER)  # money alone is not authority
    with pytest.raises(E.NotSettler) as err:
        env.client(stranger).settle_batch(None, None, records)
    assert err.value.args_by_name["caller"] == stranger.address
    admin = env.client(env.admin)
    admin.grant_settler(stranger.address)
    env.client(stranger).settle_batch(None, None, records)
    admin.revoke_settler(stranger.address)
    again = _records(reg, 2)
    with pytest.raises(E.NotSettler):
        env.client(stranger).settle_batch(None, None, again)


def test_a_batch_id_taken_from_the_mempool_settles_only_its_own_records(anvil_chain):
    """A second settler copied the first's batch id from the mempool and settled one junk record under it
    first: the first's batch then reverted BatchAlreadySettled and its records were never paid. An id names
    its content now: junk under it is refused, and the copier can only settle those very records, at their
    price, from its own deposit."""
    env = anvil_chain
    reg = register_sample(env, price=10**12)
    alice, mallory = env.client(env.settler), env.new_account(ETHER)
    env.client(env.admin).grant_settler(mallory.address)
    env.client(env.admin).deposit_for(mallory.address, ETHER)
    records = _records(reg, 3)
    theirs = batch_id_for(records)
    junk = [SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 0, 0)]
    with pytest.raises(E.BatchIdMismatch) as err:
        env.client(mallory).settle_batch(theirs, None, junk)
    assert hex0x(err.value.args_by_name["batchId"]) == theirs
    with pytest.raises(E.BatchIdMismatch):  # one record changed
        env.client(mallory).settle_batch(theirs, None, [*records[:2], records[2]._replace(completion_tokens=0)])
    rcpt = env.client(mallory).settle_batch(theirs, None, records)
    fees = sum(10**12 * (r.prompt_tokens + r.completion_tokens) // 1000 for r in records)
    assert _events(env, "BatchSettled", rcpt)[0]["totalFees"] == fees
    assert env.client().deposit_of(mallory.address) == ETHER - fees
    with pytest.raises(E.BatchAlreadySettled):
        alice.settle_batch(theirs, None, records)


def test_duplicate_batch_is_refused(anvil_chain):
    env = anvil_chain
    reg = register_sample(env)
    records = _records(reg, 4)
    batch_id, _ = _settle(env, records)
    deposit = env.client().deposit_of(env.settler.address)
    with pytest.raises(E.BatchAlreadySettled) as err:
        _settle(env, _records(reg, 4), batch_id)
    assert hex0x(err.value.args_by_name["batchId"]) == batch_id
    assert env.client().deposit_of(env.settler.address) == deposit


def test_insufficient_deposit(anvil_chain):
    env = anvil_chain
    poor = env.users[7]
    env.client(env.admin).grant_settler(poor.address)
    reg = register_sample(env, price=ETHER)  # 1 ETH per 1k tokens
    records = _records(reg, 1, prompt=1000, completion=0)
    env.client(env.admin).deposit_for(poor.address, ETHER // 2)
    with pytest.raises(E.InsufficientDeposit) as err:
        env.client(poor).settle_batch(None, None, records)
    assert err.value.args_by_name["needed"] == ETHER
    assert err.value.args_by_name["available"] == ETHER // 2


def test_batch_costing_more_than_its_quote_is_refused(anvil_chain):
    """An owner who raises the price after the settler priced a batch (front-running it) gets the
    batch refused, not the settler's deposit charged at a price it never saw."""
    env = anvil_chain
    reg = register_sample(env, price=10**15)
    records = _records(reg, 3)  # 100 + 101 + 102 prompt tokens, 23 completion each
    quote = sum(10**15 * (r.prompt_tokens + r.completion_tokens) // 1000 for r in records)
    env.client(reg.owner).set_adapter_price(reg.adapter_id, 10**18)
    s = env.client(env.settler)
    deposit = s.deposit_of(env.settler.address)
    with pytest.raises(E.PriceAboveQuote) as err:
        s.settle_batch(None, None, records, max_prices={reg.adapter_id: 10**15})
    assert err.value.args_by_name == {
        "adapterId": bytes.fromhex(reg.adapter_id[2:]),
        "price": 10**18,
        "maxPrice": 10**15,
    }
    assert s.deposit_of(env.settler.address) == deposit  # nothing charged
    env.client(reg.owner).set_adapter_price(reg.adapter_id, 10**15)
    # exactly the quote settles
    rcpt = s.settle_batch(None, None, records, max_prices={reg.adapter_id: 10**15})
    assert _events(env, "BatchSettled", rcpt)[0]["totalFees"] == quote


def test_a_raise_hidden_by_a_cut_elsewhere_in_the_batch_is_refused(anvil_chain):
    """The attack on a bound over the batch's total: the owner of adapter A raises its price fivefold while B,
    in the same batch (cheap to own: any adapter of the attacker's), drops to nothing, so the batch costs no
    more than priced. A's record would settle at five times the price its key was shown. Each adapter's price
    is bounded on its own, so the batch is refused."""
    env = anvil_chain
    a = register_sample(env, price=10**15)
    b = register_sample(env, price=10**16, owner=a.owner)
    records = [
        SettleRecord(rand_id(), a.adapter_id, a.node_id, 1000, 0),
        SettleRecord(rand_id(), b.adapter_id, b.node_id, 1000, 0),
    ]
    priced = {a.adapter_id: 10**15, b.adapter_id: 10**16}
    env.client(a.owner).set_adapter_price(a.adapter_id, 5 * 10**15)
    env.client(a.owner).set_adapter_price(b.adapter_id, 0)  # the batch's total: 5e15 < the 1.1e16 priced
    s = env.client(env.settler)
    deposit = s.deposit_of(env.settler.address)
    with pytest.raises(E.PriceAboveQuote) as err:
        s.settle_batch(None, None, records, max_prices=priced)
    assert hex0x(err.value.args_by_name["adapterId"]) == a.adapter_id
    assert s.deposit_of(env.settler.address) == deposit
    priced[a.adapter_id] = 5 * 10**15  # priced again at today's prices: settles at them
    rcpt = s.settle_batch(None, None, records, max_prices=priced)
    assert _events(env, "BatchSettled", rcpt)[0]["totalFees"] == 5 * 10**15


# ------------------------------------------------------------------ base-model records (adapter id zero)


def _base_records(node_id, n, *, prompt=100, completion=23):
    return [SettleRecord(rand_id(), ZERO_ID, node_id, prompt + 3 * i, completion + i) for i in range(n)]


def test_base_price_is_admin_set_with_an_event(anvil_chain):
    env = anvil_chain
    admin = env.client(env.admin)
    assert admin.base_price() == env.deployment.base_price_per_1k_tokens > 0  # the deploy sets it
    with pytest.raises(E.NotAdmin):
        env.client(env.users[0]).set_base_price(1)
    before = admin.base_price()
    ev = _events(env, "BasePriceChanged", admin.set_base_price(777))[0]
    assert ev["basePricePer1kTokens"] == 777 and admin.base_price() == 777
    admin.set_base_price(before)


def test_base_records_accrue_entirely_to_the_node_operator(anvil_chain):
    env = anvil_chain
    reg = register_sample(env)
    admin = env.client(env.admin)
    before_price = admin.base_price()
    price = 999_999_937  # leaves dust in every division
    admin.set_base_price(price)
    try:
        c = env.client()
        records = _base_records(reg.node_id, 5)
        op_before = c.rewards_of(reg.operator.address).accrued
        owner_before = c.rewards_of(reg.owner.address).accrued
        deposit_before = c.deposit_of(env.settler.address)
        batch_id, rcpt = _settle(env, records)
    finally:
        admin.set_base_price(before_price)
    fees = [price * (r.prompt_tokens + r.completion_tokens) // 1000 for r in records]
    settled = _settled(rcpt)
    assert [(e.request_id, e.adapter_id, e.node_id, e.prompt_tokens, e.completion_tokens) for e in settled] == [
        (r.request_id, ZERO_ID, r.node_id, r.prompt_tokens, r.completion_tokens) for r in records
    ]
    assert [e.fee for e in settled] == fees
    assert all(e.batch_id == batch_id for e in settled)
    accrued = _events(env, "RewardAccrued", rcpt)
    assert [
        (e["account"], hex0x(e["adapterId"]), Role(e["role"]), hex0x(e["subjectId"]), e["amount"]) for e in accrued
    ] == [(reg.operator.address, ZERO_ID, Role.NODE, reg.node_id, sum(fees))]  # one per (base, node) per batch
    batch_ev = _events(env, "BatchSettled", rcpt)[0]
    assert (batch_ev["recordCount"], batch_ev["totalFees"]) == (5, sum(fees))
    assert c.deposit_of(env.settler.address) == deposit_before - sum(fees)
    assert c.rewards_of(reg.operator.address).accrued - op_before == sum(fees)
    assert c.rewards_of(reg.owner.address).accrued == owner_before  # no adapter, no owner cut


def test_base_and_adapter_records_in_one_batch(anvil_chain):
    env = anvil_chain
    a = register_sample(env, price=10**9, shares=(5000,))
    b = register_sample(env, price=3 * 10**9, shares=(), operator=env.users[3])
    base_price = env.client().base_price()
    share = env.client().node_share_bps()
    records = []
    for i in range(12):
        node = (a.node_id, b.node_id)[(i // 3) % 2]
        adapter = (a.adapter_id, ZERO_ID, b.adapter_id)[i % 3]
        records.append(SettleRecord(rand_id(), adapter, node, 40 + i, 7))
    batch_id, rcpt = _settle(env, records)
    price = {a.adapter_id: a.price, b.adapter_id: b.price, ZERO_ID: base_price}
    fees = [price[r.adapter_id] * (r.prompt_tokens + r.completion_tokens) // 1000 for r in records]
    assert [e.fee for e in _settled(rcpt)] == fees
    accrued = _events(env, "RewardAccrued", rcpt)
    assert sum(e["amount"] for e in accrued) == sum(fees) == _events(env, "BatchSettled", rcpt)[0]["totalFees"]
    node_rows = {(hex0x(e["adapterId"]), hex0x(e["subjectId"])): e for e in accrued if e["role"] == Role.NODE}
    assert len(node_rows) == 6  # (a, base, b) x (node a, node b), once each
    operator = {a.node_id: a.operator.address, b.node_id: b.operator.address}
    for node_id in (a.node_id, b.node_id):
        want = sum(f for r, f in zip(records, fees) if r.adapter_id == ZERO_ID and r.node_id == node_id)
        row = node_rows[(ZERO_ID, node_id)]
        assert (row["account"], row["amount"]) == (operator[node_id], want)
        for reg in (a, b):  # adapter records still pay the node only its share
            want = sum(
                f * share // 10_000
                for r, f in zip(records, fees)
                if r.adapter_id == reg.adapter_id and r.node_id == node_id
            )
            assert node_rows[(reg.adapter_id, node_id)]["amount"] == want
    assert not any(e["role"] != Role.NODE and hex0x(e["adapterId"]) == ZERO_ID for e in accrued)
    c = env.client()
    first = c.get_batch(batch_id).first_sequence
    tree = MerkleTree.from_records(records, first)
    for i, r in enumerate(records):  # base records prove like any other, same leaf format
        assert c.leaf_of(r, first + i) == hex0x(leaf_hash(r, first + i))
        assert c.verify_record(batch_id, hex0x(leaf_hash(r, first + i)), [hex0x(p) for p in tree.proof(i)])


def test_base_records_at_zero_price_settle_for_nothing(anvil_chain):
    env = anvil_chain
    reg = register_sample(env)
    admin = env.client(env.admin)
    before_price = admin.base_price()
    admin.set_base_price(0)
    try:
        deposit_before = admin.deposit_of(env.settler.address)
        batch_id, rcpt = _settle(env, _base_records(reg.node_id, 3))
    finally:
        admin.set_base_price(before_price)
    assert [e.fee for e in _settled(rcpt)] == [0, 0, 0]
    assert _events(env, "RewardAccrued", rcpt) == []
    assert admin.is_settled(batch_id) and admin.get_batch(batch_id).total_fees == 0
    assert admin.deposit_of(env.settler.address) == deposit_before


def test_base_record_needs_a_registered_node(anvil_chain):
    env = anvil_chain
    reg = register_sample(env)
    s = env.client(env.settler)
    bad = [*_base_records(reg.node_id, 2), SettleRecord(rand_id(), ZERO_ID, rand_id(), 1, 1)]
    with pytest.raises(E.UnknownNode):
        s.settle_batch(None, None, bad)


# ------------------------------------------------------------------ proofs


@pytest.mark.parametrize("n", [1, 2, 7])
def test_proofs_verify_on_chain_and_off(anvil_chain, n):
    env = anvil_chain
    reg = register_sample(env)
    records = _records(reg, n)
    batch_id, _ = _settle(env, records)
    c = env.client()
    info = c.get_batch(batch_id)
    first, root = info.first_sequence, info.merkle_root
    tree = MerkleTree.from_records(records, first)
    for i, r in enumerate(records):
        leaf = leaf_hash(r, first + i)
        assert c.leaf_of(r, first + i) == hex0x(leaf)
        proof = [hex0x(p) for p in tree.proof(i)]
        assert verify_proof(leaf, proof, root)
        assert c.verify_record(batch_id, hex0x(leaf), proof)
    wrong = hex0x(leaf_hash(_records(reg, 1)[0], first))
    proof0 = [hex0x(p) for p in tree.proof(0)]
    assert not c.verify_record(batch_id, wrong, proof0)
    assert not verify_proof(wrong, proof0, root)
    assert not c.verify_record(rand_id(), hex0x(leaf_hash(records[0], first)), proof0)
    # the leaf binds the sequence number: the same record at another number does not verify
    other = hex0x(leaf_hash(records[0], first + n))
    assert not c.verify_record(batch_id, other, proof0)


# ------------------------------------------------------------------ withdrawals and money


def test_withdraw_only_what_accrued(anvil_chain):
    env = anvil_chain
    owner = env.new_account(ETHER)
    reg = register_sample(env, price=10**15, shares=(), owner=owner)
    c = env.client(owner)
    with pytest.raises(E.NothingToWithdraw):
        c.withdraw()
    _settle(env, _records(reg, 3))
    bal = c.rewards_of(owner.address)
    assert bal.available == bal.accrued > 0 and bal.withdrawn == 0
    with pytest.raises(E.ZeroAmount):
        c.withdraw_amount(0)
    with pytest.raises(E.InsufficientRewards) as err:
        c.withdraw_amount(bal.available + 1)
    assert err.value.args_by_name["available"] == bal.available
    coins = c.balance(owner.address)
    rcpt = c.withdraw_amount(bal.available // 3)
    assert _events(env, "RewardWithdrawn", rcpt)[0]["amount"] == bal.available // 3
    rcpt2 = c.withdraw()
    assert _events(env, "RewardWithdrawn", rcpt2)[0]["amount"] == bal.available - bal.available // 3
    gas = sum(r["gasUsed"] * r["effectiveGasPrice"] for r in (rcpt, rcpt2))
    assert c.balance(owner.address) == coins + bal.available - gas
    after = c.rewards_of(owner.address)
    assert (after.available, after.withdrawn, after.accrued) == (0, bal.accrued, bal.accrued)
    with pytest.raises(E.NothingToWithdraw):
        c.withdraw()


def test_withdraw_to_a_rejecting_payee_fails_and_keeps_rewards(anvil_chain):
    env = anvil_chain
    payee = _deploy_rejecting_payee(env)
    reg = register_sample(env, price=10**15, shares=())
    env.client(reg.owner).transfer_adapter(reg.adapter_id, payee.address)
    _settle(env, _records(reg, 2))
    admin = env.client(env.admin)
    owed = admin.rewards_of(payee.address).available
    assert owed > 0
    data = admin.ledger.encode_abi("withdraw", args=[])
    with pytest.raises(E.TransferFailed):
        admin.tx.transact(payee.functions.callAs(admin.ledger.address, data))
    assert admin.rewards_of(payee.address).available == owed


def test_money_invariant(anvil_chain):
    """deposits = accrued + withdrawn-from-deposits(reclaimed) + left; accrued = available + withdrawn."""
    env = anvil_chain
    reg = register_sample(env, price=10**14)
    _settle(env, _records(reg, 5) + _base_records(reg.node_id, 3))  # base-model fees count like any other
    env.client(reg.owner).withdraw()
    env.client(reg.operator).withdraw()
    c = env.client()
    t = c.totals()
    deposits_left = sum(c.deposit_of(a) for a in _depositors(c))
    accounts = _accrual_accounts(c)
    available = sum(c.rewards_of(a).available for a in accounts)
    withdrawn = sum(c.rewards_of(a).withdrawn for a in accounts)
    assert t["deposited"] == t["accrued"] + t["reclaimed"] + deposits_left
    assert t["accrued"] == available + withdrawn and t["withdrawn"] == withdrawn
    assert t["balance"] == deposits_left + available


def _depositors(c) -> set[str]:
    return {e["args"]["settler"] for e in c.events("ledger", "Deposited")}


def _accrual_accounts(c) -> set[str]:
    return {e["args"]["account"] for e in c.events("ledger", "RewardAccrued")}


def test_revert_decoder_handles_unknown_data(anvil_chain):
    dec = anvil_chain.client().decoder
    assert isinstance(dec.decode("0xdeadbeef"), E.UnknownRevert)
    assert isinstance(dec.decode(None), E.UnknownRevert)
    assert isinstance(dec.decode("0x"), E.UnknownRevert)
