"""An ensemble request on the node's HTTP API (real uvicorn): served under the ensemble's id, its signed
receipt names every component and weight, and bad ensembles get a clear 4xx."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from node.adapters.ensemble import ensemble_key
from node.receipts import ReceiptError, check_receipt
from tests.node.test_api import _error, llama_world, node  # noqa: F401  (module fixtures: a real node)

pytestmark = pytest.mark.integration

PROMPT = [1, 17, 42, 99, 7, 250, 31]


def _gen(c, **kw):
    return c.post("/v1/generate", json={"prompt_token_ids": PROMPT, "max_tokens": 8, "temperature": 0} | kw)


def test_ensemble_is_served_under_its_id_and_its_receipt_covers_every_part(node):  # noqa: F811
    c, (a, b) = node["client"], node["adapters"]
    parts = [{"adapter_id": a, "weight": 0.7}, {"adapter_id": b, "weight": 0.3}]
    key = ensemble_key([(a, 0.7), (b, 0.3)])
    r = _gen(c, ensemble=parts)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter_id"] == key
    rec = body["receipt"]
    assert rec["adapter_id"] == key and rec["ensemble"] == [[a, 0.7], [b, 0.3]]
    check_receipt(rec, body["signature"], node["pub"])
    # the signature covers the weights: a receipt re-weighted afterwards is refused
    with pytest.raises(ReceiptError):
        check_receipt(rec | {"ensemble": [[a, 0.3], [b, 0.7]]}, body["signature"], node["pub"])
    with pytest.raises(ReceiptError, match="not its ensemble's id"):
        check_receipt(rec | {"adapter_id": a}, body["signature"], node["pub"])
    # the same ensemble again answers the same (greedy), and differs from its parts alone
    again = _gen(c, ensemble=parts, adapter_id=key).json()
    assert again["token_ids"] == body["token_ids"]
    singles = [_gen(c, adapter_id=x).json()["token_ids"] for x in (a, b)]
    assert body["token_ids"] not in singles


@pytest.mark.parametrize(
    ("ensemble", "extra", "code", "fragment"),
    [
        ("one", {}, "invalid_request", "ensemble: List should have at least 2 items"),
        ("five", {}, "invalid_request", "at most 4 items"),
        ("dup", {}, "invalid_request", "appears twice"),
        ("zero", {}, "invalid_request", "greater than 0"),
        ("mismatch", {}, "invalid_request", "is not the ensemble's id"),
    ],
)
def test_bad_ensembles_get_a_clear_400(node, ensemble, extra, code, fragment):  # noqa: F811
    c, (a, b) = node["client"], node["adapters"]
    cases = {
        "one": ([{"adapter_id": a, "weight": 1.0}], {}),
        "five": ([{"adapter_id": "0x" + f"{i}" * 64, "weight": 1.0} for i in range(1, 6)], {}),
        "dup": ([{"adapter_id": a, "weight": 1.0}, {"adapter_id": a, "weight": 2.0}], {}),
        "zero": ([{"adapter_id": a, "weight": 1.0}, {"adapter_id": b, "weight": 0.0}], {}),
        "mismatch": ([{"adapter_id": a, "weight": 1.0}, {"adapter_id": b, "weight": 1.0}], {"adapter_id": a}),
    }
    parts, more = cases[ensemble]
    _error(_gen(c, ensemble=parts, **more, **extra), 400, code, fragment)


def test_an_unknown_component_is_404_and_the_node_keeps_serving(node):  # noqa: F811
    c, (a, _) = node["client"], node["adapters"]
    missing = "0x" + "5" * 64
    r = _gen(c, ensemble=[{"adapter_id": a, "weight": 1.0}, {"adapter_id": missing, "weight": 1.0}])
    _error(r, 404, "adapter_not_found", missing)
    assert _gen(c, adapter_id=a).status_code == 200


def test_a_node_runs_its_share_of_distinct_ensembles_at_once(node):  # noqa: F811
    """Each weighting of an ensemble is combined on the node's one loader thread and held in its own slot: past
    the engine's share of them running at once, a new weighting is refused as busy (the gateway tries another
    node), while one already running still takes more requests."""
    c, (a, b) = node["client"], node["adapters"]
    engine, book = node["engine"], node["book"]
    share = engine.max_ensembles
    assert share == 2  # 4 slots, half of them

    def parts(w: float) -> list[dict]:
        return [{"adapter_id": a, "weight": 0.5}, {"adapter_id": b, "weight": w}]

    release = threading.Event()
    engine.call(release.wait)  # the engine holds between steps: the requests below stay running
    with ThreadPoolExecutor(share + 1) as pool:
        try:
            held = [pool.submit(_gen, c, ensemble=parts(0.1 * (i + 1))) for i in range(share)]
            deadline = time.monotonic() + 60
            while len(book._live_ensembles) < share:
                assert time.monotonic() < deadline, "the held requests never reached the engine"
                assert not any(f.done() for f in held), [f.result().text for f in held if f.done()]
                time.sleep(0.01)
            _error(_gen(c, ensemble=parts(0.9)), 503, "slots_busy", f"runs {share} adapter ensembles")
            again = pool.submit(_gen, c, ensemble=parts(0.1))  # a weighting already running is no new one
            while len(book.running) < share + 1:
                assert time.monotonic() < deadline, "the second request of a running ensemble was not taken"
                assert not again.done(), again.result().text
                time.sleep(0.01)
        finally:
            release.set()
        assert [f.result().status_code for f in [*held, again]] == [200] * (share + 1)
    assert not book._live_ensembles
    assert _gen(c, ensemble=parts(0.9)).status_code == 200  # its turn, now that the others ended
