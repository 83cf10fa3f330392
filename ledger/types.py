"""Plain values read from or sent to the contracts (ids as "0x"+64 hex strings)."""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

# ids are common.wire's (one format for every package); eth_utils (about 250 ms to import) is imported where
# it is used, so this module of plain values stays cheap for everyone who only needs the values
from common.wire import ZERO_ID, hex0x, id_bytes, is_id, to_id

ETHER = 10**18  # wei per ether: amounts on chain are wei, people read ether


_HEX_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def checked_address(value: str) -> str:
    """`value` as a checksummed account address, or a ValueError saying in one line what is wrong with it: an
    address is 0x and 40 hex digits, checksummed (EIP-55) or all in one case (mixed case with a wrong checksum is
    a typo). Commands check every address they take before they send anything (`chain deploy`, `devnet up`)."""
    from eth_utils import is_checksum_address, to_checksum_address

    if not isinstance(value, str) or not _HEX_ADDRESS.fullmatch(value):
        raise ValueError(f"{str(value)[:80]!r} is not an address: expected 0x and 40 hex digits")
    digits = value[2:]
    if digits not in (digits.lower(), digits.upper()) and not is_checksum_address(value):
        raise ValueError(f"{value!r} has a wrong checksum (the case of its letters): check it for a typo")
    return to_checksum_address(value)


