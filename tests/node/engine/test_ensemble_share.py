"""A client weighs an ensemble anew with every request, and each weighting is an adapter of its own: ensembles
take at most their share of the host cache and of the slots, so they never push other clients' adapters out nor
hold every slot while those wait."""

from __future__ import annotations

import time

from node.engine import FinishEvent
from node.engine.lora.ensemble import EnsembleSpec
from tests.utils.engine import greedy, preload

PROMPT = [1, 40, 41, 42, 43]


def _weighing(engine, a: str, b: str, i: int) -> str:
    """The ensemble a+b under its i-th weighting (a new id each time, as an attacker's would be)."""
    return engine.adapters.define_ensemble(EnsembleSpec.of([(a, 0.5), (b, 0.5 + (i + 1) * 1e-9)]))


def _run(engine, aid: str, rid: str, n: int = 2) -> None:
    done = engine.generate([greedy(rid, aid, PROMPT, n)])
    assert done[rid].finish_reason == "length", done[rid].error


def test_ensembles_weighed_anew_keep_to_their_share_of_the_caches(llama_world):
    a, b, c, d = (x.adapter_id for x in llama_world.adapters)
    engine = llama_world.engine(num_slots=4, cpu_cache_size=8)
    m = engine.adapters
    assert m.max_ensembles == 2  # half the smaller of slots and host cache
    try:
        _run(engine, c, "victim-c")
        _run(engine, d, "victim-d")
        made = [_weighing(engine, a, b, i) for i in range(10)]
        for i, key in enumerate(made):
            _run(engine, key, f"churn-{i}")
        cached_ensembles = [x for x in m.cached() if x in made]
        assert cached_ensembles == made[-2:]  # the newest two; the rest left, not the victims
        assert c in m.cached() and d in m.cached()
        assert m.slots[:2] == [c, d]  # still resident: the ensembles took the two free slots and kept to them
        assert set(m.slots[2:]) == set(made[-2:])
    finally:
        engine.close()


def test_running_ensembles_leave_a_slot_for_another_adapter(llama_world):
    """Two slots, two long requests on two weightings: only one holds a slot, and a third client's adapter runs
    beside it instead of waiting for either to end."""
    a, b, c, _ = (x.adapter_id for x in llama_world.adapters)
    engine = llama_world.engine(num_slots=2, cpu_cache_size=8)
    assert engine.adapters.max_ensembles == 1
    try:
        heavy = [_weighing(engine, a, b, i) for i in range(2)]
        preload(engine, [*heavy, c])
        for i, key in enumerate(heavy):
            engine.add_request(greedy(f"heavy-{i}", key, PROMPT, 48))
        engine.add_request(greedy("victim", c, PROMPT, 2))
        finished: list[str] = []
        deadline = time.monotonic() + 120
        while "victim" not in finished:
            assert time.monotonic() < deadline, f"the victim never finished; finished: {finished}"
            events, progressed = engine.step()
            finished += [e.request_id for e in events if isinstance(e, FinishEvent)]
            if not progressed:  # a load on the loader thread: wait for it
                time.sleep(0.01)
        assert finished == ["victim"], finished  # neither heavy request had to end first
        assert sum(slot in heavy for slot in engine.adapters.slots) == 1
        left = engine.generate([])  # the rest run to their end: the second weighting got the slot in turn
        assert all(left[f"heavy-{i}"].finish_reason == "length" for i in range(2)), left
    finally:
        engine.close()


def test_the_loader_combines_its_share_of_ensembles_at_once(llama_world):
    """Review: the API's cap counts running requests, and a stream whose client left at once freed its place while
    its combine still waited on the one loader thread: a client could queue new weightings without end, and other
    clients' adapters waited behind them."""
    import threading

    import pytest

    from node.engine import AdapterSlotsBusyError

    a, b, c, _ = (x.adapter_id for x in llama_world.adapters)
    engine = llama_world.engine(num_slots=2, cpu_cache_size=8)
    m = engine.adapters
    held = threading.Event()
    try:
        m._pool.submit(held.wait)  # the loader thread busy: loads queue behind it
        first, second = (_weighing(engine, a, b, i) for i in range(2))
        pending = m.load(first)
        with pytest.raises(AdapterSlotsBusyError, match="combining 1 adapter ensembles already"):
            m.load(second).result(timeout=5)
        plain = m.load(c)  # a plain adapter is no ensemble: it queues as ever
        held.set()
        assert pending.result(timeout=60).adapter_id == first and plain.result(timeout=60).adapter_id == c
        assert m.load(second).result(timeout=60).adapter_id == second  # its turn, now that the first is combined
    finally:
        held.set()
        engine.close()
