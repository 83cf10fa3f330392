"""A small settled world for the explorer's tests: real anvil, real SQLite ledger, real receipts.

Two contributors' datasets, three adapters (one a new version of another), two nodes (one whose
on-chain peer id embeds its node key, one registered with a peer id that does not), usage records
signed by the nodes (one a bare base-model inference, adapter id zero), three settled batches, a fourth
settled by another settler (its record is not in this database), a withdrawal, one rejected and one
pending record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from sqlmodel import Session

from common.identity import Identity
from ledger.db import init_db, make_engine
from ledger.outbox import add_usage_record
from ledger.settler import Settler
from ledger.settler_config import SettlerConfig
from ledger.types import BASE_MODEL_ADAPTER_ID, SettleRecord
from node.adapters.manifest import dataset_id
from node.receipts import make_receipt, sign_receipt
from tests.utils.chain import ChainEnv, rand_id

PRICE = 10**15  # wei per 1k tokens


def peer_id_of(identity: Identity) -> str:
    """The libp2p peer id a node gets from its seed (as node/p2p/host.py builds its host)."""
    return ID.from_pubkey(create_new_key_pair(identity.node_seed).public_key).to_base58()


@dataclass
class World:
    db_url: str
    db_path: Path
    base_model: str
    datasets: dict[str, str]  # name -> id
    adapters: dict[str, str]  # "name version" -> id
    node_keyed: str  # node whose peer id embeds its key
    node_opaque: str  # node registered with a peer id that does not
    settled: list[str] = field(default_factory=list)  # request ids, in outbox order
    by_node: dict[str, list[str]] = field(default_factory=dict)
    pending: str = ""
    chain_only: str = ""  # settled straight on chain by someone else: not in this ledger database
    rejected: str = ""
    base: str = ""  # a bare base-model inference (adapter id zero) on the keyed node, settled in the third batch
    withdrawer: str = ""
    withdrawn: int = 0


def build_world(env: ChainEnv, folder: Path) -> World:
    """Register, serve (receipts), settle and withdraw on `env`; the ledger database goes in `folder`."""
    u = env.users
    alice, bob, op_a, op_b, pay_cap, pay_el = u[0], u[1], u[2], u[3], u[4], u[5]
    base = rand_id()
    ds = {
        "capitals-qa": dataset_id("capitals-qa", pay_cap.address),
        "element-symbols": dataset_id("element-symbols", pay_el.address),
    }
    env.client(pay_cap).register_dataset("capitals-qa", rand_id())
    env.client(pay_el).register_dataset("element-symbols", rand_id())
    ad = {"alice/capitals 1.0.0": rand_id(), "alice/capitals 1.1.0": rand_id(), "bob/elements 1.0.0": rand_id()}
    env.client(alice).register_adapter(
        ad["alice/capitals 1.0.0"],
        name="alice/capitals",
        version="1.0.0",
        base_model=base,
        price_per_1k_tokens=PRICE,
        datasets=[(ds["capitals-qa"], 5000)],
    )
    env.client(alice).register_adapter(
        ad["alice/capitals 1.1.0"],
        name="alice/capitals",
        version="1.1.0",
        base_model=base,
        price_per_1k_tokens=PRICE,
        datasets=[(ds["capitals-qa"], 6000)],
        predecessor=ad["alice/capitals 1.0.0"],
    )
    env.client(bob).register_adapter(
        ad["bob/elements 1.0.0"],
        name="bob/elements",
        version="1.0.0",
        base_model=base,
        price_per_1k_tokens=2 * PRICE,
        datasets=[(ds["element-symbols"], 4000), (ds["capitals-qa"], 1000)],
    )
    keyed, opaque = Identity.generate(), Identity.generate()
    env.client(op_a).register_node(
        keyed.node_key,
        peer_id=peer_id_of(keyed),
        multiaddrs=["/ip4/127.0.0.1/tcp/4101"],
        api_url="http://127.0.0.1:9101",
        base_model=base,
    )
    env.client(op_b).register_node(
        opaque.node_key,
        peer_id="12D3KooWtest",
        multiaddrs=["/ip4/127.0.0.1/tcp/4102"],
        api_url="http://127.0.0.1:9102",
        base_model=base,
    )

    db_path = folder / "ledger.db"
    engine = make_engine(f"sqlite:///{db_path}", immediate=True)
    init_db(engine)
    world = World(
        f"sqlite:///{db_path}",
        db_path,
        base,
        ds,
        ad,
        keyed.node_id,
        opaque.node_id,
        by_node={keyed.node_id: [], opaque.node_id: []},
    )
    plan = [
        ("bob/elements 1.0.0", keyed),
        ("alice/capitals 1.1.0", keyed),
        ("bob/elements 1.0.0", opaque),
        ("alice/capitals 1.0.0", opaque),
        ("bob/elements 1.0.0", keyed),
        ("alice/capitals 1.1.0", opaque),
    ]
    settler = Settler(engine, env.client(env.settler), SettlerConfig(batch_size=3))
    try:
        for i, (adapter, node) in enumerate(plan):
            world.settled.append(_serve(engine, ad[adapter], node, prompt=20 + 7 * i, completion=5 + i))
            world.by_node[node.node_id].append(world.settled[-1])
        world.rejected = _serve(engine, rand_id(), keyed, prompt=3, completion=1)  # adapter unknown on chain
        assert settler.drain() == 6  # two batches of three
        late = _serve(engine, ad["bob/elements 1.0.0"], keyed, prompt=90, completion=30)
        world.settled.append(late)
        world.by_node[keyed.node_id].append(late)
        world.base = _serve(engine, None, keyed, prompt=12, completion=6)
        world.settled.append(world.base)
        world.by_node[keyed.node_id].append(world.base)
        assert settler.drain() == 2  # a third batch, in a later block
        world.pending = _serve(engine, ad["alice/capitals 1.1.0"], keyed, prompt=4, completion=2)
    finally:
        engine.dispose()
    world.chain_only = rand_id()
    other = SettleRecord(world.chain_only, ad["alice/capitals 1.0.0"], opaque.node_id, 8, 8)
    env.client(env.settler).settle_batch(None, None, [other])
    env.client(pay_el).withdraw()
    world.withdrawer = pay_el.address
    world.withdrawn = env.client().rewards_of(pay_el.address).withdrawn
    return world


def _serve(engine, adapter_id: str | None, node: Identity, *, prompt: int, completion: int) -> str:
    """One inference's outbox row with the node's real signed receipt; returns its request id.
    adapter_id None: the bare base model (receipt says null, the outbox row the zero id, as the gateway writes)."""
    rid = rand_id()
    now = int(time.time() * 1000)
    receipt = make_receipt(
        request_id=rid,
        adapter_id=adapter_id,
        node_id=node.node_id,
        prompt_tokens=prompt,
        completion_tokens=completion,
        finish_reason="stop",
        started_at=now - 50,
        finished_at=now,
    )
    with Session(engine) as s:
        add_usage_record(
            s,
            request_id=rid,
            adapter_id=adapter_id or BASE_MODEL_ADAPTER_ID,
            node_id=node.node_id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            receipt_json=receipt,
            node_signature=sign_receipt(receipt, node.node_key),
        )
        s.commit()
    return rid
