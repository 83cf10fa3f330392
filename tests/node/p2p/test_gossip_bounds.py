"""The node's GossipSub (node/p2p/gossip.py:MeshGossipSub) and py-libp2p's log records, bounded against strangers
(red team with strangers running GossipSub themselves)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from types import SimpleNamespace

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX
from multiaddr import Multiaddr

from node.adapters import AdapterStore
from node.p2p import P2PConfig, P2PNode
from node.p2p.discovery import (
    MAX_ANNOUNCEMENT_BYTES,
    NEWCOMERS_BURST,
    SIGNER_GAP_S,
    TOPIC,
    Announcement,
    sign_announcement,
)
from node.p2p.gossip import BAN_S, REFUSED_COPIES, STRIKE_FORGIVEN_S, STRIKES_ALLOWED, MeshGossipSub
from node.p2p.host import LIBP2P_TARGET, _Forward, build_host, full_addrs
from tests.node.p2p.malicious_peer import dial_at_once


def _gossipsub() -> MeshGossipSub:
    return MeshGossipSub(protocols=[PROTOCOL_ID_V12], degree=6, degree_low=4, degree_high=12)


def _peer() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


def test_the_equivocation_check_keeps_digests_not_messages():
    """py-libp2p kept every forwarded message whole until it had 1,000, then 500 of them: 98 MB of announcements
    held for good (red team)."""
    g, sender = _gossipsub(), os.urandom(38)
    data = b"x" * (MAX_ANNOUNCEMENT_BYTES - 1)
    for i in range(1000):
        msg = rpc_pb2.Message(data=data, topicIDs=[TOPIC], from_id=sender, seqno=i.to_bytes(8, "big"))
        assert g._check_equivocation(msg)
        assert g._check_equivocation(msg)  # the same message again is no equivocation
    assert sum(len(v) for v in g.equivocation_detection.values()) <= 1000 * 32
    other = rpc_pb2.Message(data=b"y", topicIDs=[TOPIC], from_id=sender, seqno=(0).to_bytes(8, "big"))
    assert not g._check_equivocation(other)  # another message under a number already seen still is


def test_the_nodes_own_messages_go_to_every_peer_on_the_topic_and_relayed_ones_to_the_mesh():
    """16 strangers in a holder's mesh that forwarded nothing kept its announcements from a neighbour outside the
    mesh, 0 times in 10 (red team): its own messages now go to every peer on the topic."""
    g, me = _gossipsub(), _peer()
    mesh_peer, others = _peer(), [_peer() for _ in range(3)]
    g.pubsub = SimpleNamespace(my_id=me, peer_topics={TOPIC: {mesh_peer, *others}})
    g.peer_protocol = {p: PROTOCOL_ID_V12 for p in (mesh_peer, *others)}
    g.mesh = {TOPIC: {mesh_peer}}
    assert set(g._get_peers_to_send([TOPIC], msg_forwarder=me, origin=me)) == {mesh_peer, *others}
    relayed = set(g._get_peers_to_send([TOPIC], msg_forwarder=others[0], origin=others[1]))
    assert relayed == {mesh_peer}


def test_one_line_of_the_library_logs_once_an_interval(caplog):
    """py-libp2p logs a line per stranger's item: 2.9 MB of a stranger's subscriptions wrote 19.2 MB of warnings
    (red team)."""
    forward = _Forward(logging.INFO)

    def record(line: int, i: int) -> logging.LogRecord:
        return logging.LogRecord("libp2p.pubsub", logging.WARNING, "pubsub.py", line, "peer %d: too many", (i,), None)

    with caplog.at_level(logging.DEBUG, logger=LIBP2P_TARGET):
        for i in range(1000):
            forward.emit(record(10, i))
        forward.emit(record(20, 0))  # another line of the library's has its own interval
    ours = [r for r in caplog.records if r.pathname == "pubsub.py"]
    warned = [r for r in ours if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warned] == ["peer 0: too many", "peer 0: too many"]
    assert sum(r.levelno == logging.DEBUG for r in ours) == 999  # kept, at DEBUG
    forward._last[("pubsub.py", 10)] -= 3600  # an interval later: the next says how many were left out
    forward.emit(record(10, 1000))
    last = [r for r in caplog.records if r.pathname == "pubsub.py"][-1]
    assert last.levelno == logging.WARNING
    assert last.getMessage() == "peer 1000: too many (and 999 more like it since the line before)"


@pytest.fixture
def node(tmp_path):
    """A running node with no peer: what its pubsub and Discovery are given here, nothing else gives them."""
    node = P2PNode(
        seed=os.urandom(32),
        store=AdapterStore(tmp_path / "s"),
        owner_of=lambda _a: None,
        config=P2PConfig(listen="/ip4/127.0.0.1/tcp/0"),
    )
    node.start()
    yield node
    node.stop()


@pytest.fixture
def discovery(node):
    """A running node's Discovery (its validator is called here as GossipSub calls it: with no peer, nothing
    else touches it meanwhile)."""
    return node._m().discovery


def _message(key_pair, ts_ms: int, topics=(TOPIC,)) -> rpc_pb2.Message:
    ann = Announcement(str(ID.from_pubkey(key_pair.public_key)), ("/ip4/127.0.0.1/tcp/1",), (), ts_ms)
    return rpc_pb2.Message(data=sign_announcement(ann, key_pair.private_key), topicIDs=list(topics))


def test_a_flood_of_new_signers_leaves_known_signers_and_the_nodes_own_announcements_through(discovery):
    """One budget for every stranger's announcements let one key's flood silence an unregistered node, its own
    publish included (py-libp2p runs the validator on it): 0 of 20 arrived (red team). New signers share a budget;
    a signer the book holds, and the node itself, are held to a pace of their own."""
    clock = [1000.0]
    discovery._clock, discovery._budget_at = (lambda: clock[0]), clock[0]  # the budget's time is the test's
    now, forwarder = int(time.time() * 1000), _peer()
    known = create_new_key_pair()
    first = _message(known, now - 5000)
    assert discovery._validate_gossip(forwarder, first)
    discovery.book.add(discovery._verify(first.data))  # as the receive loop does
    keys = [create_new_key_pair() for _ in range(NEWCOMERS_BURST + 20)]
    taken = sum(discovery._validate_gossip(forwarder, _message(k, now)) for k in keys)
    assert taken == NEWCOMERS_BURST - 1  # (the first took one) the rest wait for a refill
    clock[0] += SIGNER_GAP_S  # every signer's pace allows one more
    discovery._newcomers_budget, discovery._budget_at = 0.0, clock[0]  # spent, and nothing refilled since
    # a key taken once that the book does not hold (it was full) is still new: the budget, not a pace of its own
    assert not discovery._validate_gossip(forwarder, _message(keys[0], now + 1))
    assert discovery._validate_gossip(forwarder, _message(known, now))
    assert not discovery._validate_gossip(forwarder, _message(known, now + 1))  # within its pace
    clock[0] += SIGNER_GAP_S
    assert not discovery._validate_gossip(forwarder, first)  # a replay of what the book holds is not relayed
    own = Announcement(discovery.peer_id, ("/ip4/127.0.0.1/tcp/1",), (), now)
    mine = rpc_pb2.Message(data=sign_announcement(own, discovery._key), topicIDs=[TOPIC])
    me = discovery.pubsub.my_id
    assert discovery._validate_gossip(me, mine) and discovery._validate_gossip(me, mine)  # its own publish
    relayed = [discovery._validate_gossip(forwarder, mine) for _ in range(3)]  # by a stranger: paced as anyone's
    assert relayed == [True, False, False]


def test_a_message_naming_the_topic_more_than_once_is_refused(discovery):
    """py-libp2p runs a topic's validator once per time a message names it: one message naming it 60 times spent
    60 of the newcomers' budget (red team)."""
    key = create_new_key_pair()
    now = int(time.time() * 1000)
    assert not discovery._validate_gossip(_peer(), _message(key, now, topics=[TOPIC] * 60))
    assert not discovery._validate_gossip(_peer(), _message(key, now, topics=[TOPIC, "other"]))
    assert discovery._newcomers_budget == NEWCOMERS_BURST
    assert discovery._validate_gossip(_peer(), _message(key, now))


