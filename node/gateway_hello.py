"""A gateway introducing itself to a node it found in the chain's registry: how a gateway started after the
nodes sees every one of them within one heartbeat period, with no node restarted.

A node heartbeats to the gateways it knows: those its operator named with --gateway, and those that said
hello. A hello is {"body": {...}, "signature": hex}, the body naming the gateway's URL and its Ed25519
key, the node it is meant for and a millisecond timestamp, signed (EIP-191, over the canonical body) by
an EVM account the ledger grants the settler role. That role is what makes a stranger's gateway worth
serving: the ledger's admin vetted the account, and its deposit pays the node for what it serves.

The node checks the shape, that the hello is meant for it and fresh, the signature, and (on chain) that
the signer is a settler; then it heartbeats to the URL, trusts the named key for that URL at once (the
gateway's first call may follow the hello), and answers with its own signed heartbeat, which the gateway
takes as if it had been pushed. A captured hello replayed to the same node within the skew only names
the same gateway again; it cannot be replayed to another node.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from common.wire import UntrustedJSONError, canonical_json, is_id, parse_json
from node.request_auth import MAX_SKEW_MS, is_gateway_key

FORMAT = "loramesh-gateway-hello/1"
HELLO_PATH = "/internal/gateway-hello"
MAX_HELLO_BYTES = 4096
MAX_URL_CHARS = 512


class HelloError(ValueError):
    """A hello that is malformed, stale, meant for another node, or whose signature does not verify."""


def _signable(body: dict):
    from eth_account.messages import encode_defunct

    return encode_defunct(primitive=canonical_json(body))


def make_hello(account, *, gateway_url: str, gateway_key: str, node_id: str, ts_ms: int | None = None) -> dict:
    """A hello to `node_id`, signed by `account` (an eth_account LocalAccount: the gateway's settler)."""
    body = {
        "format": FORMAT,
        "gateway_url": gateway_url.rstrip("/"),
        "gateway_key": gateway_key,
        "settler": account.address.lower(),
        "node_id": node_id,
        "ts_ms": int(time.time() * 1000) if ts_ms is None else int(ts_ms),
    }
    signed = account.sign_message(_signable(body))
    return {"body": body, "signature": signed.signature.hex().removeprefix("0x")}


def verify_hello(doc: object, *, node_id: str, now_ms: int | None = None, max_skew_ms: int = MAX_SKEW_MS) -> dict:
    """The hello's body once its shape, addressee, freshness and signature are checked; HelloError otherwise.
    Whether the signer is a settler is the caller's question for the chain."""
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict) or not isinstance(doc.get("signature"), str):
        raise HelloError('a hello is a JSON object {"body": {...}, "signature": hex}')
    body, signature = doc["body"], doc["signature"]
    if set(body) != {"format", "gateway_url", "gateway_key", "settler", "node_id", "ts_ms"}:
        raise HelloError("hello body must have exactly format, gateway_url, gateway_key, settler, node_id, ts_ms")
    if body["format"] != FORMAT:
        raise HelloError(f"hello format is {str(body['format'])[:40]!r}, expected {FORMAT!r}")
    url = body["gateway_url"]
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > MAX_URL_CHARS:
        raise HelloError(f"hello gateway_url must be an http(s) URL of at most {MAX_URL_CHARS} characters")
    if any(c.isspace() or not c.isprintable() or c in "?#@" for c in url):
        raise HelloError("hello gateway_url holds whitespace, control characters, a query, a fragment or credentials")
    key = body["gateway_key"]
    if not isinstance(key, str) or not is_gateway_key(key):
        raise HelloError("hello gateway_key must be 64 lowercase hex digits (a raw Ed25519 public key)")
    settler = body["settler"]
    if not isinstance(settler, str) or len(settler) != 42 or not settler.startswith("0x"):
        raise HelloError("hello settler must be a 0x-prefixed 20-byte address")
    if not is_id(body["node_id"]):
        raise HelloError("hello node_id must be 0x followed by 64 lowercase hex digits")
    if body["node_id"] != node_id:
        raise HelloError(f"this hello is meant for node {body['node_id']}, not this node ({node_id})")
    ts = body["ts_ms"]
    if isinstance(ts, bool) or not isinstance(ts, int) or ts <= 0:
        raise HelloError("hello ts_ms must be a positive integer (milliseconds since the epoch)")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if abs(now - ts) > max_skew_ms:
        raise HelloError(f"hello ts_ms is {abs(now - ts)} ms from now, more than {max_skew_ms} allowed")
    if len(signature) != 130 or any(c not in "0123456789abcdefABCDEF" for c in signature):
        raise HelloError("hello signature must be 65 bytes of hex (an EIP-191 signature)")
    from eth_account import Account

    try:
        signer = Account.recover_message(_signable(body), signature=bytes.fromhex(signature))
    except Exception as e:  # eth_keys raises several types for a malformed (r, s, v)
        raise HelloError(f"hello signature does not recover: {type(e).__name__}") from None
    if signer.lower() != settler.lower():
        raise HelloError(f"hello is signed by {signer.lower()}, not by the settler it names ({settler.lower()})")
    return body


