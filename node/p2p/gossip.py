"""The node's GossipSub and pubsub: py-libp2p 0.8.1's, with what strangers send counted by the peer that sends it.

Signed announcements are bounded by signer (node/p2p/discovery.py); here, what no honest peer sends is a strike
against the peer that sent it, and a peer past STRIKES_ALLOWED is cut off from the node's pubsub for BAN_S:
forgotten as a dead peer is, its connection closed, and closed again if it comes back (its messages dropped:
py-libp2p's blacklist). An honest loramesh peer forwards only what its own validator took, on the one topic every
node subscribes to, so a strike is:
- a message naming the node's topic and anything else, or the topic twice (py-libp2p drops one that names
  only other topics before it is read further);
- a message whose pubsub signature does not verify (or that has none);
- an announcement that fails its checks, as Discovery's validator finds (`strike`), other than by age or pace;
- a control frame (IHAVE, GRAFT, PRUNE) naming a topic the node does not subscribe to, once per frame;
- a subscription to another topic, or leaving the node's topic (an honest peer closes its connection).
Strikes go down by one a minute, so a rare false one never adds up to a ban. What the node refuses for its own
state (`precheck`: an announcement over its signer's pace, past the newcomers' budget, or no newer than what the
book holds of its signer) is refused before any signature is checked and is no strike; the same bytes from the
same peer again cost a lookup, and past REFUSED_COPIES of them each is a strike.
(Red team: one stranger cycling a few hundred frames of these held a victim at a full core for 5 to 9 times less
CPU of its own; py-libp2p caches no bad signature, and answers a GRAFT for a made-up topic with a signed PRUNE.)

Peer ids cost nothing, addresses do: a network (host.network_of: an IPv4 address's /24 and an IPv6 address's /64 when
public, the address alone otherwise, read from the peer's connection) whose peers earned PROBATION_STRIKES (what
PROBATION_AFTER peers cut off earn) within about BAN_S is on probation, and any peer from it is cut off by its first
strike, until BAN_S after the network's last. (Counted as cut-offs first: a stranger that left each peer id at 16
strikes put no network on probation, re-attack.) Peers from it that earn no strike are untouched: an honest peer behind
the attacker's address (every peer of a local mesh shares 127.0.0.1) keeps its gossip. (Red team: a stranger taking a
new peer id for every 16 strikes cost a node 2.6 times its own CPU with 96 KB announcements that fail their checks, four
of them 0.89 of a core; measured again, 3.0 times before and 1.0 after: what is left is a connection's own cost, about
even.) A peer whose address cannot be read has its STRIKES_ALLOWED, as before. What a connection costs is paced as well:
the host takes a new inbound connection from a network on probation once per host.PROBATION_CONNECT_S from each of its
addresses and once per host.NETWORK_CONNECT_S from the network, and closes the rest before their handshake
(`on_probation`, host.pace_inbound). One stranger taking a new peer id per announcement cost the node 0.19 CPU s/s, now
0.03; four at once 0.60, now 0.06 (measured).

py-libp2p's cache of validation verdicts is off: the key is the message's bytes, but the validator's verdict also
depends on the topics, the forwarder, the signer's pace and the book. A stranger that sent an honest announcement's
bytes first under a topic named twice had "invalid" cached for 300 s, and the honest copy refused from the cache; and
a replay past the seen cache (120 s) but within the validation cache (300 s) was relayed again unchecked."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import signature_validator

from common.logs import Throttled
from node.p2p.host import network_of, remote_address

log = logging.getLogger(__name__)

STRIKES_ALLOWED = 16  # what no honest peer sends, taken from one peer before it is cut off
BAN_S = 600.0  # how long a peer cut off stays so (peer ids cost nothing: its next connection is a new one anyway)
BANNED_KEPT = 4096  # peers kept cut off at once; the oldest ban ends first
STRUCK_KEPT = 4096  # peers with strikes remembered at once
STRIKE_FORGIVEN_S = 60.0  # a peer's strikes go down by one each this long
REFUSED_KEPT = 16384  # (peer, message id) pairs the precheck refused, remembered at once (about 3 MB)
# Copies of a message refused before that one peer may send again: an honest peer passes a message on once, and
# again only when asked (an IWANT, for the 3 heartbeats the message is offered)
REFUSED_COPIES = 5
# Copies are counted within this long of the refusal, py-libp2p's seen cache's time: an honest relay whose own seen
# cache forgot a message may take it again later from a stranger and pass it on once more, and copies counted for good
# would add up to strikes against it, round after round (re-attack, from reading the code)
REFUSED_ROUND_S = 120.0
# Peers cut off from one network within BAN_S that put it on probation: 3, not 2, so one broken or hostile client
# behind a shared address (a NAT, a cluster) and one false ban do not. Counted as the strikes they earn, every strike
# from the network: a stranger that left each peer id at 16 strikes, never cut off, put no network on probation and
# still cost the node 2.9 times its own CPU (re-attack)
PROBATION_AFTER = 3
PROBATION_STRIKES = PROBATION_AFTER * (STRIKES_ALLOWED + 1)
# a network's strikes go down by PROBATION_STRIKES each BAN_S: an honest network would need 51 false strikes in
# about 10 minutes to be put on probation (which ends BAN_S after its last strike; the count starts again from 0)
NETWORK_FORGIVEN_S = BAN_S / PROBATION_STRIKES
# Strikes a peer from a network on probation may earn: none, its first cuts it off. A new peer id costs its maker a
# key, a connection and a handshake, about what they cost the node: one bad item per id no longer pays
STRIKES_ON_PROBATION = 0
PROBATION_KEPT = 4096  # networks with strikes remembered at once (the oldest record forgotten first)


class _NoVerdicts:
    """Stands in for py-libp2p's ValidationCache: nothing is kept, every message not yet seen is validated."""

    def get(self, msg_id: bytes) -> None:
        return None

    def put(self, msg_id: bytes, result) -> None:
        pass

    def cleanup_expired(self) -> int:  # what the library's cleanup task calls
        return 0


