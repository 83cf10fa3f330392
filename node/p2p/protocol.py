"""/loramesh/adapter/1.0.0, the adapter exchange on the wire: frames, the transfer plan, and both ends.

Exchange: the client sends REQUEST {"adapter_id": id}; the server answers ERROR "reason", or MANIFEST
(loramesh.json bytes), SIGNATURE (signature.json bytes), the manifest's files in manifest order as
DATA frames (a frame never spans two files), then END. The handler that owns the stream closes it on
success and resets it on error.

Frames: a 5-byte header, kind (u8) and payload length (u32, big-endian), then the payload. The header
is checked (known kind, length within that kind's cap) before its payload is read or used, and a
reader holds at most READ_SIZE bytes it has not handed out, so a peer cannot make us buffer more
than one capped frame. Every read has a timeout: Yamux can leave a reader hanging when the sender
gives up.

The plan: the manifest's file list decides which bytes land on disk before the full package check
runs, so the manifest is checked first: it must hash to the adapter id asked for (so it is the
canonical manifest, byte for byte), parse within limits (the package format refuses unsafe file
names), and every file is counted and hashed as it arrives.
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio
from libp2p.io.exceptions import IOException
from libp2p.stream_muxer.exceptions import MuxedStreamError

from common.wire import UntrustedJSONError, canonical_json, is_id, parse_json, sha256_hex
from node.adapters import MANIFEST_FILE, SIGNATURE_FILE
from node.adapters.errors import PackageError, shown
from node.adapters.manifest import MAX_MANIFEST_BYTES, parse_manifest
from node.adapters.verify import check_for_base
from node.p2p.errors import (
    BadBytes,
    FrameError,
    ProviderError,
    ProviderLacks,
    ProviderRefused,
    ProviderTimeout,
    UnfitAdapter,
)

# -- frames ----------------------------------------------------------------------------------------

PROTOCOL_ID = "/loramesh/adapter/1.0.0"
HEADER = struct.Struct(">BI")
MAX_PAYLOAD = 1 << 20  # 1 MiB: one DATA frame; also the cap for manifest and signature
NOT_HELD = (
    "this node does not hold adapter"  # how an ERROR frame's reason begins for an adapter not held (ProviderLacks)
)


class Kind(enum.IntEnum):
    REQUEST = 1
    MANIFEST = 2
    SIGNATURE = 3
    DATA = 4
    END = 5
    ERROR = 127


# Per-kind payload caps: a request or an error message is small; nothing exceeds MAX_PAYLOAD.
CAPS: dict[Kind, int] = {
    Kind.REQUEST: 1024,
    Kind.MANIFEST: MAX_PAYLOAD,
    Kind.SIGNATURE: 4096,  # signature.json is ~400 bytes: a bigger one is an attack, not a signature
    Kind.DATA: MAX_PAYLOAD,
    Kind.END: 0,
    Kind.ERROR: 1024,
}


class ByteStream(Protocol):
    """What the exchange needs from a libp2p stream (INetStream satisfies it)."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    payload: bytes


def encode_header(kind: Kind, length: int) -> bytes:
    """The 5-byte header of a frame."""
    return HEADER.pack(int(kind), length)


def encode(kind: Kind, payload: bytes = b"") -> bytes:
    """One whole frame; raises FrameError when the payload exceeds the kind's cap."""
    if len(payload) > CAPS[kind]:
        raise FrameError(f"{kind.name} payload is {len(payload)} bytes; the cap is {CAPS[kind]}")
    return encode_header(kind, len(payload)) + payload


def check_header(header: bytes) -> tuple[Kind, int]:
    """Parse and check a header; raises FrameError before any payload is read."""
    raw_kind, length = HEADER.unpack(header)
    try:
        kind = Kind(raw_kind)
    except ValueError as e:
        raise FrameError(f"unknown frame kind {raw_kind}; expected one of {[k.value for k in Kind]}") from e
    if length > CAPS[kind]:
        raise FrameError(f"{kind.name} frame announces {length} bytes; the cap is {CAPS[kind]}")
    return kind, length


async def write_frame(stream: ByteStream, kind: Kind, payload: bytes = b"", *, timeout: float) -> None:
    """Write one frame; a peer that stops reading for `timeout` seconds is a ProviderTimeout."""
    data = encode(kind, payload)
    with trio.move_on_after(timeout) as scope:
        try:
            await stream.write(data)
        except (IOException, MuxedStreamError) as e:
            raise ProviderError(f"peer closed the stream while we wrote a {kind.name} frame ({e!r})") from e
    if scope.cancelled_caught:
        raise ProviderTimeout(f"peer did not accept a {kind.name} frame within {timeout:g}s")