def is_uint256(value: object) -> bool:
    """Whether `value` is an integer the chain holds as a uint256 (a price, a fee, an index; not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**256


def read_wei(text: str | None) -> int | None | bool:
    """An amount of wei as a database keeps it (decimal ASCII digits: a quote, a fee): None when there is none,
    False when it is not one (int() would raise, or take a sign, spaces, "_" or non-ASCII digits), as whoever
    reads a shared database must read what any writer of it may have put there."""
    if text is None:
        return None
    if not (isinstance(text, str) and text.isascii() and text.isdigit()) or len(text) > 78 or int(text) >= 2**256:
        return False
    return int(text)


# The adapter id of a request to the bare base model (no adapter): stored as such in the outbox and
# sent as such on chain, where AttributionLedger prices it at basePricePer1kTokens, all to the node.
BASE_MODEL_ADAPTER_ID = ZERO_ID


def is_base_model(adapter_id: str | bytes | None) -> bool:
    """Whether an adapter id names the bare base model (the zero id)."""
    if adapter_id is None:
        return False
    try:
        return to_id(adapter_id) == ZERO_ID
    except ValueError:
        return False


class Role(enum.IntEnum):
    """Matches AttributionLedger.Role."""

    NODE = 0
    ADAPTER_OWNER = 1
    DATASET = 2


class _SettleFields(NamedTuple):
    request_id: str
    adapter_id: str
    node_id: str
    prompt_tokens: int
    completion_tokens: int


_U64 = 2**64


def _is_u64(v: object) -> bool:
    return isinstance(v, int) and 0 <= v < _U64


class SettleRecord(_SettleFields):
    """One inference as settleBatch packs it (ledger.merkle: with its sequence number, its Merkle leaf).
    Token counts up to 2**64 - 1 are held here; a packed record takes at most 2**32 - 1 each.

    A tuple rather than a frozen dataclass: the settler builds 500 of these a batch, and a third of what a
    frozen dataclass cost here was its field-by-field __init__. Built only through the constructor, which
    checks (not _make or _replace, which would skip it)."""

    __slots__ = ()

    def __new__(cls, request_id: str, adapter_id: str, node_id: str, prompt_tokens: int, completion_tokens: int):
        # nearly always the ids are already in their one spelling: checking that first, and normalising
        # only otherwise, halves what a record costs here
        if not (is_id(request_id) and is_id(adapter_id) and is_id(node_id)):
            request_id, adapter_id, node_id = to_id(request_id), to_id(adapter_id), to_id(node_id)
        if not (_is_u64(prompt_tokens) and _is_u64(completion_tokens)):
            name, v = (
                ("completion_tokens", completion_tokens) if _is_u64(prompt_tokens) else ("prompt_tokens", prompt_tokens)
            )
            raise ValueError(f"{name} must be an integer in [0, 2**64), got {v!r}")
        return tuple.__new__(cls, (request_id, adapter_id, node_id, prompt_tokens, completion_tokens))

    def as_tuple(self) -> tuple:
        """(requestId, adapterId, nodeId, promptTokens, completionTokens), ids as bytes: leafOf's arguments
        after the sequence number."""
        return (
            id_bytes(self.request_id),
            id_bytes(self.adapter_id),
            id_bytes(self.node_id),
            self.prompt_tokens,
            self.completion_tokens,
        )


def dataset_id_for(contributor: str, name: str) -> str:
    """A dataset's id as AdapterRegistry.datasetIdOf computes it: keccak256(abi.encode(contributor,
    keccak256(name))). Bound to the contributor, so nobody else can register it."""
    from eth_utils import keccak, to_checksum_address

    try:
        address = bytes.fromhex(to_checksum_address(contributor)[2:])
    except ValueError as e:
        raise ValueError(f"contributor {contributor!r} is not an EVM address") from e
    return hex0x(keccak(b"\0" * 12 + address + keccak(text=name)))


# ------------------------------------------------------------------ what AdapterRegistry accepts

MAX_PRICE_PER_1K_TOKENS = 2**128 - 1  # AdapterRegistry.MAX_PRICE_PER_1K_TOKENS
MAX_DATASETS = 16  # AdapterRegistry.MAX_DATASETS: datasets one adapter pays
# AdapterRegistry._checkName, for adapter and dataset names alike: 1..64 bytes of [a-z0-9._/-], the first
# [a-z0-9], never starting with "0x" (no name looks like an id); _checkVersion: 1..32 bytes of [0-9A-Za-z.+-]
MAX_NAME_BYTES = 64  # AdapterRegistry.MAX_NAME_BYTES
REGISTRY_NAME_RE = re.compile(rf"(?!0x)[a-z0-9][a-z0-9._/-]{{0,{MAX_NAME_BYTES - 1}}}")
ADAPTER_VERSION_RE = re.compile(r"[0-9A-Za-z.+-]{1,32}")
# AdapterRegistry._checkNodeAddress: a node's peer id, API URL and multiaddrs
MAX_PEER_ID_BYTES = 128
MAX_NODE_URL_BYTES = 256
MAX_MULTIADDRS = 8
_PEER_ID_RE = re.compile(rf"[0-9A-Za-z]{{0,{MAX_PEER_ID_BYTES}}}")
_API_URL_RE = re.compile(r"https?://[\x21-\x7e]*")
_URL_CUTS = frozenset("?#@")  # a query or fragment cuts off the path a gateway appends; "@" sends credentials
_MULTIADDR_RE = re.compile(r"/[\x21-\x7e]*")


def registry_name_problem(name: object) -> str | None:
    """Why the registry would refuse `name` as an adapter's or a dataset's name, in a few words; None when it
    is fine."""
    if not isinstance(name, str) or not name:
        return "is empty"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if name.startswith("0x"):
        return "starts with 0x (names never look like ids)"
    if REGISTRY_NAME_RE.fullmatch(name) is None:
        return "is not lower-case letters, digits and . _ / - (starting with a letter or digit)"
    return None


def api_url_problem(url: object) -> str | None:
    """Why the registry would refuse `url` as a node's API URL; None when it is fine."""
    if not isinstance(url, str) or _API_URL_RE.fullmatch(url) is None:
        return "is not http:// or https:// followed by printable ASCII with no space"
    if _URL_CUTS.intersection(url):
        return "holds a ?, # or @ (a query, fragment or credentials)"
    if len(url) > MAX_NODE_URL_BYTES:
        return f"is longer than {MAX_NODE_URL_BYTES} bytes"
    return None


