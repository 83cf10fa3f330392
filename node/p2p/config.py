"""Settings of the p2p layer, checked when built."""

from __future__ import annotations

from dataclasses import dataclass

from multiaddr import Multiaddr


@dataclass(frozen=True, slots=True)
class P2PConfig:
    """Listen address, bootstrap peers, timeouts and limits of one node's libp2p host."""

    listen: str = "/ip4/0.0.0.0/tcp/4001"
    bootstrap: tuple[str, ...] = ()
    read_timeout: float = 10.0  # per read and per write on an adapter stream: a stalled provider
    dial_timeout: float = 5.0
    max_inbound_streams: int = 8  # concurrent adapter uploads served
    max_connections: int = 64  # the default auto-connector tops up towards 100-300 (pitfall 8)
    max_package_bytes: int = 4 << 30
    announce_interval: float = 30.0  # re-announce held adapters on GossipSub
    announce_max_age: float = 600.0  # older announcements are dropped
    dht_provide_interval: float = 1.5  # a peer accepts 10 ADD_PROVIDER per 10 s (pitfall 2)
    discover_timeout: float = 10.0  # how long a fetch waits for a first provider
    dht_query_timeout: float = 3.0

    def __post_init__(self) -> None:
        try:
            Multiaddr(self.listen)
            for addr in self.bootstrap:
                Multiaddr(addr)
        except Exception as e:
            raise ValueError(f"bad multiaddr in p2p config: {e}") from e
        for name in ("read_timeout", "dial_timeout", "announce_interval", "announce_max_age",
                     "dht_provide_interval", "discover_timeout", "dht_query_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"p2p config {name} must be > 0, got {getattr(self, name)}")
        for name in ("max_inbound_streams", "max_connections", "max_package_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"p2p config {name} must be >= 1, got {getattr(self, name)}")
