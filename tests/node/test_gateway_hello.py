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
from node.api.errors import ApiError
from node.gateway_hello import (
    MAX_HELLO_BYTES,
    HelloError,
    SettlerRoster,
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


# ---- SettlerRoster ----


class Chain:
    """The ledger's settler events as a chain would give them (settler_changes), with the questions asked."""

    def __init__(self, settlers: set[str]) -> None:
        self.head = 1
        self.log = [(1, a, True) for a in settlers]  # (block, address, granted)
        self.asked: list[int | None] = []
        self.down = False

    def grant(self, address: str, granted: bool = True) -> None:
        self.head += 1
        self.log.append((self.head, address, granted))

    def __call__(self, from_block: int | None):
        self.asked.append(from_block)
        if self.down:
            raise ConnectionError("connection refused")
        return self.head, [(a, g) for b, a, g in self.log if from_block is None or b >= from_block]


def test_a_settler_on_the_roster_is_answered_with_no_chain_question():
    chain = Chain({"0xaa"})
    roster = SettlerRoster(chain, min_gap_s=0)

    async def run():
        with pytest.raises(SettlerUnknown, match="not read"):  # before the first read (the daemon's, at start)
            await roster.check("0xaa")
        await roster.sync(from_start=True)  # the first read: the roster from the deployment on
        assert await roster.check("0xAA") is True
        for _ in range(5):
            assert await roster.check("0xaa") is True

    asyncio.run(run())
    assert chain.asked == [None]


def test_a_flood_of_throwaway_accounts_neither_floods_the_chain_nor_keeps_a_new_settler_out():
    """The attack: hellos signed by fresh accounts, each one a chain question, used up the one-a-0.2-s budget,
    and a settler granted a moment ago got "try again" for as long as they came. Now every hello waits for
    the next sync, a handful of syncs answer them all, and the new settler is found."""
    chain = Chain({"0xaa"})
    roster = SettlerRoster(chain, min_gap_s=0.05, max_waiting=10_000)

    async def run():
        await roster.sync()
        chain.grant("0xnew")  # granted after the last sync
        strangers = [roster.check(f"0x{i:040x}") for i in range(2000)]
        answers = await asyncio.gather(*strangers[:1000], roster.check("0xNEW"), *strangers[1000:])
        assert answers.count(True) == 1 and answers[1000] is True

    asyncio.run(run())
    assert len(chain.asked) <= 3, chain.asked  # the first sync, then one or two shared by all 2001 hellos


def test_syncs_are_one_at_a_time_and_read_only_what_is_new():
    chain = Chain({"0xaa"})
    roster = SettlerRoster(chain, min_gap_s=0)

    async def run():
        await roster.sync()
        chain.grant("0xbb")
        assert await roster.check("0xbb") is True
        chain.grant("0xaa", False)
        assert await roster.check("0xcc") is False
        assert roster.settlers == {"0xbb"}

    asyncio.run(run())
    assert chain.asked == [None, 2, 3]


@pytest.mark.parametrize("synced", [True, False], ids=["after-a-sync", "before-the-first"])
def test_past_max_waiting_a_hello_is_try_again_not_a_no(synced):
    """Past max_waiting a hello is answered at once: "try again" (503), not "not a settler", which would be false
    of a settler granted since the last read; and the bound holds before the first read has answered too."""
    chain = Chain({"0xaa"})
    roster = SettlerRoster(chain, min_gap_s=0.2, max_waiting=4)

    async def run():
        if synced:
            await roster.sync()
        else:  # hellos before the first read join it (strangers never start a read of the whole roster)
            first = asyncio.create_task(roster.sync(from_start=True))
            await asyncio.sleep(0)
        waiting = [asyncio.create_task(roster.check(f"0x{i:040x}")) for i in range(4)]
        await asyncio.sleep(0)
        with pytest.raises(SettlerUnknown, match="too many hellos"):
            await roster.check("0x" + "ee" * 20)  # at once: four already wait
        assert await asyncio.gather(*waiting) == [False] * 4
        assert await roster.check("0xaa") is True
        if not synced:
            await first

    asyncio.run(run())
    assert len(chain.asked) == (2 if synced else 1)


def test_a_caller_joins_a_sync_still_waiting_its_turn_whichever_ran_before():
    """A sweep queued behind an incremental read: a hello that comes while the first reads joins the sweep, and
    does not start a fourth read (the flag saying a sync had begun reading named the wrong one)."""
    chain = Chain({"0xaa"})
    roster = SettlerRoster(chain, min_gap_s=0.05)

    async def run():
        await roster.sync(from_start=True)
        b = asyncio.create_task(roster.sync())
        await asyncio.sleep(0.06)  # b is reading or has read
        c = asyncio.create_task(roster.sync(from_start=True))
        await asyncio.sleep(0)
        d = asyncio.create_task(roster.check("0xbb"))
        await asyncio.gather(b, c)
        assert await d is False

    asyncio.run(run())
    assert chain.asked == [None, 2, None], chain.asked


def test_a_chain_that_is_down_is_settler_unknown_and_the_roster_stands():
    chain = Chain({"0xaa"})
    roster = SettlerRoster(chain, min_gap_s=0)

    async def run():
        await roster.sync()
        chain.down = True
        with pytest.raises(SettlerUnknown, match="did not answer.*connection refused"):
            await roster.check("0xbb")
        assert await roster.check("0xaa") is True  # its yes holds until the chain says otherwise
        chain.down = False
        chain.grant("0xbb")
        assert await roster.check("0xbb") is True

    asyncio.run(run())


def test_reading_from_the_start_drops_a_grant_no_longer_on_the_chain():
    """A reorganisation can undo a grant read before: the sweep's whole read puts the roster right."""
    chain = Chain({"0xaa"})
    roster = SettlerRoster(chain, min_gap_s=0)

    async def run():
        chain.grant("0xbb")
        await roster.sync()
        assert roster.settlers == {"0xaa", "0xbb"}
        chain.log.pop()  # the block with the grant is gone
        await roster.sync(from_start=True)
        assert roster.settlers == {"0xaa"}

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


def test_a_hello_gives_no_key_to_the_operators_gateway():
    """The operator's gateway was down when the node started, its key not learned yet: a settler's hello naming
    its URL with the settler's own key made the node trust that key for it (and address its heartbeats to it,
    which the operator's gateway then refused for good)."""
    s = sender(urls=["http://operator:1"])
    s.add_gateway("http://operator:1", KEY, "0x" + "aa" * 20)
    assert s.trusted_keys() == frozenset() and s.greeted == {}


def test_one_settler_named_in_other_cases_is_one_settler():
    """A settler's address in other cases is the same settler: each spelling was counted apart against
    MAX_GATEWAYS_PER_SETTLER, and one settler took every gateway slot a node has."""
    doc = hello()
    doc["body"]["settler"] = SETTLER.address  # checksummed
    doc["signature"] = SETTLER.sign_message(_signable(doc["body"])).signature.hex()
    assert verify_hello(doc, node_id=NODE)["settler"] == SETTLER.address.lower()


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
    """The daemon reads the ledger's settlers again; a revoked one's gateway is dropped, a chain that does not
    answer keeps every gateway."""
    from types import SimpleNamespace

    from node.daemon import NodeDaemon

    revoked, kept = "0x" + "aa" * 20, "0x" + "bb" * 20
    s = sender()
    s.add_gateway("http://revoked:1", KEY, revoked)
    s.add_gateway("http://kept:1", "34" * 32, kept.upper().replace("0X", "0x"))  # a hello may name it in any case
    chain = Chain({revoked, kept})
    chain.down = True
    daemon = SimpleNamespace(heartbeat=s, settlers=SettlerRoster(chain, min_gap_s=0))

    async def run():
        task = asyncio.create_task(NodeDaemon._recheck_settlers(daemon, every_s=0.01))
        await asyncio.sleep(0.1)
        assert sorted(s.gateway_urls) == ["http://kept:1", "http://revoked:1"]  # the chain said nothing yet
        chain.grant(revoked, False)
        chain.down = False
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(run())
    assert s.gateway_urls == ["http://kept:1"]
    assert KEY not in s.trusted_keys() and "34" * 32 in s.trusted_keys()


def test_a_hello_naming_a_new_key_for_a_known_gateway_is_answered_for_the_key_the_node_trusts():
    """A gateway that said hello restarts with a new key and says hello again: the node keeps the key its URL
    answered, and its answer named the hello's new key, so the gateway took it and routed to a node that
    refused its calls. The answer now names the key the node trusts there (the gateway refuses it, and the
    node asks the URL for its key when its next heartbeat is refused as meant for another)."""
    from types import SimpleNamespace

    from node.daemon import NodeDaemon

    identity = Identity.generate()
    s = hb.HeartbeatSender(identity, [], api_url="http://n", base_model_id=NODE, status_fn=dict)
    s.add_gateway("http://g:1", KEY, SETTLER.address.lower())
    daemon = SimpleNamespace(
        config=SimpleNamespace(trusted_gateway_keys=()),
        heartbeat=s,
        identity=identity,
        settlers=SettlerRoster(lambda start: (1, [(SETTLER.address.lower(), True)]), min_gap_s=0),
    )
    doc = make_hello(SETTLER, gateway_url="http://g:1", gateway_key="34" * 32, node_id=identity.node_id)

    async def hello(doc):
        await daemon.settlers.sync(from_start=True)
        return await NodeDaemon._gateway_hello(daemon, doc)

    answer = asyncio.run(hello(doc))
    assert hb.verify_heartbeat(answer)["gateway_key"] == KEY and s.trusted_keys() == {KEY}
    # the operator's gateway, its key not learned yet (down at start): no heartbeat for the hello's key
    s.gateway_urls.append("http://operator:1")
    doc = make_hello(SETTLER, gateway_url="http://operator:1", gateway_key="34" * 32, node_id=identity.node_id)
    with pytest.raises(ApiError) as e:
        asyncio.run(hello(doc))
    assert (e.value.status, e.value.code) == (409, "gateway_key_unknown") and s.trusted_keys() == {KEY}
