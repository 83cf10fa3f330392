"""Base models' identity: the name and config hash an adapter package binds to, read from a model folder.

The tiny models the tests and the demo build live in node/tiny.py.
"""

from __future__ import annotations

from pathlib import Path

from common.wire import UntrustedJSONError, canonical_json, parse_json, sha256_hex
from node.adapters.limits import MAX_BASE_NAME_CHARS

# Keys of config.json that describe how a checkpoint was saved, not what the model is.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"})
NAME_KEY = "loramesh_base_name"
MAX_CONFIG_BYTES = 1 << 20  # a model's config.json is a few KB; a downloaded folder may hold anything


class BaseModelError(ValueError):
    """A base model folder that is missing or not usable."""


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and advisory warnings (our commands show their own)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def read_config(base_dir: str | Path) -> dict:
    """Read a Hugging Face checkpoint folder's config.json."""
    path = Path(base_dir) / "config.json"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise BaseModelError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
        cfg = parse_json(path.read_bytes(), max_bytes=MAX_CONFIG_BYTES, what="config.json")
    except FileNotFoundError as e:
        raise BaseModelError(f"{base_dir} is not a model folder: config.json is missing") from e
    except UntrustedJSONError as e:
        raise BaseModelError(str(e)) from None
    if not isinstance(cfg, dict):
        raise BaseModelError(f"{path} is not a JSON object")
    return cfg


def base_model_id(base_dir: str | Path) -> str:
    """The base model's id: sha256 of its canonical config, without keys that only describe the save."""
    return base_model_id_from_config(read_config(base_dir))


def base_model_id_from_config(config: dict) -> str:
    """The base model id computed from a config dict."""
    return sha256_hex(canonical_json({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}))


def eos_token_ids(base_dir: str | Path, tokenizer=None) -> frozenset[int]:
    """The token ids that end a sequence of the base model (unless a request sets ignore_eos): the
    eos_token_id of its config.json and of its generation_config.json, and its tokenizer's. The node stops a
    sequence at them; the gateway ends a sequence there whatever a node streams after it."""
    docs = [read_config(base_dir)]
    gen = Path(base_dir) / "generation_config.json"
    if gen.exists():
        try:
            docs.append(parse_json(gen.read_bytes(), max_bytes=MAX_CONFIG_BYTES, what="generation_config.json"))
        except UntrustedJSONError as e:
            raise BaseModelError(str(e)) from None
    ids: set[int] = set()
    for doc in docs:
        eos = doc.get("eos_token_id") if isinstance(doc, dict) else None
        ids.update(t for t in (eos if isinstance(eos, list) else [eos]) if type(t) is int and t >= 0)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def base_model_name(base_dir: str | Path) -> str:
    """A human name for the base model: the one recorded at creation, else the folder's name; one printable line of
    at most MAX_BASE_NAME_CHARS, as a manifest holds it (a folder may be named with a no-break space)."""
    name = str(read_config(base_dir).get(NAME_KEY) or Path(base_dir).resolve().name)
    return "".join(c if c.isprintable() else " " for c in name)[:MAX_BASE_NAME_CHARS].strip() or "base"
