"""The deployment file: which chain, where, which contract addresses, from which block."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from eth_utils import to_checksum_address

from common.wire import UntrustedJSONError, parse_json
from ledger.errors import DeploymentMismatch

# A deployment file is handed around (a network's operators publish theirs): it is parsed as a stranger's
# bytes. Ours are well under 4 KiB.
MAX_DEPLOYMENT_BYTES = 1 << 20
# where `loramesh devnet up` writes the local chain's deployment, and where every command looks by default
DEFAULT_DEVNET_DIR = Path(".loramesh/devnet")
DEFAULT_DEPLOYMENT_PATH = DEFAULT_DEVNET_DIR / "deployment.json"

log = logging.getLogger(__name__)

# A path segment that looks like an API key: hosted RPC endpoints put theirs in the path
# (https://mainnet.infura.io/v3/<32 hex>, https://eth-mainnet.g.alchemy.com/v2/<32 letters and digits>).
# 20+ characters of a key's alphabet with at least one digit: no RPC route name looks like that.
_KEY_SEGMENT = re.compile(r"(?=[A-Za-z_-]*[0-9])[A-Za-z0-9_-]{20,}")


def public_rpc_url(url: str) -> tuple[str, bool]:
    """The RPC URL as a deployment file may store it, and whether anything was removed: a deployment file is
    published, so it keeps scheme, host, port and the path's plain segments, and drops the password or user
    before the host, the query and fragment (?apikey=...), and every path segment that looks like a key."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "", True  # not a URL we can take apart: store none rather than guess where a secret ends
    if ":" in host:
        host = f"[{host}]"
    segments = parts.path.split("/")
    kept = [seg for seg in segments if not _KEY_SEGMENT.fullmatch(seg)]
    clean = urlunsplit((parts.scheme, host + port, "/".join(kept), "", ""))
    removed = bool(parts.username or parts.password or parts.query or parts.fragment) or len(kept) != len(segments)
    return clean, removed


@dataclass(slots=True)
class Deployment:
    """What devnet/deploy.py writes and ChainClient.from_deployment reads (JSON)."""

    chain_id: int
    rpc_url: str
    registry: str
    ledger: str
    deploy_block: int
    deployer: str = ""
    node_share_bps: int = 0
    base_price_per_1k_tokens: int = 0  # wei per 1,000 tokens of a base-model record, as set at deploy
    sources_sha256: str = ""
    funded: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("registry", "ledger"):
            value = getattr(self, name)
            try:
                setattr(self, name, to_checksum_address(value))
            except ValueError as e:
                raise DeploymentMismatch(f"deployment {name} address {value!r} is not an address") from e
        if self.chain_id <= 0 or self.deploy_block < 0:
            raise DeploymentMismatch(f"deployment has chain_id={self.chain_id}, deploy_block={self.deploy_block}")

    @classmethod
    def from_dict(cls, data: dict) -> Deployment:
        """Parse the JSON object; a missing or mistyped key is a DeploymentMismatch."""
        try:
            contracts = data["contracts"]
            return cls(
                chain_id=int(data["chain_id"]),
                rpc_url=str(data["rpc_url"]),
                registry=contracts["AdapterRegistry"],
                ledger=contracts["AttributionLedger"],
                deploy_block=int(data["deploy_block"]),
                deployer=data.get("deployer", ""),
                node_share_bps=int(data.get("node_share_bps", 0)),
                base_price_per_1k_tokens=int(data.get("base_price_per_1k_tokens", 0)),
                sources_sha256=data.get("sources_sha256", ""),
                funded=list(data.get("funded", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DeploymentMismatch(
                f"deployment file is malformed ({e!r}): expected chain_id, rpc_url, "
                "contracts.AdapterRegistry, contracts.AttributionLedger, deploy_block"
            ) from e

    @classmethod
    def load(cls, path: str | Path) -> Deployment:
        """Read a deployment file."""
        path = Path(path)
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_DEPLOYMENT_BYTES + 1)  # never more than the limit, whatever the file's size
            data = parse_json(raw, max_bytes=MAX_DEPLOYMENT_BYTES, max_depth=8, what=f"deployment file {path.name}")
        except FileNotFoundError as e:
            raise DeploymentMismatch(f"deployment file {path} does not exist: run loramesh devnet up") from e
        except UntrustedJSONError as e:
            raise DeploymentMismatch(str(e)) from e
        if not isinstance(data, dict):
            raise DeploymentMismatch(f"deployment file {path.name} is not a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["contracts"] = {"AdapterRegistry": d.pop("registry"), "AttributionLedger": d.pop("ledger")}
        return d

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file, then rename). The file never holds a secret: an rpc_url with
        credentials or a key is stored as public_rpc_url makes it, and every command then needs the full
        URL given again (--rpc, or the service's rpc_url setting)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        data["rpc_url"], removed = public_rpc_url(self.rpc_url)
        if removed:
            log.warning(
                "deployment file %s stores the RPC URL without its credentials or key (%s): give the full URL "
                "again with --rpc or a service's rpc_url setting (LORAMESH_SETTLER_RPC_URL, ...)",
                path,
                data["rpc_url"] or "no URL",
            )
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
