"""The registry attacks found on the demo network, run for real against anvil (and a real node and CLI
process), each shown to fail: a stranger with a funded identity squats an adapter name, a contributor's
dataset, a node's id."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from sqlmodel import SQLModel

from common.identity import create_identity
from devnet.anvil import free_port
from devnet.processes import ManagedProcess
from gateway.chain_registry import RegistryView
from ledger import errors as E
from ledger.db import init_db, make_engine
from ledger.types import AdapterRegistration
from node.adapters import make_dataset_share, pack_adapter
from node.publish import PublishError, publish
from tests.utils.chain import rand_id
from tests.utils.factories import make_peft_adapter

pytestmark = pytest.mark.integration
PASSWORD = "pw"
ETHER = 10**18


@pytest.fixture(scope="module")
def peft(tiny_base, tmp_path_factory):
    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("peft") / "a", rank=2)


def _cli(*args: str) -> subprocess.CompletedProcess:
    # a wide terminal: Rich boxes a usage error and wraps it at the terminal's width
    env = {**os.environ, "LORAMESH_KEY_PASSWORD": PASSWORD, "COLUMNS": "200"}
    env.pop("LORAMESH_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "devnet", *args], capture_output=True, text=True, env=env, timeout=180)


def test_a_stranger_cannot_take_over_an_adapter_name(anvil_chain, tiny_base, peft, tmp_path):
    """Mallory, funded, registers `alice/geo` v2 (other weights, 1,000x the price): the registry refuses,
    and the gateway keeps resolving the name to alice's newest version."""
    env = anvil_chain
    alice, mallory, carol = env.new_account(ETHER), env.new_account(ETHER), env.new_account(ETHER)
    v1 = pack_adapter(peft, tmp_path / "v1", name="alice/geo", account=alice, base_dir=tiny_base, price_per_1k_tokens=5)
    publish(v1.path, env.client(alice))
    v2 = pack_adapter(
        peft,
        tmp_path / "v2",
        name="alice/geo",
        account=alice,
        base_dir=tiny_base,
        price_per_1k_tokens=6,
        version="2",
        predecessor=v1.adapter_id,
    )
    publish(v2.path, env.client(alice))

    other = make_peft_adapter(tiny_base, tmp_path / "other-weights", rank=2, seed=7)
    squat = pack_adapter(
        other,
        tmp_path / "squat",
        name="alice/geo",
        account=mallory,
        base_dir=tiny_base,
        price_per_1k_tokens=6000,
        version="3",
        predecessor=v2.adapter_id,
    )
    with pytest.raises(PublishError, match=f"name 'alice/geo' belongs to {alice.address}"):
        publish(squat.path, env.client(mallory))
    reg = squat.manifest.registration()  # straight at the contract, skipping publish's checks
    with pytest.raises(E.NotNameOwner):
        env.client(mallory).register_adapter(reg)
    with pytest.raises(E.NotNameOwner):  # as a "first version" too
        env.client(mallory).register_adapter(
            AdapterRegistration.of(
                rand_id(), name="alice/geo", version="1", base_model=reg.base_model, price_per_1k_tokens=6000
            )
        )
    with pytest.raises(E.NotNameOwner):
        env.client(mallory).transfer_name("alice/geo", mallory.address)

    engine = make_engine(f"sqlite:///{tmp_path}/gw.db")
    init_db(engine)
    SQLModel.metadata.create_all(engine)
    view = RegistryView(engine, env.client())
    assert view.sync()
    assert view.adapter_by_name("alice/geo").adapter_id == v2.adapter_id
    assert view.name_owners["alice/geo"] == alice.address

    # the owner may hand the name on: then only the new owner's versions resolve
    env.client(alice).transfer_name("alice/geo", carol.address)
    view.sync()
    assert view.adapter_by_name("alice/geo") is None  # alice's versions are no longer the name's
    v3 = pack_adapter(
        peft,
        tmp_path / "v3",
        name="alice/geo",
        account=carol,
        base_dir=tiny_base,
        version="3",
        predecessor=v2.adapter_id,
    )
    publish(v3.path, env.client(carol))
    view.sync()
    assert view.adapter_by_name("alice/geo").adapter_id == v3.adapter_id
    engine.dispose()