READ_SIZE = MAX_PAYLOAD + HEADER.size  # a greedy reader's one read: at most a whole frame's worth


class FrameReader:
    """Reads frames from a stream; every read has a timeout.

    By default it asks the stream for exactly what the current frame still lacks, so nothing past
    the frame is taken from the stream (the server reads a REQUEST this way, then watches the
    stream itself). A `greedy` reader asks for up to READ_SIZE bytes per read, as many as the
    stream holds, and keeps what it got as one memoryview: frames are cut out of it without
    copying, and a DATA payload can be taken piece by piece (read_header, then read_piece) and
    hashed and written from the very bytes the stream returned.

    A per-read timeout alone lets a peer sending one byte a second hold a reader forever, so a
    reader may also have a deadline (an absolute trio time, for the whole exchange or a phase of
    it) and a minimum rate: once `grace` seconds have passed since `pace()`, the bytes received
    since then must average `min_rate` bytes/s.
    """

    __slots__ = (
        "_stream",
        "_timeout",
        "_pending",
        "_read_size",
        "deadline",
        "_min_rate",
        "_grace",
        "_paced_at",
        "_paced_bytes",
    )

    def __init__(self, stream: ByteStream, *, timeout: float, deadline: float = math.inf, greedy: bool = False) -> None:
        self._stream = stream
        self._timeout = timeout
        self._pending = memoryview(b"")  # bytes read and not yet handed out (at most READ_SIZE)
        self._read_size = READ_SIZE if greedy else 0
        self.deadline = deadline
        self._min_rate = 0.0
        self._grace = 0.0
        self._paced_at = 0.0
        self._paced_bytes = 0

    def pace(self, *, min_rate: float, grace: float, deadline: float = math.inf) -> None:
        """From now on, require `min_rate` bytes/s on average after `grace` seconds, and end by `deadline`."""
        self._min_rate, self._grace, self.deadline = min_rate, grace, deadline
        self._paced_at, self._paced_bytes = trio.current_time(), 0

    def _check_pace(self) -> None:
        now = trio.current_time()
        if now >= self.deadline:
            raise ProviderTimeout("peer did not finish within the transfer deadline")
        elapsed = now - self._paced_at
        if self._min_rate and elapsed > self._grace and self._paced_bytes < self._min_rate * elapsed:
            raise ProviderTimeout(
                f"peer sent {self._paced_bytes} bytes in {elapsed:.1f}s, below the minimum "
                f"rate of {self._min_rate:g} bytes/s"
            )

    async def _read(self, missing: int, got: int, n: int) -> None:
        # One read from the stream into the (empty) pending view; `got` of the `n` bytes of the
        # current header or payload have arrived, `missing` more are needed.
        self._check_pace()
        chunk = b""
        wait = min(self._timeout, self.deadline - trio.current_time())
        with trio.move_on_after(wait) as scope:
            try:
                chunk = await self._stream.read(max(missing, self._read_size))
            except EOFError:
                chunk = b""
            except (IOException, MuxedStreamError) as e:
                raise ProviderError(f"peer reset the stream after {got} of {n} bytes ({e!r})") from e
        if scope.cancelled_caught:
            if wait < self._timeout:
                raise ProviderTimeout("peer did not finish within the transfer deadline")
            raise ProviderTimeout(f"peer sent nothing for {self._timeout:g}s (stalled mid-frame)")
        if not chunk:
            raise FrameError(f"stream ended after {got} of {n} bytes of a frame")
        self._paced_bytes += len(chunk)
        self._pending = memoryview(chunk)

    async def read_piece(self, missing: int, got: int = 0, n: int = 0) -> memoryview:
        """Up to `missing` (> 0) bytes of the current payload, as they arrived (no copy); reads the
        stream only when nothing is pending. `got` and `n` (bytes of the payload so far, its length)
        name the place in an error."""
        if not self._pending:
            await self._read(missing, got, n or missing)
        piece = self._pending[:missing]
        self._pending = self._pending[len(piece) :]
        return piece

    async def _read_exact(self, n: int) -> bytes:
        pending = self._pending
        if len(pending) >= n:
            self._pending = pending[n:]
            return pending[:n].tobytes()
        parts, got = [], 0
        while got < n:
            piece = await self.read_piece(n - got, got, n)
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    async def read_header(self) -> tuple[Kind, int]:
        """The next frame's kind and length, checked; its payload is still to be read."""
        return check_header(await self._read_exact(HEADER.size))

    async def read_frame(self) -> Frame:
        """The next frame; FrameError on a malformed or oversized one, ProviderTimeout on a stall."""
        kind, length = await self.read_header()
        return Frame(kind, await self._read_exact(length) if length else b"")

    async def expect(self, kind: Kind) -> Frame:
        """The next frame, which must be of `kind` (an ERROR frame is raised as FrameError here)."""
        frame = await self.read_frame()
        if frame.kind != kind:
            raise FrameError(f"expected a {kind.name} frame, got {frame.kind.name}")
        return frame


