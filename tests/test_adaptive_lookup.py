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


def test_drafting_must_beat_no_drafts_by_min_gain():
    """One draft token accepted with rate a in a step that costs r times a plain one: throughput
    ratio (1 + a) / r. A predicted +2% is not worth drafting's risk (it is without the margin);
    +15% is."""
    def choice(gain: float, min_gain: float) -> int:
        policy = AdaptiveDraftLength(max_draft_tokens=1, explore_every=0, prior_weight=1e-6,
                                     min_gain=min_gain)
        for i in range(40):  # drafting steps ~10% dearer
            policy.record_step(1, i % 2, 0.05 * (1.1 if i % 2 else 1.0))
        ratio = policy.step_time(1, 1) / policy.step_time(1, 0)
        assert 1.05 < ratio < 1.2
        rate = ratio * (1 + gain) - 1
        policy._counts["a"] = np.array([0.0, 0.0, rate * 1e6, 1e6])  # drafter tokens: rate
        assert policy.acceptance("a")[1] == pytest.approx(rate, abs=1e-3)
        return policy.allocate(["a"])[0]

    assert choice(0.02, 0.05) == 0 and choice(0.02, 0.0) == 1
    assert choice(0.15, 0.05) == 1
    with pytest.raises(ValueError, match="min_gain"):
        AdaptiveDraftLength(max_draft_tokens=1, min_gain=1.5)


def test_draft_length_follows_the_cost_of_a_draft_token():
    rates = {}
    for cost in (0.001, 0.02):
        policy = AdaptiveDraftLength(max_draft_tokens=8, explore_every=0)
        timed(policy, plain=0.05, per_draft_token=cost, drafter=0.005, num_reqs=1)
        for _ in range(30):
            policy.record_acceptance("a", drafted=4, accepted=2)  # ~0.67 per token
        rates[cost] = policy.allocate(["a"])[0]
    assert rates[0.001] > rates[0.02] >= 0
    fitted = AdaptiveDraftLength(max_draft_tokens=8)
    timed(fitted, plain=0.05, per_draft_token=0.01, drafter=0.02)
    # Every 8-draft step ran the drafter: only their sum (8 tokens + the drafter) is identified.
    assert fitted.step_time(4, 8, True) - fitted.step_time(4, 0, False) == pytest.approx(0.1, rel=0.05)
    assert fitted.step_time(4, 0, False) == pytest.approx(0.05, rel=0.05)


def test_exploration_and_untimed_mode_are_deterministic():
    a = AdaptiveDraftLength(max_draft_tokens=4, explore_every=4, timed=False)
    b = AdaptiveDraftLength(max_draft_tokens=4, explore_every=4, timed=False)
    for policy, seconds in ((a, 0.01), (b, 5.0)):  # different wall times must not matter
        timed(policy, plain=seconds, per_draft_token=seconds, drafter=seconds)
        for _ in range(10):
            policy.record_acceptance("r", drafted=4, accepted=0)
    assert [a.allocate(["r"]) for _ in range(8)] == [b.allocate(["r"]) for _ in range(8)]
    # Exploration steps draft one drafter token (after any lookup tokens) even when nothing pays.
    explored = [a.allocate(["r"], lookup_lengths=[2]) for _ in range(64)]
    assert [3] in explored and {tuple(x) for x in explored} == {(2,), (3,)}
    with pytest.raises(ValueError, match="max_draft_tokens"):
        AdaptiveDraftLength(max_draft_tokens=0)


def test_exploration_backs_off_while_drafting_does_not_pay():
    policy = AdaptiveDraftLength(max_draft_tokens=4, explore_every=4, max_explore_every=32)
    timed(policy, plain=0.05, per_draft_token=0.01, drafter=0.02)
    for _ in range(30):
        policy.record_acceptance("r", drafted=4, accepted=0)
    explored = [i for i in range(200) if policy.allocate(["r"]) != [0]]
    gaps = np.diff(explored).tolist()
    assert gaps[:3] == [8, 16, 32] and set(gaps[3:]) == {32}, gaps


