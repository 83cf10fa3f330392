"""AdapterRegistry against a real anvil: every revert path and event."""

import dataclasses
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eth_utils import keccak
from web3.logs import DISCARD

from common.wire import hex0x, node_id_of
from devnet.deploy import _deploy_contract
from ledger import errors as E
from ledger.chain import ChainClient
from ledger.types import (
    ZERO_ID,
    AdapterRegistration,
    Domain,
    dataset_id_for,
    node_address_problem,
    node_proof_message,
    registry_name_problem,
)
from tests.utils.chain import rand_id, register_sample

pytestmark = pytest.mark.integration


def _last(env, event, rcpt):
    logs = env.client().registry.events[event]().process_receipt(rcpt, errors=DISCARD)
    assert len(logs) == 1
    return logs[0]["args"]


# ------------------------------------------------------------------ datasets


def test_register_dataset_emits_and_reads_back(anvil_chain):
    env, contributor = anvil_chain, anvil_chain.users[3]
    content = rand_id()
    rcpt = env.client(contributor).register_dataset("reads-back", content)
    ev = _last(env, "DatasetRegistered", rcpt)
    ds = dataset_id_for(contributor.address, "reads-back")
    assert (hex0x(ev["datasetId"]), ev["payee"], hex0x(ev["contentHash"]), ev["name"]) == (
        ds,
        contributor.address,
        content,
        "reads-back",
    )
    assert hex0x(env.client().registry.functions.datasetIdOf(contributor.address, "reads-back").call()) == ds
    info = env.client().get_dataset(ds)
    assert (info.content_hash, info.payee, info.contributor, info.name) == (
        content,
        contributor.address,
        contributor.address,
        "reads-back",
    )


def test_dataset_reverts(anvil_chain):
    env = anvil_chain
    c = env.client(env.users[0])
    with pytest.raises(E.EmptyName):
        c.register_dataset("", rand_id())
    c.register_dataset("twice", rand_id())
    with pytest.raises(E.DatasetAlreadyRegistered) as err:
        c.register_dataset("twice", rand_id())
    assert hex0x(err.value.args_by_name["datasetId"]) == c.dataset_id("twice")
    with pytest.raises(E.UnknownDataset):
        env.client().get_dataset(rand_id())


def test_a_stranger_cannot_take_a_contributors_dataset(anvil_chain):
    """The demo-network attack: a stranger registered the dataset's name first, with herself as payee.
    Now the id is bound to its contributor: the stranger's registration of the name is her own dataset."""
    env = anvil_chain
    contributor, stranger = env.users[4], env.new_account()
    env.client(stranger).register_dataset("capitals-qa-squat", rand_id())  # first, with herself as payee
    ours = dataset_id_for(contributor.address, "capitals-qa-squat")
    with pytest.raises(E.UnknownDataset):
        env.client().get_dataset(ours)  # the stranger's registration is not the contributor's dataset
    env.client(contributor).register_dataset("capitals-qa-squat", rand_id())
    assert env.client().get_dataset(ours).payee == contributor.address
    theirs = env.client().get_dataset(dataset_id_for(stranger.address, "capitals-qa-squat"))
    assert theirs.payee == stranger.address and theirs.dataset_id != ours
    with pytest.raises(E.NotDatasetPayee):  # nor can she redirect the contributor's payments
        env.client(stranger).set_dataset_payee(ours, stranger.address)


def test_dataset_payee_change_only_by_payee(anvil_chain):
    env = anvil_chain
    payee, other = env.users[0], env.users[1]
    env.client(payee).register_dataset("payee-change", rand_id())
    ds = env.client(payee).dataset_id("payee-change")
    with pytest.raises(E.NotDatasetPayee) as err:
        env.client(other).set_dataset_payee(ds, other.address)
    assert err.value.args_by_name["caller"] == other.address
    with pytest.raises(E.UnknownDataset):
        env.client(payee).set_dataset_payee(rand_id(), other.address)
    with pytest.raises(E.ZeroAddress):
        env.client(payee).set_dataset_payee(ds, "0x" + "00" * 20)
    ev = _last(env, "DatasetPayeeChanged", env.client(payee).set_dataset_payee(ds, other.address))
    assert ev["payee"] == other.address
    info = env.client().get_dataset(ds)
    assert (info.payee, info.contributor) == (other.address, payee.address)


# ------------------------------------------------------------------ adapters


def _reg(name, *, base=None, price=1, predecessor=None, datasets=(), version="1"):
    return AdapterRegistration.of(
        rand_id(),
        name=name,
        version=version,
        base_model=base or rand_id(),
        price_per_1k_tokens=price,
        datasets=datasets,
        predecessor=predecessor,
    )


def _unique(prefix: str) -> str:
    return f"{prefix}-{rand_id()[2:10]}"


