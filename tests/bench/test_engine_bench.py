"""The engine bench still runs end to end (tiny shape, CPU): the GPU session that runs it at the 8B
shape has minutes, not the time to find that an engine API moved under it. Nothing here is timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_section_runs_and_lands_in_the_json(tmp_path):
    out = tmp_path / "engine.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "engine.py"),
            "--device",
            "cpu",
            "--shape",
            "tiny",
            "--sections",
            "all",
            "--repeats",
            "1",
            "--new-tokens",
            "4",
            "--ttft-prompt",
            "32",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert "section_errors" not in report, report.get("section_errors")
    assert report["engine_failures"] == []
    for key in (
        "ours, 8 adapters",
        "ours, base-only",
        "PEFT mixed batch, 8 adapters",
        "transformers base-only",
        "ours, 16 distinct adapters",
        "transformers static cache, base-only",
    ):
        assert report["tokens_per_s"][key] > 0, key
    assert report["cold_load"] and report["ttft_ms"]
    assert {"ours / PEFT mixed", "ours LoRA / ours base-only"} <= set(report["ratios"])
    table = subprocess.run(
        [sys.executable, str(REPO / "bench" / "engine.py"), "--print", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert table.returncode == 0 and "ours / PEFT mixed" in table.stdout, table.stderr[-2000:]


def test_triton_path_keeps_the_automatic_lora_mode(tmp_path):
    """The smoke run forces each LoRA mode in turn; the measured sections must get the per-step
    choice back (on the first H200 run they silently ran forced SGMV)."""
    out = tmp_path / "engine.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "engine.py"),
            "--device",
            "cpu",
            "--shape",
            "tiny",
            "--kernel",
            "triton",
            "--cuda-graphs",
            "static",
            "--sections",
            "distinct",
            "--batch",
            "4",
            "--adapters",
            "2",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["kernel"] == "TritonLoRAKernel" and report["engine_failures"] == []
    assert report["lora_mode"] == "per step"
    assert report["tokens_per_s"]["ours, 4 distinct adapters"] > 0
