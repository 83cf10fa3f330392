"""The fetch flow: find providers, stream an adapter package from one, verify it against the
registered owner and install it; the next provider on any failure. Runs on the p2p thread's trio
loop; Mesh (node.py) builds it with the host, Discovery (who holds the adapter) and its dialer."""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from multiaddr import Multiaddr

from common.wire import is_id, sha256_hex
from node.adapters import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    AdapterStore,
    PackageError,
    VerifiedPackage,
    verify_manifest_and_signature,
)
from node.adapters.basemodel import read_config
from node.p2p.config import P2PConfig
from node.p2p.discovery import Discovery, Provider
from node.p2p.errors import (
    FetchError,
    FrameError,
    NoProviders,
    P2PError,
    ProviderError,
    ProviderLacks,
    ProviderTimeout,
    UnfitAdapter,
    UnregisteredAdapter,
)
from node.p2p.host import addr_str
from node.p2p.protocol import PROTOCOL_ID, Pace, request_package
from node.p2p.standing import UNKNOWN, PeerStanding

if TYPE_CHECKING:
    from libp2p.abc import IHost

log = logging.getLogger(__name__)

# a provider that no longer holds an adapter says so within this of being asked (a dial done, a store looked in);
# one that takes longer cost the fetch its wait, and is held to it as a provider that stalls
PROMPT_ANSWER_S = 2.0

