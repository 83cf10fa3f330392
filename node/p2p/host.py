"""A node's libp2p host: built from the node seed (TCP + Noise + Yamux only; an inbound connection's slot given
back when it closes, a cap on those from one network, and a pace on those from a network on probation), the check
that its port is free, the guard that keeps one stream's error from stopping the host, the bounds on what the DHT
keeps and serves for strangers, the full multiaddr strings (…/p2p/<peer id>) peers dial, and py-libp2p's log records
routed into ours."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection

import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.rcmgr import Direction
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from common.logs import Throttled
from node.p2p.config import P2PConfig
from node.p2p.errors import P2PError
from node.p2p.standing import UNKNOWN

log = logging.getLogger(__name__)


def build_host(seed: bytes, config: P2PConfig):
    """A libp2p host with the node's Ed25519 identity, TCP + Noise + Yamux only; returns (key pair, host)."""
    key_pair = create_new_key_pair(seed)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},  # Mplex is ~6x slower for bulk transfers
        listen_addrs=[Multiaddr(config.listen)],
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,  # brings a dial from ~250 ms to ~15 ms in py-libp2p
            max_connections=config.max_connections,
            high_watermark=config.max_connections,
            low_watermark=min(8, config.max_connections),
            min_connections=min(4, config.max_connections),
            dial_timeout=config.dial_timeout,
        ),
    )
    _bound_inbound(host.get_network(), config.max_inbound_per_network)
    return key_pair, host


class _InboundSlots:
    """Stands in for py-libp2p 0.8.1's `Swarm._inbound_limiter`: max_connections - min_connections slots, one
    taken by the task that accepts an inbound connection and given back when that task ends (the rest of
    max_connections is left to the node's own dials). Its own counts the same; it also tells whether the current
    task holds one (`_bound_inbound`)."""

    def __init__(self, slots: int) -> None:
        self.total_tokens = slots
        self._holders: set = set()

    @property
    def borrowed_tokens(self) -> int:
        return len(self._holders)

    def holds(self) -> bool:
        return trio.lowlevel.current_task() in self._holders

    def acquire_nowait(self) -> None:
        if len(self._holders) >= self.total_tokens:
            raise trio.WouldBlock
        self._holders.add(trio.lowlevel.current_task())

    def release(self) -> None:
        self._holders.discard(trio.lowlevel.current_task())