def test_register_adapter_emits_and_reads_back(anvil_chain):
    env = anvil_chain
    reg = register_sample(env, price=777, shares=(6000, 4000))  # exactly 10,000 is allowed
    a = env.client().get_adapter(reg.adapter_id)
    assert a.owner == reg.owner.address and a.publisher == reg.owner.address and a.price_per_1k_tokens == 777
    assert a.dataset_ids == reg.dataset_ids and a.shares_bps == (6000, 4000)
    assert a.base_model == reg.base_model and a.predecessor == ZERO_ID
    ev = env.client().events("registry", "AdapterRegistered", filters={"adapterId": bytes.fromhex(reg.adapter_id[2:])})
    assert len(ev) == 1 and ev[0]["args"]["spec"]["pricePer1kTokens"] == 777
    assert ev[0]["args"]["owner"] == reg.owner.address
    assert env.client().name_owner(a.name) == reg.owner.address
    names = env.client().events("registry", "NameRegistered", filters={"owner": reg.owner.address})
    assert a.name in [e["args"]["name"] for e in names]


def test_adapter_reverts(anvil_chain):
    env = anvil_chain
    c = env.client(env.users[0])
    c.register_dataset("adapter-reverts", rand_id())
    ds = c.dataset_id("adapter-reverts")
    base = rand_id()
    kw = dict(version="1", base_model=base, price_per_1k_tokens=1)
    with pytest.raises(E.ZeroId):
        c.register_adapter(ZERO_ID, name=_unique("n"), **kw)
    with pytest.raises(E.ZeroId):
        c.register_adapter(rand_id(), name=_unique("n"), **{**kw, "base_model": ZERO_ID})
    with pytest.raises(E.EmptyName):
        c.register_adapter(rand_id(), name="", **kw)
    with pytest.raises(E.UnknownPredecessor):
        c.register_adapter(rand_id(), name=_unique("n"), predecessor=rand_id(), **kw)
    with pytest.raises(E.UnknownDataset):
        c.register_adapter(rand_id(), name=_unique("n"), datasets=[(rand_id(), 100)], **kw)
    with pytest.raises(E.DuplicateDataset):
        c.register_adapter(rand_id(), name=_unique("n"), datasets=[(ds, 100), (ds, 100)], **kw)
    with pytest.raises(E.SharesExceedTotal) as err:
        c.register_adapter(rand_id(), name=_unique("n"), datasets=[(ds, 10_001)], **kw)
    assert err.value.args_by_name["totalBps"] == 10_001
    bad = AdapterRegistration(rand_id(), _unique("n"), "1", ZERO_ID, base, 1, (ds,), ())
    spec = bad.spec()
    sig = bytes.fromhex(bad.sign(c.account, c.domain)[2:])
    salt = c.commit_registration(bad.adapter_id, bad.name)
    with pytest.raises(E.LengthMismatch):
        c.tx.transact(
            c.registry.functions.registerAdapter(bytes.fromhex(bad.adapter_id[2:]), spec, sig, salt),
            estimate_in="pending",
        )
    aid, name = rand_id(), _unique("n")
    c.register_adapter(aid, name=name, **kw)
    with pytest.raises(E.AdapterAlreadyRegistered):
        env.client(env.users[1]).register_adapter(aid, name=_unique("n"), **kw)
    with pytest.raises(E.UnknownAdapter):
        env.client().get_adapter(rand_id())


def test_a_stranger_cannot_take_over_a_name(anvil_chain):
    """The demo-network attack: a second identity registered `alice/geo` v2 (other weights, 1,000x the
    price). Now only the name's owner registers its versions; the name stays hers."""
    env = anvil_chain
    alice, mallory = env.users[0], env.new_account()
    name = _unique("alice/geo")
    v1 = _reg(name, price=5)
    env.client(alice).register_adapter(v1)
    squat = _reg(name, price=5000, version="2", predecessor=v1.adapter_id)
    with pytest.raises(E.NotNameOwner) as err:
        env.client(mallory).register_adapter(squat)
    assert (err.value.args_by_name["owner"], err.value.args_by_name["caller"]) == (alice.address, mallory.address)
    with pytest.raises(E.NotNameOwner):  # without a predecessor neither
        env.client(mallory).register_adapter(_reg(name, price=5000, version="9"))
    with pytest.raises(E.NotNameOwner):  # nor can she hand the name to herself
        env.client(mallory).transfer_name(name, mallory.address)
    assert env.client().name_owner(name) == alice.address
    with pytest.raises(E.UnknownAdapter):
        env.client().get_adapter(squat.adapter_id)
    v2 = _reg(name, price=6, version="2", predecessor=v1.adapter_id)
    env.client(alice).register_adapter(v2)
    assert env.client().get_adapter(v2.adapter_id).predecessor == v1.adapter_id


def _raw(w3, method: str, params=()):
    return w3.provider.make_request(method, list(params))["result"]


def _send_raw(w3, account, fn, *, tip: int) -> bytes:
    """Sign and send `fn` with a fixed gas limit (no estimate: it may be valid only once mined after another)
    and priority fee `tip`; the transaction hash."""
    base = w3.eth.get_block("latest")["baseFeePerGas"]
    tx = fn.build_transaction(
        {
            "from": account.address,
            "gas": 1_000_000,
            "nonce": w3.eth.get_transaction_count(account.address, "pending"),
            "maxPriorityFeePerGas": tip,
            "maxFeePerGas": 2 * base + tip,
            "chainId": w3.eth.chain_id,
        }
    )
    return w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)


