"""The node operator's bearer token: one file in the node's data folder, made on first start.

The node checks it on its operator endpoints (upload, load/pin, abort); the publishing CLI reads the
same file when the node is on this machine. It is never logged: only the file's location is.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from common.files import write_private

DEFAULT_DATA_DIR = Path(".loramesh/node")
TOKEN_FILE = "operator.token"
TOKEN_ENV = "LORAMESH_NODE_OPERATOR_TOKEN"
DATA_DIR_ENV = "LORAMESH_NODE_DATA_DIR"  # node.settings.NodeSettings.data_dir, as the environment names it


def local_data_dir() -> Path:
    """The data folder of a node run on this machine with its default settings and this environment (read
    when called, so that setting the variable after import counts)."""
    return Path(os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR))


class OperatorTokenError(ValueError):
    """The token file is missing, empty or unreadable."""


def token_path(data_dir: str | Path = DEFAULT_DATA_DIR) -> Path:
    return Path(data_dir) / TOKEN_FILE


def ensure_operator_token(data_dir: str | Path = DEFAULT_DATA_DIR) -> tuple[str, Path]:
    """The node's operator token, created (0600, 256 random bits) when the data folder has none yet."""
    path = token_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.is_file():
        return read_operator_token(path), path
    # linked into place whole: two nodes sharing a data folder and starting at once end up with the same
    # token, and nobody ever reads a half-written file
    write_private(path, (secrets.token_urlsafe(32) + "\n").encode(), replace=False)
    return read_operator_token(path), path


def read_operator_token(path: str | Path) -> str:
    """The token held in `path` (surrounding whitespace ignored)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise OperatorTokenError(
            f"cannot read the operator token file {Path(path).name}: {getattr(e, 'strerror', None) or e}"
        ) from None
    if not token:
        raise OperatorTokenError(f"the operator token file {Path(path).name} is empty")
    return token
