"""Serving an ASGI app until SIGINT/SIGTERM, stopping in our order (GracefulServer: the open requests,
then the app's own shutdown), and exiting 0 after a clean stop only.

uvicorn on its own re-raises the signal after its shutdown, which turns a clean Ctrl-C into exit
code 130, and its stop can lose what a cut-off request still had to record; every loramesh server (node,
gateway, explorer) uses this instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import resource
import signal
import socket
import threading

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class ServerDidNotStart(RuntimeError):
    """The server never started listening (port taken, start-up failed)."""


class ShutdownFailed(RuntimeError):
    """The server stopped, but the app's own shutdown raised (its log says what)."""


# How long requests cut off at shutdown get to unwind (a gateway's starts its usage record, a node's sends its
# receipt) before the app's own shutdown runs.
CUT_OFF_WAIT_S = 5.0


class GracefulServer(uvicorn.Server):
    """Our own stop, in this order: no new connections; open requests run on up to the graceful timeout
    (a second SIGINT, Ctrl-C again, ends the wait; a second SIGTERM, a supervisor repeating itself, changes
    nothing); what still runs is cut off and given CUT_OFF_WAIT_S to unwind; then the app's own shutdown.
    That last step is where the gateway records the usage of aborted requests (on tasks their ends start)
    and stops its settler, and the node stops its engine. uvicorn's stop skipped it on a forced exit, and
    on a graceful timeout ran it while the cancelled requests were still unwinding; on Python 3.12.1 and
    later its forced exit also waited for every connection to drop. A third Ctrl-C exits at once."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.sigints = 0
        self.cutting_off = False  # open requests are being cancelled: a CancelledError now is ours
        self.app_stopping = False

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return

        def handle(sig, frame):
            name = signal.Signals(sig).name
            self.sigints += sig == signal.SIGINT
            if not self.should_exit:
                self.should_exit = True
                log.info("received %s: shutting down", name)
            elif self.sigints >= 3:
                try:  # a log blocked on a full pipe, or failing, must not keep the process alive
                    log.warning("received SIGINT a third time: exiting now")
                finally:
                    os._exit(130)
            elif sig == signal.SIGINT and not self.force_exit and not self.app_stopping:
                self.force_exit = True
                log.warning("received SIGINT again: cutting off open requests (a third Ctrl-C exits at once)")
            else:
                hint = " (a third Ctrl-C exits at once)" if sig == signal.SIGINT else ""
                log.info("received %s again: already shutting down%s", name, hint)

        old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # an idle keep-alive connection closes; a busy one after its response
        # no server.wait_closed(): from Python 3.12.1 it waits for every connection to drop, a stream's too
        loop, timeout = asyncio.get_running_loop(), self.config.timeout_graceful_shutdown
        deadline = math.inf if timeout is None else loop.time() + timeout
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
            if loop.time() >= deadline:
                log.warning("graceful timeout (%s s) reached with requests open", timeout)
                break
            await asyncio.sleep(0.1)
        cut = list(self.server_state.tasks)
        self.cutting_off = True
        for task in cut:
            task.cancel()
        if cut:
            _, pending = await asyncio.wait(cut, timeout=CUT_OFF_WAIT_S)
            if pending:
                log.warning("%d request(s) cut off did not end within %.0f s", len(pending), CUT_OFF_WAIT_S)
        for connection in list(self.server_state.connections):  # what a cut-off request left open
            connection.transport.abort()  # not close(): that would wait to send to a client that does not read
        self.app_stopping = True
        await self.lifespan.shutdown()


class _CutOffRequests(logging.Filter):
    """uvicorn logs a request that the stop cut off as an exception in the app, with the traceback of its
    cancellation: it reads as a crash. Once the stop cancels requests, one warning says what happened
    instead; any other error, a CancelledError an app lets out before then included, keeps its traceback."""

    def __init__(self, server: GracefulServer) -> None:
        super().__init__()
        self.server = server

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            self.server.cutting_off
            and record.exc_info
            and isinstance(record.exc_info[1], asyncio.CancelledError)
            and str(record.msg).startswith("Exception in ASGI application")
        ):
            record.msg, record.args = "a request still open at shutdown was cut off", ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _StartupFailure:
    """The app, with what its start-up raised kept (`error`) and told in one line, not as the traceback
    Starlette hands uvicorn to log: the CLI prints one line for every failure (devnet.cli.main), and a
    node with no gas fund printed a screen of frames before it. The traceback is logged at DEBUG
    (LORAMESH_DEBUG=1 shows it)."""

    def __init__(self, app) -> None:
        self.app = app
        self.error: BaseException | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        failed: dict | None = None

        async def hold_failure(message) -> None:
            nonlocal failed
            if message["type"] == "lifespan.startup.failed":
                failed = message  # sent once the exception is known (Starlette sends, then raises)
                return
            await send(message)

        try:
            await self.app(scope, receive, hold_failure)
        except BaseException as e:
            if failed is None:
                raise
            self.error = e
            log.debug("start-up failed:\n%s", failed.get("message", ""))
            await send({"type": "lifespan.startup.failed", "message": f"start-up failed: {one_line(e)}"})
            raise
        if failed is not None:  # a failure sent without an exception: as it was
            await send(failed)


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def listening_socket(host: str, port: int, name: str) -> socket.socket:
    """A TCP socket bound to host:port, as uvicorn binds one (address reuse, inheritable); ServerDidNotStart in
    one line when it cannot be."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise ServerDidNotStart(f"{name} did not start on {host}:{port}: {e.strerror or e}") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServerDidNotStart(f"{name} did not start on {host}:{port}: {(e.strerror or str(e)).lower()}") from e
    sock.set_inheritable(True)
    return sock