def _signed(key_pair, data: bytes, topics=(TOPIC,)) -> rpc_pb2.Message:
    """A pubsub message as a peer with `key_pair` sends it: its own, signed."""
    sender = ID.from_pubkey(key_pair.public_key)
    msg = rpc_pb2.Message(data=data, topicIDs=list(topics), from_id=sender.to_bytes(), seqno=os.urandom(8))
    msg.signature = key_pair.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    msg.key = key_pair.public_key.serialize()
    return msg


def _poll(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)


def test_no_verdict_is_cached_so_a_strangers_copy_cannot_refuse_the_honest_one(node, discovery):
    """py-libp2p cached each verdict by the message's bytes for 300 s, while the validator's verdict depends on
    the forwarder and the pace as well: a stranger that sent an honest announcement's bytes first, under the topic
    named twice, had the honest copy refused (red team: 3 of 3 announcements never reached the book). Now each copy
    is judged as it comes: refused while the newcomers' budget is spent, taken once it is not."""
    from libp2p.pubsub.pubsub import ValidationError

    pubsub, stranger, relay = node._m().pubsub, create_new_key_pair(), create_new_key_pair()
    data = _message(create_new_key_pair(), int(time.time() * 1000)).data
    discovery._newcomers_budget, discovery._budget_at = 0.0, discovery._clock()
    with pytest.raises(ValidationError):
        node._thread.call(pubsub.validate_msg, ID.from_pubkey(stranger.public_key), _signed(stranger, data))
    discovery._newcomers_budget = 1.0
    node._thread.call(pubsub.validate_msg, ID.from_pubkey(relay.public_key), _signed(relay, data))
    # and through the whole path: a copy under the topic named twice first, then the honest one
    discovery._newcomers_budget = 1.0
    holder = create_new_key_pair()
    data = _message(holder, int(time.time() * 1000)).data
    node._thread.call(pubsub.push_msg, ID.from_pubkey(stranger.public_key), _signed(stranger, data, [TOPIC] * 2))
    node._thread.call(pubsub.push_msg, ID.from_pubkey(relay.public_key), _signed(relay, data))
    _poll(lambda: discovery.book.holds(str(ID.from_pubkey(holder.public_key))))


