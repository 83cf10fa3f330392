"""Signed heartbeats: how a node tells its gateways it is alive, how loaded it is, and what is resident.

A heartbeat is {"body": {...}, "signature": hex}; the signature is Ed25519 by the node key over
canonical_json(body). The body carries the raw public key, so a gateway can check that
sha256(public key) is the node id the chain registered, and then trust the rest.

The other way round, the sender learns each gateway's signing key (GET {url}/internal/gateway-key
before the first heartbeat, and the "gateway_key" of every 200 answer): unless the operator lists
the keys to trust, these are the gateways whose signed calls the node API accepts.

Each heartbeat names, in its signed body, the key of the gateway it is sent to ("gateway_key"): anyone who
receives a node's heartbeats (a gateway that said hello, say) could otherwise post them to a gateway the node
does not trust, which would route requests to a node that refuses them. A gateway refuses a heartbeat meant
for another, and takes one naming none from a node older than this rule; a node sends none to a gateway whose
key it does not know. A gateway that refuses one as meant for another has a new key: the node asks its URL
for it again.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.http import bounded_call
from common.wire import UntrustedJSONError, canonical_json, is_id, parse_json, read_error, sha256_hex
from node.request_auth import is_gateway_key

log = logging.getLogger(__name__)

FORMAT = "loramesh-heartbeat/1"
HEARTBEAT_PATH = "/internal/heartbeat"
GATEWAY_KEY_PATH = "/internal/gateway-key"
MAX_KEY_ANSWER_BYTES = 4096
MAX_HEARTBEAT_ANSWER_BYTES = 64 * 1024
# Statuses larger than this are not a heartbeat but an attack on the gateway's memory.
MAX_STATUS_BYTES = 64 * 1024
# the resident adapters a heartbeat lists, by id alone: all gateways read of them (gateway.directory)
MAX_RESIDENT = 256
# the JSON objects and arrays a gateway parses of a heartbeat, or of a hello's answer (one a resident adapter, and a
# few dozen more): anyone may send heartbeats, and thousands of them cost the parser Python calls and garbage
# collections (red team: 90 kB of `[{},{},...]` a request made a flooded gateway's other answers 18 times slower,
# and of `[[],[],...]` 50 to 120 times, parsed off the event loop)
MAX_HEARTBEAT_CONTAINERS = 4 * MAX_RESIDENT
# and its values (commas and colons): a node of the previous release, its whole status at the 64 KiB bound, writes
# about 4,400; one object of 12,000 keys or 24,000 numbers cost the gateway as much as 12,000 objects (re-attack)
MAX_HEARTBEAT_SEPARATORS = 8192
# A gateway that keeps failing is warned about when it starts failing and then once a minute, with the count:
# the operator sees it without a line every beat.
WARN_EVERY_S = 60.0
# Gateways that said hello (node.gateway_hello) are forgotten after failing this long in a row (they say
# hello again when they come back); those the operator named are never forgotten.
FORGET_AFTER_S = 600.0
# At most this many gateways that said hello at once (each costs a request per beat), and per settler.
MAX_HELLO_GATEWAYS = 64
MAX_GATEWAYS_PER_SETTLER = 8
# the error code of a gateway refusing a heartbeat that names another gateway's key (gateway.directory)
ANOTHER_GATEWAY = "heartbeat_for_another_gateway"


def heartbeat_status(status: dict) -> dict:
    """What a heartbeat carries of the node's /status: all of it but its adapter tables and p2p state, which no
    gateway reads, with the resident adapters listed by id (MAX_RESIDENT at most). The whole slot table, each
    adapter named, passed MAX_STATUS_BYTES at about 350 slots, and every gateway refused the node's heartbeats
    (red team)."""
    out = {k: v for k, v in status.items() if k not in ("resident_adapters", "cached_adapters", "p2p")}
    resident = status.get("resident_adapters")
    ids = [a.get("adapter_id") for a in (resident if isinstance(resident, list) else ()) if isinstance(a, dict)]
    out["resident_adapters"] = [{"adapter_id": a} for a in ids[:MAX_RESIDENT]]
    return out


class HeartbeatError(ValueError):
    """A heartbeat that is malformed, unsigned, or signed by a key that is not the node's."""


class UnsignedHeartbeatError(HeartbeatError):
    """A heartbeat without a signature, or whose signature does not verify."""


