"""The inbound side of /loramesh/adapter/1.0.0: serve packages the local store holds (already verified)."""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from node.adapters import AdapterStore, PackageError
from node.p2p.codec import ByteStream, FrameReader, Kind, write_frame
from node.p2p.errors import FrameError, ProviderError
from node.p2p.transfer import package_sections, parse_request, send_sections

log = logging.getLogger(__name__)


class AdapterServer:
    """Stream handler: one request per stream, a cap on concurrent streams, close on success, reset on error."""

    def __init__(self, store: AdapterStore, *, max_streams: int, timeout: float) -> None:
        self.store = store
        self.timeout = timeout
        self._limiter = trio.CapacityLimiter(max_streams)
        self.served = 0

    async def handle(self, stream) -> None:
        """Entry point given to host.set_stream_handler."""
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await self._refuse(stream, f"busy: already serving {self._limiter.total_tokens} streams")
            return
        try:
            await self._serve_one(stream)
        except (FrameError, ProviderError, OSError, PackageError) as e:
            log.warning("adapter stream from %s failed: %s", _peer_of(stream), e)
            await _reset(stream)
        except BaseException:
            await _reset(stream)
            raise
        finally:
            self._limiter.release()

    async def _serve_one(self, stream) -> None:
        request = await FrameReader(stream, timeout=self.timeout).expect(Kind.REQUEST)
        adapter_id = parse_request(request.payload)
        # Hashes were checked at install and the client checks every byte again; sizes are re-checked here.
        pkg = await trio.to_thread.run_sync(lambda: self.store.get(adapter_id, verify_hashes=False))
        if pkg is None:
            await self._refuse(stream, f"this node does not hold adapter {adapter_id}")
            return
        log.info("serving adapter %s to %s", adapter_id, _peer_of(stream))
        await self.send_package(stream, Path(pkg.path), adapter_id)
        self.served += 1
        await stream.close()

    async def send_package(self, stream: ByteStream, pkg_dir: Path, adapter_id: str) -> None:
        """Write the package's frames; a test peer overrides this to misbehave."""
        await send_sections(stream, package_sections(pkg_dir, adapter_id), timeout=self.timeout)

    async def _refuse(self, stream, reason: str) -> None:
        try:
            await write_frame(stream, Kind.ERROR, reason.encode()[:1024], timeout=self.timeout)
            await stream.close()
        except Exception:
            await _reset(stream)


def _peer_of(stream) -> str:
    try:
        return str(stream.muxed_conn.peer_id)
    except AttributeError:
        return "?"


async def _reset(stream) -> None:
    with trio.move_on_after(2):
        try:
            await stream.reset()
        except Exception:
            pass
