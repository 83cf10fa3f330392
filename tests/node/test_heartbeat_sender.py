"""What a node's heartbeat carries of its status, and what a gateway's answer may do to the node's log."""

from __future__ import annotations

import asyncio
import logging

import pytest

from common.identity import Identity
from node.heartbeat import (
    MAX_RESIDENT,
    HeartbeatError,
    HeartbeatSender,
    heartbeat_status,
    make_heartbeat,
    verify_heartbeat,
)
from tests.gateway.test_greeter import RawServer

BASE = "0x" + "11" * 32


def _status(slots: int) -> dict:
    """A node's /status with `slots` resident adapters named at 64 characters, a full host cache and p2p state."""
    named = [{"adapter_id": f"0x{i:064x}", "name": "n" * 64, "slot": i, "pinned": False} for i in range(slots)]
    return {
        "base_model": {"name": "tiny", "id": BASE},
        "features": ["cache_salt"],
        "queue_depth": 3,
        "resident_adapters": named,
        "cached_adapters": [{"adapter_id": a["adapter_id"], "name": a["name"]} for a in named[:32]],
        "free_slots": 0,
        "num_slots": slots,
        "p2p": {"transfers": [{"failures": ["x" * 200] * 8}] * 16},
    }


def test_a_node_of_many_slots_still_heartbeats():
    """The whole slot table with each adapter's name passed the 64 kB a heartbeat may be at about 350 slots:
    every gateway refused the node's heartbeats, and it dropped out of routing (red team). A heartbeat lists the
    resident adapters by id, MAX_RESIDENT at most, which is all gateways read of them."""
    ident = Identity.generate()
    whole = _status(512)
    with pytest.raises(HeartbeatError, match="more than the 65536 allowed"):
        verify_heartbeat(make_heartbeat(ident, api_url="http://n", base_model_id=BASE, status=whole))
    sent = heartbeat_status(whole)
    body = verify_heartbeat(make_heartbeat(ident, api_url="http://n", base_model_id=BASE, status=sent))
    resident = body["status"]["resident_adapters"]
    assert resident == [{"adapter_id": a["adapter_id"]} for a in whole["resident_adapters"][:MAX_RESIDENT]]
    assert "cached_adapters" not in body["status"] and "p2p" not in body["status"]
    assert {k: body["status"][k] for k in ("base_model", "features", "queue_depth", "num_slots")} == {
        k: whole[k] for k in ("base_model", "features", "queue_depth", "num_slots")
    }


def test_a_gateways_answer_never_makes_a_line_of_the_nodes_log(caplog):
    """A gateway the node heartbeats to (any settler's that said hello) wrote its own lines into the node's log
    by refusing a heartbeat with newlines and escapes (red team): its words are quoted."""
    body = b"\n2026-12-07 23:59:59,000 ERROR node.daemon: key stolen\x1b[2J"
    server = RawServer(
        lambda conn: conn.sendall(
            f"HTTP/1.1 500 X\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
        )
    )
    sender = HeartbeatSender(
        Identity.generate(), [server.url], api_url="http://127.0.0.1:1", base_model_id=BASE, status_fn=lambda: {}
    )
    sender.gateway_keys[server.url] = "12" * 32  # its key known: straight to the heartbeat
    caplog.set_level(logging.INFO, logger="node")
    try:
        assert asyncio.run(sender.send_once()) == {server.url: 500}
    finally:
        server.close()
    (line,) = [r.getMessage() for r in caplog.records if "heartbeat to gateway" in r.getMessage()]
    assert "\n" not in line and "\x1b" not in line and "\\n2026-12-07" in line
