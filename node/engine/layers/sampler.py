"""Per-request sampling of the next token: processed logits (logits_processor), then greedy, temperature,
top-k, top-p, min-p; per-row seeded generators (CPU) or a batched draw from (seed, step) (the device path)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from node.engine.layers.logits_processor import process_logits
from node.engine.request import SamplingParams


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for a request's 64-bit seed in which every bit of the seed counts.

    torch's CPU generator (mt19937) keeps only the low 32 bits of manual_seed, so seeds that differed
    only above bit 32 drew the same text. The high half is folded into the low half first with a
    bijective 32-bit hash (a Feistel step: the fold is invertible, so distinct seeds stay distinct for
    generators that do keep 64 bits, such as CUDA's Philox)."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    folded = (hi << 32) | (lo ^ _mix32_int(hi))
    gen = torch.Generator(device=device)
    gen.manual_seed(folded)
    return gen


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    *,
    prompts: Sequence[list[int] | torch.Tensor] | None = None,
    outputs: Sequence[list[int]] | None = None,
    eos_ids: Iterable[int] = (),
) -> list[int]:
    """logits [B, V] (any dtype) -> one token id per row.

    Semantics: each row's logits are first processed (logits_processor.process_logits: logit_bias, min_tokens,
    penalties over prompts/outputs); then row i is their argmax when temperature_i == 0; otherwise a draw, with
    row i's own generator, from softmax(logits_i / temperature_i) restricted to its top_k tokens, then to the
    smallest set whose probability reaches top_p, then to the tokens whose probability is at least min_p times
    the largest. Rows never share randomness, so a request's tokens do not depend on what else is in the batch."""
    logits = only_eos_when_dead(process_logits(logits.float(), params, prompts, outputs, eos_ids), eos_ids)
    greedy = logits.argmax(dim=-1).tolist()
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled_rows:
        return greedy
    v = logits.shape[-1]
    out = list(greedy)
    # rows that truncate their distribution sort it; the others draw from it in vocabulary order (a sort of the
    # whole vocabulary is most of a CPU step's sampling time); either way a row's draw depends on it alone
    cut = [i for i in sampled_rows if _truncates(params[i], v)]
    whole = [i for i in sampled_rows if not _truncates(params[i], v)]
    if whole:
        temps = torch.tensor([params[i].temperature for i in whole], dtype=torch.float32, device=logits.device)
        probs = (logits[torch.tensor(whole, device=logits.device)] / temps[:, None]).softmax(dim=-1)
        for j, i in enumerate(whole):
            out[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]).item())
    if cut:
        rows = torch.tensor(cut, device=logits.device)
        col = lambda name: torch.tensor(  # noqa: E731
            [getattr(params[i], name) for i in cut], dtype=torch.float32, device=logits.device
        )
        probs, order = _truncated_probs(
            logits[rows], col("temperature"), col("top_k").long(), col("top_p"), col("min_p")
        )
        probs = probs / probs.sum(dim=-1, keepdim=True)
        for j, i in enumerate(cut):
            pick = torch.multinomial(probs[j], 1, generator=generators[i]).item()
            out[i] = int(order[j, pick])
    return out


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Processed float32 logits [N, V] of sampled rows (temperature > 0) -> the distribution `sample` draws each
    row from, in vocabulary order [N, V] (temperature, then top_k, top_p, min_p; normalised): what speculative
    decoding's rejection sampling accepts a drafted token against."""
    v = logits.shape[-1]
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    probs = (logits / temps[:, None]).softmax(dim=-1)
    cut = [i for i, p in enumerate(params) if _truncates(p, v)]
    if cut:
        rows = torch.tensor(cut, device=dev)
        col = lambda name: torch.tensor(  # noqa: E731
            [getattr(params[i], name) for i in cut], dtype=torch.float32, device=dev
        )
        sorted_probs, order = _truncated_probs(
            logits[rows], col("temperature"), col("top_k").long(), col("top_p"), col("min_p")
        )
        probs[rows] = torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)


def only_eos_when_dead(logits: torch.Tensor, eos_ids: Iterable[int]) -> torch.Tensor:
    """Rows with no distribution to draw from (a NaN or +inf logit, or every token at -inf: a grammar that
    allows only EOS while min_tokens bans it, a penalty that overflows, a model that blew up) become "EOS
    only", so that row's sequence stops and every other row of the batch draws as it would have; a raising
    draw (torch.multinomial on NaN) used to fail the whole step, every request on the node with it.
    One pass over the logits, no host sync."""
    eos = next(iter(eos_ids), 0)
    alive = torch.isfinite(logits)
    dead = ~(alive | (logits == float("-inf"))).all(dim=-1) | ~alive.any(dim=-1)  # [B]
    only_eos = torch.full_like(logits[:1], float("-inf"))
    only_eos[0, eos] = 0.0
    return torch.where(dead[:, None], only_eos, logits)


def _truncates(p: SamplingParams, vocab: int) -> bool:
    """Whether a row's draw is restricted (top_k, top_p, min_p) and so needs its distribution sorted."""
    return 0 < p.top_k < vocab or p.top_p < 1 or p.min_p > 0


