"""Per-request sampling of the next token: greedy, temperature, top-k, top-p, seeded generators."""

from __future__ import annotations

import torch

from node.engine.request import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """logits [B, V] (any dtype) -> one token id per row.

    Semantics: row i is argmax(logits_i) when temperature_i == 0; otherwise a draw, with row i's own
    generator, from softmax(logits_i / temperature_i) restricted to its top_k tokens and then to the
    smallest set whose probability reaches top_p. Rows never share randomness, so a request's
    tokens do not depend on what else is in the batch."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1).tolist()
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled_rows:
        return greedy
    rows = torch.tensor(sampled_rows, device=logits.device)
    lg = logits[rows]  # [N, V]
    temps = torch.tensor([params[i].temperature for i in sampled_rows], device=lg.device).unsqueeze(1)
    lg = lg / temps
    sorted_lg, order = lg.sort(dim=-1, descending=True)  # [N, V]
    v = lg.shape[-1]
    rank = torch.arange(v, device=lg.device).unsqueeze(0)
    ks = torch.tensor([params[i].top_k or v for i in sampled_rows], device=lg.device).unsqueeze(1)
    sorted_lg = sorted_lg.masked_fill(rank >= ks, float("-inf"))
    probs = sorted_lg.softmax(dim=-1)
    ps = torch.tensor([params[i].top_p for i in sampled_rows], device=lg.device).unsqueeze(1)
    # drop a token when the mass before it already reaches top_p; the first token always stays
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= ps) & (rank > 0), 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    out = list(greedy)
    for j, i in enumerate(sampled_rows):
        pick = torch.multinomial(probs[j], 1, generator=generators[i]).item()
        out[i] = int(order[j, pick])
    return out