# -- the transfer plan -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedFile:
    path: str  # a flat file name inside the package folder
    size: int
    sha256: str  # 64 lowercase hex digits


@dataclass(frozen=True, slots=True)
class TransferPlan:
    adapter_id: str
    files: tuple[PlannedFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def plan_transfer(
    manifest_bytes: bytes, adapter_id: str, *, max_bytes: int, base_config: dict | None = None
) -> TransferPlan:
    """Check the manifest against `adapter_id` and return its file list. BadBytes where the bytes are not the
    adapter's (the provider's fault); UnfitAdapter where they are and say this node cannot take it (they do not
    parse here, the package is larger than `max_bytes`, or, with `base_config`, it cannot be served on the
    fetching node's base): before any file's byte arrives, and the same from every provider."""
    try:
        doc = parse_json(manifest_bytes, max_bytes=MAX_MANIFEST_BYTES, max_depth=8, what="manifest")
        manifest = parse_manifest(doc)
    except ValueError as e:  # PackageError and UntrustedJSONError are ValueErrors
        if sha256_hex(bytes(manifest_bytes)) == adapter_id:  # the adapter's own manifest: every provider sends it
            raise UnfitAdapter(f"adapter {adapter_id} cannot be served here: its manifest is refused: {e}") from None
        raise BadBytes(f"provider sent an invalid manifest: {e}") from e
    if manifest.canonical_bytes() != bytes(manifest_bytes):
        # the id is the hash of the canonical form: other bytes (duplicate keys, spaces, key order)
        # would verify here and mean something else to another parser
        raise BadBytes("provider sent a manifest that is not in canonical form")
    if manifest.adapter_id != adapter_id:
        raise BadBytes(f"manifest hashes to {manifest.adapter_id}, not the requested adapter id {adapter_id}")
    if base_config is not None:
        try:
            check_for_base(manifest, base_config)
        except PackageError as e:
            raise UnfitAdapter(f"adapter {adapter_id} cannot be served here: {e}") from None
    plan = TransferPlan(adapter_id, tuple(PlannedFile(f.path, f.size, f.sha256) for f in manifest.files))
    if plan.total_bytes > max_bytes:  # the manifest's own word, as every provider sends it
        raise UnfitAdapter(
            f"adapter {adapter_id}: package is {plan.total_bytes} bytes; this node accepts at most {max_bytes}"
        )
    return plan


class FileHasher:
    """Checks one planned file while it arrives: never more bytes than its size, hash at the end.

    `reserve(n)` counts bytes as they arrive (refusing any beyond the size at once); `update`
    hashes them, possibly later on a worker thread.
    """

    __slots__ = ("file", "remaining", "_hashed", "_h")

    def __init__(self, file: PlannedFile) -> None:
        self.file = file
        self.remaining = file.size
        self._hashed = 0
        self._h = hashlib.sha256()

    def reserve(self, n: int) -> None:
        if n > self.remaining:
            raise BadBytes(f"{self.file.path}: peer sent more than the manifest's {self.file.size} bytes")
        self.remaining -= n

    def update(self, chunk: bytes) -> None:
        if self._hashed + len(chunk) > self.file.size:
            raise BadBytes(f"{self.file.path}: peer sent more than the manifest's {self.file.size} bytes")
        self._h.update(chunk)
        self._hashed += len(chunk)

    def finish(self) -> None:
        if self.remaining or self._hashed != self.file.size:
            raise BadBytes(f"{self.file.path}: {self.file.size - self._hashed} bytes missing before the next section")
        if self._h.hexdigest() != self.file.sha256:
            raise BadBytes(f"{self.file.path}: sha256 differs from the manifest (tampered or corrupt bytes)")


# -- both ends of one exchange ---------------------------------------------------------------------

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
    base_config: dict | None = None,
    admit: Callable[[int], Awaitable[None]] | None = None,
) -> TransferPlan:
    """Ask for `adapter_id` and write the package into the empty folder `dest`, checking every byte (and, with
    `base_config`, that the manifest fits that base: plan_transfer). `admit` is awaited with the package's size
    once its manifest is read, before any file's byte: it raises to take none (the store has no room for it).

    Nothing a provider sends is parsed before it is known to be what was asked for: the manifest's
    bytes must hash to the adapter id (so they are the canonical manifest, byte for byte), and the
    signature frame is small and parsed by the bounded parser. With `pace`, the header frames must
    arrive within pace.header_timeout and the files at pace.min_rate (after pace.grace seconds).
    """
    await write_frame(stream, Kind.REQUEST, canonical_json({"adapter_id": adapter_id}), timeout=timeout)
    reader = FrameReader(stream, timeout=timeout, greedy=True)
    if pace is not None:
        reader.deadline = trio.current_time() + pace.header_timeout
    first = await reader.read_frame()
    if first.kind == Kind.ERROR:
        reason = "".join(c if c.isprintable() else "?" for c in first.payload.decode("utf-8", "replace")[:200])
        kind = ProviderLacks if reason.startswith(NOT_HELD) else ProviderRefused
        raise kind(f"provider refused: {reason}")  # one line, whatever the provider sent
    if first.kind != Kind.MANIFEST:
        raise FrameError(f"expected a MANIFEST frame, got {first.kind.name}")
    if sha256_hex(first.payload) != adapter_id:
        raise BadBytes(
            f"manifest bytes do not hash to the requested adapter id {adapter_id} "
            "(altered, non-canonical or another adapter's)"
        )
    plan = plan_transfer(first.payload, adapter_id, max_bytes=max_bytes, base_config=base_config)
    if admit is not None:
        await admit(plan.total_bytes)
    signature = await reader.expect(Kind.SIGNATURE)
    signature_bytes = check_signature_frame(signature.payload)
    (dest / MANIFEST_FILE).write_bytes(first.payload)
    (dest / SIGNATURE_FILE).write_bytes(signature_bytes)
    if pace is not None:
        reader.pace(
            min_rate=pace.min_rate,
            grace=pace.grace,
            deadline=trio.current_time() + pace.grace + plan.total_bytes / pace.min_rate,
        )
    total, done = plan.total_bytes, 0
    if on_bytes:
        on_bytes(0, total)
    # Hashing and disk writes run in a worker thread (hashlib and os.writev release the GIL), fed
    # through a small queue, so they overlap with receiving and decrypting the next frames. Each
    # DATA payload travels as the pieces the stream returned (no copy): the hash is computed over
    # exactly the bytes written, and checked against the manifest when the file's last frame is in.
    send, recv = trio.open_memory_channel[tuple[FileHasher, object, list | None]](SINK_FRAMES)
    opened = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sink, recv)
            async with send:
                for planned in plan.files:
                    hasher = FileHasher(planned)
                    out = open(dest / planned.path, "xb", buffering=0)
                    opened.append(out)
                    while hasher.remaining:
                        kind, length = await reader.read_header()
                        if kind != Kind.DATA:
                            raise BadBytes(f"{planned.path}: got {kind.name} with {hasher.remaining} bytes missing")
                        hasher.reserve(length)  # refused before a byte of the payload is read
                        await send.send((hasher, out, await _payload(reader, length)))
                        done += length
                        if on_bytes:
                            on_bytes(done, total)
                    await send.send((hasher, out, None))  # None: close the file and check its hash
            # leaving the nursery waits for the sink: every byte is on disk and every hash checked
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    finally:
        for out in opened:
            out.close()
    await reader.expect(Kind.END)
    return plan


