"""Three real node daemons on 127.0.0.1 with a real anvil: A publishes, C knows only B, C serves A's adapter.

Start order keeps "C knows only B" true for the chain's bootstrap too: B and C register before A
exists, so C's only way to A is through B (GossipSub / DHT), never a registry address.
"""

from __future__ import annotations

import httpx
import pytest
from eth_account import Account

from common.identity import create_identity
from devnet.anvil import free_port
from devnet.processes import ManagedProcess
from node.adapters import AdapterStore, sign_package, verify_package
from node.operator_token import read_operator_token, token_path
from node.publish import PublishError, publish, upload_to_node
from tests.utils.factories import make_package
from tests.utils.node_auth import Gateway

pytestmark = pytest.mark.integration
PASSWORD = "pw"
ETHER = 10**18
GATEWAY = Gateway()  # the gateway every node here trusts


class Node:
    def __init__(self, name, root, base, chain, *, bootstrap=()):
        self.name, self.port, self.p2p_port = name, free_port(), free_port()
        self.key = root / f"{name}.json"
        self.identity = create_identity(self.key, PASSWORD)
        chain.client(chain.admin).fund([self.identity.address], ETHER)
        self.store = root / f"store-{name}"
        self.data_dir = root / f"data-{name}"
        args = [
            "node",
            "run",
            "--base",
            str(base),
            "--store",
            str(self.store),
            "--port",
            str(self.port),
            "--key",
            str(self.key),
            "--deployment",
            str(chain.deployment_path),
            "--slots",
            "2",
            "--listen",
            f"/ip4/127.0.0.1/tcp/{self.p2p_port}",
            "--threads",
            "1",
            "--data-dir",
            str(self.data_dir),
            "--trust-gateway-key",
            GATEWAY.public_hex,
        ]
        for b in bootstrap:
            args += ["--bootstrap", b]
        self.proc = ManagedProcess(name, args, root / f"{name}.log", env={"LORAMESH_KEY_PASSWORD": PASSWORD})

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self):
        return read_operator_token(token_path(self.data_dir))

    def start(self):
        self.proc.start()
        self.proc.wait_http(self.url + "/health", timeout=120)
        return self

    def status(self):
        return httpx.get(self.url + "/status", timeout=10).json()

    def generate(self, adapter_id, prompt="What is the capital of France?", **kw):
        body = {"adapter_id": adapter_id, "prompt": prompt, "max_tokens": 8, "temperature": 0} | kw
        with GATEWAY.client(self.url, self.identity.node_id, timeout=180) as c:
            return c.post("/v1/generate", json=body)


