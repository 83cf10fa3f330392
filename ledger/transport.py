"""web3 plumbing under ChainClient: build, sign, send and await transactions; decode reverts."""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import requests
from eth_abi import decode as abi_decode
from eth_utils import function_signature_to_4byte_selector, keccak, to_checksum_address
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError

from common.wire import hex0x
from ledger.errors import (
    ERROR_CLASSES,
    ChainUnavailable,
    ContractError,
    InsufficientFunds,
    LedgerError,
    TransactionFailed,
    UnknownRevert,
)

log = logging.getLogger(__name__)

GWEI = 10**9
PRIORITY_FEE = GWEI  # the tip when the node says nothing about tips (no eth_feeHistory, no eth_maxPriorityFeePerGas)
GAS_MARGIN = 1.25
FEE_TTL = 30.0  # seconds a fee read is reused by send_data (the devnet's base fee stays zero)
BLOCK_GAS_TTL = 60.0  # seconds the latest block's gas limit is reused (it moves by 1/1024 a block at most)
# Where a settler or CLI started by someone else (the gateway) takes its fee bounds from: gwei, decimals allowed.
MAX_FEE_ENV = "LORAMESH_MAX_FEE_GWEI"
MAX_TIP_ENV = "LORAMESH_MAX_TIP_GWEI"
NONCE_RETRIES = 3
# transact() sends a transaction again with the same nonce and bumped fees when it has waited this long
# unmined (the fees it was sent with fell below what the chain takes now)
REPLACE_AFTER = 20.0
# Node answers that mean "read nonce and fees from the chain again, then sign again": the nonce is
# taken (another client of the account), or the fee fell below a base fee that rose.
_NONCE_TAKEN = ("nonce too low", "underpriced", "nonce has already been used")
_ALREADY_KNOWN = ("already imported", "already known")


class GasTooLow(TransactionFailed):
    """A transaction ran out of gas: its gas limit was below what it needed."""


class FeeAboveCap(ChainUnavailable):
    """The chain's next base fee is above our configured max fee. A ChainUnavailable, because it passes: the
    settler waits and retries instead of setting its records aside, and nothing was sent."""


def gwei(wei: int) -> str:
    """wei shown in gwei for one-line messages (9 decimals at most, trailing zeros dropped)."""
    return f"{wei / GWEI:.9f}".rstrip("0").rstrip(".") + " gwei"


