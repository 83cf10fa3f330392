"""GET /metrics: vLLM's metric names where vLLM has the metric, read with prometheus_client's own parser, and
values that follow what the node did."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from node.api import create_app
from node.engine import AsyncEngine
from tests.utils.engine import ADAPTER_SPECS, make_world
from tests.utils.node_auth import Gateway, node_id_for
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("metrics-world"), specs=ADAPTER_SPECS[:1])
    engine = AsyncEngine(world.config(num_kv_blocks=64, block_size=8, max_model_len=256), store=world.store)
    gateway, key = Gateway(), Ed25519PrivateKey.generate()
    app = create_app(engine, key, trusted_gateways={gateway.public_hex}, operator_token="t")
    server = ServerThread(app).start(timeout=30)
    client = gateway.client(server.url, node_id_for(key))
    yield client, world.adapters[0].adapter_id
    client.close()
    server.stop()


def scrape(client) -> dict[str, dict]:
    """sample name -> {labels (frozenset of items): value}"""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def one(m: dict, name: str, **labels) -> float:
    return m[name][frozenset(labels.items())]


def test_metrics_follow_the_requests_served(served):
    client, adapter = served
    before = scrape(client)
    assert one(before, "vllm:num_requests_running") == 0 and one(before, "vllm:num_requests_waiting") == 0
    assert one(before, "vllm:kv_cache_usage_perc") == 0
    info = next(iter(before["vllm:lora_requests_info"]))
    assert dict(info) == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "4"}

    body = {"prompt_token_ids": [1, 5, 6, 7], "max_tokens": 5, "temperature": 0}
    r = client.post("/v1/generate", json=body | {"adapter_id": adapter})
    assert r.status_code == 200, r.text
    streamed = client.post("/v1/generate", json=body | {"n": 2, "stream": True})
    assert streamed.status_code == 200

    m = scrape(client)
    assert one(m, "vllm:generation_tokens_total") - one(before, "vllm:generation_tokens_total") == 5 + 10
    assert one(m, "vllm:prompt_tokens_total") - one(before, "vllm:prompt_tokens_total") == 4 + 4
    assert one(m, "vllm:time_to_first_token_seconds_count") == 2  # one per request
    assert one(m, "vllm:inter_token_latency_seconds_count") == 4 + 2 * 4  # per sequence, after its first token
    assert one(m, "vllm:e2e_request_latency_seconds_count") == 2
    assert one(m, "vllm:request_success_total", finished_reason="length") == 2
    assert one(m, "loramesh_node_receipts_signed_total") == 2
    assert one(m, "loramesh_node_adapters_resident") == 1  # the adapter went into a slot
    # its one trip: package decoded into the host cache, then into a slot; nothing evicted
    for tier in ("disk", "slot"):
        assert (
            one(m, "loramesh_node_adapter_loads_total", tier=tier)
            - one(before, "loramesh_node_adapter_loads_total", tier=tier)
            == 1
        )
    assert one(m, "loramesh_node_adapter_evictions_total", tier="slot") == 0
    # the prompts were looked up in the prefix cache; 4 tokens fill no block of 8, so none was found there
    assert one(m, "vllm:prefix_cache_queries_total") > one(before, "vllm:prefix_cache_queries_total")
    assert one(m, "vllm:prefix_cache_hits_total") == 0
    assert one(m, "vllm:num_requests_running") == 0


def test_speculative_decoding_counts_drafted_and_accepted_tokens(served):
    client, _ = served
    before = scrape(client)
    copying = [1] + [40, 41, 42, 43, 44, 45] * 4  # the node's default n-gram drafts find the repeats
    r = client.post("/v1/generate", json={"prompt_token_ids": copying, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    m = scrape(client)
    drafted = one(m, "vllm:spec_decode_num_draft_tokens_total") - one(before, "vllm:spec_decode_num_draft_tokens_total")
    accepted = one(m, "vllm:spec_decode_num_accepted_tokens_total") - one(
        before, "vllm:spec_decode_num_accepted_tokens_total"
    )
    assert drafted > 0 and 0 <= accepted <= drafted
