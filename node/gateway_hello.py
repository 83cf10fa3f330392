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

FORMAT = "loramesh-gateway-hello/1"
HELLO_PATH = "/internal/gateway-hello"
MAX_HELLO_BYTES = 4096
MAX_URL_CHARS = 512
MAX_SKEW_MS = 60_000


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
    if any(c.isspace() or not c.isprintable() for c in url):
        raise HelloError("hello gateway_url holds whitespace or control characters")
    key = body["gateway_key"]
    if not isinstance(key, str) or len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
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
    """Asks the chain whether an account is a settler, remembering the answer for `ttl_s` (a revoked settler's
    gateway is dropped within it). One question at a time: hellos signed by fresh accounts cannot turn into
    a flood of chain calls, they get SettlerUnknown (503, retried later) while another check runs."""

    MAX_REMEMBERED = 1024

    def __init__(self, is_settler, *, ttl_s: float = 60.0, clock=time.monotonic) -> None:
        self.is_settler = is_settler  # blocking: address -> bool (the chain client's view call)
        self.ttl_s = ttl_s
        self.clock = clock
        self._answers: OrderedDict[str, tuple[bool, float]] = OrderedDict()
        self._lock = asyncio.Lock()

    async def check(self, address: str) -> bool:
        address = address.lower()
        known = self._answers.get(address)
        if known is not None and self.clock() - known[1] < self.ttl_s:
            return known[0]
        if self._lock.locked():
            raise SettlerUnknown("another gateway's hello is being checked on chain; try again shortly")
        async with self._lock:
            try:
                answer = bool(await asyncio.to_thread(self.is_settler, address))
            except Exception as e:  # the chain client's errors: down, timeout, a bad answer
                raise SettlerUnknown(f"the chain did not answer whether {address} is a settler: {e}") from None
            self._answers[address] = (answer, self.clock())
            self._answers.move_to_end(address)
            while len(self._answers) > self.MAX_REMEMBERED:
                self._answers.popitem(last=False)
            return answer