def test_a_peer_past_its_strikes_is_cut_off_from_gossip_for_a_while(node, discovery):
    """What no honest peer sends (a bad signature, a failed announcement, a control frame for topics the node does
    not know) counts against the peer that sent it; past STRIKES_ALLOWED it is cut off (red team: one stranger's
    flood of such frames held a node at a full core). An announcement out of date is no strike (clocks differ)."""
    pubsub, gossipsub = node._m().pubsub, node._m().gossipsub
    clock = [0.0]
    pubsub._clock = lambda: clock[0]
    stranger = create_new_key_pair()
    sid = ID.from_pubkey(stranger.public_key)
    now = int(time.time() * 1000)
    stale = _signed(stranger, _message(create_new_key_pair(), now - 3_600_000).data)
    for _ in range(2 * STRIKES_ALLOWED):
        node._thread.call(pubsub.push_msg, sid, stale)
    assert not pubsub.is_peer_blacklisted(sid)
    forged = _signed(stranger, _message(create_new_key_pair(), now).data)
    forged.data = forged.data.replace(b'"v":1', b'"v":2')  # its pubsub signature no longer matches
    bad = [_signed(stranger, b"not an announcement"), _signed(stranger, b"x", [TOPIC, "other"])]
    for msg in [forged] * (STRIKES_ALLOWED - 3) + bad:
        node._thread.call(pubsub.push_msg, sid, msg)
    assert not pubsub.is_peer_blacklisted(sid)  # STRIKES_ALLOWED - 1 so far
    grafts = rpc_pb2.ControlMessage(graft=[rpc_pb2.ControlGraft(topicID=t) for t in (TOPIC, "made-up", "other")])
    rpc = rpc_pb2.RPC(control=grafts)
    node._thread.call(gossipsub.handle_rpc, rpc, sid)  # one frame, one strike; what it says of other topics is dropped
    assert [g.topicID for g in rpc.control.graft] == [TOPIC]
    assert not pubsub.is_peer_blacklisted(sid)
    node._thread.call(pubsub.push_msg, sid, bad[0])
    assert pubsub.is_peer_blacklisted(sid)
    honest = create_new_key_pair()
    signer = create_new_key_pair()
    node._thread.call(pubsub.push_msg, sid, _signed(stranger, _message(signer, now).data))  # dropped: cut off
    node._thread.call(pubsub.push_msg, ID.from_pubkey(honest.public_key), _signed(honest, _message(honest, now).data))
    _poll(lambda: discovery.book.holds(str(ID.from_pubkey(honest.public_key))))
    assert not discovery.book.holds(str(ID.from_pubkey(signer.public_key)))
    clock[0] += BAN_S
    assert not pubsub.is_peer_blacklisted(sid)  # the ban ends