class _InboundConnectionClosed(Exception):
    """Ends py-libp2p's handler task of an inbound connection once the connection has closed."""


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def network_of(address: str) -> str:
    """The network one party is taken to hold, for caps that peer ids (free) cannot get around: a public IPv4
    address's /24 and a public IPv6 address's /64 (a host is given a /64 of its own, a cloud account many addresses
    of one /24); any other address alone (loopback, private, link-local: peers of a local mesh or one cluster)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        # an IPv4 address written as IPv6 is its IPv4 network: mapped, 6to4 (one IPv4 owner had 65,536 /64s), Teredo
        # (each address was its own network) and NAT64's well-known prefix (every IPv4 peer was one /64); re-attack
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip.teredo is not None:
            ip = ip.teredo[1]
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if not ip.is_global:
        return str(ip)
    return str(ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 64}", strict=False))


def remote_address(conn) -> str | None:
    """The remote IP address of a connection (raw or muxed) or a stream; None where it has none or it cannot be
    read (a connection closing)."""
    try:
        remote = conn.get_remote_address() if hasattr(conn, "get_remote_address") else None
    except Exception:
        return None
    return str(remote[0]) if remote and remote[0] else None


# The least time between two new inbound connections taken from one address of a network on probation
# (`pace_inbound`). 0.5 s, not more: py-libp2p dials an address 4 times over about 0.7 s (retries after 0.1, 0.2 and
# 0.4 s) and then keeps from dialling the peer for 60 s (its negative cache), so one dial of an honest peer behind that
# address spans a whole interval and gets in unless another connection from there took it meanwhile. Not less: each
# connection taken costs the node its Noise handshake, Yamux, identify and a pubsub stream, 20-30 ms of CPU
# (measured), 2 a second at most from the address
PROBATION_CONNECT_S = 0.5
# ... and from one address in it: connections from an address whose interval is not over are closed without taking
# the network's, so one address's bare TCP connects (a stranger's loop at 20 a second let 1 of 8 honest dials from the
# same network in; re-attack) leave the network's other addresses theirs, 16 a second between them at most
NETWORK_CONNECT_S = PROBATION_CONNECT_S / 8
PACED_KEPT = 4096  # addresses and networks whose last connection taken is remembered at once (oldest forgotten)


class _InboundPace:
    """When each address and network on probation (`on_probation`, set by `pace_inbound` once the pubsub exists;
    None until then) last had a new inbound connection taken: one within PROBATION_CONNECT_S of its address's, or
    NETWORK_CONNECT_S of its network's, is refused."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.on_probation: Callable[[str], bool] | None = None
        self._clock = clock
        # "address A" or "network N" -> when its last connection was taken (the oldest first)
        self._taken: OrderedDict[str, float] = OrderedDict()
        self._log = Throttled(log, logging.INFO)  # strangers make it happen

    def admit(self, address: str, network: str) -> bool:
        """Whether a new inbound connection from `address` (in `network`, network_of's) may go on to its handshake:
        one per PROBATION_CONNECT_S from the address and one per NETWORK_CONNECT_S from the network while it is on
        probation (when it may, the times it was taken are kept)."""
        now = self._clock()
        # the oldest first: those PROBATION_CONNECT_S old and more decide nothing any more
        while self._taken and now - next(iter(self._taken.values())) >= PROBATION_CONNECT_S:
            self._taken.popitem(last=False)
        if self.on_probation is None or not self.on_probation(network):
            return True
        for key, interval in ((f"address {address}", PROBATION_CONNECT_S), (f"network {network}", NETWORK_CONNECT_S)):
            last = self._taken.get(key)
            if last is not None and now - last < interval:
                self._log(
                    "inbound connection from %s closed before its handshake: its network %s is on probation, and "
                    "the %s took one %.2f s ago (one per %.2f s)",
                    address,
                    network,
                    key.split()[0],
                    now - last,
                    interval,
                )
                return False
        for key in (f"address {address}", f"network {network}"):
            self._taken.pop(key, None)
            self._taken[key] = now
        while len(self._taken) > PACED_KEPT:
            self._taken.popitem(last=False)
        return True


def pace_inbound(host, on_probation: Callable[[str], bool]) -> None:
    """From now on, take at most one new inbound connection per PROBATION_CONNECT_S from an address, and per
    NETWORK_CONNECT_S from a network, that `on_probation` names (network_of's), closing the rest before their Noise
    handshake. The pubsub tells (GuardedPubsub.on_probation) and is built after the host: hence a hook, set once it
    exists. Peer ids cost nothing: a stranger taking a new one
    per connection had each cut off by its first strike, and still cost the node each connection's handshake,
    Yamux, identify and pubsub stream, about as much CPU as it spent itself (red team). The node's own dials are not
    paced."""
    host.get_network()._loramesh_inbound_pace.on_probation = on_probation


