"""Host names of strangers' nodes, resolved on threads of their own.

A registered node's api_url names any host, in a zone its registrant runs: a nameserver that never answers holds
a getaddrinfo call for as long as the stub resolver waits (glibc: 5 s x 2 tries), and a deadline on the awaiting
coroutine frees the coroutine, never the thread. On the event loop's default executor those calls took the threads
that `asyncio.to_thread` gives the gateway's own blocking work (key lookups, usage records, accepting heartbeats):
a greeting round of 32 such names made an empty to_thread call wait 19.5 s (red team).

So each user of names has a `Lookups` of its own: the greeter (`GREETER`, names of nodes that do not heartbeat here)
and the node client (`NODES`, names of nodes that do). Within one:
- a name is looked up once at a time, whoever asks (its callers share the lookup), so a stalled name holds one
  thread, however often it is asked for;
- a name whose lookup failed (a stalled zone ends so, after the stub resolver's wait) fails at once for FAILED_S,
  doubled after each failure in a row (to MAX_FAILED_S): a stranger's stalled name holds a thread some 10 s in 10
  minutes, where at a fixed 30 s some 57 heartbeating names kept an honest node's refresh waiting (review); a
  failed refresh keeps an answer still fresh;
- addresses found are kept KEEP_S, and a heartbeat refreshes its node's (`warm`) before they go stale: a request
  connects to a node that heartbeats without waiting on a lookup, so names stalled by strangers (four sufficed to
  hold every thread of one shared pool, and an honest node named by host then looked dead: review) delay only
  other lookups;
- a lookup nobody waits for any more is dropped if it has not started.

asyncio has no resolver that needs no thread, and aiodns (c-ares) would resolve otherwise than the system does
(nsswitch, mDNS): the system's resolver on pools of its own keeps both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import socket
import threading
import time
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

KEEP_S = 60.0  # addresses found are used this long
FAILED_S = 30.0  # a name whose lookup failed fails at once this long, twice as long after each failure in a row,
MAX_FAILED_S = 600.0  # up to this


# what aiohttp asks of its resolver (TCPConnector's family, AF_UNSPEC), and the flags LookupThreadsResolver adds
RESOLVER_FAMILY, RESOLVER_FLAGS = 0, socket.AI_ADDRCONFIG


class _Lookup:
    """One name's lookup in flight, and how many callers wait for it."""

    __slots__ = ("future", "waiting")

    def __init__(self, future: concurrent.futures.Future) -> None:
        self.future, self.waiting = future, 0


