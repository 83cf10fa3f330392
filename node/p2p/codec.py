"""Wire format of /loramesh/adapter/1.0.0: size-capped, length-prefixed frames.

A frame is a 5-byte header, kind (u8) and payload length (u32, big-endian), then the payload.
The header is checked (known kind, length within that kind's cap) before a single payload byte is
read, so a peer cannot make us buffer more than one capped frame. Every read has a timeout: Yamux
can leave a reader hanging when the sender gives up (notes/libp2p.md, pitfall 5).

Exchange: client sends REQUEST {"adapter_id": id}; server answers ERROR "reason", or MANIFEST
(loramesh.json bytes), SIGNATURE (signature.json bytes), the manifest's files in manifest order as
DATA frames (a frame never spans two files), then END.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from typing import Protocol

import trio
from libp2p.io.exceptions import IOException
from libp2p.stream_muxer.exceptions import MuxedStreamError

from node.p2p.errors import FrameError, ProviderError, ProviderTimeout

PROTOCOL_ID = "/loramesh/adapter/1.0.0"
HEADER = struct.Struct(">BI")
MAX_PAYLOAD = 1 << 20  # 1 MiB: one DATA frame; also the cap for manifest and signature
READ_CHUNK = MAX_PAYLOAD + HEADER.size  # the most a reader asks the muxer for at once


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
    """What the codec needs from a libp2p stream (INetStream satisfies it)."""

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


class FrameReader:
    """Reads frames from a stream, buffering partial reads; every read has a timeout.

    A per-read timeout alone lets a peer sending one byte a second hold a reader forever, so a
    reader may also have a deadline (an absolute trio time, for the whole exchange or a phase of
    it) and a minimum rate: once `grace` seconds have passed since `pace()`, the bytes received
    since then must average `min_rate` bytes/s.
    """

    __slots__ = ("_stream", "_timeout", "_buf", "deadline", "_min_rate", "_grace", "_paced_at", "_paced_bytes")

    def __init__(self, stream: ByteStream, *, timeout: float, deadline: float = math.inf) -> None:
        self._stream = stream
        self._timeout = timeout
        self._buf = bytearray()
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
            raise ProviderTimeout(f"peer sent {self._paced_bytes} bytes in {elapsed:.1f}s, below the minimum "
                                  f"rate of {self._min_rate:g} bytes/s")

    async def _fill(self, n: int) -> None:
        # Ask for exactly what is missing: nothing is read past the current frame, so no leftover
        # bytes need shifting and a payload is copied once.
        while len(self._buf) < n:
            self._check_pace()
            chunk = b""
            wait = min(self._timeout, self.deadline - trio.current_time())
            with trio.move_on_after(wait) as scope:
                try:
                    chunk = await self._stream.read(n - len(self._buf))
                except EOFError:
                    chunk = b""
                except (IOException, MuxedStreamError) as e:
                    raise ProviderError(f"peer reset the stream after {len(self._buf)} of {n} bytes ({e!r})") from e
            if scope.cancelled_caught:
                if wait < self._timeout:
                    raise ProviderTimeout("peer did not finish within the transfer deadline")
                raise ProviderTimeout(f"peer sent nothing for {self._timeout:g}s (stalled mid-frame)")
            if not chunk:
                raise FrameError(f"stream ended after {len(self._buf)} of {n} bytes of a frame")
            self._buf += chunk
            self._paced_bytes += len(chunk)

    async def read_frame(self) -> Frame:
        """The next frame; FrameError on a malformed or oversized one, ProviderTimeout on a stall."""
        await self._fill(HEADER.size)
        kind, length = check_header(bytes(self._buf))
        self._buf.clear()
        if length:
            await self._fill(length)
        payload = bytes(self._buf)
        self._buf.clear()
        return Frame(kind, payload)

    async def expect(self, kind: Kind) -> Frame:
        """The next frame, which must be of `kind` (an ERROR frame is raised as FrameError here)."""
        frame = await self.read_frame()
        if frame.kind != kind:
            raise FrameError(f"expected a {kind.name} frame, got {frame.kind.name}")
        return frame