def _bound_inbound(swarm, per_network: int) -> None:
    """End the swarm's handler task of an inbound connection when the connection closes, take at most
    `per_network` inbound connections from one network (`network_of`) at once, and from a network on probation new
    ones at a pace (`pace_inbound`).

    After the upgrade the handler waited for the whole host to stop, and held its inbound slot until then: after
    max_connections - min_connections inbound connections in its life, all long closed, a node accepted none and
    was off the mesh (any peer's churn did it, a stranger with throwaway ids in seconds), and each left a task
    behind. Only the handler raises out of that wait (the swarm's handler takes the raise as a connection ended:
    it closes what is closed already and releases the slot); the upgrade's other callers get the connection as
    before. Peer ids cost nothing, addresses do: without the cap by address, one machine's 60 connections held
    every inbound slot, and the node's own dials had the min_connections left; by exact address, a host's IPv6
    /64 is as many addresses as it likes."""
    slots = _InboundSlots(int(swarm._inbound_limiter.total_tokens))
    swarm._inbound_limiter = slots
    pace = swarm._loramesh_inbound_pace = _InboundPace()
    upgrade = swarm.upgrade_inbound_raw_conn
    held: Counter[str] = Counter()

    async def upgrade_inbound(raw_conn, maddr):
        if not slots.holds():  # not the task of the swarm's inbound handler
            return await upgrade(raw_conn, maddr)
        address = remote_address(raw_conn) or "?"  # those unread are one network ("?" is no address)
        net = network_of(address)
        if held[net] >= per_network:
            await raw_conn.close()
            raise _InboundConnectionClosed(f"{held[net]} inbound connections from {net} already")
        if not pace.admit(
            address, net
        ):  # closed before the Noise handshake: what a connection costs is mostly after it
            await raw_conn.close()
            raise _InboundConnectionClosed(f"{net} on probation took an inbound connection within the interval")
        held[net] += 1
        try:
            muxed = await upgrade(raw_conn, maddr)
            closed = getattr(muxed, "event_closed", None)  # Yamux's, the one muxer this host speaks
            if closed is None:
                return muxed
            await closed.wait()
            raise _InboundConnectionClosed("connection closed")
        finally:
            held[net] -= 1
            if not held[net]:
                del held[net]

    swarm.upgrade_inbound_raw_conn = upgrade_inbound


def at_cap(swarm, peer_id) -> bool:
    """Whether dialling the peer needs a connection closed first: not connected to it, every slot taken."""
    taken = len(swarm.get_connections()) >= swarm.connection_config.max_connections
    return taken and not swarm.get_connections(peer_id)


def block_dials(swarm, peer_id) -> None:
    """Put the peer in py-libp2p's negative cache of failed dials (~60 s): no dial of this host reaches it
    meanwhile."""
    cache = getattr(swarm, "_negative_peer_cache", None)
    if cache is not None:
        cache.mark_failed(str(peer_id))


def dial_blocked(swarm, peer_id) -> bool:
    """Whether py-libp2p would refuse to dial the peer at once (its negative cache of failed dials, ~60 s)."""
    cache = getattr(swarm, "_negative_peer_cache", None)
    return cache is not None and cache.is_blocked(str(peer_id))


async def answers_tcp(addrs: Collection[Multiaddr], timeout: float) -> bool:
    """Whether one of `addrs` accepts a TCP connection within `timeout` (closed at once). A dial at the connection
    cap asks first: a connection closed to make room for an address where nothing answers (a node registered with
    a dead address costs a stranger gas only) was lost for nothing. One that accepts and then stalls the handshake
    still costs a connection; telling it apart would take py-libp2p's dial split at the upgrade."""
    targets = []
    for addr in addrs:
        names = {proto.name: value for proto, value in addr.items()}
        host = next((names[k] for k in ("ip4", "ip6", "dns4", "dns6", "dns") if k in names), None)
        if host is not None and "tcp" in names:
            targets.append((host, int(names["tcp"])))
    answered = False

    async def knock(host: str, port: int, scope: trio.CancelScope) -> None:
        nonlocal answered
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return
        answered = True
        scope.cancel()  # one is enough
        await stream.aclose()

    # all at once: an address that drops SYNs (a private one a peer lists first) must not use up the time
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for host, port in targets:
                nursery.start_soon(knock, host, port, nursery.cancel_scope)
    return answered