def _register_fn(client, reg, salt: bytes):
    """registerAdapter of `reg`, signed by `client`'s account, revealing the commitment made with `salt`."""
    sig = bytes.fromhex(reg.sign(client.account, client.domain)[2:])
    return client.registry.functions.registerAdapter(bytes.fromhex(reg.adapter_id[2:]), reg.spec(), sig, salt)


def _commit_and_outbid(w3, client, copy, *, tip: int) -> tuple[bytes, bytes]:
    """What a copier who sees a registration waiting to be mined can do at best: commit to `copy` and send its
    registration at once, both at priority `tip`. (The registration's hash, the salt.)"""
    salt = os.urandom(32)
    commitment = client.registry.functions.registrationCommitment(
        bytes.fromhex(copy.adapter_id[2:]), copy.name, client.account.address, salt
    ).call()
    _send_raw(w3, client.account, client.registry.functions.commitRegistration(commitment), tip=tip)
    return _send_raw(w3, client.account, _register_fn(client, copy, salt), tip=tip), salt


def test_a_registration_seen_waiting_cannot_be_outbid_for_its_name(anvil_chain):
    """The front-runner's attack: Mallory watches the pending transactions, copies the name of Alice's first
    registration into her own (her adapter, her price) and outbids it into the same block. Before, the name
    went to whoever was mined first. Now a first registration reveals a commitment made blocks before, and
    hers, made on seeing Alice's, is too recent: Alice's registration lands, the name is hers."""
    env = anvil_chain
    alice, mallory = env.new_account(), env.new_account()
    a, m = env.client(alice), env.client(mallory)
    w3 = a.w3
    name = _unique("alice/medical")
    mine = _reg(name, price=5)
    salt = a.commit_registration(mine.adapter_id, name)  # mined: the commitment says nothing of the name
    _raw(w3, "evm_setAutomine", [False])
    try:
        alice_tx = _send_raw(w3, alice, _register_fn(a, mine, salt), tip=10**9)
        # Mallory reads the pending registration's name from its calldata and copies it, outbidding Alice
        seen = a.registry.decode_function_input(w3.eth.get_transaction(alice_tx)["input"])[1]["spec"]
        copy = _reg(seen["name"], price=5000)
        her_tx, her_salt = _commit_and_outbid(w3, m, copy, tip=50 * 10**9)
        _raw(w3, "evm_mine")
    finally:
        _raw(w3, "evm_setAutomine", [True])
    mined_her, mined_alice = w3.eth.get_transaction_receipt(her_tx), w3.eth.get_transaction_receipt(alice_tx)
    assert (
        mined_her["blockNumber"] == mined_alice["blockNumber"]
        and mined_her["transactionIndex"] < mined_alice["transactionIndex"]
    )
    assert (mined_her["status"], mined_alice["status"]) == (0, 1)  # hers first, and refused
    assert a.name_owner(name) == alice.address
    with pytest.raises(E.UnknownAdapter):
        a.get_adapter(copy.adapter_id)
    # nor does her commitment, old enough in the next block, win the name later: it is Alice's
    with pytest.raises(E.NotNameOwner):
        m.tx.transact(_register_fn(m, copy, her_salt), estimate_in="pending")


def test_a_registration_seen_waiting_cannot_have_its_adapter_id_taken(anvil_chain):
    """Mallory, owning a name of her own, copies the adapter id of Alice's pending registration into a
    registration of her name (her price, signed by her) and outbids it. Before, the id went to her: Alice's
    registration reverted and could never be made with that manifest. Now every registration reveals a
    commitment to its id made blocks before, and hers, made on seeing Alice's, is too recent."""
    env = anvil_chain
    alice, mallory = env.new_account(), env.new_account()
    a, m = env.client(alice), env.client(mallory)
    w3 = a.w3
    first = _reg(_unique("mallory/any"))
    m.register_adapter(first)  # her name, and its first version, long before
    mine = _reg(_unique("alice/medical"), price=5)
    salt = a.commit_registration(mine.adapter_id, mine.name)
    _raw(w3, "evm_setAutomine", [False])
    try:
        alice_tx = _send_raw(w3, alice, _register_fn(a, mine, salt), tip=10**9)
        seen = a.registry.decode_function_input(w3.eth.get_transaction(alice_tx)["input"])[1]["adapterId"]
        copy = dataclasses.replace(
            _reg(first.name, version="2", price=5000, predecessor=first.adapter_id), adapter_id=hex0x(seen)
        )
        her_tx, _ = _commit_and_outbid(w3, m, copy, tip=50 * 10**9)
        _raw(w3, "evm_mine")
    finally:
        _raw(w3, "evm_setAutomine", [True])
    mined_her, mined_alice = w3.eth.get_transaction_receipt(her_tx), w3.eth.get_transaction_receipt(alice_tx)
    assert mined_her["transactionIndex"] < mined_alice["transactionIndex"]  # hers first, and refused
    assert (mined_her["status"], mined_alice["status"]) == (0, 1)
    assert a.get_adapter(mine.adapter_id).owner == alice.address


