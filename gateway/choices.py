"""The choices of one OpenAI request, gathered from the node's stream: one sequence per (prompt, sample), index
`p * per_prompt + j` (OpenAI's and vLLM's order), each with its text, its tokens' log-probabilities when asked,
and its finish reason; then the answer in OpenAI's shapes, whole or as chunks.

- `n` choices per prompt; with `best_of`, the node makes best_of sequences per prompt and the n with the highest
  sum of log-probabilities are returned (renumbered p * n + j), as OpenAI and vLLM choose them.
- `echo` (completions): the prompt's text before each choice's text, and with logprobs the prompt's positions
  first (the first one unscored), from the node's prompt_logprobs. With max_tokens 0 (`shown` False) the prompt
  alone: the token the node makes is counted (billed) but not shown, and the choice ends at "length".
- vLLM's `prompt_logprobs` (a whole answer): each prompt's positions scored in vLLM's shape, in each of its
  completion choices, or once in a chat's answer.
- chat tools: each choice's text is read back into content and `tool_calls` (gateway.tools), its finish reason
  "tool_calls" when it called one.
- a sequence ends at its end token (the base's EOS ids unless ignore_eos, and the request's stop token ids), as
  the node ends it: a token the node streams after it is past the sequence's end, like one past max_tokens.
- vLLM's `stop_reason`: the stop token id that ended a sequence (as the gateway relayed it; an EOS id is None,
  as vLLM has it), or the stop string the node names in its finish event, taken only where it is one of the
  request's (the end of the request holds the node to it: gateway.request.ServedRequest._misreported)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.wire import MAX_LOGPROBS
from gateway.chat import MAX_TOKEN_CHARS
from gateway.logprobs import CompletionLogprobs, Scored, TokenTexts, chat_entry, prompt_entry, read_prompt, read_token
from gateway.openai_api import COMPLETION_LOGPROBS, ChunkBuilder, chat_message, finish_reason
from gateway.tools import ToolPlan, ToolStream


@dataclass(slots=True)
class Sequence:
    prompt: int  # which prompt it continues
    texts: list[str] = field(default_factory=list)  # one per token event relayed
    ids: list[int] = field(default_factory=list)  # their token ids (-1: the node sent none that is a number)
    chars: int = 0  # the characters in texts
    scored: list[Scored] = field(default_factory=list)  # one per token, when logprobs are asked
    reason: str | None = None  # the node's finish reason for it ("stop" | "length")
    ended: bool = False  # its end token (EOS, a stop token id) was relayed: nothing may follow it
    stop_reason: str | int | None = None  # the stop token id or stop string that ended it (vLLM's)
    named: str | None = None  # the stop string the node's finish event named, taken or not (held to its tokens)
    # streaming state
    opened: bool = False  # its first chunk (the chat role, the echoed prompt) was sent
    closed: bool = False  # its finish chunk was sent
    tools: ToolStream | None = None
    logprobs: CompletionLogprobs | None = None

    @property
    def count(self) -> int:
        return len(self.texts)

    def score(self) -> float:
        return sum(s.logprob for s in self.scored if s.logprob is not None)


class Choices:
    """Sequences as the node streams them. `take_*` read node events (False/None: the event is not one this
    request can have); the rest builds the answer."""

    def __init__(
        self,
        *,
        chat: bool,
        prompts: list[list[int]],
        per_prompt: int,
        n: int,
        max_tokens: int,
        logprobs: bool = False,
        echo: bool = False,
        shown: bool = True,
        prompt_texts: list[str] | None = None,
        texts: TokenTexts | None = None,
        plan: ToolPlan | None = None,
        token_chars: int = MAX_TOKEN_CHARS,
        eos_ids: frozenset[int] = frozenset(),
        stop_ids: frozenset[int] = frozenset(),
        stops: tuple[str, ...] = (),
        keep_stop: bool = False,
        ids_as_tokens: bool = False,
        echo_top: int = MAX_LOGPROBS,
        prompt_top: int | None = None,
    ) -> None:
        """`eos_ids`: the base's end tokens (none with ignore_eos); `stop_ids`, `stops`: the request's stop token
        ids and stop strings; `keep_stop`: the stop string that ended a choice ends its text (vLLM's
        include_stop_str_in_output); `ids_as_tokens`: the logprobs' tokens named by their ids (vLLM's
        return_tokens_as_token_ids); `echo_top`: the alternatives an echoed prompt's positions list (the
        request's logprobs); `prompt_top`: vLLM's prompt_logprobs, answered (None: not asked). The node scores
        the prompts once, with the larger of the two: each is cut to its own here."""
        self.chat, self.prompts, self.per_prompt, self.n = chat, prompts, per_prompt, n
        self.max_tokens, self.logprobs, self.echo, self.shown = max_tokens, logprobs, echo, shown
        self.prompt_texts, self.texts, self.plan = prompt_texts, texts, plan
        self.token_chars = token_chars  # the most characters a token's text may hold, on average over a sequence
        self.eos_ids, self.stop_ids, self.stops, self.keep_stop = eos_ids, stop_ids, stops, keep_stop
        # a constrained tool choice's answer is its calls' JSON: no stop string is added to it
        if plan is not None and plan.choice in ("required", "function"):
            self.keep_stop = False
        self.ids_as_tokens = ids_as_tokens
        self.echo_top, self.prompt_top = echo_top, prompt_top
        # the node names the stop string that ended a sequence (its release lists STOP_STRING_FEATURE): none named
        # is none met. Set once the node is chosen; an older node's are read back from its tokens (stop_text)
        self.names_stops = False
        self.end_ids = eos_ids | stop_ids
        # best_of ranks its sequences by their log-probabilities, shown or not
        self.scores = logprobs or per_prompt != n
        self.seqs = [Sequence(k // per_prompt) for k in range(len(prompts) * per_prompt)]
        self.prompt_scored: list[list[Scored] | None] = [None] * len(prompts)

    def repeated_positions(self) -> int:
        """The prompt positions the answer repeats: each completion choice echoes its prompt, and lists its
        positions' scores (prompt_logprobs); a chat lists them once. A prompt_logprobs position counts as
        prompt_weight() echoed ones."""
        total = sum(map(len, self.prompts))
        scored = self.prompt_weight() if self.prompt_top is not None else 0
        if self.chat:
            return total * scored
        return self.n * total * (self.echo + scored)

    def prompt_weight(self) -> int:
        """The echoed positions a prompt_logprobs position counts as: its entries (k + 1) over an echoed position's
        most (COMPLETION_LOGPROBS + 1), rounded up. Counted as one, k = 20 made answers 10 times the bound's echo
        (46 MB) and held the gateway's loop 2 s (review)."""
        return -(-((self.prompt_top or 0) + 1) // (COMPLETION_LOGPROBS + 1))

    # ------------------------------------------------------------------ the node's events

    def index_of(self, ev: dict) -> int | None:
        """The sequence a token or finish event names (an event without index is sequence 0, as a node of one
        sequence sends it); None when the request has no such sequence."""
        k = ev.get("index", 0)
        ok = isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(self.seqs)
        return k if ok else None

    def full(self, k: int) -> bool:
        """Sequence k has all the tokens it may have (or has finished, or relayed its end token): another is past
        the request's limit."""
        s = self.seqs[k]
        return s.count >= self.max_tokens or s.reason is not None or s.ended

    def too_long(self, k: int, ev: dict) -> bool:
        """Whether the token event's text would make sequence k's text longer than its tokens can hold. Counted
        over the sequence, not per token: a node holds back a character's first bytes, or text that may start
        a stop string, and sends it with a later token."""
        text = ev.get("text")
        s = self.seqs[k]
        return isinstance(text, str) and s.chars + len(text) > (s.count + 1) * self.token_chars

    def take_token(self, k: int, ev: dict) -> tuple[str, Scored | None]:
        """Relay one token of sequence k (not full, not too long): its text and, when asked, its position."""
        text = ev.get("text")
        text = text if isinstance(text, str) else ""
        s = self.seqs[k]
        s.texts.append(text)
        s.chars += len(text)
        tid = ev.get("token_id")
        tid = tid if type(tid) is int else -1  # (a hostile id may be anything: a list is unhashable)
        s.ids.append(tid)
        s.ended = tid in self.end_ids
        if tid in self.stop_ids and tid not in self.eos_ids:
            s.stop_reason = tid
        scored = read_token(ev) if self.scores else None
        if scored is not None:
            s.scored.append(scored)
        return text, scored if self.logprobs else None

    def take_finish(self, k: int, ev: dict) -> bool:
        """Sequence k ended; False when it had ended already."""
        s = self.seqs[k]
        if s.reason is not None:
            return False
        reason = ev.get("finish_reason")
        s.reason = reason if reason in ("stop", "length") else "stop"
        claim = ev.get("stop_string")
        s.named = claim if isinstance(claim, str) else None
        # taken where a token may have completed it: not where a stop token id ended the sequence (its text is not
        # read) nor where there is no token (its last token's text would end with it). Its end token can: the
        # engine reads that token's text too, and it lets go of held half characters that may complete one (review:
        # a client that forced that had an honest node disputed). What it names is held to its tokens (_misreported)
        if s.reason == "stop" and s.stop_reason is None and s.count and isinstance(claim, str) and claim in self.stops:
            s.stop_reason = claim
        return True

    def take_prompt(self, ev: dict) -> bool:
        """A prompt_logprobs event; False when it names no prompt of this request or came twice."""
        p = ev.get("prompt_index", 0)
        if not (isinstance(p, int) and not isinstance(p, bool) and 0 <= p < len(self.prompts)):
            return False
        if self.prompt_scored[p] is not None:
            return False
        self.prompt_scored[p] = read_prompt(self.prompts[p], ev.get("entries")) or []
        return True

    def unsent(self) -> int:
        """Tokens relayed whose text never went out: what each sequence's tool stream still holds back (a block
        not yet decided, whitespace no text has followed yet) where the stream ended without its close, the
        client gone. Counted back from each sequence's end; a token whose text went out in part went out. None
        when logprobs are shown: each token's logprobs entry (its text and bytes) went out as it came (re-attack: a
        client read the held text so, and paid nothing for it)."""
        n = 0
        for s in self.seqs if not self.logprobs else ():
            held = s.tools.held_chars() if s.tools is not None and not s.closed else 0
            for text in reversed(s.texts if held else ()):
                if len(text) > held:
                    break
                held -= len(text)
                n += 1
        return n

    @property
    def relayed(self) -> int:
        """Tokens relayed in all sequences: the completion tokens billed."""
        return sum(s.count for s in self.seqs)

    def reason(self, k: int, overall: str | None, cut: bool) -> str:
        """Sequence k's OpenAI finish reason: its own, else (a node that sends no finish events) the request's;
        "stop" after its end token; "length" where the gateway stopped relaying (`cut`)."""
        s = self.seqs[k]
        if not self.shown:  # the prompt alone: cut at max_tokens 0, whatever ended the token not shown
            return "length"
        r = s.reason or ("stop" if s.ended else "length" if cut or s.count >= self.max_tokens else overall)
        return finish_reason(r)

    def stop_text(self, k: int, reason: str) -> str:
        """The stop string that ended sequence k, whose OpenAI finish reason is `reason` ("": none did): the one
        the node named (take_finish), else, from a node of an older release that names none, read back from its
        tokens. The node relays the text before the stop string it met (node.adapters.detokenizer.TextStream, the
        first asked that the text holds), so the decoding of its tokens goes on past the relayed text with it. A
        blocking decode of at most max_tokens ids (the base's token texts loaded: needs_token_texts)."""
        s = self.seqs[k]
        if reason != "stop" or not self.stops:
            return ""
        if isinstance(s.stop_reason, str):
            return s.stop_reason
        if s.ended or self.names_stops or self.texts is None:
            return ""
        relayed = "".join(s.texts)
        decoded = self.texts.tok.decode([i for i in s.ids if 0 <= i < self.texts.size], skip_special_tokens=True)
        if not decoded.startswith(relayed):  # not what an honest node relays for these ids: nothing to read back
            return ""
        rest = decoded[len(relayed) :]
        return next((stop for stop in self.stops if rest.startswith(stop)), "")

    def stop_reason(self, k: int, reason: str) -> str | int | None:
        """Sequence k's vLLM stop_reason, its OpenAI finish reason being `reason`: None unless a stop token id or
        stop string ended it (the prompt alone, echoed with max_tokens 0, ended at "length")."""
        return self.seqs[k].stop_reason if self.shown and reason == "stop" else None

    # ------------------------------------------------------------------ the whole answer

    def picked(self) -> list[int]:
        """The sequences returned, in choice order: all of them, or best_of's n best per prompt."""
        if self.per_prompt == self.n:
            return list(range(len(self.seqs)))
        out = []
        for p in range(len(self.prompts)):
            mine = range(p * self.per_prompt, (p + 1) * self.per_prompt)
            out += sorted(sorted(mine, key=lambda k: -self.seqs[k].score())[: self.n])
        return out

    def _echo_text(self, p: int) -> str:
        return self.prompt_texts[p] if self.echo and self.prompt_texts else ""

    def _completion_logprobs(self, k: int) -> CompletionLogprobs:
        s = self.seqs[k]
        lp = CompletionLogprobs(self.texts, named=self.ids_as_tokens)
        if self.echo:
            for pos in self.prompt_scored[s.prompt] or ():
                lp.add(pos.most_likely(self.echo_top), 0 if pos.token_id in self.texts.special else None)
            lp.offset = len(self._echo_text(s.prompt))
        for pos, text in zip(s.scored, s.texts, strict=False) if self.shown else ():
            lp.add(pos, len(text))
        return lp

    def _chat_logprobs(self, k: int) -> dict:
        return {
            "content": [chat_entry(self.texts, pos, named=self.ids_as_tokens) for pos in self.seqs[k].scored],
            "refusal": None,
        }

    def prompt_logprobs(self, p: int) -> list[dict | None] | None:
        """Prompt p's positions in vLLM's prompt_logprobs shape, None where not asked; where the node sent no
        scores for it (or none that describe it), each position is null."""
        if self.prompt_top is None:
            return None
        scored = self.prompt_scored[p] or [Scored(tid, None) for tid in self.prompts[p]]
        return [prompt_entry(self.texts, pos.most_likely(self.prompt_top)) for pos in scored]

    def answer(self, overall: str | None, cut: bool) -> list[dict]:
        """The choices of a whole (non-streamed) answer."""
        out, scored = [], {}  # each prompt's prompt_logprobs built once, shared by its choices
        for i, k in enumerate(self.picked()):
            s = self.seqs[k]
            text, reason = "".join(s.texts) if self.shown else "", self.reason(k, overall, cut)
            ended = reason  # (a call's finish reason says it called, not how the text ended)
            if self.keep_stop and self.shown:
                text += self.stop_text(k, reason)
            if self.chat:
                content, calls = self.plan.answer(text) if self.plan is not None else (text, [])
                if calls:
                    reason = self.plan.called_reason(reason)
                choice = {"index": i, "message": chat_message(content, calls)}
                choice["logprobs"] = self._chat_logprobs(k) if self.logprobs else None
            else:
                choice = {"index": i, "text": self._echo_text(s.prompt) + text}
                choice["logprobs"] = self._completion_logprobs(k).obj() if self.logprobs else None
            choice |= {"finish_reason": reason, "stop_reason": self.stop_reason(k, ended)}
            if not self.chat and self.prompt_top is not None:
                if s.prompt not in scored:
                    scored[s.prompt] = self.prompt_logprobs(s.prompt)
                choice["prompt_logprobs"] = scored[s.prompt]
            out.append(choice)
        return out

    # ------------------------------------------------------------------ streamed (no best_of: all are returned)

    def _open(self, b: ChunkBuilder, k: int) -> bytes:
        """Sequence k's first chunk: the chat role, or the echoed prompt (with its positions' logprobs)."""
        s = self.seqs[k]
        if s.opened:
            return b""
        s.opened = True
        if self.chat:
            s.tools = self.plan.stream() if self.plan is not None else None
            return b.role(k)
        if self.logprobs:
            s.logprobs = CompletionLogprobs(self.texts, named=self.ids_as_tokens)
        if not self.echo:
            return b""
        lp = None
        if self.logprobs:
            for pos in self.prompt_scored[s.prompt] or ():
                s.logprobs.add(pos.most_likely(self.echo_top), 0 if pos.token_id in self.texts.special else None)
            lp = s.logprobs.obj()
            s.logprobs = CompletionLogprobs(self.texts, len(self._echo_text(s.prompt)), named=self.ids_as_tokens)
        return b.token(self._echo_text(s.prompt), k, lp)

    def open_all(self, b: ChunkBuilder) -> bytes:
        """Every sequence's first chunk (sent before any token, as vLLM sends the roles). An echoed prompt with
        logprobs waits instead for its first token or its end (chunk and close open it): its positions' scores
        come in the node's first events, which are not read yet when the stream opens."""
        if self.echo and self.logprobs and not self.chat:
            return b""
        return b"".join(self._open(b, k) for k in range(len(self.seqs)))

    def chunk(self, b: ChunkBuilder, k: int, text: str, scored: Scored | None) -> bytes:
        """The chunks for one relayed token of sequence k: none for a token without text (EOS, a stop token)
        unless its logprobs were asked."""
        opening, lp = self._open(b, k), None  # opening a completion's sequence starts its logprobs (echo first)
        if not self.shown:
            return opening
        if scored is not None and self.chat:
            lp = {"content": [chat_entry(self.texts, scored, named=self.ids_as_tokens)]}
        elif scored is not None:
            lp = self.seqs[k].logprobs.add(scored, len(text))
        return opening + self._chunk(b, k, text, lp)

    def replay(self, b: ChunkBuilder, overall: str | None, cut: bool) -> None:
        """A whole chat answer through a stream builder: each sequence's text as one chunk (with all its positions'
        logprobs), then its end. A Responses answer is built so (ResponseEvents): whole or streamed, the same
        items (a "required" answer cut short keeps the calls it finished as calls)."""
        for k in self.picked():
            self._open(b, k)
            self._chunk(b, k, "".join(self.seqs[k].texts), self._chat_logprobs(k) if self.logprobs else None)
            self.close(b, k, overall, cut)

    def _chunk(self, b: ChunkBuilder, k: int, text: str, lp: dict | None) -> bytes:
        s, out = self.seqs[k], self._open(b, k)
        if self.chat and s.tools is not None:
            deltas = s.tools.push(text)
            if not deltas:
                return out + (b.delta({}, k, lp) if lp is not None else b"")
            chunks = [b.delta(d, k, lp if i == len(deltas) - 1 else None) for i, d in enumerate(deltas)]
            return out + b"".join(chunks)
        if not text and lp is None:
            return out
        return out + b.token(text, k, lp)

    def close(self, b: ChunkBuilder, k: int, overall: str | None, cut: bool) -> bytes:
        """Sequence k's last chunks: what its tool stream held back, and its finish reason (once)."""
        s = self.seqs[k]
        if s.closed:
            return b""
        out = self._open(b, k)
        s.closed = True
        reason = ended = self.reason(k, overall, cut)
        if self.keep_stop and self.shown and (stop := self.stop_text(k, ended)):
            out += self._chunk(b, k, stop, None)
        if s.tools is not None:
            out += b"".join(b.delta(d, k) for d in s.tools.close())
            if s.tools.called:
                reason = self.plan.called_reason(reason)
        return out + b.finish(reason, k, cut=ended == "length", stop_reason=self.stop_reason(k, ended))

    def release_held(self, b: ChunkBuilder) -> bytes:
        """Every sequence's held-back tool text as content chunks: the stream failed before its end, and what
        was relayed (and is billed) must reach the client."""
        out = b""
        for k, s in enumerate(self.seqs):
            if s.tools is not None and not s.closed:
                out += b"".join(b.delta(d, k) for d in s.tools.release())
        return out

    def close_all(self, b: ChunkBuilder, overall: str | None, cut: bool) -> bytes:
        return b"".join(self.close(b, k, overall, cut) for k in range(len(self.seqs)))