def connection_to_close(
    swarm,
    standing: Callable[[str], int],
    dialing,
    spared: Collection[str],
    busy: TProtocol,
    uploading: Collection[str] = (),
):
    """The peer whose connection goes so that this node can dial `dialing`, when every connection slot is taken
    (None when none need go, or none may). py-libp2p refuses a dial at max_connections and its pruner trims only
    above it, so 60 strangers' idle inbound connections and 4 of the node's own kept it from dialling any new
    provider, for as long as they were held (red team: an honest provider unreachable 100 s and more).

    Never a `spared` peer's (one this node is fetching from, or closing for another dial: two dials at once closed
    one connection, and one failed), nor one carrying a `busy` stream of a peer with standing: a stranger's stream
    does not count, since opening one and never asking (the server waits request_timeout) would keep its
    connection for good (review). Nor one of a peer reading a package from this node (`uploading`: the server
    tells, by its writes past the muxer's first window; asking alone is not enough). Nor one of higher standing
    than the peer dialled (a stranger's announcement would close a registered node's connection). The lowest
    standing goes first, then the node's own dials before a peer's, then the oldest. While the inbound slots are
    all taken, only the node's own dials may
    go: a stranger's slot, freed, would be a stranger's again before the dial ends. While they are not, a stranger
    dialling again at once may still take the slot first; the dial then fails, and the next one tries again
    (holding inbound connections back meanwhile let strangers shut honest peers out, red team)."""
    if not at_cap(swarm, dialing):
        return None
    slots = swarm._inbound_limiter
    inbound_full = slots.borrowed_tokens >= slots.total_tokens
    ceiling = standing(dialing.to_base58())
    best, best_key = None, None
    for peer_id, conns in swarm.get_connections_map().items():
        pid = peer_id.to_base58()
        if peer_id == dialing or pid in spared:
            continue
        level, inbound = standing(pid), any(c.direction == Direction.INBOUND for c in conns)
        if level > ceiling or (inbound and inbound_full):
            continue
        if level > UNKNOWN and any(s.get_protocol() == busy for c in conns for s in c.get_streams()):
            continue
        if pid in uploading:
            continue
        key = (level, inbound, min(getattr(c, "_created_at", 0.0) for c in conns))
        if best_key is None or key < best_key:
            best, best_key = peer_id, key
    return best


def refuse_taken_port(listen: str) -> None:
    """Fail when another process already listens on the port.

    py-libp2p sets SO_REUSEPORT on its listeners, so a second node on the same port would start
    fine and the kernel would split incoming connections between the two. A probe without
    SO_REUSEPORT cannot bind while another listener holds the port.
    """
    ma = Multiaddr(listen)
    protos = {p.name for p in ma.protocols()}
    if "tcp" not in protos or int(ma.value_for_protocol("tcp")) == 0:
        return
    family, host = (
        (socket.AF_INET6, ma.value_for_protocol("ip6"))
        if "ip6" in protos
        else (socket.AF_INET, ma.value_for_protocol("ip4"))
    )
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a restart right after a crash must not trip over TIME_WAIT sockets.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(ma.value_for_protocol("tcp"))))
        except OSError as e:
            raise P2PError(f"cannot listen on {listen}: {e.strerror or e}") from e


def addr_str(addr: Multiaddr, peer_id: str) -> str:
    """The full multiaddr string a peer dials: `addr` with /p2p/<peer id> appended unless it has one."""
    s = str(addr)
    return s if "/p2p/" in s else f"{s}/p2p/{peer_id}"


def full_addrs(host) -> list[str]:
    """The host's listen addresses as full multiaddr strings (…/p2p/<peer id>)."""
    peer_id = host.get_id().to_base58()
    return [addr_str(a, peer_id) for a in host.get_addrs()]


