"""The models a key sees: adapters from the chain registry's mirror, bases from the configuration and the
live nodes; what a request's `model` resolves to, and whether the key may pay its price.

Prices the gateway shows and bounds: each adapter's price per 1,000 tokens from the registry mirror
(ledger AdapterMirror.price_per_1k_tokens, kept current by the registry sync), the ledger's base price for
bare base-model requests (read from the chain), and each key's maximum."""

from __future__ import annotations

import logging
import math
import time
from fractions import Fraction

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from common.wire import is_id
from gateway.chain_registry import RegistryView
from gateway.directory import NodeDirectory
from gateway.errors import BadRequest, ModelNotFound, PriceExceedsLimit, PriceUnavailable
from gateway.keys import KeyInfo
from gateway.router import Target
from ledger.models import AdapterMirror
from ledger.outbox import billed_weights
from ledger.types import BASE_MODEL_ADAPTER_ID, is_uint256
from node.adapters.ensemble import MAX_ENSEMBLE_ADAPTERS, check_components, ensemble_key

ENSEMBLE_SEPARATOR = "+"  # never in an adapter name ([a-z0-9._/-]) nor in an id

log = logging.getLogger(__name__)


class Prices:
    """wei per 1,000 tokens: by adapter id, and the base price. A price is unknown (None) when the gateway has
    no chain (no pricing at all), and, with one, until it is read: the base price before the chain first answers
    (refresh_base), an adapter the registry view already resolves before the next reload sees it (both run in
    the registry sync, the view first; any process on the database may write the mirror between them).
    `client` is None when the gateway has no chain."""

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

    def known(self, model: str, adapter_id: str | None) -> int | None:
        """The price of an adapter (None: the base model's), or PriceUnavailable when the gateway has a chain and
        does not know it yet: the key's limit cannot be checked, nor the request's records bounded, at a price
        not read. None (not checked, not quoted) only on a gateway with no chain, which prices nothing.
        Nothing is read here: admission calls it on the event loop (gateway.request's _prepare), where a
        database read would stall every request; the next registry sync reads the price."""
        price = self.of(adapter_id)
        if price is None and self.client is not None:
            what = "the base price" if adapter_id is None else f"the price of the adapter {adapter_id}"
            raise PriceUnavailable(
                f"the model '{model}' cannot be served right now: {what} is not known to this gateway yet "
                "(it is read from the chain); retry shortly",
                param="model",
            )
        return price


def check_quotable(model: str, price: int | None) -> None:
    """PriceUnavailable when a known price is none the chain can hold (the mirror holds any integer a buggy or
    hostile source gave it): it can bound no usage record, so no request is admitted at it."""
    if price is not None and not is_uint256(price):
        raise PriceUnavailable(
            f"the model '{model}' has no valid price right now (the registry gives {price} wei per 1,000 "
            "tokens, not an integer from 0 to 2**256 - 1); retry later",
            param="model",
        )


def check_price(model: str, price: int | None, limit: int | None) -> None:
    """PriceExceedsLimit when the price is known and above the key's limit."""
    if price is not None and limit is not None and price > limit:
        raise PriceExceedsLimit(
            f"the model '{model}' costs {price} wei per 1,000 tokens, more than this API "
            f"key's limit of {limit} wei per 1,000 tokens",
            param="model",
        )


def wei(price: int | None) -> str | None:
    """A price for JSON: a decimal string (wei overflow a double's exact integers)."""
    return None if price is None else str(price)


