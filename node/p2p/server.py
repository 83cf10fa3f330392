"""The inbound side of /loramesh/adapter/1.0.0: serve packages the local store holds (already verified)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import trio

from common.logs import Throttled
from node.adapters import AdapterStore, PackageError
from node.p2p.config import P2PConfig
from node.p2p.errors import FrameError, ProviderError, ProviderTimeout
from node.p2p.host import reset_stream
from node.p2p.protocol import (
    NOT_HELD,
    ByteStream,
    FrameReader,
    Kind,
    first_error,
    package_frames,
    parse_request,
    send_frames,
    write_frame,
)
from node.p2p.standing import UNKNOWN, Standing

log = logging.getLogger(__name__)

# What the muxer takes from a writer before its reader says it made room (yamux's initial window): a write past
# that many bytes of a package completes only once the peer has read some
UNREAD_WINDOW = 256 * 1024


class _Upload:
    """One package going out: which, to whom, and how many bytes written."""

    __slots__ = ("adapter_id", "peer", "sent")

    def __init__(self, peer: str, adapter_id: str = "") -> None:
        self.peer, self.adapter_id, self.sent = peer, adapter_id, 0


class _Counted:
    """The upload's stream, its writes counted on the _Upload."""

    def __init__(self, stream, upload: _Upload) -> None:
        self._stream, self._upload = stream, upload

    async def write(self, data) -> None:
        await self._stream.write(data)
        self._upload.sent += len(data)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class AdapterServer:
    """Stream handler: one request per stream, close on success, reset on error.

    Upload slots are bounded overall (max_inbound_streams) and per peer (max_streams_per_peer), the
    REQUEST frame must arrive within request_timeout, and the upload must keep the configured minimum
    rate: streams that never ask, or never read, cannot hold the slots honest peers need.
    """

    def __init__(self, store: AdapterStore, *, config: P2PConfig) -> None:
        self.store = store
        self.config = config
        self.timeout = config.read_timeout
        self._limiter = trio.CapacityLimiter(config.max_inbound_streams)
        self._per_peer: Counter[str] = Counter()
        # Peer ids cost nothing, so the per-peer cap alone does not stop four made-up peers holding all eight
        # slots: peers without standing (Mesh sets PeerStanding.level; UNKNOWN until then) share half of them.
        self.standing: Standing = lambda _p: UNKNOWN
        self._strangers = 0
        self._uploads: set[_Upload] = set()  # packages going out now
        self.served = 0
        # a stranger's failed streams are logged at most every 10 s (streams cost it nothing: a line each filled logs)
        self._log_stranger_failed = Throttled(log, logging.WARNING)

    async def handle(self, stream) -> None:
        """Entry point given to host.set_stream_handler."""
        peer = _peer_of(stream)
        if self._per_peer[peer] >= self.config.max_streams_per_peer:
            await self._refuse(stream, f"busy: peer already has {self._per_peer[peer]} streams")
            return
        stranger = self.standing(peer) == UNKNOWN
        if stranger and self._strangers >= max(1, self.config.max_inbound_streams // 2):
            await self._refuse(stream, f"busy: already serving {self._strangers} streams to peers without standing")
            return
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await self._refuse(stream, f"busy: already serving {self._limiter.total_tokens} streams")
            return
        self._per_peer[peer] += 1
        self._strangers += stranger
        try:
            await self._serve_one(stream)
        except (FrameError, ProviderError, OSError, PackageError) as e:
            (self._log_stranger_failed if stranger else log.warning)("adapter stream from %s failed: %s", peer, e)
            await reset_stream(stream)
        except Exception as e:  # a bug must not let a peer's stream end the node: log it, drop the stream
            log.error("adapter stream from %s failed unexpectedly: %s: %s", peer, type(e).__name__, e)
            await reset_stream(stream)
        except BaseException:
            await reset_stream(stream)
            raise
        finally:
            self._limiter.release()
            self._strangers -= stranger
            self._per_peer[peer] -= 1
            if not self._per_peer[peer]:
                del self._per_peer[peer]

    async def _serve_one(self, stream) -> None:
        reader = FrameReader(
            stream, timeout=self.config.request_timeout, deadline=trio.current_time() + self.config.request_timeout
        )
        request = await reader.expect(Kind.REQUEST)
        adapter_id = parse_request(request.payload)
        # Hashes were checked at install and the client checks every byte again; sizes are re-checked here.
        pkg = await trio.to_thread.run_sync(lambda: self.store.get(adapter_id, verify_hashes=False))
        if pkg is None:
            await self._refuse(stream, f"{NOT_HELD} {adapter_id}")
            return
        # at DEBUG, and at INFO once served: a stranger asking and resetting at once wrote a line a stream
        log.debug("serving adapter %s to %s", adapter_id, _peer_of(stream))
        size = sum(f.size for f in pkg.manifest.files)
        # A reader taking less than min_rate would hold the slot: the whole upload has a deadline.
        limit = self.config.transfer_grace + self.config.header_timeout + size / self.config.min_rate
        gone, sent = trio.Event(), False
        upload = _Upload(_peer_of(stream), adapter_id)
        self._uploads.add(upload)
        try:
            with trio.move_on_after(limit) as scope:
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_watch_for_reset, stream, gone, nursery.cancel_scope)
                        await self.send_package(_Counted(stream, upload), Path(pkg.path), adapter_id)
                        sent = True
                        if upload.sent > UNREAD_WINDOW:
                            # END written is not END read: the muxer holds the last window, and the connection is
                            # spared (uploading_to) while the peer reads it, until it closes its side (the
                            # watcher). A package within the first window ends here, as before: no peer that
                            # asked and never closed holds a slot past END
                            await gone.wait()
                        nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    raise first_error(group) from None
        finally:
            self._uploads.discard(upload)
        if gone.is_set() and not sent:
            raise ProviderError("peer closed or reset the stream before the END frame")
        if scope.cancelled_caught:
            raise ProviderTimeout(f"peer did not take the {size}-byte package within {limit:.0f}s")
        self.served += 1
        log.info("served adapter %s to %s (%d bytes)", adapter_id, _peer_of(stream), size)
        await stream.close()

    def uploading(self) -> set[str]:
        """The adapter ids going out now (any thread: the store does not evict them, AdapterStore.protected)."""
        return {u.adapter_id for u in list(self._uploads)}

    def uploading_to(self) -> set[str]:
        """Peers reading a package from this node now: more of it than the muxer's first window has gone out (a
        count taken as each frame's write completes: with 1 MiB DATA frames, once the peer has read about 768 KiB),
        and the upload has not ended (the peer has not closed its side after END, and its deadline has not passed).
        `host.connection_to_close` spares their connections, whatever their standing or whoever dialled: strangers'
        new idle connections made the node close an honest newcomer's download partway (red team). Asking is not
        enough: strangers asking for a package the node seeds and reading nothing kept every connection it could
        close, the node's own dials to them (red team on that fix) or theirs to it (red team on the next). Whether
        the peer goes on reading once every byte is out is not seen (the muxer buffers up to its window, which
        grows to 16 MiB; a time since the last write cut honest downloads): a stranger that read its first window
        is spared until its upload's deadline, in the upload slots strangers share. A package within the first
        window (256 KiB, a moment's download) spares nothing."""
        return {u.peer for u in self._uploads if u.sent > UNREAD_WINDOW}

    async def send_package(self, stream: ByteStream, pkg_dir: Path, adapter_id: str) -> None:
        """Write the package's frames; a test peer overrides this to misbehave."""
        await send_frames(stream, package_frames(pkg_dir, adapter_id), timeout=self.timeout)

    async def _refuse(self, stream, reason: str) -> None:
        try:
            await write_frame(stream, Kind.ERROR, reason.encode()[:1024], timeout=self.timeout)
            await stream.close()
        except Exception:
            await reset_stream(stream)


async def _watch_for_reset(stream, gone: trio.Event, scope: trio.CancelScope) -> None:
    # The fetcher sends nothing after its REQUEST and keeps its side open until it has read END: anything
    # else (a reset, which the muxer may report as EOF, a close, stray bytes) means it is done or gave up,
    # and ends the upload at once, so its slot is free now rather than when the upload's deadline passes.
    try:
        await stream.read(1)
    except Exception:
        pass
    gone.set()
    scope.cancel()


def _peer_of(stream) -> str:
    try:
        return str(stream.muxed_conn.peer_id)
    except AttributeError:
        return "?"
