"""The node's GossipSub and pubsub: py-libp2p 0.8.1's, with what strangers send counted by the peer that sends it.

Signed announcements are bounded by signer (node/p2p/discovery.py); here, what no honest peer sends is a strike
against the peer that sent it, and a peer past STRIKES_ALLOWED is cut off from the node's pubsub for BAN_S: its
connection closed, and its pubsub streams refused and its messages dropped (py-libp2p's blacklist) if it comes
back. An honest loramesh peer forwards only what its own validator took, on the one topic every node subscribes to,
so a strike is:
- a message on topics other than exactly the node's one (a topic named twice included);
- a message whose pubsub signature does not verify (or that has none);
- an announcement that fails its checks, as Discovery's validator finds (`strike`), other than by age or pace;
- a control frame (IHAVE, GRAFT, PRUNE) naming a topic the node does not subscribe to, once per frame;
- a subscription to another topic, or leaving the node's topic (an honest peer closes its connection);
- past REFUSED_PER_S, announcements refused before their signatures are checked (`precheck`: over their
  signer's pace, past the newcomers' budget, or older than what the book holds of their signer).
Strikes go down by one a minute, so a rare false one never adds up to a ban.
(Red team: one stranger cycling a few hundred frames of these held a victim at a full core for 5 to 9 times less
CPU of its own; py-libp2p caches no bad signature, and answers a GRAFT for a made-up topic with a signed PRUNE.)

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

log = logging.getLogger(__name__)

STRIKES_ALLOWED = 16  # what no honest peer sends, taken from one peer before it is cut off
BAN_S = 600.0  # how long a peer cut off stays so (peer ids cost nothing: its next connection is a new one anyway)
BANNED_KEPT = 4096  # peers kept cut off at once; the oldest ban ends first
STRUCK_KEPT = 4096  # peers with strikes remembered at once
STRIKE_FORGIVEN_S = 60.0  # a peer's strikes go down by one each this long
# Messages refused before their signatures are checked (`precheck`: a signer over its pace, the newcomers' budget
# spent) that one peer may send a second, and at once: an honest relay passes on what its own checks took, in a
# network of N nodes about N/30 a second (each announces every 30 s), so a network of 6,000 keeps within it; past
# it each refusal is a strike.
REFUSED_PER_S = 200.0
REFUSED_BURST = 2000.0


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
        self._refusals: OrderedDict[ID, tuple[float, float]] = OrderedDict()  # peer -> (allowance left, when)

    def strike(self, peer: ID, why: str) -> None:
        """Count what `peer` sent against it (`why`: what it was); past STRIKES_ALLOWED it is cut off."""
        if peer == self.my_id or peer in self._banned:
            return
        now = self._clock()
        count, at = self._strikes.pop(peer, (0.0, now))
        # one forgiven each STRIKE_FORGIVEN_S: a rare false strike (a race, a peer's bug) never adds up to a ban
        count = max(0.0, count - (now - at) / STRIKE_FORGIVEN_S) + 1
        if count <= STRIKES_ALLOWED:
            self._strikes[peer] = (count, now)
            while len(self._strikes) > STRUCK_KEPT:
                self._strikes.popitem(last=False)
            return
        self._log_ban(
            "peer %s cut off from gossip for %.0f s: more than %d items no honest peer sends (the last: %s)",
            peer,
            BAN_S,
            STRIKES_ALLOWED,
            why,
        )
        self._banned[peer] = self._clock() + BAN_S
        while len(self._banned) > BANNED_KEPT:
            self.remove_from_blacklist(self._banned.popitem(last=False)[0])
        self.add_to_blacklist(peer)  # its messages dropped, the stream this node sends on reset
        # and the connection closed: the library's blacklist leaves the stream the peer sends on, which went on
        # being read and parsed (a banned flooder still held the node at a full core, measured)
        self.manager.run_task(self._disconnect, peer)

    async def _disconnect(self, peer: ID) -> None:
        try:
            await self.host.disconnect(peer)
        except Exception as e:  # gone already, or closing
            log.debug("closing the connection to %s: %s", peer, e)

    async def stream_handler(self, stream) -> None:
        # a peer cut off that comes back is not read (the library checks its blacklist for the streams it opens, not
        # for those a peer opens to it)
        if self.is_peer_blacklisted(stream.muxed_conn.peer_id):
            await stream.reset()
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
            if self._is_msg_seen(msg):
                return
            if self.precheck is not None and not self.precheck(msg_forwarder, msg):
                self._refused(msg_forwarder)
                return
            # checked here as well as by the library (which says nothing of a failure): a bad signature is a strike
            if self.strict_signing and not signature_validator(msg):
                self.strike(msg_forwarder, "a message whose signature does not verify")
                return
        await super().push_msg(msg_forwarder, msg)

    def _refused(self, peer: ID) -> None:
        """A message of `peer` refused by the precheck: past its allowance (REFUSED_PER_S), a strike."""
        now = self._clock()
        left, at = self._refusals.pop(peer, (REFUSED_BURST, now))
        left = min(REFUSED_BURST, left + (now - at) * REFUSED_PER_S) - 1
        self._refusals[peer] = (max(left, 0.0), now)
        while len(self._refusals) > STRUCK_KEPT:
            self._refusals.popitem(last=False)
        if left < 0:
            self.strike(peer, "more messages refused for their signers' pace than an honest relay passes on")


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
        await super().handle_rpc(rpc, sender_peer_id)
