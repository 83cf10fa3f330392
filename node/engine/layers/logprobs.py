"""Log-probabilities of the model's raw distribution (log_softmax of the logits before penalties, bias,
temperature or grammar masks, as vLLM reports them): the chosen token's and the top k, batched over the rows
that ask, with one copy to the host."""

from __future__ import annotations

from collections.abc import Callable

import torch

from node.engine.layers.attention import to_device
from node.engine.request import TokenLogprob


class RawLogprobs:
    """Rows `rows` of a step's logits [B, V], scored before anything changes the logits (the grammar mask is
    applied in place afterwards). `ks[j]`: how many top entries row rows[j] wants."""

    __slots__ = ("rows", "ks", "lp", "top_vals", "top_ids", "_rows_t")

    def __init__(self, logits: torch.Tensor, rows: list[int], ks: list[int]) -> None:
        self.rows, self.ks = rows, ks
        self._rows_t = to_device(torch.tensor(rows, dtype=torch.int64), logits.device)
        self.lp = logits[self._rows_t].float().log_softmax(dim=-1)  # [N, V]
        k = max(ks)
        self.top_vals = self.top_ids = None
        if k > 0:
            self.top_vals, self.top_ids = self.lp.topk(k, dim=-1)  # [N, k], descending

    def entries(self, tokens: torch.Tensor) -> list[TokenLogprob]:
        """tokens [B] int64 (the step's draws, on the logits' device) -> one entry per row asked, in `rows` order."""
        chosen = self.lp.gather(1, tokens[self._rows_t][:, None]).squeeze(1)
        return _entries(tokens[self._rows_t].tolist(), chosen.tolist(), self.top_vals, self.top_ids, self.ks)


SCORE_CHUNK = 256  # prompt positions scored at once: a long prompt's logits and log-softmax are never whole


def score(
    hidden: torch.Tensor, targets: list[int], k: int, logits_of: Callable[[torch.Tensor], torch.Tensor]
) -> list[TokenLogprob]:
    """hidden [N, D] of N positions and the token that followed each -> each target's log-probability and the
    top k at that position (prompt_logprobs). `logits_of` makes the logits of SCORE_CHUNK positions at a time:
    a 32,000-token prompt's logits over a 152,000-token vocabulary are 9.7 GB at once (bf16), and a 4,000-token
    prompt's float32 log-softmax over 32,000 tokens took another 500 MB."""
    out: list[TokenLogprob] = []
    for lo in range(0, len(targets), SCORE_CHUNK):
        part = targets[lo : lo + SCORE_CHUNK]
        lp = logits_of(hidden[lo : lo + len(part)]).float().log_softmax(dim=-1)  # [<= SCORE_CHUNK, V]
        t = to_device(torch.tensor(part, dtype=torch.int64), lp.device)
        chosen = lp.gather(1, t[:, None]).squeeze(1)
        ranks = (lp >= chosen[:, None]).sum(dim=-1).tolist()  # the tokens at least as likely, itself too (vLLM's)
        vals = ids = None
        if k > 0:
            vals, ids = lp.topk(k, dim=-1)
        out += _entries(part, chosen.tolist(), vals, ids, [k] * len(part), ranks)
    return out


def _entries(
    tokens: list[int], chosen: list[float], vals, ids, ks: list[int], ranks: list[int] | None = None
) -> list[TokenLogprob]:
    vals = vals.tolist() if vals is not None else [[]] * len(tokens)
    ids = ids.tolist() if ids is not None else [[]] * len(tokens)
    ranks = ranks if ranks is not None else [None] * len(tokens)
    return [
        TokenLogprob(t, lp, tuple(zip(i[:k], v[:k], strict=True)), r)
        for t, lp, v, i, k, r in zip(tokens, chosen, vals, ids, ks, ranks, strict=True)
    ]