SINK_FRAMES = 8  # DATA frames queued for the worker thread, and taken by it per call: ~16-18 MiB at most
_SMALL_PIECE = 16 << 10  # smaller pieces are copied together, so a frame is never thousands of objects


async def _payload(reader: FrameReader, length: int) -> list:
    """A DATA payload as a list of buffers: the stream's own pieces, small ones joined.

    A peer that sends a frame a few bytes at a time would otherwise make a megabyte of payload
    into a million objects (and more iovecs than writev takes)."""
    pieces: list = []
    small = bytearray()
    got = 0
    while got < length:
        piece = await reader.read_piece(length - got, got, length)
        got += len(piece)
        if len(piece) >= _SMALL_PIECE:
            if small:
                pieces.append(small)
                small = bytearray()
            pieces.append(piece)
        else:
            small += piece
    if small:
        pieces.append(small)
    return pieces


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
    # Whatever is queued goes to the worker thread in one call: one thread hop per batch of frames,
    # not per frame, once the thread falls behind the stream.
    async with recv:
        async for item in recv:
            batch = [item]
            while len(batch) < SINK_FRAMES:
                try:
                    batch.append(recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await trio.to_thread.run_sync(_consume, batch)


def _consume(batch: list[tuple[FileHasher, object, list | None]]) -> None:
    for hasher, out, pieces in batch:
        if pieces is None:  # the file's last frame is in
            out.close()
            hasher.finish()
            continue
        for piece in pieces:
            hasher.update(piece)
        _write_all(out.fileno(), pieces)


def _write_all(fd: int, pieces: list) -> None:
    """Write every byte of `pieces` to `fd` (one writev, then the rest after a short write)."""
    written = os.writev(fd, pieces) if pieces else 0
    for piece in pieces:
        if written >= len(piece):
            written -= len(piece)
            continue
        view = memoryview(piece)[written:]
        written = 0
        while view:
            view = view[os.write(fd, view) :]


def parse_request(payload: bytes) -> str:
    """The adapter id of a REQUEST payload; FrameError when it is not {"adapter_id": "0x"+64 hex}."""
    try:
        doc = parse_json(payload, max_bytes=CAPS[Kind.REQUEST], max_depth=2, what="REQUEST payload")
    except UntrustedJSONError as e:
        raise FrameError(f'{e}; expected {{"adapter_id": "0x..."}}') from e
    adapter_id = doc.get("adapter_id") if isinstance(doc, dict) else None
    if not is_id(adapter_id):
        raise FrameError(f"REQUEST adapter_id {shown(adapter_id)} is not a 0x-prefixed 64-hex id")
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


SEND_BATCH = 4  # DATA frames read from disk per worker-thread call when serving: 4 MiB per upload


def package_frames(pkg_dir: Path, adapter_id: str) -> Iterator[bytearray]:
    """package_sections' frames, encoded: each DATA frame is read from disk straight into its place
    behind the header (no payload copy)."""
    manifest = (pkg_dir / MANIFEST_FILE).read_bytes()
    plan = plan_transfer(manifest, adapter_id, max_bytes=1 << 62)
    yield bytearray(encode(Kind.MANIFEST, manifest))
    yield bytearray(encode(Kind.SIGNATURE, (pkg_dir / SIGNATURE_FILE).read_bytes()))
    for planned in plan.files:
        left = planned.size  # never more than the manifest says, even if the file has grown since
        with open(pkg_dir / planned.path, "rb", buffering=0) as f:
            while left:
                frame = bytearray(HEADER.size + min(left, MAX_PAYLOAD))
                n = f.readinto(memoryview(frame)[HEADER.size :])
                if not n:
                    break  # shorter than the manifest says: the peer refuses it
                del frame[HEADER.size + n :]
                HEADER.pack_into(frame, 0, int(Kind.DATA), n)
                left -= n
                yield frame
    yield bytearray(encode(Kind.END))


def _next_frames(frames: Iterator[bytearray], n: int) -> list[bytearray]:
    return [frame for _, frame in zip(range(n), frames, strict=False)]


async def send_frames(stream: ByteStream, frames: Iterator[bytearray], *, timeout: float) -> None:
    """Write encoded frames; disk reads run in a worker thread, SEND_BATCH frames at a time."""
    while batch := await trio.to_thread.run_sync(_next_frames, frames, SEND_BATCH):
        for frame in batch:
            with trio.move_on_after(timeout) as scope:
                try:
                    await stream.write(frame)
                except (IOException, MuxedStreamError) as e:
                    raise ProviderError(
                        f"peer closed the stream while we wrote a {Kind(frame[0]).name} frame ({e!r})"
                    ) from e
            if scope.cancelled_caught:
                raise ProviderTimeout(f"peer did not accept a {Kind(frame[0]).name} frame within {timeout:g}s")
