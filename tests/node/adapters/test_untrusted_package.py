"""A package from a stranger is refused in one line, never crashes the reader, and what verifies loads:
nested JSON in any package file, a bad safetensors __metadata__, non-finite or out-of-range config
values, PEFT fields that are not served exactly (aLoRA, unknown ones), non-canonical or symlinked
manifests, and the manifest + signature check that runs before any weights are written."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
from eth_account import Account

from common.wire import canonical_json
from node.adapters import MAX_LORA_RANK, PackageError, pack_adapter, verify_manifest_and_signature, verify_package
from node.adapters.manifest import MANIFEST_FILE, SIGNATURE_FILE
from node.adapters.weights import CONFIG_FILE, WEIGHTS_FILE, parse_lora_config
from tests.utils.factories import make_peft_adapter, resign, writable_copy

NESTED = b"[" * 200_000


@pytest.fixture(scope="module")
def peft_dir(tiny_base, tmp_path_factory):
    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("peft") / "a", rank=4, targets=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def good_pkg(tiny_base, peft_dir, publisher, tmp_path_factory):
    return pack_adapter(
        peft_dir, tmp_path_factory.mktemp("pkg") / "good", name="alice/capitals", account=publisher, base_dir=tiny_base
    )


@pytest.fixture
def pkg(good_pkg, tmp_path):
    return writable_copy(good_pkg.path, tmp_path / "pkg")


def with_header(pkg_dir, header: bytes) -> None:
    body = (pkg_dir / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", body[:8])
    (pkg_dir / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(header)) + header + body[8 + n :])


def header_of(pkg_dir) -> dict:
    body = (pkg_dir / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8 : 8 + n])


def with_config(pkg_dir, **changes) -> None:
    cfg = json.loads((pkg_dir / CONFIG_FILE).read_text())
    cfg.update(changes)
    (pkg_dir / CONFIG_FILE).write_text(json.dumps(cfg))


def refused(pkg_dir, match, **kw):
    with pytest.raises(PackageError, match=match):
        verify_package(pkg_dir, **kw)


# ---- nested JSON never reaches the C decoder ----


def test_nested_safetensors_header_is_refused_by_the_cli_without_a_crash(pkg, tiny_base, publisher):
    """Before: `loramesh adapter verify` died with SIGSEGV (exit 139) on a header of nested "["."""
    with_header(pkg, b"{" + b'"x":' + NESTED[:150_000] + b"}")
    resign(pkg, tiny_base, publisher)
    r = subprocess.run(
        [sys.executable, "-m", "devnet", "adapter", "verify", str(pkg)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1, (r.returncode, r.stderr[-500:])
    assert r.stderr.strip().splitlines() == [f"error: {WEIGHTS_FILE} header is nested deeper than 4 levels"]


@pytest.mark.parametrize("name", [MANIFEST_FILE, SIGNATURE_FILE])
def test_nested_package_json_is_refused(pkg, name):
    (pkg / name).write_bytes(NESTED[:60_000])
    with pytest.raises(PackageError, match="nested deeper than|larger than"):
        verify_package(pkg)


def test_nested_adapter_config_is_refused(pkg, tiny_base, publisher):
    (pkg / CONFIG_FILE).write_bytes(b'{"r":' + NESTED[:60_000])
    with pytest.raises(PackageError, match="adapter_config.json is nested deeper than 8 levels"):
        pack_adapter(pkg, pkg.parent / "out", name="x/y", account=publisher, base_dir=tiny_base)


def test_header_length_prefix_is_bounded_before_reading(pkg, tiny_base, publisher):
    data = (pkg / WEIGHTS_FILE).read_bytes()
    (pkg / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 64 << 20) + data[8:] + b" " * (64 << 20))
    resign(pkg, tiny_base, publisher)
    refused(pkg, "header of 67108864 bytes is larger than the 4194304-byte limit")


# ---- the header: what the loader reads is what verify checked ----


@pytest.mark.parametrize("metadata", [{"format": 1}, ["pt"], "pt", {"format": None}, {"a": {"b": "c"}}])
def test_non_string_metadata_is_refused(pkg, tiny_base, publisher, metadata):
    """Before: passed verify, was installed and announced, then failed every request."""
    header = header_of(pkg)
    header["__metadata__"] = metadata
    with_header(pkg, json.dumps(header).encode())
    resign(pkg, tiny_base, publisher)
    refused(pkg, "__metadata__ must map strings to strings", base_dir=tiny_base)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda e: e.update(dtype="F8_E4M3"), "has dtype 'F8_E4M3'"),
        (lambda e: e.update(shape=[True, 128]), "malformed shape"),
        (lambda e: e.update(shape=[4.0, 128]), "malformed shape"),
        (lambda e: e.update(data_offsets=[0, 2**64]), "malformed data_offsets"),
        (lambda e: e.update(extra=1), "exactly dtype, shape and data_offsets"),
        (lambda e: e.update(data_offsets=[8, 4]), "malformed data_offsets"),
    ],
)
def test_malformed_tensor_entries_are_refused(pkg, tiny_base, publisher, change, match):
    header = header_of(pkg)
    change(header[next(k for k in header if k != "__metadata__")])
    with_header(pkg, json.dumps(header).encode())
    resign(pkg, tiny_base, publisher)
    refused(pkg, match)


def test_duplicate_tensor_names_are_refused(pkg, tiny_base, publisher):
    header = header_of(pkg)
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header)
    dup = text[:-1] + ", " + json.dumps(name) + ": " + json.dumps(header[name]) + "}"
    with_header(pkg, dup.encode())
    resign(pkg, tiny_base, publisher)
    refused(pkg, "duplicate key")


def test_every_target_of_every_layer_must_be_there(pkg, tiny_base, publisher):
    header = header_of(pkg)
    names = sorted(k for k in header if k != "__metadata__" and ".layers.1.self_attn.v_proj." in k)
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(str(pkg / WEIGHTS_FILE)).items() if k not in names}
    save_file(tensors, str(pkg / WEIGHTS_FILE), metadata={"format": "pt"})
    resign(pkg, tiny_base, publisher)
    refused(pkg, "layer 1 v_proj has no LoRA weights, though target_modules names it", base_dir=tiny_base)


# ---- adapter_config.json: an allow-list ----


@pytest.mark.parametrize(
    "raw, match",
    [
        (
            b'{"peft_type": "LORA", "r": 4, "lora_alpha": Infinity, "target_modules": ["q_proj"]}',
            "Infinity is not a JSON value",
        ),
        (b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN, "target_modules": ["q_proj"]}', "NaN is not a JSON value"),
        (
            b'{"peft_type": "LORA", "r": 4, "lora_alpha": 1e400, "target_modules": ["q_proj"]}',
            "number 1e400 is out of range",
        ),
        (b'{"peft_type": "LORA", "r": 4, "r": 8, "target_modules": ["q_proj"]}', "duplicate key 'r'"),
    ],
)
def test_config_values_that_gave_a_500_are_refused(pkg, tiny_base, publisher, raw, match):
    """Before: `lora_alpha: Infinity` passed json.loads and ended as a 500 text/plain on upload."""
    (pkg / CONFIG_FILE).write_bytes(raw)
    with pytest.raises(PackageError, match=match):
        resign(pkg, tiny_base, publisher)  # pack's manifest builder reads the config first
    with pytest.raises(PackageError, match=match):
        pack_adapter(pkg, pkg.parent / "out", name="x/y", account=publisher, base_dir=tiny_base)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("alora_invocation_tokens", [5, 6], "alora_invocation_tokens = \\[5, 6\\] is not served"),
        ("use_dora", True, "use_dora = True is not served"),
        ("lora_bias", True, "lora_bias = True is not served"),
        ("bias", "all", "bias = 'all' is not served"),
        ("fan_in_fan_out", True, "fan_in_fan_out = True is not served"),
        ("init_lora_weights", "pissa", "init_lora_weights = 'pissa' is not served"),
        ("rank_pattern", {"q_proj": 2}, "rank_pattern = .* is not served"),
        ("layers_to_transform", [0], "layers_to_transform = \\[0\\] is not served"),
        ("trainable_token_indices", [3], "trainable_token_indices = \\[3\\] is not served"),
        ("use_qalora", True, "use_qalora = True is not served"),
        ("task_type", "SEQ_CLS", "task_type = 'SEQ_CLS' is not served"),
        ("some_future_field", 1, "field 'some_future_field' is not one loramesh serves exactly"),
        ("r", MAX_LORA_RANK + 1, f"rank r={MAX_LORA_RANK + 1} must be an integer in 1..{MAX_LORA_RANK}"),
        ("r", True, "rank r=True must be an integer"),
        ("lora_alpha", 0, "lora_alpha=0 must be a finite number"),
        ("lora_alpha", 1e300, "must be a finite number in"),
        ("target_modules", "q_proj", "target_modules must be a list"),
        ("target_modules", ["embed_tokens"], "unsupported target modules"),
    ],
)
def test_config_fields_not_served_exactly_are_refused_naming_them(pkg, tiny_base, publisher, field, value, match):
    """Before: aLoRA was served as plain LoRA (0/3 equal to PEFT), unknown fields passed silently."""
    with_config(pkg, **{field: value})
    with pytest.raises(PackageError, match=match):
        pack_adapter(pkg, pkg.parent / "out", name="x/y", account=publisher, base_dir=tiny_base)


def test_refusals_stay_on_one_line(pkg, tiny_base, publisher):
    with_config(pkg, task_type="X\nerror: forged second line")
    with pytest.raises(PackageError) as e:
        pack_adapter(pkg, pkg.parent / "out", name="x/y", account=publisher, base_dir=tiny_base)
    assert "\n" not in str(e.value) and "task_type = 'X\\nerror" in str(e.value)


def test_config_as_peft_saves_it_is_accepted(peft_dir):
    lora = parse_lora_config(json.loads((peft_dir / CONFIG_FILE).read_text()))
    assert (lora.rank, lora.alpha, lora.targets, lora.use_rslora) == (4, 8.0, ("q_proj", "v_proj"), False)


def test_rank_above_the_nodes_limit_is_refused_by_pack_and_verify(tiny_base, publisher, tmp_path):
    """Before: rank 32 passed pack, verify and publish, was listed, then every request got 503."""
    from node.engine.config import EngineConfig

    assert EngineConfig(model_dir=tiny_base).max_lora_rank == MAX_LORA_RANK  # one home for the limit
    peft = make_peft_adapter(tiny_base, tmp_path / "peft", rank=MAX_LORA_RANK * 2, targets=("q_proj",))
    with pytest.raises(PackageError, match=f"must be an integer in 1..{MAX_LORA_RANK}"):
        pack_adapter(peft, tmp_path / "out", name="x/big", account=publisher, base_dir=tiny_base)
    # a package packed by an older tool with a rank-32 manifest is refused by verify too
    ok = make_peft_adapter(tiny_base, tmp_path / "ok", rank=MAX_LORA_RANK, targets=("q_proj",))
    pkg = pack_adapter(ok, tmp_path / "pkg", name="x/ok", account=publisher, base_dir=tiny_base).path
    for p in pkg.iterdir():
        p.chmod(0o644)
    for f in ("adapter_config.json", WEIGHTS_FILE):
        shutil.copyfile(peft / f, pkg / f)
    doc = json.loads((pkg / MANIFEST_FILE).read_text())
    doc["lora"]["rank"] = MAX_LORA_RANK * 2
    (pkg / MANIFEST_FILE).write_bytes(canonical_json(doc))
    refused(pkg, f"lora.rank: Input should be less than or equal to {MAX_LORA_RANK}")


# ---- the manifest: canonical bytes only, plain files only ----


def test_manifest_with_a_duplicate_key_is_refused(pkg):
    text = (pkg / MANIFEST_FILE).read_text()
    (pkg / MANIFEST_FILE).write_text('{"license":"mit",' + text[1:])
    refused(pkg, "duplicate key 'license'")


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda doc: json.dumps(doc),  # spaces
        lambda doc: json.dumps(dict(reversed(doc.items())), separators=(",", ":")),  # key order
        lambda doc: canonical_json({k: v for k, v in doc.items() if k != "license"}).decode(),  # a default left out
    ],
)
def test_non_canonical_manifest_is_refused(pkg, rewrite):
    """Before: accepted, though its bytes are not the ones its adapter id was computed over."""
    doc = json.loads((pkg / MANIFEST_FILE).read_text())
    (pkg / MANIFEST_FILE).write_text(rewrite(doc))
    refused(pkg, "loramesh.json is not in canonical form")


@pytest.mark.parametrize("name", [MANIFEST_FILE, SIGNATURE_FILE, CONFIG_FILE, WEIGHTS_FILE])
def test_symlinked_package_file_is_refused(pkg, tmp_path, name):
    """Before: a symlinked manifest (pointing anywhere on the verifier's disk) was read and accepted."""
    outside = tmp_path / f"outside-{name}"
    shutil.copyfile(pkg / name, outside)
    (pkg / name).unlink()
    os.symlink(outside, pkg / name)
    refused(pkg, "symbolic link|not a plain file|is missing")


# ---- the check an upload runs before writing weights ----


def test_manifest_and_signature_alone(good_pkg, publisher):
    m, s = (good_pkg.path / MANIFEST_FILE).read_bytes(), (good_pkg.path / SIGNATURE_FILE).read_bytes()
    manifest, signer = verify_manifest_and_signature(m, s, expected_owner=publisher.address)
    assert (manifest.adapter_id, signer) == (good_pkg.adapter_id, publisher.address)
    with pytest.raises(PackageError, match="registered owner is"):
        verify_manifest_and_signature(m, s, expected_owner=Account.create().address)
    doc = json.loads(m)
    doc["price_per_1k_tokens"] = 1
    with pytest.raises(PackageError, match="manifest does not match its signature"):
        verify_manifest_and_signature(canonical_json(doc), s)
    with pytest.raises(PackageError, match="nested deeper"):
        verify_manifest_and_signature(NESTED[:100_000], s)
    with pytest.raises(PackageError, match="signature.json is 100000 bytes, more than the limit of 4096"):
        verify_manifest_and_signature(m, NESTED[:100_000])
    with pytest.raises(PackageError, match="not in canonical form"):
        verify_manifest_and_signature(json.dumps(json.loads(m)).encode(), s)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e6])
def test_weights_that_are_not_finite_or_overflow_half_precision_are_refused(pkg, tiny_base, publisher, value):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(pkg / WEIGHTS_FILE))
    name = sorted(k for k in tensors if ".lora_B." in k)[0]
    tensors[name][0, 0] = value
    save_file(tensors, str(pkg / WEIGHTS_FILE), metadata={"format": "pt"})
    resign(pkg, tiny_base, publisher)
    refused(pkg, "holds values that are not finite or exceed 65504")


def test_store_install_refuses_a_symlinked_file(pkg, tmp_path):
    """Copying would follow the link and store whatever it points at, as if it were the package's."""
    from node.adapters import AdapterStore

    outside = tmp_path / "outside"
    shutil.copyfile(pkg / CONFIG_FILE, outside)
    (pkg / CONFIG_FILE).unlink()
    os.symlink(outside, pkg / CONFIG_FILE)
    with pytest.raises(PackageError, match="'adapter_config.json' is not a plain file"):
        AdapterStore(tmp_path / "store").install(pkg)