def guard_stream_handlers(host) -> None:
    """Wrap every registered protocol handler so that an error from one stream ends only that stream.

    py-libp2p runs handlers inside the swarm's own task group: an exception a handler lets through
    (pubsub lets protobuf's DecodeError through for an RPC that is not protobuf) stops the whole
    swarm, and the node is off the mesh for good while its process lives on. Call once every
    handler is registered (GossipSub, Kademlia, ours).
    """
    handlers = host.get_mux().handlers
    for protocol, handler in list(handlers.items()):
        if handler is not None and not getattr(handler, "_loramesh_guarded", False):
            handlers[protocol] = _guarded(protocol, handler)


def bound_provider_store(store, max_keys: int) -> None:
    """Keep a DHT's provider records to `max_keys` content keys. py-libp2p's store caps the providers of one key
    (20) and each peer's ADD_PROVIDER messages (10 per 10 s), but not the keys: a stranger with fresh peer ids
    (free) added a key a second each for as long as records live (48 h). At the cap, expired records go first,
    then the key added longest ago that this node does not provide itself (its providers re-provide within a day;
    GossipSub announcements still find them meanwhile)."""
    add = store.add_provider

    def add_provider(key: bytes, provider) -> None:
        providers = store.providers
        if key not in providers and len(providers) >= max_keys:
            store.cleanup_expired()
            strangers = (k for k in providers if k not in store.providing_keys)
            for old in [next(strangers, None) for _ in range(len(providers) - max_keys + 1)]:
                if old is not None:
                    del providers[old]
        add(key, provider)

    store.add_provider = add_provider


DHT_STREAMS_PER_PEER = 2  # Kademlia streams one peer may hold open on a node at once
DHT_STREAMS_PER_NETWORK = 16  # and one network (`network_of`: peer ids cost nothing)
DHT_INBOUND_STREAMS = 64  # Kademlia streams a node serves at once (py-libp2p's own bound is 12)
DHT_READ_IDLE_S = 10.0  # a Kademlia stream silent this long (a message's bytes included) is reset
DHT_STREAM_LIFE_S = 60.0  # and one open this long, however it reads


def bound_dht_streams(dht) -> None:
    """Bound what one peer's Kademlia streams hold. py-libp2p 0.8.1 serves 12 inbound DHT streams at once, each
    for as long as its peer keeps it open, waiting for its next message with no deadline: one peer with 12
    silent streams kept the node's DHT from answering anyone (FIND_NODE, GET_PROVIDERS, ADD_PROVIDER). Here one
    peer holds at most DHT_STREAMS_PER_PEER and one network DHT_STREAMS_PER_NETWORK, a read waits DHT_READ_IDLE_S
    and a stream lives DHT_STREAM_LIFE_S; the node serves DHT_INBOUND_STREAMS at once. Call before
    guard_stream_handlers."""
    from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID

    handle = dht.handle_stream
    dht._inbound_limiter = trio.CapacityLimiter(DHT_INBOUND_STREAMS)
    held: Counter[str] = Counter()  # streams open, by peer and by network

    async def handle_stream(stream) -> None:
        keys = (f"peer {stream.muxed_conn.peer_id}", f"network {network_of(remote_address(stream) or '?')}")
        if held[keys[0]] >= DHT_STREAMS_PER_PEER or held[keys[1]] >= DHT_STREAMS_PER_NETWORK:
            await reset_stream(stream)
            return
        held.update(keys)
        try:
            with trio.move_on_after(DHT_STREAM_LIFE_S) as life:
                await handle(_ReadDeadline(stream, DHT_READ_IDLE_S))
            if life.cancelled_caught:
                await reset_stream(stream)
        finally:
            held.subtract(keys)
            for key in keys:
                if not held[key]:
                    del held[key]

    dht.handle_stream = handle_stream  # what the DHT registers again should its mode switch back to server
    dht.host.set_stream_handler(KAD_PROTOCOL_ID, handle_stream)


class _ReadDeadline:
    """A stream whose every read must return within `seconds` (else trio.TooSlowError, which the DHT's handler
    takes as a failed read and resets the stream); the rest is the stream's own."""

    def __init__(self, stream, seconds: float) -> None:
        self._stream, self._seconds = stream, seconds

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        with trio.fail_after(self._seconds):
            return await self._stream.read(n)