def test_a_stranger_cannot_take_a_datasets_share(anvil_chain, tiny_base, peft, tmp_path):
    """A stranger registers the dataset's name first, as her own payee: the contributor's dataset (its id
    bound to the contributor) is untouched and pays the contributor, or whoever the contributor moved its
    payouts to."""
    env = anvil_chain
    contributor = create_identity(tmp_path / "contributor.json", PASSWORD)
    stranger_id = create_identity(tmp_path / "stranger.json", PASSWORD)
    stranger = stranger_id.account
    env.client(env.admin).fund([contributor.address, stranger.address], ETHER)
    d = str(env.deployment_path)
    r = _cli("adapter", "register-dataset", "geo-facts", "--key", str(tmp_path / "stranger.json"), "--deployment", d)
    assert r.returncode == 0, r.stderr  # first come: but it is her own dataset, not the contributor's
    bad = _cli("adapter", "register-dataset", "Geo Facts", "--key", str(tmp_path / "stranger.json"), "--deployment", d)
    assert bad.returncode == 2 and "the registry refuses it" in bad.stderr  # refused before any transaction
    share = make_dataset_share("geo-facts", contributor.address, 4000)
    theirs = env.client().dataset_id("geo-facts", stranger.address)
    assert theirs in r.stdout and share.id != theirs
    pkg = pack_adapter(
        peft,
        tmp_path / "p",
        name="contrib/geo",
        account=contributor.account,
        base_dir=tiny_base,
        datasets=[share],
        price_per_1k_tokens=10,
    )
    r = _cli("adapter", "publish", str(pkg.path), "--key", str(tmp_path / "contributor.json"), "--deployment", d)
    assert r.returncode == 0, r.stderr
    assert env.client().get_dataset(share.id).payee == contributor.address  # the stranger was first, in vain
    split = env.client().registry.functions.adapterSplit(bytes.fromhex(pkg.adapter_id[2:])).call()
    assert split[3] == [contributor.address]  # settlement pays the contributor

    # the contributor moved its payouts elsewhere (its right): a publisher listing the contributor still
    # publishes, and settlement pays the payee the contributor chose
    heir = env.new_account()
    env.client(contributor.account).set_dataset_payee(share.id, heir.address)
    publisher = create_identity(tmp_path / "publisher.json", PASSWORD)
    env.client(env.admin).fund([publisher.address], ETHER)
    pkg2 = pack_adapter(
        peft, tmp_path / "p2", name="pub/geo", account=publisher.account, base_dir=tiny_base, datasets=[share]
    )
    r = _cli("adapter", "publish", str(pkg2.path), "--key", str(tmp_path / "publisher.json"), "--deployment", d)
    assert r.returncode == 0, r.stderr
    split = env.client().registry.functions.adapterSplit(bytes.fromhex(pkg2.adapter_id[2:])).call()
    assert split[3] == [heir.address]


def test_a_stranger_cannot_block_a_node(anvil_chain, tiny_base, tmp_path):
    """A stranger registers the real node's id first: without the node key's proof (none, forged, or
    the real node's replayed from her address) the registry refuses; the real node then starts and
    registers itself."""
    env = anvil_chain
    key_file = tmp_path / "operator.json"
    real = create_identity(key_file, PASSWORD)
    env.client(env.admin).fund([real.address], ETHER)
    stranger = env.new_account(ETHER)
    s = env.client(stranger)
    public = real.node_public_key
    kw = dict(
        peer_id="12D3KooWevil", multiaddrs=["/ip4/6.6.6.6/tcp/1"], api_url="http://6.6.6.6:1", base_model=rand_id()
    )
    message = s.node_proof_message(real.node_id)
    attempts = {
        "no proof": bytes(64),
        "forged": create_identity(tmp_path / "hers.json", PASSWORD).node_key.sign(message),
        "replayed": real.node_key.sign(env.client(real.account).node_proof_message(real.node_id)),  # its own proof
    }
    for _what, signature in attempts.items():
        with pytest.raises(E.InvalidNodeProof):
            s.register_node_with_proof(real.node_id, public, signature, **kw)
    with pytest.raises(E.UnknownNode):
        env.client().get_node(real.node_id)

    port = free_port()
    proc = ManagedProcess(
        "node",
        [
            "node",
            "run",
            "--base",
            str(tiny_base),
            "--store",
            str(tmp_path / "store"),
            "--port",
            str(port),
            "--key",
            str(key_file),
            "--deployment",
            str(env.deployment_path),
            "--slots",
            "1",
            "--threads",
            "1",
        ],
        tmp_path / "node.log",
        env={"LORAMESH_KEY_PASSWORD": PASSWORD},
    )
    try:
        proc.start()
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        assert httpx.get(f"http://127.0.0.1:{port}/status", timeout=10).json()["node_id"] == real.node_id
        info = env.client().get_node(real.node_id)
        assert (info.operator, info.active, info.api_url) == (real.address, True, f"http://127.0.0.1:{port}")
        assert info.public_key == "0x" + public.hex()
    finally:
        proc.stop()


