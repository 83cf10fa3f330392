"""Host names of strangers' nodes, resolved on threads of their own.

A registered node's api_url names any host, in a zone its registrant runs: a nameserver that never answers holds
a getaddrinfo call for as long as the stub resolver waits (glibc: 5 s x 2 tries), and a deadline on the awaiting
coroutine frees the coroutine, never the thread. On the event loop's default executor those calls took the threads
that `asyncio.to_thread` gives the gateway's own blocking work (key lookups, usage records, accepting heartbeats):
a greeting round of 32 such names made an empty to_thread call wait 19.5 s (red team). Here they wait on at most
LOOKUP_THREADS threads of their own, and a lookup still queued when its caller gives up is dropped unrun.

asyncio has no resolver that needs no thread, and aiodns (c-ares) would resolve otherwise than the system does
(nsswitch, mDNS): the system's resolver on a pool of its own keeps both.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor

from aiohttp.abc import AbstractResolver, ResolveResult

LOOKUP_THREADS = 4  # lookups at once; more wait their turn (or are dropped when their caller gives up first)

_pool = ThreadPoolExecutor(max_workers=LOOKUP_THREADS, thread_name_prefix="dns")


async def getaddrinfo(host: str, port: int, *, family: int = 0, flags: int = 0) -> list[tuple]:
    """socket.getaddrinfo for a stream socket, on the lookup threads; an IP literal is answered without one."""
    call = functools.partial(socket.getaddrinfo, host, port, family=family, type=socket.SOCK_STREAM, flags=flags)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return await asyncio.get_running_loop().run_in_executor(_pool, call)
    return call()  # numeric: nothing to ask a nameserver


async def addresses(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, in the resolver's order (the order a connection by name tries them)."""
    return list(dict.fromkeys(info[4][0] for info in await getaddrinfo(host, port)))


class LookupThreadsResolver(AbstractResolver):
    """aiohttp's resolver on the lookup threads (aiohttp's default, ThreadedResolver, uses the default executor)."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        infos = await getaddrinfo(host, port, family=family, flags=socket.AI_ADDRCONFIG)
        numeric = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [
            ResolveResult(hostname=host, host=addr[0], port=addr[1], family=fam, proto=proto, flags=numeric)
            for fam, _, proto, _, addr in infos
            if fam in (socket.AF_INET, socket.AF_INET6)
        ]

    async def close(self) -> None:
        pass
