"""Calling a node as its gateways and its operator do, a real `loramesh node run` process to call, and the
tar archives an attacker uploads to it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.wire import node_id_of
from devnet.anvil import free_port
from devnet.processes import ManagedProcess
from node.operator_token import read_operator_token, token_path
from node.receipts import public_key_bytes
from node.request_auth import BearerAuth, SignedNodeAuth, gateway_public_key_hex


class Gateway:
    """A gateway's signing key: `client(url, node_id)` signs every call to that node with it."""

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self.key = key or Ed25519PrivateKey.generate()
        self.public_hex = gateway_public_key_hex(self.key)

    def client(self, url: str, node_id: str, **kw) -> httpx.Client:
        return httpx.Client(base_url=url, auth=SignedNodeAuth(self.key, node_id), **{"timeout": 60} | kw)


def node_id_for(node_key: Ed25519PrivateKey) -> str:
    return node_id_of(public_key_bytes(node_key))


class NodeProcess:
    """`loramesh node run` in its own process (no chain, no p2p) that trusts the given gateways."""

    def __init__(
        self,
        root: Path,
        base: Path,
        *,
        trusted: list[Gateway],
        store: Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.port, self.root = free_port(), root
        self.store = store or root / "store"
        self.data_dir = root / "data"
        args = [
            "node",
            "run",
            "--base",
            str(base),
            "--store",
            str(self.store),
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--slots",
            "2",
            "--kv-blocks",
            "64",
            "--threads",
            "1",
        ]
        for g in trusted:
            args += ["--trust-gateway-key", g.public_hex]
        self.proc = ManagedProcess(
            f"node-{self.port}", args + (extra_args or []), root / "node.log", env={"OMP_NUM_THREADS": "1"}
        )
        self.node_id = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return read_operator_token(token_path(self.data_dir))

    def start(self) -> NodeProcess:
        self.proc.start()
        self.proc.wait_http(self.url + "/health", timeout=120)
        self.node_id = httpx.get(self.url + "/status", timeout=10).json()["node_id"]
        return self

    def alive(self) -> bool:
        """The process still runs and answers /health."""
        return self.proc.alive() and httpx.get(self.url + "/health", timeout=10).status_code == 200

    def signed(self, gateway: Gateway) -> httpx.Client:
        return gateway.client(self.url, self.node_id)

    def operator(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=BearerAuth(self.token), timeout=60)

    def anonymous(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        return self.proc.stop()


TAR_KINDS = {
    "sym": tarfile.SYMTYPE,
    "link": tarfile.LNKTYPE,
    "dir": tarfile.DIRTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chr": tarfile.CHRTYPE,
}


def tar_of(entries) -> bytes:
    """A PAX tar of (name, data, kind) entries; kind "file", or one of TAR_KINDS (pointing at /etc/passwd)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type, info.linkname = TAR_KINDS[kind], "/etc/passwd"
                tar.addfile(info)
    return buf.getvalue()


def package_files(pkg_dir: Path) -> list[tuple[str, bytes, str]]:
    """A package folder's files as tar_of entries."""
    return [(p.name, p.read_bytes(), "file") for p in sorted(pkg_dir.iterdir())]
