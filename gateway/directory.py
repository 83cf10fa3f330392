"""The node directory: registered nodes (chain) that prove themselves with signed heartbeats."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice

from common.logs import Throttled
from common.wire import GENERATE_FEATURES, UntrustedJSONError, is_id, parse_json
from gateway.chain_registry import RegistryView
from gateway.errors import BadRequest, Forbidden
from ledger.types import api_url_problem
from node.heartbeat import (
    ANOTHER_GATEWAY,
    MAX_HEARTBEAT_CONTAINERS,
    MAX_HEARTBEAT_SEPARATORS,
    MAX_RESIDENT,  # resident adapter ids read from a heartbeat (a node's slots number a few dozen)
    HeartbeatError,
    UnsignedHeartbeatError,
    verify_heartbeat,
)

log = logging.getLogger(__name__)

UNKNOWN_SYNC_S = 5.0  # the most often a heartbeat of an unknown node makes the gateway pull the registry
MAX_NAME_CHARS = 256  # of the base model name a heartbeat gives
# A node that failed a request before its first token which another node then served (so the request was no
# client's poison) is out until its next heartbeat, as a glitch deserves; one that did not answer at all is out
# at once. A failure of its own (NodeUnavailable.faulty: down, a 5xx other than busy, a broken stream) is also a
# strike, and each strike beyond the first doubles a hold-off from HOLDOFF_BASE_S, up to the gateway's
# node_holdoff_max_s: a node that fails everything, broken or a stranger's, is asked less and less often. Each
# request it serves whole takes one strike back. A refusal (400), an engine error and a first event slower than
# node_timeout_s are no strikes: an honest node with less memory refuses or fails what a larger one serves, and
# one fetching a cold adapter is silent until it is ready; a client must not keep such nodes out of routing.
HOLDOFF_BASE_S = 5.0


@dataclass(slots=True)
class NodeLocal:
    """What this gateway saw of a node itself; shared by its successive heartbeat entries, so a request
    that holds an older entry still updates the current counts."""

    inflight: int = 0  # requests this gateway has open on it now
    failed_at: float | None = None  # a request to it failed; not live until a later heartbeat
    strikes: int = 0  # requests it failed of its own that another node served, less those it served whole
    held_until: float = float("-inf")  # not live before this (monotonic), heartbeats or not
    prefetched: dict[str, float] = field(default_factory=dict)  # adapter id -> when we asked it to load
    # adapter id -> wall-clock ms when we saw it loaded there (served a token, or a prefetch succeeded);
    # it counts as resident until a heartbeat newer than that says otherwise
    loaded: dict[str, int] = field(default_factory=dict)
    # that its heartbeats name another URL than the registered one, at most every 10 minutes: one a heartbeat
    # let its operator write a warning line as fast as it could sign heartbeats
    warn_url: Throttled = field(default_factory=lambda: Throttled(log, logging.WARNING, 600.0))

    @contextmanager
    def busy(self) -> Iterator[None]:
        """One request of this gateway on the node while the context holds (its load, to the router)."""
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight = max(0, self.inflight - 1)

    def served(self) -> None:
        """A request it took ended whole: one strike less. One less, not none: a node could answer one cheap
        request whole after each it fails. A hold-off under way runs to its end."""
        self.strikes = max(0, self.strikes - 1)

    def saw_loaded(self, adapter_id: str) -> None:
        self.loaded[adapter_id] = int(time.time() * 1000)

    def heartbeat_at(self, ts_ms: int) -> None:
        """A heartbeat made at ts_ms was accepted: sightings from before it no longer count (NodeEntry.resident),
        so they go (each ensemble a client weighs anew has an id of its own: kept, they grew without end)."""
        self.loaded = {a: ms for a, ms in self.loaded.items() if ms > ts_ms}


@dataclass(slots=True)
class NodeEntry:
    """A node as its last accepted heartbeat described it, plus what this gateway saw itself."""

    node_id: str
    api_url: str
    base_model_id: str
    public_key: bytes
    status: dict
    ts_ms: int
    last_seen: float  # monotonic time of the last accepted heartbeat
    local: NodeLocal = field(default_factory=NodeLocal)
    # the generate fields it says it knows of those that came after the first release (common.wire's
    # GENERATE_FEATURES; an older node refuses a field it does not know): read once from the heartbeat, whose lists
    # are the node's word and as long as it likes, keeping only names the gateway knows
    features: frozenset[str] = frozenset()

    @property
    def inflight(self) -> int:
        return self.local.inflight

    @property
    def base_model_name(self) -> str:
        bm = self.status.get("base_model")
        return str(bm.get("name")) if isinstance(bm, dict) and bm.get("name") else ""

    @property
    def resident(self) -> frozenset[str]:
        """Resident at the last heartbeat, plus what we saw it load after that heartbeat was made.

        Heartbeats lag by up to one interval; without our own sightings two owners would look cold
        and warm in turn, and repeated requests for one adapter would hop between them.
        """
        out = {a for a, ms in self.local.loaded.items() if ms > self.ts_ms}
        for a in self.status.get("resident_adapters") or ():
            if isinstance(a, dict) and isinstance(a.get("adapter_id"), str):
                out.add(a["adapter_id"])
        return frozenset(out)

    @property
    def queue_depth(self) -> int:
        return _int(self.status.get("queue_depth"))

    @property
    def load(self) -> int:
        """What we have open on it now plus what waits in its queue at the last heartbeat.

        A heartbeat's running count lags by up to one interval, so a request of ours that just
        finished would still count and flip the choice between equal owners; our own open count is
        exact, and the reported queue adds what other gateways are waiting for.
        """
        return self.inflight + _int(self.status.get("queue_depth"))


def _kept(status: dict) -> dict:
    """What the gateway reads of a heartbeat's status (the node's word, up to max_heartbeat_bytes): its base's
    name, its queue depth and up to MAX_RESIDENT resident adapter ids. Kept whole, a list of 20,000 empty items
    was scanned on every request routed to the node, and held megabytes for good."""
    bm = status.get("base_model")
    name = bm.get("name") if isinstance(bm, dict) else None
    listed = status.get("resident_adapters")
    ids = (a.get("adapter_id") for a in (listed if isinstance(listed, list) else ()) if isinstance(a, dict))
    return {
        "base_model": {"name": name[:MAX_NAME_CHARS]} if isinstance(name, str) else None,
        "queue_depth": _int(status.get("queue_depth")),
        "resident_adapters": [{"adapter_id": a} for a in islice((a for a in ids if is_id(a)), MAX_RESIDENT)],
    }


def read_heartbeat(raw: bytes, max_bytes: int, what: str = "heartbeat") -> object:
    """A heartbeat's (or a hello answer's) bytes parsed within its bounds, on a worker thread: anyone may send one.
    Parsed on the event loop, 256 kB of `[{},{},...]` held it 20 ms a request, and a flood made every answer of the
    gateway 40 times slower (red team); its objects, arrays and values are counted first (node.heartbeat)."""
    return parse_json(
        raw,
        max_bytes=max_bytes,
        max_containers=MAX_HEARTBEAT_CONTAINERS,
        max_separators=MAX_HEARTBEAT_SEPARATORS,
        what=what,
    )


def _features(listed: object) -> frozenset[str]:
    """The generate features a heartbeat's status lists that this gateway knows (whatever else it lists is
    ignored)."""
    if not isinstance(listed, list):
        return frozenset()
    return frozenset(f for f in GENERATE_FEATURES if f in listed)


def _int(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


class NodeDirectory:
    """Heartbeats in, live nodes out. A node counts only while it is registered and active on chain
    and has sent a valid heartbeat within `ttl` seconds."""

    def __init__(
        self,
        registry: RegistryView,
        *,
        ttl: float = 10.0,
        max_skew_s: float = 60.0,
        holdoff_max_s: float = 120.0,
        gateway_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`gateway_key`: this gateway's signing key (hex): a heartbeat naming another gateway's is refused."""
        self.registry = registry
        self.gateway_key = gateway_key
        self.ttl = ttl
        self.holdoff_max_s = holdoff_max_s
        self.max_skew_ms = int(max_skew_s * 1000)
        self.clock = clock
        self.entries: dict[str, NodeEntry] = {}
        # node id -> why: a node whose receipt disagreed with what the gateway relayed gets no traffic
        self.disputed: dict[str, str] = {}
        self._disputed_at: dict[str, float] = {}  # node id -> when this gateway marked it (clock)
        self._unknown_synced = float("-inf")  # when a heartbeat of an unknown node last made us look at the chain
        self._lock = threading.Lock()

    def take_heartbeat(self, raw: bytes, max_bytes: int) -> NodeEntry:
        """A heartbeat's bytes parsed (read_heartbeat) and accepted, on the caller's worker thread."""
        try:
            doc = read_heartbeat(raw, max_bytes)
        except UntrustedJSONError as e:
            raise BadRequest(str(e), param="heartbeat") from e
        return self.accept_heartbeat(doc)

    def accept_heartbeat(self, doc: object) -> NodeEntry:
        """Verify and store a heartbeat. Forbidden for unsigned, forged or unregistered senders;
        BadRequest for a malformed document."""
        try:
            body = verify_heartbeat(doc, max_skew_ms=self.max_skew_ms)
        except UnsignedHeartbeatError as e:
            raise Forbidden(str(e), code="unsigned_heartbeat") from e
        except HeartbeatError as e:
            if "does not hash" in str(e):
                raise Forbidden(str(e), code="key_mismatch") from e
            raise BadRequest(str(e), param="heartbeat") from e
        node_id = body["node_id"]
        meant_for = body.get("gateway_key")
        if meant_for is not None and self.gateway_key is not None and meant_for != self.gateway_key:
            # relayed by someone who received it (node.heartbeat): the node may not take this gateway's calls
            raise Forbidden(
                f"this heartbeat of node {node_id} is meant for gateway key {meant_for[:16]}..., not this gateway's",
                code=ANOTHER_GATEWAY,
            )
        reg = self.registry.node(node_id)
        if reg is None and self.clock() - self._unknown_synced >= UNKNOWN_SYNC_S:
            # registered a moment ago? look at the chain once more before refusing; at most every few seconds,
            # since anyone can sign a heartbeat for a node that is not registered (the sync loop finds new
            # nodes anyway, every registry_sync_s)
            self._unknown_synced = self.clock()
            self.registry.sync(force=False)
            reg = self.registry.node(node_id)
        if reg is None:
            raise Forbidden(
                f"node {node_id} is not registered on chain; register it before heartbeating", code="unregistered_node"
            )
        if not reg.active:
            raise Forbidden(f"node {node_id} is registered but inactive on chain", code="inactive_node")
        if (why := api_url_problem(reg.api_url)) is not None:
            # the registry refuses such URLs now; one registered before that rule could aim this gateway's
            # calls (signed, with prompts) at a query string or another user's credentials
            raise Forbidden(
                f"node {node_id} is registered with an API URL that {why}; register it again with a plain URL",
                code="bad_api_url",
            )
        if reg.base_model_id != body["base_model_id"]:
            raise Forbidden(
                f"node {node_id} heartbeats base model {body['base_model_id']} but is registered "
                f"for {reg.base_model_id}",
                code="base_model_mismatch",
            )
        now = self.clock()
        with self._lock:
            old = self.entries.get(node_id)
            if old is not None and body["ts_ms"] <= old.ts_ms:
                raise BadRequest(
                    f"heartbeat ts_ms {body['ts_ms']} is not newer than the last one ({old.ts_ms})",
                    code="stale_heartbeat",
                )
            entry = NodeEntry(
                node_id=node_id,
                api_url=reg.api_url.rstrip("/"),
                base_model_id=body["base_model_id"],
                public_key=bytes.fromhex(body["public_key"]),
                status=_kept(body["status"]),
                ts_ms=body["ts_ms"],
                last_seen=now,
                features=_features(body["status"].get("features")),
            )
            if old is not None:
                entry.local = old.local
                entry.local.heartbeat_at(entry.ts_ms)
            self.entries[node_id] = entry
        if old is None or now - old.last_seen > self.ttl:  # new here, or back after its heartbeats lapsed
            again = "" if old is None else ", heartbeating again"
            log.info(
                "node %s is live at %s (base model %s)%s", node_id[:10], entry.api_url, entry.base_model_id[:10], again
            )
        if reg.api_url.rstrip("/") != body["api_url"].rstrip("/"):
            entry.local.warn_url(
                # %r: the heartbeat's URL is the node's word (only its scheme is checked), a newline in it included
                "node %s heartbeats api_url %.200r but is registered with %s; using the registered one",
                node_id[:10],
                body["api_url"],
                reg.api_url,
            )
        return entry

    def is_live(self, e: NodeEntry, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        failed_at = e.local.failed_at
        if now - e.last_seen > self.ttl or (failed_at is not None and failed_at >= e.last_seen):
            return False
        if now < e.local.held_until:
            return False
        if e.node_id in self.disputed:
            return False
        reg = self.registry.node(e.node_id)
        return reg is not None and reg.active and reg.base_model_id == e.base_model_id

    def live(self, base_model_id: str | None = None) -> list[NodeEntry]:
        """Live nodes, optionally only those serving `base_model_id`, in node id order."""
        now = self.clock()
        with self._lock:
            entries = list(self.entries.values())
        return sorted(
            (
                e
                for e in entries
                if self.is_live(e, now) and (base_model_id is None or e.base_model_id == base_model_id)
            ),
            key=lambda e: e.node_id,
        )

    def get(self, node_id: str) -> NodeEntry | None:
        return self.entries.get(node_id)

    def public_key(self, node_id: str) -> bytes | None:
        """The node's Ed25519 key from its heartbeats (its sha256 was checked to be the node id)."""
        e = self.entries.get(node_id)
        return e.public_key if e is not None else None

    def holdoff_s(self, strikes: int) -> float:
        """How long a node with `strikes` strikes stays out, heartbeats or not (with one: none, only until its
        next heartbeat)."""
        if strikes <= 1:
            return 0.0
        return min(self.holdoff_max_s, HOLDOFF_BASE_S * 2.0 ** min(strikes - 2, 32))

    def mark_failed(self, node_id: str, *, strike: bool = False) -> None:
        """A request to this node failed: route around it until it heartbeats again. With `strike` (it failed of
        its own a request another node then served), for longer with each strike it has (holdoff_s)."""
        e = self.entries.get(node_id)
        if e is None:
            return
        local, now = e.local, self.clock()
        local.failed_at = now
        if strike:
            local.strikes += 1
            local.held_until = max(local.held_until, now + self.holdoff_s(local.strikes))
        if now < local.held_until:
            log.warning(
                "node %s has %d strikes (failures of its own, of requests others served); not routing to it for "
                "%.0f s and until its next heartbeat",
                node_id[:10],
                local.strikes,
                local.held_until - now,
            )
        else:
            log.warning("node %s failed; not routing to it until its next heartbeat", node_id[:10])

    def mark_disputed(self, node_id: str, reason: str) -> None:
        """The node's receipt or text belied what the gateway relayed: no more traffic to it, from this gateway
        now and from every gateway on the database once they read it (sync_disputed), until its operator
        readmits it (gateway.disputes)."""
        if node_id not in self.disputed:
            log.error("node %s disputed, dropped from routing: %s", node_id[:10], reason)
        self.disputed[node_id] = reason
        self._disputed_at[node_id] = self.clock()

    def sync_disputed(self, kept_out: dict[str, str], read_from: float) -> list[str]:
        """Take the database's disputed nodes (gateway.disputes.kept_out), read from `read_from` (clock) on:
        those are kept out; a node marked here before that read and absent from it was readmitted. A node
        marked while the read ran stays out (its record may have landed after the read). Returns the readmitted."""
        readmitted = [
            n for n in self.disputed if n not in kept_out and self._disputed_at.get(n, float("-inf")) < read_from
        ]
        for node_id in readmitted:
            del self.disputed[node_id]
            self._disputed_at.pop(node_id, None)
            log.warning("node %s readmitted by its operator: routing to it again", node_id[:10])
        for node_id, reason in kept_out.items():
            if node_id not in self.disputed:
                self.mark_disputed(node_id, reason)
        return readmitted

    def base_models(self) -> dict[str, str]:
        """Base model id -> name, over live nodes."""
        out: dict[str, str] = {}
        for e in self.live():
            out.setdefault(e.base_model_id, e.base_model_name or e.base_model_id)
        return out
