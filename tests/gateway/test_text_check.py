"""An honest node's streamed text against the gateway's check of it (gateway/request.py: _misreported).

The gateway counts token events, so a node that sent token ids without their text would bill padding nobody
sees. At a request's end the gateway holds a sequence against the node when the text it streamed is shorter
than what an honest node sends for those ids. An honest node makes its text with node/adapters/detokenizer.py's
TextStream, token by token (node/engine/llm_engine.py: _emit): it holds back an incomplete UTF-8 character and
a possible start of a stop string, cuts the text at a stop string (the rest of that token's text is not sent),
sends no text for a stop token id, and flushes what it held when the sequence ends, but not when the request is
cut (aborted, a broken stream): then only the texts sent so far reach the gateway. So an honest node's text may
fall short of what its ids decode to, and by any amount: while the decode ends in an incomplete character
nothing is sent, however many tokens that takes.

Checked here, on tokenizers built locally (no network) in the shapes the gateway meets, each saved as a base
folder that the node and the gateway load as they do (AutoTokenizer): byte-level BPE (GPT-2 / Llama-3: a token
may hold part of a character), sentencepiece-like (Llama-2's byte fallback tokens <0xNN> and leading-space
strip; a Metaspace Unigram), and the repository's own tiny base; each has <pad>, <s> and </s> (its EOS):

- random ids from the whole vocabulary, stop strings, stop token ids and cut points: the gateway's relay takes
  every event of the honest node (the engine's own _emit) and its check does not dispute it;
- runs of held-back text a cut or a stop string drops, which random ids rarely make: not disputed either (an
  allowance of the longest stop string plus two tokens' text would dispute them);
- a node that pads (ids with no text, or some of their text left out) is disputed."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from gateway.chat import ChatTemplates
from gateway.choices import Choices
from gateway.openai_api import CompletionRequest
from gateway.request import ServedRequest
from node.adapters.basemodel import NAME_KEY, base_model_id
from node.engine.llm_engine import LLMEngine, load_tokenizer
from node.engine.request import SamplingParams
from node.engine.sequence import Sequence

SPECIAL = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 in every tokenizer here
EOS = 2
BYTES = [f"<0x{b:02X}>" for b in range(256)]  # sentencepiece's byte fallback tokens
# Text the tokenizers learn from: besides English, accents, CJK, Hangul, emoji (with modifiers and flags) and
# right-to-left scripts, so that byte-level tokens end and start inside characters
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, world! It's 42 degrees.",
    "Naïve café déjà vu — über straße. 日本語のテキストです。中文字符和标点！",
    "emoji 🙂😀🎉👍🏽 and flags 🇫🇷🇯🇵 mixed with text: ok!🙂 (yes) ✓ → ∑",
    "한국어 텍스트 Привет мир Γειά σου κόσμε שלום עולם مرحبا",
    "  indented\n\tcode = x[0] + y**2  # comment\n\n",
]
NAMES = ["byte_level", "llama2", "metaspace_unigram", "tiny"]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=False
    )


def _byte_level(more: tuple[str, ...] = (), vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """GPT-2 / Llama-3's shape: bytes mapped to printable characters, merges learnt across a character's bytes
    (from the corpus and `more` texts)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3 + list(more), trainer=trainer)
    return _wrap(tok)


