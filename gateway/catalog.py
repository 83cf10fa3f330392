"""The models a key sees: adapters from the chain registry's mirror, bases from the configuration and the
live nodes; what a request's `model` resolves to, and whether the key may pay its price."""

from __future__ import annotations

from gateway.chain_registry import RegistryView
from gateway.directory import NodeDirectory
from gateway.errors import ModelNotFound
from gateway.keys import KeyInfo
from gateway.pricing import Prices, check_price, wei
from gateway.router import Target
from common.wire import is_id


class ModelCatalog:
    """Resolution and listing of models for one gateway: registry (adapters), directory (live bases),
    base_names (base model id -> its configured name), prices."""

    def __init__(self, registry: RegistryView, directory: NodeDirectory, base_names: dict[str, str], prices: Prices,
                 *, default_max_price: int) -> None:  # fmt: skip
        self.registry, self.directory, self.prices = registry, directory, prices
        # base model id -> name, of the bases this gateway was configured with (--base): the only base names it
        # resolves; a base a node announces is known by its id alone (a node's heartbeat names nothing here)
        self.base_names = base_names
        self.default_max_price = default_max_price

    def _visible(self, name: str, key: KeyInfo, private: frozenset[str]) -> bool:
        return name not in private or name in key.adapters

    def resolve(self, model: str, key: KeyInfo, private: frozenset[str]) -> Target:
        """An adapter id, a base model's id or name, or an adapter name (its newest registration), in that
        order: a string shaped like an id ("0x...") resolves only as an id, and a base model's name or id
        only to the base model, so no adapter name shadows either (the registry refuses such names too).
        A base's name is the one in the gateway's configuration (--base), never one a node announced (a node
        could name its base after any adapter and take its requests); a base no --base names is known by its
        id alone."""
        not_found = ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.",
                                  param="model")  # fmt: skip
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

    def check_price(self, target: Target, key: KeyInfo) -> None:
        """PriceExceedsLimit (403) when the adapter (or the base price) is dearer than the key allows."""
        check_price(target.model, self.prices.of(target.adapter_id), self.max_price(key))

    def base_model_object(self, base_id: str) -> dict:
        """A base model as an OpenAI model object: its configured name, else its id."""
        name = self.base_names.get(base_id, base_id)
        return {"id": name, "object": "model", "created": 0, "owned_by": "loramesh", "adapter_id": None,
                "base_model": {"id": base_id, "name": name}, "private": False,
                "price_per_1k_tokens_wei": wei(self.prices.base)}  # fmt: skip

    def list_models(self, key: KeyInfo, private: frozenset[str]) -> list[dict]:
        """OpenAI model objects: visible adapters (newest of each name), then the live base models (by their
        configured names; a base no --base names by its id)."""
        live = set(self.directory.base_models())
        out = []
        for a in self.registry.newest_adapters():
            if not self._visible(a.name, key, private):
                continue
            base_name = self.base_names.get(a.base_model_id) or (a.base_model_id if a.base_model_id in live else None)
            out.append({"id": a.name, "object": "model", "created": a.registered_block, "owned_by": a.owner,
                        "adapter_id": a.adapter_id, "version": a.version,
                        "base_model": {"id": a.base_model_id, "name": base_name},
                        "private": a.name in private,
                        "price_per_1k_tokens_wei": wei(self.prices.of(a.adapter_id))})  # fmt: skip
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
        raise ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.",
                            param="model")  # an older version of an adapter: not listed  # fmt: skip