def test_announcements_past_the_budget_are_refused_before_any_signature_and_their_bytes_kept(node, discovery):
    """A flood of fresh keys' announcements past the newcomers' budget cost the node two pubsub signatures and the
    announcement's own checked each: 0.9 of a core (red team). They are refused before any signature is checked,
    and the same bytes from the same peer again cost a lookup; past REFUSED_COPIES of them, each is a strike. The
    refusal is none: what a node refuses for its own budget, an honest relay may pass on (review). Another peer's
    copy is judged as it comes."""
    pubsub = node._m().pubsub
    discovery._clock = lambda: 1000.0  # no refill
    discovery._newcomers_budget, discovery._budget_at = 0.0, 1000.0
    stranger, relay = create_new_key_pair(), create_new_key_pair()
    holder = create_new_key_pair()
    flood = _signed(stranger, _message(holder, int(time.time() * 1000)).data)
    flood.signature = bytes(64)  # checked, it would be a strike at once: the precheck refuses it first
    sid = ID.from_pubkey(stranger.public_key)
    asked = []
    precheck = pubsub.precheck
    pubsub.precheck = lambda forwarder, msg: asked.append(forwarder) or precheck(forwarder, msg)

    async def push(count: int) -> None:
        for _ in range(count):
            await pubsub.push_msg(sid, flood)

    node._thread.call(push, 1 + REFUSED_COPIES)  # an honest peer sends one again when asked (IWANT)
    assert not pubsub.is_peer_blacklisted(sid) and asked == [sid]  # read once, then known
    node._thread.call(push, STRIKES_ALLOWED + 1)  # again and again: a flood cycling what it has
    assert pubsub.is_peer_blacklisted(sid) and asked == [sid]
    discovery._newcomers_budget = 1.0  # the budget refilled: the same bytes from an honest relay are taken
    honest = _signed(relay, flood.data)
    node._thread.call(pubsub.push_msg, ID.from_pubkey(relay.public_key), honest)
    _poll(lambda: discovery.book.holds(str(ID.from_pubkey(holder.public_key))))


def test_copies_of_a_refused_message_are_counted_within_one_round_of_the_seen_cache(node, discovery):
    """An honest relay whose seen cache forgot a message may take it again from a stranger and pass it on once more:
    copies counted for good added up to strikes against it, round after round (re-attack). They are counted within
    REFUSED_ROUND_S of the refusal."""
    from node.p2p.gossip import REFUSED_ROUND_S

    pubsub = node._m().pubsub
    clock = [0.0]
    pubsub._clock = lambda: clock[0]
    discovery._clock = lambda: 1000.0  # no refill: the node refuses it for its budget each time
    discovery._newcomers_budget, discovery._budget_at = 0.0, 1000.0
    relay, holder = create_new_key_pair(), create_new_key_pair()
    copy = _signed(relay, _message(holder, int(time.time() * 1000)).data)
    rid = ID.from_pubkey(relay.public_key)

    async def push(count: int) -> None:
        for _ in range(count):
            await pubsub.push_msg(rid, copy)

    for _ in range(STRIKES_ALLOWED + 2):  # a round after another, each with what an honest relay sends at most
        node._thread.call(push, 1 + REFUSED_COPIES)
        clock[0] += REFUSED_ROUND_S
    assert rid not in pubsub._strikes and not pubsub.is_peer_blacklisted(rid)
    node._thread.call(push, 2 + REFUSED_COPIES)  # within one round, one copy more than that: a strike
    assert pubsub._strikes[rid][0] == 1


