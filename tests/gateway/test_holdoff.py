"""Which failures keep a node out of routing, and for how long (gateway/directory.py): a real gateway in front of
two stand-in nodes. A node that fails what the other then serves is routed around until its next heartbeat; only
a failure of its own (down, a 5xx other than busy, a broken stream) is a strike that holds it off longer each time.
Busy, lacking the adapter, an engine error and a first event slower than node_timeout_s are no strikes: an honest
node answers so too (one fetching a cold adapter is silent until it is ready), and a client who can make it so
must not keep it out of routing."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from common.identity import Identity
from gateway.directory import NodeEntry
from gateway.keys import create_key
from gateway.main import create_app
from gateway.router import rank_nodes
from gateway.settings import GatewaySettings
from node.adapters.basemodel import base_model_id
from node.heartbeat import HeartbeatSender
from tests.utils.gateway import StandInNode, add_adapter, add_node, make_db
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration

ALPHA = "0x" + "a1" * 32


class Pair:
    """Two stand-ins registered for the tiny base, `first` the adapter's first owner, behind one gateway."""

    def __init__(self, tmp, base_dir) -> None:
        from transformers import AutoTokenizer

        base = base_model_id(base_dir)
        tok = AutoTokenizer.from_pretrained(str(base_dir))
        self.engine = make_db(tmp / "gw.db")
        self.nodes = [StandInNode(Identity.generate(), base, tokenizer=tok) for _ in range(2)]
        self.servers = [ServerThread(n.app()).start() for n in self.nodes]
        for n, srv in zip(self.nodes, self.servers):
            add_node(self.engine, node_id=n.identity.node_id, base_model=base, api_url=srv.url)
        add_adapter(self.engine, adapter_id=ALPHA, name="acme/alpha", base_model=base, block=10)
        entries = [NodeEntry(n.identity.node_id, "", base, b"", {}, 1, 0.0) for n in self.nodes]
        first = rank_nodes(ALPHA, entries)[0].node_id
        self.first, self.other = sorted(self.nodes, key=lambda n: n.identity.node_id != first)
        self.key, _ = create_key(self.engine, name="app")
        settings = GatewaySettings(
            db_url=f"sqlite:///{tmp / 'gw.db'}",
            heartbeat_ttl_s=60,
            node_timeout_s=1.5,
            node_holdoff_max_s=30,
            bases=[base_dir],
        )
        self.app = create_app(settings)
        self.gw = ServerThread(self.app).start()
        self.base = base

    def beat(self) -> None:
        async def go():
            for n, srv in zip(self.nodes, self.servers):
                sender = HeartbeatSender(
                    n.identity, [self.gw.url], api_url=srv.url, base_model_id=self.base, status_fn=n.status
                )
                assert await sender.send_once() == {self.gw.url: 200}

        asyncio.run(go())

    def ask(self) -> str:
        """The node that served one request."""
        client = openai.OpenAI(base_url=self.gw.url + "/v1", api_key=self.key, max_retries=0, timeout=20)
        raw = client.completions.with_raw_response.create(model="acme/alpha", prompt="x", max_tokens=1)
        return raw.headers["x-loramesh-node"]

    @property
    def local(self):
        return self.app.state.gateway.directory.get(self.first.identity.node_id).local

    def stop(self) -> None:
        self.gw.stop()
        for s in self.servers:
            s.stop()
        self.engine.dispose()


@pytest.fixture
def pair(tmp_path, tiny_base):
    p = Pair(tmp_path, tiny_base)
    try:
        p.beat()
        yield p
    finally:
        p.stop()


@pytest.mark.parametrize("how", ["busy", "lacks the adapter", "engine error", "slow first event"])
def test_failures_an_honest_node_has_are_routed_around_until_its_heartbeat_and_never_held_off(pair, how):
    first, other = pair.first, pair.other
    if how == "busy":
        first.answer_status = 503
    elif how == "lacks the adapter":
        first.answer_status = 404
    elif how == "engine error":
        first.engine_error = True
    else:
        first.first_event_after = 2.0  # past node_timeout_s
    for _ in range(4):
        asked = len(first.requests)
        assert pair.ask() == other.identity.node_id
        assert len(first.requests) == asked + 1
        assert pair.ask() == other.identity.node_id and len(first.requests) == asked + 1  # routed around
        pair.beat()  # and back at its heartbeat, each time: never a strike
    assert pair.local.strikes == 0 and pair.local.held_until < time.monotonic()


def test_a_node_answering_500_while_the_other_serves_is_held_off_and_serving_takes_strikes_back(pair):
    first, other = pair.first, pair.other
    first.fail_early = True
    assert pair.ask() == other.identity.node_id  # strike 1: out until its next heartbeat
    pair.beat()
    assert pair.ask() == other.identity.node_id  # strike 2: held off 5 s past its heartbeats
    pair.beat()
    asked = len(first.requests)
    assert pair.ask() == other.identity.node_id and len(first.requests) == asked
    assert pair.local.strikes == 2 and pair.local.held_until > time.monotonic() + 4
    first.fail_early = False
    pair.local.held_until = time.monotonic()  # its hold-off run out (not waited for here)
    pair.beat()
    assert pair.ask() == first.identity.node_id and pair.local.strikes == 1  # one back for one served whole