def test_a_former_operator_cannot_take_a_moved_node_back(anvil_chain, tmp_path):
    """H1: the node moved from A to B; A's original registration proof is public (in A's transaction) but
    names nonce 0, and the registry is past it. The node itself (ensure_registered) reads the current
    nonce, so the key holder moves it whenever it wants."""
    from node.registration import ensure_registered

    env = anvil_chain
    ident = create_identity(tmp_path / "node.json", PASSWORD)
    a, b = env.new_account(ETHER), env.new_account(ETHER)
    kw = dict(peer_id="12D3KooWnode", multiaddrs=[], api_url="http://a:1", base_model=rand_id())
    old_proof = ident.node_key.sign(env.client(a).node_proof_message(ident.node_id))
    assert ensure_registered(env.client(a), ident.node_key, **kw) == "registered"
    assert ensure_registered(env.client(b), ident.node_key, **{**kw, "api_url": "http://b:1"}) == "moved"
    with pytest.raises(E.InvalidNodeProof):
        env.client(a).register_node_with_proof(
            ident.node_id, ident.node_public_key, old_proof, **{**kw, "api_url": "http://evil:1"}
        )
    info = env.client().get_node(ident.node_id)
    assert (info.operator, info.active, info.api_url) == (b.address, True, "http://b:1")
    assert ensure_registered(env.client(a), ident.node_key, **kw) == "moved"  # the key holder's choice
    assert env.client().get_node(ident.node_id).operator == a.address


def test_a_node_registers_its_first_eight_addresses_and_refuses_what_the_registry_would(anvil_chain, tmp_path):
    """A host listening on many interfaces registers the registry's limit of multiaddrs, not a revert; an API
    URL the registry refuses is refused in one line before any transaction."""
    from node.daemon import DaemonConfig
    from node.registration import RegistrationError, ensure_registered

    env = anvil_chain
    ident = create_identity(tmp_path / "node.json", PASSWORD)
    op = env.new_account(ETHER)
    addrs = [f"/ip4/10.0.0.{i}/tcp/4001" for i in range(12)]
    kw = dict(peer_id="12D3KooWnode", multiaddrs=addrs, api_url="http://a:1", base_model=rand_id())
    with pytest.raises(RegistrationError, match="API URL 'http://a b:1'"):
        ensure_registered(env.client(op), ident.node_key, **{**kw, "api_url": "http://a b:1"})
    with pytest.raises(E.UnknownNode):
        env.client().get_node(ident.node_id)
    assert ensure_registered(env.client(op), ident.node_key, **kw) == "registered"
    assert list(env.client().get_node(ident.node_id).multiaddrs) == addrs[:8]
    assert ensure_registered(env.client(op), ident.node_key, **kw) == "unchanged"
    with pytest.raises(ValueError, match="node registry refuses it"):
        DaemonConfig(base=tmp_path, store=tmp_path, api_url="node.example:8101")