# Clients (httpx, hence the official openai client) drop a connection left idle for 5 s, and uvicorn's own
# default closes it after 5 s too: a client could reuse a connection at the instant the server closed it
# and get a ReadError (2 of 2,000 requests in the gateway soak). A server that waits longer than its
# clients never races them.
KEEP_ALIVE_S = 30
# A connection not in a request (just opened, or past its last answer and the keep-alive) has this long to send a
# request's whole head, and an answer the client has stopped reading may wait this long for it. uvicorn has no
# such bounds: a stranger's connections that never finished a head, or never read their answers, stayed open
# for good (red team: 400 of them held 400 of a node's descriptors 47 s on; under systemd's 1,024 its /health
# then failed for everyone).
HEAD_TIMEOUT_S = 10.0
WRITE_STALL_S = 60.0


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) with two deadlines it lacks: a request's head within HEAD_TIMEOUT_S of
    the connection's start, or within KEEP_ALIVE_S + HEAD_TIMEOUT_S of its last answer (a head sent a byte at a time
    never arms uvicorn's keep-alive again); and a write blocked on a client that reads nothing aborts the connection
    after WRITE_STALL_S (the task answering it waited for ever). Neither touches a request being answered: a
    request's body has its own pace (common.http.BodyLimitMiddleware), and an answer that is being read is never
    blocked for long."""

    head_timeout_s = HEAD_TIMEOUT_S
    write_stall_s = WRITE_STALL_S

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._await_head(self.head_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # the next request's head is in already: it is answered next
        super().on_response_complete()
        if not pipelined:
            self._await_head(self.timeout_keep_alive + self.head_timeout_s)

    def _await_head(self, seconds: float) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(seconds, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered: its head came after all (a pipelined one)
        if not self.transport.is_closing():
            self.transport.abort()  # nothing of ours is waiting to be sent

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_stall_s, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose client read nothing for %.0f s", self.write_stall_s)
        self.transport.abort()  # not close(): that waits to send what the client does not read


def raise_open_files_limit() -> int:
    """The soft limit on open descriptors raised to the hard one, as servers do (each connection is one; systemd's
    soft default, 1,024, is a few hundred strangers' connections); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux's own ceiling (nr_open) by default
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # a container that refuses it: the limit stays as it was
        return soft
    return target


def server_config(app, *, host: str, port: int, graceful_timeout: float, **more) -> uvicorn.Config:
    """uvicorn's config for our servers (the tests' too): GuardedHttp, our keep-alive, our logging level."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=graceful_timeout,
        lifespan="on",
        timeout_keep_alive=KEEP_ALIVE_S,
        http=GuardedHttp,
        **more,
    )


def serve(
    app, *, host: str, port: int, name: str, graceful_timeout: float = 10.0, sock: socket.socket | None = None
) -> None:
    """Run `app` on host:port until a signal. ServerDidNotStart if it never came up (uvicorn exits the
    process then; this says so in one line), ShutdownFailed if the app's own shutdown raised. sock: host:port
    bound already (listening_socket), by a caller with slow work to do before it serves."""
    app = _StartupFailure(app)
    limit = raise_open_files_limit()
    log.debug("%s may hold %d open descriptors", name, limit)
    config = server_config(
        app, host=host, port=port, graceful_timeout=graceful_timeout
    )  # which sets up uvicorn's loggers: the filter goes on after
    server = GracefulServer(config)
    # bound before the app starts: uvicorn binds after the app's start-up, in which a node registers on chain and
    # heartbeats to its gateways, announcing a port it may then fail to take
    sock = sock or listening_socket(host, port, name)
    cut_off = _CutOffRequests(server)
    logging.getLogger("uvicorn.error").addFilter(cut_off)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's answer to a port it cannot bind or an app whose start-up failed
        if server.started:
            raise
    finally:
        logging.getLogger("uvicorn.error").removeFilter(cut_off)
        sock.close()
    if not server.started:
        if app.error is not None:
            raise ServerDidNotStart(f"{name} did not start: {one_line(app.error)}")
        raise ServerDidNotStart(
            f"{name} did not start on {host}:{port}: see the log above (port busy? start-up failed?)"
        )
    if server.app_stopping and server.lifespan.should_exit:  # uvicorn's mark of a failed app shutdown
        raise ShutdownFailed(f"{name} stopped, but its shutdown failed: see the log above")
    log.info("%s stopped", name)
