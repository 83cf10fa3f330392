"""contracts/src/Ed25519.sol (through contracts/test/Ed25519Harness.sol) against a real anvil: RFC 8032
vectors, signatures from Python `cryptography`, tampered and malformed inputs, the registry's node-proof
message layout, and the gas of one verification."""

import hashlib
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eth_account import Account

from devnet.anvil import CHAIN_ID, DEV_KEYS, Anvil, AnvilConfig, free_port
from devnet.deploy import _deploy_contract
from ledger.artifacts import load_artifact
from ledger.transport import make_web3

pytestmark = pytest.mark.integration

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
GAS_BOUND = 600_000  # measured ~314k (library) / ~338k (whole call); loose, to catch regressions

# RFC 8032 section 7.1, TEST 1-3: (secret key, public key, message, signature), hex.
RFC8032_VECTORS = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """A bare anvil with only Ed25519Harness deployed: the library needs none of the loramesh
    deployment that `anvil_chain` makes, and this keeps these tests independent of it."""
    folder = tmp_path_factory.mktemp("anvil-ed25519")
    anvil = Anvil(AnvilConfig(port=free_port(), block_time=None, log_file=folder / "anvil.log")).start()
    try:
        w3 = make_web3(anvil.rpc_url, timeout=60)
        rcpt = _deploy_contract(w3, Account.from_key(DEV_KEYS[0]), CHAIN_ID, "Ed25519Harness")
        yield w3.eth.contract(address=rcpt["contractAddress"], abi=load_artifact("Ed25519Harness")["abi"])
    finally:
        anvil.stop()


def _verify(h, key: bytes, sig: bytes, msg: bytes) -> bool:
    assert len(key) == 32 and len(sig) == 64
    return h.functions.verify(key, sig[:32], sig[32:], msg).call()


def _keypair(rng: random.Random) -> tuple[Ed25519PrivateKey, bytes]:
    sk = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
    return sk, sk.public_key().public_bytes_raw()


def _flip(b: bytes, bit: int) -> bytes:
    out = bytearray(b)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _le(n: int) -> bytes:
    return n.to_bytes(32, "little")


# ------------------------------------------------------------------ RFC 8032 vectors


@pytest.mark.parametrize("secret,public,message,signature", RFC8032_VECTORS, ids=["test1", "test2", "test3"])
def test_rfc8032_vectors(harness, secret, public, message, signature):
    key, msg, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    # The typed-in vector is self-consistent (guards against typos in this file).
    sk = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    assert sk.public_key().public_bytes_raw() == key and sk.sign(msg) == sig
    assert _verify(harness, key, sig, msg)
    assert not _verify(harness, key, sig, msg + b"\x00")
    assert not _verify(harness, key, sig[:32] + _flip(sig[32:], 0), msg)


# ------------------------------------------------------------------ random keys and messages


def test_random_signatures_and_tampering(harness):
    # Seeded loop (hypothesis is not installed in .venv): 24 keys, messages of 0..300 bytes, lengths
    # chosen to straddle the SHA-512 block boundaries (R || A adds 64 bytes; 17 bytes of padding).
    rng = random.Random(0xED25519)
    lengths = [0, 1, 46, 47, 48, 63, 64, 111, 112, 175, 176, 239, 240, 300] + [rng.randrange(301) for _ in range(10)]
    for n in lengths:
        sk, key = _keypair(rng)
        msg = rng.randbytes(n)
        sig = sk.sign(msg)
        r, s = sig[:32], sig[32:]
        assert _verify(harness, key, sig, msg), f"valid signature rejected (len {n})"
        if n:
            assert not _verify(harness, key, sig, _flip(msg, rng.randrange(8 * n))), "message bit flip accepted"
        assert not _verify(harness, key, _flip(r, rng.randrange(256)) + s, msg), "r bit flip accepted"
        assert not _verify(harness, key, r + _flip(s, rng.randrange(256)), msg), "s bit flip accepted"
        assert not _verify(harness, _flip(key, rng.randrange(256)), sig, msg), "key bit flip accepted"
        # The malleated twin s + L satisfies the group equation; only the s < L check rejects it.
        assert not _verify(harness, key, r + _le(int.from_bytes(s, "little") + L), msg), "s + L accepted"
        _, other = _keypair(rng)
        assert not _verify(harness, other, sig, msg), "wrong key accepted"


