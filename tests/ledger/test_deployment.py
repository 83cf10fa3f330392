"""A deployment file is handed from operator to operator: whatever it holds, loading it gives a Deployment or
one DeploymentMismatch line, never another exception (and never a crash on deep nesting)."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.deployment import Deployment
from ledger.errors import DeploymentMismatch

VALID = {
    "chain_id": 31337,
    "rpc_url": "http://127.0.0.1:8545",
    "deploy_block": 0,
    "contracts": {"AdapterRegistry": "0x" + "11" * 20, "AttributionLedger": "0x" + "22" * 20},
}
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _mutated(changes: dict) -> bytes:
    doc = json.loads(json.dumps(VALID))
    for key, value in changes.items():
        if key.startswith("contracts."):
            doc["contracts"][key.split(".", 1)[1]] = value
        else:
            doc[key] = value
    return json.dumps(doc).encode()


_KEYS = st.sampled_from(
    [
        "chain_id",
        "rpc_url",
        "deploy_block",
        "deployer",
        "node_share_bps",
        "funded",
        "base_price_per_1k_tokens",
        "contracts.AdapterRegistry",
        "contracts.AttributionLedger",
    ]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=200),
        _JSON.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(_KEYS, _JSON, max_size=4).map(_mutated),
        st.integers(1, 50_000).map(lambda n: b'{"a":' * n),
    )
)
def test_any_file_loads_or_is_one_clear_error(tmp_path, data):
    path = tmp_path / "deployment.json"
    path.write_bytes(data)
    try:
        d = Deployment.load(path)
    except DeploymentMismatch as e:
        assert str(e) and "\n" not in str(e).splitlines()[0]
    else:
        assert d.chain_id > 0 and d.registry.startswith("0x")


def test_the_valid_file_loads(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(VALID))
    assert Deployment.load(tmp_path / "d.json").chain_id == 31337
