"""Gateway configuration: flags, then LORAMESH_GATEWAY_* environment variables, then a TOML config file
(`loramesh gateway run --config FILE`), then the defaults here (common.settings.ServiceSettings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from common.settings import ServiceSettings, split_words
from ledger.db import DEFAULT_DB_URL
from ledger.settler_config import DEFAULT_CONFIRMATIONS, DEFAULT_REPLACE_AFTER, MAX_CONFIRMATIONS

# the largest request body by default: a long context's worth of text, far below what could hurt the gateway
DEFAULT_MAX_BODY_BYTES = 4 << 20


class GatewaySettings(ServiceSettings):
    """Everything `loramesh gateway run` needs; each field can come from LORAMESH_GATEWAY_<NAME> or the
    config file (the same names, lower case)."""

    model_config = SettingsConfigDict(env_prefix="LORAMESH_GATEWAY_", extra="forbid")

    db_url: str = DEFAULT_DB_URL
    rpc_url: str | None = None  # default: the deployment file's
    deployment: Path | None = None  # without one, the node directory reads the mirror tables only
    key_file: Path | None = None  # the settler's identity (EVM account); without it nothing is settled
    # the Ed25519 key that signs the gateway's calls to nodes (created 0600 when missing); None: an ephemeral key
    # per start (nodes that trust this gateway by its heartbeat answers learn the new one at their next beat)
    gateway_key_file: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # the URL nodes reach this gateway at (their heartbeats); default http://HOST:PORT
    public_url: str | None = None
    # say hello to the nodes the chain registered (gateway.greeter), so they heartbeat here with no restart;
    # needs key_file (a settler's account signs the hellos) and a deployment
    greet_nodes: bool = True
    # base model folders whose tokenizers render chat (space-separated in the environment, as the node's lists)
    bases: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    owners_k: int = Field(default=2, ge=1, le=64)  # top-k rendezvous owners of an adapter
    saturation_queue_depth: int = Field(default=4, ge=1)  # an owner with this many queued is saturated
    heartbeat_ttl_s: float = Field(default=10.0, gt=0)  # silent longer than this -> dead
    heartbeat_max_skew_s: float = Field(default=60.0, gt=0)
    registry_sync_s: float = Field(default=2.0, gt=0)  # how often the node/adapter mirror is refreshed
    node_timeout_s: float = Field(default=60.0, gt=0)  # read timeout on a node's stream
    # a node that has not answered a generate call (its response headers) this long after it was sent is
    # failed over before the first token: a hung node (SIGSTOP, a full accept queue) costs this, not
    # node_timeout_s
    first_byte_timeout_s: float = Field(default=5.0, gt=0)
    # request bodies above this are refused with 413 before they are read; a prompt larger than the context
    # could hold is refused without tokenizing it (see gateway.chat.ChatTemplates.check_length)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    # a heartbeat as a node sends it: its signed body (at most node.heartbeat.MAX_STATUS_BYTES, 64 kB) and signature;
    # a node of the previous release writes it with JSON's spaces, and with httpx 0.27 its non-ASCII text as \u
    # escapes, 12 bytes for a 4-byte character (re-attack: 160 kB). What it costs to parse is bounded by its count
    # of objects, arrays and values (node.heartbeat), not its bytes
    max_heartbeat_bytes: int = Field(default=256 << 10, ge=1024)
    connect_timeout_s: float = Field(default=3.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)  # nodes tried before the first token
    # a node failing of its own what other nodes serve is kept out 5 s, then 10, 20, ... up to this (gateway.directory)
    node_holdoff_max_s: float = Field(default=120.0, ge=0)
    prefetch_ttl_s: float = Field(default=30.0, ge=0)  # do not re-ask an owner to load within this
    # an authenticated key is reused this long without asking the database: a revoked key, changed limits
    # or grants take effect within it (0: look every request up)
    key_cache_ttl_s: float = Field(default=2.0, ge=0)
    # the dearest adapter (or base model) a key may use, in wei per 1,000 tokens, unless the key has its own
    # limit (`loramesh gateway keys create/update --max-price-per-1k-tokens`); a dearer one is refused (403)
    default_max_price_per_1k_tokens: int = Field(default=10**16, ge=0)
    # outbox health: the gateway writes its instance row every outbox_probe_s seconds; a write that fails
    # (or waits longer than db_busy_timeout_s for SQLite's lock) makes it refuse new requests with 503
    # until a write succeeds again
    outbox_probe_s: float = Field(default=1.0, gt=0)
    db_busy_timeout_s: float = Field(default=5.0, gt=0)
    # a gateway instance silent this long is dead: its open requests are closed from the nodes' receipts
    instance_lease_s: float = Field(default=10.0, gt=0)
    # an open request whose node never answers with a receipt is closed as lost after this long
    reconcile_give_up_s: float = Field(default=600.0, gt=0)
    # one reconciliation pass asks the nodes for at most this long (it runs beside the instance heartbeat)
    reconcile_pass_s: float = Field(default=30.0, gt=0)
    # a request whose node has not finished streaming it this long after dispatch is cut off (the client
    # gets what was relayed, and an error)
    request_deadline_s: float = Field(default=1800.0, gt=0)
    # a closed request's row in the request log (gateway_requests) is deleted this many days after the request
    # was made (0: kept for good); the usage records it paid for are the ledger's and are never deleted here
    request_log_days: float = Field(default=30.0, ge=0, le=36_500)
    # a streamed answer whose client reads nothing this long (one write waits) is given up as if the client
    # had left: the node is aborted and what was relayed is billed (the request deadline is checked between
    # the node's events, which a blocked write stops)
    client_write_timeout_s: float = Field(default=30.0, gt=0)
    # a completion's max_tokens when it names none (OpenAI's 16); a chat's is what the context leaves after
    # its prompt, at most max_max_tokens
    default_max_tokens: int = Field(default=16, ge=1)
    max_max_tokens: int = Field(default=4096, ge=1)
    # echo repeats each prompt in every choice of it (with logprobs one entry per position), and so does vLLM's
    # prompt_logprobs (a chat's once): a request whose n times its prompts' tokens (twice with both) is more is
    # refused (n=16 echoing 8,000-token prompts with 5 top logprobs, 128,000
    # positions, was a 73 MB answer and seconds of the gateway's CPU for one small request); the default is a
    # quarter of that, still 16 prompts of 2,048 tokens scored in one request, or one prompt of 32k
    max_echoed_positions: int = Field(default=32_768, ge=1)
    settle: bool = True  # run the ledger settler in-process when a key file is given
    settle_batch_size: int = Field(default=100, ge=1)
    settle_interval_s: float = Field(default=5.0, ge=0)
    settle_max_in_flight: int = Field(default=32, ge=1, le=256)  # batches sent and not yet settled at once
    # on a public chain: blocks on top of a batch before it is final (a reorg before then sends it again; the
    # registry mirror reads as far behind the head), and seconds a sent batch may wait unmined before it is
    # replaced with higher fees (`loramesh settler run`'s confirmations and replace_after, bounded by SettlerConfig)
    settle_confirmations: int = Field(default=DEFAULT_CONFIRMATIONS, ge=0, le=MAX_CONFIRMATIONS)
    settle_replace_after_s: float = Field(default=DEFAULT_REPLACE_AFTER, gt=0)
    # the most the settler pays per gas and as tip, in gwei (unset: LORAMESH_MAX_FEE_GWEI / _TIP_GWEI, else
    # FeePolicy's defaults); a base fee above the cap makes it wait rather than pay
    settle_max_fee_gwei: float | None = Field(default=None, ge=0, le=1e9)
    settle_max_tip_gwei: float | None = Field(default=None, ge=0, le=1e9)

    @field_validator("bases", mode="before")
    @classmethod
    def _words(cls, v: Any) -> Any:
        return split_words(v)

    @field_validator("db_url")
    @classmethod
    def _db_url(cls, v: str) -> str:
        if "://" not in v:
            raise ValueError(f"db_url {v!r} is not a database URL (expected e.g. sqlite:///gateway.db)")
        return v
