"""What stop strings cost the text of each token (node/adapters/detokenizer.py:TextStream.push: the node runs it for
every sequence's every token on its engine thread, and the gateway again over each sequence of a request with stop
strings), as ratios against the same tokens without stop strings, measured in the same run.

    python bench/stop_strings.py

The tokenizer is node.tiny's. Three cases of 2,048 tokens each, at the request's bounds (4 stop strings of 256
characters, common/wire.py's MAX_STOPS and MAX_STOP_CHARS): one short stop string ("\\n\\n") in varied text; four
long ones that begin as the text's words do and never match; and a text a client forces to one character ("a",
with logit_bias) against stop strings of that character repeated, so that the longest possible start of one is
held back at every token. CPU time per token, the best of --rounds runs. No assertions: never run as a test."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_token_us(tok, ids: list[int], stops: list[str], rounds: int) -> float:
    from node.adapters.detokenizer import TextStream

    best = float("inf")
    for _ in range(rounds):
        stream = TextStream(tok, tuple(stops))
        started = time.process_time()
        for i in ids:
            stream.push(i)
        best = min(best, time.process_time() - started)
    return best / len(ids) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from node.tiny import init_tiny

    with tempfile.TemporaryDirectory() as work:
        tok = AutoTokenizer.from_pretrained(str(init_tiny(Path(work) / "base", 0)))
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then"]
    varied = tok.encode(" ".join(rng.choice(words) for _ in range(args.tokens)), add_special_tokens=False)
    forced = tok.encode("a" * 4 * args.tokens, add_special_tokens=False)
    held = "a" * 255 + "z"  # its longest start, 255 characters, ends the text at every token
    cases = [
        ("varied text, one stop string '\\n\\n'", varied, ["\n\n"]),
        ("varied text, 4 x 256 characters, each begins as a word", varied, [w[0] + "\x01" * 255 for w in "tcsa"]),
        ("forced 'a', 3 x 'b|c|d' + 'a' x 255 and 'a' x 255 + 'z'", forced, [*(c + "a" * 255 for c in "bcd"), held]),
    ]
    print(f"{'case':<62} {'none us':>8} {'stops us':>9} {'ratio':>6}")
    for name, ids, stops in cases:
        ids = ids[: args.tokens]
        plain = per_token_us(tok, ids, [], args.rounds)
        with_stops = per_token_us(tok, ids, stops, args.rounds)
        print(f"{name:<62} {plain:>8.1f} {with_stops:>9.1f} {with_stops / plain:>5.2f}x")


if __name__ == "__main__":
    main()