def node_address_problem(peer_id: str, multiaddrs: Sequence[str], api_url: str) -> str | None:
    """Why the registry would refuse a node's peer id, multiaddrs or API URL, in one line; None when it would
    take them."""
    if not isinstance(peer_id, str) or _PEER_ID_RE.fullmatch(peer_id) is None:
        return f"peer id {str(peer_id)[:80]!r} is not at most {MAX_PEER_ID_BYTES} letters and digits"
    if (why := api_url_problem(api_url)) is not None:
        return f"API URL {str(api_url)[:80]!r} {why}"
    if len(multiaddrs) > MAX_MULTIADDRS:
        return f"{len(multiaddrs)} multiaddrs: a node registers at most {MAX_MULTIADDRS}"
    for a in multiaddrs:
        if not isinstance(a, str) or _MULTIADDR_RE.fullmatch(a) is None or len(a) > MAX_NODE_URL_BYTES:
            return f"multiaddr {str(a)[:80]!r} is not / then at most {MAX_NODE_URL_BYTES} printable ASCII bytes"
    return None


def adapter_version_problem(version: object) -> str | None:
    """Why the registry would refuse `version` as an adapter version; None when it is fine."""
    if not isinstance(version, str) or ADAPTER_VERSION_RE.fullmatch(version) is None:
        return "is not 1..32 characters of letters, digits and . + -"
    return None


# ------------------------------------------------------------------ EIP-712: adapter registrations

EIP712_NAME = "loramesh"
EIP712_VERSION = "2"
ADAPTER_TYPES = {
    "AdapterRegistration": [
        {"name": "adapterId", "type": "bytes32"},
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "predecessor", "type": "bytes32"},
        {"name": "baseModel", "type": "bytes32"},
        {"name": "pricePer1kTokens", "type": "uint256"},
        {"name": "datasetIds", "type": "bytes32[]"},
        {"name": "sharesBps", "type": "uint16[]"},
    ]
}


@dataclass(frozen=True, slots=True)
class Domain:
    """Where a typed signature is valid: one chain, one AdapterRegistry."""

    chain_id: int
    registry: str

    def __post_init__(self) -> None:
        if not isinstance(self.chain_id, int) or self.chain_id <= 0:
            raise ValueError(f"chain id must be a positive integer, got {self.chain_id!r}")
        from eth_utils import to_checksum_address

        object.__setattr__(self, "registry", to_checksum_address(self.registry))

    def as_eip712(self) -> dict:
        return {
            "name": EIP712_NAME,
            "version": EIP712_VERSION,
            "chainId": self.chain_id,
            "verifyingContract": self.registry,
        }


@dataclass(frozen=True, slots=True)
class AdapterRegistration:
    """What registerAdapter registers and its publisher signs (AdapterRegistry.AdapterSpec + the id)."""

    adapter_id: str
    name: str
    version: str
    predecessor: str
    base_model: str
    price_per_1k_tokens: int
    dataset_ids: tuple[str, ...] = ()
    shares_bps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for f in ("adapter_id", "predecessor", "base_model"):
            object.__setattr__(self, f, to_id(getattr(self, f)))
        object.__setattr__(self, "dataset_ids", tuple(to_id(d) for d in self.dataset_ids))
        object.__setattr__(self, "shares_bps", tuple(int(b) for b in self.shares_bps))

    @classmethod
    def of(
        cls,
        adapter_id: str,
        *,
        name: str,
        version: str,
        base_model: str,
        price_per_1k_tokens: int,
        datasets: Sequence[tuple[str, int]] = (),
        predecessor: str | None = None,
    ) -> AdapterRegistration:
        return cls(
            adapter_id,
            name,
            version,
            predecessor or ZERO_ID,
            base_model,
            int(price_per_1k_tokens),
            tuple(d for d, _ in datasets),
            tuple(b for _, b in datasets),
        )

    def spec(self) -> tuple:
        """The AdapterSpec tuple registerAdapter takes."""
        return (
            self.name,
            self.version,
            id_bytes(self.predecessor),
            id_bytes(self.base_model),
            self.price_per_1k_tokens,
            [id_bytes(d) for d in self.dataset_ids],
            list(self.shares_bps),
        )

    def typed_data(self, domain: Domain):
        """The EIP-712 message (eth_account SignableMessage) the publisher signs."""
        from eth_account.messages import encode_typed_data

        message = {
            "adapterId": id_bytes(self.adapter_id),
            "name": self.name,
            "version": self.version,
            "predecessor": id_bytes(self.predecessor),
            "baseModel": id_bytes(self.base_model),
            "pricePer1kTokens": self.price_per_1k_tokens,
            "datasetIds": [id_bytes(d) for d in self.dataset_ids],
            "sharesBps": list(self.shares_bps),
        }
        return encode_typed_data(domain_data=domain.as_eip712(), message_types=ADAPTER_TYPES, message_data=message)

    def sign(self, account, domain: Domain) -> str:
        """The publisher's signature, "0x" + 65 bytes hex (r || s || v)."""
        return hex0x(account.sign_message(self.typed_data(domain)).signature)

    def recover(self, signature: str | bytes, domain: Domain) -> str:
        """The checksummed address that made `signature` over this registration in `domain`."""
        from eth_account import Account

        return Account.recover_message(self.typed_data(domain), signature=signature)


