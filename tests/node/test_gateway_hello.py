"""node.gateway_hello and the heartbeat sender's gateways that said hello: what a stranger's hello can and
cannot make a node do. The whole path, with a real chain and processes, is tests/gateway/test_two_gateways.py."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.identity import Identity
from node import heartbeat as hb
from node.gateway_hello import (
    MAX_HELLO_BYTES,
    HelloError,
    SettlerCheck,
    SettlerUnknown,
    _signable,
    make_hello,
    parse_hello,
    verify_hello,
)

NODE = "0x" + "ab" * 32
OTHER = "0x" + "cd" * 32
KEY = "12" * 32
SETTLER = Account.create()


def hello(account=SETTLER, **kw) -> dict:
    return make_hello(account, **(dict(gateway_url="http://127.0.0.1:9000", gateway_key=KEY, node_id=NODE) | kw))


def test_a_hello_verifies_and_names_its_signer():
    body = verify_hello(hello(), node_id=NODE)
    assert body["settler"] == SETTLER.address.lower() and body["gateway_url"] == "http://127.0.0.1:9000"


def test_a_hello_for_another_node_is_refused():
    with pytest.raises(HelloError, match="meant for node"):
        verify_hello(hello(node_id=OTHER), node_id=NODE)


def test_a_stale_hello_is_refused():
    old = hello(ts_ms=int(time.time() * 1000) - 120_000)
    with pytest.raises(HelloError, match="from now"):
        verify_hello(old, node_id=NODE)


@pytest.mark.parametrize(
    "field, value",
    [
        ("gateway_url", "http://attacker.example:1"),
        ("gateway_key", "34" * 32),
        ("settler", Account.create().address.lower()),
        ("ts_ms", 1),
    ],
)
def test_any_change_to_a_signed_hello_is_caught(field, value):
    doc = hello()
    doc["body"][field] = value if field != "ts_ms" else doc["body"]["ts_ms"] + value
    with pytest.raises(HelloError, match="signed by|recover"):
        verify_hello(doc, node_id=NODE)


def test_a_settler_named_by_someone_else_is_refused():
    """A hello signed by a stranger that names a real settler's address: the signature says who signed."""
    stranger = Account.create()
    doc = hello(account=stranger)
    doc["body"]["settler"] = SETTLER.address.lower()
    doc["signature"] = stranger.sign_message(_signable(doc["body"])).signature.hex()
    with pytest.raises(HelloError, match="not by the settler it names"):
        verify_hello(doc, node_id=NODE)


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {"body": {}, "signature": ""},
        {"body": "x", "signature": "00"},
        {"body": {"format": "loramesh-gateway-hello/1"}, "signature": "00" * 65},
    ],
)
def test_malformed_hellos_are_one_line_errors(doc):
    with pytest.raises(HelloError) as e:
        verify_hello(doc, node_id=NODE)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "url", ["ftp://x", "http://a b", "http://x/\x00", "http://" + "a" * 600, "javascript:alert(1)", 7, None]
)
def test_a_gateway_url_must_be_a_short_plain_http_url(url):
    doc = hello()
    doc["body"]["gateway_url"] = url
    with pytest.raises(HelloError, match="gateway_url"):
        verify_hello(doc, node_id=NODE)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=80),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=7),
        max_leaves=30,
    )
)
def test_fuzzed_bodies_never_raise_anything_but_hello_error(body):
    for doc in (body, {"body": body, "signature": "00" * 65}, {**hello(), "body": body}):
        raw = json.dumps(doc).encode()
        try:
            verify_hello(parse_hello(raw), node_id=NODE)
        except HelloError:
            pass


def test_a_hello_past_its_size_is_refused_before_parsing():
    with pytest.raises(HelloError, match="bytes"):
        parse_hello(b'{"body": "' + b"x" * MAX_HELLO_BYTES + b'"}')


# ---- SettlerCheck ----


class Chain:
    """is_settler as the chain answers it, with a log of the questions; `clock` is advanced by the tests."""

    def __init__(self, settlers: set[str]) -> None:
        self.settlers, self.asked, self.now = set(settlers), [], [0.0]

    def __call__(self, address: str) -> bool:
        self.asked.append(address)
        return address in self.settlers

    def check(self, **kw) -> SettlerCheck:
        return SettlerCheck(self, clock=lambda: self.now[0], **kw)


def test_a_settler_is_answered_from_memory_and_refreshed_in_the_background():
    chain = Chain({"0xaa"})
    check = chain.check(ttl_s=60)

    async def run():
        assert await check.check("0xAA") is True
        assert await check.check("0xaa") is True  # remembered
        chain.now[0] = 61.0
        chain.settlers.clear()  # revoked: the stale yes still answers at once, and the chain is asked behind it
        assert await check.check("0xaa") is True
        await asyncio.sleep(0.05)
        assert await check.check("0xaa") is False

    asyncio.run(run())
    assert chain.asked == ["0xaa", "0xaa"]