def test_subscriptions_to_other_topics_and_leaving_the_topic_are_strikes_and_strikes_are_forgiven(node):
    """A peer toggling subscriptions to made-up topics held a node at 0.9 of a core, past every other bound
    (re-attack): subscriptions to other topics are not kept and are strikes, and so is leaving the node's topic (an
    honest peer closes its connection). Strikes go down by one a minute: a rare one never adds up to a ban."""
    pubsub = node._m().pubsub
    clock = [0.0]
    pubsub._clock = lambda: clock[0]
    peer = _peer()

    def subscribe(topic: str, on: bool = True) -> None:
        rpc = rpc_pb2.RPC(subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=on, topicid=topic)])
        node._thread.call(lambda: _run(pubsub.handle_subscription, peer, rpc.subscriptions[0]))

    subscribe(TOPIC)
    assert peer in pubsub.peer_topics[TOPIC]
    for i in range(STRIKES_ALLOWED):
        subscribe(f"made-up-{i}")
    assert not any(t.startswith("made-up") for t in pubsub.peer_topics)
    assert not pubsub.is_peer_blacklisted(peer)  # STRIKES_ALLOWED so far
    clock[0] += 2 * STRIKE_FORGIVEN_S  # two forgiven: room for two more
    subscribe(TOPIC, on=False)
    subscribe(TOPIC)
    subscribe("made-up-again")
    assert not pubsub.is_peer_blacklisted(peer)
    subscribe("made-up-last")
    assert pubsub.is_peer_blacklisted(peer)


async def _run(fn, *args) -> None:
    fn(*args)


def test_an_older_announcement_than_the_book_holds_is_refused_before_any_signature(node, discovery):
    """One key's announcement taken, then its 100 older ones cycled: each was checked whole, as nothing refused is
    marked seen (0.89 of a core; re-attack). The book's date of the signer refuses them before any signature."""
    pubsub = node._m().pubsub
    holder, relay = create_new_key_pair(), create_new_key_pair()
    now = int(time.time() * 1000)
    node._thread.call(pubsub.push_msg, ID.from_pubkey(relay.public_key), _signed(relay, _message(holder, now).data))
    _poll(lambda: discovery.book.holds(str(ID.from_pubkey(holder.public_key))))
    older = _signed(relay, _message(holder, now - 1000).data)
    older.signature = bytes(64)  # checked, it would be a strike: refused before that
    assert not discovery.worth_checking(ID.from_pubkey(relay.public_key), older)
    later = discovery._clock() + SIGNER_GAP_S
    discovery._clock = lambda: later  # past the signer's pace: a newer one is worth checking
    assert discovery.worth_checking(ID.from_pubkey(relay.public_key), _signed(relay, _message(holder, now + 1).data))
    assert not discovery.worth_checking(ID.from_pubkey(relay.public_key), older)


def test_a_peer_cut_off_is_forgotten_as_a_dead_peer_is_and_a_graft_in_the_frame_that_cut_it_off_is_not_taken(node):
    """py-libp2p's blacklist forgot a peer's stream alone: the peer stayed in the mesh for good, a ghost the
    heartbeat never removed (review). Cut off, it is out of the mesh, the peers, their queues and the topic."""
    pubsub, gossipsub = node._m().pubsub, node._m().gossipsub
    peer = _peer()

    class Queue:
        closed = False

        def close(self):
            self.closed = True

    queue = Queue()

    async def join() -> None:
        pubsub.peer_queues[peer] = queue
        pubsub.peer_topics.setdefault(TOPIC, set()).add(peer)
        gossipsub.peer_protocol[peer] = PROTOCOL_ID_V12
        gossipsub.mesh.setdefault(TOPIC, set()).add(peer)
        for _ in range(STRIKES_ALLOWED):
            pubsub.strike(peer, "a test's")

    node._thread.call(join)
    frame = rpc_pb2.RPC(control=rpc_pb2.ControlMessage(graft=[rpc_pb2.ControlGraft(topicID=t) for t in ("x", TOPIC)]))

    async def graft() -> None:
        gossipsub.mesh[TOPIC].discard(peer)  # it left the mesh; this frame's GRAFT would put it back
        await gossipsub.handle_rpc(frame, peer)

    node._thread.call(graft)
    assert pubsub.is_peer_blacklisted(peer) and queue.closed
    assert peer not in gossipsub.mesh.get(TOPIC, ()) and peer not in gossipsub.peer_protocol
    assert peer not in pubsub.peer_queues and peer not in pubsub.peer_topics.get(TOPIC, ())


