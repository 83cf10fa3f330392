"""node.heartbeat: signing, every refusal of verify_heartbeat, and the sender's tolerance of a down gateway."""

from __future__ import annotations

import asyncio
import copy

import pytest
from fastapi import FastAPI, Request

from common.identity import Identity
from devnet.anvil import free_port
from node.heartbeat import HeartbeatError, HeartbeatSender, UnsignedHeartbeatError, make_heartbeat, verify_heartbeat

BASE = "0x" + "11" * 32


@pytest.fixture(scope="module")
def ident():
    return Identity.generate()


def _hb(ident, **kw):
    return make_heartbeat(
        ident,
        api_url="http://127.0.0.1:9",
        base_model_id=BASE,
        status={"queue_depth": 1, "resident_adapters": []},
        ts_ms=kw.pop("ts_ms", 1_000),
        **kw,
    )


def test_roundtrip(ident):
    body = verify_heartbeat(_hb(ident))
    assert body["node_id"] == ident.node_id and body["status"]["queue_depth"] == 1 and body["ts_ms"] == 1000
    assert bytes.fromhex(body["public_key"]) == ident.node_public_key


def test_missing_signature(ident):
    doc = _hb(ident)
    del doc["signature"]
    with pytest.raises(UnsignedHeartbeatError, match="no signature"):
        verify_heartbeat(doc)


def test_tampered_body(ident):
    doc = _hb(ident)
    doc["body"]["status"]["queue_depth"] = 0
    with pytest.raises(UnsignedHeartbeatError, match="does not verify"):
        verify_heartbeat(doc)


def test_key_not_matching_node_id(ident):
    other = Identity.generate()
    doc = _hb(ident)
    doc["body"]["node_id"] = other.node_id  # claims another node's id with its own key
    with pytest.raises(HeartbeatError, match="does not hash"):
        verify_heartbeat(doc)


def test_signed_by_other_key(ident):
    other = Identity.generate()
    doc = _hb(ident)
    doc["signature"] = _hb(other)["signature"]
    with pytest.raises(UnsignedHeartbeatError):
        verify_heartbeat(doc)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("format", "v0", "format"),
        ("node_id", "0xABC", "node_id"),
        ("base_model_id", None, "base_model_id"),
        ("api_url", "ftp://x", "api_url"),
        ("status", [], "status"),
        ("ts_ms", -5, "ts_ms"),
        ("public_key", "zz", "hex"),
        ("gateway_key", "AB" * 32, "gateway_key"),
        ("gateway_key", None, "gateway_key"),
    ],
)
def test_malformed_fields(ident, field, value, match):
    doc = copy.deepcopy(_hb(ident))
    doc["body"][field] = value
    with pytest.raises(HeartbeatError, match=match):
        verify_heartbeat(doc)


def test_not_an_object():
    with pytest.raises(HeartbeatError, match="JSON object"):
        verify_heartbeat(["body"])


def test_skew(ident):
    doc = _hb(ident, ts_ms=1_000)
    assert verify_heartbeat(doc, now_ms=1_500, max_skew_ms=1_000)
    with pytest.raises(HeartbeatError, match="from now"):
        verify_heartbeat(doc, now_ms=5_000, max_skew_ms=1_000)


def test_sender_tolerates_down_gateway(ident):
    calls = []

    async def status():
        calls.append(1)
        return {"queue_depth": 0}

    async def main():
        sender = HeartbeatSender(
            ident,
            [f"http://127.0.0.1:{free_port()}"],
            api_url="http://127.0.0.1:9",
            base_model_id=BASE,
            status_fn=status,
            interval=0.05,
            timeout=0.5,
        )
        result = await sender.send_once()
        sender.start()
        await asyncio.sleep(0.3)
        await sender.stop()
        return result, sender

    result, sender = asyncio.run(main())
    assert list(result.values())[0].startswith("unreachable")
    assert len(calls) >= 3 and sender.sent == 0  # kept beating although nobody listened


