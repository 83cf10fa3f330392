"""Identity files: who a participant is (contributor, operator, settler). An EVM account key (eth-account
keystore) and an Ed25519 node key, one file, mode 0600.

The EVM key signs adapter manifests, registrations and settlements; the Ed25519 key is the node's
libp2p identity and signs usage receipts and heartbeats. Both are encrypted with one password.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from eth_account import Account
from eth_account.signers.local import LocalAccount

from common.files import write_private
from common.wire import UntrustedJSONError, node_id_of, parse_json

PASSWORD_ENV = "LORAMESH_KEY_PASSWORD"
FORMAT = "loramesh-identity/1"
# scrypt cost: 2**15 keeps unlocking under ~0.2 s on a small CPU while staying memory-hard.
SCRYPT_N = 2**15
MAX_SCRYPT_N = 2**18  # a file asking for more would make unlocking take minutes and gigabytes
MAX_IDENTITY_BYTES = 64 << 10  # an identity file is ~1.5 KB
_ADDRESS_RE = re.compile("0x[0-9a-fA-F]{40}")


class IdentityError(ValueError):
    """An identity file that cannot be read, decrypted or written."""


@dataclass(frozen=True, slots=True)
class Identity:
    """The keys of one participant: EVM account and Ed25519 node key."""

    account: LocalAccount
    node_key: Ed25519PrivateKey

    @property
    def address(self) -> str:
        return self.account.address

    @property
    def node_seed(self) -> bytes:
        return self.node_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def node_public_key(self) -> bytes:
        return self.node_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def node_id(self) -> str:
        return node_id_of(self.node_public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity held only in memory."""
        return cls(account=Account.create(), node_key=Ed25519PrivateKey.generate())


def _scrypt(password: str, salt: bytes, n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=8, p=1).derive(password.encode("utf-8"))


def resolve_password(password: str | None, *, confirm: bool = False) -> str:
    """The password given, else $LORAMESH_KEY_PASSWORD, else a prompt on the terminal. A new key (`confirm`) gets
    no empty password: `export LORAMESH_KEY_PASSWORD=$PW` with PW unset made keys anyone could open, silently."""
    if password is None:
        password = os.environ.get(PASSWORD_ENV)
        where = f"{PASSWORD_ENV} is set but empty"
    else:
        where = "the password given is empty"
    if password is None:
        where = "the password typed is empty"
        try:
            password = getpass.getpass("identity password: ")
            if confirm and getpass.getpass("repeat password: ") != password:
                raise IdentityError("the two passwords differ")
        except EOFError as e:
            raise IdentityError(f"no password: set {PASSWORD_ENV} or run in a terminal") from e
    if confirm and not password:
        raise IdentityError(f"{where}: a new key needs a password to encrypt it with")
    return password


