"""What a rogue node's tool-call answers cost the gateway, as ratios against a plain answer of the same size relayed by
the same gateway in the same run (the attack of tests/gateway/test_rogue_tool_answers.py, which counts chunks, bytes
and tokens; this script reads the clock).

    python bench/tool_answers.py [--rounds 3]

A real gateway (uvicorn on 127.0.0.1) in front of a scripted node of the tiny base whose vocabulary has an entry of
1,000 characters; each answer is 1.2 MB in 1,200 token events, asked for as a streamed chat with tools by the official
openai client, while a thread sends GET /health over and over. The answers: `benign` (plain text, the baseline),
`open-string` (a JSON string opened in the first `<tool_call>` block, then 52,000 tags, every block decided at the
end) and `short-blocks` (a call, then 40,000 short blocks, each decided as it comes). Per answer, the median over
--rounds interleaved rounds (one warm-up round first): the time to read the whole answer, the longest /health wait
while it was relayed, SSE bytes and chunks. No assertions: never run as a test."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from tests.utils.factories import make_base  # noqa: E402
from tests.utils.rogue_tools import ANSWERS, make_long_base, relay, served_scripted  # noqa: E402


class Probe:
    """GET /health over and over on a thread of its own while a request runs: when each was sent and answered."""

    def __init__(self, url: str) -> None:
        self.url = url + "/health"
        self.answers: list[tuple[float, float]] = []  # (sent, answered), time.perf_counter()
        self._stop, self._ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=120) as http:
            while not self._stop.is_set():
                sent = time.perf_counter()
                http.get(self.url).raise_for_status()
                self.answers.append((sent, time.perf_counter()))
                self._ready.set()

    def __enter__(self) -> Probe:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("no /health answered before the request")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)

    def longest(self, start: float, end: float) -> float:
        """The longest wait of a /health in flight at some time between start and end."""
        return max((answered - sent for sent, answered in self.answers if answered >= start and sent <= end), default=0)


def measure(gw_url: str, key: str, node, name: str) -> tuple[float, float, int, int]:
    """(seconds to read the answer, the longest /health wait meanwhile, SSE bytes, chunks) of one relay."""
    with Probe(gw_url) as probe:
        t0 = time.perf_counter()
        got = relay(gw_url, key, node, name)
        t1 = time.perf_counter()
    return got.seconds, probe.longest(t0, t1), got.sse_bytes, got.chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds after one warm-up round (default 3)")
    args = ap.parse_args()
    names = list(ANSWERS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        long_base = make_long_base(make_base(tmp / "tiny", seed=0), tmp / "long")
        (tmp / "gw").mkdir()
        with served_scripted(long_base, tmp / "gw") as (gw, _engine, key, node, _service):
            runs: dict[str, list[tuple[float, float, int, int]]] = {n: [] for n in names}
            for r in range(args.rounds + 1):
                for name in names:
                    got = measure(gw.url, key, node, name)
                    if r:  # round 0 warms up: the tokenizer's first use, the first connections
                        runs[name].append(got)
    base = statistics.median(s for s, *_ in runs["benign"])
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, median of {args.rounds} rounds; "
        f"ratios against `benign` relayed in the same run"
    )
    print("| answer | read s | / benign | longest /health ms | / benign's read | SSE MB | chunks |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        secs = statistics.median(s for s, *_ in runs[name])
        health = statistics.median(h for _, h, _, _ in runs[name])
        sse, chunks = runs[name][-1][2:]
        print(
            f"| {name} | {secs:.3f} | {secs / base:.2f}x | {health * 1000:.1f} | {health / base:.2f}x "
            f"| {sse / 1e6:.2f} | {chunks} |"
        )


if __name__ == "__main__":
    main()