def test_a_starting_node_reads_the_registry_in_one_pass_and_dials_its_nodes_in_a_random_order(anvil_chain, monkeypatch):
    """Registering a node costs only gas. Every start read each registered node with its own call: thousands of
    registrations made every start wait. Now the registry's node events are read in one pass (no call per node),
    folded as the registry keeps them (inactive and other-base nodes left out, an update taking effect), and the
    live nodes come in a random order, so no run of registrations placed together holds the live ones back."""
    import random

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.wire import node_id_of
    from node.registration import registry_peers

    env = anvil_chain
    base, other_base = rand_id(), rand_id()
    client = env.client(env.users[1])
    url = "http://10.0.0.1:8000"
    live = []
    for i in range(12):
        key = Ed25519PrivateKey.generate()
        node_id = node_id_of(key.public_key().public_bytes_raw())
        addrs = [f"/ip4/10.0.{i}.{k}/tcp/4001" for k in range(8)]
        on = other_base if i == 9 else base  # 9: another base model
        client.register_node(key, peer_id=f"12D3KooWsquat{i}", multiaddrs=addrs, api_url=url, base_model=on)
        if i == 10:  # inactive
            client.set_node_active(node_id, False)
        elif i == 11:  # moved to another peer id and address: the update is what counts
            moved = ["/ip4/10.9.9.9/tcp/1"]
            client.update_node(node_id, peer_id="12D3KooWmoved", multiaddrs=moved, api_url=url, base_model=base)
            live.append("12D3KooWmoved")
        elif i != 9:
            live.append(f"12D3KooWsquat{i}")
    monkeypatch.setattr(type(client), "get_node", lambda *a, **k: pytest.fail("one call per registered node"))
    reader = env.client()
    peers, addrs = registry_peers(reader, base_model=base, exclude_node=rand_id(), rng=random.Random(7))
    assert peers == set(live) and len(addrs) == 9 * 8 + 1 and "/ip4/10.9.9.9/tcp/1" in addrs
    assert not any(a.startswith(("/ip4/10.0.9.", "/ip4/10.0.10.", "/ip4/10.0.11.")) for a in addrs)
    # node by node (a node's addresses together), the nodes in another order than the registry's
    firsts = [a for a in addrs if a.endswith(".0/tcp/4001")]
    assert firsts != sorted(firsts, key=lambda a: int(a.split(".")[2]))
    orders = {tuple(registry_peers(reader, base_model=base, exclude_node=rand_id())[1]) for _ in range(5)}
    assert len(orders) > 1


def test_a_node_registered_later_gets_its_standing_without_a_restart(anvil_chain):
    """registered_peers was read once, at start: a node registered afterwards stayed a stranger to this one, its
    announcements ranked with made-up ones (at most max_unknown_attempts of a fetch). The daemon reads the
    registry again every REGISTRY_PEERS_S; the set is changed in place, since the mesh holds its __contains__."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.wire import node_id_of
    from node.registration import refresh_registry_peers

    env = anvil_chain
    base, me = rand_id(), rand_id()
    client = env.client(env.users[2])
    url = "http://10.0.0.2:8000"

    def register(peer_id: str, addr: str) -> str:
        key = Ed25519PrivateKey.generate()
        client.register_node(key, peer_id=peer_id, multiaddrs=[addr], api_url=url, base_model=base)
        return node_id_of(key.public_key().public_bytes_raw())

    first = register("12D3KooWfirst", "/ip4/10.1.0.1/tcp/4001")
    peers: set[str] = set()
    held = peers.__contains__
    reader = env.client()
    assert refresh_registry_peers(reader, peers, base_model=base, exclude_node=me) == ["/ip4/10.1.0.1/tcp/4001"]
    register("12D3KooWlater", "/ip4/10.1.0.2/tcp/4001")
    client.set_node_active(first, False)
    joined = refresh_registry_peers(reader, peers, base_model=base, exclude_node=me)
    assert joined == ["/ip4/10.1.0.2/tcp/4001"] and peers == {"12D3KooWlater"}
    assert held("12D3KooWlater") and not held("12D3KooWfirst")
    assert refresh_registry_peers(reader, peers, base_model=base, exclude_node=me) == []  # nothing new to dial
