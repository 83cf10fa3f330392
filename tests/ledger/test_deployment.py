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


def test_saved_file_holds_no_rpc_secret(tmp_path, caplog):
    """A deployment file is published: credentials before the host, a query and a key in the path never reach
    it; a plain URL is stored as given, with no warning."""
    cases = {
        "http://127.0.0.1:8545": ("http://127.0.0.1:8545", False),
        "https://rpc.example.org/rpc": ("https://rpc.example.org/rpc", False),
        "https://mainnet.infura.io/v3/0123456789abcdef0123456789abcdef": ("https://mainnet.infura.io/v3", True),
        "https://eth-mainnet.g.alchemy.com/v2/AbCdEfGh1JkLmNoPqRsTuVwX": ("https://eth-mainnet.g.alchemy.com/v2", True),
        "https://user:s3cret@node.example.com:8443/": ("https://node.example.com:8443/", True),
        "https://node.example.com/?apikey=abc": ("https://node.example.com/", True),
    }
    for url, (stored, warned) in cases.items():
        caplog.clear()
        path = tmp_path / "deployment.json"
        Deployment.from_dict({**VALID, "rpc_url": url}).save(path)
        text = path.read_text()
        assert json.loads(text)["rpc_url"] == stored, url
        for secret in ("0123456789abcdef0123456789abcdef", "AbCdEfGh1JkLmNoPqRsTuVwX", "s3cret", "user", "apikey"):
            assert secret not in text, url
        assert ("without its credentials or key" in caplog.text) is warned, url
        assert Deployment.load(path).rpc_url == stored
