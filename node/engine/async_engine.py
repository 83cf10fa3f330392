"""The asyncio-facing engine: `submit` returns an async iterator of token events; steps run on a
background thread so the event loop stays responsive, and commands reach that thread between steps.
The event loop stops here: the core (LLMEngine and below) is synchronous and knows none."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from node.engine.config import EngineConfig
from node.engine.grammar import NotCompiled
from node.engine.llm_engine import LLMEngine
from node.engine.request import (
    DuplicateRequestError,
    EngineBusyError,
    FinishEvent,
    GenerationRequest,
    PromptLogprobsEvent,
    SequenceFinishEvent,
    TokenEvent,
)

log = logging.getLogger(__name__)

# the node's fetcher of an adapter its store lacks: adapter id -> the path a peer's package was
# installed at, or None when no peer had it
AsyncFetcher = Callable[[str], Awaitable[Path | None]]
# requests waiting for (or in) the compile thread, past which a new one is refused at once (EngineBusyError): a
# compile takes at most tens of milliseconds (grammar.MAX_GRAMMAR_SIZE), so the queue's last waits well under a
# second, never the gateway's first-byte timeout that takes a silent node for a hung one
MAX_QUEUED_COMPILES = 16


class RequestStream:
    """Events of one request: PromptLogprobsEvent (when asked), TokenEvent and SequenceFinishEvent as its
    sequences run, then one FinishEvent. Closing it early aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.final: FinishEvent | None = None

    @property
    def finished(self) -> bool:
        return self.final is not None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent | PromptLogprobsEvent | SequenceFinishEvent | FinishEvent:
        if self.final is not None:
            raise StopAsyncIteration
        ev = await self.queue.get()
        if isinstance(ev, FinishEvent):
            self.final = ev
        return ev

    async def aclose(self) -> None:
        if self.final is None:
            self.engine.abort_nowait(self.request_id)