@pytest.fixture(scope="module")
def mesh(anvil_chain, tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("daemon")
    nodes = {}
    try:
        nodes["B"] = Node("B", root, tiny_base, anvil_chain).start()
        b_addr = nodes["B"].status()["p2p"]["listen_addrs"][0]
        nodes["C"] = Node("C", root, tiny_base, anvil_chain, bootstrap=[b_addr]).start()
        nodes["A"] = Node("A", root, tiny_base, anvil_chain, bootstrap=[b_addr]).start()
        yield nodes, root
    finally:
        for n in nodes.values():
            n.proc.stop()


@pytest.fixture(scope="module")
def published(mesh, anvil_chain, tiny_base):
    nodes, root = mesh
    owner = anvil_chain.users[5]
    pkg = make_package(
        tiny_base, root / "pkg", account=owner, name="mesh/capitals", rank=4, targets=("q_proj", "v_proj", "down_proj")
    )
    publish(pkg.path, anvil_chain.client(owner), node_url=nodes["A"].url, operator_token=nodes["A"].token)
    return pkg


def test_nodes_register_themselves_on_chain(mesh, anvil_chain, tiny_base):
    nodes, _ = mesh
    client = anvil_chain.client()
    for n in nodes.values():
        info = client.get_node(n.identity.node_id)
        status = n.status()
        assert info.operator == n.identity.address and info.active
        assert info.peer_id == status["p2p"]["peer_id"] and info.api_url == n.url
        assert info.base_model == status["base_model"]["id"]


def test_c_serves_a_request_for_as_adapter_through_the_mesh(mesh, published, tiny_base):
    nodes, _ = mesh
    assert published.adapter_id in nodes["A"].status()["p2p"]["held"]
    assert not AdapterStore(nodes["C"].store).has(published.adapter_id)
    from_c = nodes["C"].generate(published.adapter_id)
    assert from_c.status_code == 200, from_c.text
    from_a = nodes["A"].generate(published.adapter_id)
    assert from_c.json()["token_ids"] == from_a.json()["token_ids"]  # the same verified weights
    base_only = nodes["C"].generate(None)
    assert base_only.json()["token_ids"] != from_c.json()["token_ids"]
    # what C runs is the package A seeded, byte for byte, and it verifies against the on-chain owner
    got = verify_package(nodes["C"].store / published.adapter_id, base_dir=tiny_base, expected_owner=published.signer)
    for f in published.manifest.files:
        assert (got.path / f.path).read_bytes() == (published.path / f.path).read_bytes()
    transfers = nodes["C"].status()["p2p"]["transfers"]
    assert any(t["adapter_id"] == published.adapter_id and t["state"] == "done" for t in transfers)


def test_upload_of_an_unregistered_adapter_is_refused(mesh, anvil_chain, tiny_base):
    nodes, root = mesh
    pkg = make_package(tiny_base, root / "unregistered", account=anvil_chain.users[6], name="x/unreg", rank=2)
    with pytest.raises(PublishError, match=r"refused the package \(403\): adapter 0x[0-9a-f]+ is not registered"):
        upload_to_node(pkg, nodes["A"].url, operator_token=nodes["A"].token)
    assert not AdapterStore(nodes["A"].store).has(pkg.adapter_id)
    assert list((nodes["A"].store / ".tmp").iterdir()) == []  # refused before a byte was written


def test_upload_signed_by_someone_else_than_the_registered_owner_is_refused(mesh, anvil_chain, tiny_base):
    nodes, root = mesh
    owner, mallory = anvil_chain.users[7], Account.create()
    pkg = make_package(tiny_base, root / "owned", account=owner, name="x/owned", rank=2)
    publish(pkg.path, anvil_chain.client(owner))
    forged = make_package(
        tiny_base, root / "forged", account=mallory, name="x/owned", rank=2, peft_dir=root / "owned-peft"
    )  # the same manifest, so the same id, signed by mallory
    assert forged.adapter_id == pkg.adapter_id
    signed = sign_package(forged.path, mallory, anvil_chain.client().domain)  # for this registry, by mallory
    with pytest.raises(PublishError, match=rf"refused the package \(403\): package is signed by {mallory.address}"):
        upload_to_node(signed, nodes["A"].url, operator_token=nodes["A"].token)
    assert not AdapterStore(nodes["A"].store).has(pkg.adapter_id)
    assert list((nodes["A"].store / ".tmp").iterdir()) == []


def test_upload_without_the_operator_token_is_refused(mesh, published):
    nodes, _ = mesh
    with pytest.raises(PublishError, match=r"refused the package \(401\): wrong operator token"):
        upload_to_node(published, nodes["B"].url, operator_token="not-the-token")


def test_upload_of_a_tampered_package_is_refused(mesh, anvil_chain, tiny_base):
    nodes, root = mesh
    owner = anvil_chain.users[7]
    pkg = make_package(tiny_base, root / "tampered", account=owner, name="x/tampered", rank=2)
    publish(pkg.path, anvil_chain.client(owner))
    weights = pkg.path / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0x10
    weights.write_bytes(bytes(blob))
    with pytest.raises(PublishError, match="refused the package \\(400\\): file 'adapter_model.safetensors' does not"):
        upload_to_node(pkg, nodes["A"].url, operator_token=nodes["A"].token)
    assert list((nodes["A"].store / ".tmp").iterdir()) == []


def test_unknown_adapter_is_a_404_and_the_node_keeps_serving(mesh, published):
    nodes, _ = mesh
    r = nodes["B"].generate("0x" + "42" * 32)
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert nodes["B"].generate(published.adapter_id).status_code == 200


def test_cli_fetch_through_the_mesh_with_progress(mesh, published, anvil_chain, tmp_path):
    import os
    import subprocess
    import sys

    nodes, _ = mesh
    b_addr = nodes["B"].status()["p2p"]["listen_addrs"][0]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "devnet",
            "adapter",
            "fetch",
            published.adapter_id,
            "--store",
            str(tmp_path / "store"),
            "--bootstrap",
            b_addr,
            "--deployment",
            str(anvil_chain.deployment_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    assert f"fetched mesh/capitals -> {tmp_path / 'store' / published.adapter_id}" in r.stdout
    assert AdapterStore(tmp_path / "store").get(published.adapter_id).signer == published.signer
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "devnet",
            "adapter",
            "fetch",
            "0x" + "77" * 32,
            "--store",
            str(tmp_path / "store"),
            "--bootstrap",
            b_addr,
            "--deployment",
            str(anvil_chain.deployment_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 1 and "has no registered owner" in r.stderr and "Traceback" not in r.stderr