def create_identity(path: str | Path, password: str | None = None, *, overwrite: bool = False) -> Identity:
    """Create an identity file at `path` (mode 0600) and return the identity it holds."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise IdentityError(f"{path} already exists; refusing to overwrite a key file")
    password = resolve_password(password, confirm=True)
    identity = Identity.generate()
    save_identity(identity, path, password)
    return identity


def save_identity(identity: Identity, path: str | Path, password: str) -> None:
    """Write `identity` encrypted under `password`; the file is created with mode 0600 atomically."""
    path = Path(path)
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    sealed = AESGCM(_scrypt(password, salt, SCRYPT_N)).encrypt(nonce, identity.node_seed, b"loramesh-node-key")
    doc = {
        "format": FORMAT,
        "address": identity.address,
        "node_id": identity.node_id,
        "node_public_key": identity.node_public_key.hex(),
        "evm_keystore": Account.encrypt(identity.account.key, password, kdf="scrypt", iterations=SCRYPT_N),
        "node_key": {
            "kdf": "scrypt",
            "n": SCRYPT_N,
            "r": 8,
            "p": 1,
            "salt": base64.b64encode(salt).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(sealed).decode(),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, json.dumps(doc, indent=2).encode(), replace=True)


def _check_kdf_costs(path: Path, doc: dict) -> None:
    """Refuse scrypt costs above what `save_identity` writes, before any key derivation runs: a file
    asking for n = 2**30 would otherwise take minutes and gigabytes to refuse."""
    node_key = doc.get("node_key")
    keystore = doc.get("evm_keystore")
    crypto = keystore.get("crypto", keystore.get("Crypto")) if isinstance(keystore, dict) else None
    if isinstance(crypto, dict) and crypto.get("kdf") != "scrypt":
        raise IdentityError(f"{path}: evm_keystore uses kdf {str(crypto.get('kdf'))[:16]!r}; expected scrypt")
    params = crypto.get("kdfparams") if isinstance(crypto, dict) else None
    for where, kdf in (("node_key", node_key), ("evm_keystore", params)):
        if not isinstance(kdf, dict):
            continue  # missing parts are reported when the file is unlocked
        n, r, p = kdf.get("n"), kdf.get("r", 8), kdf.get("p", 1)
        if type(n) is not int or not 2 <= n <= MAX_SCRYPT_N or n & (n - 1) or r != 8 or p != 1:
            raise IdentityError(
                f"{path}: {where} asks for scrypt cost n={str(n)[:24]}, r={str(r)[:8]}, "
                f"p={str(p)[:8]}; expected a power of two up to {MAX_SCRYPT_N} with r=8, p=1"
            )


def _read_document(path: Path) -> dict:
    """An identity file's JSON, bounded, with its format checked; nothing is decrypted."""
    try:
        doc = parse_json(path.read_bytes(), max_bytes=MAX_IDENTITY_BYTES, max_depth=8, what="its content")
    except FileNotFoundError as e:
        raise IdentityError(f"identity file {path} not found (create one with `loramesh keys new`)") from e
    except UntrustedJSONError as e:
        raise IdentityError(f"identity file {path} is not readable JSON ({e})") from None
    except OSError as e:
        raise IdentityError(f"identity file {path} is not readable: {e.strerror}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise IdentityError(f"{path} is not a loramesh identity file (expected format {FORMAT})")
    return doc


def read_public(path: str | Path) -> tuple[str, str]:
    """The address and node id an identity file states, read without its password (as `geth account list`
    does). The node id is checked against the public key beside it; that the address is the keystore's is
    known only once the file is unlocked (`load_identity`)."""
    path = Path(path)
    doc = _read_document(path)
    address, node_id, public_key = doc.get("address"), doc.get("node_id"), doc.get("node_public_key")
    if not (isinstance(address, str) and _ADDRESS_RE.fullmatch(address)):
        raise IdentityError(f"{path} is damaged: its address is not 0x followed by 40 hex digits")
    try:
        matches = node_id == node_id_of(bytes.fromhex(public_key))
    except (TypeError, ValueError):
        matches = False
    if not matches:
        raise IdentityError(f"{path} is damaged: its node id is not its node public key's")
    return address, node_id


def load_identity(path: str | Path, password: str | None = None) -> Identity:
    """Read and decrypt an identity file; a wrong password or a damaged file is an IdentityError."""
    path = Path(path)
    doc = _read_document(path)
    _check_kdf_costs(path, doc)
    password = resolve_password(password)
    try:
        evm_key = Account.decrypt(doc["evm_keystore"], password)
        nk = doc["node_key"]
        seed = AESGCM(_scrypt(password, base64.b64decode(nk["salt"]), int(nk["n"]))).decrypt(
            base64.b64decode(nk["nonce"]), base64.b64decode(nk["ciphertext"]), b"loramesh-node-key"
        )
    except (ValueError, InvalidTag) as e:
        raise IdentityError(f"cannot unlock {path}: wrong password or damaged file") from e
    except (KeyError, TypeError) as e:
        raise IdentityError(f"{path} is missing field {e}") from e
    identity = Identity(account=Account.from_key(evm_key), node_key=Ed25519PrivateKey.from_private_bytes(seed))
    if identity.address != doc.get("address") or identity.node_id != doc.get("node_id"):
        raise IdentityError(f"{path} is damaged: its keys do not match the address and node id it states")
    return identity
