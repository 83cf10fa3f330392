"""web3 plumbing under ChainClient: build, sign, send and await transactions; decode reverts."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import requests
from eth_abi import decode as abi_decode
from eth_utils import function_signature_to_4byte_selector, to_checksum_address
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError

from ledger.errors import (
    ERROR_CLASSES,
    ChainUnavailable,
    ContractError,
    LedgerError,
    TransactionFailed,
    UnknownRevert,
)

log = logging.getLogger(__name__)

PRIORITY_FEE = 1_000_000_000  # 1 gwei; anvil runs with a zero base fee (notes/evm.md)
GAS_MARGIN = 1.25


def make_web3(rpc_url: str, timeout: float = 10.0) -> Web3:
    """An HTTP Web3 that fails fast: our callers (the settler) own the retry policy."""
    provider = Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None)
    return Web3(provider)


@contextlib.contextmanager
def rpc_guard(url: str) -> Iterator[None]:
    """Turn transport failures into ChainUnavailable (one line naming the URL)."""
    try:
        yield
    except (requests.exceptions.RequestException, ConnectionError, TimeoutError) as e:
        raise ChainUnavailable(f"chain at {url} is unreachable: {type(e).__name__}") from e


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
    """Signs with one local account; every send is estimated first so reverts surface typed."""

    def __init__(self, w3: Web3, decoder: RevertDecoder, chain_id: int, account=None,
                 receipt_timeout: float = 60.0) -> None:  # fmt: skip
        self.w3 = w3
        self.decoder = decoder
        self.chain_id = chain_id
        self.account = account
        self.receipt_timeout = receipt_timeout

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

    def send(self, fn, *, value: int = 0, gas: int | None = None) -> str:
        """Estimate, sign and send; returns the transaction hash ("0x"+hex). Reverts raise typed."""
        if self.account is None:
            raise LedgerError("this chain client has no account: pass one to send transactions")
        addr = self.account.address
        with rpc_guard(self.url):
            tx = {"from": addr, "to": fn.address, "data": fn._encode_transaction_data(), "value": value}
            if gas is None:
                try:
                    gas = int(self.w3.eth.estimate_gas(tx) * GAS_MARGIN) + 10_000
                except ContractLogicError as e:
                    raise self.decoder.decode(revert_data(e)) from e
                except Web3RPCError as e:
                    raise self.decoder.decode(revert_data(e)) from e
            base = self.w3.eth.get_block("latest").get("baseFeePerGas", 0) or 0
            tx.update(
                chainId=self.chain_id, nonce=self.w3.eth.get_transaction_count(addr, "pending"), gas=gas,
                maxPriorityFeePerGas=PRIORITY_FEE, maxFeePerGas=2 * base + PRIORITY_FEE, type=2,
            )  # fmt: skip
            tx.pop("from")
            signed = self.account.sign_transaction(tx)
            return "0x" + bytes(self.w3.eth.send_raw_transaction(signed.raw_transaction)).hex()

    def receipt(self, tx_hash: str):
        """The receipt if mined, else None."""
        with rpc_guard(self.url):
            try:
                return self.w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                return None

    def wait(self, tx_hash: str, timeout: float | None = None, fn=None):
        """Wait for a receipt; status 0 raises the decoded reason (replayed at the parent block)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.receipt_timeout)
        while (rcpt := self.receipt(tx_hash)) is None:
            if time.monotonic() > deadline:
                raise TransactionFailed(f"no receipt for {tx_hash} within {timeout or self.receipt_timeout:.0f}s")
            time.sleep(0.05)
        if rcpt["status"] != 1:
            if fn is not None:
                # Replaying against the parent block reproduces the revert with its data.
                tx = {"from": self.account.address, "to": fn.address, "data": fn._encode_transaction_data()}
                with rpc_guard(self.url):
                    try:
                        self.w3.eth.call(tx, block_identifier=rcpt["blockNumber"] - 1)
                    except (ContractLogicError, Web3RPCError) as e:
                        raise self.decoder.decode(revert_data(e)) from e
            raise TransactionFailed(f"transaction {tx_hash} reverted in block {rcpt['blockNumber']}")
        return rcpt

    def transact(self, fn, *, value: int = 0):
        """Send and wait; returns the successful receipt."""
        return self.wait(self.send(fn, value=value), fn=fn)

    def send_value(self, to: str, amount: int) -> str:
        """A plain coin transfer (funding); returns the tx hash without waiting."""
        with rpc_guard(self.url):
            base = self.w3.eth.get_block("latest").get("baseFeePerGas", 0) or 0
            tx = {
                "to": to, "value": amount, "gas": 21_000, "chainId": self.chain_id, "type": 2,
                "nonce": self.w3.eth.get_transaction_count(self.account.address, "pending"),
                "maxPriorityFeePerGas": PRIORITY_FEE, "maxFeePerGas": 2 * base + PRIORITY_FEE,
            }  # fmt: skip
            signed = self.account.sign_transaction(tx)
            return "0x" + bytes(self.w3.eth.send_raw_transaction(signed.raw_transaction)).hex()
