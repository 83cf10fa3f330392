"""Frames of /loramesh/adapter/1.0.0 over an in-memory byte stream."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from node.p2p.errors import FrameError, ProviderError, ProviderTimeout
from node.p2p.protocol import MAX_PAYLOAD, FrameReader, Kind, encode, encode_header, write_frame


class Pipe:
    """A trio memory stream with the read/write surface of a libp2p stream."""

    def __init__(self, stream) -> None:
        self.s = stream

    async def read(self, n: int | None = None) -> bytes:
        return await self.s.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.s.send_all(data)


def _pair():
    left, right = trio.testing.memory_stream_pair()
    return Pipe(left), Pipe(right)


def run(fn):
    trio.run(fn)


def test_frames_round_trip_across_partial_reads():
    async def main():
        a, b = _pair()
        frames = [
            (Kind.REQUEST, b'{"adapter_id":"x"}'),
            (Kind.DATA, b"\x01" * MAX_PAYLOAD),
            (Kind.DATA, b""),
            (Kind.END, b""),
        ]
        async with trio.open_nursery() as n:

            async def send():
                for kind, payload in frames:
                    await write_frame(a, kind, payload, timeout=5)

            n.start_soon(send)
            reader = FrameReader(b, timeout=5)
            got = [await reader.read_frame() for _ in frames]
        assert [(f.kind, f.payload) for f in got] == frames

    run(main)


def test_oversized_header_refused_without_waiting_for_payload():
    async def main():
        a, b = _pair()
        await a.write(encode_header(Kind.DATA, MAX_PAYLOAD + 1))  # header only; the stream stays open
        with pytest.raises(FrameError, match="DATA frame announces 1048577 bytes; the cap is 1048576"):
            with trio.fail_after(1):  # would be a ProviderTimeout after 30 s if it waited for the payload
                await FrameReader(b, timeout=30).read_frame()

    run(main)


@pytest.mark.parametrize(("kind", "cap"), [(Kind.REQUEST, 1024), (Kind.ERROR, 1024), (Kind.END, 0)])
def test_small_kinds_have_small_caps(kind, cap):
    async def main():
        a, b = _pair()
        await a.write(encode_header(kind, cap + 1))
        with pytest.raises(FrameError, match=f"{kind.name} frame announces {cap + 1} bytes; the cap is {cap}"):
            await FrameReader(b, timeout=5).read_frame()

    run(main)


def test_encode_refuses_oversized_payload():
    with pytest.raises(FrameError, match="DATA payload is 1048577 bytes; the cap is 1048576"):
        encode(Kind.DATA, b"\0" * (MAX_PAYLOAD + 1))


def test_unknown_kind_refused():
    async def main():
        a, b = _pair()
        await a.write(bytes([9, 0, 0, 0, 1]) + b"x")
        with pytest.raises(FrameError, match="unknown frame kind 9"):
            await FrameReader(b, timeout=5).read_frame()

    run(main)


def test_stream_ending_mid_frame():
    async def main():
        a, b = _pair()
        await a.write(encode(Kind.DATA, b"abcdef")[:8])
        await a.s.send_stream.aclose()
        with pytest.raises(FrameError, match="stream ended after 3 of 6 bytes of a frame"):
            await FrameReader(b, timeout=5).read_frame()

    run(main)


def test_stalled_sender_times_out():
    async def main():
        a, b = _pair()
        await a.write(encode(Kind.DATA, b"abcdef")[:7])
        with pytest.raises(ProviderTimeout, match=r"peer sent nothing for 0.2s \(stalled mid-frame\)"):
            await FrameReader(b, timeout=0.2).read_frame()

    run(main)


def test_expect_names_the_unexpected_kind():
    async def main():
        a, b = _pair()
        await a.write(encode(Kind.ERROR, b"busy"))
        with pytest.raises(FrameError, match="expected a SIGNATURE frame, got ERROR"):
            await FrameReader(b, timeout=5).expect(Kind.SIGNATURE)

    run(main)


def test_writer_times_out_when_reader_stops():
    async def main():
        left, right = trio.testing.lockstep_stream_pair()  # no buffer: a write waits for a read
        with pytest.raises(ProviderTimeout, match="peer did not accept a DATA frame within 0.2s"):
            await write_frame(Pipe(left), Kind.DATA, b"x" * 10, timeout=0.2)

    run(main)


def test_reset_while_reading_is_a_provider_error():
    from libp2p.network.stream.exceptions import StreamReset

    class Resetting:
        async def read(self, n=None):
            raise StreamReset()

    async def main():
        with pytest.raises(ProviderError, match="peer reset the stream after 0 of 5 bytes"):
            await FrameReader(Resetting(), timeout=5).read_frame()

    run(main)
