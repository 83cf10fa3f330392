"""The node's settings: what `loramesh node run` takes, from its flags, LORAMESH_NODE_<NAME>, a TOML config file
(`--config FILE`), then defaults, in that order of precedence. They feed the daemon's DaemonConfig and the
engine's EngineConfig, which hold the defaults (a setting left None here takes theirs) and check the values.

A config file uses the names below, e.g.

    base = "models/tiny"
    store = ".loramesh/node/store"
    port = 8101
    slots = 4
    gateways = ["http://127.0.0.1:8000"]

In the environment a list is written space-separated: LORAMESH_NODE_TRUST_GATEWAY_KEYS="<hex> <hex>".
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings, WordList, split_words
from node.adapters.limits import MAX_LORA_RANK
from node.operator_token import TOKEN_ENV

if TYPE_CHECKING:
    from node.daemon import DaemonConfig
    from node.engine import EngineConfig

ENV_PREFIX = "LORAMESH_NODE_"


class NodeSettings(ServiceSettings):
    """Everything `loramesh node run` needs; each field can come from LORAMESH_NODE_<NAME> or the config file."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")
    OTHER_VARIABLES = frozenset({TOKEN_ENV})  # the operator token, read by `adapter publish --node` too

    base: Path  # base model folder (Hugging Face safetensors)
    store: Path  # adapter store folder
    port: int = Field(ge=0, le=65535)
    host: str | None = None  # address to bind (the daemon's default: 127.0.0.1)
    api_url: str | None = None  # what gateways call (default http://HOST:PORT)
    key: Path | None = None  # identity file; None: an ephemeral node key
    # the engine
    device: str | None = None  # cpu or cuda
    slots: int | None = Field(default=None, ge=1)  # adapter slots on the device
    max_lora_rank: int | None = Field(default=None, ge=1, le=MAX_LORA_RANK)
    kv_blocks: int | None = Field(default=None, ge=1)  # None: from memory
    threads: int | None = Field(default=None, ge=1)  # torch CPU threads (at most EngineConfig's MAX_THREADS)
    prefix_caching: bool | None = None  # share prompt prefixes' KV (the engine's default: on)
    quantization: str | None = None  # none | int8 | int4 | fp8: the base weights' serving precision
    kv_cache_dtype: str | None = None  # auto | fp8: the KV cache's storage (the engine's default: auto)
    speculative: str | None = None  # ngram | off: speculative decoding (the engine's default: ngram)
    tensor_parallel: int | None = Field(default=None, ge=1)  # ranks the base is sharded over (engine default: 1)
    host_pool_buffers: int | None = Field(default=None, ge=0)  # adapter buffers pinned at start (CUDA); 0: none
    # the chain, the mesh and the gateways
    deployment: Path | None = None
    rpc: str | None = None
    listen: str | None = None  # libp2p listen multiaddr; None: no p2p
    bootstrap: WordList = ()
    gateways: WordList = ()
    adapter_sources: WordList = ()  # HTTP registries of packages (<url>/<adapter id>.tar), tried after the peers
    pins: WordList = ()
    trust_gateway_keys: WordList = ()  # empty: trust the keys the gateways announce
    heartbeat_interval: float | None = Field(default=None, gt=0)  # seconds
    # the node's folder and limits
    data_dir: Path | None = None  # holds operator.token (the daemon's default: .loramesh/node)
    max_package_bytes: int | None = Field(default=None, ge=1)
    max_cache_bytes: int | None = Field(default=None, ge=1)  # the adapters fetched for requests, together
    min_free_disk_bytes: int | None = Field(default=None, ge=0)  # what fetches leave free of the store's disk
    max_body_bytes: int | None = Field(
        default=None, ge=1
    )  # every request body but an upload's and a gateway's generate call's (sized for the base)

    @field_validator("bootstrap", "gateways", "adapter_sources", "pins", "trust_gateway_keys", mode="before")
    @classmethod
    def _words(cls, v: Any) -> Any:
        return split_words(v)

    @field_validator("quantization")
    @classmethod
    def _quantization(cls, v: str | None, info: ValidationInfo) -> str | None:
        # checked here too, so `node run --quantization fp8` on a CPU node is one line before anything loads
        if v is not None:
            from node.engine.quant import check_quantization  # torch: imported only when the setting is given

            check_quantization(v, info.data.get("device") or "cpu")
        return v

    @field_validator("kv_cache_dtype")
    @classmethod
    def _kv_cache_dtype(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:  # one line before anything loads, like quantization
            from node.engine.layers.attention import check_kv_cache_dtype

            check_kv_cache_dtype(v, info.data.get("device") or "cpu")
        return v

    def daemon_config(self) -> DaemonConfig:
        """The daemon's config (ValueError for values it refuses)."""
        from node.daemon import DaemonConfig

        given = {
            "host": self.host,
            "api_url": self.api_url,
            "deployment": self.deployment,
            "rpc": self.rpc,
            "listen": self.listen,
            "heartbeat_interval": self.heartbeat_interval,
            "data_dir": self.data_dir,
            "max_package_bytes": self.max_package_bytes,
            "max_cache_bytes": self.max_cache_bytes,
            "min_free_disk_bytes": self.min_free_disk_bytes,
            "max_body_bytes": self.max_body_bytes,
        }
        return DaemonConfig(
            base=self.base,
            store=self.store,
            port=self.port,
            bootstrap=self.bootstrap,
            gateways=self.gateways,
            adapter_sources=self.adapter_sources,
            pins=self.pins,
            trusted_gateway_keys=self.trust_gateway_keys,
            **{k: v for k, v in given.items() if v is not None},
        )

    def engine_config(self) -> EngineConfig:
        """The engine's config (ValueError for values it refuses)."""
        from node.engine import EngineConfig

        given = {
            "device": self.device,
            "num_slots": self.slots,
            "max_lora_rank": self.max_lora_rank,
            "num_kv_blocks": self.kv_blocks,
            "threads": self.threads,
            "quantization": self.quantization,
            "kv_cache_dtype": self.kv_cache_dtype,
            "tensor_parallel": self.tensor_parallel,
            "host_pool_buffers": self.host_pool_buffers,
            "enable_prefix_caching": self.prefix_caching,
            "speculative": self.speculative,
        }
        return EngineConfig(model_dir=self.base, **{k: v for k, v in given.items() if v is not None})
