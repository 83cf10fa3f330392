"""What common.wire.parse_json (the one parser of untrusted JSON) costs over the standard library's json.loads on the
same bytes, for the shapes a stranger would pick: many small numbers, objects, strings; and a body of the
gateway's size limit. Best of --rounds per shape, one process, both measured in the same run.

    python bench/json_parse.py                 # 120 kB of each shape, and 4 MB of empty objects
    python bench/json_parse.py --kb 96 --rounds 20"""

from __future__ import annotations

import argparse
import json
import time

from common.wire import parse_json


def shapes(size: int) -> dict[str, bytes]:
    """Each a JSON document of about `size` bytes that parse_json takes (depth 2 or 3)."""

    def fill(item: bytes, head: bytes = b'{"a":[', tail: bytes = b"]}") -> bytes:
        return head + b",".join([item] * max(1, (size - len(head) - len(tail)) // (len(item) + 1))) + tail

    return {
        "small integers": fill(b"1"),
        "floats": fill(b"1.5"),
        "floats, one exponent of 3 digits": fill(b"1.5")[:-2] + b",1e100]}",
        "empty strings": fill(b'""'),
        "empty objects": fill(b"{}"),
        "one-key objects": fill(b'{"k":1}'),
        "a prompt (one long string)": b'{"prompt":"' + b"lorem ipsum " * (size // 12) + b'"}',
    }


def best_ms(fn, data: bytes, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(data)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kb", type=int, default=120, help="size of each shape's document in kB (default 120)")
    ap.add_argument("--big-mb", type=float, default=4.0, help="size of the large body of empty objects (default 4)")
    ap.add_argument("--rounds", type=int, default=10, help="runs per shape; the best counts (default 10)")
    args = ap.parse_args()
    docs = shapes(args.kb * 1000)
    docs[f"{args.big_mb:g} MB of empty objects"] = shapes(int(args.big_mb * 1e6))["empty objects"]

    def ours(data: bytes):
        return parse_json(data, max_bytes=len(data))

    print(f"{'shape':<36} {'bytes':>9} {'json.loads ms':>14} {'parse_json ms':>14} {'ratio':>6}")
    for name, data in docs.items():
        assert ours(data) == json.loads(data), name
        base, ms = best_ms(json.loads, data, args.rounds), best_ms(ours, data, args.rounds)
        print(f"{name:<36} {len(data):>9} {base:>14.2f} {ms:>14.2f} {ms / base:>5.1f}x")


if __name__ == "__main__":
    main()