def test_throwaway_accounts_neither_evict_a_settler_nor_flood_the_chain():
    chain = Chain({"0xaa"})
    check = chain.check(min_gap_s=0.2, ttl_s=1e9)  # no answer expires here: only eviction could lose one

    async def run():
        assert await check.check("0xaa") is True
        for i in range(1500):  # more than MAX_REMEMBERED strangers, each asked once
            chain.now[0] += 1.0
            assert await check.check(f"0x{i:040x}") is False
        with pytest.raises(SettlerUnknown, match="too many"):  # two strangers within min_gap_s
            await check.check("0x" + "ee" * 20)
        assert await check.check("0xaa") is True  # no chain question for the settler

    asyncio.run(run())
    assert chain.asked.count("0xaa") == 1 and len(chain.asked) == 1501


def test_the_revocation_sweep_asks_the_chain_even_while_the_answer_is_fresh():
    chain = Chain({"0xaa"})
    check = chain.check()

    async def run():
        assert await check.check("0xaa") is True
        chain.settlers.clear()
        assert await check.check("0xaa", fresh=True) is False

    asyncio.run(run())


def test_a_chain_that_is_down_is_settler_unknown_not_a_no():
    def down(_address: str) -> bool:
        raise ConnectionError("connection refused")

    with pytest.raises(SettlerUnknown, match="did not answer"):
        asyncio.run(SettlerCheck(down).check("0xaa"))


def test_one_chain_question_at_a_time():
    """Hellos signed by fresh accounts cannot queue chain calls: while one check runs, others are 'try later'."""
    import threading

    release = threading.Event()

    def slow(_address: str) -> bool:
        release.wait(5)
        return True

    check = SettlerCheck(slow)

    async def run():
        first = asyncio.create_task(check.check("0xaa"))
        await asyncio.sleep(0.05)
        with pytest.raises(SettlerUnknown, match="try again"):
            await check.check("0xbb")
        release.set()
        assert await first is True

    asyncio.run(run())


# ---- the heartbeat sender's gateways ----


def sender(**kw) -> hb.HeartbeatSender:
    return hb.HeartbeatSender(
        Identity.generate(), kw.pop("urls", []), api_url="http://n", base_model_id=NODE, status_fn=dict, **kw
    )


def test_a_hello_adds_a_gateway_and_trusts_its_key_at_once():
    s = sender()
    assert s.add_gateway("http://g:1/", KEY) is True
    assert s.gateway_urls == ["http://g:1"] and s.trusted_keys() == {KEY}
    assert s.add_gateway("http://g:1", KEY) is False


def test_a_hello_cannot_change_the_key_of_a_known_gateway():
    """A settler naming another gateway's URL with its own key would take that gateway's calls away."""
    s = sender(urls=["http://g:1"])
    s.gateway_keys["http://g:1"] = KEY  # what the URL itself answered
    s.add_gateway("http://g:1", "34" * 32)
    assert s.trusted_keys() == {KEY}


def test_gateways_that_said_hello_are_bounded():
    s = sender()
    s.max_greeted = 3
    for i in range(3):
        s.add_gateway(f"http://g:{i}", KEY)
    with pytest.raises(hb.TooManyGateways):
        s.add_gateway("http://g:99", KEY)


def test_a_gateway_that_said_hello_is_forgotten_after_failing_long_but_the_operators_never(monkeypatch):
    monkeypatch.setattr(hb, "FORGET_AFTER_S", 10.0)
    s = sender(urls=["http://operator:1"], interval=2.0)
    s.add_gateway("http://hello:1", KEY)
    for _ in range(5):
        s._failed("http://hello:1", "unreachable")
        s._failed("http://operator:1", "unreachable")
    assert s.gateway_urls == ["http://operator:1"] and KEY not in s.trusted_keys()
    assert s.failing["http://operator:1"] == 5


def test_a_gateway_whose_settler_lost_the_role_is_forgotten():
    """The daemon asks the chain again about every hello gateway's settler; a revoked one's gateway is dropped,
    a chain that does not answer keeps it."""
    from types import SimpleNamespace

    from node.daemon import NodeDaemon

    revoked, kept, unknown = "0x" + "aa" * 20, "0x" + "bb" * 20, "0x" + "cc" * 20
    s = sender()
    s.add_gateway("http://revoked:1", KEY, revoked)
    s.add_gateway("http://kept:1", "34" * 32, kept)
    s.add_gateway("http://unknown:1", "56" * 32, unknown)

    def is_settler(address: str) -> bool:
        if address == unknown:
            raise ConnectionError("chain down")
        return address == kept

    daemon = SimpleNamespace(heartbeat=s, settlers=SettlerCheck(is_settler))

    async def run():
        task = asyncio.create_task(NodeDaemon._recheck_settlers(daemon, every_s=0.01))
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(run())
    assert sorted(s.gateway_urls) == ["http://kept:1", "http://unknown:1"]
    assert KEY not in s.trusted_keys() and "34" * 32 in s.trusted_keys()
