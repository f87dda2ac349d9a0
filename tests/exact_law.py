"""Exact laws for the enumeration tests: a tiny random 'target LM' over VOCAB tokens and the exact
output law of one speculative round (Leviathan et al. 2023, Alg. 1) for enumerated drafts."""
from __future__ import annotations

import functools
from collections import defaultdict

import torch

VOCAB = 4


@functools.lru_cache(maxsize=None)
def target_law(prefix: tuple[int, ...]) -> torch.Tensor:
    """A fixed random next-token law for every prefix (float64 [VOCAB]). Cached: the enumerations ask
    for the same prefixes many times (never mutate the result)."""
    gen = torch.Generator().manual_seed(hash(("target",) + prefix) % (2**31))
    return torch.softmax(1.5 * torch.randn(VOCAB, generator=gen, dtype=torch.float64), -1)


def continuation_law(prefix: tuple[int, ...], horizon: int) -> dict[tuple[int, ...], float]:
    law = {(): 1.0}
    for _ in range(horizon):
        law = {seq + (y,): w * float(target_law(prefix + seq)[y]) for seq, w in law.items() for y in range(VOCAB)}
    return law


def round_output_law(context, drafts, horizon) -> dict[tuple[int, ...], float]:
    """Exact law of one speculative round after `context`, extended to `horizon` tokens by the
    target. drafts: iterable of (draft tokens, probability, recorded draft rows)."""
    out: dict[tuple[int, ...], float] = defaultdict(float)
    context = tuple(context)

    def emit(seq, weight):
        for tail, w in continuation_law(context + seq, horizon - len(seq)).items():
            out[seq + tail] += weight * w

    for tokens, draft_weight, draft_rows in drafts:
        reach, prefix = draft_weight, ()
        for token, draft_row in zip(tokens, draft_rows):
            target_row = target_law(context + prefix)
            accept = min(1.0, float(target_row[token] / draft_row[token]))
            residual = torch.clamp(target_row - draft_row, min=0)
            if residual.sum() > 0:
                residual = residual / residual.sum()
                for y in range(VOCAB):
                    if residual[y] > 0:
                        emit(prefix + (y,), reach * (1 - accept) * float(residual[y]))
            reach *= accept
            prefix += (token,)
        target_row = target_law(context + prefix)
        for y in range(VOCAB):
            emit(prefix + (y,), reach * float(target_row[y]))
    return out


def total_variation(law_a, law_b) -> float:
    return 0.5 * sum(abs(law_a.get(k, 0.0) - law_b.get(k, 0.0)) for k in set(law_a) | set(law_b))