def test_a_first_registration_reveals_its_own_commitment(anvil_chain):
    env = anvil_chain
    alice, mallory = env.new_account(), env.new_account()
    a, m = env.client(alice), env.client(mallory)
    assert a.registry.functions.minCommitBlocks().call() == 1  # the devnet's
    reg = _reg(_unique("alice/law"))
    sig = bytes.fromhex(reg.sign(alice, a.domain)[2:])

    def register(client, salt):
        return client.tx.transact(
            client.registry.functions.registerAdapter(bytes.fromhex(reg.adapter_id[2:]), reg.spec(), sig, salt),
            estimate_in="pending",
        )

    with pytest.raises(E.NotCommitted) as err:  # no commitment at all
        register(a, bytes(32))
    assert err.value.args_by_name["name"] == reg.name
    assert err.value.args_by_name["adapterId"] == bytes.fromhex(reg.adapter_id[2:])
    salt = a.commit_registration(reg.adapter_id, reg.name)
    with pytest.raises(E.NotCommitted):  # another salt is another commitment
        register(a, os.urandom(32))
    with pytest.raises(E.NotCommitted):  # and another registrant's: Alice's commitment is hers alone
        m.tx.transact(
            m.registry.functions.registerAdapter(
                bytes.fromhex(reg.adapter_id[2:]), reg.spec(), bytes.fromhex(reg.sign(mallory, m.domain)[2:]), salt
            ),
            estimate_in="pending",
        )
    commitment = a.registry.functions.registrationCommitment(
        bytes.fromhex(reg.adapter_id[2:]), reg.name, alice.address, salt
    ).call()
    assert a.registry.functions.commitBlock(commitment).call() > 0
    register(a, salt)
    assert a.name_owner(reg.name) == alice.address
    assert a.registry.functions.commitBlock(commitment).call() == 0  # spent
    # a later version names its predecessor, and reveals a commitment of its own (register_adapter makes it)
    v2 = _reg(reg.name, version="2", predecessor=reg.adapter_id)
    with pytest.raises(E.NotCommitted):
        a.tx.transact(
            a.registry.functions.registerAdapter(
                bytes.fromhex(v2.adapter_id[2:]), v2.spec(), bytes.fromhex(v2.sign(alice, a.domain)[2:]), bytes(32)
            )
        )
    a.register_adapter(v2)
    assert a.get_adapter(v2.adapter_id).predecessor == reg.adapter_id


def test_a_commitment_is_revealed_in_a_later_block_only(anvil_chain):
    env = anvil_chain
    alice = env.new_account()
    a = env.client(alice)
    w3 = a.w3
    reg = _reg(_unique("alice/same-block"))
    salt = os.urandom(32)
    commitment = a.registry.functions.registrationCommitment(
        bytes.fromhex(reg.adapter_id[2:]), reg.name, alice.address, salt
    ).call()
    _raw(w3, "evm_setAutomine", [False])
    try:
        _send_raw(w3, alice, a.registry.functions.commitRegistration(commitment), tip=10**9)
        fn = a.registry.functions.registerAdapter(
            bytes.fromhex(reg.adapter_id[2:]), reg.spec(), bytes.fromhex(reg.sign(alice, a.domain)[2:]), salt
        )
        same_block = _send_raw(w3, alice, fn, tip=10**9)
        _raw(w3, "evm_mine")
    finally:
        _raw(w3, "evm_setAutomine", [True])
    assert w3.eth.get_transaction_receipt(same_block)["status"] == 0
    with pytest.raises(E.CommitTooRecent):  # replayed as a call in the commitment's block
        a.tx.estimate(
            fn.address, fn._encode_transaction_data(), block=w3.eth.get_transaction_receipt(same_block)["blockNumber"]
        )
    a.tx.transact(fn, estimate_in="pending")  # a block later it goes through
    assert a.name_owner(reg.name) == alice.address


def test_predecessor_rules(anvil_chain):
    env = anvil_chain
    c = env.client(env.users[1])
    name, other = _unique("pred"), _unique("pred-other")
    v1, o1 = _reg(name), _reg(other)
    c.register_adapter(o1)
    with pytest.raises(E.PredecessorNameMismatch):  # a first version names no predecessor (least of all another name's)
        c.register_adapter(_reg(name, predecessor=o1.adapter_id))
    c.register_adapter(v1)
    with pytest.raises(E.PredecessorRequired):  # a later version names its predecessor
        c.register_adapter(_reg(name, version="2"))
    with pytest.raises(E.PredecessorNameMismatch) as err:  # of the same name
        c.register_adapter(_reg(name, version="2", predecessor=o1.adapter_id))
    assert err.value.args_by_name["name"] == name
    with pytest.raises(E.UnknownPredecessor):
        c.register_adapter(_reg(name, version="2", predecessor=rand_id()))
    v2 = _reg(name, version="2", predecessor=v1.adapter_id)
    c.register_adapter(v2)
    c.register_adapter(_reg(name, version="3", predecessor=v2.adapter_id))


