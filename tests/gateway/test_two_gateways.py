"""Past one machine: two gateways and four nodes on one PostgreSQL database and one anvil, all real processes
(`python -m devnet ...`), driven through the official openai client.

The nodes are told of the first gateway only (--gateway). The second starts last, when the four are already
serving: it finds them on chain and says hello (gateway.greeter, node.gateway_hello), so it serves every
adapter with no node restarted; and an API key's rate limit, kept in the shared database, holds across both.
Strangers' hellos to the same node processes are refused.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from eth_account import Account

import gateway.tables  # noqa: F401 - registers the gateway's tables with init_db
from common.identity import create_identity
from devnet.anvil import free_port
from devnet.processes import ManagedProcess, ProcessGroup
from gateway.keys import create_key
from ledger.db import init_db, make_engine
from node.gateway_hello import HELLO_PATH, make_hello
from node.publish import publish, upload_to_node
from tests.utils.factories import make_package
from tests.utils.postgres import postgres  # noqa: F401 - the module's PostgreSQL cluster

pytestmark = pytest.mark.integration

PASSWORD = "two-gateways"
ETHER = 10**18
NAMES = ("acme/capitals", "acme/elements", "acme/poems", "acme/sums")
ENV = {"LORAMESH_KEY_PASSWORD": PASSWORD, "LORAMESH_GATEWAY_SETTLE_INTERVAL_S": "1"}
RPM = 3  # the limited key's requests a minute, across both gateways


@dataclass
class Net:
    gw1: str
    gw2: str
    key: str
    limited: str
    nodes: list[tuple[str, str]]  # (node id, url)
    gw2_found_all_s: float  # from the second gateway's first /health answer to four live nodes there
    settler_key: Path


def start_gateway(group: ProcessGroup, root: Path, name: str, chain, db_url: str, settler_key: Path, *extra: str):
    """`loramesh gateway run` as a process; (url, process)."""
    port = free_port()
    args = ["gateway", "run", "--deployment", str(chain.deployment_path), "--db", db_url, "--port", str(port)]
    args += ["--key", str(settler_key), "--base", str(root / "base"), *extra]
    return f"http://127.0.0.1:{port}", group.start(ManagedProcess(name, args, root / f"{name}.log", env=ENV))


def node(group: ProcessGroup, i: int, root: Path, chain, gw_url: str) -> tuple[str, str, ManagedProcess]:
    key = root / f"node{i}.key"
    identity = create_identity(key, PASSWORD)
    chain.client(chain.admin).fund([identity.address], ETHER)
    port = free_port()
    args = ["node", "run", "--base", str(root / "base"), "--store", str(root / f"store{i}"), "--port", str(port)]
    args += ["--key", str(key), "--deployment", str(chain.deployment_path), "--gateway", gw_url]
    args += ["--slots", "2", "--threads", "1", "--kv-blocks", "32"]
    proc = group.start(ManagedProcess(f"node{i}", args, root / f"node{i}.log", env=ENV))
    return identity.node_id, f"http://127.0.0.1:{port}", proc


def live_nodes(url: str) -> int:
    return httpx.get(url + "/health", timeout=5).json()["live_nodes"]


@pytest.fixture(scope="module")
def net(anvil_chain, tiny_base, postgres, tmp_path_factory):  # noqa: F811
    chain = anvil_chain
    root = tmp_path_factory.mktemp("two-gateways")
    (root / "base").symlink_to(tiny_base)
    db_url = postgres.new_database("two_gateways")
    db = make_engine(db_url)
    init_db(db)  # the gateway's tables included (gateway.tables is imported above)
    key, _ = create_key(db, name="app")
    limited, _ = create_key(db, name="limited", rpm=RPM)
    db.dispose()
    settler_key = root / "settler.key"
    settler_key.write_text(chain.settler.key.hex())
    packages = [
        make_package(tiny_base, root / f"pkg{i}", account=chain.users[0], name=name, seed=20 + i)
        for i, name in enumerate(NAMES)
    ]
    group = ProcessGroup()
    try:
        gw1, gw1_proc = start_gateway(group, root, "gateway1", chain, db_url, settler_key)
        nodes = [node(group, i, root, chain, gw1) for i in range(4)]
        gw1_proc.wait_http(gw1 + "/health")
        for _, url, proc in nodes:
            proc.wait_http(url + "/health")
        for pkg in packages:  # every node holds every adapter: any two of them may be an adapter's owners
            publish(pkg.path, chain.client(chain.users[0]), node_url=nodes[0][1])
            for _, url, _ in nodes[1:]:
                upload_to_node(pkg, url)

        def gw1_ready() -> bool:
            listed = httpx.get(gw1 + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=5).json()
            return live_nodes(gw1) == 4 and set(NAMES) <= {m["id"] for m in listed.get("data", [])}

        gw1_proc.wait_until(gw1_ready, timeout=90, what="four nodes live on the first gateway")
        # the second gateway starts last; no node names it
        gw2, gw2_proc = start_gateway(group, root, "gateway2", chain, db_url, settler_key, "--no-settle")
        gw2_proc.wait_http(gw2 + "/health")
        started = time.monotonic()
        gw2_proc.wait_until(lambda: live_nodes(gw2) == 4, timeout=30, what="four nodes live on the second gateway")
        found = time.monotonic() - started
        yield Net(gw1, gw2, key, limited, [(n, u) for n, u, _ in nodes], found, settler_key)
    finally:
        group.stop_all()


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_a_gateway_started_last_finds_every_node_within_a_heartbeat_period(net):
    # the nodes heartbeat every 2 s; the hello round runs when the gateway starts, so it needs no full period
    assert net.gw2_found_all_s < 2.0, f"took {net.gw2_found_all_s:.1f} s"


def test_a_gateway_started_last_serves_every_adapter(net):
    for name in NAMES:
        # sampled: ignore_eos keeps an EOS drawn first (a few in a thousand on the tiny base) from ending it at 1
        r = client(net.gw2, net.key).completions.create(
            model=name, prompt="The capital of", max_tokens=2, extra_body={"ignore_eos": True}
        )
        assert r.usage.completion_tokens == 2 and r.model == name


def test_the_nodes_heartbeat_to_the_gateway_that_said_hello(net):
    """After the hello, the nodes push heartbeats to the second gateway as to the first: it keeps them live
    past its heartbeat ttl (10 s) with no more hellos needed."""

    def accepted() -> float:
        text = httpx.get(net.gw2 + "/metrics", timeout=5).text
        lines = [ln for ln in text.splitlines() if ln.startswith('loramesh_gateway_heartbeats_total{result="accepted"')]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = accepted()
    deadline = time.monotonic() + 15
    while accepted() < before + 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert accepted() >= before + 4
    assert live_nodes(net.gw2) == 4


def test_a_keys_rate_limit_holds_across_both_gateways(net):
    ask = dict(model=NAMES[0], prompt="x", max_tokens=1)
    served = 0
    for url in (net.gw1, net.gw2, net.gw1):
        client(url, net.limited).completions.create(**ask)
        served += 1
    assert served == RPM
    for url in (net.gw2, net.gw1):
        with pytest.raises(openai.RateLimitError):
            client(url, net.limited).completions.create(**ask)


def test_a_hello_signed_by_an_account_that_is_no_settler_is_refused(net):
    node_id, url = net.nodes[0]
    doc = make_hello(Account.create(), gateway_url="http://127.0.0.1:9", gateway_key="ab" * 32, node_id=node_id)
    r = httpx.post(url + HELLO_PATH, json=doc, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_settler"


def test_a_settlers_hello_captured_for_one_node_does_not_work_at_another(net):
    (node_a, _), (_, url_b) = net.nodes[0], net.nodes[1]
    settler = Account.from_key(net.settler_key.read_text())
    doc = make_hello(settler, gateway_url="http://127.0.0.1:9", gateway_key="ab" * 32, node_id=node_a)
    r = httpx.post(url_b + HELLO_PATH, json=doc, timeout=10)
    assert r.status_code == 400 and "meant for node" in r.json()["error"]["message"]


def test_a_hello_that_is_not_json_is_a_400(net):
    _, url = net.nodes[2]
    for body in (b"{", b"[]", b'{"body": 1}', b"x" * 10_000):
        r = httpx.post(url + HELLO_PATH, content=body, headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code in (400, 413), (body[:20], r.status_code)
        assert "error" in r.json()


def test_a_flood_of_hellos_from_fresh_accounts_does_not_keep_a_new_settlers_gateway_out(net, anvil_chain):
    """The attack (the control-plane red team): each hello from an account the node did not know was a question
    to the chain, at most one a 0.2 s, so hellos signed by throw-away accounts used that up and a settler granted
    since got 503 "try again" for as long as they came. The node now keeps the settlers from the ledger's role
    events: every hello waits for the next read of them, and one read answers them all."""
    node_id, url = net.nodes[3]
    newcomer = Account.create()
    admin = anvil_chain.client(anvil_chain.admin)
    admin.grant_settler(newcomer.address)
    dead = f"http://127.0.0.1:{free_port()}"

    def doc(account) -> dict:
        return make_hello(account, gateway_url=dead, gateway_key="ab" * 32, node_id=node_id)

    strangers = [doc(Account.create()) for _ in range(60)]

    async def flood():
        async with httpx.AsyncClient(timeout=20) as c:
            first = [asyncio.create_task(c.post(url + HELLO_PATH, json=d)) for d in strangers[:30]]
            await asyncio.sleep(0.05)
            ours = asyncio.create_task(c.post(url + HELLO_PATH, json=doc(newcomer)))
            rest = [c.post(url + HELLO_PATH, json=d) for d in strangers[30:]]
            return await ours, await asyncio.gather(*first, *rest)

    try:
        ours, theirs = asyncio.run(flood())
    finally:
        admin.revoke_settler(newcomer.address)
    assert ours.status_code == 200, ours.text
    assert ours.json()["body"]["node_id"] == node_id  # the node's signed heartbeat
    assert {r.status_code for r in theirs} == {403}
    assert {r.json()["error"]["code"] for r in theirs} == {"not_settler"}


def test_a_heartbeat_relayed_to_another_gateway_is_refused(net):
    """The attack (the control-plane red team): whoever receives a node's heartbeats, a settler's gateway that
    said hello, posts them to a gateway the node does not trust, which then routes requests to a node that
    refuses them. A node's heartbeat now names the gateway it is for."""
    node_id, url = net.nodes[1]
    settler = Account.from_key(net.settler_key.read_text())
    mine = "cd" * 32  # the relaying gateway's key
    hello = make_hello(settler, gateway_url=f"http://127.0.0.1:{free_port()}", gateway_key=mine, node_id=node_id)
    answer = httpx.post(url + HELLO_PATH, json=hello, timeout=10)
    assert answer.status_code == 200 and answer.json()["body"]["gateway_key"] == mine
    relayed = httpx.post(net.gw2 + "/internal/heartbeat", json=answer.json(), timeout=10)
    assert relayed.status_code == 403, relayed.text
    assert relayed.json()["error"]["code"] == "heartbeat_for_another_gateway"