class GuardedPubsub(Pubsub):
    """py-libp2p's Pubsub with strikes against peers that send what no honest peer sends (the module's docstring),
    and no cache of validation verdicts."""

    def __init__(self, *args, topics: frozenset[str], clock: Callable[[], float] = time.monotonic, **kwargs) -> None:
        """topics: the only ones the node's peers use (known from the start: a peer's subscription may come before
        the node's own)."""
        super().__init__(*args, **kwargs)
        self.known_topics = topics
        self.validation_cache = _NoVerdicts()
        self._clock = clock
        self._strikes: OrderedDict[ID, tuple[float, float]] = OrderedDict()  # peer -> (strikes, when counted)
        self._banned: OrderedDict[ID, float] = OrderedDict()  # peer -> when its ban ends
        self._log_ban = Throttled(log, logging.WARNING)  # strangers make it happen
        # cheap checks run before the signatures (Discovery's pace and budget): False refuses the message, no strike
        self.precheck: Callable[[ID, object], bool] | None = None
        # (peer, message id) the precheck refused -> copies of it the peer sent since
        self._refused_ids: OrderedDict[tuple[ID, bytes], tuple[int, float]] = OrderedDict()  # -> (copies, refused at)
        # network (network_of) -> (its strikes, when counted, when its probation ends): its strikes decayed as a
        # peer's are, at NETWORK_FORGIVEN_S
        self._network_strikes: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self._log_probation = Throttled(log, logging.WARNING)

    def strike(self, peer: ID, why: str) -> None:
        """Count what `peer` sent against it (`why`: what it was); past STRIKES_ALLOWED it is cut off, past
        STRIKES_ON_PROBATION if its network is on probation (the module's docstring)."""
        if peer == self.my_id or peer in self._banned:
            return
        now = self._clock()
        count, at = self._strikes.pop(peer, (0.0, now))
        # one forgiven each STRIKE_FORGIVEN_S: a rare false strike (a race, a peer's bug) never adds up to a ban
        count = max(0.0, count - (now - at) / STRIKE_FORGIVEN_S) + 1
        network = self._network(peer)
        if network is not None:
            self._count_network(network, now)
        allowed = STRIKES_ON_PROBATION if self._on_probation(network, now) else STRIKES_ALLOWED
        if count <= allowed:
            self._strikes[peer] = (count, now)
            while len(self._strikes) > STRUCK_KEPT:
                self._strikes.popitem(last=False)
            return
        self._log_ban(
            "peer %s cut off from gossip for %.0f s: %s (the last: %s)",
            peer,
            BAN_S,
            f"more than {allowed} items no honest peer sends"
            if allowed == STRIKES_ALLOWED
            else f"an item no honest peer sends, its network {network} on probation",
            why,
        )
        self._banned[peer] = now + BAN_S
        while len(self._banned) > BANNED_KEPT:
            self.remove_from_blacklist(self._banned.popitem(last=False)[0])
        self._cut_off(peer)

    def _network(self, peer: ID) -> str | None:
        """The network (host.network_of) of `peer`'s connection: its pubsub stream's, else any the swarm holds;
        None when there is none or its remote address cannot be read."""
        stream = self.peers.get(peer)
        conns = [stream.muxed_conn] if stream is not None else []
        try:
            conns += [conn.muxed_conn for conn in self.host.get_network().get_connections(peer)]
        except Exception as e:
            log.debug("the connections of %s: %s", peer, e)
        address = next((a for a in map(remote_address, conns) if a is not None), None)
        return None if address is None else network_of(address)

    def on_probation(self, network: str) -> bool:
        """Whether `network` (host.network_of's) is on probation now: the host takes its new inbound connections
        at a pace (host.pace_inbound), since each costs the node a handshake before any strike can cut it off."""
        return self._on_probation(network, self._clock())

    def _on_probation(self, network: str | None, now: float) -> bool:
        """Whether `network` earned PROBATION_STRIKES (less what time forgave, NETWORK_FORGIVEN_S each) within BAN_S
        of its last strike."""
        record = self._network_strikes.get(network) if network is not None else None
        return record is not None and now < record[2]

    def _count_network(self, network: str, now: float, strikes: int = 1) -> None:
        count, at, until = self._network_strikes.pop(network, (0.0, now, 0.0))
        count = max(0.0, count - (now - at) / NETWORK_FORGIVEN_S) + strikes
        if now < until or count >= PROBATION_STRIKES:  # on probation (again), until BAN_S from now
            if now >= until:
                self._log_probation(
                    "network %s on probation: %d items no honest peer sends from its peers (as many as %d peers cut "
                    "off earn); its peers are cut off by their first, until %.0f s after its last",
                    network,
                    PROBATION_STRIKES,
                    PROBATION_AFTER,
                    BAN_S,
                )
            count, until = 0.0, now + BAN_S
        self._network_strikes[network] = (count, now, until)
        while len(self._network_strikes) > PROBATION_KEPT:
            self._network_strikes.popitem(last=False)

    def _cut_off(self, peer: ID) -> None:
        """Blacklist `peer` and forget it as a dead peer is forgotten (its stream, queue, subscriptions and mesh
        places), then close its connection. (py-libp2p's add_to_blacklist forgot its stream alone: the peer stayed
        in the mesh for good, a ghost the heartbeat never removed; and it left the stream the peer sends on, which
        went on being read and parsed: a banned flooder still held the node at a full core. Review, measured.)"""
        self.blacklisted_peers.add(peer)
        self._clear_pending_announce_retries_for_peer(peer)
        self._forget_all_subscriptions(peer)
        stream = self.peers.pop(peer, None)
        queue = self.peer_queues.pop(peer, None)
        if queue is not None:
            queue.close()
        self.router.remove_peer(peer)
        self.manager.run_task(self._close, peer, stream)

    async def _close(self, peer: ID, stream) -> None:
        try:
            if stream is not None:
                await stream.reset()
            await self.host.disconnect(peer)
        except Exception as e:  # gone already, or closing
            log.debug("closing the connection to %s: %s", peer, e)

    async def stream_handler(self, stream) -> None:
        # a peer cut off that comes back is not read, and its connection is closed: kept, its gossip would stay dead
        # after the ban ends (the library checks its blacklist for the streams it opens, not for those a peer opens)
        peer = stream.muxed_conn.peer_id
        if self.is_peer_blacklisted(peer):
            await stream.reset()
            await self._close(peer, None)
            return
        await super().stream_handler(stream)

    def is_peer_blacklisted(self, peer_id: ID) -> bool:
        ends = self._banned.get(peer_id)
        if ends is not None and self._clock() >= ends:
            del self._banned[peer_id]
            self.remove_from_blacklist(peer_id)
        return super().is_peer_blacklisted(peer_id)

    def handle_subscription(self, origin_id: ID, sub_message) -> None:
        # subscriptions to other topics are not kept, and leaving the topic is not how an honest peer leaves (it
        # closes the connection): a peer toggling subscriptions held a node at 0.9 of a core (re-attack)
        if sub_message.topicid not in self.known_topics:
            self.strike(origin_id, "a subscription to a topic the node does not know")
            return
        if not sub_message.subscribe:
            self.strike(origin_id, "an unsubscription from the node's topic")
        super().handle_subscription(origin_id, sub_message)

    async def push_msg(self, msg_forwarder: ID, msg) -> None:
        if msg_forwarder != self.my_id and not self.is_peer_blacklisted(msg_forwarder):
            if len(msg.topicIDs) != 1 or msg.topicIDs[0] not in self.known_topics:
                self.strike(msg_forwarder, "a message on other topics than the node's")
                return
            msg_id = self._msg_id_constructor(msg)  # the bytes' digest, taken once for both lookups (a flood's path)
            if self.seen_messages.has(msg_id):
                return
            refused = (msg_forwarder, msg_id)
            copies, at = self._refused_ids.get(refused, (-1, 0.0))
            if copies >= 0 and self._clock() - at < REFUSED_ROUND_S:
                self._refused_ids[refused] = (copies + 1, at)
                if copies >= REFUSED_COPIES:
                    self.strike(msg_forwarder, "a message refused before, sent again and again")
                return
            if self.precheck is not None and not self.precheck(msg_forwarder, msg):
                self._refused(refused)
                return
            # checked here as well as by the library (which says nothing of a failure): a bad signature is a strike
            if self.strict_signing and not signature_validator(msg):
                self.strike(msg_forwarder, "a message whose signature does not verify")
                return
        await super().push_msg(msg_forwarder, msg)

    def _refused(self, refused: tuple[ID, bytes]) -> None:
        """A message the precheck refused (the peer that sent it, its id): kept, so the same bytes from the same peer
        cost a lookup only, and past REFUSED_COPIES of them each is a strike (a flood cycling prebuilt announcements
        past the newcomers' budget held a node at 0.91 of a core). The refusal itself is no strike: what a node
        refuses for pace or budget depends on its own state, and a stranger could have an honest relay pass on what
        this node refuses (review). Another peer's copy of the same bytes is judged as it comes."""
        self._refused_ids.pop(refused, None)  # a new round: the newest last, the first forgotten
        self._refused_ids[refused] = (0, self._clock())
        while len(self._refused_ids) > REFUSED_KEPT:
            self._refused_ids.popitem(last=False)