def test_failing_heartbeats_are_warned_about_once_a_minute_and_counted(ident, caplog):
    """A gateway that cannot be reached is a warning when it starts failing (not a DEBUG line), then at most
    one a minute with the count; its recovery is logged too."""
    from tests.utils.servers import ServerThread

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = FastAPI()
    gateway.post("/internal/heartbeat")(lambda: {"accepted": True, "gateway_key": "ab" * 32})
    gateway.get("/internal/gateway-key")(lambda: {"gateway_key": "ab" * 32})
    sender = HeartbeatSender(ident, [url], api_url="http://127.0.0.1:9", base_model_id=BASE, status_fn=dict)

    async def beats(n: int) -> None:
        for _ in range(n):
            await sender.send_once()

    with caplog.at_level("INFO", logger="node.heartbeat"):
        asyncio.run(beats(5))  # nobody listens yet
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and url in warnings[0] and "1 in a row" in warnings[0]
        assert sender.failed == 5 and sender.failing == {url: 5} and sender.sent == 0
        with ServerThread(gateway, port=port):
            asyncio.run(beats(1))
        assert sender.sent == 1 and sender.failing == {}
        assert any("again" in r.getMessage() for r in caplog.records if r.levelname == "INFO")
        asyncio.run(beats(1))  # down again: a new warning at once
        assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 2


def test_sender_rejects_bad_interval(ident):
    with pytest.raises(ValueError, match="interval"):
        HeartbeatSender(ident, [], api_url="http://x", base_model_id=BASE, status_fn=dict, interval=0)


def test_each_gateway_gets_a_heartbeat_naming_its_own_key(ident):
    """A heartbeat names the gateway it is meant for (its key, signed), so whoever receives one cannot post it
    to another gateway; a gateway that does not say its key gets none (one naming no gateway is taken by any)."""
    from tests.utils.servers import ServerThread

    got: dict[str, dict] = {}

    def gateway(name: str, key: str | None) -> FastAPI:
        app = FastAPI()

        @app.post("/internal/heartbeat")
        async def beat(request: Request) -> dict:
            got[name] = verify_heartbeat(await request.json())
            return {"accepted": True} | ({"gateway_key": key} if key else {})

        if key:
            app.get("/internal/gateway-key")(lambda: {"gateway_key": key})
        return app

    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    sender = HeartbeatSender(ident, urls, api_url="http://127.0.0.1:9", base_model_id=BASE, status_fn=dict)
    with (
        ServerThread(gateway("a", "aa" * 32), port=ports[0]),
        ServerThread(gateway("b", "bb" * 32), port=ports[1]),
        ServerThread(gateway("c", None), port=ports[2]),
    ):
        assert list(asyncio.run(sender.send_once()).values()) == [200, 200, "no gateway key"]
    assert got["a"]["gateway_key"] == "aa" * 32 and got["b"]["gateway_key"] == "bb" * 32
    assert "c" not in got and sender.failing == {urls[2]: 1}


def test_a_gateway_with_a_new_key_gets_the_nodes_heartbeats_again(ident):
    """A gateway started again without --gateway-key-file signs with a new key, and refuses heartbeats naming the
    old one (403 heartbeat_for_another_gateway): the node asks its URL for the key again and the next beat is
    taken. It was refused for good: the node learned a key only from an answer it could no longer get."""
    from fastapi.responses import JSONResponse

    from tests.utils.servers import ServerThread

    key, got = ["aa" * 32], []
    app = FastAPI()
    app.get("/internal/gateway-key")(lambda: {"gateway_key": key[0]})

    @app.post("/internal/heartbeat")
    async def beat(request: Request):
        body = verify_heartbeat(await request.json())
        if body["gateway_key"] != key[0]:  # as gateway.directory refuses it
            error = {"message": "meant for another gateway", "code": "heartbeat_for_another_gateway"}
            return JSONResponse({"error": error}, status_code=403)
        got.append(body["gateway_key"])
        return {"accepted": True, "gateway_key": key[0]}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sender = HeartbeatSender(ident, [url], api_url="http://127.0.0.1:9", base_model_id=BASE, status_fn=dict)
    with ServerThread(app, port=port):
        assert asyncio.run(sender.send_once()) == {url: 200}
        key[0] = "bb" * 32  # restarted
        assert asyncio.run(sender.send_once()) == {url: 403}
        assert asyncio.run(sender.send_once()) == {url: 200}
    assert got == ["aa" * 32, "bb" * 32] and sender.trusted_keys() == {"bb" * 32}
