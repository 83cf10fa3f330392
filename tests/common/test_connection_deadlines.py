"""common.serving.GuardedHttp: a connection that is not in a request has a deadline for a request's head, and an answer
its client stopped reading has one for its writes. uvicorn alone kept both for good: a stranger's connections that
never finished a head, or never read their answers, held a node's descriptors (red team: 400 held 47 s on, and
under systemd's 1,024 soft limit an honest /health failed). A real uvicorn serves a real app here, with the
deadlines shortened."""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import sys
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from common import serving
from tests.utils.servers import ServerThread

HEAD_S, STALL_S = 1.0, 1.0
BIG = b"x" * (32 << 20)  # far past what the kernel's buffers take for a client that reads nothing


async def slow(request):
    await asyncio.sleep(3 * HEAD_S)  # answered well after the head deadline: a request in progress is not cut
    return PlainTextResponse("done")


async def big(request):
    return PlainTextResponse(BIG)


async def trickle(request):
    async def chunks():
        for _ in range(20):
            yield b"y" * 65536
            await asyncio.sleep(0.1)

    return StreamingResponse(chunks())


@pytest.fixture(scope="module")
def server():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serving.GuardedHttp, "head_timeout_s", HEAD_S)
        mp.setattr(serving.GuardedHttp, "write_stall_s", STALL_S)
        mp.setattr(serving, "KEEP_ALIVE_S", 1)
        app = Starlette(routes=[Route("/slow", slow), Route("/big", big), Route("/trickle", trickle)])
        with ServerThread(app) as s:
            yield s


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `sock` (EOF or reset), None if it stayed open that long."""
    sock.settimeout(0.2)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            if sock.recv(1 << 16) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    return None


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port))


def test_a_connection_that_sends_nothing_or_half_a_head_is_closed(server):
    idle, half = connect(server), connect(server)
    half.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\n")  # never the blank line
    with idle, half:
        assert closed_within(idle, 5 * HEAD_S) is not None
        assert closed_within(half, 5 * HEAD_S) is not None


def test_a_head_sent_a_byte_at_a_time_is_closed_at_its_deadline(server):
    with connect(server) as s:
        start = time.monotonic()
        for byte in b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100:
            try:
                s.sendall(bytes([byte]))
            except OSError:  # closed under us: what must happen
                break
            time.sleep(0.1)
        assert time.monotonic() - start < 5 * HEAD_S
        assert closed_within(s, 2 * HEAD_S) is not None


def test_after_an_answer_a_half_sent_next_head_is_closed_too(server):
    with connect(server) as s:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        assert b"done" in s.recv(4096)
        s.sendall(b"GET /slow HTTP/1.1\r\n")  # the keep-alive is over once a byte comes; the head never ends
        assert closed_within(s, 1 + 5 * HEAD_S) is not None


def test_requests_in_progress_and_answers_being_read_are_not_cut(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/slow").text == "done"  # 3 head deadlines long
        assert client.get("/slow").text == "done"  # the same connection, again
        with client.stream("GET", "/big") as r:  # read slowly, but read: its writes resume
            got = 0
            for chunk in r.iter_bytes(1 << 20):
                got += len(chunk)
                time.sleep(0.02)
        assert got == len(BIG)
        assert len(client.get("/trickle").content) == 20 * 65536


def test_an_answer_its_client_does_not_read_is_cut_off(server):
    with connect(server) as s:
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(3 * STALL_S)  # reads nothing while the server's writes are blocked
        s.settimeout(5)
        got = 0
        try:
            while chunk := s.recv(1 << 20):
                got += len(chunk)
        except ConnectionResetError:
            pass
        assert got < len(BIG)  # the server gave up: what was buffered, then the end


def test_the_open_files_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, soft)
    code = (
        "import resource; from common.serving import raise_open_files_limit\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard}))\n"
        "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert out.stdout.split() == [str(expected), str(expected)]
