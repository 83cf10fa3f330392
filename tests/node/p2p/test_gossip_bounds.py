"""The node's GossipSub (node/p2p/host.py:MeshGossipSub) and py-libp2p's log records, bounded against strangers
(red team with strangers running GossipSub themselves)."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12
from libp2p.pubsub.pb import rpc_pb2

from node.p2p.discovery import MAX_ANNOUNCEMENT_BYTES, TOPIC
from node.p2p.host import LIBP2P_TARGET, MeshGossipSub, _Forward


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
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warned] == ["peer 0: too many", "peer 0: too many"]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 999  # kept, at DEBUG
    forward._last[("pubsub.py", 10)] -= 3600  # an interval later: the next says how many were left out
    forward.emit(record(10, 1000))
    assert caplog.records[-1].levelno == logging.WARNING
    assert caplog.records[-1].getMessage() == "peer 1000: too many (and 999 more like it since the line before)"