class Lookups:
    """socket.getaddrinfo for stream sockets on `threads` threads named `name` (see the module docstring). Its
    tables are shared by the event loop and the lookup threads, under one lock."""

    def __init__(self, threads: int, name: str, *, clock=time.monotonic) -> None:
        self.threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._clock = clock
        self._lock = threading.RLock()  # a lookup dropped under it ends (its callback takes it again)
        self._inflight: dict[tuple, _Lookup] = {}
        self._found: dict[tuple, tuple[float, list[tuple]]] = {}  # key -> (when, getaddrinfo's answer)
        self._failed: dict[tuple, tuple[float, OSError, int]] = {}  # key -> (until, the error, failures in a row)

    async def getaddrinfo(self, host: str, port: int, *, family: int = 0, flags: int = 0) -> list[tuple]:
        """getaddrinfo(host, port, family, SOCK_STREAM, flags); an IP literal is answered without a thread."""
        if _literal(host):
            return socket.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM, flags=flags)
        key = (host.lower(), port, family, flags)
        with self._lock:
            now = self._clock()
            if (found := self._found.get(key)) is not None and now - found[0] < KEEP_S:
                return found[1]
            if (failed := self._failed.get(key)) is not None and now < failed[0]:
                # a new error each time: raising the kept one again would lengthen its traceback with every caller
                raise type(failed[1])(*failed[1].args)
            lookup = self._start(key)
            lookup.waiting += 1
        return await self._wait(key, lookup)

    def warm(self, url: str) -> None:
        """Look up `url`'s host as the node client will ask for it, in the background, unless its addresses are
        fresh (half of KEEP_S), on their way, or failed lately: a node that heartbeats has them ready for the next
        request to it."""
        try:
            host, port = host_and_port(url)
        except ValueError:
            return
        if not host or _literal(host):
            return
        key = (host.lower(), port, RESOLVER_FAMILY, RESOLVER_FLAGS)
        with self._lock:
            now, found, failed = self._clock(), self._found.get(key), self._failed.get(key)
            if found is not None and now - found[0] < KEEP_S / 2 or failed is not None and now < failed[0]:
                return
            self._start(key)

    def _start(self, key: tuple) -> _Lookup:
        """The name's lookup in flight, started if none is (under the lock)."""
        lookup = self._inflight.get(key)
        if lookup is None:
            host, port, family, flags = key
            call = functools.partial(
                socket.getaddrinfo, host, port, family=family, type=socket.SOCK_STREAM, flags=flags
            )
            lookup = self._inflight[key] = _Lookup(self._pool.submit(call))
            lookup.future.add_done_callback(functools.partial(self._done, key, lookup))
        return lookup

    def _done(self, key: tuple, lookup: _Lookup, future: concurrent.futures.Future) -> None:
        """A lookup ended (on its thread, or where it was dropped): its answer kept, or its failure."""
        with self._lock:
            if self._inflight.get(key) is lookup:
                del self._inflight[key]
            if future.cancelled():
                return
            now, error = self._clock(), future.exception()
            if error is None:
                self._found[key] = (now, future.result())
                self._failed.pop(key, None)
            elif isinstance(error, OSError):
                # an answer still fresh is kept (a refresh that failed once must not make an honest node
                # unreachable while it lasts: review); a name failing again and again is asked less and less
                # often, so a stranger's stalled names hold the lookup threads a little of the time
                found, previous = self._found.get(key), self._failed.get(key)
                failures = previous[2] + 1 if previous is not None else 1
                until = now + min(MAX_FAILED_S, FAILED_S * 2 ** min(failures - 1, 16))
                self._failed[key] = (until, error, failures)
                if found is not None and now - found[0] >= KEEP_S:
                    del self._found[key]
            # answers past use forgotten, so names asked for once do not pile up
            if len(self._found) > 4096:
                self._found = {k: v for k, v in self._found.items() if now - v[0] < KEEP_S}
            if len(self._failed) > 4096:  # (a name's failures are forgotten with it: it is asked again at once)
                self._failed = {k: v for k, v in self._failed.items() if now < v[0]}

    async def _wait(self, key: tuple, lookup: _Lookup) -> list[tuple]:
        """The lookup's answer for one caller (counted in lookup.waiting); a caller that gives up leaves it to the
        others, and the last to give up drops it if it has not started."""
        try:
            return await asyncio.wrap_future(_unshared(lookup.future))
        finally:
            with self._lock:
                lookup.waiting -= 1
                if lookup.waiting == 0:
                    lookup.future.cancel()  # only a lookup not started yet: a running one finishes, its answer kept

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses `host` resolves to, in the resolver's order (the order a connection by name tries them)."""
        return list(dict.fromkeys(info[4][0] for info in await self.getaddrinfo(host, port)))


def host_and_port(url: str) -> tuple[str, int]:
    """(host, port) a URL calls: its port, or its scheme's. ValueError for a port one cannot call."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _unshared(future: concurrent.futures.Future) -> concurrent.futures.Future:
    """A future that ends as `future` does, whose cancelling leaves `future` be (asyncio.wrap_future cancels the
    future it wraps when the asyncio one is cancelled: one caller giving up would end a lookup others wait for)."""
    mine: concurrent.futures.Future = concurrent.futures.Future()

    def copy(f: concurrent.futures.Future) -> None:
        if not mine.set_running_or_notify_cancel():
            return  # this caller gave up
        if f.cancelled():
            mine.set_exception(socket.gaierror(socket.EAI_AGAIN, "the lookup was dropped"))
        elif f.exception() is not None:
            mine.set_exception(f.exception())
        else:
            mine.set_result(f.result())

    future.add_done_callback(copy)
    return mine


GREETER = Lookups(4, "dns-greeter")  # names of registered nodes that do not heartbeat here
NODES = Lookups(8, "dns-nodes")  # names of nodes that heartbeat here, for the node client


class LookupThreadsResolver(AbstractResolver):
    """aiohttp's resolver on a Lookups (aiohttp's default, ThreadedResolver, uses the default executor)."""

    def __init__(self, lookups: Lookups = NODES) -> None:
        self.lookups = lookups

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        infos = await self.lookups.getaddrinfo(host, port, family=family, flags=RESOLVER_FLAGS)
        numeric = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [
            ResolveResult(hostname=host, host=addr[0], port=addr[1], family=fam, proto=proto, flags=numeric)
            for fam, _, proto, _, addr in infos
            if fam in (socket.AF_INET, socket.AF_INET6)
        ]

    async def close(self) -> None:
        pass