class MeshGossipSub(GossipSub):
    """py-libp2p 0.8.1's GossipSub, with the node's own messages sent to every peer on the topic (flood publish,
    go-libp2p's default), not its mesh alone: 16 strangers that joined the meshes and forwarded nothing had an
    honest holder's neighbour prune it, and the holder's announcements reached that neighbour 0 times in 10 (the
    first after 120 s, red team). The equivocation check keeps a digest of each message, not the message: 1,000
    announcements of up to 96 KB were held for good (98 MB measured). And control frames naming topics the node
    does not subscribe to are a strike against their sender, their entries for those topics dropped (GuardedPubsub)."""

    def _get_peers_to_send(self, topic_ids, msg_forwarder, origin, msg_id=None):
        peers = set(super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id))
        if self.pubsub is not None and origin == self.pubsub.my_id:
            unwanted = msg_id if msg_id is not None else object()
            for topic in topic_ids:
                peers.update(
                    p
                    for p in self.pubsub.peer_topics.get(topic, ())
                    if p in self.peer_protocol and unwanted not in self.dont_send_message_ids.get(p, ())
                )
            peers.discard(origin)
        return peers

    def _check_equivocation(self, msg) -> bool:
        key = msg.from_id + msg.seqno
        digest = hashlib.sha256(msg.data + b"\0".join(t.encode() for t in msg.topicIDs)).digest()
        seen = self.equivocation_detection.setdefault(key, digest)
        return seen == digest

    async def handle_rpc(self, rpc, sender_peer_id: ID) -> None:
        if isinstance(self.pubsub, GuardedPubsub) and rpc.HasField("control"):
            if self.pubsub.is_peer_blacklisted(sender_peer_id):
                return
            known = self.pubsub.known_topics
            foreign = False
            for kind in ("ihave", "graft", "prune"):
                entries = getattr(rpc.control, kind)
                if all(e.topicID in known for e in entries):
                    continue
                foreign = True
                kept = [e.SerializeToString() for e in entries if e.topicID in known]
                del entries[:]
                for raw in kept:
                    entries.add().ParseFromString(raw)
            if foreign:
                self.pubsub.strike(sender_peer_id, "a control frame naming topics the node does not subscribe to")
                if self.pubsub.is_peer_blacklisted(sender_peer_id):
                    return  # cut off by this frame: its GRAFT must not put it back in the mesh (review)
        await super().handle_rpc(rpc, sender_peer_id)
