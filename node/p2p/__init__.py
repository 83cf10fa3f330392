"""Peer-to-peer adapter exchange: libp2p host, /loramesh/adapter/1.0.0, GossipSub and DHT discovery."""

from node.p2p.announce import Announcement, AnnouncementError
from node.p2p.codec import MAX_PAYLOAD, PROTOCOL_ID
from node.p2p.config import P2PConfig
from node.p2p.discovery import Provider
from node.p2p.errors import (
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