# ------------------------------------------------------------------ node-key proofs

NODE_PROOF_TAG = b"loramesh.node.v2"


def node_proof_message(chain_id: int, registry: str, operator: str, nonce: int) -> bytes:
    """What a node's Ed25519 key signs to let `operator` register it on `registry` while the node's
    registration nonce (AdapterRegistry.nodeNonce, incremented by every registration) is `nonce`
    (AdapterRegistry.nodeProofMessage): abi.encodePacked(bytes("loramesh.node.v2"), uint256 chainId,
    address registry, address operator, uint256 nonce), 120 bytes. A proof is good for one registration."""
    if not isinstance(nonce, int) or not 0 <= nonce < 2**256:
        raise ValueError(f"a node nonce is an integer in [0, 2**256), got {nonce!r}")
    from eth_utils import to_checksum_address

    return (
        NODE_PROOF_TAG
        + int(chain_id).to_bytes(32, "big")
        + bytes.fromhex(to_checksum_address(registry)[2:])
        + bytes.fromhex(to_checksum_address(operator)[2:])
        + nonce.to_bytes(32, "big")
    )


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    dataset_id: str
    content_hash: str
    payee: str
    contributor: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    adapter_id: str
    owner: str
    name: str
    version: str
    predecessor: str
    base_model: str
    price_per_1k_tokens: int
    dataset_ids: tuple[str, ...]
    shares_bps: tuple[int, ...]
    publisher: str = ""  # who registered (and signed) it; `owner` is who its owner share is paid to


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    operator: str
    active: bool
    base_model: str
    peer_id: str
    api_url: str
    multiaddrs: tuple[str, ...]
    public_key: str = ""  # "0x" + hex of the Ed25519 key the registration proved


@dataclass(frozen=True, slots=True)
class BatchInfo:
    batch_id: str
    merkle_root: str
    settler: str
    settled_block: int
    record_count: int
    total_fees: int
    first_sequence: int = 0  # sequence number of its first record in its settler's sequence


@dataclass(frozen=True, slots=True)
class SettledRecord:
    """One record as the chain has it (a RecordsSettled log): its batch, settler, sequence number, fee."""

    batch_id: str
    settler: str
    sequence: int
    request_id: str
    adapter_id: str
    node_id: str
    prompt_tokens: int
    completion_tokens: int
    fee: int
    block_number: int
    leaf_index: int


@dataclass(frozen=True, slots=True)
class PriceFloor:
    """What a price's grace allows (contracts/src/PriceGrace.sol): until grace_ends (a block timestamp), records
    may be charged any price from `floor` up to the price, until older_grace_ends from older_floor; after both,
    the price alone. (0, 0, 0, 0): the price never changed."""

    floor: int
    grace_ends: int
    older_floor: int = 0
    older_grace_ends: int = 0

    def allows(self, price: int, now: int) -> bool:
        """Whether `price` below the current one may be charged at chain time `now`."""
        return (now < self.grace_ends and price >= self.floor) or (
            now < self.older_grace_ends and price >= self.older_floor
        )


@dataclass(frozen=True, slots=True)
class RewardBalance:
    available: int
    accrued: int
    withdrawn: int