def parse_hello(raw: bytes) -> object:
    """The hello's JSON, bounded; HelloError for a body that is not JSON within MAX_HELLO_BYTES."""
    try:
        return parse_json(raw, max_bytes=MAX_HELLO_BYTES, what="gateway hello")
    except UntrustedJSONError as e:
        raise HelloError(str(e)) from None


class SettlerUnknown(RuntimeError):
    """The chain cannot say now whether an account is a settler (it is down, or busy with another check)."""


class SettlerCheck:
    """Asks the chain whether an account is a settler, and remembers.

    Built so that strangers cannot keep a real settler's gateway out, nor flood the node's RPC provider:
    - an account known to be a settler is answered from memory at once, even once its answer is older than
      `ttl_s` (the chain is asked again in the background); `check(..., fresh=True)`, the daemon's revocation
      sweep, waits for the chain's answer instead;
    - settlers are remembered apart from the accounts that are not, so hellos signed by throwaway accounts
      never evict them;
    - one chain question at a time, and for accounts not known as settlers at most one every
      `min_gap_s`: beyond that a hello gets SettlerUnknown (503, the gateway retries later)."""

    MAX_REMEMBERED = 1024  # accounts known not to be settlers (settlers are few: at most as many again)

    def __init__(self, is_settler, *, ttl_s: float = 60.0, min_gap_s: float = 0.2, clock=time.monotonic) -> None:
        self.is_settler = is_settler  # blocking: address -> bool (the chain client's view call)
        self.ttl_s = ttl_s
        self.min_gap_s = min_gap_s
        self.clock = clock
        self._settlers: OrderedDict[str, float] = OrderedDict()  # address -> when the chain said yes
        self._others: OrderedDict[str, float] = OrderedDict()  # address -> when the chain said no
        self._lock = asyncio.Lock()
        self._last_stranger = -float("inf")  # when the chain was last asked about an account not known as a settler
        self._refreshing: asyncio.Task | None = None

    async def check(self, address: str, *, fresh: bool = False) -> bool:
        address = address.lower()
        now = self.clock()
        if address in self._settlers and not fresh:
            if now - self._settlers[address] >= self.ttl_s and self._refreshing is None and not self._lock.locked():
                self._refreshing = asyncio.create_task(self._refresh(address))
            return True
        said_no = self._others.get(address)
        if said_no is not None and now - said_no < self.ttl_s and not fresh:
            self._others.move_to_end(address)
            return False
        if not fresh:
            if self._lock.locked():
                raise SettlerUnknown("another gateway's hello is being checked on chain; try again shortly")
            if now - self._last_stranger < self.min_gap_s:
                raise SettlerUnknown("too many hellos from unknown accounts; try again shortly")
            self._last_stranger = now
        async with self._lock:
            return await self._ask(address)

    async def _ask(self, address: str) -> bool:
        try:
            answer = bool(await asyncio.to_thread(self.is_settler, address))
        except Exception as e:  # the chain client's errors: down, timeout, a bad answer
            raise SettlerUnknown(f"the chain did not answer whether {address} is a settler: {e}") from None
        if answer:
            self._others.pop(address, None)
            self._settlers[address] = self.clock()
            while len(self._settlers) > self.MAX_REMEMBERED:
                self._settlers.popitem(last=False)
        else:
            self._settlers.pop(address, None)
            self._others[address] = self.clock()
            self._others.move_to_end(address)
            while len(self._others) > self.MAX_REMEMBERED:
                self._others.popitem(last=False)
        return answer

    async def _refresh(self, address: str) -> None:
        try:
            async with self._lock:
                await self._ask(address)
        except SettlerUnknown:
            pass  # the chain is down: the old yes stands until it answers (the sweep keeps asking)
        finally:
            self._refreshing = None