def _truncated_probs(
    lg: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits [N, V] and per-row parameters [N] -> (probabilities in descending order [N, V], not
    renormalised, with truncated tokens at 0; the token id of each column [N, V])."""
    v = lg.shape[-1]
    sorted_lg, order = (lg / temperature[:, None]).sort(dim=-1, descending=True)  # [N, V]
    rank = torch.arange(v, device=lg.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, v))
    # min_p: p < min_p * p_max  <=>  logit < max logit + log(min_p) (log 0 = -inf keeps everything)
    floor = sorted_lg[:, :1] + torch.log(min_p.float())[:, None]
    probs = sorted_lg.masked_fill((rank >= k[:, None]) | (sorted_lg < floor), float("-inf")).softmax(dim=-1)
    # drop a token when the mass before it already reaches top_p; the first token always stays
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= top_p[:, None].float()) & (rank > 0), 0.0)
    return probs, order


# ---- batched on-device sampling (the CUDA path): no per-row host syncs ----
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # a 32-bit integer hash (lowbias32) on int64 tensors; products are masked back to 32 bits
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    # _mix32 on a Python int (the same lowbias32 hash; a bijection on 32-bit values)
    x &= _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _as_int64(seed: int) -> int:
    # an unsigned 64-bit seed in an int64 tensor: the same 64 bits, read as two's complement (uniform_from
    # takes both 32-bit halves back out); masking to 63 bits instead made seed and seed + 2^63 draw alike
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def uniform_from(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One float64 in [0, 1) per row, a pure function of (seed, step): rows never share a stream,
    and a resumed request draws exactly what it would have drawn."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    x = _mix32(lo ^ _mix32(hi ^ _mix32(steps * 0x9E3779B9 + 0x632BE5AB)))
    y = _mix32(x ^ 0x5BD1E995)
    return ((x << 21) | (y >> 11)).double() / float(1 << 53)


def sample_batched(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    min_p: torch.Tensor | None = None,
    sort_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B] int64, on logits' device, with no host sync.

    Semantics: row i is argmax(logits_i) when temperature_i == 0; otherwise the inverse-CDF draw at
    u_i = uniform_from(seed_i, step_i) from softmax(logits_i / temperature_i) restricted to its
    top_k_i tokens (0 = all), then to the smallest set whose probability reaches top_p_i, then to the tokens
    whose probability is at least min_p_i times the largest (None = 0 for every row). The draw walks the
    distribution in descending order for the rows in `sort_rows` (None: all), in vocabulary order for the others
    (which must not truncate: sorting is most of the cost, and a row's draw depends only on its own parameters).
    temperature/top_p/min_p float [B], top_k/seeds/steps int64 [B], sort_rows int64 [S]."""
    lg = logits.float()
    greedy = lg.argmax(dim=-1)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).float()
    if min_p is None:
        min_p = torch.zeros_like(t)
    u = uniform_from(seeds, steps)
    if sort_rows is None:
        probs, order = _truncated_probs(lg, t, top_k, top_p, min_p)
        drawn = order.gather(1, _inverse_cdf(probs, u)).squeeze(1)
    else:
        drawn = _inverse_cdf((lg / t[:, None]).softmax(dim=-1), u).squeeze(1)  # vocabulary order
        if sort_rows.numel():
            r = sort_rows
            probs, order = _truncated_probs(lg[r], t[r], top_k[r], top_p[r], min_p[r])
            drawn = drawn.index_copy(0, r, order.gather(1, _inverse_cdf(probs, u[r])).squeeze(1))
    return torch.where(temperature > 0, drawn, greedy)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[N, V] weights, [N] uniforms in [0, 1) -> [N, 1] the column where each row's CDF first exceeds u * total."""
    cdf = probs.double().cumsum(dim=-1)  # [N, V]
    target = u * cdf[:, -1]
    return torch.searchsorted(cdf, target[:, None], right=True).clamp_(max=probs.shape[-1] - 1)


def sample_on_device(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    steps: list[int],
    *,
    prompts: Sequence[list[int] | torch.Tensor] | None = None,
    outputs: Sequence[list[int]] | None = None,
    eos_ids: Iterable[int] = (),
) -> list[int]:
    """The CUDA engine's sampler: `draw_on_device`, then one copy of the ids to the host (the step's only sync)."""
    return draw_on_device(logits, params, seeds, steps, prompts=prompts, outputs=outputs, eos_ids=eos_ids).tolist()


def draw_on_device(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    steps: list[int],
    *,
    prompts: Sequence[list[int] | torch.Tensor] | None = None,
    outputs: Sequence[list[int]] | None = None,
    eos_ids: Iterable[int] = (),
) -> torch.Tensor:
    """Token ids [B] int64 on logits' device, with no host sync: the rows' logits processed (process_logits),
    then one batched draw (sample_batched). Greedy-only batches skip the sort entirely."""
    logits = only_eos_when_dead(process_logits(logits.float(), params, prompts, outputs, eos_ids), eos_ids)
    if all(p.temperature == 0 for p in params):
        return logits.argmax(dim=-1)
    dev = logits.device
    pin = dev.type == "cuda"
    f = torch.tensor(
        [[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params]],
        dtype=torch.float64,
        pin_memory=pin,
    ).to(dev, non_blocking=True)
    i = torch.tensor(
        [[p.top_k for p in params], [_as_int64(s) for s in seeds], steps], dtype=torch.int64, pin_memory=pin
    ).to(dev, non_blocking=True)
    v = logits.shape[-1]
    sort_rows = torch.tensor([k for k, p in enumerate(params) if _truncates(p, v)], dtype=torch.int64, pin_memory=pin)
    return sample_batched(logits, f[0], i[0], f[1], i[1], i[2], f[2], sort_rows.to(dev, non_blocking=True))
