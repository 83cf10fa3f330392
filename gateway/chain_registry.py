"""The chain's registries as the gateway reads them: ledger's mirror tables, kept current from events."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select

from ledger.models import AdapterMirror, NameMirror, NodeMirror

log = logging.getLogger(__name__)

FULL_RELOAD_S = 30.0  # the snapshot is re-read at least this often, changed or not (RegistryView.sync)


@dataclass(frozen=True, slots=True)
class RegisteredNode:
    node_id: str
    operator: str
    active: bool
    base_model_id: str
    api_url: str
    public_key: bytes | None = None  # the Ed25519 key the on-chain registration proved (None: not mirrored)


@dataclass(frozen=True, slots=True)
class RegisteredAdapter:
    adapter_id: str
    name: str
    version: str
    owner: str
    base_model_id: str
    registered_block: int
    publisher: str = ""  # who registered it (the name's owner at the time)


class RegistryView:
    """An in-memory snapshot of the node and adapter mirrors; `sync()` pulls new registry events
    first when a chain client is given (ledger.mirror.sync_registry), then reloads the snapshot."""

    def __init__(self, engine: Engine, client=None, *, min_sync_interval: float = 0.5, confirmations: int = 0) -> None:
        self.engine = engine
        self.client = client
        self.min_sync_interval = min_sync_interval
        self.confirmations = confirmations  # blocks behind the head the mirror reads (the settler's)
        self.nodes: dict[str, RegisteredNode] = {}
        self.adapters: dict[str, RegisteredAdapter] = {}
        self.name_owners: dict[str, str] = {}
        self._newest_by_name: dict[str, RegisteredAdapter] = {}
        self._lock = threading.Lock()
        self._last_sync = 0.0
        self._token: str | None = None  # the mirror's change token at the last reload (ledger.mirror.changes)
        self._reloaded_at = float("-inf")
        from ledger.mirror import ensure_mirror_schema

        ensure_mirror_schema(engine)
        self.reload()

    def sync(self, *, force: bool = True) -> bool:
        """Pull registry events (if a chain is configured) and reload; False when skipped or the chain failed.
        Not forced, it is skipped while another pull runs or less than `min_sync_interval` after the last one
        ended: strangers' heartbeats ask for it, and pulls waiting on the lock ran one after another on the
        worker threads that also admit every key's requests."""
        if not self._lock.acquire(blocking=force):
            return False
        try:
            if not force and time.monotonic() - self._last_sync < self.min_sync_interval:
                return False
            try:
                if self.client is not None:
                    from ledger.errors import LedgerError
                    from ledger.mirror import changes, sync_registry

                    try:
                        sync_registry(self.engine, self.client, confirmations=self.confirmations)
                        token = changes(self.engine)
                    except (LedgerError, SQLAlchemyError) as e:  # a chain or database hiccup: retried next time
                        log.warning("registry sync failed, keeping the last snapshot: %s", e)
                        return False
                    # the snapshot is read again only when the mirror changed (this gateway's sync or a sibling's):
                    # re-read every 2 s, 4,000 strangers' adapters cost 58 ms a time. At least every
                    # FULL_RELOAD_S all the same: a sibling of an older release changes no token
                    fresh = time.monotonic() - self._reloaded_at < FULL_RELOAD_S
                    if token is not None and token == self._token and fresh:
                        return True
                    self._token = token
                self.reload()
                return True
            finally:
                self._last_sync = time.monotonic()  # from the end of a pull: a slow chain is not pulled back to back
        finally:
            self._lock.release()

    def reload(self) -> None:
        """Re-read the mirror tables."""
        self._reloaded_at = time.monotonic()
        with Session(self.engine) as s:
            nodes = {
                r.node_id: RegisteredNode(
                    r.node_id,
                    r.operator,
                    r.active,
                    r.base_model,
                    r.api_url,
                    bytes.fromhex(r.public_key) if r.public_key else None,
                )
                for r in s.exec(select(NodeMirror)).all()
            }
            adapters = {
                r.adapter_id: RegisteredAdapter(
                    r.adapter_id, r.name, r.version, r.owner, r.base_model, r.registered_block, r.publisher or r.owner
                )
                for r in s.exec(select(AdapterMirror)).all()
            }
            owners = {r.name: r.owner for r in s.exec(select(NameMirror)).all()}
        newest: dict[str, RegisteredAdapter] = {}
        for a in adapters.values():
            # a name resolves only to versions its current owner registered: a version anyone else
            # registered (impossible on the registry, which refuses it, but not on every mirror) or one
            # of a previous owner is never served under the name
            if owners.get(a.name, "").lower() != a.publisher.lower():
                continue
            cur = newest.get(a.name)
            # the owner's newest registration wins; same block: the larger id, so the choice is stable
            if cur is None or (a.registered_block, a.adapter_id) > (cur.registered_block, cur.adapter_id):
                newest[a.name] = a
        self.nodes, self.adapters, self.name_owners, self._newest_by_name = nodes, adapters, owners, newest

    def node(self, node_id: str) -> RegisteredNode | None:
        return self.nodes.get(node_id)

    def adapter_by_name(self, name: str) -> RegisteredAdapter | None:
        """The newest adapter of this name registered by the name's current owner."""
        return self._newest_by_name.get(name)

    def newest_adapters(self) -> list[RegisteredAdapter]:
        return sorted(self._newest_by_name.values(), key=lambda a: a.name)
