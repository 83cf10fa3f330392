"""common.serving.serve: a stop by signal lets the app's own shutdown run, however many signals come.

A real server in its own process: a stream held open keeps it waiting on the first signal, and the second
comes while it waits. uvicorn skips the app's lifespan shutdown on a forced exit, and that shutdown is where
the gateway records the usage of aborted requests and stops its settler, and the node stops its engine."""

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
    import asyncio, contextlib, logging, sys
    from pathlib import Path
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route
    from common.logs import configure_logging
    from common.serving import serve

    marker = Path(sys.argv[2])

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.sleep(0.3)  # some work of the app's own: records written, threads stopped
        marker.write_text("shut down")

    async def forever(request):
        async def chunks():
            while True:
                yield b"x"
                await asyncio.sleep(0.1)
        return StreamingResponse(chunks())

    configure_logging()
    app = Starlette(routes=[Route("/stream", forever)], lifespan=lifespan)
    serve(app, host="127.0.0.1", port=int(sys.argv[1]), name="test server", graceful_timeout=float(sys.argv[3]))
    """
)


def start(tmp_path: Path, graceful_timeout: float):
    port = free_port()
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", APP, str(port), str(marker), str(graceful_timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
    return proc, marker, client


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_still_lets_the_app_shut_down(tmp_path, sig):
    """A second SIGTERM (a supervisor repeating itself) changes nothing: the server goes on waiting for the
    open stream, until its client leaves. A second SIGINT (Ctrl-C again) stops the wait, as uvicorn's
    does. Either way the app's shutdown runs, the exit code is 0 and the log has no traceback: a request
    cut off says so in one line."""
    proc, marker, client = start(tmp_path, graceful_timeout=60)
    with client:
        proc.send_signal(sig)
        time.sleep(0.5)
        assert proc.poll() is None  # waiting for the stream
        proc.send_signal(sig)
        if sig == signal.SIGTERM:
            time.sleep(1.5)
            assert proc.poll() is None  # still waiting for the stream
            client.close()  # which ends the wait
        out, _ = proc.communicate(timeout=30)  # SIGINT: the client is still there
    assert proc.returncode == 0, out
    assert marker.read_text() == "shut down", out
    assert "Traceback" not in out and f"received {sig.name} again" in out, out
    if sig == signal.SIGINT:  # the stream still open was cancelled, and the log says so in one line
        assert "a request still open at shutdown was cut off" in out, out
