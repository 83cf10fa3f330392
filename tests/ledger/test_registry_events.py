"""ledger.registry_events: every state-changing AdapterRegistry event has one typed update, which the mirror
(tests/ledger/test_mirror.py) and the explorer (tests/devnet/explorer) apply against a real chain."""

from ledger import registry_events as RE
from ledger.artifacts import load_artifact
from ledger.types import ZERO_ID

# NodeOperatorChanged comes with the NodeRegistered that moves a node, which carries the new operator
NOT_STATE = {"NodeOperatorChanged"}


def test_every_registry_event_is_read():
    abi_events = {i["name"] for i in load_artifact("AdapterRegistry")["abi"] if i.get("type") == "event"}
    assert set(RE.REGISTRY_EVENTS) == abi_events - NOT_STATE


def test_an_event_becomes_its_update():
    ev = {
        "event": "NodeRegistered",
        "args": {
            "nodeId": b"\x01" * 32,
            "operator": "0xOp",
            "baseModel": bytes(32),
            "peerId": "12D3",
            "apiUrl": "http://n",
            "multiaddrs": ["/ip4/1/tcp/2"],
            "publicKey": b"\xab" * 32,
        },
    }
    u = RE.registry_update(ev)
    assert isinstance(u, RE.NodeRegistered) and u.node.node_id == "0x" + "01" * 32 and u.node.active
    assert (u.node.base_model, u.node.multiaddrs, u.node.public_key) == (ZERO_ID, ("/ip4/1/tcp/2",), "0x" + "ab" * 32)
    ev = {"event": "AdapterPriceChanged", "args": {"adapterId": b"\x02" * 32, "pricePer1kTokens": 7}}
    assert RE.registry_update(ev) == RE.AdapterPriceChanged("0x" + "02" * 32, 7)
    assert RE.registry_update({"event": "Deposited", "args": {}}) is None  # a ledger event