def _pieces() -> tuple[list[str], list[tuple[str, str]]]:
    """Sentencepiece-style pieces ("▁word") and their merges, learnt from the corpus (at most 12 characters a
    piece, as sentencepiece limits them)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL, max_token_length=12, show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    learnt = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if p not in SPECIAL]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return learnt, merges


def _special(tok: Tokenizer) -> Tokenizer:
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    return tok


def _llama2() -> PreTrainedTokenizerFast:
    """Llama-2's tokenizer.json: BPE with the 256 byte tokens after the special ones (a character the pieces
    lack is its UTF-8 bytes), spaces made "▁" by the normalizer, and a decoder that turns byte tokens back into
    characters and strips the one leading space the normalizer added."""
    learnt, merges = _pieces()
    vocab = {p: i for i, p in enumerate(SPECIAL + BYTES + learnt)}
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _wrap(_special(tok))


def _metaspace_unigram() -> PreTrainedTokenizerFast:
    """A Unigram model with byte fallback behind a Metaspace pre-tokenizer, whose decoder strips the leading
    space of the first token only (where Llama-2's strips the text's)."""
    learnt, _ = _pieces()
    vocab = [(p, 0.0) for p in SPECIAL] + [(b, -20.0) for b in BYTES]
    vocab += [(p, -1.0 - i / 100) for i, p in enumerate(learnt)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=None, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    return _wrap(_special(tok))


def _base_folder(tok: PreTrainedTokenizerFast, out: Path, name: str) -> Path:
    """A base folder with this tokenizer and a config.json (no weights: nothing here runs the model)."""
    tok.save_pretrained(out)
    config = {"model_type": "llama", "vocab_size": len(tok), "max_position_embeddings": 512}
    config |= {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": EOS, NAME_KEY: name}
    (out / "config.json").write_text(json.dumps(config))
    return out


@dataclass(frozen=True)
class Base:
    name: str
    bid: str  # its base model id
    tok: PreTrainedTokenizerFast  # as the node loads it
    size: int  # the ids its tokenizer knows
    special: tuple[int, ...]
    templates: ChatTemplates  # the gateway's, this base's tokenizer loaded


@pytest.fixture(scope="module")
def bases(tiny_base, tmp_path_factory) -> dict[str, Base]:
    root = tmp_path_factory.mktemp("tokenizers")
    built = {"byte_level": _byte_level(), "llama2": _llama2(), "metaspace_unigram": _metaspace_unigram()}
    dirs = {name: _base_folder(tok, root / name, name) for name, tok in built.items()} | {"tiny": tiny_base}
    templates = ChatTemplates(list(dirs.values()))
    out = {}
    for name, d in dirs.items():
        bid = base_model_id(d)
        texts = templates.texts(bid)  # loads the gateway's copy of the tokenizer
        tok = load_tokenizer(d)  # and the node's
        assert tok.eos_token_id == EOS and templates.end_ids(bid) == {EOS}
        out[name] = Base(name, bid, tok, texts.size, tuple(sorted(tok.all_special_ids)), templates)
    return out


def honest_texts(tok, ids: list[int], stops: list[str], stop_ids: list[int]) -> list[str]:
    """The text of each token event an honest node sends while it generates `ids` (max_tokens: all of them):
    the engine's own _emit on a sequence of its own, up to the token that ends the sequence."""
    return honest_run(tok, ids, stops, stop_ids)[0]


def honest_run(
    tok, ids: list[int], stops: list[str], stop_ids: list[int], skip: bool = True
) -> tuple[list[str], str | None, str]:
    """honest_texts, the stop string the node names in its finish event (None: none ended the sequence), and its
    finish reason there ("stop", or "length" at the last of `ids`, max_tokens). `skip`: skip_special_tokens."""
    params = SamplingParams(
        max_tokens=max(len(ids), 1), stop=tuple(stops), stop_token_ids=tuple(stop_ids), skip_special_tokens=skip
    )
    seq = Sequence("r", None, [tok.bos_token_id], params, tok, torch.device("cpu"), seed=0, end_ids=frozenset({EOS}))
    # _emit reads only these of the engine: which ids end a sequence, and the context (never reached here)
    engine = SimpleNamespace(eos_ids=frozenset({EOS}), max_len=len(ids) + 2)
    texts, reason = [], "stop"
    for t in ids:
        (event,), reason = LLMEngine._emit(engine, seq, t, None)
        texts.append(event.text)
        if reason is not None:
            break
    return texts, seq.stream.stopped, reason or "stop"