def test_transfer_name(anvil_chain):
    env = anvil_chain
    alice, carol, stranger = env.users[0], env.users[6], env.new_account()
    name = _unique("alice/sold")
    v1 = _reg(name)
    env.client(alice).register_adapter(v1)
    with pytest.raises(E.ZeroAddress):
        env.client(alice).transfer_name(name, "0x" + "00" * 20)
    with pytest.raises(E.NotNameOwner):
        env.client(stranger).transfer_name(name, stranger.address)
    with pytest.raises(E.NotNameOwner):  # an unregistered name has no owner to transfer it
        env.client(alice).transfer_name(_unique("nobody"), carol.address)
    ev = _last(env, "NameTransferred", env.client(alice).transfer_name(name, carol.address))
    assert (ev["previousOwner"], ev["newOwner"], ev["name"]) == (alice.address, carol.address, name)
    assert env.client().name_owner(name) == carol.address
    with pytest.raises(E.NotNameOwner):  # the previous owner no longer publishes versions
        env.client(alice).register_adapter(_reg(name, version="2", predecessor=v1.adapter_id))
    v2 = _reg(name, version="2", predecessor=v1.adapter_id)  # the new owner continues the line
    env.client(carol).register_adapter(v2)
    a1, a2 = env.client().get_adapter(v1.adapter_id), env.client().get_adapter(v2.adapter_id)
    assert (a1.publisher, a1.owner, a2.publisher) == (alice.address, alice.address, carol.address)


def test_signature_must_match_the_registration(anvil_chain):
    """The chain refuses a registration that differs from what the publisher signed."""
    env = anvil_chain
    alice, other = env.users[2], env.users[3]
    c = env.client(alice)
    reg = _reg(_unique("signed"), price=10)
    sig = reg.sign(alice, c.domain)
    raised = dataclasses.replace(reg, price_per_1k_tokens=10_000)  # price changed after signing
    with pytest.raises(E.SignatureMismatch) as err:
        c.register_adapter(raised, signature=sig)
    assert err.value.args_by_name["caller"] == alice.address and err.value.args_by_name["signer"] != alice.address
    for changed in (
        dataclasses.replace(reg, name=_unique("renamed")),
        dataclasses.replace(reg, version="7"),
        dataclasses.replace(reg, base_model=rand_id()),
    ):
        with pytest.raises(E.SignatureMismatch):
            c.register_adapter(changed, signature=sig)
    with pytest.raises(E.SignatureMismatch) as err:  # signed by someone else than the sender
        c.register_adapter(reg, signature=reg.sign(other, c.domain))
    assert err.value.args_by_name["signer"] == other.address
    with pytest.raises(E.InvalidSignature):
        c.register_adapter(reg, signature=sig[:-2])  # 64 bytes
    r, s_, v = bytes.fromhex(sig[2:66]), int(sig[66:130], 16), int(sig[130:], 16)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    malleated = r + (n - s_).to_bytes(32, "big") + bytes([55 - v])  # the same signer, s in the upper half
    with pytest.raises(E.InvalidSignature):
        c.register_adapter(reg, signature=malleated)
    assert (
        c.adapter_digest(reg)
        == "0x" + keccak(b"\x19" + (sm := reg.typed_data(c.domain)).version + sm.header + sm.body).hex()
    )
    c.register_adapter(reg, signature=sig)
    assert env.client().get_adapter(reg.adapter_id).price_per_1k_tokens == 10


def test_signature_is_bound_to_chain_and_registry(anvil_chain):
    """A signature made for another registry (or chain) is refused by this one."""
    env = anvil_chain
    alice = env.users[2]
    c = env.client(alice)
    other_registry = _deploy_contract(c.w3, alice, env.deployment.chain_id, "AdapterRegistry", (1, 0))[
        "contractAddress"
    ]
    assert other_registry != env.deployment.registry
    reg = _reg(_unique("bound"))
    for domain in (
        Domain(env.deployment.chain_id, other_registry),
        Domain(env.deployment.chain_id + 1, env.deployment.registry),
    ):
        with pytest.raises(E.SignatureMismatch):
            c.register_adapter(reg, signature=reg.sign(alice, domain))
    # the signature made for the other registry is good there, and only there
    there = ChainClient(dataclasses.replace(env.deployment, registry=other_registry), alice)
    there.register_adapter(reg, signature=reg.sign(alice, Domain(env.deployment.chain_id, other_registry)))
    assert there.get_adapter(reg.adapter_id).publisher == alice.address
    with pytest.raises(E.UnknownAdapter):
        env.client().get_adapter(reg.adapter_id)


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
    a = env.client().get_adapter(reg.adapter_id)
    assert (a.price_per_1k_tokens, a.owner, a.publisher) == (9, heir.address, owner.address)


# ------------------------------------------------------------------ nodes


def _key():
    key = Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes_raw(), node_id_of(key.public_key().public_bytes_raw())


