"""AdapterRegistry against a real anvil: every revert path and event."""

import pytest
from web3.logs import DISCARD

from ledger import errors as E
from ledger.types import ZERO_ID
from tests.utils.chain import rand_id, register_sample

pytestmark = pytest.mark.integration


def _h(b) -> str:
    return "0x" + bytes(b).hex()


def _last(env, event, rcpt):
    logs = env.client().registry.events[event]().process_receipt(rcpt, errors=DISCARD)
    assert len(logs) == 1
    return logs[0]["args"]


# ------------------------------------------------------------------ datasets


def test_register_dataset_emits_and_reads_back(anvil_chain):
    env, payee = anvil_chain, anvil_chain.users[3]
    ds, content = rand_id(), rand_id()
    rcpt = env.client(env.users[0]).register_dataset(ds, content, payee.address)
    ev = _last(env, "DatasetRegistered", rcpt)
    assert (_h(ev["datasetId"]), ev["payee"], _h(ev["contentHash"])) == (ds, payee.address, content)
    info = env.client().get_dataset(ds)
    assert (info.content_hash, info.payee) == (content, payee.address)


def test_dataset_reverts(anvil_chain):
    env = anvil_chain
    c = env.client(env.users[0])
    with pytest.raises(E.ZeroId):
        c.register_dataset(ZERO_ID, rand_id())
    with pytest.raises(E.ZeroAddress):
        c.register_dataset(rand_id(), rand_id(), "0x" + "00" * 20)
    ds = rand_id()
    c.register_dataset(ds, rand_id())
    with pytest.raises(E.DatasetAlreadyRegistered) as err:
        env.client(env.users[1]).register_dataset(ds, rand_id())
    assert _h(err.value.args_by_name["datasetId"]) == ds
    with pytest.raises(E.UnknownDataset):
        env.client().get_dataset(rand_id())


def test_dataset_payee_change_only_by_payee(anvil_chain):
    env = anvil_chain
    payee, other = env.users[0], env.users[1]
    ds = rand_id()
    env.client(payee).register_dataset(ds, rand_id())
    with pytest.raises(E.NotDatasetPayee) as err:
        env.client(other).set_dataset_payee(ds, other.address)
    assert err.value.args_by_name["caller"] == other.address
    with pytest.raises(E.UnknownDataset):
        env.client(payee).set_dataset_payee(rand_id(), other.address)
    with pytest.raises(E.ZeroAddress):
        env.client(payee).set_dataset_payee(ds, "0x" + "00" * 20)
    ev = _last(env, "DatasetPayeeChanged", env.client(payee).set_dataset_payee(ds, other.address))
    assert ev["payee"] == other.address
    assert env.client().get_dataset(ds).payee == other.address


# ------------------------------------------------------------------ adapters


def test_register_adapter_emits_and_reads_back(anvil_chain):
    env = anvil_chain
    reg = register_sample(env, price=777, shares=(6000, 4000))  # exactly 10,000 is allowed
    a = env.client().get_adapter(reg.adapter_id)
    assert a.owner == reg.owner.address and a.price_per_1k_tokens == 777
    assert a.dataset_ids == reg.dataset_ids and a.shares_bps == (6000, 4000)
    assert a.base_model == reg.base_model and a.predecessor == ZERO_ID
    ev = env.client().events("registry", "AdapterRegistered", filters={"adapterId": bytes.fromhex(reg.adapter_id[2:])})
    assert len(ev) == 1 and ev[0]["args"]["spec"]["pricePer1kTokens"] == 777
    assert ev[0]["args"]["owner"] == reg.owner.address


def test_adapter_with_predecessor(anvil_chain):
    env = anvil_chain
    reg = register_sample(env)
    child = rand_id()
    env.client(env.users[4]).register_adapter(child, name="x", version="2", base_model=reg.base_model,
                                              price_per_1k_tokens=1, predecessor=reg.adapter_id)  # fmt: skip
    assert env.client().get_adapter(child).predecessor == reg.adapter_id


def test_adapter_reverts(anvil_chain):
    env = anvil_chain
    c = env.client(env.users[0])
    ds = rand_id()
    c.register_dataset(ds, rand_id())
    base = rand_id()
    kw = dict(name="n", version="1", base_model=base, price_per_1k_tokens=1)
    with pytest.raises(E.ZeroId):
        c.register_adapter(ZERO_ID, **kw)
    with pytest.raises(E.ZeroId):
        c.register_adapter(rand_id(), **{**kw, "base_model": ZERO_ID})
    with pytest.raises(E.UnknownPredecessor):
        c.register_adapter(rand_id(), predecessor=rand_id(), **kw)
    with pytest.raises(E.UnknownDataset):
        c.register_adapter(rand_id(), datasets=[(rand_id(), 100)], **kw)
    with pytest.raises(E.DuplicateDataset):
        c.register_adapter(rand_id(), datasets=[(ds, 100), (ds, 100)], **kw)
    with pytest.raises(E.SharesExceedTotal) as err:
        c.register_adapter(rand_id(), datasets=[(ds, 10_001)], **kw)
    assert err.value.args_by_name["totalBps"] == 10_001
    spec = ("n", "1", bytes(32), bytes.fromhex(base[2:]), 1, [bytes.fromhex(ds[2:])], [])
    with pytest.raises(E.LengthMismatch):
        c.tx.transact(c.registry.functions.registerAdapter(bytes.fromhex(rand_id()[2:]), spec))
    aid = rand_id()
    c.register_adapter(aid, **kw)
    with pytest.raises(E.AdapterAlreadyRegistered):
        env.client(env.users[1]).register_adapter(aid, **kw)
    with pytest.raises(E.UnknownAdapter):
        env.client().get_adapter(rand_id())


