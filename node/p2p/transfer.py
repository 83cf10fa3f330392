"""Both ends of one /loramesh/adapter/1.0.0 exchange, over any ByteStream.

The handler (host) owns the stream's lifetime: close on success, reset on error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from common.wire import UntrustedJSONError, canonical_json, is_id, parse_json, sha256_hex
from node.p2p.codec import CAPS, MAX_PAYLOAD, ByteStream, FrameReader, Kind, write_frame
from node.p2p.errors import BadBytes, FrameError, ProviderRefused
from node.p2p.plan import MANIFEST_FILE, SIGNATURE_FILE, FileHasher, TransferPlan, plan_transfer

log = logging.getLogger(__name__)

# (bytes done, bytes total) of the package files; called from the trio thread, must be quick.
ByteProgress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Pace:
    """How long a provider may take: header frames within header_timeout, files at min_rate after grace."""

    header_timeout: float
    min_rate: float
    grace: float


async def request_package(
    stream: ByteStream,
    adapter_id: str,
    dest: Path,
    *,
    timeout: float,
    max_bytes: int,
    on_bytes: ByteProgress | None = None,
    pace: Pace | None = None,
) -> TransferPlan:
    """Ask for `adapter_id` and write the package into the empty folder `dest`, checking every byte.

    Nothing a provider sends is parsed before it is known to be what was asked for: the manifest's
    bytes must hash to the adapter id (so they are the canonical manifest, byte for byte), and the
    signature frame is small and parsed by the bounded parser. With `pace`, the header frames must
    arrive within pace.header_timeout and the files at pace.min_rate (after pace.grace seconds).
    """
    await write_frame(stream, Kind.REQUEST, canonical_json({"adapter_id": adapter_id}), timeout=timeout)
    reader = FrameReader(stream, timeout=timeout)
    if pace is not None:
        reader.deadline = trio.current_time() + pace.header_timeout
    first = await reader.read_frame()
    if first.kind == Kind.ERROR:
        reason = "".join(c if c.isprintable() else "?" for c in first.payload.decode("utf-8", "replace")[:200])
        raise ProviderRefused(f"provider refused: {reason}")  # one line, whatever the provider sent
    if first.kind != Kind.MANIFEST:
        raise FrameError(f"expected a MANIFEST frame, got {first.kind.name}")
    if sha256_hex(first.payload) != adapter_id:
        raise BadBytes(f"manifest bytes do not hash to the requested adapter id {adapter_id} "
                       "(altered, non-canonical or another adapter's)")
    plan = plan_transfer(first.payload, adapter_id, max_bytes=max_bytes)
    signature = await reader.expect(Kind.SIGNATURE)
    signature_bytes = check_signature_frame(signature.payload)
    (dest / MANIFEST_FILE).write_bytes(first.payload)
    (dest / SIGNATURE_FILE).write_bytes(signature_bytes)
    if pace is not None:
        reader.pace(min_rate=pace.min_rate, grace=pace.grace,
                    deadline=trio.current_time() + pace.grace + plan.total_bytes / pace.min_rate)
    total, done = plan.total_bytes, 0
    if on_bytes:
        on_bytes(0, total)
    # Hashing and disk writes run in a worker thread (hashlib and file writes release the GIL), fed
    # through a small queue, so they overlap with receiving and decrypting the next frames.
    send, recv = trio.open_memory_channel[tuple[FileHasher, object, bytes] | None](8)
    opened = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sink, recv)
            async with send:
                for planned in plan.files:
                    hasher = FileHasher(planned)
                    out = open(dest / planned.path, "xb")
                    opened.append(out)
                    while hasher.remaining:
                        frame = await reader.read_frame()
                        if frame.kind != Kind.DATA:
                            raise BadBytes(f"{planned.path}: got {frame.kind.name} with {hasher.remaining} bytes missing")
                        hasher.reserve(len(frame.payload))
                        await send.send((hasher, out, frame.payload))
                        done += len(frame.payload)
                        if on_bytes:
                            on_bytes(done, total)
                    await send.send((hasher, out, b""))  # b"": close the file and check its hash
            # leaving the nursery waits for the sink: every byte is on disk and every hash checked
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    finally:
        for out in opened:
            out.close()
    await reader.expect(Kind.END)
    return plan


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error that stopped a nursery's tasks (the other tasks then only saw a cancellation)."""
    leaves = []
    stack = [group]
    while stack:
        e = stack.pop()
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        else:
            leaves.append(e)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    return (real or leaves)[0]


async def _sink(recv) -> None:
    async with recv:
        async for hasher, out, payload in recv:
            if payload:
                await trio.to_thread.run_sync(_consume, hasher, out, payload)
            else:
                out.close()
                hasher.finish()


def _consume(hasher: FileHasher, out, payload: bytes) -> None:
    hasher.update(payload)
    out.write(payload)


def parse_request(payload: bytes) -> str:
    """The adapter id of a REQUEST payload; FrameError when it is not {"adapter_id": "0x"+64 hex}."""
    try:
        doc = parse_json(payload, max_bytes=CAPS[Kind.REQUEST], max_depth=2, what="REQUEST payload")
    except UntrustedJSONError as e:
        raise FrameError(f"{e}; expected {{\"adapter_id\": \"0x...\"}}") from e
    adapter_id = doc.get("adapter_id") if isinstance(doc, dict) else None
    if not is_id(adapter_id):
        raise FrameError(f"REQUEST adapter_id {adapter_id!r} is not a 0x-prefixed 64-hex id")
    return adapter_id


def check_signature_frame(payload: bytes) -> bytes:
    """The canonical bytes of a SIGNATURE payload, which must be one small JSON object without duplicate keys.

    Checked before anything is written, so the package check never parses bytes a provider made up;
    whether the signature is valid is the package check's business. Written canonical (what
    `write_signed` writes), since a store may hold a signature.json written by hand.
    """
    try:
        doc = parse_json(payload, max_bytes=CAPS[Kind.SIGNATURE], max_depth=2, what="signature frame")
    except UntrustedJSONError as e:
        raise BadBytes(f"provider sent an invalid signature: {e}") from e
    if not isinstance(doc, dict):
        raise BadBytes("provider sent a signature that is not a JSON object")
    return canonical_json(doc)


def package_sections(pkg_dir: Path, adapter_id: str) -> Iterator[tuple[Kind, bytes]]:
    """The frames that carry a verified package folder, in wire order (files read lazily, 1 MiB at a time)."""
    manifest = (pkg_dir / MANIFEST_FILE).read_bytes()
    plan = plan_transfer(manifest, adapter_id, max_bytes=1 << 62)
    yield Kind.MANIFEST, manifest
    yield Kind.SIGNATURE, (pkg_dir / SIGNATURE_FILE).read_bytes()
    for planned in plan.files:
        with open(pkg_dir / planned.path, "rb") as f:
            while chunk := f.read(MAX_PAYLOAD):
                yield Kind.DATA, chunk
    yield Kind.END, b""


async def send_sections(stream: ByteStream, sections: Iterator[tuple[Kind, bytes]], *, timeout: float) -> None:
    """Write each (kind, payload) as a frame; disk reads run in a worker thread so the loop keeps serving."""
    while True:
        item = await trio.to_thread.run_sync(next, sections, None)
        if item is None:
            return
        await write_frame(stream, item[0], item[1], timeout=timeout)
