"""A gateway that stops with a stream open still records what it relayed.

The gateway in a real uvicorn stopped as our servers stop (common.serving), one stand-in node streaming
slowly. The stop cuts the stream off (as a second Ctrl-C does, or the graceful timeout): the request's end
starts its usage record on a task of its own, and the app's shutdown waits for it. Were the app's shutdown
to run first, or not at all, the tokens the client received would be served and never paid."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from sqlmodel import Session, select

from common.identity import Identity
from gateway.keys import create_key
from gateway.main import create_app
from gateway.settings import GatewaySettings
from gateway.tables import CompletionRecord
from ledger.models import UsageRecord
from node.adapters.basemodel import base_model_id
from node.heartbeat import HeartbeatSender
from tests.gateway import TINY
from tests.utils.gateway import StandInNode, add_node, make_db
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("cut", [True, False], ids=["cut at once", "graceful timeout"])
def test_a_stream_open_at_the_gateways_stop_is_recorded(tmp_path, tiny_base, cut):
    engine = make_db(tmp_path / "gw.db")
    base = base_model_id(tiny_base)
    node = StandInNode(Identity.generate(), base, tokens=400, delay=0.05)  # 20 s of tokens: longer than the stop
    node_srv = ServerThread(node.app()).start()
    add_node(engine, node_id=node.identity.node_id, base_model=base, api_url=node_srv.url)
    key, _ = create_key(engine, name="app")
    gw = ServerThread(
        create_app(GatewaySettings(db_url=f"sqlite:///{tmp_path / 'gw.db'}", bases=[tiny_base], heartbeat_ttl_s=600))
    ).start()
    sender = HeartbeatSender(node.identity, [gw.url], api_url=node_srv.url, base_model_id=base, status_fn=node.status)
    stopper = threading.Thread(target=gw.stop, kwargs={"cut": cut})
    try:
        assert asyncio.run(sender.send_once()) == {gw.url: 200}
        with httpx.stream(
            "POST",
            gw.url + "/v1/completions",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
            json={"model": TINY, "prompt": "hello", "max_tokens": 400, "stream": True},
        ) as r:
            rid, got = r.headers["x-request-id"], 0
            with pytest.raises(httpx.RemoteProtocolError):  # the stop cuts the stream off mid-body
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"text":" t' in line:
                        got += 1
                    if got == 3 and stopper.ident is None:
                        stopper.start()  # the client stays: only the stop ends the stream
        stopper.join(timeout=30)
        assert not stopper.is_alive()
        with Session(engine) as s:
            usage = s.exec(select(UsageRecord).where(UsageRecord.request_id == rid)).first()
            done = s.get(CompletionRecord, rid)
        assert usage is not None and done is not None, "the stream cut off by the stop was never recorded"
        assert usage.completion_tokens >= 3 and done.completion_tokens == usage.completion_tokens
    finally:
        if stopper.ident is None:
            gw.stop()
        node_srv.stop()
        engine.dispose()