def test_register_node_emits_and_reads_back(anvil_chain):
    env = anvil_chain
    op, base = env.users[2], rand_id()
    key, public, nid = _key()
    rcpt = env.client(op).register_node(
        key,
        peer_id="12D3KooWabc",
        multiaddrs=["/ip4/1.2.3.4/tcp/1", "/dns/x/tcp/2"],
        api_url="http://n:1",
        base_model=base,
    )
    ev = _last(env, "NodeRegistered", rcpt)
    assert ev["operator"] == op.address and list(ev["multiaddrs"]) == ["/ip4/1.2.3.4/tcp/1", "/dns/x/tcp/2"]
    assert bytes(ev["publicKey"]) == public and hex0x(ev["nodeId"]) == nid
    n = env.client().get_node(nid)
    assert (n.operator, n.active, n.peer_id, n.api_url, n.base_model, n.public_key) == (
        op.address,
        True,
        "12D3KooWabc",
        "http://n:1",
        base,
        "0x" + public.hex(),
    )
    nonce = env.client().node_nonce(nid)
    assert nonce == 1  # one registration so far; the next proof names nonce 1
    assert env.client().registry.functions.nodeProofMessage(
        op.address, nonce
    ).call() == env.client().node_proof_message(nid, op.address)
    assert env.client().node_proof_message(nid, op.address) == node_proof_message(
        env.deployment.chain_id, env.deployment.registry, op.address, 1
    )


def test_node_reverts_and_operator_only(anvil_chain):
    env = anvil_chain
    op, stranger, base = env.users[2], env.users[3], rand_id()
    key, public, nid = _key()
    c = env.client(op)
    kw = dict(peer_id="p", multiaddrs=[], api_url="http://u", base_model=base)
    sig = key.sign(c.node_proof_message(nid))
    with pytest.raises(E.ZeroId):
        c.register_node_with_proof(ZERO_ID, public, sig, **kw)
    with pytest.raises(E.ZeroId):
        c.register_node(key, **{**kw, "base_model": ZERO_ID})
    c.register_node(key, **kw)
    with pytest.raises(E.NodeAlreadyRegistered):  # its own operator updates instead
        c.register_node(key, **kw)
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
    ev = _last(
        env,
        "NodeUpdated",
        c.update_node(nid, peer_id="q", multiaddrs=["/ip4/9.9.9.9/tcp/9"], api_url="http://v", base_model=new_base),
    )
    assert ev["peerId"] == "q" and hex0x(ev["baseModel"]) == new_base
    ev = _last(env, "NodeActiveChanged", c.set_node_active(nid, False))
    assert ev["active"] is False
    n = env.client().get_node(nid)
    assert (n.active, n.peer_id, n.multiaddrs, n.base_model) == (False, "q", ("/ip4/9.9.9.9/tcp/9",), new_base)


def test_a_stranger_cannot_register_a_node_id(anvil_chain):
    """The demo-network attack: a stranger registered a real node's id first. Now registerNode needs the
    node key's signature for the caller: without the key, no proof she makes or copies passes."""
    env = anvil_chain
    real_op, stranger = env.users[4], env.new_account()
    key, public, nid = _key()
    kw = dict(peer_id="p", multiaddrs=["/ip4/6.6.6.6/tcp/1"], api_url="http://evil", base_model=rand_id())
    s = env.client(stranger)
    her_key, her_public, her_nid = _key()
    with pytest.raises(E.NodeKeyMismatch):  # her own key's proof, the real node's id
        s.register_node_with_proof(nid, her_public, her_key.sign(s.node_proof_message(nid)), **kw)
    with pytest.raises(E.InvalidNodeProof):  # the real key, a forged signature
        s.register_node_with_proof(nid, public, her_key.sign(s.node_proof_message(nid)), **kw)
    with pytest.raises(E.InvalidNodeProof):  # the real key, no signature at all
        s.register_node_with_proof(nid, public, bytes(64), **kw)
    real_proof = key.sign(env.client(real_op).node_proof_message(nid))
    with pytest.raises(E.InvalidNodeProof) as err:  # the real node's proof, replayed from her address
        s.register_node_with_proof(nid, public, real_proof, **kw)
    assert err.value.args_by_name["operator"] == stranger.address
    other_chain = node_proof_message(env.deployment.chain_id + 1, env.deployment.registry, stranger.address, 0)
    other_registry = node_proof_message(env.deployment.chain_id, "0x" + "ab" * 20, stranger.address, 0)
    for message in (other_chain, other_registry):  # the key's proof for her, but made for another chain/registry
        with pytest.raises(E.InvalidNodeProof):
            s.register_node_with_proof(nid, public, key.sign(message), **kw)
    with pytest.raises(E.UnknownNode):
        env.client().get_node(nid)
    env.client(real_op).register_node_with_proof(nid, public, real_proof, **{**kw, "api_url": "http://real"})
    n = env.client().get_node(nid)
    assert (n.operator, n.api_url) == (real_op.address, "http://real")
    with pytest.raises(E.InvalidNodeProof):  # nor can she take it over once registered
        s.register_node_with_proof(nid, public, real_proof, **kw)


def test_the_key_holder_moves_a_node_to_another_operator(anvil_chain):
    env = anvil_chain
    first, second = env.users[5], env.users[6]
    key, public, nid = _key()
    kw = dict(peer_id="p", multiaddrs=[], api_url="http://a", base_model=rand_id())
    env.client(first).register_node(key, **kw)
    env.client(first).set_node_active(nid, False)
    rcpt = env.client(second).register_node(key, **{**kw, "api_url": "http://b"})
    ev = _last(env, "NodeOperatorChanged", rcpt)
    assert (hex0x(ev["nodeId"]), ev["previousOperator"], ev["newOperator"]) == (nid, first.address, second.address)
    n = env.client().get_node(nid)
    assert (n.operator, n.active, n.api_url) == (second.address, True, "http://b")
    with pytest.raises(E.NotNodeOperator):
        env.client(first).update_node(nid, **kw)