class ModelCatalog:
    """Resolution and listing of models for one gateway: registry (adapters), directory (live bases),
    base_names (base model id -> its configured name), prices."""

    def __init__(
        self,
        registry: RegistryView,
        directory: NodeDirectory,
        base_names: dict[str, str],
        prices: Prices,
        *,
        default_max_price: int,
        contexts: dict[str, int | None] | None = None,
    ) -> None:
        self.registry, self.directory, self.prices = registry, directory, prices
        # base model id -> the context this gateway holds its requests to (gateway.chat.ChatTemplates.context):
        # vLLM's max_model_len in the model objects; unknown (None) for a base no --base names
        self.contexts = contexts or {}
        # base model id -> name, of the bases this gateway was configured with (--base): the only base names it
        # resolves; a base a node announces is known by its id alone (a node's heartbeat names nothing here)
        self.base_names = base_names
        self.default_max_price = default_max_price
        # model (adapter or base) id -> when this gateway first listed it, as a Unix time: OpenAI's `created`.
        # The registry mirror keeps registration blocks, not their times; asking the chain for each block's
        # time would cost a call per adapter
        self.first_seen: dict[str, int] = {}

    def created(self, model_id: str) -> int:
        """OpenAI's `created` of a model: the Unix time this gateway first saw it."""
        return self.first_seen.setdefault(model_id, int(time.time()))

    def _visible(self, name: str, key: KeyInfo, private: frozenset[str]) -> bool:
        return name not in private or name in key.adapters

    def resolve_request(self, model: str, weights: list[float] | None, key: KeyInfo, private: frozenset[str]) -> Target:
        """A request's `model` and `adapter_weights`: one model (resolve), or an ensemble `a+b[+...]` of
        adapters on one base, weighted as given or equally (1/n each: a blend, not a sum)."""
        if ENSEMBLE_SEPARATOR not in model:
            if weights is not None:
                raise BadRequest(
                    "adapter_weights needs several adapters in `model`, joined by '+' (e.g. alice/a+bob/b)",
                    param="adapter_weights",
                )
            return self.resolve(model, key, private)
        names = model.split(ENSEMBLE_SEPARATOR)
        if not 2 <= len(names) <= MAX_ENSEMBLE_ADAPTERS:
            raise BadRequest(
                f"an ensemble names 2 to {MAX_ENSEMBLE_ADAPTERS} adapters joined by '+', got {len(names)}",
                param="model",
            )
        if weights is None:
            weights = [1.0 / len(names)] * len(names)
        elif len(weights) != len(names):
            raise BadRequest(
                f"adapter_weights has {len(weights)} weights for the {len(names)} adapters in `model`",
                param="adapter_weights",
            )
        parts = [self.resolve(name, key, private) for name in names]
        for name, t in zip(names, parts):
            if t.adapter_id is None:
                raise BadRequest(f"an ensemble combines adapters; {name!r} is a base model", param="model")
        bases = {t.base_model_id for t in parts}
        if len(bases) > 1:
            raise BadRequest(f"the adapters in {model!r} are for different base models", param="model")
        try:
            pairs = check_components([(t.adapter_id, w) for t, w in zip(parts, weights)])
        except ValueError as e:  # the same adapter twice
            raise BadRequest(str(e), param="model") from None
        return Target(model, ensemble_key(pairs), parts[0].base_model_id, ensemble=pairs)

    def resolve(self, model: str, key: KeyInfo, private: frozenset[str]) -> Target:
        """An adapter id, a base model's id or name, or an adapter name (its newest registration), in that
        order: a string shaped like an id ("0x...") resolves only as an id, and a base model's name or id
        only to the base model, so no adapter name shadows either (the registry refuses such names too).
        A base's name is the one in the gateway's configuration (--base), never one a node announced (a node
        could name its base after any adapter and take its requests); a base no --base names is known by its
        id alone."""
        not_found = ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.", param="model")
        if model.startswith("0x"):  # never an adapter name
            if not is_id(model):
                raise not_found
            adapter = self.registry.adapters.get(model.lower())
            if adapter is not None and self._visible(adapter.name, key, private):
                return Target(model, adapter.adapter_id, adapter.base_model_id)
            if model.lower() in self.directory.base_models() or model.lower() in self.base_names:
                return Target(model, None, model.lower())
            raise not_found
        for base_id, name in self.base_names.items():  # configured names: an adapter name never shadows them
            if model == name:
                return Target(model, None, base_id)
        adapter = self.registry.adapter_by_name(model)
        if adapter is not None and self._visible(adapter.name, key, private):
            return Target(model, adapter.adapter_id, adapter.base_model_id)
        raise not_found

    def max_price(self, key: KeyInfo) -> int:
        """The dearest price per 1,000 tokens (wei) this key may use."""
        if key.max_price_per_1k_tokens is not None:
            return key.max_price_per_1k_tokens
        return self.default_max_price

    def check_price(self, target: Target, key: KeyInfo) -> dict[str, int]:
        """PriceExceedsLimit (403) when the adapter (or the base price) is dearer than the key allows, and
        PriceUnavailable (503) when a price is none the chain can hold, or, on a gateway with a chain, not
        known to it yet (Prices.known); an ensemble costs the sum of its adapters' prices times their billed
        weights (each adapter is billed every token times its weight, the weights scaled up to sum to 1 where
        they sum to less: ledger.outbox.billed_weights). Returns the
        prices checked, by the adapter id of each record the request will make (the zero id for the base
        model): the request's quote, the most the settler will charge each record
        (UsageRecord.quoted_price_per_1k). Only a gateway with no chain leaves a price unknown: unchecked and
        out of the quote (an ensemble's sum is of its known prices)."""
        if target.ensemble is None:
            price = self.prices.known(target.model, target.adapter_id)
            check_quotable(target.model, price)
            check_price(target.model, price, self.max_price(key))
            return {} if price is None else {target.adapter_id or BASE_MODEL_ADAPTER_ID: price}
        quote = {
            aid: price for aid, _ in target.ensemble if (price := self.prices.known(target.model, aid)) is not None
        }
        for price in quote.values():
            check_quotable(target.model, price)
        # the weights as the client wrote them (0.1 as a float is a little more than a tenth: 0.1 and 0.9 of
        # two adapters at the limit would cost 1 wei over it)
        weights = billed_weights([Fraction(str(w)) for _, w in target.ensemble])
        priced = [(quote[aid], w) for (aid, _), w in zip(target.ensemble, weights) if aid in quote]
        total = math.ceil(sum(price * w for price, w in priced)) if priced else None
        check_price(target.model, total, self.max_price(key))
        return quote

    def only_base(self) -> str | None:
        """The model (its configured name, else its id) of the one base this gateway serves, configured or live;
        None when it serves several or none. What a request that names no model gets (LoRAX's API, whose
        adapter_id may be left out)."""
        bases = set(self.base_names) | set(self.directory.base_models())
        if len(bases) != 1:
            return None
        (base,) = bases
        return self.base_names.get(base, base)

    def base_model_object(self, base_id: str) -> dict:
        """A base model as an OpenAI model object: its configured name, else its id."""
        name = self.base_names.get(base_id, base_id)
        return {
            "id": name,
            "object": "model",
            "created": self.created(base_id),
            "owned_by": "loramesh",
            "adapter_id": None,
            "base_model": {"id": base_id, "name": name},
            # vLLM's: what the model is, and the model an adapter applies to (None: it is a base)
            "root": base_id,
            "parent": None,
            "max_model_len": self.contexts.get(base_id),
            "private": False,
            "price_per_1k_tokens_wei": wei(self.prices.base),
        }

    def list_models(self, key: KeyInfo, private: frozenset[str]) -> list[dict]:
        """OpenAI model objects: visible adapters (newest of each name, by name; one named after a configured
        base by its id, which is what reaches it), then the live base models (by their configured names; a base
        no --base names by its id)."""
        live = set(self.directory.base_models())
        taken = set(self.base_names.values())  # an adapter named after a base is reached by its id only
        out = []
        for a in self.registry.newest_adapters():
            if not self._visible(a.name, key, private):
                continue
            base_name = self.base_names.get(a.base_model_id) or (a.base_model_id if a.base_model_id in live else None)
            out.append(
                {
                    "id": a.adapter_id if a.name in taken else a.name,
                    "object": "model",
                    "created": self.created(a.adapter_id),
                    "owned_by": a.owner,
                    "adapter_id": a.adapter_id,
                    "version": a.version,
                    "base_model": {"id": a.base_model_id, "name": base_name},
                    "root": a.adapter_id,
                    "parent": base_name or a.base_model_id,
                    "max_model_len": self.contexts.get(a.base_model_id),
                    "private": a.name in private,
                    "price_per_1k_tokens_wei": wei(self.prices.of(a.adapter_id)),
                }
            )
        bases = [self.base_model_object(b) for b in live]
        return out + sorted(bases, key=lambda m: m["id"])

    def model_object(self, model: str, key: KeyInfo, private: frozenset[str]) -> dict:
        """GET /v1/models/{model}: the model object of a name or id this key may use."""
        target = self.resolve(model, key, private)
        if target.adapter_id is None:  # by its name or id, live or not
            return self.base_model_object(target.base_model_id)
        for m in self.list_models(key, private):
            if m["adapter_id"] == target.adapter_id:
                return m
        raise ModelNotFound(
            f"The model '{model}' does not exist or you do not have access to it.", param="model"
        )  # an older version of an adapter: not listed
