"""xgrammar vs llguidance on CPU, for the JSON token masks of structured output (issue 16): measured here so the
choice of node/engine/grammar.py rests on figures, not on reputation.

    python bench/grammar.py                       # the tiny base's tokenizer (vocab 320) and a 32k BPE
    python bench/grammar.py --vocabs 320,32000,128000 --tokens 3000

For each tokenizer and library: tokenizer setup (once per engine), compile per schema (once per schema:
xgrammar compiles eagerly with its own cache off; llguidance builds its lexer lazily, so its figure is the
matcher's construction plus the first mask, and xgrammar's includes the first mask too), then a random-logit
decode: per step fill the row's bitmask, apply it, take the argmax, accept the token; a matcher that terminates
(or reaches --cap tokens) is reset. Fill and accept are timed per call (median and mean, microseconds). The
batch column fills 16 matchers at staggered states into one [16, V/32] bitmask: sequentially, and with the
library's parallel call (xgrammar BatchGrammarMatcher, llguidance LLExecutor).

The tiny base's tokenizer is node.tiny's (its trainer stops at ~425 tokens however large a vocab is asked for, as
its corpus is short), so the larger vocabularies are byte-level BPEs of the same shape trained here on the Python
sources of the installed transformers package: real-sized vocabularies, no download. The model's logits width is
the tokenizer's rounded up to 64 (as real checkpoints pad it), so both libraries also mask the padding ids.
xgrammar is not a dependency of loramesh: `pip install xgrammar==0.2.9` to compare (without it, only llguidance is
measured). Never run as a test."""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMALL = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "kind": {"enum": ["book", "film", "song"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "author": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 16},
                "born": {"type": ["integer", "null"]},
                "links": {"type": "array", "items": {"enum": ["web", "mail"]}, "maxItems": 3},
            },
            "required": ["name", "born"],
            "additionalProperties": False,
        },
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "kind", "tags", "author", "ok"],
    "additionalProperties": False,
}
SCHEMAS = {"small": SMALL, "nested": NESTED, "json_object": None}
# Schemas a hostile client may send (the node compiles what the network hands it): compile + first mask only.
_DEEP = 60
HOSTILE = {
    "counted-regex": {"type": "string", "pattern": "^(a{1,100}){1,100}$"},
    "enum-3000": {"enum": [f"value-{i}" for i in range(3000)]},
    f"nested-{_DEEP}": json.loads('{"type":"object","properties":{"a":' * _DEEP + '{"type":"integer"}' + "}}" * _DEEP),
}
BATCH = 16