def test_a_former_operator_cannot_take_a_node_back_with_its_old_proof(anvil_chain):
    """The proof A sent in its registration is public (it is in A's transaction). Once the key holder
    moved the node to B, A re-sending it must not make A the operator again: every proof names the node's
    registration nonce, which each registration increments."""
    env = anvil_chain
    first, second = env.users[5], env.users[6]
    key, public, nid = _key()
    kw = dict(peer_id="p", multiaddrs=[], api_url="http://a", base_model=rand_id())
    a = env.client(first)
    assert a.node_nonce(nid) == 0
    old_proof = key.sign(a.node_proof_message(nid))  # what A's registration carried
    a.register_node_with_proof(nid, public, old_proof, **kw)
    assert a.node_nonce(nid) == 1
    env.client(second).register_node(key, **{**kw, "api_url": "http://b"})
    assert a.node_nonce(nid) == 2
    with pytest.raises(E.InvalidNodeProof) as err:
        a.register_node_with_proof(nid, public, old_proof, **{**kw, "api_url": "http://evil"})
    assert err.value.args_by_name["operator"] == first.address
    n = env.client().get_node(nid)
    assert (n.operator, n.active, n.api_url) == (second.address, True, "http://b")
    # the key holder can always move it back with a fresh proof, which is good once
    stale = key.sign(a.node_proof_message(nid))
    a.register_node_with_proof(nid, public, stale, **kw)
    assert env.client().get_node(nid).operator == first.address
    env.client(second).register_node(key, **kw)
    with pytest.raises(E.InvalidNodeProof):  # and no earlier proof of A's works again
        a.register_node_with_proof(nid, public, stale, **kw)
    assert env.client().get_node(nid).operator == second.address


def test_a_price_that_would_overflow_settlement_is_refused(anvil_chain):
    """Price * tokens must not overflow in AttributionLedger: prices are capped at 2**128 - 1."""
    env = anvil_chain
    c = env.client(env.users[0])
    cap = c.registry.functions.MAX_PRICE_PER_1K_TOKENS().call()
    assert cap == 2**128 - 1
    with pytest.raises(E.PriceTooHigh):
        c.register_adapter(
            rand_id(), name=_unique("dear"), version="1", base_model=rand_id(), price_per_1k_tokens=2**255
        )
    reg = register_sample(env, owner=env.users[0])
    for price in (2**255, 2**128, 2**256 - 1):
        with pytest.raises(E.PriceTooHigh):
            c.set_adapter_price(reg.adapter_id, price)
    c.set_adapter_price(reg.adapter_id, cap)  # the cap itself is allowed
    assert env.client().get_adapter(reg.adapter_id).price_per_1k_tokens == cap
    aid = rand_id()
    c.register_adapter(aid, name=_unique("cap"), version="1", base_model=rand_id(), price_per_1k_tokens=cap)


def test_an_adapter_names_at_most_sixteen_datasets(anvil_chain):
    """A batch settles every dataset of every adapter in it; hundreds of payees per adapter would push
    a batch past the block gas limit."""
    env = anvil_chain
    c = env.client(env.users[1])
    assert c.registry.functions.MAX_DATASETS().call() == 16
    names = [_unique("many") for _ in range(17)]
    for name in names:
        c.register_dataset(name, rand_id())
    ids = [c.dataset_id(n) for n in names]
    with pytest.raises(E.TooManyDatasets):
        c.register_adapter(
            rand_id(), name=_unique("wide"), version="1", base_model=rand_id(), datasets=[(d, 1) for d in ids]
        )
    aid = rand_id()
    c.register_adapter(
        aid, name=_unique("wide"), version="1", base_model=rand_id(), datasets=[(d, 1) for d in ids[:16]]
    )
    assert len(env.client().get_adapter(aid).dataset_ids) == 16


