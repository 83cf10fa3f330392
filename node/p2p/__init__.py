"""Peer-to-peer adapter exchange: libp2p host, /loramesh/adapter/1.0.0, GossipSub and DHT discovery.

Modules, in reading order: protocol (the exchange on the wire), server (its inbound side), fetcher
(its outbound side), discovery (announcements and provider lookup), standing (how far each peer is
trusted), host (the libp2p host and its logs), node (P2PNode, the facade, over Mesh on the trio
thread), config and errors.
"""

from node.p2p.config import P2PConfig
from node.p2p.discovery import Announcement, Provider
from node.p2p.errors import (
    AnnouncementError,
    BadBytes,
    FetchError,
    FrameError,
    NoProviders,
    P2PError,
    ProviderError,
    ProviderRefused,
    ProviderTimeout,
    UnregisteredAdapter,
)
from node.p2p.fetcher import TransferStatus
from node.p2p.node import P2PNode
from node.p2p.protocol import MAX_PAYLOAD, PROTOCOL_ID
from node.p2p.server import AdapterServer

__all__ = [
    "MAX_PAYLOAD",
    "PROTOCOL_ID",
    "AdapterServer",
    "Announcement",
    "AnnouncementError",
    "BadBytes",
    "FetchError",
    "FrameError",
    "NoProviders",
    "P2PConfig",
    "P2PError",
    "P2PNode",
    "Provider",
    "ProviderError",
    "ProviderRefused",
    "ProviderTimeout",
    "TransferStatus",
    "UnregisteredAdapter",
]
