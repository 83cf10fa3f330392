"""How far this node trusts each peer, and which providers failed lately: the order a fetch tries them in.

A peer id costs nothing, so nothing a stranger says earns it a place ahead of a peer with standing:
TRUSTED peers (configured bootstrap peers, or registered nodes when the daemon says so), then
SERVED peers (a transfer from them succeeded), then everyone else. A provider that failed is
backed off (tried after every other candidate) for base * 2**(failures-1) seconds, at most
`max_backoff`; a success clears it. Both tables are bounded: a flood of made-up ids forgets
its own oldest entries, never a trusted peer.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# How far a peer is trusted, lowest first: the announcement book evicts the lowest first, the server gives
# peers without standing half its upload slots, and a fetch tries the highest first.
UNKNOWN, SERVED, TRUSTED = 0, 1, 2
Standing = Callable[[str], int]  # peer id -> UNKNOWN, SERVED or TRUSTED

MAX_TRACKED = 4096


@dataclass(slots=True)
class _Failure:
    count: int
    until: float  # time.monotonic() before which the peer is backed off


class PeerStanding:
    """Standing and back-off of peers, as seen by one node (used on the p2p thread only)."""

    def __init__(
        self,
        *,
        base_backoff: float,
        max_backoff: float,
        trusted: Callable[[str], bool] = lambda _p: False,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self._trusted = trusted
        self._configured: set[str] = set()
        self._served: OrderedDict[str, float] = OrderedDict()
        self._failures: OrderedDict[str, _Failure] = OrderedDict()
        self._max = max_tracked

    def trust(self, peer_id: str) -> None:
        """A peer the operator named (bootstrap): TRUSTED for the life of the node."""
        self._configured.add(peer_id)

    def level(self, peer_id: str) -> int:
        if peer_id in self._configured or self._trusted(peer_id):
            return TRUSTED
        return SERVED if peer_id in self._served else UNKNOWN

    def succeeded(self, peer_id: str) -> None:
        self._failures.pop(peer_id, None)
        self._served[peer_id] = time.monotonic()
        self._served.move_to_end(peer_id)
        while len(self._served) > self._max:
            self._served.popitem(last=False)

    def failed(self, peer_id: str) -> float:
        """Back `peer_id` off; returns for how many seconds."""
        old = self._failures.pop(peer_id, None)
        count = old.count + 1 if old is not None else 1
        delay = min(self.max_backoff, self.base_backoff * 2 ** min(count - 1, 30))
        self._failures[peer_id] = _Failure(count, time.monotonic() + delay)
        while len(self._failures) > self._max:
            self._failures.popitem(last=False)
        return delay

    def backed_off(self, peer_id: str) -> bool:
        f = self._failures.get(peer_id)
        return f is not None and f.until > time.monotonic()

    def failures(self, peer_id: str) -> int:
        f = self._failures.get(peer_id)
        return f.count if f is not None else 0

    def rank(self, peer_id: str, source: str) -> tuple:
        """Sort key of a discovered provider: not backed off, standing, gossip before DHT, fewer failures."""
        return (self.backed_off(peer_id), -self.level(peer_id), source != "gossip", self.failures(peer_id))
