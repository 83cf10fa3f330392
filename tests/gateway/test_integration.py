"""The whole path with real processes: anvil with the contracts, two real nodes (tiny base, three adapters),
the gateway (`python -m gateway.cli run`), driven through the official openai client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from sqlmodel import Session, select

from devnet.anvil import free_port
from gateway.keys import create_key
from gateway.models import CompletionRecord
from ledger.models import UsageRecord
from node.adapters import AdapterStore
from node.basemodel import base_model_id, base_model_name
from node.heartbeat import HeartbeatSender
from node.keys import create_identity
from node.receipts import check_receipt
from tests.utils.factories import make_package
from tests.utils.gateway import make_db, poll

pytestmark = pytest.mark.integration

PASSWORD = "integration"
ADAPTER_NAMES = ("acme/capitals", "acme/elements", "acme/poems")


def _spawn(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class Beats:
    """Heartbeats of the nodes, sent from a thread here until the node daemon sends its own (each node's
    real /status, signed with its real key)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.senders: dict[str, HeartbeatSender] = {}

    def add(self, identity, api_url: str, base_id: str, gateway_url: str) -> None:
        async def status():
            async with httpx.AsyncClient(timeout=2) as c:
                return (await c.get(api_url + "/status")).json()

        async def start():
            s = HeartbeatSender(identity, [gateway_url], api_url=api_url, base_model_id=base_id, status_fn=status,
                                interval=0.5)  # fmt: skip
            self.senders[identity.node_id] = s.start()

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def remove(self, node_id: str) -> None:
        asyncio.run_coroutine_threadsafe(self.senders.pop(node_id).stop(), self.loop).result(10)

    def close(self) -> None:
        for nid in list(self.senders):
            self.remove(nid)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def net(anvil_chain, tiny_base, tmp_path_factory):
    env_chain = anvil_chain
    root = tmp_path_factory.mktemp("net")
    publisher = env_chain.users[0]
    operator = env_chain.users[1]
    base_id = base_model_id(tiny_base)
    adapters = {}
    for i, name in enumerate(ADAPTER_NAMES):
        pkg = make_package(tiny_base, root / f"pkg{i}", account=publisher, name=name, seed=10 + i)
        m = pkg.manifest
        env_chain.client(publisher).register_adapter(pkg.adapter_id, name=m.name, version=m.version,
                                                     base_model=base_id, price_per_1k_tokens=m.price_per_1k_tokens)
        adapters[name] = pkg
    env = dict(os.environ, LORAMESH_KEY_PASSWORD=PASSWORD, PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []
    beats = Beats()
    try:
        gw_port = free_port()
        gw_url = f"http://127.0.0.1:{gw_port}"
        nodes = []
        for i in range(2):
            ident = create_identity(root / f"node{i}.key", PASSWORD)
            store = AdapterStore(root / f"store{i}")
            for pkg in adapters.values():
                store.install(pkg.path)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env_chain.client(operator).register_node(ident.node_id, peer_id=f"peer{i}", multiaddrs=[], api_url=url,
                                                     base_model=base_id)  # fmt: skip
            log = root / f"node{i}.log"
            proc = _spawn(["-c", "from node.node_cli import node_app; node_app()", "run", "--base", str(tiny_base),
                           "--store", str(root / f"store{i}"),
                           "--port", str(port), "--key", str(root / f"node{i}.key"), "--slots", "4",
                           "--threads", "1", "--kv-blocks", "64"], log, env)  # fmt: skip
            procs.append(proc)
            nodes.append({"identity": ident, "url": url, "proc": proc, "log": log})
        db = root / "gateway.db"
        engine = make_db(db)
        key, _ = create_key(engine, name="app")
        limited, _ = create_key(engine, name="slow", rpm=1)
        settler_key = root / "settler.key"
        settler_key.write_text(env_chain.settler.key.hex())
        glog = root / "gateway.log"
        gw = _spawn(["-m", "gateway.cli", "run", "--deployment", str(env_chain.deployment_path), "--db",
                     f"sqlite:///{db}", "--port", str(gw_port), "--key", str(settler_key), "--base", str(tiny_base)],
                    glog, env | {"LORAMESH_GATEWAY_HEARTBEAT_TTL_S": "3", "LORAMESH_GATEWAY_SETTLE_INTERVAL_S": "1"})
        procs.append(gw)
        _wait_http(gw_url + "/health", gw, glog)
        for n in nodes:
            _wait_http(n["url"] + "/health", n["proc"], n["log"])
            beats.add(n["identity"], n["url"], base_id, gw_url)
        poll(lambda: httpx.get(gw_url + "/health").json()["live_nodes"] == 2, timeout=20)
        yield {"gw": gw_url, "gw_log": glog, "key": key, "limited": limited, "nodes": nodes, "beats": beats,
               "engine": engine, "adapters": adapters, "base_name": base_model_name(tiny_base)}
    finally:
        beats.close()
        for p in procs:
            _stop(p)


def client(net, key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=net["gw"] + "/v1", api_key=key or net["key"], max_retries=0, timeout=60)


def test_list_models(net):
    ids = [m.id for m in client(net).models.list()]
    assert ids == [*ADAPTER_NAMES, net["base_name"]]


def test_completion(net):
    r = client(net).completions.create(model="acme/capitals", prompt="The capital of France is", max_tokens=6,
                                       temperature=0)  # fmt: skip
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0 and r.choices[0].finish_reason == "length"
    again = client(net).completions.create(model="acme/capitals", prompt="The capital of France is", max_tokens=6,
                                           temperature=0)  # fmt: skip
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_chat(net):
    r = client(net).chat.completions.create(model="acme/elements", max_tokens=5, temperature=0, seed=1,
                                            messages=[{"role": "user", "content": "hello"}])  # fmt: skip
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 5


def test_stream_usage_matches_tokens_streamed(net):
    chunks = list(client(net).chat.completions.create(
        model="acme/poems", max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "write"}]))  # fmt: skip
    token_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content is not None
                    and c.choices[0].delta.role is None]  # fmt: skip
    assert chunks[-1].usage.completion_tokens == len(token_chunks) > 0


