"""Load the signing account for ledger commands from a key file."""

from __future__ import annotations

import re
from pathlib import Path

from eth_account import Account

from ledger.errors import LedgerError

_HEX_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


def load_account(path: str | Path, password: str | None = None):
    """An eth_account LocalAccount from a file holding a raw hex private key, or from a loramesh
    identity file (common.identity; password None -> $LORAMESH_KEY_PASSWORD, else prompt)."""
    path = Path(path)
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise LedgerError(f"cannot read key file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise LedgerError(f"key file {path} is not text: expected a hex key or a loramesh identity file") from e
    if _HEX_KEY.match(text):
        return Account.from_key(text if text.startswith("0x") else "0x" + text)
    from common.identity import load_identity  # lazily: scrypt and Ed25519 only when a file needs them

    return load_identity(path, password).account