def disputed(
    base: Base,
    ids: list[int],
    texts: list[str],
    stops: list[str],
    stop_ids: list[int],
    *,
    cut: bool,
    max_tokens: int | None = None,
    stop_string: str | None = None,
    said: str | None = "stop",
    done: str = "stop",
    skip: bool = True,
) -> str | None:
    """What the gateway holds against a node that streamed these token events for a request of one sequence
    (max_tokens: len(ids) unless given), as ServedRequest relays them and then checks them: None when nothing.
    `cut`: the request ended before the node's finish (aborted, the stream broken), else with it, which names
    `stop_string` as the one that ended the sequence, and `said` as the sequence's finish reason (None: the node
    sent no finish event for it, only the request's end, whose reason is `done`)."""
    t = base.templates
    max_tokens = max(max_tokens or len(ids), 1)
    req = CompletionRequest(
        model="m",
        prompt=[1],
        max_tokens=max_tokens,
        stop=stops or None,
        stop_token_ids=stop_ids or None,
        skip_special_tokens=None if skip else False,
    )
    c = Choices(
        chat=False,
        prompts=[[1]],
        per_prompt=1,
        n=1,
        max_tokens=req.max_tokens,
        token_chars=t.token_chars(base.bid),
        eos_ids=t.end_ids(base.bid),
        stop_ids=frozenset(stop_ids),
        stops=tuple(stops),
    )
    c.names_stops = True  # a node of this release: it names the stop string that ended a sequence
    for tid, text in zip(ids, texts):
        ev = {"type": "token", "index": 0, "token_id": tid, "text": text}
        # the relay's own checks: an honest node's events are all taken
        assert not c.full(0) and not c.too_long(0, ev), f"{base.name}: the relay refused {ev} after {c.seqs[0]}"
        c.take_token(0, ev)
    if not cut and said is not None:
        c.take_finish(0, {"type": "finish", "index": 0, "finish_reason": said, "stop_string": stop_string})
    # _misreported reads these of the request being served
    served = SimpleNamespace(
        d=SimpleNamespace(templates=t),
        target=SimpleNamespace(base_model_id=base.bid),
        choices=c,
        req=req,
        done=None if cut else {"type": "done", "finish_reason": done},
        aborted=cut,
        failure=None,
    )
    return asyncio.run(ServedRequest._misreported(served))


def relay(
    base: Base, ids: list[int], stops: list[str], stop_ids: list[int], cut: int | None, skip: bool = True
) -> str | None:
    """An honest node generates `ids` (up to where it ends the sequence); the request is cut after `cut` token
    events (None: it is not). What the gateway holds against the node. `skip`: skip_special_tokens."""
    texts, stopped, reason = honest_run(base.tok, ids, stops, stop_ids, skip)
    n = len(texts) if cut is None else min(cut, len(texts))
    return disputed(
        base,
        ids[:n],
        texts[:n],
        stops,
        stop_ids,
        cut=cut is not None,
        max_tokens=len(ids),
        stop_string=stopped,
        said=reason,
        skip=skip,
    )


@st.composite
def requests(draw, base: Base):
    """Generated ids (special ones more often than their share), the request's stop strings and stop token ids,
    and the number of token events relayed before the request is cut (None: not cut)."""
    ids = draw(st.lists(st.integers(0, base.size - 1) | st.sampled_from(base.special), max_size=60))
    text = base.tok.decode(ids, skip_special_tokens=True)
    # stop strings mostly from the text itself, so that they are hit, held back as a possible start, or found
    # across tokens; sometimes text that never occurs
    pieces = st.tuples(st.integers(0, len(text) - 1), st.integers(1, 6)).map(lambda p: text[p[0] : p[0] + p[1]])
    stops = draw(st.lists((pieces if text else st.nothing()) | st.text(min_size=1, max_size=4), max_size=3))
    # stop token ids: often one of the ids, so that it ends the sequence (with its text unsent)
    one_of_ids = st.sampled_from(ids) if ids else st.nothing()
    stop_ids = draw(st.lists(one_of_ids | st.integers(0, base.size - 1), max_size=2, unique=True))
    # a cut at len(ids) or past the sequence's end: the stream broke after its last token, before its finish
    cut = draw(st.none() | st.integers(0, len(ids)))
    return ids, stops, stop_ids, cut


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_an_honest_node_is_never_disputed(bases, name, data):
    base = bases[name]
    ids, stops, stop_ids, cut = data.draw(requests(base))
    assert relay(base, ids, stops, stop_ids, cut) is None


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_an_honest_node_showing_special_tokens_is_never_disputed(bases, name, data):
    """skip_special_tokens false: the special tokens' text is sent, the end token's is not (vLLM's); the gateway's
    check decodes as the node did."""
    base = bases[name]
    ids, stops, stop_ids, cut = data.draw(requests(base))
    assert relay(base, ids, stops, stop_ids, cut, skip=False) is None
    texts = honest_texts_shown(base, ids, stop_ids)
    if texts is not None:  # padding: the special tokens' text left out, as if skipped, is disputed
        short = [base.tok.decode([i], skip_special_tokens=True) for i in ids[: len(texts)]]
        if sum(map(len, short)) < sum(map(len, texts)):
            assert disputed(base, ids[: len(texts)], short, [], stop_ids, cut=False, skip=False) is not None