def _from_loopback(node, count: int) -> list:
    """`count` new peer ids, each holding a real connection to `node` from 127.0.0.1 (a bare host, TCP + Noise +
    Yamux, no pubsub of its own), kept until the node closes it or stops: their key pairs."""
    mesh = node._m()
    target = info_from_p2p_addr(Multiaddr(full_addrs(mesh.host)[0]))

    async def hold(task_status=trio.TASK_STATUS_IGNORED) -> None:
        key_pair, host = build_host(os.urandom(32), P2PConfig(listen="/ip4/127.0.0.1/tcp/0"))
        async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            await host.connect(target)
            task_status.started(key_pair)
            await trio.sleep_forever()

    async def start() -> list:
        return [await mesh._nursery.start(hold) for _ in range(count)]

    pairs = node._thread.call(start)

    async def connected() -> bool:
        held = mesh.host.get_network().get_connections_map()
        return all(ID.from_pubkey(pair.public_key) in held for pair in pairs)

    _poll(lambda: node._thread.call(connected))  # the node's side of each connection as well
    return pairs


def test_a_network_whose_peers_were_cut_off_again_and_again_is_on_probation(node, discovery):
    """Strikes are per peer id, and peer ids cost nothing: a stranger taking a new one for every STRIKES_ALLOWED
    strikes cost a node 2.6 times its own CPU with 96 KB announcements that fail their checks (red team). Once
    PROBATION_AFTER peers from one network were cut off within BAN_S, any peer from it is cut off by its first
    strike, until BAN_S after the last; a peer from it that earns none (every peer of a local mesh shares
    127.0.0.1) keeps its gossip, and a peer whose address cannot be read has its STRIKES_ALLOWED."""
    from node.p2p.gossip import PROBATION_AFTER, PROBATION_KEPT

    pubsub = node._m().pubsub
    clock = [0.0]
    pubsub._clock = lambda: clock[0]
    *cut, newcomer, honest, later = _from_loopback(node, PROBATION_AFTER + 3)
    junk = _signed(create_new_key_pair(), b"not an announcement")  # its pubsub signature verifies: one strike

    def send(pair, count: int) -> ID:
        peer = ID.from_pubkey(pair.public_key)
        for _ in range(count):
            node._thread.call(pubsub.push_msg, peer, junk)
        return peer

    for pair in cut:  # each its whole allowance, the last one included: the network is on no probation before
        peer = send(pair, STRIKES_ALLOWED)
        assert not pubsub.is_peer_blacklisted(peer)
        send(pair, 1)
        assert pubsub.is_peer_blacklisted(peer)
    assert pubsub.is_peer_blacklisted(send(newcomer, 1))  # a new peer id from there: its first strike cuts it off
    unread = _peer()  # no connection: its address cannot be read, and it has its allowance as before
    for _ in range(STRIKES_ALLOWED):
        node._thread.call(pubsub.push_msg, unread, junk)
    assert not pubsub.is_peer_blacklisted(unread)
    now = int(time.time() * 1000)
    hid = ID.from_pubkey(honest.public_key)
    node._thread.call(pubsub.push_msg, hid, _signed(honest, _message(honest, now).data))
    _poll(lambda: discovery.book.holds(str(hid)))
    assert not pubsub.is_peer_blacklisted(hid)
    clock[0] += BAN_S  # BAN_S after the last cut-off: the bans and the probation end
    peer = send(later, STRIKES_ALLOWED)
    assert not pubsub.is_peer_blacklisted(peer)
    assert not pubsub.is_peer_blacklisted(ID.from_pubkey(newcomer.public_key))

    async def many_networks() -> int:  # and the records are bounded
        for i in range(PROBATION_KEPT + 10):
            pubsub._count_network(f"10.0.{i // 256}.{i % 256}", clock[0])
        return len(pubsub._network_strikes)

    assert node._thread.call(many_networks) == PROBATION_KEPT


