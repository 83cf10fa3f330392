"""Why the engine cannot serve an adapter: the AdapterError tree, which the node API turns into
statuses (node/api.py)."""

from __future__ import annotations


class AdapterError(RuntimeError):
    """An adapter the node cannot serve (base class of the adapter errors)."""


class AdapterNotFoundError(AdapterError):
    """The node neither holds the adapter nor could fetch it."""


class AdapterBaseMismatchError(AdapterError):
    """The adapter was trained for a different base model."""


class AdapterIncompatibleError(AdapterError):
    """The adapter's tensors do not fit this model or the engine's slot rank."""


class AdapterSlotsBusyError(AdapterError):
    """Every slot holds a pinned or in-use adapter."""


class AdapterStoreFullError(AdapterError):
    """The node's store has no room to fetch the adapter into (node/adapters/store.py:StoreFull)."""