def honest_texts_shown(base: Base, ids: list[int], stop_ids: list[int]) -> list[str] | None:
    """An honest node's texts with special tokens shown and no stop strings, when every token's text stands on its own
    (None: a character spans tokens, and a token-by-token decode would not be the node's text)."""
    texts = honest_run(base.tok, ids, [], stop_ids, skip=False)[0]
    whole = base.tok.decode([i for i in ids[: len(texts)] if i != EOS], skip_special_tokens=False)
    alone = "".join(base.tok.decode([i], skip_special_tokens=False) for i in ids[: len(texts)] if i != EOS)
    return texts if whole == alone == "".join(texts) else None


def _lone_byte(base: Base) -> int:
    """The token of the byte 0xFF, never part of UTF-8 ("<0xFF>"; "ÿ" in GPT-2's byte alphabet)."""
    vocab = base.tok.get_vocab()
    return vocab["<0xFF>"] if "<0xFF>" in vocab else vocab["ÿ"]


@pytest.mark.parametrize("name", NAMES)
def test_held_half_characters_let_go_on_the_end_token_may_complete_a_stop_string(bases, name):
    """Seven tokens of half a character each, held, then the end token: the engine lets the held run go on its
    eighth token (MAX_HELD_TOKENS), and the text it lets go completes the stop string "\ufffd" on the end token; it
    ends the sequence there and names the string. That honest node was disputed ("named no stop string"), and a
    client forces it with min_tokens and logit_bias (review); the string is taken, and held to the tokens."""
    base = bases[name]
    ids, stops = [_lone_byte(base)] * 7 + [EOS], ["\ufffd"]
    texts, stopped, reason = honest_run(base.tok, ids, stops, [])
    assert (len(texts), stopped, reason) == (8, "\ufffd", "stop")
    assert disputed(base, ids, texts, stops, [], cut=False, stop_string=stopped) is None
    assert disputed(base, ids, texts, stops, [], cut=False)  # naming none, as the node did before, is disputed
    if name == "byte_level":  # a plain stop string: a token of several characters, its last one half
        h = _held_token(base)
        plain = base.tok.decode([h]).rstrip("\ufffd")
        ids, stops = [h] * 7 + [EOS], [plain]
        texts, stopped, reason = honest_run(base.tok, ids, stops, [])
        assert (stopped, reason) == (plain, "stop")
        assert disputed(base, ids, texts, stops, [], cut=False, stop_string=stopped) is None


def _held_token(base: Base) -> int:
    """The token with the most text that ends inside a character (byte-level BPE learns such merges)."""
    tok = base.tok
    held = [i for i in range(base.size) if i not in base.special and tok.decode([i]).endswith("\ufffd")]
    return max(held, key=lambda i: len(tok.decode([i])))


# Runs an honest node holds back, then drops (a cut prevents its flush, a stop string found at the run's start
# drops it all): lone bytes (0xFF, never part of UTF-8), and a byte-level token with several characters that
# ends inside one, repeated. A fixed allowance (the longest stop string plus two tokens' text) disputed each of
# them; the node now holds at most MAX_HELD_TOKENS of a run back before it sends it as U+FFFD.
HELD = [
    *(("lone bytes, cut", name) for name in NAMES),
    ("held run, cut", "byte_level"),
    ("held run, stop", "byte_level"),
]


