"""Settings of the p2p layer, checked when built."""

from __future__ import annotations

from dataclasses import dataclass

from multiaddr import Multiaddr


@dataclass(frozen=True, slots=True)
class P2PConfig:
    """Listen address, bootstrap peers, timeouts and limits of one node's libp2p host.

    Every limit here bounds what one peer (or a flood of made-up peer ids, which cost nothing) can
    make this node hold or wait for.
    """

    listen: str = "/ip4/0.0.0.0/tcp/4001"
    bootstrap: tuple[str, ...] = ()
    read_timeout: float = 10.0  # per read and per write on an adapter stream: a stalled provider
    dial_timeout: float = 5.0
    max_inbound_streams: int = 8  # concurrent adapter uploads served
    max_streams_per_peer: int = 2  # of those, how many one peer may hold
    request_timeout: float = 3.0  # an inbound stream must send its REQUEST frame within this
    header_timeout: float = 10.0  # a provider must send MANIFEST and SIGNATURE within this
    # A transfer must average min_rate bytes/s once transfer_grace seconds have passed, and end by
    # transfer_grace + size / min_rate: a provider trickling bytes is dropped and the next one tried.
    min_rate: float = 256 * 1024
    transfer_grace: float = 5.0
    backoff_base: float = 10.0  # a failed provider is tried last for base * 2**(failures-1) seconds...
    backoff_max: float = 600.0  # ...at most this long
    max_attempts: int = 8  # providers tried per fetch
    max_unknown_attempts: int = 3  # of those, peers with no standing (announced on GossipSub or the DHT)
    max_connections: int = 64  # py-libp2p's default auto-connector tops up towards 100-300
    max_inbound_per_network: int = 16  # inbound connections from one network at once (host.network_of)
    max_package_bytes: int = 4 << 30
    announce_interval: float = 30.0  # re-announce held adapters on GossipSub
    announce_max_age: float = 600.0  # older announcements are dropped
    announce_future_skew: float = 5.0  # announcements dated further ahead are refused (clock skew)
    book_max_peers: int = 1024  # announcing peers remembered
    book_max_ids: int = 65536  # adapter ids remembered over all peers (~120 bytes each)
    dht_provide_interval: float = 1.5  # a peer accepts 10 ADD_PROVIDER per 10 s, drops the rest
    dht_max_provider_keys: int = 16384  # content keys this node's DHT keeps provider records for (up to 20 each)
    discover_timeout: float = 10.0  # how long a fetch waits for a first provider
    dht_query_timeout: float = 3.0

    def __post_init__(self) -> None:
        try:
            Multiaddr(self.listen)
            for addr in self.bootstrap:
                Multiaddr(addr)
        except Exception as e:
            raise ValueError(f"bad multiaddr in p2p config: {e}") from e
        for name in (
            "read_timeout",
            "dial_timeout",
            "announce_interval",
            "announce_max_age",
            "dht_provide_interval",
            "discover_timeout",
            "dht_query_timeout",
            "request_timeout",
            "header_timeout",
            "min_rate",
            "transfer_grace",
            "backoff_base",
            "backoff_max",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"p2p config {name} must be > 0, got {getattr(self, name)}")
        if self.announce_future_skew < 0:
            raise ValueError(f"p2p config announce_future_skew must be >= 0, got {self.announce_future_skew}")
        for name in (
            "max_inbound_streams",
            "max_streams_per_peer",
            "max_connections",
            "max_inbound_per_network",
            "max_package_bytes",
            "max_attempts",
            "book_max_peers",
            "book_max_ids",
            "dht_max_provider_keys",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"p2p config {name} must be >= 1, got {getattr(self, name)}")
        if self.max_unknown_attempts < 0:
            raise ValueError(f"p2p config max_unknown_attempts must be >= 0, got {self.max_unknown_attempts}")