OwnerOf = Callable[[str], str | None]  # adapter id -> its registered owner's address, None if unregistered
# finished fetches (done or failed) whose progress is kept for the status page, the newest: a client naming many
# adapters this node lacks made it keep one for each, for good, in every heartbeat (250 made gateways refuse them)
RECENT_TRANSFERS = 32
FINISHED = ("done", "failed")
Dial = Callable[[PeerInfo], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class TransferStatus:
    """Progress of one fetch, for the CLI bar and the node's status page."""

    adapter_id: str
    state: str  # discovering | downloading | verifying | done | failed
    done: int = 0
    total: int = 0
    peer_id: str | None = None
    attempts: int = 0
    error: str | None = None
    failures: tuple[str, ...] = ()  # one line per provider that failed, in order


Progress = Callable[[TransferStatus], None]


def _provider_from_addr(multiaddr: str) -> Provider:
    try:
        info = info_from_p2p_addr(Multiaddr(multiaddr))
    except Exception as e:
        raise P2PError(f"bad provider multiaddr {multiaddr!r}: expected /ip4/…/tcp/…/p2p/<peer id> ({e})") from e
    pid = info.peer_id.to_base58()
    return Provider(pid, tuple(addr_str(a, pid) for a in info.addrs), "given")


def _peer_info(prov: Provider) -> PeerInfo:
    """Where to dial a provider; ProviderError (that provider fails, the fetch goes on) when its id or an
    address does not parse."""
    try:
        return PeerInfo(ID.from_base58(prov.peer_id), [Multiaddr(a.split("/p2p/")[0]) for a in prov.addrs])
    except Exception as e:
        raise ProviderError(f"provider {prov.peer_id[:64]!r} has an id or address that does not parse ({e})") from None


class Fetcher:
    """Fetches adapters for this node and keeps the progress of recent fetches (trio only)."""

    def __init__(
        self,
        *,
        config: P2PConfig,
        store: AdapterStore,
        owner_of: OwnerOf,
        base_dir: Path | None,
        host: IHost,
        standing: PeerStanding,
        discovery: Discovery,
        dial: Dial,
    ) -> None:
        self.config = config
        self.store = store
        self.owner_of = owner_of
        self.base_dir = base_dir
        self.host = host
        self.peer_id = host.get_id().to_base58()
        self.standing = standing
        self.discovery = discovery
        self._dial = dial  # connect and add to the DHT routing table (Mesh.dial)
        # fetches running, and the last RECENT_TRANSFERS finished; the one changed last at the end
        self.transfers: dict[str, TransferStatus] = {}
        self._locks: dict[str, trio.Lock] = {}  # one fetch per adapter id at a time, while any runs or waits

    def _set(self, status: TransferStatus, on_progress: Progress | None) -> None:
        self.transfers.pop(status.adapter_id, None)
        self.transfers[status.adapter_id] = status
        if status.state in FINISHED:
            finished = [aid for aid, t in self.transfers.items() if t.state in FINISHED]
            for aid in finished[:-RECENT_TRANSFERS]:
                del self.transfers[aid]
        if on_progress is not None:
            on_progress(status)

    async def fetch(
        self, adapter_id: str, *, providers: Sequence[str] = (), on_progress: Progress | None = None
    ) -> VerifiedPackage:
        """Download, verify against the registered owner and install; next provider on failure.

        `providers` (full multiaddrs, e.g. nodes the registry says hold it) are tried first, in order,
        then the peers discovery finds.
        """
        if not is_id(adapter_id):
            raise ValueError(f"adapter id {adapter_id!r} is not a 0x-prefixed 64-hex id")
        lock = self._locks.setdefault(adapter_id, trio.Lock())
        try:
            async with lock:
                status = TransferStatus(adapter_id, "discovering")
                self._set(status, on_progress)
                try:
                    pkg = await self._fetch_locked(adapter_id, list(providers), status, on_progress)
                except BaseException as e:
                    failed = replace(self.transfers[adapter_id], state="failed", error=str(e) or type(e).__name__)
                    self._set(failed, on_progress)
                    raise
                self._set(replace(self.transfers[adapter_id], state="done"), on_progress)
                return pkg
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:  # nobody fetches this id any more
                self._locks.pop(adapter_id, None)

    async def _fetch_locked(
        self, adapter_id: str, given: list[str], status: TransferStatus, on_progress: Progress | None
    ) -> VerifiedPackage:
        owner = await trio.to_thread.run_sync(self.owner_of, adapter_id)
        if owner is None:
            raise UnregisteredAdapter(
                f"adapter {adapter_id} has no registered owner; refusing to fetch unsigned-for bytes"
            )
        existing = await trio.to_thread.run_sync(lambda: self.store.get(adapter_id, verify_hashes=False))
        if existing is not None and existing.signer.lower() == owner.lower():
            return existing
        given_order = [_provider_from_addr(a) for a in given]
        wait = 0.0 if given_order else self.config.discover_timeout
        found = await self.discovery.find_providers(adapter_id, wait=wait)
        order = self._order(given_order, found)
        if not order:
            raise NoProviders(f"no peer announced adapter {adapter_id} within {self.config.discover_timeout:g}s")
        failures: list[str] = []
        for attempt, prov in enumerate(order, start=1):
            asked = trio.current_time()
            status = replace(
                status,
                state="downloading",
                peer_id=prov.peer_id,
                attempts=attempt,
                done=0,
                total=0,
                failures=tuple(failures),
            )
            self._set(status, on_progress)
            try:
                pkg = await self._fetch_from(prov, adapter_id, owner, status, on_progress)
            except ProviderLacks as e:
                failures.append(f"{prov.peer_id}: {e}")
                self._set(replace(self.transfers[adapter_id], failures=tuple(failures)), on_progress)
                if prov.source == "dht":
                    self.discovery.drop_dht_record(adapter_id, prov.peer_id)
                if trio.current_time() - asked <= PROMPT_ANSWER_S:  # an eviction since its announcement: no fault
                    log.info("provider %s no longer holds %s", prov.peer_id, adapter_id)
                else:  # said late, it cost the fetch its wait: a provider that stalls, as any other (re-attack)
                    log.warning("provider %s failed for %s: %s", prov.peer_id, adapter_id, e)
                    self.standing.failed(prov.peer_id)
                continue
            # trio's Broken/ClosedResourceError: the provider's side of the stream went away under a read or
            # write (seen in CI with a tampering provider that hangs up); that provider failed, not the fetch
            except (
                ProviderError,
                FrameError,
                PackageError,
                P2PError,
                OSError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ) as e:
                log.warning("provider %s failed for %s: %s", prov.peer_id, adapter_id, str(e) or type(e).__name__)
                failures.append(f"{prov.peer_id}: {str(e) or type(e).__name__}")
                self._set(replace(self.transfers[adapter_id], failures=tuple(failures)), on_progress)
                self.standing.failed(prov.peer_id)
                if prov.source == "dht":
                    self.discovery.drop_dht_record(adapter_id, prov.peer_id)
                continue
            self.standing.succeeded(prov.peer_id)
            self.discovery.announce_soon(adapter_id)
            return pkg
        raise FetchError(
            f"no provider delivered a valid adapter {adapter_id} ({len(failures)} tried): " + "; ".join(failures)
        )

    def _order(self, given: list[Provider], found: list[Provider]) -> list[Provider]:
        """Who to try, in order: `given` as given, then what discovery found, best standing first.

        A failed provider goes after every other candidate until its back-off ends; at most
        max_attempts discovered providers are tried, and of those at most max_unknown_attempts that have
        no standing, whether the DHT names them or GossipSub (anyone can fill a key's DHT slots with made-up
        ids, and relay announcements each signed by a throw-away key with a dead address): the rest of the
        attempts are kept for peers with standing, a registered node that failed a moment ago included. A node
        registered since this one last read the registry (every 5 minutes, node.daemon) has no standing yet: the
        cap still holds for it, since each made-up provider a fetch tries costs a dial's timeout. Those of one
        rank go in a random order: in the order discovery found them, strangers who put their records first
        (fresh ids at addresses that stall) kept an honest provider past the cap out of fetch after fetch.
        """
        order: dict[str, Provider] = {}
        for prov in given:
            if prov.peer_id != self.peer_id:
                order.setdefault(prov.peer_id, prov)
        candidates = [p for p in found if p.peer_id not in order and p.peer_id != self.peer_id]
        ranked = sorted(
            random.sample(candidates, len(candidates)),  # shuffled, then a stable sort: random within a rank
            key=lambda p: self.standing.rank(p.peer_id, p.source),
        )
        tried = unknown = 0
        for prov in ranked:
            if tried >= self.config.max_attempts or prov.peer_id in order:
                continue
            if self.standing.level(prov.peer_id) == UNKNOWN:
                if unknown >= self.config.max_unknown_attempts:
                    continue
                unknown += 1
            order[prov.peer_id] = prov
            tried += 1
        return list(order.values())

    async def _fetch_from(
        self, prov: Provider, adapter_id: str, owner: str, status: TransferStatus, on_progress: Progress | None
    ) -> VerifiedPackage:
        stream = await self._open_stream(_peer_info(prov))
        base_config = await trio.to_thread.run_sync(read_config, self.base_dir) if self.base_dir is not None else None
        tmp = Path(await trio.to_thread.run_sync(self.store.tmp_dir))
        held = 0  # the room the store holds for this download (AdapterStore.reserve), given back before the install

        async def admit(nbytes: int) -> None:
            nonlocal held
            await trio.to_thread.run_sync(self.store.reserve, nbytes)  # StoreFull: not the provider's fault
            held = nbytes

        def give_back() -> None:
            nonlocal held
            self.store.release(held)
            held = 0

        try:

            def on_bytes(done: int, total: int) -> None:
                self._set(replace(status, done=done, total=total), on_progress)

            try:
                await request_package(
                    stream,
                    adapter_id,
                    tmp,
                    timeout=self.config.read_timeout,
                    max_bytes=self.config.max_package_bytes,
                    on_bytes=on_bytes,
                    pace=Pace(self.config.header_timeout, self.config.min_rate, self.config.transfer_grace),
                    base_config=base_config,
                    admit=admit,
                )
            except BaseException:
                with trio.move_on_after(2):
                    await _quietly(stream.reset)
                raise
            with trio.move_on_after(2):
                await _quietly(stream.close)
            self._set(replace(self.transfers[adapter_id], state="verifying"), on_progress)
            give_back()  # the install counts the package itself, in .tmp
            return await trio.to_thread.run_sync(self._install, tmp, owner)
        finally:
            give_back()
            if tmp.exists():  # shielded: on cancellation the partial download must still go
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(shutil.rmtree, tmp, True)

    async def _open_stream(self, info: PeerInfo):
        # A connection the peer just dropped can linger in the swarm ("No valid connections"):
        # then disconnect, dial afresh and try once more.
        for attempt in (1, 2):
            await self._dial(info)
            try:
                with trio.fail_after(self.config.dial_timeout):
                    return await self.host.new_stream(info.peer_id, [TProtocol(PROTOCOL_ID)])
            except trio.TooSlowError as e:
                raise ProviderTimeout(f"opening an adapter stream timed out after {self.config.dial_timeout:g}s") from e
            except Exception as e:
                if attempt == 2:
                    raise ProviderError(f"cannot open an adapter stream: {e}") from e
                log.info("stream to %s failed (%s); reconnecting", info.peer_id, e)
                with trio.move_on_after(2):
                    await _quietly(lambda: self.host.disconnect(info.peer_id))
        raise AssertionError("unreachable")

    def downloading_from(self) -> set[str]:
        """The peers fetches are downloading from (or dialling) now."""
        return {t.peer_id for t in self.transfers.values() if t.state == "downloading" and t.peer_id}

    def _install(self, tmp: Path, owner: str) -> VerifiedPackage:
        # request_package hashed every byte against the manifest on arrival; the rest is checked here
        manifest, signature = (tmp / MANIFEST_FILE).read_bytes(), (tmp / SIGNATURE_FILE).read_bytes()
        try:
            return self.store.install_from_tmp(
                tmp, expected_owner=owner, base_dir=self.base_dir, hashes_checked=True, cached=True
            )
        except PackageError as e:
            # the files are the manifest's, which is the adapter's (its bytes are its id): only the signature frame
            # is the provider's own. With the owner's signature, the package itself is unfit, and every provider
            # would send it: none is blamed, none more is tried (re-attack: a float64 package an older node took was
            # downloaded from each honest provider in turn, and each one's standing marked failed)
            try:
                verify_manifest_and_signature(manifest, signature, domain=self.store.domain, expected_owner=owner)
            except PackageError:
                raise e from None
            raise UnfitAdapter(f"adapter {sha256_hex(manifest)} cannot be served here: {e}") from None


async def _quietly(fn) -> None:
    try:
        await fn()
    except Exception:
        pass
