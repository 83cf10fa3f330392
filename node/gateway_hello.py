"""A gateway introducing itself to a node it found in the chain's registry: how a gateway started after the
nodes sees every one of them within one heartbeat period, with no node restarted.

A node heartbeats to the gateways it knows: those its operator named with --gateway, and those that said
hello. A hello is {"body": {...}, "signature": hex}, the body naming the gateway's URL and its Ed25519
key, the node it is meant for and a millisecond timestamp, signed (EIP-191, over the canonical body) by
an EVM account the ledger grants the settler role. That role is what makes a stranger's gateway worth
serving: the ledger's admin vetted the account, and its deposit pays the node for what it serves.

The node checks the shape, that the hello is meant for it and fresh, the signature, and (on chain) that
the signer is a settler; then it heartbeats to the URL, trusts the named key for a URL new to it at once (the
gateway's first call may follow the hello; a known URL keeps the key it answered, and an operator's URL takes none
from a hello), and answers with its own signed heartbeat for the key it trusts there, which the gateway takes as
if it had been pushed. A captured hello replayed to the same node within the skew only names
the same gateway again; it cannot be replayed to another node.
"""

from __future__ import annotations

import asyncio
import time

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
    # one spelling of the settler: each is counted against MAX_GATEWAYS_PER_SETTLER, and one settler naming
    # itself in other cases took every gateway slot a node has (node.heartbeat)
    return body | {"settler": settler.lower()}


def parse_hello(raw: bytes) -> object:
    """The hello's JSON, bounded; HelloError for a body that is not JSON within MAX_HELLO_BYTES."""
    try:
        return parse_json(raw, max_bytes=MAX_HELLO_BYTES, what="gateway hello")
    except UntrustedJSONError as e:
        raise HelloError(str(e)) from None


class SettlerUnknown(RuntimeError):
    """The chain cannot say now whether an account is a settler (it is down, or did not answer)."""


class SettlerRoster:
    """The ledger's settlers as this node knows them, kept from the ledger's SettlerGranted and SettlerRevoked
    events: one question to the chain answers for every account at once.

    It used to ask the chain about each account a hello named, at most one a `min_gap_s`, so hellos signed by
    fresh throw-away accounts (free to make) used that budget up and a real settler's new gateway got "try
    again" for as long as the flood lasted. Now:
    - an account on the roster is answered at once, with no question to the chain;
    - for any other, the hello waits for the next sync (the events since the block the last one read up to),
      which starts after it came, so a settler granted a moment ago is found; syncs are one at a time and
      at most one a `min_gap_s`, however many hellos wait on them;
    - at most `max_waiting` hellos wait; past that a hello from an account not on the roster is SettlerUnknown
      (503, try again: whoever keeps that many waiting keeps syncs running, so a real settler is on the roster
      by its gateway's next try);
    - a chain that does not answer is SettlerUnknown for those waiting (503, the gateway retries later); the
      roster stands as it was: a settler's yes holds until the chain says otherwise.

    `read_changes(from_block)` is blocking (the chain client's `settler_changes`): it returns the block read
    up to and the (address, granted) changes from `from_block` on, in chain order; `from_block` None reads
    from the ledger's deployment.
    Until the first read has answered (the daemon's sweep makes it at start), a hello joins the read in flight or
    is SettlerUnknown: strangers' hellos never start reads of the whole roster.
    A grant or revocation that a reorganisation later undoes stays as read until the daemon's sweep reads the
    whole roster again (every hour)."""

    def __init__(self, read_changes, *, min_gap_s: float = 1.0, max_waiting: int = 64, clock=time.monotonic) -> None:
        self.read_changes = read_changes
        self.min_gap_s = min_gap_s
        self.max_waiting = max_waiting
        self.clock = clock
        self.settlers: set[str] = set()
        self.next_block: int | None = None  # the first block the next sync reads (None: not synced yet)
        self._sync: asyncio.Task | None = None  # the sync running or waiting for its turn
        self._reader: asyncio.Task | None = None  # the sync that has begun reading the chain
        self._sync_started = -float("inf")
        self._waiting = 0

    async def check(self, address: str) -> bool:
        """Whether `address` may say hello: a settler on the ledger, as of a sync made after this call began
        unless it is on the roster already."""
        address = address.lower()
        if address in self.settlers:
            return True
        if self._waiting >= self.max_waiting:  # not a no: the account may be a settler granted since the last read
            raise SettlerUnknown("too many hellos are waiting for the chain's list of settlers; try again shortly")
        first = self._sync if self.next_block is None and self._sync is not None and not self._sync.done() else None
        if self.next_block is None and first is None:
            raise SettlerUnknown("this node has not read the ledger's settlers yet; try again shortly")
        self._waiting += 1
        try:
            await (asyncio.shield(first) if first is not None else self.sync())
        finally:
            self._waiting -= 1
        return address in self.settlers

    async def sync(self, *, from_start: bool = False) -> None:
        """Read the changes since the last sync, in a sync that has not begun reading before this call (one
        waiting for its turn is joined, so any number of callers share it); SettlerUnknown when the chain does
        not answer. `from_start` reads the whole roster again (the daemon's sweep)."""
        task = self._sync
        if task is None or task.done() or task is self._reader or from_start:
            task = self._sync = asyncio.create_task(self._run_sync(task, from_start))
            task.add_done_callback(_retrieved)  # a sync whose waiters all left still ends quietly
        await asyncio.shield(task)

    async def _run_sync(self, before: asyncio.Task | None, from_start: bool) -> None:
        if before is not None and not before.done():
            await asyncio.wait([before])  # one sync at a time
        wait = self._sync_started + self.min_gap_s - self.clock()
        if wait > 0:
            await asyncio.sleep(wait)
        self._reader = asyncio.current_task()  # from here on, a new caller waits for the sync after this one
        self._sync_started = self.clock()
        start = None if from_start else self.next_block
        try:
            last, changes = await asyncio.to_thread(self.read_changes, start)
        except Exception as e:  # the chain client's errors: down, timeout, a bad answer
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SettlerUnknown(f"the chain did not answer which accounts are settlers: {first}") from None
        settlers = set() if start is None else set(self.settlers)
        for address, granted in changes:
            (settlers.add if granted else settlers.discard)(address.lower())
        self.settlers, self.next_block = settlers, last + 1


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