def test_only_owner_changes_adapter(anvil_chain):
    env = anvil_chain
    reg = register_sample(env)
    owner, stranger, heir = reg.owner, env.users[5], env.users[6]
    with pytest.raises(E.NotAdapterOwner):
        env.client(stranger).set_adapter_price(reg.adapter_id, 1)
    with pytest.raises(E.NotAdapterOwner):
        env.client(stranger).transfer_adapter(reg.adapter_id, stranger.address)
    with pytest.raises(E.UnknownAdapter):
        env.client(owner).set_adapter_price(rand_id(), 1)
    ev = _last(env, "AdapterPriceChanged", env.client(owner).set_adapter_price(reg.adapter_id, 5))
    assert ev["pricePer1kTokens"] == 5
    with pytest.raises(E.ZeroAddress):
        env.client(owner).transfer_adapter(reg.adapter_id, "0x" + "00" * 20)
    ev = _last(env, "AdapterOwnershipTransferred", env.client(owner).transfer_adapter(reg.adapter_id, heir.address))
    assert (ev["previousOwner"], ev["newOwner"]) == (owner.address, heir.address)
    with pytest.raises(E.NotAdapterOwner):
        env.client(owner).set_adapter_price(reg.adapter_id, 9)
    env.client(heir).set_adapter_price(reg.adapter_id, 9)
    assert env.client().get_adapter(reg.adapter_id).price_per_1k_tokens == 9


# ------------------------------------------------------------------ nodes


def test_register_node_emits_and_reads_back(anvil_chain):
    env = anvil_chain
    op, nid, base = env.users[2], rand_id(), rand_id()
    rcpt = env.client(op).register_node(nid, peer_id="12D3KooWabc", multiaddrs=["/ip4/1.2.3.4/tcp/1", "/dns/x/tcp/2"],
                                        api_url="http://n:1", base_model=base)  # fmt: skip
    ev = _last(env, "NodeRegistered", rcpt)
    assert ev["operator"] == op.address and list(ev["multiaddrs"]) == ["/ip4/1.2.3.4/tcp/1", "/dns/x/tcp/2"]
    n = env.client().get_node(nid)
    assert (n.operator, n.active, n.peer_id, n.api_url, n.base_model) == (op.address, True, "12D3KooWabc",
                                                                           "http://n:1", base)  # fmt: skip


def test_node_reverts_and_operator_only(anvil_chain):
    env = anvil_chain
    op, stranger, nid, base = env.users[2], env.users[3], rand_id(), rand_id()
    c = env.client(op)
    kw = dict(peer_id="p", multiaddrs=[], api_url="u", base_model=base)
    with pytest.raises(E.ZeroId):
        c.register_node(ZERO_ID, **kw)
    with pytest.raises(E.ZeroId):
        c.register_node(rand_id(), **{**kw, "base_model": ZERO_ID})
    c.register_node(nid, **kw)
    with pytest.raises(E.NodeAlreadyRegistered):
        env.client(stranger).register_node(nid, **kw)
    with pytest.raises(E.NotNodeOperator):
        env.client(stranger).update_node(nid, **kw)
    with pytest.raises(E.NotNodeOperator):
        env.client(stranger).set_node_active(nid, False)
    with pytest.raises(E.UnknownNode):
        c.update_node(rand_id(), **kw)
    with pytest.raises(E.UnknownNode):
        env.client().get_node(rand_id())
    with pytest.raises(E.ZeroId):
        c.update_node(nid, **{**kw, "base_model": ZERO_ID})
    new_base = rand_id()
    ev = _last(env, "NodeUpdated", c.update_node(nid, peer_id="q", multiaddrs=["/ip4/9.9.9.9/tcp/9"],
                                                 api_url="http://v", base_model=new_base))  # fmt: skip
    assert ev["peerId"] == "q" and _h(ev["baseModel"]) == new_base
    ev = _last(env, "NodeActiveChanged", c.set_node_active(nid, False))
    assert ev["active"] is False
    n = env.client().get_node(nid)
    assert (n.active, n.peer_id, n.multiaddrs, n.base_model) == (False, "q", ("/ip4/9.9.9.9/tcp/9",), new_base)
