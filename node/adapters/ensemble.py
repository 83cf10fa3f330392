"""An adapter ensemble's components and its id: the one home of the ensemble's format, shared by the
gateway (which parses a request's names and weights), the node's receipts and the engine (which
serves the ensemble as one adapter, node/engine/lora/ensemble.py). Light: no tensor library."""

from __future__ import annotations

import math

from common.wire import canonical_json, is_id, sha256_hex

MAX_ENSEMBLE_ADAPTERS = 4
# a weight scales a component's delta; beyond this it is no longer a blend but an amplifier
MAX_ENSEMBLE_WEIGHT = 8.0
_KEY_DOMAIN = "loramesh/ensemble/1"


def check_components(components) -> tuple[tuple[str, float], ...]:
    """Validate (adapter id, weight) pairs from a request: 2..MAX distinct ids, weights finite in
    (0, MAX_ENSEMBLE_WEIGHT]. Raises ValueError naming the bad value."""
    pairs = tuple(components)
    if not 2 <= len(pairs) <= MAX_ENSEMBLE_ADAPTERS:
        raise ValueError(f"an ensemble has 2 to {MAX_ENSEMBLE_ADAPTERS} adapters, got {len(pairs)}")
    seen = set()
    out = []
    for aid, w in pairs:
        if not isinstance(aid, str) or not is_id(aid):
            raise ValueError(f"ensemble adapter id must be '0x' + 64 lowercase hex characters, got {aid!r}")
        if aid in seen:
            raise ValueError(f"adapter {aid} appears twice in the ensemble; give it one weight")
        seen.add(aid)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"ensemble weight must be a number, got {w!r}")
        if isinstance(w, int) and not 0 < w <= MAX_ENSEMBLE_WEIGHT:  # float() of 10**400 raises OverflowError
            raise ValueError(
                f"ensemble weight must be finite and in (0, {MAX_ENSEMBLE_WEIGHT:g}], got an integer out of range"
            )
        w = float(w)
        if not (math.isfinite(w) and 0.0 < w <= MAX_ENSEMBLE_WEIGHT):
            raise ValueError(f"ensemble weight must be finite and in (0, {MAX_ENSEMBLE_WEIGHT:g}], got {w!r}")
        out.append((aid, w))
    return tuple(out)


def ensemble_key(components) -> str:
    """The ensemble's adapter id: sha256 over its (id, weight) pairs in order, domain-separated so it
    never equals a package's id; repr(float) round-trips, so equal weights give equal keys."""
    pairs = check_components(components)
    doc = [_KEY_DOMAIN, [[aid, repr(w)] for aid, w in pairs]]
    return sha256_hex(canonical_json(doc))