@pytest.mark.parametrize("case,name", HELD)
def test_a_held_back_run_an_honest_node_drops_is_not_disputed(bases, case, name):
    base = bases[name]
    tok, token_chars = base.tok, base.templates.token_chars(base.bid)
    if case == "lone bytes, cut":
        # each decodes to U+FFFD and never completes: nothing is sent until a flush, which a cut prevents (one
        # more token generated and never relayed)
        run = [_lone_byte(base)] * (2 * token_chars + 1)
        ids, stops, cut = run + run[:1], [], len(run)
    else:
        held = _held_token(base)
        text = tok.decode([held])
        per = len(tok.decode([held, held])) - len(text)  # the characters each repeat adds
        assert per >= 4, f"{tok.convert_ids_to_tokens(held)!r} holds too little text to make the case"
        run = [held] * (2 * token_chars // per + 1)
        if case == "held run, cut":
            ids, stops, cut = run + run[:1], [], len(run)
        else:  # a letter completes the text, which starts with the stop string: all of it is dropped, not cut
            ids, stops, cut = run + tok.encode("a", add_special_tokens=False), [text.strip()[:2]], None
    texts = honest_texts(tok, ids, stops, [])
    n = len(texts) if cut is None else cut
    decoded = tok.decode(ids[:n], skip_special_tokens=True)
    # the case is what it says: the node sent less than the ids decode to
    assert len(decoded) > len("".join(texts[:n]))
    assert relay(base, ids, stops, [], cut) is None


PADDED = "The quick brown fox jumps over the lazy dog, twice. 日本語のテキストです。 Hello, world! 🙂 ok. " * 2


@pytest.mark.parametrize("name", NAMES)
def test_a_node_that_pads_is_disputed(bases, name):
    """Token ids sent without their text (padding a bill) are disputed, the request cut or not, and so is a
    sequence with part of its text left out; the same ids with an honest node's text are not."""
    base, stops = bases[name], ["END"]
    ids = base.tok.encode(PADDED, add_special_tokens=False)
    honest = honest_texts(base.tok, ids, stops, [])
    assert len(honest) == len(ids) and disputed(base, ids, honest, stops, [], cut=False) is None
    half = len(ids) // 2
    assert disputed(base, ids, [""] * len(ids), stops, [], cut=False)
    assert disputed(base, ids[:half], [""] * half, stops, [], cut=True)
    # every other token's text left out
    gaps = [t if i % 2 else "" for i, t in enumerate(honest)]
    assert disputed(base, ids, gaps, stops, [], cut=False)
    # one token's text left out: its first with text
    first = next(i for i, t in enumerate(honest) if t)
    assert disputed(base, ids, honest[:first] + [""] + honest[first + 1 :], stops, [], cut=False)
    # honest text at first, then padding, and the stream broken before the finish: a cut excuses only text an
    # honest node still holds back, and plain text is sent with its token
    assert disputed(base, ids, honest[:half] + [""] * (len(ids) - half), stops, [], cut=True)


@pytest.mark.parametrize("name", NAMES)
def test_a_node_naming_a_stop_string_its_tokens_do_not_end_on_is_disputed(bases, name):
    """The stop string a node names in its finish event reaches the client (vLLM's stop_reason; the end of a
    LoRAX answer's text): it must be the one its tokens complete, not another of the request's, and none where
    no stop string ended them."""
    base = bases[name]
    ids = base.tok.encode(PADDED, add_special_tokens=False)
    stops = ["lazy", "world"]  # "lazy" comes first in the text
    texts, stopped, _ = honest_run(base.tok, ids, stops, [])
    n = len(texts)
    assert stopped == "lazy" and n < len(ids)
    assert disputed(base, ids[:n], texts, stops, [], cut=False, stop_string="lazy") is None
    assert disputed(base, ids[:n], texts, stops, [], cut=False, stop_string="world")
    assert disputed(base, ids[:n], texts, stops, [], cut=False)  # naming none: none met, it said
    # its length said to have ended it, or no finish event at all: none met, it said (red team: not disputed, the
    # client told "length" and given the text without the stop string it asked to keep)
    assert disputed(base, ids[:n], texts, stops, [], cut=False, said="length")
    assert disputed(base, ids[:n], texts, stops, [], cut=False, said=None)
    assert disputed(base, ids[:n], texts, stops, [], cut=False, said=None, done="abort")  # its own abort (review)
    assert disputed(base, ids[:n], texts, stops, [], cut=False, said="length", max_tokens=n)  # at max_tokens too
    # named where no token completed it: a sequence of none (the name not taken: red team, a LoRAX answer with
    # details was a 500), or one its end token ended
    assert disputed(base, [], [], stops, [], cut=False, stop_string="lazy", max_tokens=8)
    eos = min(t for t in base.templates.end_ids(base.bid))
    assert disputed(base, [*ids[: n - 1], eos], [*texts[: n - 1], ""], stops, [], cut=False, stop_string="lazy")
    # a sequence no stop string ended: naming one is disputed, naming none is not
    stops = ["END", "QQQ"]
    whole, stopped, _ = honest_run(base.tok, ids, stops, [])
    assert stopped is None and len(whole) == len(ids)
    assert disputed(base, ids, whole, stops, [], cut=False) is None
    assert disputed(base, ids, whole, stops, [], cut=False, stop_string="END")
    assert disputed(base, ids, whole, stops, [], cut=False, said="length") is None
    assert disputed(base, ids, whole, stops, [], cut=False, said=None) is None


def test_a_prompt_to_be_cut_is_tokenized_whole_up_to_a_bound(bases):
    """truncate_prompt_tokens: a prompt to be cut to its last tokens is tokenized whole, as vLLM cuts it (its end
    alone gave other last ids wherever BPE merges run across the cut: "\n" x 3,001 on a byte-level BPE, red team;
    "ab" x 109 on a BPE that merges "ab" and "abc", review). A text too long to be a prompt uncut is still tokenized
    up to MAX_CUT_CHARS characters (about a second of a worker thread), and refused past it, never cut otherwise."""
    from gateway.chat import MAX_CUT_CHARS
    from gateway.errors import BadRequest

    base = bases["byte_level"]
    t = base.templates
    context = t.context[base.bid]
    longest = t.token_texts[base.bid].longest
    beyond = context * longest  # no prompt uncut this long fits the context
    with pytest.raises(BadRequest, match="context"):
        t.check_length(base.bid, beyond)
    t.check_cut(base.bid, [max(beyond, MAX_CUT_CHARS)])  # tokenized whole, then cut
    with pytest.raises(BadRequest, match="a prompt cut to its last tokens is tokenized whole") as e:
        t.check_cut(base.bid, [max(beyond, MAX_CUT_CHARS) + 1], param="messages")
    assert e.value.param == "messages"
    # the bound is the request's: prompts each under it, past it in all (4 of 1 MiB held a thread 5 s: re-attack)
    assert beyond < MAX_CUT_CHARS // 2  # the tiny context's
    t.check_cut(base.bid, [MAX_CUT_CHARS // 2] * 2 + [beyond - longest])  # what may fit uncut is not counted
    with pytest.raises(BadRequest, match="a prompt cut to its last tokens is tokenized whole"):
        t.check_cut(base.bid, [MAX_CUT_CHARS // 2] * 2 + [beyond])


def _repeats_bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE that has learnt merges of "ab" and "abc" repeated (as released ones learn "hahaha", hex and
    base64 runs): a run of them is tokenized from where it begins."""
    return _byte_level(tuple(unit * n for unit in ("ab", "abc") for n in range(2, 30)), vocab_size=800)


@pytest.mark.integration
@pytest.mark.parametrize("api", ["openai", "lorax"])
@pytest.mark.parametrize("case", ["newlines", "repeats"])
def test_the_node_is_sent_the_whole_texts_last_ids(tmp_path, api, case):
    """End to end: a completion prompt cut to its last tokens (truncate_prompt_tokens; LoRAX's truncate) sends the
    node the whole text's last ids, billed as sent. Its end alone tokenized gave others: "Q" + 3,001 newlines on a
    byte-level BPE, cut to 2 ([386, 386] for [386, 201]: red team), and "Q" + "abc" x 90 on one that merges "abc"
    runs, cut to 1 (where the end one character longer agreed: review)."""
    from transformers import AutoTokenizer

    from common.identity import Identity
    from node.adapters.basemodel import base_model_id
    from tests.utils.gateway import StandInNode, record_of, served_gateway

    made, text, keep = (
        (_byte_level(), "Q" + "\n" * 3001, 2) if case == "newlines" else (_repeats_bpe(), "Q" + "abc" * 90, 1)
    )
    base = _base_folder(made, tmp_path / "bl", "bl")
    tok = AutoTokenizer.from_pretrained(str(base))
    expected = tok.encode(text)[-keep:]
    node = StandInNode(Identity.generate(), base_model_id(base), base_model_name="bl", tokens=1)
    with served_gateway(node, tmp_path / "gw", base) as (gw, engine, key, _, _):
        if api == "openai":
            body, path = (
                {"model": "bl", "prompt": text, "max_tokens": 1, "truncate_prompt_tokens": keep},
                "/v1/completions",
            )
        else:
            body, path = {"inputs": text, "parameters": {"max_new_tokens": 1, "truncate": keep}}, "/generate"
        r = httpx.post(gw.url + path, headers={"Authorization": f"Bearer {key}"}, json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert node.requests[-1]["prompt_token_ids"] == expected
        _, u = record_of(engine, r.headers["x-request-id"])
        assert u.prompt_tokens == keep


def test_a_character_the_tokenizer_cannot_encode_is_a_400(bases):
    """A Unigram model without an unknown token raises a bare Exception for a character it has no piece for: a
    prompt of one was a 500 (red team); it is a 400 naming the field, and so is such a bad word."""
    from gateway.errors import BadRequest

    base = bases["metaspace_unigram"]
    t = base.templates
    with pytest.raises(BadRequest, match="cannot encode the prompt") as e:
        t.encode(base.bid, "1234 ")
    assert e.value.param == "prompt"
    with pytest.raises(BadRequest, match="cannot encode the bad_words"):
        t.bad_words(base.bid, ["1234"])
