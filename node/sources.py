"""Adapter sources past the p2p mesh: HTTP registries a node's operator names (`--adapter-source URL`), tried in
order after the peers when the engine needs an adapter the store lacks.

A registry is any static file server holding `<adapter id>.tar`: the flat tar an upload sends
(`loramesh adapter export` writes it). Nothing it serves is trusted: the bytes go through exactly the
checks of an upload (node.upload.PackageInstaller: manifest and signature before any weight byte, the
signer must be the adapter's registered owner, every file hashed against the signed manifest, the whole
package verified by the store), the archive is bounded by the node's package limit while it arrives, and
a package whose id is not the one asked for is refused. The bytes are taken as sent (an encoded answer is
refused) and must arrive at a pace (common.http.download), so the next source is tried.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections import OrderedDict
from urllib.parse import urlsplit, urlunsplit

import httpx

from common.http import DownloadError, download
from node.adapters.errors import StoreFull
from node.adapters.verify import VerifiedPackage
from node.upload import SPOOL_IN_MEMORY_BYTES, PackageInstaller

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """An adapter a source could not give: not there, too large, refused by the checks; one line."""


class HttpRegistry:
    """`<url>/<adapter id>.tar` over HTTP(S)."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, read_timeout: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"adapter source {url[:200]!r} is not an http(s) URL")
        self.url = url.rstrip("/")
        # as it is logged and put in errors: a registry's credentials (https://user:token@host/...) taken out
        parts = urlsplit(self.url)
        self.shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)

    def __str__(self) -> str:
        return self.shown

    async def fetch(self, adapter_id: str, installer: PackageInstaller) -> VerifiedPackage:
        """Download, check and install the package; SourceError otherwise (nothing installed then)."""
        limit = installer.max_bytes
        data = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES, dir=installer.spool_dir)
        try:
            try:
                async with httpx.AsyncClient(timeout=self.timeout) as client:
                    await download(client, f"{self.url}/{adapter_id}.tar", data.write, limit=limit, what=self.shown)
            except DownloadError as e:  # a status, an encoded answer, past the limit, too slow: common.http
                raise SourceError(f"{e} (adapter {adapter_id})") from None
            except httpx.HTTPError as e:
                raise SourceError(f"{self.shown} unreachable: {type(e).__name__}: {e}") from None
            data.seek(0)
            try:
                return await asyncio.to_thread(installer.install, data, expected_adapter_id=adapter_id, cached=True)
            except StoreFull:  # this node's disk, not the source's package: no back-off for the source
                raise
            except Exception as e:  # the upload checks' errors (PackageError, UploadRefused, ...): one line
                raise SourceError(
                    f"{self.shown} gave a package for {adapter_id} that was refused: {installer.without_paths(str(e))}"
                ) from None
        finally:
            data.close()


# source downloads at once, over all sources: each spools up to SPOOL_IN_MEMORY_BYTES in memory and its package
# on disk, so 16 requests for 16 adapters a source held made 16 downloads at once (+1.1 GB of the node's memory)
MAX_DOWNLOADS = 2
# a source that could not give an adapter is not asked for it again for this long: a package that is refused
# after it arrived whole was downloaded again, whole, for every request naming it
FAILED_BACKOFF_S = 60.0
MAX_FAILURES_KEPT = 4096


class Sources:
    """The operator's sources, tried in order, each for at most its share of `budget_s` (a slow first one used the
    engine's whole fetch budget, and the next was never tried), at most MAX_DOWNLOADS downloads at once, and a
    source that failed an adapter not asked for it again within FAILED_BACKOFF_S."""

    def __init__(self, registries: list[HttpRegistry], *, budget_s: float, clock=time.monotonic) -> None:
        self.registries = registries
        self.share_s = budget_s / max(1, len(registries))
        self.clock = clock
        self._downloads = asyncio.Semaphore(MAX_DOWNLOADS)
        self._failed: OrderedDict[tuple[str, str], float] = OrderedDict()  # (source, adapter) -> when; oldest first

    def __bool__(self) -> bool:
        return bool(self.registries)

    async def fetch(self, adapter_id: str, installer: PackageInstaller) -> tuple[VerifiedPackage, HttpRegistry] | None:
        """The package and the source that gave it, or None when none did (each failure logged)."""
        for source in self.registries:
            key = (source.url, adapter_id)
            failed_at = self._failed.get(key)
            if failed_at is not None and self.clock() - failed_at < FAILED_BACKOFF_S:
                log.debug("not asking %s for adapter %s again yet (it failed it)", source, adapter_id)
                continue
            async with self._downloads:  # the wait for a turn is no part of the source's share
                try:
                    async with asyncio.timeout(self.share_s):
                        return await source.fetch(adapter_id, installer), source
                except (SourceError, TimeoutError) as e:
                    why = str(e) if isinstance(e, SourceError) else f"{source} gave nothing within {self.share_s:g} s"
                    log.warning("cannot fetch adapter %s: %s", adapter_id, why)
            self._failed[key] = self.clock()
            self._failed.move_to_end(key)
            while len(self._failed) > MAX_FAILURES_KEPT:
                self._failed.popitem(last=False)
        return None
