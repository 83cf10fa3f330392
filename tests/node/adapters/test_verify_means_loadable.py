"""A package that verifies is a package that loads: over mutated safetensors headers and adapter
configs, whatever verify_package accepts, the engine's loader (load_lora_buffer + decode_lora at the
nodes' default rank) accepts too, and reads the same tensors the safetensors library reads."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, load_file, save, save_file

from node.adapters import PackageError, load_lora_buffer, verify_package
from node.adapters.manifest import MANIFEST_FILE
from node.adapters.pack import build_manifest
from node.adapters.weights import CONFIG_FILE, WEIGHTS_FILE
from node.engine.config import EngineConfig, ModelConfig
from node.engine.lora.weights import decode_lora, scaled
from tests.node.adapters.test_fuzz_parsers import _mutate, json_values
from tests.utils.factories import make_peft_adapter

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64, "I32": torch.int32}


@pytest.fixture(scope="module")
def peft(tiny_base, tmp_path_factory):
    d = make_peft_adapter(tiny_base, tmp_path_factory.mktemp("peft") / "a", rank=4, targets=("q_proj", "v_proj"))
    return json.loads((d / CONFIG_FILE).read_text()), load_file(str(d / WEIGHTS_FILE))


def _header_split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


mutation = st.one_of(
    st.tuples(st.just("header"), st.lists(st.integers(0, 40), max_size=3), json_values),
    st.tuples(st.just("config"), st.lists(st.integers(0, 60), max_size=2), json_values),
    st.tuples(st.just("rank"), st.integers(1, 40), st.integers(1, 40)),  # tensors' rank, config's r
    st.tuples(st.just("dtype"), st.sampled_from(sorted(DTYPES)), st.none()),
    st.tuples(st.just("metadata"), json_values, st.none()),
    st.tuples(st.just("alpha"), st.floats(allow_nan=False) | st.integers(-2, 2**20), st.booleans()),
    st.tuples(st.just("drop"), st.integers(0, 100), st.none()),
)


def _apply(kind, a, b, cfg: dict, tensors: dict) -> tuple[dict, bytes]:
    """(config, weights file bytes) after one mutation."""
    # a config an earlier mutation made a non-object stays so (it is refused whatever else happens)
    cfg, tensors = (dict(cfg) if isinstance(cfg, dict) else cfg), dict(tensors)
    if not isinstance(cfg, dict) and kind in ("rank", "alpha", "config"):
        kind = "none"
    if kind == "rank":
        g = torch.Generator().manual_seed(a * 100 + b)
        tensors = {
            k: (torch.randn(a, t.shape[1], generator=g) if ".lora_A." in k else torch.randn(t.shape[0], a, generator=g))
            * 0.05
            for k, t in tensors.items()
        }
        cfg["r"] = b
    elif kind == "dtype":
        tensors = {k: t.to(DTYPES[a]) for k, t in tensors.items()}
    elif kind == "alpha":
        cfg["lora_alpha"], cfg["use_rslora"] = a, b
    elif kind == "drop":
        tensors.pop(sorted(tensors)[a % len(tensors)])
    elif kind == "config":
        cfg = _mutate(cfg, a, b)
    raw = save(tensors, metadata={"format": "pt"})
    if kind in ("header", "metadata"):
        header, body = _header_split(raw)
        header = _mutate(header, a, b) if kind == "header" else {**header, "__metadata__": a}
        text = json.dumps(header).encode()
        raw = struct.pack("<Q", len(text)) + text + body
    return cfg, raw


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(mutations=st.lists(mutation, min_size=1, max_size=2))
def test_what_verifies_loads(peft, tiny_base, tmp_path, mutations):
    cfg, tensors = peft
    raw = None
    for kind, a, b in mutations:  # a second mutation starts from the first one's tensors when they load
        cfg, raw = _apply(kind, a, b, cfg, tensors if raw is None else load_file_bytes(raw, tensors))
    pkg_dir = tmp_path / "pkg"
    shutil.rmtree(pkg_dir, ignore_errors=True)
    pkg_dir.mkdir()
    try:
        (pkg_dir / CONFIG_FILE).write_text(json.dumps(cfg))
    except ValueError:
        return  # not even JSON (a non-finite float): nothing a publisher could ship
    (pkg_dir / WEIGHTS_FILE).write_bytes(raw)
    try:
        manifest = build_manifest(pkg_dir, name="fuzz/loadable", base_dir=tiny_base)
        (pkg_dir / MANIFEST_FILE).write_bytes(manifest.canonical_bytes())
        pkg = verify_package(pkg_dir, base_dir=tiny_base, require_signature=False)
    except PackageError as e:
        event(f"refused: {str(e)[:40]}")
        return
    event("verified")
    # verified: the engine's loader must take it, at the rank every node serves by default
    _, loaded_tensors = load_lora_buffer(pkg)  # what the engine's loader reads
    model_cfg = ModelConfig.from_dir(tiny_base)
    loaded = decode_lora(
        pkg.adapter_id,
        pkg.name,
        loaded_tensors,
        pkg.lora.scaling,
        model_cfg,
        EngineConfig(model_dir=tiny_base).max_lora_rank,
        torch.float32,
    )
    assert loaded.rank == pkg.lora.rank
    # finite in a slot of any dtype, float16 the narrowest (verify checked it: decode no longer does)
    assert all(torch.isfinite(scaled(b, loaded.scaling, torch.float16)).all() for _, b in loaded.weights.values())
    reference = load_file(str(pkg.weights_path))
    assert reference.keys() == loaded_tensors.keys()
    assert all(torch.equal(reference[k], loaded_tensors[k]) for k in reference)


def load_file_bytes(raw: bytes, fallback: dict) -> dict:
    """The tensors of an earlier mutation's file, or the fallback when that file does not load."""
    try:
        return load(raw)
    except Exception:
        return fallback


def test_a_verified_package_loads_the_same_tensors_as_safetensors(peft, tiny_base, tmp_path):
    cfg, tensors = peft
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / WEIGHTS_FILE), metadata={"format": "pt"})
    (tmp_path / MANIFEST_FILE).write_bytes(build_manifest(tmp_path, name="x/y", base_dir=tiny_base).canonical_bytes())
    pkg = verify_package(tmp_path, base_dir=tiny_base, require_signature=False)
    _, ours = load_lora_buffer(pkg)
    assert ours.keys() == tensors.keys() and all(torch.equal(ours[k], tensors[k]) for k in tensors)
