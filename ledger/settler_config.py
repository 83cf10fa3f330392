"""How a settler runs: SettlerConfig, what the Settler itself takes, and SettlerSettings, the settler
service's settings (`loramesh settler run`: flags, LORAMESH_SETTLER_* variables, a TOML file)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings
from ledger.deployment import DEFAULT_DEPLOYMENT_PATH

# a record quoted below its price is priced at its quote only if the price's grace lasts this much longer than the
# chain's latest block: the batch is mined later, and a grace over by then gets the batch refused (PriceAboveQuote).
# Here, not in ledger.settler, so that a deployment can check its grace against it without importing the settler.
GRACE_MARGIN_S = 300

if TYPE_CHECKING:
    from ledger.transport import FeePolicy

# Bounds on what one record may cost (settler side). A price above the bound is a mistake (an adapter
# priced in whole coins rather than wei) or an attack on the gateway's deposit; a record above the token
# bound is a bogus receipt. Either is set aside, never settled, and never holds up other records.
DEFAULT_MAX_PRICE_PER_1K = 10**16  # wei per 1,000 tokens: 0.01 coin, far above any sane price
DEFAULT_MAX_RECORD_TOKENS = 1 << 22  # prompt + completion tokens of one record (4,194,304)
DEFAULT_LOW_DEPOSIT = 10**17  # wei: below this much deposit left (after in-flight batches), warn
DEFAULT_LEASE = 30.0  # seconds a settler's claim on an unfinished batch lasts without renewal
# Blocks on top of a batch's block before it counts as final. 0 on our devnet (one anvil, no reorgs: today's
# behaviour, and the demo and tests stay fast); a public chain wants its own (see README).
DEFAULT_CONFIRMATIONS = 0
MAX_CONFIRMATIONS = 1_000  # a batch this deep is final whatever the account that settled it waits for
# seconds a sent batch may stay unmined before its transaction is replaced at the same nonce with bumped fees
DEFAULT_REPLACE_AFTER = 30.0


@dataclass(slots=True)
class SettlerConfig:
    """batch_size (N): most records per batch, and a full batch goes out at once; interval (T): a
    partial batch goes out when its oldest record has waited this long (seconds); max_in_flight:
    most batches sent and not yet settled at once (1 = one batch per receipt, sequential).

    max_price_per_1k (wei) and max_record_tokens bound what one record may cost: records beyond them
    are set aside with the reason. low_deposit (wei): the deposit left, less what in-flight batches will
    take, below which the settler warns (logs, `loramesh settler status`). lease (seconds): how long
    a claim on an unfinished batch holds without renewal (renewed every lease/3 while working on it;
    another settler takes the batch over once it has expired).

    confirmations: blocks on top of a settled batch's block before it is final; until then a reorg that drops
    its transaction sends the batch back to be sent again (same first sequence number). replace_after
    (seconds): a sent batch unmined this long has its transaction replaced at the same nonce with fees raised
    (at least +12.5%), never above the chain client's max fee."""

    batch_size: int = 100
    interval: float = 5.0
    poll: float = 0.2
    max_backoff: float = 15.0
    receipt_timeout: float = 60.0
    max_in_flight: int = 32
    max_price_per_1k: int = DEFAULT_MAX_PRICE_PER_1K
    max_record_tokens: int = DEFAULT_MAX_RECORD_TOKENS
    low_deposit: int = DEFAULT_LOW_DEPOSIT
    lease: float = DEFAULT_LEASE
    confirmations: int = DEFAULT_CONFIRMATIONS
    replace_after: float = DEFAULT_REPLACE_AFTER

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 5_000:
            raise ValueError(f"batch_size must be 1..5000, got {self.batch_size}")
        if self.interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {self.interval}")
        if self.poll <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {self.poll}")
        if not 1 <= self.max_in_flight <= 256:
            raise ValueError(f"max_in_flight must be 1..256, got {self.max_in_flight}")
        if self.max_price_per_1k < 0 or self.max_record_tokens < 0 or self.low_deposit < 0:
            raise ValueError(
                "max_price_per_1k, max_record_tokens and low_deposit must be >= 0, got "
                f"{self.max_price_per_1k}, {self.max_record_tokens}, {self.low_deposit}"
            )
        if self.lease < 1.0:
            raise ValueError(f"lease must be at least 1 second, got {self.lease}")
        # 1,000 blocks is hours on any chain: more is a typo, and the reorg check reads that many back
        if not 0 <= self.confirmations <= MAX_CONFIRMATIONS:
            raise ValueError(f"confirmations must be 0..{MAX_CONFIRMATIONS}, got {self.confirmations}")
        if self.replace_after <= 0:
            raise ValueError(f"replace_after must be > 0 seconds, got {self.replace_after}")


