"""Speculative decoding with n-gram (prompt lookup) drafts: each decoding row proposes the tokens that followed the
last earlier occurrence of its newest n tokens in its own prompt + output; the step's one forward pass scores the
row's newest token and its draft together (each row under its own adapter), and `verify` keeps what the target
would have produced itself.

Semantics of `verify`, per row with draft d_1..d_k and target distributions p_0..p_k (p_j: the distribution plain
decoding draws from after the row's tokens plus d_1..d_j, after all its logits processing: bias, min_tokens,
penalties over that history, temperature, top_k/top_p/min_p):
  greedy (temperature 0): accept d_j while d_j == argmax p_{j-1}; then emit argmax p_a at the first mismatch (or
    after all k): exactly the tokens plain greedy decoding emits, 1..k+1 of them.
  sampled: accept d_j with probability p_{j-1}(d_j); on the first rejection draw from p_{j-1} with d_j removed and
    renormalised, and stop; after k acceptances draw one more from p_k. For a one-hot draft this is standard
    speculative rejection sampling, so each emitted token has exactly plain sampling's distribution.
Rows with a grammar never draft (the matcher would have to advance through and roll back every drafted token)."""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import torch

from node.engine.layers.logits_processor import process_logits
from node.engine.layers.logprobs import RawLogprobs
from node.engine.layers.sampler import only_eos_when_dead, target_probs
from node.engine.sequence import Sequence

MAX_HITS = 8  # occurrences of one n-gram looked at for a draft of full length


def propose(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens, for n from n_max down
    to n_min (longer matches first: they predict better); [] when none occurs. A recent occurrence too close to the
    end to be followed by k tokens (inside a loop: "a b a b" is followed by one "a b" only) gives way to an earlier
    one that is (the loop's next k tokens), among the last MAX_HITS occurrences. The search is bytes.rfind over the
    tokens packed 4 bytes each (C speed: a 4,000-token context costs microseconds), keeping only aligned hits."""
    size = len(tokens)
    if k < 1 or size <= n_min:
        return []
    buf = array("i", tokens).tobytes()
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        pat = buf[(size - n) * 4 :]
        end = (size - 1) * 4  # a hit must start at or before size - 1 - n: at least one token follows it
        best: list[int] = []
        hits = 0
        while hits < MAX_HITS and (i := buf.rfind(pat, 0, end)) >= 0:
            end = i + len(pat) - 1  # the next search: hits starting before this one
            if i % 4:
                continue  # misaligned: not a token boundary
            hits += 1
            start = i // 4 + n
            found = tokens[start : start + k]
            if len(found) > len(best):
                best = found
                if len(best) == k:
                    break
        if best:
            return best
    return []


def verify(
    logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]], eos_ids: Iterable[int]
) -> tuple[list[list[int]], list[int], list[list | None]]:
    """logits [T, V]: each row's 1 + len(drafts[i]) positions, row after row (ModelRunner.forward with drafts).
    Returns per row: the tokens to emit (the accepted draft then one token of the target's own), how many drafted
    tokens were accepted, and their TokenLogprob entries (None for rows that did not ask)."""
    eos_ids = list(eos_ids)
    params, prompts, outputs, owner = [], [], [], []
    for i, (s, d) in enumerate(zip(seqs, drafts, strict=True)):
        for j in range(len(d) + 1):  # position j sees the row's history plus the first j drafted tokens
            params.append(s.params)
            prompts.append(s.prompt_seen())
            outputs.append(s.output_token_ids + d[:j])
            owner.append(i)
    starts = [0]
    for d in drafts:
        starts.append(starts[-1] + len(d) + 1)
    lp_flat = [r for r, i in enumerate(owner) if seqs[i].params.logprobs is not None]
    raw = RawLogprobs(logits, lp_flat, [params[r].logprobs for r in lp_flat]) if lp_flat else None
    hist = dict(prompts=prompts, outputs=outputs) if any(p.processed for p in params) else {}
    lg = only_eos_when_dead(process_logits(logits.float(), params, eos_ids=eos_ids, **hist), eos_ids)
    greedy = lg.argmax(dim=-1).tolist()
    sampled = [r for r, p in enumerate(params) if p.temperature > 0]
    probs = p_draft = None
    if sampled:
        rows = torch.tensor(sampled, device=lg.device)
        probs = target_probs(lg[rows], [params[r] for r in sampled])  # [S, V]
        # each sampled position's probability of the drafted token that follows it (0 after the last)
        nxt = [drafts[owner[r]][r - starts[owner[r]]] if r + 1 < starts[owner[r] + 1] else 0 for r in sampled]
        p_draft = probs.gather(1, torch.tensor(nxt, device=lg.device)[:, None]).squeeze(1).tolist()
    where = {r: j for j, r in enumerate(sampled)}

    out: list[list[int]] = []
    accepted: list[int] = []
    for i, (s, d) in enumerate(zip(seqs, drafts, strict=True)):
        base = starts[i]
        toks: list[int] = []
        if s.params.temperature == 0:
            for j, t in enumerate(d):
                if greedy[base + j] != t:
                    break
                toks.append(t)
            toks.append(greedy[base + len(toks)])
        else:
            gen = s.generator
            for j, t in enumerate(d):
                u = torch.rand((), generator=gen, device=gen.device).item()
                if u < p_draft[where[base + j]]:
                    toks.append(t)
                    continue
                residual = probs[where[base + j]].clone()
                residual[t] = 0.0
                if not residual.sum() > 0:  # p(t) was 1 but for rounding: nothing else could be drawn
                    toks.append(t)
                    continue
                toks.append(int(torch.multinomial(residual, 1, generator=gen).item()))  # weights need no sum of 1
                break
            else:
                toks.append(int(torch.multinomial(probs[where[base + len(d)]], 1, generator=gen).item()))
        out.append(toks)
        accepted.append(len(toks) - 1)
    scored: list[list | None] = [None] * len(seqs)
    if raw is not None:
        chosen = [0] * len(owner)
        for i, toks in enumerate(out):
            chosen[starts[i] : starts[i] + len(toks)] = toks
        entries = raw.entries(torch.tensor(chosen, dtype=torch.int64, device=logits.device))
        per_row: dict[int, list] = {}
        for r, e in zip(lp_flat, entries, strict=True):
            per_row.setdefault(owner[r], []).append(e)
        for i, es in per_row.items():
            scored[i] = es[: len(out[i])]
    return out, accepted, scored