def _gwei_setting(name: str, text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number of gwei, got {text[:40]!r}") from None
    if not 0 <= value <= 1e9:  # 1e9 gwei = 1 ether per gas: anything above is a typo
        raise ValueError(f"{name} must be 0..1e9 gwei, got {text[:40]}")
    return round(value * GWEI)


@dataclass(frozen=True, slots=True)
class FeePolicy:
    """EIP-1559 fees for every transaction we send, read from the chain and bounded by configured maxima.

    tip: the median over the last `history_blocks` non-empty blocks of each block's `percentile`-th reward
    (eth_feeHistory), else eth_maxPriorityFeePerGas, else `default_tip` where the node has neither; never above
    `max_tip`. maxFeePerGas = min(max_fee, 2 * next base fee + tip): two base fees absorb six full blocks of
    +12.5% rises before the transaction becomes unminable. A next base fee above `max_fee` raises FeeAboveCap
    and sends nothing, so a fee spike costs waiting, never an unbounded bill."""

    max_fee: int = 500 * GWEI
    max_tip: int = 10 * GWEI
    default_tip: int = PRIORITY_FEE
    history_blocks: int = 10
    percentile: float = 50.0

    def __post_init__(self) -> None:
        if self.max_fee < 0 or self.max_tip < 0 or self.default_tip < 0:
            raise ValueError("fee bounds must not be negative")
        if not 1 <= self.history_blocks <= 1024:  # nodes cap eth_feeHistory's block count (geth: 1024)
            raise ValueError(f"history_blocks must be 1..1024, got {self.history_blocks}")
        if not 0 <= self.percentile <= 100:
            raise ValueError(f"percentile must be 0..100, got {self.percentile}")

    @classmethod
    def from_env(cls, environ=None) -> FeePolicy:
        """The defaults, with LORAMESH_MAX_FEE_GWEI / LORAMESH_MAX_TIP_GWEI applied when set."""
        env = os.environ if environ is None else environ
        kwargs = {}
        if text := env.get(MAX_FEE_ENV, "").strip():
            kwargs["max_fee"] = _gwei_setting(MAX_FEE_ENV, text)
        if text := env.get(MAX_TIP_ENV, "").strip():
            kwargs["max_tip"] = _gwei_setting(MAX_TIP_ENV, text)
        return cls(**kwargs)

    def capped(self, max_fee_gwei: float | None = None, max_tip_gwei: float | None = None) -> FeePolicy:
        """This policy with a service's configured caps (gwei) in place of its own, where given."""
        caps = {}
        if max_fee_gwei is not None:
            caps["max_fee"] = round(max_fee_gwei * GWEI)
        if max_tip_gwei is not None:
            caps["max_tip"] = round(max_tip_gwei * GWEI)
        return replace(self, **caps)

    def fees(self, w3: Web3) -> tuple[int, int]:
        """(maxPriorityFeePerGas, maxFeePerGas) for a transaction sent now; FeeAboveCap when the next base fee
        is above max_fee. Raw requests: web3's formatting of eth_feeHistory costs more than the call."""
        url = getattr(w3.provider, "endpoint_uri", "?")
        with rpc_guard(url):
            hist = _result(
                w3.provider.make_request("eth_feeHistory", [hex(self.history_blocks), "latest", [self.percentile]])
            )
            next_base, tip = None, None
            if isinstance(hist, dict):
                bases = hist.get("baseFeePerGas") or []
                if bases:
                    next_base = _int(bases[-1])  # the entry after the last block is the next block's base fee
                rewards = hist.get("reward") or []
                ratios = hist.get("gasUsedRatio") or []
                # empty blocks report a zero reward that says nothing about what miners take
                seen = [_int(r[0]) for r, u in zip(rewards, ratios) if r and u]
                seen = [t for t in seen if t is not None]
                if seen:
                    tip = int(statistics.median(seen))
            if next_base is None:
                block = w3.eth.get_block("latest")
                next_base = block.get("baseFeePerGas", 0) or 0
            if tip is None:
                tip = _int(_result(w3.provider.make_request("eth_maxPriorityFeePerGas", [])))
            if tip is None:
                tip = self.default_tip
        if next_base > self.max_fee:
            raise FeeAboveCap(
                f"the chain's next base fee {gwei(next_base)} is above the max fee {gwei(self.max_fee)}: "
                "nothing sent (wait for it to fall, or raise the max fee)"
            )
        tip = min(tip, self.max_tip)
        max_fee = min(self.max_fee, 2 * next_base + tip)
        return min(tip, max_fee), max_fee


def _bumped(fee: int) -> int:
    """More than 12.5% above `fee` (also above zero)."""
    return fee + fee // 8 + 1


def _result(resp: dict):
    """A raw JSON-RPC answer's result, None when the node answered an error (e.g. method not supported)."""
    return None if resp.get("error") else resp.get("result")


def _int(value) -> int | None:
    """A quantity from a node ("0x..." or a number), None when it is neither or negative."""
    try:
        n = int(value, 16) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        return None
    return n if n >= 0 else None


def make_web3(rpc_url: str, timeout: float = 10.0) -> Web3:
    """An HTTP Web3 that fails fast: our callers (the settler) own the retry policy."""
    provider = Web3.HTTPProvider(
        rpc_url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None, session=_session(rpc_url)
    )
    return Web3(provider)


def _session(rpc_url: str) -> requests.Session:
    """A requests session with the environment's settings for `rpc_url` (proxies, no_proxy, CA bundle, netrc)
    read once. requests reads them again on every request: 0.17 ms a call on the machine it was measured on,
    a few percent of the settler's CPU, which makes several calls a batch, twenty batches a second."""
    session = requests.Session()
    session.proxies.update(requests.utils.get_environ_proxies(rpc_url))
    if bundle := os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE"):
        session.verify = bundle
    session.auth = requests.utils.get_netrc_auth(rpc_url)
    session.trust_env = False
    return session


def shown_url(url: str) -> str:
    """An RPC URL as it may be logged or put in an error: scheme, host and port only. Hosted endpoints carry
    their API key in the path or query (https://mainnet.example/v3/<key>) or a password before the host."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<an RPC URL that does not parse>"
    if ":" in host:
        host = f"[{host}]"
    rest = "/…" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{rest}" if parts.scheme else "<an RPC URL without a scheme>"


@contextlib.contextmanager
def rpc_guard(url: str) -> Iterator[None]:
    """Turn transport failures into ChainUnavailable (one line naming the URL, without its secrets)."""
    try:
        yield
    except (requests.exceptions.RequestException, ConnectionError, TimeoutError) as e:
        raise ChainUnavailable(f"chain at {shown_url(url)} is unreachable: {type(e).__name__}") from e


class RevertDecoder:
    """Maps 4-byte selectors of every custom error in the given ABIs to our typed exceptions."""

    def __init__(self, abis: list[list[dict]]) -> None:
        self._errors: dict[bytes, tuple[str, list[str], list[str]]] = {}
        for abi in abis:
            for item in abi:
                if item.get("type") != "error":
                    continue
                types = [_abi_type(i) for i in item["inputs"]]
                sel = function_signature_to_4byte_selector(f"{item['name']}({','.join(types)})")
                self._errors[sel] = (item["name"], types, [i["name"] for i in item["inputs"]])

    def decode(self, data: str | bytes | None) -> ContractError:
        """The typed error for revert data (UnknownRevert when it matches nothing we know)."""
        raw = _to_bytes(data)
        if raw is None or len(raw) < 4 or raw[:4] not in self._errors:
            return UnknownRevert("UnknownRevert", {"data": raw or b""})
        name, types, names = self._errors[raw[:4]]
        try:
            values = abi_decode(types, raw[4:])
        except Exception:  # noqa: BLE001 - malformed data from the chain is just unknown
            return UnknownRevert("UnknownRevert", {"data": raw})
        values = [to_checksum_address(v) if t == "address" else v for t, v in zip(types, values)]
        cls = ERROR_CLASSES.get(name, UnknownRevert)
        return cls(name, dict(zip(names, values)))


def _abi_type(item: dict) -> str:
    if item["type"].startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in item["components"]) + ")" + item["type"][5:]
    return item["type"]


def _to_bytes(data) -> bytes | None:
    if data is None:
        return None
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):
        text = data[2:] if data.startswith("0x") else data
        try:
            return bytes.fromhex(text)
        except ValueError:
            return None
    if isinstance(data, dict):  # some providers nest {"data": ...}
        return _to_bytes(data.get("data"))
    return None


def revert_data(e: Exception):
    """Revert data carried by a web3 exception, if any."""
    data = getattr(e, "data", None)
    if data is None and e.args:
        for arg in e.args:
            if isinstance(arg, (str, dict)) and _to_bytes(arg) is not None:
                return arg
    return data


class Transactor:
    """Signs with one local account. `send` estimates every transaction so reverts surface typed;
    `send_data` is the fast path (managed nonce, cached fees, caller-chosen gas) for the settler."""

    def __init__(
        self,
        w3: Web3,
        decoder: RevertDecoder,
        chain_id: int,
        account=None,
        receipt_timeout: float = 60.0,
        fee_policy: FeePolicy | None = None,
    ) -> None:
        self.w3 = w3
        self.fee_policy = fee_policy if fee_policy is not None else FeePolicy.from_env()
        self.decoder = decoder
        self.chain_id = chain_id
        self.account = account
        self.receipt_timeout = receipt_timeout
        self._nonce: int | None = None  # next nonce for send_data; None = read the chain's pending count
        self._fees: tuple[int, int] | None = None  # (maxPriorityFeePerGas, maxFeePerGas)
        self._fees_at = 0.0
        self._block_gas: int | None = None  # the latest block's gas limit (gas_limit), read every BLOCK_GAS_TTL
        self._block_gas_at = 0.0

    @property
    def url(self) -> str:
        return getattr(self.w3.provider, "endpoint_uri", "?")

    def call(self, fn, block="latest"):
        """eth_call a bound contract function; custom-error reverts raise typed errors."""
        with rpc_guard(self.url):
            try:
                return fn.call(block_identifier=block)
            except ContractLogicError as e:
                raise self.decoder.decode(revert_data(e)) from e

    def raw_call(self, to: str, data: bytes, block: str = "latest") -> bytes:
        """eth_call with calldata we encoded ourselves, skipping web3's formatting; a revert raises
        its typed error."""
        with rpc_guard(self.url):
            resp = self.w3.provider.make_request("eth_call", [{"to": to, "data": hex0x(data)}, block])
        if err := resp.get("error"):
            raise self.decoder.decode(err.get("data") if isinstance(err, dict) else None)
        return bytes.fromhex(resp["result"][2:])

    def _require_account(self) -> str:
        if self.account is None:
            raise LedgerError("this chain client has no account: pass one to send transactions")
        return self.account.address

    def estimate(self, to: str, data: bytes | str, *, value: int = 0, block: str | None = None) -> int:
        """eth_estimateGas for a call from our account (in `block`; None: the node's default, the latest);
        a revert raises its typed error."""
        tx = {"from": self._require_account(), "to": to, "data": data, "value": value}
        with rpc_guard(self.url):
            try:
                return self.w3.eth.estimate_gas(tx, block)
            except (ContractLogicError, Web3RPCError) as e:
                self._check_funds(e)
                raise self.decoder.decode(revert_data(e)) from e

    def gas_limit(self, estimate: int) -> int:
        """The gas limit a transaction of this estimate is sent with: the estimate and a margin, at most the latest
        block's gas limit. A limit above it is refused by every node, for good: a settler sent a batch estimated at
        28.5M gas with 35.6M on a chain of 30M blocks, was refused on every step and settled nothing again (red
        team)."""
        if self._block_gas is None or time.monotonic() - self._block_gas_at > BLOCK_GAS_TTL:
            with rpc_guard(self.url):
                self._block_gas = int(self.w3.eth.get_block("latest")["gasLimit"])
            self._block_gas_at = time.monotonic()
        return min(int(estimate * GAS_MARGIN) + 10_000, self._block_gas)

    def send(self, fn, *, value: int = 0, gas: int | None = None, estimate_in: str | None = None) -> str:
        """Estimate (in block `estimate_in`, see estimate), sign and send; returns the transaction hash
        ("0x"+hex). Reverts raise typed."""
        addr = self._require_account()
        data = fn._encode_transaction_data()
        if gas is None:
            gas = self.gas_limit(self.estimate(fn.address, data, value=value, block=estimate_in))
        tip, max_fee = self.fee_policy.fees(self.w3)
        with rpc_guard(self.url):
            tx = {
                "to": fn.address,
                "data": data,
                "value": value,
                "chainId": self.chain_id,
                "gas": gas,
                "type": 2,
                "nonce": self.w3.eth.get_transaction_count(addr, "pending"),
                "maxPriorityFeePerGas": tip,
                "maxFeePerGas": max_fee,
            }
            self._nonce = None  # send_data's counter did not see this one
            signed = self.account.sign_transaction(tx)
            try:
                return hex0x(self.w3.eth.send_raw_transaction(signed.raw_transaction))
            except Web3RPCError as e:
                self._check_funds(e)
                raise

    def _check_funds(self, e: Exception) -> None:
        """Raise InsufficientFunds, naming the account and how to fund it, when the node refused for that."""
        if "insufficient funds" in str(e).lower():
            addr = self.account.address if self.account is not None else "?"
            raise InsufficientFunds(
                f"the chain's node refused the transaction: account {addr} has too little of its coin to pay for "
                f"gas; fund it (on the devnet: loramesh devnet up --fund {addr})"
            ) from e

    def reset(self) -> None:
        """Forget the managed nonce and fees: the next send_data reads both from the chain."""
        self._nonce, self._fees = None, None

    def _current_fees(self) -> tuple[int, int]:
        if self._fees is None or time.monotonic() - self._fees_at > FEE_TTL:
            self._fees, self._fees_at = self.fee_policy.fees(self.w3), time.monotonic()
        return self._fees

    def send_data(self, to: str, data: bytes, *, gas: int, value: int = 0) -> str:
        """Sign and send without simulating, with the next managed nonce; returns the tx hash.
        The nonce comes from the chain's pending count once, then counts up locally; when the node
        says it is taken (another client of this account, a restarted chain) it is read again."""
        addr = self._require_account()
        with rpc_guard(self.url):
            for attempt in range(NONCE_RETRIES):
                if self._nonce is None:
                    self._nonce = self.w3.eth.get_transaction_count(addr, "pending")
                tip, max_fee = self._current_fees()
                tx = {
                    "to": to,
                    "data": data,
                    "value": value,
                    "chainId": self.chain_id,
                    "gas": gas,
                    "type": 2,
                    "nonce": self._nonce,
                    "maxPriorityFeePerGas": tip,
                    "maxFeePerGas": max_fee,
                }
                raw = self.account.sign_transaction(tx).raw_transaction
                try:
                    tx_hash = hex0x(self.w3.eth.send_raw_transaction(raw))
                except Web3RPCError as e:
                    text = str(e).lower()
                    if any(m in text for m in _ALREADY_KNOWN):  # this very transaction is in the pool
                        tx_hash = hex0x(keccak(raw))
                    elif any(m in text for m in _NONCE_TAKEN) and attempt + 1 < NONCE_RETRIES:
                        log.info("nonce %d refused (%s): reading nonce and fees from the chain again", self._nonce, e)
                        self.reset()
                        continue
                    else:
                        self.reset()
                        self._check_funds(e)
                        raise TransactionFailed(f"node refused the transaction: {e}") from e
                except BaseException:
                    self.reset()  # we cannot tell whether the node took it: ask the chain next time
                    raise
                self._nonce += 1
                return tx_hash
        raise AssertionError("unreachable")  # the loop returns or raises

    def receipt(self, tx_hash: str):
        """The receipt if mined, else None."""
        with rpc_guard(self.url):
            try:
                return self.w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                return None

    def light_receipt(self, tx_hash: str) -> dict | None:
        """status, gasUsed, blockNumber (ints) and transactionHash of a mined transaction, else None.
        Skips web3's result formatting, which costs about 0.4 ms a log (a batch logs per record)."""
        with rpc_guard(self.url):
            resp = self.w3.provider.make_request("eth_getTransactionReceipt", [tx_hash])
        if resp.get("error"):
            raise ChainUnavailable(
                f"chain at {shown_url(self.url)} answered eth_getTransactionReceipt with {str(resp['error'])[:200]}"
            )
        r = resp.get("result")
        if r is None:
            return None
        return {
            "status": int(r["status"], 16),
            "gasUsed": int(r["gasUsed"], 16),
            "blockNumber": int(r["blockNumber"], 16),
            "transactionHash": r["transactionHash"],
        }

    def replace(self, tx_hash: str) -> str | None:
        """Send the pending transaction `tx_hash` again (same nonce, to, data, value and gas) with both fees
        raised by more than 12.5%, the least nodes take as a replacement (geth's default price bump), and at
        least what the fee policy asks now; returns the new hash. None, sending nothing, when the bump would
        pass the max fee or the nonce is already used (the original, or an earlier replacement, was mined).
        FeeAboveCap when the base fee alone is above the max fee."""
        self._require_account()
        with rpc_guard(self.url):
            old = self.w3.eth.get_transaction(tx_hash)
        tip_now, fee_now = self.fee_policy.fees(self.w3)
        tip = max(tip_now, _bumped(old["maxPriorityFeePerGas"]))
        max_fee = max(fee_now, _bumped(old["maxFeePerGas"]), tip)
        if max_fee > self.fee_policy.max_fee:
            log.warning(
                "transaction %s is stuck but a replacement would pay %s, above the max fee %s: still waiting",
                tx_hash,
                gwei(max_fee),
                gwei(self.fee_policy.max_fee),
            )
            return None
        tx = {
            "to": old["to"],
            "data": old["input"],
            "value": old["value"],
            "chainId": self.chain_id,
            "gas": old["gas"],
            "type": 2,
            "nonce": old["nonce"],
            "maxPriorityFeePerGas": tip,
            "maxFeePerGas": max_fee,
        }
        raw = self.account.sign_transaction(tx).raw_transaction
        with rpc_guard(self.url):
            try:
                new_hash = hex0x(self.w3.eth.send_raw_transaction(raw))
            except Web3RPCError as e:
                text = str(e).lower()
                if any(m in text for m in _ALREADY_KNOWN):
                    return hex0x(keccak(raw))
                if "nonce too low" in text or "nonce has already been used" in text:
                    return None  # mined meanwhile: the caller finds the receipt
                raise TransactionFailed(f"node refused the replacement of {tx_hash}: {e}") from e
        log.info(
            "replaced stuck transaction %s (nonce %d) with %s at %s", tx_hash, old["nonce"], new_hash, gwei(max_fee)
        )
        return new_hash

    def wait(
        self,
        tx_hash: str,
        timeout: float | None = None,
        fn=None,
        *,
        replay: Callable[[], dict] | None = None,
        light: bool = False,
        replace_after: float | None = None,
    ):
        """Wait for a receipt (light=True: light_receipt's fields only); status 0 raises GasTooLow when
        it used all its gas, else the decoded reason (replayed at the parent block from `fn`, or
        from `replay()` = {"to", "data"}). replace_after: every so many seconds unmined, replace() it; the
        receipt returned is then of whichever of the versions was mined. Off by default: the settler keeps
        its batches' hashes and has its own recovery."""
        fetch = self.light_receipt if light else self.receipt
        now = time.monotonic()
        deadline = now + (timeout if timeout is not None else self.receipt_timeout)
        next_replace = now + replace_after if replace_after else float("inf")
        hashes = [tx_hash]  # every version sent with this nonce; at most one is mined
        while True:
            rcpt = next((r for h in hashes if (r := fetch(h)) is not None), None)
            if rcpt is not None:
                tx_hash = hex0x(bytes(rcpt["transactionHash"])) if not light else rcpt["transactionHash"]
                break
            now = time.monotonic()
            if now > deadline:
                raise TransactionFailed(f"no receipt for {tx_hash} within {timeout or self.receipt_timeout:.0f}s")
            if now >= next_replace:
                next_replace = now + replace_after
                try:
                    if (new := self.replace(hashes[-1])) is not None and new not in hashes:
                        hashes.append(new)
                except FeeAboveCap as e:
                    log.warning("transaction %s is stuck and not replaced: %s", hashes[-1], e)
            time.sleep(0.05)
        if rcpt["status"] != 1:
            with rpc_guard(self.url):
                limit = self.w3.eth.get_transaction(tx_hash)["gas"]
            if rcpt["gasUsed"] >= limit:  # out of gas consumes the whole limit; a revert returns the rest
                raise GasTooLow(f"transaction {tx_hash} ran out of gas (limit {limit}) in block {rcpt['blockNumber']}")
            if fn is not None:
                replay = lambda: {"to": fn.address, "data": fn._encode_transaction_data()}  # noqa: E731
            if replay is not None:
                # Replaying against the parent block reproduces the revert with its data.
                tx = {"from": self.account.address, **replay()}
                with rpc_guard(self.url):
                    try:
                        self.w3.eth.call(tx, block_identifier=rcpt["blockNumber"] - 1)
                    except (ContractLogicError, Web3RPCError) as e:
                        raise self.decoder.decode(revert_data(e)) from e
            raise TransactionFailed(f"transaction {tx_hash} reverted in block {rcpt['blockNumber']}")
        return rcpt

    def transact(self, fn, *, value: int = 0, estimate_in: str | None = None):
        """Send and wait, replacing the transaction while it is stuck; returns the successful receipt.
        estimate_in="pending": the gas is estimated as in the next block (a call valid only from then on)."""
        return self.wait(self.send(fn, value=value, estimate_in=estimate_in), fn=fn, replace_after=REPLACE_AFTER)

    def send_value(self, to: str, amount: int) -> str:
        """A plain coin transfer (funding); returns the tx hash without waiting."""
        tip, max_fee = self.fee_policy.fees(self.w3)
        with rpc_guard(self.url):
            tx = {
                "to": to,
                "value": amount,
                "gas": 21_000,
                "chainId": self.chain_id,
                "type": 2,
                "nonce": self.w3.eth.get_transaction_count(self.account.address, "pending"),
                "maxPriorityFeePerGas": tip,
                "maxFeePerGas": max_fee,
            }
            signed = self.account.sign_transaction(tx)
            return hex0x(self.w3.eth.send_raw_transaction(signed.raw_transaction))
