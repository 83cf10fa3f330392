"""A price change's grace (contracts/src/PriceGrace.sol) against a real anvil: for priceGraceSeconds after an adapter's
(or the base) price changes, a batch may be charged the price its requests were admitted at, never below the price
before, never after the grace; and a batch's id names its bounds, so nobody settles a copy of it charged lower."""

import pytest
from web3.logs import DISCARD

from common.wire import hex0x
from devnet.deploy import _deploy_contract
from ledger import errors as E
from ledger.chain import RECORDS_SETTLED_TOPIC, decode_records_settled
from ledger.merkle import batch_id_for
from ledger.transport import revert_data
from ledger.types import ZERO_ID, PriceFloor, SettleRecord
from tests.utils.chain import ETHER, PRICE_GRACE_S, rand_id, register_sample

pytestmark = pytest.mark.integration

GRACE = PRICE_GRACE_S


def _records(reg, n, adapter_id=None):
    a = reg.adapter_id if adapter_id is None else adapter_id
    return [SettleRecord(rand_id(), a, reg.node_id, 900 + i, 100) for i in range(n)]


def _fees(records, price: int) -> int:
    return sum(price * (r.prompt_tokens + r.completion_tokens) // 1000 for r in records)


def _total(env, rcpt) -> int:
    (ev,) = env.client().ledger.events.BatchSettled().process_receipt(rcpt, errors=DISCARD)
    return ev["args"]["totalFees"]


def _settle(env, records, bounds, account=None):
    c = env.client(account or env.settler)
    return c.settle_batch(batch_id_for(records, max_prices=bounds), None, records, max_prices=bounds)


def _warp(env, seconds: int) -> None:
    w3 = env.client().w3
    w3.provider.make_request("evm_increaseTime", [seconds])
    w3.provider.make_request("evm_mine", [])


def test_a_raise_charges_records_admitted_before_it_their_quote_until_the_grace_ends(grace_chain):
    env = grace_chain
    reg = register_sample(env, price=10**15)
    owner = env.client(reg.owner)
    assert env.client().price_floor(reg.adapter_id) == PriceFloor(0, 0)  # never changed: no grace
    owner.set_adapter_price(reg.adapter_id, 3 * 10**15)
    floor = env.client().price_floor(reg.adapter_id)
    assert floor.floor == 10**15 and floor.grace_ends == env.client().chain_time() + GRACE
    # admitted at the old price: charged it, not the new one, and not refused
    old = _records(reg, 3)
    assert _total(env, _settle(env, old, {reg.adapter_id: 10**15})) == _fees(old, 10**15)
    # a bound above the price still pays the price, as always
    new = _records(reg, 2)
    assert _total(env, _settle(env, new, {reg.adapter_id: 10**18})) == _fees(new, 3 * 10**15)
    # between the two: charged the bound (a quote of a price in between, e.g. a change not read yet)
    mid = _records(reg, 2)
    assert _total(env, _settle(env, mid, {reg.adapter_id: 2 * 10**15})) == _fees(mid, 2 * 10**15)
    # below the price before: refused, whatever the settler says its quote was
    with pytest.raises(E.PriceAboveQuote):
        _settle(env, _records(reg, 1), {reg.adapter_id: 10**15 - 1})
    # once the grace is over, the price of the moment or nothing
    _warp(env, GRACE)
    with pytest.raises(E.PriceAboveQuote):
        _settle(env, _records(reg, 1), {reg.adapter_id: 10**15})
    late = _records(reg, 1)
    assert _total(env, _settle(env, late, {reg.adapter_id: 3 * 10**15})) == _fees(late, 3 * 10**15)


def test_two_changes_in_one_grace_keep_the_lower_price_each_for_its_own_grace(grace_chain):
    """An owner who lowers then raises (or raises twice) within one grace cannot lift the floor above a price
    that held during it: a record admitted before the first change is still payable at its quote, until the grace
    of that price ends (a later change never extends it)."""
    env = grace_chain
    reg = register_sample(env, price=10**15)
    owner = env.client(reg.owner)
    owner.set_adapter_price(reg.adapter_id, 2 * 10**15)
    _warp(env, 600)
    owner.set_adapter_price(reg.adapter_id, 5 * 10**15)
    f = env.client().price_floor(reg.adapter_id)
    assert (f.floor, f.older_floor) == (2 * 10**15, 10**15) and f.older_grace_ends + 600 <= f.grace_ends + 1
    first = _records(reg, 2)
    assert _total(env, _settle(env, first, {reg.adapter_id: 10**15})) == _fees(first, 10**15)
    # past the first price's own grace, the second's still runs
    _warp(env, GRACE - 600)
    with pytest.raises(E.PriceAboveQuote):
        _settle(env, _records(reg, 1), {reg.adapter_id: 10**15})
    second = _records(reg, 1)
    assert _total(env, _settle(env, second, {reg.adapter_id: 2 * 10**15})) == _fees(second, 2 * 10**15)
    _warp(env, 600)
    with pytest.raises(E.PriceAboveQuote):
        _settle(env, _records(reg, 1), {reg.adapter_id: 2 * 10**15})
    # a cut, then a raise: the cut price is chargeable for its grace
    owner.set_adapter_price(reg.adapter_id, 0)
    owner.set_adapter_price(reg.adapter_id, 4 * 10**15)
    cut = _records(reg, 1)
    assert _total(env, _settle(env, cut, {reg.adapter_id: 0})) == 0


def test_records_admitted_at_three_prices_settle_in_one_batch(grace_chain):
    """An owner who changes its price between requests costs the settler no batch per price: the adapter's entry
    appears once per bound, each charged its own, paid out as separate batches of those records would be."""
    env = grace_chain
    reg = register_sample(env, price=10**15)
    owner = env.client(reg.owner)
    owner.set_adapter_price(reg.adapter_id, 2 * 10**15)
    owner.set_adapter_price(reg.adapter_id, 5 * 10**15)
    records = _records(reg, 6)
    quotes = [10**15, 2 * 10**15, 5 * 10**15, 10**15, 2 * 10**15, 5 * 10**15]
    rcpt = _settle(env, records, quotes)
    assert _total(env, rcpt) == sum(_fees([r], q) for r, q in zip(records, quotes, strict=True))
    settled = decode_records_settled(
        next(lg for lg in rcpt["logs"] if hex0x(bytes(lg["topics"][0])) == RECORDS_SETTLED_TOPIC)
    )
    assert [s.fee for s in settled] == [_fees([r], q) for r, q in zip(records, quotes, strict=True)]
    (ev,) = env.client().ledger.events.RecordsSettled().process_receipt(rcpt, errors=DISCARD)
    assert ev["args"]["prices"] == [10**15, 2 * 10**15, 5 * 10**15]
    # one of the entries below a price that held is the whole batch refused, as with one entry
    with pytest.raises(E.PriceAboveQuote):
        _settle(env, _records(reg, 2), [10**15 - 1, 2 * 10**15])


def test_a_price_never_outlives_its_grace_through_later_changes(grace_chain):
    """Found by the red team: the floor of a grace was kept, and its end pushed on, by every change within it (a
    routine re-price, or the very same price set again), so a price of long ago stayed chargeable for as long as
    the owner kept changing its price less than a grace apart."""
    env = grace_chain
    reg = register_sample(env, price=10**12)
    owner = env.client(reg.owner)
    owner.set_adapter_price(reg.adapter_id, 10**14)  # 10**12 is chargeable for one grace from here
    for k, p in enumerate((10**14 + 1, 10**14, 10**14)):  # the last one the very same price
        _warp(env, GRACE - 60)
        owner.set_adapter_price(reg.adapter_id, p)
        if k == 0:  # 10**12's own grace still runs for a minute
            records = _records(reg, 1)
            assert _total(env, _settle(env, records, {reg.adapter_id: 10**12})) == _fees(records, 10**12)
            continue
        with pytest.raises(E.PriceAboveQuote):
            _settle(env, _records(reg, 1), {reg.adapter_id: 10**12})
    assert env.client().price_floor(reg.adapter_id).older_floor >= 10**14


def test_the_base_price_has_the_same_grace_and_none_at_deployment(grace_chain):
    env = grace_chain
    admin, reg = env.client(env.admin), register_sample(env)
    before = admin.base_price()
    assert before > 0 and env.client().price_floor(ZERO_ID) == PriceFloor(0, 0)
    # the first base price is the constructor's: nothing lets a settler charge base records below it
    with pytest.raises(E.PriceAboveQuote):
        _settle(env, _records(reg, 1, ZERO_ID), {ZERO_ID: 0})
    admin.set_base_price(before * 2)
    try:
        assert env.client().price_floor(ZERO_ID).floor == before
        records = _records(reg, 2, ZERO_ID)
        assert _total(env, _settle(env, records, {ZERO_ID: before})) == _fees(records, before)
        with pytest.raises(E.PriceAboveQuote):
            _settle(env, _records(reg, 1, ZERO_ID), {ZERO_ID: before - 1})
        # nor does the base's floor outlive its grace through later changes
        for p in (before * 2 + 1, before * 2):
            _warp(env, GRACE - 60)
            admin.set_base_price(p)
        with pytest.raises(E.PriceAboveQuote):
            _settle(env, _records(reg, 1, ZERO_ID), {ZERO_ID: before})
    finally:
        admin.set_base_price(before)


def test_a_copy_of_a_batch_with_lower_bounds_is_another_batch(grace_chain):
    """Another settler who copies our pending batch from the mempool cannot settle it under our id charged down
    to the floor (our settler would record it settled, paid at the floor): the id names the bounds. A copy
    under an id of its own is the copier's own batch, paid from its own deposit, and ours still settles."""
    env = grace_chain
    reg = register_sample(env, price=10**15)
    env.client(reg.owner).set_adapter_price(reg.adapter_id, 10**15 + 10)  # a grace: the floor is 10**15
    mallory = env.new_account(ETHER)
    env.client(env.admin).grant_settler(mallory.address)
    env.client(env.admin).deposit_for(mallory.address, ETHER)
    records = _records(reg, 2)
    ours = {reg.adapter_id: 10**15 + 10}
    cheap = {reg.adapter_id: 10**15}
    with pytest.raises(E.BatchIdMismatch):
        env.client(mallory).settle_batch(batch_id_for(records, max_prices=ours), None, records, max_prices=cheap)
    _settle(env, records, cheap, account=mallory)  # its own batch, its own sequence, its own money
    assert _total(env, _settle(env, records, ours)) == _fees(records, 10**15 + 10)


def test_the_grace_is_bounded_and_read_only_for_known_adapters(grace_chain):
    env = grace_chain
    c = env.client(env.admin)
    assert c.registry.functions.priceGraceSeconds().call() == GRACE
    assert c.ledger.functions.priceGraceSeconds().call() == GRACE
    with pytest.raises(E.UnknownAdapter):
        c.price_floor(rand_id())
    with pytest.raises(Exception) as err:
        _deploy_contract(c.w3, env.admin, env.deployment.chain_id, "AdapterRegistry", (1, 30 * 86_400 + 1))
    assert isinstance(c.decoder.decode(revert_data(err.value)), E.GraceTooLong)
    _deploy_contract(c.w3, env.admin, env.deployment.chain_id, "AdapterRegistry", (1, 30 * 86_400))