def test_a_network_whose_peers_each_stop_short_of_a_ban_is_on_probation_too(node):
    """A stranger that left each peer id at STRIKES_ALLOWED strikes, never cut off, put no network on probation
    (only cut-offs were counted) and cost a node 2.9 times its own CPU (re-attack). Every strike counts against the
    network: past PROBATION_STRIKES it is on probation, and a new peer id from it is cut off by its first strike."""
    from node.p2p.gossip import PROBATION_STRIKES

    pubsub = node._m().pubsub
    clock = [0.0]
    pubsub._clock = lambda: clock[0]
    stoppers = -(-PROBATION_STRIKES // STRIKES_ALLOWED)  # each at its allowance, together past the network's
    *short, newcomer = _from_loopback(node, stoppers + 1)
    junk = _signed(create_new_key_pair(), b"not an announcement")
    for pair in short:
        peer = ID.from_pubkey(pair.public_key)
        for _ in range(STRIKES_ALLOWED if pair is not short[-1] else PROBATION_STRIKES % STRIKES_ALLOWED or 16):
            node._thread.call(pubsub.push_msg, peer, junk)
    assert pubsub.on_probation("127.0.0.1")
    peer = ID.from_pubkey(newcomer.public_key)
    node._thread.call(pubsub.push_msg, peer, junk)
    assert pubsub.is_peer_blacklisted(peer)  # its first strike
    clock[0] += BAN_S  # BAN_S after the network's last strike, its probation ends
    assert not pubsub.on_probation("127.0.0.1")


def test_a_network_on_probation_has_its_new_inbound_connections_paced(node):
    """Cut off by its first strike, a new peer id from a network on probation still cost the node its connection's
    handshake, Yamux, identify and pubsub stream (red team: about what it cost the stranger). The node takes one
    new inbound connection from such a network per PROBATION_CONNECT_S, the rest closed before their handshake:
    of 6 new peer ids dialling at once, one or two get in. One dial of py-libp2p's (4 tries over about 0.7 s) made
    right after a connection was taken still gets in; the node's own dials to the network are not paced; other
    networks are not paced; and what the pace remembers is bounded."""
    from node.p2p import host as host_module
    from node.p2p.gossip import PROBATION_STRIKES

    mesh = node._m()
    pubsub = mesh.pubsub

    async def put_on_probation() -> None:
        pubsub._count_network("127.0.0.1", pubsub._clock(), PROBATION_STRIKES)

    node._thread.call(put_on_probation)
    assert pubsub.on_probation("127.0.0.1") and not pubsub.on_probation("127.0.0.2")
    target = info_from_p2p_addr(Multiaddr(full_addrs(mesh.host)[0]))
    listen = "/ip4/127.0.0.1/tcp/0"

    async def dials() -> tuple[int, float, float]:
        hosts = [build_host(os.urandom(32), P2PConfig(listen=listen))[1] for _ in range(9)]
        async with contextlib.AsyncExitStack() as stack:
            for host in hosts:
                await stack.enter_async_context(host.run(listen_addrs=[Multiaddr(listen)]))
            handshakes, burst = await dial_at_once(hosts[:6], target)  # 6 at once
            with trio.fail_after(10):
                start = time.monotonic()
                await hosts[6].connect(target)
                await hosts[7].connect(target)  # right after one was taken: its first tries are refused
                both = time.monotonic() - start
                # the node dials out to the network as it likes (from its own thread: this loop must answer)
                await trio.to_thread.run_sync(node.connect, full_addrs(hosts[8])[0])
            return handshakes, burst, both

    handshakes, burst, both = trio.run(dials)
    # taken at least PROBATION_CONNECT_S apart, however loaded the machine: all 6 got in before, in a fraction of it
    assert 1 <= handshakes <= 1 + burst / host_module.PROBATION_CONNECT_S, (handshakes, burst)
    # the second taken an interval after the first was (it got in: its later tries were taken)
    assert both >= host_module.PROBATION_CONNECT_S, both

    clock = [0.0]
    # bounded: a record an address and a network, kept an interval
    pace = host_module._InboundPace(clock=lambda: clock[0])
    pace.on_probation = lambda network: True
    assert all(pace.admit(f"10.0.{i // 256}.{i % 256}", f"net {i}") for i in range(host_module.PACED_KEPT))
    assert len(pace._taken) == host_module.PACED_KEPT
    clock[0] += host_module.PROBATION_CONNECT_S
    assert pace.admit("10.0.16.9", "net 0") and len(pace._taken) == 2
    # one address's connections take its own interval, not its network's: a stranger's bare TCP connects from one
    # address kept every honest dial from the same network out (re-attack)
    net = "1.2.3.0/24"
    assert pace.admit("1.2.3.4", net)
    clock[0] += host_module.NETWORK_CONNECT_S
    assert not any(pace.admit("1.2.3.4", net) for _ in range(100))  # its address's interval is not over
    assert pace.admit("1.2.3.5", net)  # another address of the network: the network's is
    assert not pace.admit("1.2.3.6", net)  # and again only past the network's interval
