"""Typed errors of the p2p layer: each message is one line saying what was wrong and what was expected."""

from __future__ import annotations


class P2PError(RuntimeError):
    """The p2p host could not do what was asked (not started, dial failed, bad multiaddr)."""


class FrameError(ValueError):
    """A peer sent a frame that breaks the wire format (unknown kind, oversized, truncated)."""


class ProviderError(RuntimeError):
    """One provider failed to deliver a valid package; the fetcher tries the next one."""


class ProviderTimeout(ProviderError):
    """A provider stalled: no bytes within the read timeout."""


class ProviderRefused(ProviderError):
    """A provider answered with an error frame (does not hold the adapter, busy)."""


class ProviderLacks(ProviderRefused):
    """A provider answered that it does not hold the adapter (it evicted it since it said it did, say): it is not asked
    again for it by this fetch, and, when it said so at once, not held to be failing (fetcher.PROMPT_ANSWER_S)."""


class BadBytes(ProviderError):
    """A provider sent bytes that do not match the adapter id or the manifest's hashes and sizes."""


class FetchError(RuntimeError):
    """No provider delivered a valid package."""


class UnregisteredAdapter(FetchError):
    """The adapter id has no registered owner, so no bytes for it can be trusted."""


class UnfitAdapter(FetchError):
    """The adapter's signed manifest, the same from every provider, says this node cannot take it (another base,
    or a weights file larger than its rank and targets make it): no other provider is tried, none is blamed."""


class NoProviders(FetchError):
    """Discovery found no peer that holds the adapter."""


class AnnouncementError(ValueError):
    """An announcement that is malformed, unsigned, forged or stale."""


class StaleAnnouncement(AnnouncementError):
    """An announcement dated outside this node's window, which an honest peer may pass on (clocks differ): refused,
    and not held against the peer that forwarded it (node/p2p/gossip.py). Another version is not: it would come on
    another topic."""