_DEFAULTS = {f.name: f.default for f in fields(SettlerConfig)}


class SettlerSettings(ServiceSettings):
    """Everything `loramesh settler run` needs; each field can come from LORAMESH_SETTLER_<NAME> or a TOML file
    (`--config`). The bounds are SettlerConfig's, checked when `config()` builds it."""

    model_config = SettingsConfigDict(env_prefix="LORAMESH_SETTLER_", extra="forbid")
    FLAGS: ClassVar[dict[str, str]] = {"db_url": "--db", "key_file": "--key", "rpc_url": "--rpc"}

    db_url: str  # the outbox database (the gateway's); required, as --db always was
    key_file: Path  # the settler's identity file or hex private key: its account signs and pays for batches
    # the deployment file; LORAMESH_DEPLOYMENT, read by the other ledger commands too, also sets it
    deployment: Path = Field(
        DEFAULT_DEPLOYMENT_PATH,
        validation_alias=AliasChoices("deployment", "LORAMESH_SETTLER_DEPLOYMENT", "LORAMESH_DEPLOYMENT"),
    )
    rpc_url: str | None = None  # default: the deployment file's
    batch_size: int = _DEFAULTS["batch_size"]
    interval: float = _DEFAULTS["interval"]
    max_in_flight: int = _DEFAULTS["max_in_flight"]
    max_price_per_1k: int = _DEFAULTS["max_price_per_1k"]
    max_record_tokens: int = _DEFAULTS["max_record_tokens"]
    low_deposit: int = _DEFAULTS["low_deposit"]
    lease: float = _DEFAULTS["lease"]
    confirmations: int = _DEFAULTS["confirmations"]
    replace_after: float = _DEFAULTS["replace_after"]
    # the most this settler pays per gas (maxFeePerGas) and as tip, in gwei; unset: LORAMESH_MAX_FEE_GWEI /
    # LORAMESH_MAX_TIP_GWEI, else FeePolicy's defaults. A base fee above max_fee_gwei makes the settler wait.
    max_fee_gwei: float | None = Field(None, ge=0, le=1e9)
    max_tip_gwei: float | None = Field(None, ge=0, le=1e9)

    def fee_policy(self) -> FeePolicy:
        """The FeePolicy for the settler's chain client: these caps over the environment's."""
        from ledger.transport import FeePolicy  # web3 with it: gateway.settings imports this module's defaults

        return FeePolicy.from_env().capped(self.max_fee_gwei, self.max_tip_gwei)

    def config(self) -> SettlerConfig:
        """The SettlerConfig these settings describe (ValueError when a value is out of its bounds)."""
        return SettlerConfig(
            batch_size=self.batch_size,
            interval=self.interval,
            max_in_flight=self.max_in_flight,
            max_price_per_1k=self.max_price_per_1k,
            max_record_tokens=self.max_record_tokens,
            low_deposit=self.low_deposit,
            lease=self.lease,
            confirmations=self.confirmations,
            replace_after=self.replace_after,
        )
