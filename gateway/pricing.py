"""Prices the gateway shows and bounds: each adapter's price per 1,000 tokens from the registry mirror
(ledger AdapterMirror.price_per_1k_tokens, kept current by the registry sync), the ledger's base price for
bare base-model requests (read from the chain), and each key's maximum."""

from __future__ import annotations

import logging

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from gateway.errors import PriceExceedsLimit
from ledger.models import AdapterMirror

log = logging.getLogger(__name__)


class Prices:
    """wei per 1,000 tokens: by adapter id, and the base price (None when the gateway has no chain)."""

    def __init__(self, engine: Engine, client=None) -> None:
        self.engine, self.client = engine, client
        self.adapters: dict[str, int] = {}
        self.base: int | None = None
        self.reload()

    def reload(self) -> None:
        """Re-read the adapter prices from the mirror table (blocking: DB)."""
        with Session(self.engine) as s:
            rows = s.exec(select(AdapterMirror.adapter_id, AdapterMirror.price_per_1k_tokens)).all()
        out = {}
        for adapter_id, price in rows:
            try:
                out[adapter_id] = int(price)
            except (TypeError, ValueError):
                log.warning("adapter %s has an unreadable price %r in the mirror", adapter_id[:10], price)
        self.adapters = out

    def refresh_base(self) -> None:
        """Read the ledger's base price (blocking: RPC); keeps the last value when the chain fails."""
        if self.client is None:
            return
        try:
            self.base = int(self.client.base_price())
        except Exception as e:  # a chain that does not answer must not end the refreshes
            log.warning("could not read the ledger's base price: %s", e)

    def of(self, adapter_id: str | None) -> int | None:
        """The price of an adapter (None: the bare base model's base price); None when unknown."""
        return self.base if adapter_id is None else self.adapters.get(adapter_id)


def check_price(model: str, price: int | None, limit: int | None) -> None:
    """PriceExceedsLimit when the price is known and above the key's limit."""
    if price is not None and limit is not None and price > limit:
        raise PriceExceedsLimit(f"the model '{model}' costs {price} wei per 1,000 tokens, more than this API "
                                f"key's limit of {limit} wei per 1,000 tokens", param="model")  # fmt: skip


def wei(price: int | None) -> str | None:
    """A price for JSON: a decimal string (wei overflow a double's exact integers)."""
    return None if price is None else str(price)