# ------------------------------------------------------------------ malformed encodings


def test_malformed_inputs_return_false(harness):
    rng = random.Random(7)
    sk, key = _keypair(rng)
    msg = b"malformed"
    sig = sk.sign(msg)
    r, s = sig[:32], sig[32:]
    sign_bit = 1 << 255
    # y >= p: non-canonical encodings (p + 1 would decode, mod p, to y = 1, the identity).
    for y in (P, P + 1, 2**255 - 1):
        assert not _verify(harness, _le(y), sig, msg)
        assert not _verify(harness, key, _le(y) + s, msg)
    # y = 2 has no x on the curve; y = 1 gives x = 0, which with the sign bit set is invalid.
    for enc in (_le(2), _le(1 | sign_bit)):
        assert not _verify(harness, enc, sig, msg)
        assert not _verify(harness, key, enc + s, msg)
    # s >= L in all its forms, and zeros/ones everywhere: false, never a revert.
    for bad_s in (_le(L), _le(2**256 - 1)):
        assert not _verify(harness, key, r + bad_s, msg)
    assert not _verify(harness, b"\x00" * 32, b"\x00" * 64, msg)
    assert not _verify(harness, b"\xff" * 32, b"\xff" * 64, b"")
    for _ in range(5):
        assert not _verify(harness, rng.randbytes(32), rng.randbytes(64), rng.randbytes(rng.randrange(200)))


def _challenge(r: bytes, key: bytes, msg: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r + key + msg).digest(), "little") % L


def test_small_order_keys_rejected(harness):
    """With R = identity and s = 0 the equation [s]B == R + [k]A holds whenever [k]A is the identity:
    for A = identity always, for A of order 4 when 4 divides k. No secret key is behind such an A, so
    the library refuses small-order keys outright (RFC 8032 does not require it)."""
    identity, zero = _le(1), _le(0)
    assert not _verify(harness, identity, identity + zero, b"anything")
    order4 = _le(0)  # y = 0: x^2 = -1, x = sqrt(-1) (even root): a point of order 4
    msg = next(m for m in (i.to_bytes(4, "big") for i in range(64)) if _challenge(identity, order4, m) % 4 == 0)
    assert not _verify(harness, order4, identity + zero, msg)


# ------------------------------------------------------------------ the registry's node proof


def test_node_proof_message_layout(harness):
    """message = abi.encodePacked(bytes("loramesh.node.v2"), uint256 chainId, address registry,
    address operator, uint256 nonce), built here in Python and signed by `cryptography`."""
    from ledger.types import node_proof_message

    rng = random.Random(11)
    sk, key = _keypair(rng)
    operator = Account.create().address
    registry = harness.address
    chain_id = harness.w3.eth.chain_id
    nonce = 7
    message = (
        b"loramesh.node.v2"
        + chain_id.to_bytes(32, "big")
        + bytes.fromhex(registry[2:])
        + bytes.fromhex(operator[2:])
        + nonce.to_bytes(32, "big")
    )
    assert len(message) == 16 + 32 + 20 + 20 + 32
    assert node_proof_message(chain_id, registry, operator, nonce) == message
    sig = sk.sign(message)
    assert _verify(harness, key, sig, message)
    # The harness builds the same bytes with abi.encodePacked, as the registry does.
    assert harness.functions.verifyNodeProof(key, sig[:32], sig[32:], operator, nonce).call()
    other_operator = Account.create().address
    assert not harness.functions.verifyNodeProof(key, sig[:32], sig[32:], other_operator, nonce).call()
    assert not harness.functions.verifyNodeProof(key, sig[:32], sig[32:], operator, nonce + 1).call()


# ------------------------------------------------------------------ gas


def test_gas_of_one_verification(harness):
    rng = random.Random(13)
    sk, key = _keypair(rng)
    message = b"loramesh.node.v2" + rng.randbytes(104)  # the node-proof length: 120 bytes, 2 SHA-512 blocks
    sig = sk.sign(message)
    ok, library_gas = harness.functions.verifyGas(key, sig[:32], sig[32:], message).call()
    assert ok
    estimate = harness.functions.verify(key, sig[:32], sig[32:], message).estimate_gas()
    print(f"\nEd25519 verify: library {library_gas} gas, eth_estimateGas of the whole call {estimate}")
    assert library_gas < estimate < GAS_BOUND