def test_base_model(net):
    r = client(net).completions.create(model=net["base_name"], prompt="hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_repeated_requests_stay_on_one_node(net):
    served = set()
    for _ in range(4):
        raw = client(net).completions.with_raw_response.create(model="acme/elements", prompt="x", max_tokens=1)
        served.add(raw.headers["x-loramesh-node"])
    assert len(served) == 1


def test_errors(net):
    with pytest.raises(openai.AuthenticationError):
        client(net, "lm-not-a-key").models.list()
    slow = client(net, net["limited"])
    slow.models.list()
    with pytest.raises(openai.RateLimitError) as ei:
        slow.models.list()
    assert int(ei.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.NotFoundError):
        client(net).completions.create(model="acme/nothing", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client(net).completions.create(model="acme/capitals", prompt="x", n=3)


def test_client_disconnect_is_recorded_with_the_nodes_receipt(net):
    with httpx.stream("POST", net["gw"] + "/v1/completions", headers={"Authorization": f"Bearer {net['key']}"},
                      json={"model": "acme/capitals", "prompt": "x", "max_tokens": 400, "stream": True}) as r:
        rid = r.headers["x-request-id"]
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen == 2:
                break  # hang up mid-stream

    def record():
        with Session(net["engine"]) as s:
            usage = s.exec(select(UsageRecord).where(UsageRecord.request_id == rid)).first()
            return s.get(CompletionRecord, rid), usage

    done, usage = poll(lambda: all(record()) and record(), timeout=30)
    receipt = json.loads(usage.receipt_json)
    # the node usually is still generating (abort, fewer tokens); on a fast box it may have finished
    assert (done.status, receipt["finish_reason"]) in (("client_closed", "abort"), ("ok", "length"))
    assert receipt["completion_tokens"] == usage.completion_tokens >= 1
    assert receipt["finish_reason"] == "length" or usage.completion_tokens < 400


def test_killing_a_node_moves_its_adapters(net):
    raw = client(net).completions.with_raw_response.create(model="acme/poems", prompt="x", max_tokens=1)
    victim_id = raw.headers["x-loramesh-node"]
    victim = next(n for n in net["nodes"] if n["identity"].node_id == victim_id)
    net["beats"].remove(victim_id)
    os.killpg(victim["proc"].pid, signal.SIGKILL)
    victim["proc"].wait(10)
    for model in ADAPTER_NAMES:
        raw = client(net).completions.with_raw_response.create(model=model, prompt="x", max_tokens=2)
        assert raw.headers["x-loramesh-node"] != victim_id and raw.parse().usage.completion_tokens == 2


def test_every_served_request_is_in_the_outbox_once_with_valid_signature(net):
    with Session(net["engine"]) as s:
        done = s.exec(select(CompletionRecord)).all()
        usage = s.exec(select(UsageRecord)).all()
    served = {d.request_id for d in done if d.completion_tokens > 0 and d.adapter_id is not None}
    assert len(served) >= 10
    assert {u.request_id for u in usage} == served and len(usage) == len(served)
    keys = {n["identity"].node_id: n["identity"].node_public_key for n in net["nodes"]}
    for u in usage:
        check_receipt(json.loads(u.receipt_json), u.node_signature, keys[u.node_id])
    # the in-process settler takes it from there
    poll(lambda: all(u.status == "settled" for u in Session(net["engine"]).exec(select(UsageRecord)).all()),
         timeout=30, interval=0.5)