def test_new_requests_start_from_the_pooled_acceptance_of_their_kind():
    policy = AdaptiveDraftLength(max_draft_tokens=4, explore_every=0)
    timed(policy, plain=0.05, per_draft_token=0.005, drafter=0.01)
    # Sampled requests accept nothing, greedy ones nearly everything.
    policy.allocate(["s0", "s1", "g0", "g1"], sampled=[True, True, False, False])
    for _ in range(20):
        for r in ("s0", "s1"):
            policy.record_acceptance(r, drafted=4, accepted=0)
        for r in ("g0", "g1"):
            policy.record_acceptance(r, drafted=4, accepted=4)
    for r in ("s0", "s1", "g0", "g1"):
        policy.forget(r)
    lookup_rate, model_rate = policy.pooled_acceptance(sampled=True)
    assert model_rate < 0.05 and lookup_rate == pytest.approx(0.5)  # no lookup evidence yet
    assert policy.allocate(["new-s", "new-g"], sampled=[True, False]) == [0, 4]


def test_acceptance_is_attributed_to_lookup_and_drafter_tokens():
    policy = AdaptiveDraftLength(max_draft_tokens=4, prior_weight=1e-9)
    policy.record_acceptance("r", drafted=4, accepted=1, lookup=2)  # lookup 1 of 2 tried
    policy.record_acceptance("r", drafted=4, accepted=3, lookup=2)  # lookup 2/2, drafter 1 of 2
    policy.record_acceptance("r", drafted=3, accepted=3, lookup=0)  # drafter 3/3
    lookup_rate, model_rate = policy.acceptance("r")
    assert lookup_rate == pytest.approx(3 / 4) and model_rate == pytest.approx(4 / 5)


def test_lookup_only_drafts_when_the_drafter_does_not_pay():
    """Lookup tokens accepted, drafter tokens not, the drafter expensive: drafts are exactly the
    lookup tokens, and steps drafting only those are costed without the drafter."""
    policy = AdaptiveDraftLength(max_draft_tokens=4, explore_every=0)
    for i in range(40):
        k, ran = [(0, False), (2, False), (4, True)][i % 3]
        policy.record_step(2, k, 0.05 + 0.002 * k + (0.05 if ran else 0.0), drafter_ran=ran)
    assert policy.step_time(2, 2, False) == pytest.approx(0.054, rel=0.05)
    assert policy.step_time(2, 4, True) == pytest.approx(0.108, rel=0.05)
    for _ in range(30):
        policy.record_acceptance("a", drafted=4, accepted=2, lookup=2)
        policy.record_acceptance("b", drafted=4, accepted=0, lookup=0)
    assert policy.allocate(["a", "b"], lookup_lengths=[3, 0]) == [3, 0]
    assert policy.allocate(["a", "b"], lookup_lengths=[0, 0]) == [0, 0]


def test_prompt_lookup_finds_the_latest_longest_match():
    tokens = np.array([5, 1, 2, 3, 9, 9, 1, 2, 3, 4, 7, 1, 2, 3])
    # Suffix (1, 2, 3): latest earlier occurrence is followed by 4, 7, ...
    assert prompt_lookup(tokens, len(tokens), 3) == [4, 7, 1]
    assert prompt_lookup(tokens, len(tokens), 1) == [4]
    # The longest suffix n-gram wins over later shorter ones: (8, 1, 2) before (1, 2).
    assert prompt_lookup(np.array([8, 1, 2, 5, 1, 2, 6, 8, 1, 2]), 10, 2) == [5, 1]
    assert prompt_lookup(np.array([3, 1, 2, 3, 1, 2, 3]), 7, 2) == [1, 2]  # overlapping matches
    assert prompt_lookup(np.array([1, 2, 3, 4]), 4, 3) == []
    assert prompt_lookup(tokens, 10, 2) == []  # suffix (3, 4) never occurred before
    # Only tokens before num_tokens are read.
    assert prompt_lookup(np.array([1, 2, 8, 1, 2, 0, 0]), 5, 3) == [8, 1, 2]


