"""The gateway saying hello to the nodes the chain registered (node/gateway_hello.py): a gateway started after
the nodes sees every live one within one round, with no node restarted, and from then on they heartbeat to it.

Each round (every `interval` seconds) greets the registered, active nodes that have not heartbeated here
within the directory's ttl: a node that already heartbeats to this gateway is never asked. The node answers
with its signed heartbeat, taken exactly as a pushed one (gateway.directory). A node that does not answer
as a node is asked again after a back-off that doubles up to `max_backoff_s`, so a dead node, or a
registered URL that is no node at all, costs one small POST every few minutes.

The URLs are strangers' (anyone may register a node): each call is a fixed POST of a small JSON body to
`<registered api_url>/internal/gateway-hello` (an api_url holding "?", "#" or "@" is skipped: it could
choose another path or carry credentials), under one deadline for the whole call (a server that drips its
answer cannot hold it), with a bounded answer, at most `concurrency` at once, and each node on its own: a
round starts the greetings that are due and does not wait for them, so a slow node delays nobody else.

A registration costs only its gas, so many registered nodes may name one server (a stranger's flood aimed at
someone else's host, paths varied): an origin (scheme, host, port) gets at most one hello at a time and one a
round, whatever the number of nodes naming it. Nodes behind one origin are greeted one a round. Host names are
free too (a wildcard DNS record gives any number of names one address), so the bound holds per address: a
greeting resolves its host first and calls one of its addresses (the host name still in the Host header and
TLS's server name, so a second lookup answered otherwise cannot move the call elsewhere; no connection kept, so
none checked for one name carries another's); an address already greeted this round, or being greeted, is left
for a later round, at no cost to the node.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from common.http import bounded_call
from common.wire import UntrustedJSONError
from gateway import dns
from gateway.chain_registry import RegistryView
from gateway.directory import NodeDirectory, read_heartbeat
from gateway.errors import GatewayError
from ledger.types import api_url_problem
from node.gateway_hello import HELLO_PATH, make_hello

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Backoff:
    next_at: float = 0.0
    delay: float = 0.0
    failures: int = 0
    tried_at: float = 0.0  # the last failed hello


class NodeGreeter:
    """Says hello, as `account` (the gateway's settler), to the registered nodes that do not heartbeat here."""

    def __init__(
        self,
        account,
        *,
        registry: RegistryView,
        directory: NodeDirectory,
        gateway_url: str,
        gateway_key: str,
        interval: float = 2.0,
        timeout: float = 2.0,
        deadline: float = 5.0,
        max_backoff_s: float = 300.0,
        max_answer_bytes: int = 256 << 10,
        concurrency: int = 16,
        clock=time.monotonic,
    ) -> None:
        self.account = account
        self.registry = registry
        self.directory = directory
        self.gateway_url = gateway_url.rstrip("/")
        self.gateway_key = gateway_key
        self.interval = interval
        self.timeout = timeout
        self.deadline = deadline
        self.max_backoff_s = max_backoff_s
        self.max_answer_bytes = max_answer_bytes
        self.clock = clock
        self.greeted = 0  # hellos a node answered with a heartbeat we took
        self.refused = 0  # hellos that failed: unreachable, refused, or not answered as a node
        self._backoff: dict[str, _Backoff] = {}
        self._limit = asyncio.Semaphore(concurrency)
        self._inflight: dict[str, asyncio.Task] = {}  # node id -> its greeting, while it runs
        self._busy: set[tuple] = set()  # the origins of the greetings in flight
        self._round = 0  # start_due calls so far
        self._greeted_at: dict[tuple, int] = {}  # (address, port) -> the round that called it, this round's only
        self._calling: set[tuple] = set()  # the (address, port) of the calls in flight
        self._warned_not_settler = False

    def due(self) -> list[tuple[str, str]]:
        """(node id, hello URL) of the registered, active nodes that are silent here and not backing off."""
        now = self.clock()
        # one greeting an origin (none for one in flight): of the nodes due there, the one that failed the fewest
        # times in a row, then the one tried longest ago, so that nodes registered at a real node's origin to
        # flood it never keep it from being greeted
        best: dict[tuple, tuple[tuple, str, str]] = {}
        for reg in list(self.registry.nodes.values()):
            if not reg.active or not _callable_url(reg.api_url) or reg.node_id in self._inflight:
                continue
            entry = self.directory.get(reg.node_id)
            if entry is not None and now - entry.last_seen <= self.directory.ttl:
                continue  # it heartbeats here
            b = self._backoff.get(reg.node_id)
            if b is not None and now < b.next_at:
                continue
            origin = _origin(reg.api_url)
            if origin is None or origin in self._busy:
                continue
            rank = (b.failures, b.tried_at) if b is not None else (0, -math.inf)
            if origin not in best or rank < best[origin][0]:
                best[origin] = (rank, reg.node_id, reg.api_url.rstrip("/") + HELLO_PATH)
        return [(node_id, url) for _, node_id, url in best.values()]

    def start_due(self, client: httpx.AsyncClient) -> list[asyncio.Task]:
        """Start the greetings that are due, each its own task (returned; `run` does not wait for them)."""
        tasks = []
        self._round += 1
        self._greeted_at.clear()  # an earlier round's calls bind nothing now (those in flight are in _calling)
        for node_id, url in self.due():
            task = asyncio.create_task(self._greet(client, node_id, url), name=f"greet-{node_id[:10]}")
            self._inflight[node_id] = task
            self._busy.add(origin := _origin(url))
            task.add_done_callback(lambda _t, n=node_id, o=origin: self._done(n, o))
            tasks.append(task)
        return tasks

    def _done(self, node_id: str, origin: tuple) -> None:
        self._inflight.pop(node_id, None)
        self._busy.discard(origin)

    async def greet_once(self, client: httpx.AsyncClient) -> dict[str, str]:
        """One round, waited for; node id -> "ok" or why it failed."""
        due = self.due()
        tasks = self.start_due(client)
        results = await asyncio.gather(*tasks)
        return dict(zip((n for n, _ in due), results))

    async def _greet(self, client: httpx.AsyncClient, node_id: str, url: str) -> str:
        async with self._limit:
            doc = make_hello(self.account, gateway_url=self.gateway_url, gateway_key=self.gateway_key, node_id=node_id)
            this_round = self._round
            try:
                async with asyncio.timeout(self.deadline):
                    status, answer = await self._call_pinned(client, url, doc, this_round)
                    if status is None:
                        return "address busy"  # one hello an address at a time and a round: this node waits a round
            except TimeoutError:
                return self._failed(node_id, url, f"no whole answer within {self.deadline:g} s")
            except (httpx.HTTPError, httpx.InvalidURL, ValueError, OSError) as e:  # a registered URL may be anything
                return self._failed(node_id, url, f"unreachable: {type(e).__name__}")
        if status != 200:
            text = answer[:300].decode("utf-8", "replace")  # quoted below: a line of the log is never a node's
            if status == 403 and "not_settler" in text and not self._warned_not_settler:
                self._warned_not_settler = True
                log.warning(
                    "nodes refuse this gateway's hello: %s is not a settler on the ledger, so nodes that do not "
                    "list this gateway (--gateway) never heartbeat to it",
                    self.account.address,
                )
            return self._failed(node_id, url, f"refused ({status}): {text!r}")

        def take() -> str | None:  # on a worker thread, as a heartbeat is taken (NodeDirectory.take_heartbeat)
            heartbeat = read_heartbeat(answer, self.max_answer_bytes, what="hello answer")
            body = heartbeat.get("body") if isinstance(heartbeat, dict) else None
            if not isinstance(body, dict) or body.get("node_id") != node_id:  # another node's heartbeat
                return "answered with a heartbeat that is not its own"
            self.directory.accept_heartbeat(heartbeat)
            return None

        try:
            if (refused := await asyncio.to_thread(take)) is not None:
                return self._failed(node_id, url, refused)
        except GatewayError as e:
            if e.code != "stale_heartbeat":  # stale: it heartbeated here meanwhile, which is what we wanted
                return self._failed(node_id, url, f"its heartbeat was refused: {e.message}")
        except UntrustedJSONError as e:
            return self._failed(node_id, url, f"answered no heartbeat: {e}")
        if self._backoff.pop(node_id, None) is not None:
            log.info("node %s took this gateway's hello", node_id[:10])
        self.greeted += 1
        return "ok"

    async def _call_pinned(
        self, client: httpx.AsyncClient, url: str, doc: dict, this_round: int
    ) -> tuple[int | None, bytes]:
        """POST `doc` to `url` at one of the addresses its host resolves to, in the resolver's order (a dual-stack
        host whose first address this gateway cannot reach is called at the next, as a connection by name would),
        skipping those called this round or being called: (status, answer), or (None, b"") when every address was
        skipped. Each address tried counts as called this round."""
        parts = urlsplit(url)
        host, port = dns.host_and_port(url)
        unreachable: Exception | None = None
        for address in await dns.GREETER.addresses(host, port):  # on threads of their own (gateway.dns)
            key = (address, port)
            if key in self._calling or self._greeted_at.get(key) == this_round:
                continue
            self._calling.add(key)
            self._greeted_at[key] = this_round
            literal = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
            pinned = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path, parts.query, parts.fragment))
            # the name in the Host header and TLS's server name (the certificate is checked against it); and no
            # connection kept: a pool keys its connections by address, and would carry the next name's hello over
            # a connection whose certificate was checked for another name
            kw: dict = {"headers": {"Host": parts.netloc, "Connection": "close"}}
            if parts.scheme == "https":
                kw["extensions"] = {"sni_hostname": host}
            try:
                return await bounded_call(client, "POST", pinned, self.max_answer_bytes, json=doc, **kw)
            except httpx.ConnectError as e:  # nothing answers at this address: the next one
                unreachable = e
            finally:
                self._calling.discard(key)
        if unreachable is not None:
            raise unreachable
        return None, b""

    def _failed(self, node_id: str, url: str, why: str) -> str:
        self.refused += 1
        b = self._backoff.setdefault(node_id, _Backoff())
        b.failures += 1
        b.delay = min(self.max_backoff_s, max(self.interval, b.delay * 2))
        b.tried_at = self.clock()
        b.next_at = b.tried_at + b.delay
        # the first failure is news; the rest, until it answers, are only the back-off at work
        (log.info if b.failures == 1 else log.debug)(
            "hello to node %s at %s failed (%d in a row, next in %.0f s): %s",
            node_id[:10],
            url,
            b.failures,
            b.delay,
            why,
        )
        return why

    async def run(self) -> None:
        """Start the due greetings every `interval` seconds until cancelled."""
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
            try:
                while True:
                    try:
                        self.start_due(client)
                    except Exception:  # nothing a node answers may end the greetings
                        log.exception("greeting round failed")
                    await asyncio.sleep(self.interval)
            finally:
                for task in list(self._inflight.values()):
                    task.cancel()


def _origin(url: str) -> tuple | None:
    """(scheme, host, port) of a callable URL: what one server answers, whatever the path. None for a URL with no
    port one can call (the registry takes `http://h:99999` and `http://[::1`; httpx refuses them)."""
    try:
        host, port = dns.host_and_port(url)
    except ValueError:
        return None
    return urlsplit(url).scheme.lower(), host.lower(), port


def _callable_url(url: str) -> bool:
    """Whether a registered api_url is one the greeter calls: one the registry takes (http(s), no query,
    fragment or credentials, bounded)."""
    return api_url_problem(url) is None
