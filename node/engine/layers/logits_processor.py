"""What is done to a row's logits before its draw, beyond temperature and truncation: logit_bias, min_tokens,
allowed_token_ids and the presence, frequency and repetition penalties, batched over the rows that ask (vLLM's
order: bias, min_tokens and the allowed ids first, then the penalties; the grammar's mask is applied by the engine
before, and -inf stays -inf under all of them, so its place among them does not matter)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from node.engine.layers.attention import to_device
from node.engine.request import SamplingParams


def _padded(lists: list[list[int]], pad: int) -> torch.Tensor:
    """Token lists -> int64 [N, longest] padded with `pad` (an index past the vocabulary, dropped after)."""
    width = max((len(x) for x in lists), default=0) or 1
    return torch.tensor([x + [pad] * (width - len(x)) for x in lists], dtype=torch.int64)


def _seen(prompts: list[list[int] | torch.Tensor], outputs: list[list[int]], pad: int) -> torch.Tensor:
    """Each row's prompt ids (a list, or the tensor of its distinct ids a sequence keeps: Sequence.prompt_seen)
    then its output ids -> int64 [N, longest] padded with `pad`."""
    rows = [
        torch.cat(
            (
                p if isinstance(p, torch.Tensor) else torch.tensor(p, dtype=torch.int64),
                torch.tensor(o, dtype=torch.int64),
            )
        )
        for p, o in zip(prompts, outputs, strict=True)
    ]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[list[int] | torch.Tensor] | None = None,
    outputs: Sequence[list[int]] | None = None,
    eos_ids: Iterable[int] = (),
) -> torch.Tensor:
    """logits [B, V] float32 -> the logits each row's draw is made from (a new tensor when any row changes;
    the same tensor, untouched, when none asks: a batch of plain rows costs nothing here).

    Semantics, for each row i that asks (outputs_i: the tokens it generated, prompts_i its prompt, or its distinct
    ids as a tensor: a repetition is penalized once per distinct id):
      l[t] += logit_bias_i[t]
      l[t] = -inf for t in stop_token_ids_i (and the EOS ids unless ignore_eos) while len(outputs_i) < min_tokens_i
      l[t] = -inf for t not in allowed_token_ids_i, when given
      l[w[-1]] = -inf for each w in bad_words_i whose other tokens outputs_i ends with
      l[t] = l[t] / r if l[t] > 0 else l[t] * r, for t in prompts_i + outputs_i, r = repetition_penalty_i
      l[t] -= frequency_penalty_i * count(t in outputs_i) + presence_penalty_i * (t in outputs_i)
    Host work is one pass over the asking rows' token lists; each table reaches the device in one copy."""
    rows = [i for i, p in enumerate(params) if p.processed]
    if not rows:
        return logits
    n = len(params)
    prompts = prompts if prompts is not None else [[]] * n
    outputs = outputs if outputs is not None else [[]] * n
    dev, v = logits.device, logits.shape[-1]
    logits = logits.clone()
    eos = sorted(set(eos_ids))

    # logit_bias and min_tokens: (row, token) pairs, added or set to -inf
    bias_rows, bias_ids, bias_vals, ban_rows, ban_ids = [], [], [], [], []
    for i in rows:
        p = params[i]
        for t, b in p.logit_bias:
            bias_rows.append(i)
            bias_ids.append(t)
            bias_vals.append(b)
        banned = set()
        if len(outputs[i]) < p.min_tokens:
            banned |= set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
        if p.bad_words:
            banned |= p.words_ending(outputs[i])
        ban_rows += [i] * len(banned)
        ban_ids += sorted(banned)
    if bias_rows:
        idx = to_device(torch.tensor([bias_rows, bias_ids], dtype=torch.int64), dev)
        vals = to_device(torch.tensor(bias_vals, dtype=torch.float32), dev)
        logits.index_put_((idx[0], idx[1]), vals, accumulate=True)
    if ban_rows:
        idx = to_device(torch.tensor([ban_rows, ban_ids], dtype=torch.int64), dev)
        logits[idx[0], idx[1]] = float("-inf")
    # each request's mask of the ids it does not allow, made once on the device (SamplingParams.outside_mask),
    # filled in place row by row: no [rows, V] copies gathered and scattered back
    for i in rows:
        if params[i].allowed_token_ids is not None:
            logits[i].masked_fill_(params[i].outside_mask(v, dev), float("-inf"))

    pen = [i for i in rows if params[i].penalized]
    if pen:
        # O(tokens seen), not O(vocab): gather the seen tokens' logits, change them, scatter them back. A row's
        # lists are padded with id V, a scratch column past the vocabulary (duplicates write equal values)
        f = torch.tensor(
            [[params[i].repetition_penalty, params[i].frequency_penalty, params[i].presence_penalty] for i in pen],
            dtype=torch.float32,
        )
        f = to_device(f, dev)
        rep, freq, pres = f[:, 0:1], f[:, 1:2], f[:, 2:3]  # [N, 1] each
        pen_t = to_device(torch.tensor(pen, dtype=torch.int64), dev)
        lg = torch.empty(len(pen), v + 1, dtype=logits.dtype, device=dev)  # [N, V + 1]
        lg[:, :v] = logits[pen_t]
        out = to_device(_padded([outputs[i] for i in pen], v), dev)  # [N, Lo]
        if any(params[i].repetition_penalty != 1 for i in pen):
            seen = to_device(_seen([prompts[i] for i in pen], [outputs[i] for i in pen], v), dev)  # [N, Lp + Lo]
            x = lg.gather(1, seen)
            lg.scatter_(1, seen, torch.where(x > 0, x / rep, x * rep))
        lg.scatter_add_(1, out, (-freq).expand(out.shape).contiguous())  # -frequency per occurrence
        lg.scatter_(1, out, lg.gather(1, out) - pres)  # -presence once per distinct token
        logits[pen_t] = lg[:, :v]
    return logits
