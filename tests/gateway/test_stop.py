"""A gateway that stops with a stream open still records what it relayed.

The gateway in a real uvicorn stopped as our servers stop (common.serving), one stand-in node streaming
slowly. The stop cuts the stream off (as a second Ctrl-C does, or the graceful timeout): the request's end
starts its usage record on a task of its own, and the app's shutdown waits for it. Were the app's shutdown
to run first, or not at all, the tokens the client received would be served and never paid."""

from __future__ import annotations

import threading

import httpx
import pytest
from sqlmodel import Session, select

from common.identity import Identity
from gateway.tables import CompletionRecord
from ledger.models import UsageRecord
from node.adapters.basemodel import base_model_id
from tests.gateway import TINY
from tests.utils.gateway import StandInNode, gateway_over

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("cut", [True, False], ids=["cut at once", "graceful timeout"])
def test_a_stream_open_at_the_gateways_stop_is_recorded(tmp_path, tiny_base, cut):
    node = StandInNode(Identity.generate(), base_model_id(tiny_base), tokens=400, delay=0.05)  # 20 s of tokens
    with gateway_over(node, tmp_path, tiny_base, heartbeat_ttl_s=600) as (gw, engine, key):
        stopper = threading.Thread(target=gw.stop, kwargs={"cut": cut})
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
