"""A node serving an int8 base through its HTTP API (real uvicorn on 127.0.0.1), with adapters trained on the
full-precision base; `node run --quantization` from flags, the environment and a config file; fp8 on a CPU node
refused in one line. The gateway forwards to this same API, so its path is this one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from common.settings import SettingsError
from node.api import create_app
from node.engine import AsyncEngine
from node.receipts import check_receipt
from node.settings import NodeSettings
from tests.utils.engine import ADAPTER_SPECS, make_world
from tests.utils.node_auth import Gateway, node_id_for
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _no_node_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("LORAMESH_NODE_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def int8_node(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("int8-node"), specs=ADAPTER_SPECS[:2])
    engine = AsyncEngine(world.config(quantization="int8", max_model_len=256), store=world.store)
    gateway, node_key = Gateway(), Ed25519PrivateKey.generate()
    app = create_app(engine, node_key, trusted_gateways={gateway.public_hex}, operator_token="op-token")
    server = ServerThread(app).start(timeout=30)
    client = gateway.client(server.url, node_id_for(node_key))
    try:
        yield client, [a.adapter_id for a in world.adapters], bytes.fromhex(client.get("/status").json()["public_key"])
    finally:
        client.close()
        server.stop()


def test_an_int8_node_says_so_and_serves_adapters_trained_on_the_full_precision_base(int8_node):
    client, adapters, pub = int8_node
    status = client.get("/status").json()
    assert status["quantization"] == "int8" and status["device"] == "cpu"
    texts = {}
    for i, aid in enumerate([None, *adapters]):
        rid = "0x" + f"{i + 1:02x}" * 32
        body = {"request_id": rid, "prompt": "What is the capital", "max_tokens": 6, "temperature": 0, "seed": 1}
        r = client.post("/v1/generate", json=body | ({"adapter_id": aid} if aid else {}))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["finish_reason"] in ("stop", "length") and out["usage"]["completion_tokens"] == len(out["token_ids"])
        check_receipt(out["receipt"], out["signature"], pub)  # settles like any other node's receipt
        texts[aid] = tuple(out["token_ids"])
    assert len(set(texts.values())) > 1  # the adapters change what the quantized base says


def test_the_setting_reaches_the_engine_from_a_flag_the_environment_or_a_file(tmp_path, monkeypatch):
    s = NodeSettings.load(None, base=Path("b"), store=Path("s"), port=1, quantization="int8")
    assert s.engine_config().quantization == "int8"
    assert NodeSettings.load(None, base=Path("b"), store=Path("s"), port=1).engine_config().quantization == "none"
    (tmp_path / "node.toml").write_text('base = "b"\nstore = "s"\nport = 1\nquantization = "int4"\n')
    assert NodeSettings.load(tmp_path / "node.toml").engine_config().quantization == "int4"
    monkeypatch.setenv("LORAMESH_NODE_QUANTIZATION", "int8")
    assert NodeSettings.load(tmp_path / "node.toml").quantization == "int8"


def test_fp8_on_a_cpu_node_is_one_line(tmp_path):
    with pytest.raises(SettingsError) as e:
        NodeSettings.load(None, base=Path("b"), store=Path("s"), port=1, quantization="fp8")
    msg = str(e.value)
    assert msg.startswith("setting quantization: --quantization fp8 needs an NVIDIA GPU") and "\n" not in msg, msg
    from node.cli import app

    args = ["node", "run", "--base", str(tmp_path), "--store", "s", "--port", "1", "--quantization", "fp8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    flat = re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)  # the error box wraps the line at the terminal's width
    assert "this node runs on cpu: pick int8 (or int4) there" in flat, flat
