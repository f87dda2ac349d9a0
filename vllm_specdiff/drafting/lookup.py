"""Prompt lookup: the continuation of the current suffix found earlier in the context.

As in vLLM's ngram proposer (and prompt-lookup decoding): the last n tokens (n from max_n down to
min_n) are searched for in the earlier context; the tokens that followed their latest occurrence are
a guess for the next ones. For a diffusion drafter these tokens enter the block as REVEALED positions:
they are a deterministic function of the context, so their draft law is a point mass (one-hot q) and
speculative sampling stays exact, while the drafter denoises the remaining positions conditioned on
them, left to right.
"""
from __future__ import annotations

import numpy as np


def prompt_lookup(tokens: np.ndarray, num_tokens: int, max_new: int, min_n: int = 2,
                  max_n: int = 4) -> list[int]:
    """Up to `max_new` tokens following the latest earlier occurrence of the longest suffix
    n-gram (min_n <= n <= max_n) of tokens[:num_tokens]; [] when none occurs.

    One pass over the context finds the earlier positions that hold the last token; each is then
    extended backwards by at most max_n - 1 comparisons (~6 us per 1,000-token row, where a
    sliding-window search per n took ~0.2 ms: the proposer runs this for every row, every step)."""
    if max_new <= 0 or num_tokens <= min_n:
        return []
    context = np.asarray(tokens[:num_tokens])
    last = num_tokens - 1
    ends = np.flatnonzero(context[:last] == context[last])  # occurrences followed by a token
    if ends.size == 0:
        return []
    length = np.ones(ends.size, dtype=np.int64)  # common suffix length, up to max_n
    alive = np.ones(ends.size, dtype=bool)
    for j in range(1, min(max_n, last)):
        prev = ends - j
        alive &= (prev >= 0) & (context[np.maximum(prev, 0)] == context[last - j])
        length += alive
    best = int(length.max())
    if best < min_n:
        return []
    start = int(ends[length == best][-1]) + 1
    return context[start:start + max_new].tolist()
