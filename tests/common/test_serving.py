"""common.serving.serve: a stop by signal ends the open requests first, then the app's own shutdown runs,
however many signals come.

A real server in its own process, with a stream held open. The app's shutdown is where the gateway records
the usage of aborted requests and stops its settler, and the node stops its engine; a request cut off must
have finished its own cleanup (the gateway's: starting that usage record) before it runs. uvicorn's forced
exit skipped the app's shutdown, and its graceful timeout ran it while the cancelled requests unwound."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from devnet.anvil import free_port

APP = textwrap.dedent(
    """
    import asyncio, contextlib, sys
    from pathlib import Path
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route
    from common.logs import configure_logging
    from common.serving import serve

    events = Path(sys.argv[2])

    def note(line):
        with events.open("a") as f:
            f.write(line + "\\n")

    background = set()  # as the gateway's: tasks a request's end starts, which the app's shutdown waits for

    async def record_usage():
        await asyncio.sleep(0.2)
        note("stream cut off")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if sys.argv[4] == "fail_startup":  # as a node whose account has no gas to register with
            raise ValueError("account 0xabc has no ETH to pay gas\\nsecond line")
        if sys.argv[4] == "note_start":  # as a node, which registers on chain and heartbeats in its start-up
            note("app started")
        yield
        if background:
            await asyncio.wait(background, timeout=10)
        if sys.argv[4] == "fail_shutdown":
            raise RuntimeError("the app's shutdown broke")
        if sys.argv[4] == "hang_shutdown":
            await asyncio.sleep(600)
        note("app shut down")

    async def forever(request):
        async def chunks():
            try:
                while True:
                    yield b"x"
                    await asyncio.sleep(0.1)
            except asyncio.CancelledError:  # cut off: its usage is recorded on a task of its own
                background.add(asyncio.get_running_loop().create_task(record_usage()))
                raise
        return StreamingResponse(chunks())

    configure_logging()
    app = Starlette(routes=[Route("/stream", forever)], lifespan=lifespan)
    try:
        serve(app, host="127.0.0.1", port=int(sys.argv[1]), name="test server", graceful_timeout=float(sys.argv[3]))
    except Exception as e:  # as the loramesh command answers: one line, exit code 1
        print(f"error: {e}")
        sys.exit(1)
    """
)


def launch(port: int, events: Path, graceful_timeout: float, mode: str = "ok") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", APP, str(port), str(events), str(graceful_timeout), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def start(tmp_path: Path, graceful_timeout: float, mode: str = "ok"):
    port = free_port()
    events = tmp_path / "events"
    proc = launch(port, events, graceful_timeout, mode)
    deadline = time.monotonic() + 60
    while True:  # a stream held open: the server waits for it on a signal
        assert proc.poll() is None, proc.stdout.read()
        try:
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
    client.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.recv(100).startswith(b"HTTP/1.1 200")
    return proc, events, client


def lines(events: Path) -> list[str]:
    return events.read_text().splitlines() if events.exists() else []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_still_lets_the_app_shut_down(tmp_path, sig):
    """A second SIGTERM (a supervisor repeating itself) changes nothing: the server goes on waiting for the
    open stream, until its client leaves. A second SIGINT (Ctrl-C again) ends the wait, as uvicorn's does,
    and cuts the stream off. Either way the stream's end comes before the app's shutdown, which runs; the
    exit code is 0 and the log has no traceback: a request cut off says so in one line."""
    proc, events, client = start(tmp_path, graceful_timeout=60)
    with client:
        proc.send_signal(sig)
        time.sleep(0.5)
        assert proc.poll() is None  # waiting for the stream
        proc.send_signal(sig)
        if sig == signal.SIGTERM:
            time.sleep(1.5)
            assert proc.poll() is None and lines(events) == []  # still waiting for the stream
            client.close()  # which ends the wait
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=30)  # SIGINT: the client is still there
        took = time.monotonic() - t0
    assert proc.returncode == 0, out
    assert lines(events) == ["stream cut off", "app shut down"], out
    assert "Traceback" not in out and f"received {sig.name} again" in out, out
    if sig == signal.SIGINT:
        assert took < 10, out  # not the 60 s graceful timeout
        assert "a request still open at shutdown was cut off" in out, out


def test_a_request_past_the_graceful_timeout_ends_before_the_app_shuts_down(tmp_path):
    proc, events, client = start(tmp_path, graceful_timeout=1)
    with client:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert lines(events) == ["stream cut off", "app shut down"], out
    assert "Traceback" not in out and "a request still open at shutdown was cut off" in out, out


def test_a_third_ctrl_c_exits_at_once(tmp_path):
    """When the app's shutdown hangs, a third Ctrl-C ends the process."""
    proc, events, client = start(tmp_path, graceful_timeout=60, mode="hang_shutdown")
    with client:
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)  # two signals sent at once would be one
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert "received SIGINT a third time: exiting now" in out, out


def test_a_failed_app_shutdown_is_an_error_not_a_clean_stop(tmp_path):
    """A gateway whose shutdown raised (its usage records not all written, say) does not exit 0."""
    proc, events, client = start(tmp_path, graceful_timeout=60, mode="fail_shutdown")
    with client:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)  # two signals sent at once would be one
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert out.strip().splitlines()[-1] == "error: test server stopped, but its shutdown failed: see the log above"


def test_a_server_that_cannot_listen_says_so_in_one_line_before_its_app_starts(tmp_path):
    """The port is bound before the app's start-up runs: a node on a busy port used to register on chain,
    heartbeat to its gateways and log "ready" before uvicorn found the port taken."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = launch(port, tmp_path / "events", graceful_timeout=1, mode="note_start")
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert out.strip().splitlines()[-1].startswith(f"error: test server did not start on 127.0.0.1:{port}: "), out
    assert "Traceback" not in out and not (tmp_path / "events").exists(), out


def test_a_failed_start_up_says_what_failed_in_one_line(tmp_path):
    """The start-up's exception, not a screen of Starlette's and uvicorn's frames (a new user's walk: a node
    with no gas fund); the error's first line is the command's last."""
    proc = launch(free_port(), tmp_path / "events", graceful_timeout=1, mode="fail_startup")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last == "error: test server did not start: ValueError: account 0xabc has no ETH to pay gas", out