class AsyncEngine:
    """Thread-driven wrapper of LLMEngine for asyncio code (the node API). Its fetcher runs on the event
    loop of the engine's callers."""

    def __init__(
        self, config: EngineConfig, *, store=None, fetcher: AsyncFetcher | None = None, weights=None, kernel=None
    ) -> None:
        self._fetch = fetcher
        # the loop the asyncio callers run on, where fetches run: known once one has called
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self.core = LLMEngine(
            config,
            store=store,
            fetcher=self._fetch_on_loop if fetcher is not None else None,
            on_ready=self._wake.set,
            weights=weights,
            kernel=kernel,
        )
        self.config = config
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._commands: queue.SimpleQueue[tuple[Callable, Future]] = queue.SimpleQueue()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # one thread validates the requests that cost (grammar compiles, text prompts): a flood of hostile
        # schemas takes one core at most, and never the event loop
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="request-compiler")
        self._compiles = 0  # requests waiting for the compile thread or on it (event loop only)

    @property
    def base_model_id(self) -> str:
        return self.core.base_model_id

    @property
    def base_model_name(self) -> str:
        return self.core.base_model_name

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.core.model_cfg.vocab_size

    @property
    def max_len(self) -> int:
        """The longest sequence (prompt + completion) a request may reach on this engine."""
        return self.core.max_len

    @property
    def max_ensembles(self) -> int:
        """The most ensembles (each weighting one) this engine holds in its slots and host cache at once."""
        return self.core.adapters.max_ensembles

    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop (pending requests end as aborted) and the adapter loader."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join(timeout=30)
            self._thread = None
        self._compiler.shutdown(wait=False, cancel_futures=True)
        self.core.close()

    # ---- API for asyncio callers ----
    async def asubmit(self, request: GenerationRequest) -> RequestStream:
        """`submit`, with the request's costly validation off the event loop when it has any: a grammar to compile
        (one at a time, on the compile thread; at most MAX_QUEUED_COMPILES waiting, EngineBusyError past them) or a
        text prompt to tokenize. A request of token ids, plain or with a grammar compiled already, is validated on
        the loop (a thread hop costs its TTFT more; a compiled grammar never waits behind another's compile)."""
        if not self.core.costly(request):
            try:
                return self._queue(request, self.core.make_group(request, compile=False))
            except NotCompiled:
                pass  # its grammar was evicted since costly() looked: compiled on the compile thread as any other
        if self._compiles >= MAX_QUEUED_COMPILES:
            raise EngineBusyError(
                f"this node has {self._compiles} requests waiting for grammar compiles or prompt tokenization; retry"
            )
        self._compiles += 1
        try:
            group = await asyncio.get_running_loop().run_in_executor(self._compiler, self.core.make_group, request)
        finally:
            self._compiles -= 1
        return self._queue(request, group)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate and queue a request; raises RequestError subclasses for bad ones."""
        return self._queue(request, self.core.make_group(request))

    def _queue(self, request: GenerationRequest, group) -> RequestStream:
        loop = self._loop = asyncio.get_running_loop()
        stream = RequestStream(self, request.request_id, loop)
        with self._lock:
            if request.request_id in self._streams:
                raise DuplicateRequestError(f"request {request.request_id} is already running")
            self._streams[request.request_id] = stream

        def add() -> None:
            try:
                self.core.add_group(group)
            except Exception:
                with self._lock:
                    self._streams.pop(request.request_id, None)
                raise

        self.call(add)
        return stream

    async def abort(self, request_id: str) -> FinishEvent | None:
        """Abort a request; returns its final event (None if the engine never saw it)."""
        return await asyncio.wrap_future(self.call(lambda: self._abort(request_id)))

    def abort_nowait(self, request_id: str) -> None:
        self.call(lambda: self._abort(request_id))

    async def finished(self, request_id: str) -> FinishEvent | None:
        """The final event of a request that finished recently; None while it runs, or when unknown
        or long finished."""
        return await asyncio.wrap_future(self.call(lambda: self.core.recent.get(request_id)))

    def define_ensemble(self, components, names: list[str] | None = None) -> str:
        """Make an ensemble of (adapter id, weight) pairs servable under its id (any thread); returns the id."""
        from node.engine.lora.ensemble import EnsembleSpec

        return self.core.adapters.define_ensemble(EnsembleSpec.of(components, names))

    async def prepare_adapter(self, adapter_id: str):
        """Make sure the adapter can be served (host cache); raises AdapterError subclasses."""
        self._loop = asyncio.get_running_loop()
        return await asyncio.wrap_future(self.core.prefetch(adapter_id))

    async def load_adapter(self, adapter_id: str, pin: bool | None = None) -> int:
        """Load an adapter into a slot now (optionally pinning it); returns the slot."""
        await self.prepare_adapter(adapter_id)
        return await asyncio.wrap_future(self.call(lambda: self.core.make_resident(adapter_id, pin)))

    def status(self) -> dict:
        """Slots, queue and throughput (for /status)."""
        return self.core.status()

    def adapters_in_use(self) -> set[str]:
        """The adapter ids whose packages the engine may read now (any thread; AdapterManager.in_use)."""
        return self.core.adapters.in_use()

    def call(self, fn: Callable) -> Future:
        """Run `fn` on the engine thread between steps."""
        fut: Future = Future()
        self._commands.put((fn, fut))
        self._wake.set()
        return fut

    def _fetch_on_loop(self, adapter_id: str, timeout: float) -> Future:
        """The core's fetcher (lora/manager.py's Fetcher, called on the loader thread): the node's
        async fetcher as a task on the callers' loop, given up after `timeout` seconds."""
        if self._loop is None:  # no asyncio caller yet, so no loop to fetch on: as if no peer had it
            nobody: Future = Future()
            nobody.set_result(None)
            return nobody
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(self._fetch(adapter_id), timeout), self._loop)

    # ---- engine thread ----
    def _abort(self, request_id: str) -> FinishEvent | None:
        ev = self.core.abort(request_id)
        if ev is not None:
            self._dispatch([ev])
        return ev

    def _run(self) -> None:
        while True:
            self._wake.clear()
            self._run_commands()
            if self._stopping:
                break
            did = False
            if self.core.has_work():
                events, did = self.core.step()
                self._dispatch(events)
            if not did:
                self._wake.wait(0.5)
        for rid in list(self.core.requests):
            self._abort(rid)
        self._run_commands()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            # a caller that gave up (its task cancelled) cancelled the future: setting its result would raise
            # InvalidStateError here and end the engine's loop for every request
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)

    def _dispatch(self, events) -> None:
        for ev in events:
            with self._lock:
                stream = self._streams.get(ev.request_id)
                if isinstance(ev, FinishEvent):
                    self._streams.pop(ev.request_id, None)
            if stream is None:
                continue
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, ev)
            except RuntimeError:  # the caller's loop is gone
                pass
