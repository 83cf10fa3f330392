"""gateway.dns.Lookups on its own: what a name's lookups keep and for how long (a clock of the test's own), with
socket.getaddrinfo answering as each test says."""

from __future__ import annotations

import asyncio
import socket
import traceback

import pytest

from gateway import dns
from tests.utils.clock import Clock

ADDRESS = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]


class Resolver:
    """socket.getaddrinfo answering `answer` (a list, or an OSError raised), counting its calls."""

    def __init__(self, monkeypatch) -> None:
        self.answer: list | OSError = ADDRESS
        self.calls = 0
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def __call__(self, host, port, *args, **kw):
        self.calls += 1
        if isinstance(self.answer, OSError):
            raise self.answer
        return self.answer


@pytest.fixture
def world(monkeypatch):
    clock = Clock(1000.0)
    return Resolver(monkeypatch), clock, dns.Lookups(2, "dns-test", clock=clock)


def _ask(lookups: dns.Lookups, host: str = "node.test"):
    return asyncio.run(lookups.getaddrinfo(host, 80, family=dns.RESOLVER_FAMILY, flags=dns.RESOLVER_FLAGS))


def _warm(lookups: dns.Lookups, host: str = "node.test") -> None:
    async def run():
        lookups.warm(f"http://{host}:80")
        while lookups._inflight:  # the background lookup, to its end
            await asyncio.sleep(0.01)

    asyncio.run(run())


def test_a_failed_refresh_keeps_an_answer_still_fresh(world):
    """Review: one failed background refresh (a heartbeat's warm, EAI_AGAIN once) threw the node's fresh answer away,
    and every request to it failed at once for 30 s: taken for dead, though the name had resolved 32 s before."""
    resolver, clock, lookups = world
    assert _ask(lookups) == ADDRESS and resolver.calls == 1
    clock.t += dns.KEEP_S / 2 + 2  # due for a refresh
    resolver.answer = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    _warm(lookups)
    assert resolver.calls == 2
    assert _ask(lookups) == ADDRESS and resolver.calls == 2  # the answer, still fresh, with no lookup
    clock.t += dns.KEEP_S / 2 - 2  # the answer is stale, the failure (30 s) still holds: fails at once
    with pytest.raises(socket.gaierror):
        _ask(lookups)
    assert resolver.calls == 2


def test_a_name_failing_again_and_again_is_asked_less_and_less_often_until_it_answers(world):
    """A stranger's name in a zone that never answers held a lookup thread 10 s every 30 s or so (one heartbeat
    after its failure was forgotten): some 57 of them kept an honest node's refresh waiting (review). Each failure
    in a row doubles the time it fails at once, to MAX_FAILED_S; an answer forgets its failures."""
    resolver, clock, lookups = world
    resolver.answer = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    waits = []
    for _ in range(8):
        with pytest.raises(socket.gaierror):
            _ask(lookups)
        calls = resolver.calls
        start = clock.t
        while True:  # asked each second: the name fails at once until its time is up
            clock.t += 1
            _warm(lookups)
            if resolver.calls > calls:
                break
        waits.append(clock.t - start)
    assert waits == [min(dns.MAX_FAILED_S, dns.FAILED_S * 2**i) for i in range(8)]
    resolver.answer = ADDRESS
    clock.t += dns.MAX_FAILED_S
    assert _ask(lookups) == ADDRESS
    resolver.answer = socket.gaierror(socket.EAI_AGAIN, "again")
    clock.t += dns.KEEP_S
    with pytest.raises(socket.gaierror):
        _ask(lookups)
    calls = resolver.calls
    clock.t += dns.FAILED_S + 1  # its first failure again: 30 s
    with pytest.raises(socket.gaierror):
        _ask(lookups)
    assert resolver.calls == calls + 1


def test_callers_of_one_name_share_its_lookup(world):
    resolver, _, lookups = world

    async def run():
        return await asyncio.gather(*(lookups.getaddrinfo("same.test", 80) for _ in range(20)))

    assert asyncio.run(run()) == [ADDRESS] * 20 and resolver.calls == 1


def test_a_kept_failure_is_raised_afresh_to_each_caller(world):
    """Raised again and again, one kept exception grew its traceback by a frame or more each time (a name failing
    for ten minutes, asked on every request)."""
    resolver, _, lookups = world
    resolver.answer = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    depths = []
    for _ in range(50):
        with pytest.raises(socket.gaierror) as e:
            _ask(lookups)
        assert e.value.args == resolver.answer.args
        depths.append(len(traceback.extract_tb(e.value.__traceback__)))
    assert resolver.calls == 1 and depths[-1] == depths[1], depths