BAD_NAMES = [
    "0x" + "aa" * 32,  # shaped like an adapter id: would shadow it in the gateway
    "0xabc",  # any 0x prefix
    "a" * 65,  # too long (and far too long for a database index)
    "x" * 3000,
    "Alice/capitals",  # upper case
    "alice capitals",
    "alice/capitals\n",
    "alice:capitals",
    "ålice/capitals",
    "/alice",  # starts with a separator
    "-alice",
    ".alice",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_adapter_names_are_narrow(anvil_chain, name):
    """Names are 1..64 bytes of [a-z0-9._/-], starting with [a-z0-9], never with "0x"."""
    env = anvil_chain
    c = env.client(env.users[2])
    with pytest.raises(E.InvalidName):
        c.register_adapter(rand_id(), name=name, version="1", base_model=rand_id())
    assert env.client().name_owner(name) is None


@pytest.mark.parametrize("name", BAD_NAMES)
def test_dataset_names_are_narrow(anvil_chain, name):
    """Dataset names follow the rule of adapter names: every gateway mirrors them and the explorer shows them,
    and one that was not UTF-8 stopped both for good before they learnt to skip it."""
    env = anvil_chain
    c = env.client(env.users[2])
    assert registry_name_problem(name) is not None
    with pytest.raises(E.InvalidName):
        c.register_dataset(name, rand_id())
    with pytest.raises(E.UnknownDataset):
        c.get_dataset(c.dataset_id(name))


_GOOD_NODE = dict(peer_id="12D3KooWabc", multiaddrs=["/ip4/1.2.3.4/tcp/1/p2p/12D3KooWabc"], api_url="http://n:1")
BAD_NODE_ADDRESSES = [
    ("peerId", dict(peer_id="12D3 KooW")),
    ("peerId", dict(peer_id="12D3KooW/x")),
    ("peerId", dict(peer_id="é")),
    ("peerId", dict(peer_id="p" * 129)),
    ("apiUrl", dict(api_url="")),
    ("apiUrl", dict(api_url="n:1")),
    ("apiUrl", dict(api_url="ftp://n")),
    ("apiUrl", dict(api_url="javascript:alert(1)")),
    ("apiUrl", dict(api_url="http://n:1/ x")),
    ("apiUrl", dict(api_url="http://n:1\n")),
    ("apiUrl", dict(api_url="http://ñ")),
    ("apiUrl", dict(api_url="http://" + "n" * 250)),
    # a query or fragment cuts off the path a gateway appends (POST /admin?x=/v1/generate); "@" sends credentials
    ("apiUrl", dict(api_url="http://127.0.0.1:8080/admin?x=")),
    ("apiUrl", dict(api_url="http://127.0.0.1:8080/admin#")),
    ("apiUrl", dict(api_url="http://user:pw@127.0.0.1:5432")),
    ("multiaddrs", dict(multiaddrs=["/ip4/1.2.3.4/tcp/1"] * 9)),
    ("multiaddrs", dict(multiaddrs=[""])),
    ("multiaddrs", dict(multiaddrs=["ip4/1.2.3.4/tcp/1"])),
    ("multiaddrs", dict(multiaddrs=["/ip4/1.2.3.4/tcp/1", "/dns/a b/tcp/1"])),
    ("multiaddrs", dict(multiaddrs=["/" + "a" * 256])),
]


@pytest.mark.parametrize("field,bad", BAD_NODE_ADDRESSES)
def test_a_nodes_strings_are_bounded(anvil_chain, field, bad):
    """A node's peer id, API URL and multiaddrs are read by every gateway, node and explorer: bounded in
    length and count, printable ASCII with no space, the URL http(s), at registration and at every update."""
    env = anvil_chain
    op = env.new_account()
    key, _, nid = _key()
    c = env.client(op)
    assert node_address_problem(**{**_GOOD_NODE, **bad}) is not None  # the node's own check agrees
    with pytest.raises(E.InvalidNodeAddress) as ei:
        c.register_node(key, **{**_GOOD_NODE, **bad}, base_model=rand_id())
    assert ei.value.args_by_name["field"] == field
    with pytest.raises(E.UnknownNode):
        c.get_node(nid)
    c.register_node(key, **_GOOD_NODE, base_model=rand_id())
    with pytest.raises(E.InvalidNodeAddress):
        c.update_node(nid, **{**_GOOD_NODE, **bad}, base_model=rand_id())
    assert c.get_node(nid).api_url == _GOOD_NODE["api_url"]


def test_a_nodes_strings_at_their_bounds_pass(anvil_chain):
    env = anvil_chain
    key, _, nid = _key()
    edge = dict(
        peer_id="Z" * 128,
        multiaddrs=["/" + "a" * 255] * 8,
        api_url="https://" + "~" * 248,
    )
    assert node_address_problem(**edge) is None
    env.client(env.new_account()).register_node(key, **edge, base_model=rand_id())
    n = env.client().get_node(nid)
    assert (n.peer_id, list(n.multiaddrs), n.api_url) == (edge["peer_id"], edge["multiaddrs"], edge["api_url"])
    assert node_address_problem("", [], "http://n") is None  # a node without a p2p host


@pytest.mark.parametrize("version", ["", "v" * 33, "1 0", "1/2", "1_0", "é", "1\n"])
def test_adapter_versions_are_narrow(anvil_chain, version):
    env = anvil_chain
    c = env.client(env.users[2])
    with pytest.raises(E.InvalidVersion):
        c.register_adapter(rand_id(), name=_unique("ver"), version=version, base_model=rand_id())


def test_good_names_and_versions_pass(anvil_chain):
    env = anvil_chain
    c = env.client(env.users[2])
    for name, version in (
        (_unique("alice/capitals"), "1.0.0"),
        (_unique("a" * 40), "2"),
        (_unique("x0/y.z_w-v"), "1.0.0-rc.1+Build.7"),
        ("q" * 64, "v" * 32),
    ):
        c.register_adapter(rand_id(), name=name, version=version, base_model=rand_id())
        assert env.client().name_owner(name) == c.address