def tokenizer(vocab: int):
    """node.tiny's tokenizer for its sizes; a byte-level BPE of the same shape trained on Python sources above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from node.adapters.basemodel import quiet_transformers
    from node.tiny import SPECIAL_TOKENS, _make_tokenizer

    quiet_transformers()
    if vocab <= 425:
        return _make_tokenizer(vocab)
    import transformers

    root = Path(transformers.__file__).parent
    texts, size = [], 0
    for f in sorted(glob.glob(str(root / "**" / "*.py"), recursive=True)):
        texts.append(Path(f).read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
        if size > 4000 * vocab:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, width: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=width)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, schema):
        if schema is None:
            return self.compiler.compile_builtin_json_grammar()
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=True)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, bitmask, row):
        m.fill_next_token_bitmask(bitmask, row)

    def accept(self, m, token):
        return m.accept_token(token)

    def done(self, m):
        return m.is_terminated()

    def reset(self, m):
        m.reset()

    def fill_par(self, matchers, bitmask):
        if not hasattr(self, "batch"):
            self.batch = self.xgr.BatchGrammarMatcher(max_threads="auto")
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, width: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.llt = llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=width)
        self.executor = llguidance.LLExecutor()

    def compile(self, schema):
        text = json.dumps({"type": "object"} if schema is None else schema)
        grammar = self.llg.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": True})
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, m, bitmask, row):
        self.llt.fill_next_token_bitmask(m, bitmask, row)

    def accept(self, m, token):
        return m.consume_token(token)

    def done(self, m):
        return m.is_stopped()

    def reset(self, m):
        m.reset()

    def fill_par(self, matchers, bitmask):
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)


def _libraries() -> tuple:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        print("# xgrammar is not installed: llguidance alone")
        return (LLGuidance,)
    return (XGrammar, LLGuidance)


def apply(logits, bitmask):
    # [1, V] logits, [1, ceil(V/32)] int32 bits: expand the bits once per step (the bench's own, same for both)
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    logits.masked_fill_(bits.flatten(1)[:, : logits.shape[1]] == 0, float("-inf"))


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def compile_ms(lib, width: int, schema, repeat: int = 5) -> float:
    """Compile, make a matcher and fill its first mask (llguidance does its work lazily, on the first masks)."""
    bitmask = torch.full((1, (width + 31) // 32), -1, dtype=torch.int32)
    return median_ms(lambda: lib.fill(lib.matcher(lib.compile(schema)), bitmask, 0), repeat)


def run(lib, width: int, schema, tokens: int, cap: int, seed: int) -> dict:
    compile = compile_ms(lib, width, schema)
    compiled = lib.compile(schema)
    m = lib.matcher(compiled)
    bitmask = torch.full((1, (width + 31) // 32), -1, dtype=torch.int32)
    gen = torch.Generator().manual_seed(seed)
    fills, accepts, docs, steps = [], [], 0, 0
    for _ in range(tokens):
        t = time.perf_counter()
        lib.fill(m, bitmask, 0)
        fills.append(time.perf_counter() - t)
        logits = torch.randn(1, width, generator=gen)
        apply(logits, bitmask)
        token = int(logits.argmax())
        t = time.perf_counter()
        ok = lib.accept(m, token)
        accepts.append(time.perf_counter() - t)
        assert ok, (lib.name, token)
        steps += 1
        if lib.done(m) or steps >= cap:
            docs += lib.done(m)
            lib.reset(m)
            steps = 0
    # a batch of matchers at staggered states: matcher i has taken i * 3 tokens
    matchers = [lib.matcher(compiled) for _ in range(BATCH)]
    batch_mask = torch.full((BATCH, (width + 31) // 32), -1, dtype=torch.int32)
    for i, bm in enumerate(matchers):
        for _ in range(i * 3):
            lib.fill(bm, bitmask, 0)
            logits = torch.randn(1, width, generator=gen)
            apply(logits, bitmask)
            lib.accept(bm, int(logits.argmax()))
            if lib.done(bm):
                lib.reset(bm)

    def seq():
        for i, bm in enumerate(matchers):
            lib.fill(bm, batch_mask, i)

    return {
        "compile_ms": compile,
        "fill_us": statistics.median(fills) * 1e6,
        "fill_mean_us": statistics.fmean(fills) * 1e6,
        "accept_us": statistics.median(accepts) * 1e6,
        "accept_mean_us": statistics.fmean(accepts) * 1e6,
        "docs": docs,
        "batch_seq_us": median_ms(seq, 30) * 1e3,
        "batch_par_us": median_ms(lambda: lib.fill_par(matchers, batch_mask), 30) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabs", default="320,32000", help="tokenizer sizes, comma-separated")
    parser.add_argument("--tokens", type=int, default=2000, help="decode steps per schema")
    parser.add_argument("--cap", type=int, default=300, help="tokens before a matcher that has not ended is reset")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results, hostile = [], []
    libraries = _libraries()
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        t = time.perf_counter()
        tok = tokenizer(vocab)
        width = (len(tok) + 63) // 64 * 64
        print(f"# tokenizer {len(tok)} tokens (logits width {width}), made in {time.perf_counter() - t:.1f} s")
        for cls in libraries:
            setup_ms = median_ms(lambda: cls(tok, width), 3)  # noqa: B023
            lib = cls(tok, width)
            for name, schema in SCHEMAS.items():
                row = run(lib, width, schema, args.tokens, args.cap, seed=0)
                row.update(lib=lib.name, vocab=len(tok), schema=name, setup_ms=setup_ms)
                results.append(row)
                print(json.dumps(row), flush=True)
            for name, schema in HOSTILE.items():
                ms = compile_ms(lib, width, schema, repeat=1)
                hostile.append(dict(lib=lib.name, vocab=len(tok), schema=name, compile_ms=ms))
                print(json.dumps(hostile[-1]), flush=True)
    print()
    cols = [
        ("setup ms", "setup_ms", ".1f"),
        ("compile ms", "compile_ms", ".2f"),
        ("fill us", "fill_us", ".1f"),
        ("fill mean us", "fill_mean_us", ".1f"),
        ("accept us", "accept_us", ".1f"),
        ("accept mean us", "accept_mean_us", ".1f"),
        (f"batch {BATCH} seq us", "batch_seq_us", ".0f"),
        (f"batch {BATCH} par us", "batch_par_us", ".0f"),
    ]
    print("| vocab | schema | lib | " + " | ".join(c[0] for c in cols) + " | docs |")
    print("|---" * (len(cols) + 4) + "|")
    by = {(r["vocab"], r["schema"], r["lib"]): r for r in results}
    for (vocab, schema, lib), r in by.items():
        print(
            f"| {vocab} | {schema} | {lib} | " + " | ".join(format(r[k], f) for _, k, f in cols) + f" | {r['docs']} |"
        )
        if lib == "llguidance" and (vocab, schema, "xgrammar") in by:
            x = by[(vocab, schema, "xgrammar")]
            ratio = " | ".join(f"{x[k] / r[k]:.2f}x" if r[k] else "-" for _, k, _ in cols)
            print(f"| {vocab} | {schema} | xgr/llg | {ratio} | |")
    print("\n| vocab | hostile schema | xgrammar compile ms | llguidance compile ms | xgr/llg |\n|---|---|---|---|---|")
    hb = {(r["vocab"], r["schema"], r["lib"]): r["compile_ms"] for r in hostile}
    for vocab, name, lib in hb:
        if lib == "xgrammar" and (vocab, name, "llguidance") in hb:
            x, g = hb[(vocab, name, "xgrammar")], hb[(vocab, name, "llguidance")]
            print(f"| {vocab} | {name} | {x:.1f} | {g:.1f} | {x / g:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "hostile": hostile}, indent=1))


if __name__ == "__main__":
    main()