def make_heartbeat(
    identity,
    *,
    api_url: str,
    base_model_id: str,
    status: dict,
    gateway_key: str | None = None,
    ts_ms: int | None = None,
) -> dict:
    """A heartbeat document signed with `identity.node_key` over the canonical body, meant for the gateway whose
    signing key is `gateway_key` (None: for any, as before gateways were named)."""
    body = {
        "format": FORMAT,
        "node_id": identity.node_id,
        "public_key": identity.node_public_key.hex(),
        "api_url": api_url,
        "base_model_id": base_model_id,
        "status": status,
        "ts_ms": int(time.time() * 1000) if ts_ms is None else int(ts_ms),
    }
    if gateway_key is not None:
        body["gateway_key"] = gateway_key
    signature = identity.node_key.sign(canonical_json(body))
    return {"body": body, "signature": signature.hex()}


def verify_heartbeat(doc: object, *, now_ms: int | None = None, max_skew_ms: int | None = None) -> dict:
    """Check a heartbeat's shape, key-to-id binding and signature; return its body.

    Raises UnsignedHeartbeatError for a missing or wrong signature and HeartbeatError otherwise.
    With max_skew_ms, a timestamp further than that from now_ms (default: now) is refused too."""
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict):
        raise HeartbeatError('heartbeat must be a JSON object {"body": {...}, "signature": hex}')
    body, signature = doc["body"], doc.get("signature")
    if not isinstance(signature, str) or not signature:
        raise UnsignedHeartbeatError("heartbeat has no signature: expected a hex Ed25519 signature of its body")
    if body.get("format") != FORMAT:
        raise HeartbeatError(f"heartbeat format is {body.get('format')!r}, expected {FORMAT!r}")
    for name in ("node_id", "base_model_id"):
        if not is_id(body.get(name)):
            raise HeartbeatError(f"heartbeat {name} must be 0x followed by 64 lowercase hex digits")
    if not isinstance(body.get("api_url"), str) or not body["api_url"].startswith(("http://", "https://")):
        raise HeartbeatError("heartbeat api_url must be an http(s) URL")
    if not isinstance(body.get("status"), dict):
        raise HeartbeatError("heartbeat status must be a JSON object (the node's /status)")
    ts = body.get("ts_ms")
    if isinstance(ts, bool) or not isinstance(ts, int) or ts <= 0:
        raise HeartbeatError("heartbeat ts_ms must be a positive integer (milliseconds since the epoch)")
    if "gateway_key" in body and not (isinstance(body["gateway_key"], str) and is_gateway_key(body["gateway_key"])):
        raise HeartbeatError("heartbeat gateway_key must be 64 lowercase hex digits (the gateway's Ed25519 key)")
    try:
        public_key = bytes.fromhex(body.get("public_key", ""))
        sig = bytes.fromhex(signature)
    except (TypeError, ValueError) as e:
        raise HeartbeatError("heartbeat public_key and signature must be hex strings") from e
    if len(public_key) != 32:
        raise HeartbeatError(f"heartbeat public_key must be 32 bytes (raw Ed25519), got {len(public_key)}")
    if sha256_hex(public_key) != body["node_id"]:
        raise HeartbeatError("heartbeat public_key does not hash to its node_id (node id = sha256(public key))")
    payload = canonical_json(body)
    if len(payload) > MAX_STATUS_BYTES:
        raise HeartbeatError(f"heartbeat is {len(payload)} bytes, more than the {MAX_STATUS_BYTES} allowed")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, payload)
    except InvalidSignature as e:
        raise UnsignedHeartbeatError("heartbeat signature does not verify against its public key") from e
    if max_skew_ms is not None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if abs(now - ts) > max_skew_ms:
            raise HeartbeatError(f"heartbeat ts_ms is {abs(now - ts)} ms from now, more than {max_skew_ms} allowed")
    return body


StatusFn = Callable[[], dict | Awaitable[dict]]


def gateway_key_of(answer: bytes, *, max_bytes: int) -> str | None:
    """The "gateway_key" (64 hex, lowercased) in a gateway's JSON answer; None when it has none or it is malformed."""
    try:
        doc = parse_json(answer, max_bytes=max_bytes, what="gateway answer")
    except UntrustedJSONError:
        return None
    key = doc.get("gateway_key") if isinstance(doc, dict) else None
    if not isinstance(key, str) or len(key) != 64:
        return None
    key = key.lower()
    return key if all(c in "0123456789abcdef" for c in key) else None


