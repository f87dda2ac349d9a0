"""Adaptive draft length and prompt lookup (pure logic; the engine tests cover exactness)."""
from __future__ import annotations

import numpy as np
import pytest

from vllm_specdiff.drafting.adaptive import AdaptiveDraftLength
from vllm_specdiff.drafting.lookup import prompt_lookup


def timed(policy: AdaptiveDraftLength, plain: float, per_draft_token: float, drafter: float,
          steps: int = 40, num_reqs: int = 4) -> None:
    for i in range(steps):
        k = 0 if i % 2 else 8
        policy.record_step(num_reqs, k, plain + per_draft_token * k + (drafter if k else 0.0))


def test_drops_to_zero_drafts_when_acceptance_is_nil():
    policy = AdaptiveDraftLength(max_draft_tokens=4, explore_every=0)
    timed(policy, plain=0.05, per_draft_token=0.01, drafter=0.02)
    for _ in range(30):
        for r in ("a", "b"):
            policy.record_acceptance(r, drafted=4, accepted=0)
    assert policy.allocate(["a", "b"]) == [0, 0]


def test_drafts_fully_when_acceptance_is_high_and_drafting_is_cheap():
    policy = AdaptiveDraftLength(max_draft_tokens=4, explore_every=0)
    timed(policy, plain=0.05, per_draft_token=0.002, drafter=0.005)
    for _ in range(30):
        policy.record_acceptance("a", drafted=4, accepted=4)
        policy.record_acceptance("b", drafted=4, accepted=0)
    assert policy.allocate(["a", "b"]) == [4, 0]


def test_draft_length_follows_the_cost_of_a_draft_token():
    rates = {}
    for cost in (0.001, 0.02):
        policy = AdaptiveDraftLength(max_draft_tokens=8, explore_every=0)
        timed(policy, plain=0.05, per_draft_token=cost, drafter=0.005)
        for _ in range(30):
            policy.record_acceptance("a", drafted=4, accepted=2)  # ~0.67 per token
        rates[cost] = policy.allocate(["a"])[0]
    assert rates[0.001] > rates[0.02] >= 0
    fitted = AdaptiveDraftLength(max_draft_tokens=8)
    timed(fitted, plain=0.05, per_draft_token=0.01, drafter=0.02)
    base, token, draft = fitted.cost_coefficients()
    assert abs(token - 0.01) < 2e-3 and abs(draft - 0.02) < 1e-2


def test_exploration_and_untimed_mode_are_deterministic():
    a = AdaptiveDraftLength(max_draft_tokens=4, explore_every=4, timed=False)
    b = AdaptiveDraftLength(max_draft_tokens=4, explore_every=4, timed=False)
    for policy, seconds in ((a, 0.01), (b, 5.0)):  # different wall times must not matter
        timed(policy, plain=seconds, per_draft_token=seconds, drafter=seconds)
        for _ in range(10):
            policy.record_acceptance("r", drafted=4, accepted=0)
    assert [a.allocate(["r"]) for _ in range(8)] == [b.allocate(["r"]) for _ in range(8)]
    assert [4] in [a.allocate(["r"]) for _ in range(4)]  # an exploration step
    with pytest.raises(ValueError, match="max_draft_tokens"):
        AdaptiveDraftLength(max_draft_tokens=0)


def test_prompt_lookup_finds_the_latest_longest_match():
    tokens = np.array([5, 1, 2, 3, 9, 9, 1, 2, 3, 4, 7, 1, 2, 3])
    # Suffix (1, 2, 3): latest earlier occurrence is followed by 4, 7, ...
    assert prompt_lookup(tokens, len(tokens), 3) == [4, 7, 1]
    assert prompt_lookup(tokens, len(tokens), 1) == [4]
    assert prompt_lookup(np.array([1, 2, 3, 4]), 4, 3) == []
    assert prompt_lookup(tokens, 10, 2) == []  # suffix (3, 4) never occurred before
    # Only tokens before num_tokens are read.
    assert prompt_lookup(np.array([1, 2, 8, 1, 2, 0, 0]), 5, 3) == [8, 1, 2]