def test_prompt_lookup_equals_a_brute_force_search():
    def brute(context, num_tokens, max_new, min_n=2, max_n=4):
        context = list(context[:num_tokens])
        for n in range(min(max_n, num_tokens - 1), min_n - 1, -1):
            for end in range(num_tokens - 2, n - 2, -1):  # latest occurrence first
                if context[end - n + 1:end + 1] == context[num_tokens - n:]:
                    return context[end + 1:end + 1 + max_new]
        return []

    gen = np.random.default_rng(0)
    for trial in range(400):
        tokens = gen.integers(0, 3 + trial % 5, size=int(gen.integers(1, 40)))
        for num_tokens in {len(tokens), max(1, len(tokens) // 2)}:
            for max_new in (1, 4):
                assert prompt_lookup(tokens, num_tokens, max_new) == \
                    brute(tokens, num_tokens, max_new), (tokens.tolist(), num_tokens, max_new)


def test_drafter_cost_grows_with_the_rows_it_drafts():
    """The drafter's own timed calls give its cost per row: drafting that pays for one request
    does not pay for sixteen when each row costs the drafter as much as the step saves."""
    policy = AdaptiveDraftLength(max_draft_tokens=1, explore_every=0)
    for i in range(60):  # batches of 1 and 16, with and without one draft token per row
        rows, drafting = (1, 16)[i % 2], (i // 2) % 2
        drafter = (0.002 + 0.006 * rows) * drafting
        if drafting:
            policy.record_drafter(rows, drafter)
        policy.record_step(rows, drafting * rows, 0.05 + 0.002 * (1 + drafting) * rows + drafter,
                           drafter_ran=bool(drafting), drafter_seconds=drafter)
    d0, d1 = policy.drafter_coefficients()
    assert d0 == pytest.approx(0.002, abs=1e-3) and d1 == pytest.approx(0.006, rel=0.1)
    assert policy.step_time(16, 16, True, 16) - policy.step_time(16, 16, True, 1) == \
        pytest.approx(15 * 0.006, rel=0.1)
    for req in [f"r{i}" for i in range(16)]:
        policy._counts[req] = np.array([0.0, 0.0, 0.5e6, 1e6])  # each draft token: 50% accepted
    assert policy.allocate(["r0"]) == [1]
    assert policy.allocate([f"r{i}" for i in range(16)]) == [0] * 16



def test_exploration_spends_at_most_one_plain_step_on_the_drafter():
    """Exploring runs the drafter for the rows with the least evidence, as many as one plain
    step's time pays for (a 16-row SEDD call cost ~5 plain steps at batch 16); before any drafter
    call was timed the first exploration covers every row."""
    reqs = [f"r{i}" for i in range(16)]
    policy = AdaptiveDraftLength(max_draft_tokens=4, explore_every=4, max_explore_every=4)
    for req in reqs:
        policy.record_acceptance(req, drafted=4, accepted=0)
    first = [a for a in (policy.allocate(reqs) for _ in range(4)) if any(a)]
    assert first == [[1] * 16]

    policy = AdaptiveDraftLength(max_draft_tokens=4, explore_every=4, max_explore_every=4)
    for i in range(40):  # plain step 0.1 s at batch 16; the drafter 0.03 s per row it drafts
        rows = 16 * (i % 2)
        if rows:
            policy.record_drafter(rows, 0.03 * rows)
        policy.record_step(16, rows, 0.1 + 0.001 * rows + 0.03 * rows, drafter_ran=bool(rows),
                           drafter_seconds=0.03 * rows)
    for i, req in enumerate(reqs):  # r0..r7: much evidence, r8..r15: little; none accepts
        for _ in range(40 if i < 8 else 1):
            policy.record_acceptance(req, drafted=4, accepted=0)
    budget = policy.step_time(16, 0, False)
    explored: list[str] = []
    for _ in range(40):
        alloc = policy.allocate(reqs)
        rows = [req for req, a in zip(reqs, alloc) if a]
        if not rows:
            continue
        assert alloc == [1 if a else 0 for a in alloc]
        assert policy.step_time(16, 0, True, len(rows)) - budget <= budget
        assert 1 <= len(rows) < 16
        explored += rows
        for req in rows:
            policy.record_acceptance(req, drafted=1, accepted=0)
    assert len(explored) >= 12
    # Least evidence first: the first three explorations (3 rows each: 0.1 s / 0.03 s) cover every
    # little-evidence request and no well-known one.
    assert set(explored[:9]) == set(reqs[8:])


def _allocate_one_by_one(policy: AdaptiveDraftLength, req_ids, lookup) -> list[int]:
    """The allocation rule written as its definition: add block positions in order of value while
    the predicted throughput improves; best of lookup-only, all positions and nothing."""
    n, k = len(req_ids), policy.max_draft_tokens
    lookup = np.minimum(np.asarray(lookup), k)
    rates = np.array([policy.acceptance(r) for r in req_ids])
    is_lookup = np.arange(k)[None, :] < lookup[:, None]
    values = np.cumprod(np.where(is_lookup, rates[:, :1], rates[:, 1:]), axis=1)
    best_value, best = n / policy.step_time(n, 0, False) * (1 + policy.min_gain), [0] * n
    for only_lookup in (True, False):
        positions = [(i, j) for i in range(n) for j in range(k) if is_lookup[i, j] or not only_lookup]
        positions.sort(key=lambda p: -values[p])  # stable: ties keep row-major order
        gained, model_rows, chosen = float(n), set(), []
        for i, j in positions:
            gained += values[i, j]
            if not is_lookup[i, j]:
                model_rows.add(i)
            chosen.append(i)
            value = gained / policy.step_time(n, len(chosen), bool(model_rows), len(model_rows))
            if value > best_value:
                best_value, best = value, np.bincount(chosen, minlength=n).tolist()
    return best


def test_allocation_equals_adding_positions_one_by_one():
    rng = np.random.default_rng(0)
    for trial in range(60):
        k, n = int(rng.integers(1, 9)), int(rng.integers(1, 17))
        policy = AdaptiveDraftLength(max_draft_tokens=k, explore_every=0, probe_every=0)
        token, drafter = rng.uniform(0.0005, 0.02), rng.uniform(0.0, 0.05)
        for i in range(30):
            rows, drafts = int(rng.integers(1, 17)), int(rng.integers(0, 2 * k))
            ran = bool(drafts) and bool(rng.integers(0, 2))
            seconds = drafter * rows / 8 if ran else 0.0
            if ran:
                policy.record_drafter(rows, seconds)
            policy.record_step(rows, drafts, 0.05 + token * (rows + drafts) + seconds,
                               drafter_ran=ran, drafter_seconds=seconds)
        reqs = [f"r{i}" for i in range(n)]
        for req in reqs:
            policy._counts[req] = np.array([*sorted(rng.uniform(0, 50, 2)),
                                            *sorted(rng.uniform(0, 50, 2))])
        lookup = rng.integers(0, k + 1, n)
        assert policy.allocate(reqs, lookup) == _allocate_one_by_one(policy, reqs, lookup), trial


def cpu_step_seconds(tokens: float) -> float:
    """A decode step of the embedded target on this 2-core CPU (fitted to measured medians: 55.4 ms
    at 1 token, ~60 at 5, 67 at 10, 82.5 at 16, 152 at 31): memory-bound at small batches, compute-
    bound from ~16 tokens, so a draft token costs ~0.5 ms at batch 1 and ~4.5 ms at batch 16."""
    return (55.0 + 0.294 * tokens + 0.089 * tokens ** 2) / 1e3


def test_draft_token_cost_is_fitted_at_the_batch_size_it_is_used_for():
    """One straight line through steps of batch 1 to 16 prices a draft token at batch 16 at ~2/3
    of its cost and drafts there at a loss (seen: temperature 0, batch 16, 0.84x); the fit is
    local in batch size."""
    policy = AdaptiveDraftLength(max_draft_tokens=4, explore_every=0)
    rng = np.random.default_rng(0)
    for i in range(120):
        n = (1, 4, 16)[i % 3]
        drafts = int(rng.integers(0, 4 * n + 1)) if i % 2 else 0
        policy.record_step(n, drafts, cpu_step_seconds(n + drafts), drafter_ran=False)
    for n, drafts in ((1, 0), (1, 4), (16, 0), (16, 16), (16, 48)):
        assert policy.step_time(n, drafts, False) == pytest.approx(cpu_step_seconds(n + drafts),
                                                                   rel=0.08), (n, drafts)
    reqs = [f"r{i}" for i in range(16)]
    for req in reqs:  # lookup tokens accepted 80% of the time
        policy._counts[req] = np.array([0.8e6, 1e6, 0.0, 0.0])
    # Batch 1: 4 tokens cost ~4% and bring ~2.4 tokens. Batch 16: one token per row costs +90%
    # (16 -> 32 tokens) and brings +80%; more tokens per row cost more still.
    assert policy.allocate(reqs[:1], lookup_lengths=[4]) == [4]
    assert policy.allocate(reqs, lookup_lengths=[4] * 16) == [0] * 16


def drive_with_lookup(policy: AdaptiveDraftLength, num_reqs: int, lookup_accept: float,
                      steps: int) -> list[int]:
    """`steps` engine steps of `num_reqs` requests, each with 4 lookup tokens accepted at
    `lookup_accept` per token, every step timed at cpu_step_seconds: draft tokens per step."""
    reqs = [f"r{i}" for i in range(num_reqs)]
    for req in reqs:
        policy._counts[req] = np.array([lookup_accept * 1e6, 1e6, 0.0, 0.0])
    decisions = []
    for _ in range(steps):
        drafts = sum(policy.allocate(reqs, lookup_lengths=[4] * num_reqs))
        decisions.append(drafts)
        policy.record_step(num_reqs, drafts, cpu_step_seconds(num_reqs + drafts), drafter_ran=False)
    return decisions


def test_a_drafting_controller_keeps_timing_steps_without_drafts():
    """Seen at temperature 0, batch 16: lookup tokens were drafted in nearly every step, so nearly
    every timed step computed ~22 tokens and f(16) was an extrapolation: the fit priced six draft
    tokens at ~0 ms (true: ~5 ms each here) and the engine drafted at 0.85x of no speculation.
    While it drafts, the controller makes a step without drafts (a cost probe) when none was
    timed in the last `probe_every` steps at a similar batch size."""
    policy = AdaptiveDraftLength(max_draft_tokens=4, explore_every=0)
    for _ in range(40):
        policy.record_step(16, 6, cpu_step_seconds(22), drafter_ran=False)
    decisions = drive_with_lookup(policy, num_reqs=16, lookup_accept=0.8,
                                  steps=4 * policy.probe_every)
    assert decisions[0] == 0  # a probe: no recent step without drafts
    # With both kinds of steps timed, drafting at batch 16 is seen not to pay (16 -> 32 tokens
    # costs +90%, brings +80%; test_draft_token_cost_is_fitted_at_the_batch_size_it_is_used_for).
    assert decisions[-policy.probe_every:] == [0] * policy.probe_every


def test_the_cost_fit_follows_the_host_speed():
    """The host's speed drifts (the same 16-token step took 70 ms and 107 ms seconds apart here):
    recent steps weigh most (half-life `half_life` steps)."""
    def fitted(half_life: float) -> float:
        policy = AdaptiveDraftLength(max_draft_tokens=4, explore_every=0, half_life=half_life)
        for speed in (1.3, 1.0):  # 64 steps on a slower host, then 64 now
            for i in range(64):
                drafts = 8 * (i % 2)
                policy.record_step(16, drafts, speed * cpu_step_seconds(16 + drafts), drafter_ran=False)
        return policy.step_time(16, 0, False) / cpu_step_seconds(16)
    assert fitted(32.0) == pytest.approx(1.0, abs=0.08)
    assert fitted(0.0) > 1.1  # unweighted: the average of both hosts


def test_probes_cost_at_most_one_step_in_probe_every_where_drafting_pays():
    policy = AdaptiveDraftLength(max_draft_tokens=4, explore_every=0)
    decisions = drive_with_lookup(policy, num_reqs=4, lookup_accept=0.95,
                                  steps=8 * policy.probe_every)
    steady = decisions[policy.probe_every:]
    assert max(steady) == 16  # drafting pays at batch 4: every row drafts its 4 lookup tokens
    assert 1 <= steady.count(0) <= len(steady) // policy.probe_every + 1


def cpu_timed_policy(**kwargs) -> AdaptiveDraftLength:
    """A policy whose target cost fit has seen steps of batch 1 to 16 timed at cpu_step_seconds
    (no drafter: lookup tokens only)."""
    policy = AdaptiveDraftLength(max_draft_tokens=4, explore_every=0, **kwargs)
    rng = np.random.default_rng(1)
    for i in range(120):
        n = (1, 4, 16)[i % 3]
        drafts = int(rng.integers(0, 4 * n + 1)) if i % 2 else 0
        policy.record_step(n, drafts, cpu_step_seconds(n + drafts), drafter_ran=False)
    return policy


def simulate_closed_batch(policy: AdaptiveDraftLength, accept: list[float], max_tokens: int,
                          closed: bool, seed: int = 0) -> float:
    """One closed batch of len(accept) requests, each accepting lookup tokens at its own rate
    (every step offers 4), decoded to max_tokens each; seconds at cpu_step_seconds."""
    rng = np.random.default_rng(seed)
    reqs = [f"r{i}" for i in range(len(accept))]
    for req, rate in zip(reqs, accept):
        policy._counts[req] = np.array([rate * 1e6, 1e6, 0.0, 0.0])
    left = dict.fromkeys(reqs, max_tokens)
    seconds = 0.0
    while left:
        alive = list(left)
        alloc = policy.allocate(alive, lookup_lengths=[4] * len(alive),
                                remaining=[left[r] for r in alive] if closed else None)
        seconds += cpu_step_seconds(len(alive) + sum(alloc))
        for req, drafts in zip(alive, alloc):
            rate = accept[reqs.index(req)]
            accepted = 0
            while accepted < drafts and rng.random() < rate:
                accepted += 1
            left[req] -= 1 + accepted
            if left[req] <= 0:
                del left[req]
    return seconds


def test_closed_batch_drafts_nothing_when_a_row_that_ends_the_batch_cannot_be_sped_up():
    """A closed batch ends with its last request: drafting for 3 of 4 requests that share the end
    gains nothing when the 4th accepts nothing; the open objective (every token counts) drafts
    for the 3. One request: both objectives agree."""
    policy = cpu_timed_policy()
    reqs = ["good0", "good1", "good2", "bad"]
    for req in reqs[:3]:
        policy._counts[req] = np.array([0.9e6, 1e6, 0.0, 0.0])
    policy._counts["bad"] = np.array([0.0, 1e6, 0.0, 0.0])
    lookup = [4, 4, 4, 4]
    assert policy.allocate(reqs, lookup, remaining=[64] * 4) == [0, 0, 0, 0]
    assert sum(policy.allocate(reqs, lookup)[:3]) > 0
    # The bad request 10 tokens behind (it finishes first anyway): the others draft.
    assert all(policy.allocate(reqs, lookup, remaining=[64, 64, 64, 54])[:3])
    for rate in (0.3, 0.6, 0.9):
        policy._counts["one"] = np.array([rate * 1e6, 1e6, 0.0, 0.0])
        assert policy.allocate(["one"], [4], remaining=[64]) == policy.allocate(["one"], [4])


def test_closed_batch_rows_that_finish_early_anyway_draft_nothing():
    policy = cpu_timed_policy()
    reqs = [f"r{i}" for i in range(4)]
    for req in reqs:
        policy._counts[req] = np.array([0.9e6, 1e6, 0.0, 0.0])
    # The long rows need 64 / (1 + 3.1) ~ 16 steps at 4 drafts; 12 and 3 tokens take fewer undrafted.
    alloc = policy.allocate(reqs, [4] * 4, remaining=[64, 64, 12, 3])
    assert alloc[0] > 0 and alloc[0] == alloc[1] and alloc[2] == alloc[3] == 0, alloc
    # A row never drafts more tokens than it may still generate less one.
    assert policy.allocate(reqs[:1], [4], remaining=[3]) == [2]


@pytest.mark.parametrize("accept", [[0.9] * 16, [0.9] * 12 + [0.05] * 4, [0.6] * 16,
                                    [0.95] * 4, [0.9, 0.9, 0.9, 0.05]])
def test_closed_batch_objective_finishes_closed_batches_no_later(accept):
    """Simulated closed batches (lookup tokens only, costs of this CPU): planning for the batch's
    end is never slower than counting every token, and never slower than not drafting."""
    plain = simulate_closed_batch(cpu_timed_policy(), [0.0] * len(accept), 64, closed=False)
    open_s = np.mean([simulate_closed_batch(cpu_timed_policy(), accept, 64, False, s) for s in range(3)])
    closed_s = np.mean([simulate_closed_batch(cpu_timed_policy(), accept, 64, True, s) for s in range(3)])
    print(f"{accept}: plain {plain:.2f} s, open {open_s:.2f} s, closed {closed_s:.2f} s")
    assert closed_s <= 1.01 * open_s
    assert closed_s <= 1.01 * plain


def test_exploration_at_a_large_batch_spends_about_one_plain_step():
    """Seen at batch 16: an exploration step gave every row all its lookup tokens (16 + 80 tokens,
    324 ms against a 55 ms plain step). Lookup tokens now fill at most half a plain step."""
    policy = cpu_timed_policy()
    policy.explore_every, policy._next_explore = 1, 1
    reqs = [f"r{i}" for i in range(16)]
    for req in reqs:
        policy._counts[req] = np.array([0.0, 1e6, 0.0, 0.0])  # drafting does not pay: explore only
    alloc = policy.allocate(reqs, lookup_lengths=[4] * 16)
    plain = cpu_step_seconds(16)
    assert 0 < sum(alloc) and cpu_step_seconds(16 + sum(alloc)) - plain <= 0.5 * plain, alloc
    assert set(alloc) <= {0, 4}  # a row's lookup tokens come whole


def test_refill_watch_tells_closed_batches_from_loaded_ones():
    """Closed: a request finished and none joined the running ones within `window` steps. New
    requests that start an empty batch (the next generate() call) are not a refill."""
    from vllm_specdiff.drafting.adaptive import RefillWatch

    watch = RefillWatch(window=4)
    for _ in range(10):
        watch.observe(finished=0, new=0, running=8)
    assert not watch.closed  # no evidence yet: open, as a loaded server
    watch.observe(finished=1, new=0, running=7)
    for _ in range(3):
        watch.observe(finished=0, new=0, running=7)
    assert not watch.closed  # a waiting request may still come
    watch.observe(finished=0, new=0, running=7)
    assert watch.closed
    watch.observe(finished=7, new=8, running=0)  # the next batch, into an empty engine
    for _ in range(5):
        watch.observe(finished=0, new=0, running=8)
    assert watch.closed
    watch.observe(finished=1, new=0, running=7)
    watch.observe(finished=0, new=1, running=7)  # a waiting request takes the freed slot
    assert not watch.closed
    watch.observe(finished=2, new=2, running=6)  # refilled in the same step
    for _ in range(6):
        watch.observe(finished=0, new=0, running=8)
    assert not watch.closed
    # Closed again, then a server's next wave: its requests trickle in over several steps.
    watch.observe(finished=8, new=0, running=0)
    for _ in range(4):
        watch.observe(finished=0, new=0, running=0)
    assert watch.closed
    watch.observe(finished=0, new=3, running=0)
    assert watch.closed
    watch.observe(finished=0, new=5, running=3)
    assert not watch.closed
