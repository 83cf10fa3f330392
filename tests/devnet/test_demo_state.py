"""What a killed `loramesh demo` leaves in its work folder does not break the next run."""

import io

from rich.console import Console

from devnet.demo.stages import make_base


def test_a_base_cut_short_by_a_killed_demo_is_made_again(tmp_path):
    # a demo killed between the weights and the tokenizer left a base that every later run loaded and failed
    # on ("Couldn't instantiate the backend tokenizer"); the base is made beside it and renamed in when whole
    cut = tmp_path / "base"
    cut.mkdir()
    (cut / "config.json").write_text("{}")
    (cut / "model.safetensors").write_bytes(b"\0" * 8)
    base = make_base(tmp_path, Console(file=io.StringIO()))
    assert base == cut and (base / "tokenizer.json").is_file() and (base / "config.json").read_text() != "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    made = (base / "model.safetensors").stat().st_mtime_ns
    assert make_base(tmp_path, Console(file=io.StringIO())) == base
    assert (base / "model.safetensors").stat().st_mtime_ns == made  # whole: kept
