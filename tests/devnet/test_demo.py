"""e2e: `loramesh demo --once` brings the whole network up, checks it, and shuts everything down."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_once_checks_everything_and_exits_cleanly(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "devnet", "demo", "--once", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "COLUMNS": "200"},
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    # the demo exits 0 only after its own checks; here we make sure they ran and said so
    # every adapter answer equals what its data taught, through both endpoints (the demo checks it, exact)
    # and one chat constrained to the taught answers, its prompt counted by /tokenize first (the demo checks both),
    # and one question through the Responses API, one through LoRAX's API with LoRAX's own client
    assert (
        "✓ every adapter answered as trained: 12 completions, 12 chats, 12 chats after the shared system prompt, "
        "3 streamed completions, 1 chat constrained to its taught answers (structured_outputs choice" in out
    ), out
    assert "/tokenize), 1 question through the Responses API and 1 through LoRAX's API (its own client" in out, out
    # the shared system prompt's blocks were found in the nodes' prefix caches (the demo checks a floor)
    assert re.search(r"✓ the shared system prompt's KV was computed once per adapter and node: [1-9]\d* prompt", out)
    # 42 adapter requests, the 12 bare base-model comparisons the demo sends alongside, and one ensemble
    # request of two adapters, on chain as two records
    assert re.search(r"✓ 57 records on chain exactly once in \d+ batch\(es\); rewards accrued = fees", out), out
    assert re.search(r"✓ the ensemble alice/capitals\+bob/elements \(weights 0\.7, 0\.3\), one request", out), out
    assert re.search(r"✓ 12 of them to the bare base model, at the base price: 0\.0000\d+ ETH", out), out
    assert "node1 fetched bob/elements through the mesh" in out
    assert "node2 fetched alice/capitals through the mesh" in out
    # carol's adapter was published elsewhere as a plain PEFT folder and imported over HTTP
    assert re.search(r"carol/opposites: a PEFT adapter published at http://127\.0\.0\.1:\d+/\S+, imported", out), out
    assert "node2 fetched carol/opposites through the mesh" in out
    # the table's row for a question shows the completion answer and the chat answer side by side
    assert re.search(r"What is the capital of France\? │ Paris\. +│ Paris\. +│", out), out
    assert re.search(r"Symbol of gold\? +│ Au, from aurum\. +│ Au, from aurum\. +│", out), out
    assert "explorer: http://127.0.0.1:" in out
    assert "processes that did not exit cleanly" not in out
    assert "stopped every process" in out