class TooManyGateways(RuntimeError):
    """A hello from one gateway more than MAX_HELLO_GATEWAYS."""


class HeartbeatSender:
    """Posts a signed heartbeat to every gateway every `interval` seconds; a down gateway is retried
    on the next beat and never stops the others. Start it from the node daemon's event loop.

    Its gateways are the operator's (`gateway_urls`, kept for good) and those added by `add_gateway` when
    they said hello (forgotten after failing FORGET_AFTER_S in a row)."""

    def __init__(
        self,
        identity,
        gateway_urls: Sequence[str],
        *,
        api_url: str,
        base_model_id: str,
        status_fn: StatusFn,
        interval: float = 2.0,
        timeout: float = 2.0,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {interval}")
        self.identity = identity
        self.gateway_urls = [u.rstrip("/") for u in gateway_urls]
        self.api_url = api_url
        self.base_model_id = base_model_id
        self.status_fn = status_fn
        self.interval = interval
        self.timeout = timeout
        self.sent = 0  # heartbeats accepted by some gateway
        self.failed = 0  # heartbeats that did not reach a gateway or that it refused
        self.failing: dict[str, int] = {}  # gateway url -> heartbeats failed in a row (absent: the last one went)
        self._warned_at: dict[str, float] = {}  # gateway url -> when its failures were last warned about
        self.gateway_keys: dict[str, str] = {}  # gateway url -> the signing key it announced (hex)
        self.greeted: dict[str, str] = {}  # url added by a hello (not the operator's) -> the settler who signed it
        self.max_greeted = MAX_HELLO_GATEWAYS
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None

    async def _status(self) -> dict:
        status = self.status_fn()
        if inspect.isawaitable(status):
            status = await status
        return heartbeat_status(status)

    async def heartbeat_doc(self, gateway_key: str, status: dict | None = None) -> dict:
        """A heartbeat signed now for the gateway with `gateway_key` (what a beat sends, and what a hello is
        answered with)."""
        return make_heartbeat(
            self.identity,
            api_url=self.api_url,
            base_model_id=self.base_model_id,
            status=await self._status() if status is None else status,
            gateway_key=gateway_key,
        )

    async def send_once(self) -> dict[str, int | str]:
        """Send one heartbeat to every gateway; returns url -> HTTP status, or the error text."""
        status = await self._status()
        client = self._client or httpx.AsyncClient(timeout=self.timeout)
        try:
            urls = list(self.gateway_urls)  # a hello may add one while the posts run
            results = await asyncio.gather(*(self._post(client, url, status) for url in urls))
        finally:
            if client is not self._client:
                await client.aclose()
        return dict(zip(urls, results))

    def add_gateway(self, url: str, key: str, settler: str = "") -> bool:
        """Heartbeat to `url` from now on, and trust `key` for it when it is a gateway that said hello whose key is
        not known yet (a known URL's key is what the URL answers; an operator's URL never takes one from a hello);
        `settler` signed the hello, the chain vouched for it. True when the gateway is new. TooManyGateways past
        `max_greeted`."""
        url = url.rstrip("/")
        new = url not in self.gateway_urls
        if new:
            if len(self.greeted) >= self.max_greeted:
                raise TooManyGateways(f"this node already heartbeats to {len(self.greeted)} gateways that said hello")
            if settler and sum(1 for s in self.greeted.values() if s == settler) >= MAX_GATEWAYS_PER_SETTLER:
                raise TooManyGateways(f"settler {settler} already vouches for {MAX_GATEWAYS_PER_SETTLER} gateways here")
            self.gateway_urls.append(url)
            self.greeted[url] = settler
            log.info("gateway %s said hello (settler %s): heartbeating to it", url, settler or "?")
        elif url in self.greeted and settler:
            self.greeted[url] = settler  # the latest settler to vouch for it is the one re-checked
        if url in self.greeted and url not in self.gateway_keys:
            # a known URL's key is what the URL itself answers; an operator's URL is never given one by a hello
            self._learn(url, key)
        return new

    def trusted_keys(self) -> frozenset[str]:
        """The signing keys of the gateways this node heartbeats to, as they last announced them."""
        return frozenset(self.gateway_keys.values())

    def _learn(self, url: str, key: str | None) -> None:
        if key is not None and self.gateway_keys.get(url) != key:
            log.info(
                "gateway %s signs with key %s%s",
                url,
                key[:16],
                "" if url not in self.gateway_keys else " (a new key: the old one is no longer trusted)",
            )
            self.gateway_keys[url] = key

    async def _post(self, client: httpx.AsyncClient, url: str, status: dict) -> int | str:
        try:
            # one deadline over both calls: a gateway that drips its answer cannot hold up the round (and so every
            # other gateway's heartbeat)
            async with asyncio.timeout(2 * self.timeout):
                return await self._post_within(client, url, status)
        except TimeoutError:
            self._failed(url, f"no whole answer within {2 * self.timeout:g} s")
            return "timed out"

    async def _post_within(self, client: httpx.AsyncClient, url: str, node_status: dict) -> int | str:
        try:
            if url not in self.gateway_keys:
                status, answer = await bounded_call(client, "GET", url + GATEWAY_KEY_PATH, MAX_KEY_ANSWER_BYTES)
                if status == 200:
                    self._learn(url, gateway_key_of(answer, max_bytes=MAX_KEY_ANSWER_BYTES))
            if url not in self.gateway_keys:
                # a heartbeat naming no gateway is taken by any: whoever answers at this URL could relay it
                self._failed(url, f"it did not say its key ({GATEWAY_KEY_PATH})")
                return "no gateway key"
            doc = await self.heartbeat_doc(self.gateway_keys[url], node_status)
            status, answer = await bounded_call(
                client,
                "POST",
                url + HEARTBEAT_PATH,
                MAX_HEARTBEAT_ANSWER_BYTES,
                # canonical: its size on the wire is its signed size, whatever httpx's release writes for json=
                content=canonical_json(doc),
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as e:
            self._failed(url, f"unreachable: {type(e).__name__}: {e}")
            return f"unreachable: {e}"
        refused = read_error(answer, max_bytes=MAX_HEARTBEAT_ANSWER_BYTES) if status == 403 else None
        if refused is not None and refused[1] == ANOTHER_GATEWAY:
            # the gateway signs with another key now (a restart without --gateway-key-file makes a new one): ask
            # the URL for it again before the next beat, as at first contact; until then its calls are refused
            self.gateway_keys.pop(url, None)
        if status == 200:
            self.sent += 1
            self._learn(url, gateway_key_of(answer, max_bytes=MAX_HEARTBEAT_ANSWER_BYTES))
            if self.failing.pop(url, None) is not None:
                self._warned_at.pop(url, None)
                log.info("heartbeats reach gateway %s again", url)
        else:
            # quoted: a gateway's words, newlines and escapes included, never make a line of this node's log
            self._failed(url, f"refused ({status}): {answer[:200].decode('utf-8', 'replace')!r}")
        return status

    def _failed(self, url: str, why: str) -> None:
        """Count a failed heartbeat; warn when a gateway starts failing, then at most once a minute."""
        self.failed += 1
        n = self.failing[url] = self.failing.get(url, 0) + 1
        if url in self.greeted and n * self.interval >= FORGET_AFTER_S:
            self.forget(url, f"{n} failed heartbeats in a row")
            return
        now = time.monotonic()
        if now - self._warned_at.get(url, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned_at[url] = now
            log.warning(
                "heartbeat to gateway %s failed (%d in a row): %s; it does not route requests to this node",
                url,
                n,
                why,
            )

    def forget(self, url: str, why: str) -> None:
        """Stop heartbeating to a gateway that said hello, and stop trusting its key: it has failed for long, or
        its settler lost the role. It may say hello again (with a settler's signature)."""
        self.greeted.pop(url, None)
        if url in self.gateway_urls:
            self.gateway_urls.remove(url)
        self.gateway_keys.pop(url, None)
        self.failing.pop(url, None)
        self._warned_at.pop(url, None)
        log.warning("forgot gateway %s: %s", url, why)

    async def _loop(self) -> None:
        while True:
            try:
                await self.send_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a broken status callback must not end the heartbeats
                log.exception("heartbeat round failed")
            await asyncio.sleep(self.interval)

    def start(self) -> HeartbeatSender:
        """Start the background task on the running loop."""
        if self._task is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="heartbeat-sender")
        return self

    async def stop(self) -> None:
        """Cancel the task and close the HTTP client."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
