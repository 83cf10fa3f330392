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

import httpx

from common.http import DownloadError, download
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
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)

    def __str__(self) -> str:
        return self.url

    async def fetch(self, adapter_id: str, installer: PackageInstaller) -> VerifiedPackage:
        """Download, check and install the package; SourceError otherwise (nothing installed then)."""
        limit = installer.max_bytes
        data = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES, dir=installer.spool_dir)
        try:
            try:
                async with httpx.AsyncClient(timeout=self.timeout) as client:
                    await download(client, f"{self.url}/{adapter_id}.tar", data.write, limit=limit, what=self.url)
            except DownloadError as e:  # a status, an encoded answer, past the limit, too slow: common.http
                raise SourceError(f"{e} (adapter {adapter_id})") from None
            except httpx.HTTPError as e:
                raise SourceError(f"{self.url} unreachable: {type(e).__name__}: {e}") from None
            data.seek(0)
            try:
                return await asyncio.to_thread(installer.install, data, expected_adapter_id=adapter_id)
            except Exception as e:  # the upload checks' errors (PackageError, UploadRefused, ...): one line
                raise SourceError(
                    f"{self.url} gave a package for {adapter_id} that was refused: {installer.without_paths(str(e))}"
                ) from None
        finally:
            data.close()
