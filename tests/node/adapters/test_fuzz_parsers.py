"""Property-based fuzzing of the package parsers: whatever the bytes, the manifest parser, canonical
JSON and the safetensors header parser either accept or raise their one error type; nothing else
escapes and nothing crashes."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.wire import UntrustedJSONError, canonical_json, parse_json
from node.adapters import PackageError, pack_adapter
from node.adapters.manifest import MANIFEST_FILE, parse_manifest_bytes
from node.adapters.weights import WEIGHTS_FILE, parse_lora_config, read_safetensors_header
from tests.utils.factories import make_peft_adapter

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def good(tiny_base, publisher, tmp_path_factory):
    peft = make_peft_adapter(tiny_base, tmp_path_factory.mktemp("peft") / "a", rank=2, targets=("q_proj", "v_proj"))
    pkg = pack_adapter(peft, tmp_path_factory.mktemp("pkg") / "p", name="fuzz/a", account=publisher, base_dir=tiny_base)
    return pkg


def _mutate(doc, path: list, value):
    """doc with the value at `path` (indices into nested dicts/lists, taken modulo) replaced, or a key added."""
    if not path:
        return value
    if isinstance(doc, dict) and doc:
        keys = sorted(doc)
        k = keys[path[0] % len(keys)]
        return {**doc, k: _mutate(doc[k], path[1:], value)}
    if isinstance(doc, list) and doc:
        i = path[0] % len(doc)
        return doc[:i] + [_mutate(doc[i], path[1:], value)] + doc[i + 1 :]
    return value


# ---- canonical JSON ----


@FUZZ
@given(json_values)
def test_canonical_json_round_trips(value):
    data = canonical_json(value)
    back = parse_json(data, max_bytes=1 << 20)
    assert back == value
    assert canonical_json(back) == data


@FUZZ
@given(
    st.binary(max_size=512)
    | st.text(alphabet='[]{}",:0123456789.eE+-\\tnulrsfa \ud800', max_size=200).map(
        lambda s: s.encode("utf-8", "surrogatepass")
    )
)
def test_parse_json_raises_only_its_error(data):
    try:
        parse_json(data, max_bytes=256, max_depth=8)
    except UntrustedJSONError:
        pass


# ---- the manifest ----


@FUZZ
@given(st.binary(max_size=400))
def test_manifest_parser_on_random_bytes(data):
    with pytest.raises(PackageError):
        parse_manifest_bytes(data)


@FUZZ
@given(path=st.lists(st.integers(0, 50), max_size=4), value=json_values)
def test_manifest_parser_on_mutated_manifests(good, path, value):
    doc = json.loads((good.path / MANIFEST_FILE).read_bytes())
    try:
        m = parse_manifest_bytes(canonical_json(_mutate(doc, path, value)))
    except PackageError:
        return
    except ValueError:  # canonical_json itself refuses what no parser would produce (e.g. a non-finite float)
        return
    assert parse_manifest_bytes(m.canonical_bytes()) == m


# ---- the safetensors header ----


def _write(tmp_path, data: bytes):
    p = tmp_path / WEIGHTS_FILE
    p.write_bytes(data)
    return p


@FUZZ
@given(st.binary(max_size=300))
def test_header_parser_on_random_bytes(tmp_path, data):
    try:
        read_safetensors_header(_write(tmp_path, data))
    except PackageError:
        pass


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1))
def test_header_parser_on_random_length_prefixes(tmp_path, data, n):
    try:
        read_safetensors_header(_write(tmp_path, struct.pack("<Q", n) + data))
    except PackageError:
        pass


@FUZZ
@given(path=st.lists(st.integers(0, 50), max_size=4), value=json_values, pad=st.integers(0, 8))
def test_header_parser_on_mutated_headers(good, tmp_path, path, value, pad):
    raw = (good.path / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = _mutate(json.loads(raw[8 : 8 + n]), path, value)
    try:
        text = json.dumps(header).encode() + b" " * pad
    except ValueError:
        return
    try:
        tensors = read_safetensors_header(_write(tmp_path, struct.pack("<Q", len(text)) + text + raw[8 + n :]))
    except PackageError:
        return
    body = len(raw) - 8 - n
    assert sum(t.nbytes for t in tensors.values()) == body


# ---- adapter_config.json ----


@FUZZ
@given(path=st.lists(st.integers(0, 60), max_size=3), value=json_values)
def test_lora_config_parser_on_mutated_configs(good, path, value):
    cfg = good.peft_config
    try:
        lora = parse_lora_config(_mutate(cfg, path, value))
    except PackageError:
        return
    assert 1 <= lora.rank and lora.alpha > 0