async def reset_stream(stream) -> None:
    """Reset a stream, giving up after 2 s and on any error: the peer may be gone or stalling."""
    with trio.move_on_after(2):
        try:
            await stream.reset()
        except Exception:
            pass


def _guarded(protocol, handler):
    async def run(stream) -> None:
        try:
            await handler(stream)
        except Exception as e:
            try:
                peer = str(stream.muxed_conn.peer_id)
            except AttributeError:
                peer = "?"
            log.info("%s stream from %s dropped: %s: %s", protocol, peer, type(e).__name__, str(e)[:200])
            await reset_stream(stream)

    run._loramesh_guarded = True  # type: ignore[attr-defined]
    return run


# -- py-libp2p's logs ------------------------------------------------------------------------------
# `import libp2p` sets its logger to propagate=False with no handler, so its warnings reach stderr
# through logging.lastResort, bypassing the node's logging config. We forward its records into
# `node.p2p.libp2p` instead, demoting known-benign noise to DEBUG (LIBP2P_DEBUG=1 shows all of it).

LIBP2P_TARGET = "node.p2p.libp2p"
LIBP2P_LINE_INTERVAL_S = 10.0  # the least time between two records from one line of the library above DEBUG
# Messages py-libp2p logs as warnings during normal operation (peers closing DHT or pubsub streams).
LIBP2P_BENIGN = (
    "Failed to read DHT message",
    "Stream closed",
    "stream reset",
    "Error reading from stream",
    "Connection closed",
    "add_conn failed",  # two peers dialling each other at once: one connection loses, harmlessly
)


class _Forward(logging.Handler):
    """Hands py-libp2p's records to LIBP2P_TARGET at or above `min_level`, benign ones demoted to DEBUG, and from
    one line of the library's code at most one record every LIBP2P_LINE_INTERVAL_S above DEBUG (the next one says
    how many were left out; those are at DEBUG). The library logs a line per stranger's item: one stranger's 2.9 MB
    of subscriptions wrote 19.2 MB of warnings, and a flood of messages 12.7 MB in 30 s (red team)."""

    def __init__(self, min_level: int) -> None:
        super().__init__()
        self.min_level = min_level
        self._last: dict[tuple[str, int], float] = {}  # the library's code lines: a bounded set
        self._left_out: Counter[tuple[str, int]] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < self.min_level:  # some libp2p modules set their own INFO level
            return
        msg = record.getMessage()
        if record.levelno < logging.ERROR and any(b.lower() in msg.lower() for b in LIBP2P_BENIGN):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        if record.levelno > logging.DEBUG:
            site, now = (record.pathname, record.lineno), time.monotonic()
            if now - self._last.get(site, float("-inf")) < LIBP2P_LINE_INTERVAL_S:
                self._left_out[site] += 1
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            else:
                if left := self._left_out.pop(site, 0):
                    record.msg, record.args = f"{msg} (and {left} more like it since the line before)", None
                self._last[site] = now
        if record.levelno < logging.ERROR and self.min_level > logging.DEBUG:
            record.exc_info = record.exc_text = None  # a library warning is one line; LIBP2P_DEBUG shows the rest
        target = logging.getLogger(LIBP2P_TARGET)
        if target.isEnabledFor(record.levelno):
            target.handle(record)


def route_libp2p_logging() -> None:
    """Forward the `libp2p` logger's records to `node.p2p.libp2p` (idempotent)."""
    lib = logging.getLogger("libp2p")
    if any(isinstance(h, _Forward) for h in lib.handlers):
        return
    debug = bool(os.environ.get("LIBP2P_DEBUG"))
    if not debug:
        lib.handlers.clear()
        lib.setLevel(logging.WARNING)
    lib.propagate = False
    lib.addHandler(_Forward(logging.DEBUG if debug else logging.WARNING))
