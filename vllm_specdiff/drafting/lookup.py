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
    n-gram (min_n <= n <= max_n) of tokens[:num_tokens]; [] when none occurs."""
    if max_new <= 0 or num_tokens <= min_n:
        return []
    context = np.asarray(tokens[:num_tokens])
    for n in range(min(max_n, num_tokens - 1), min_n - 1, -1):
        suffix = context[num_tokens - n:]
        # Candidate starts: the n-gram must end before the suffix begins ... and be followed by a token.
        windows = np.lib.stride_tricks.sliding_window_view(context[:num_tokens - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return context[start:start + max_new].tolist()
    return []
