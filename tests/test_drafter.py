"""DiffusionDrafter: exactness of the draft laws (enumeration), properties and input errors."""
from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from vllm_specdiff import DiffusionDrafter, SEDD, SEDDConfig
from vllm_specdiff.diffusion import SAMPLING_EPS, time_grid, total_noise
from vllm_specdiff.drafting.base import tempered_probs
from vllm_specdiff.drafting.diffusion import analytic_step_law

from exact_law import VOCAB, continuation_law, round_output_law, target_law, total_variation



FIXTURE = Path(__file__).parent / "fixtures" / "markov-sedd"


def markov_sedd() -> SEDD:
    """A tiny trained SEDD (4 tokens, see fixtures/make_markov_sedd.py): strongly dependent
    positions and calibrated scores, in float64 so enumerated laws are exact to ~1e-15."""
    return SEDD.from_pretrained(FIXTURE, dtype=torch.float64).requires_grad_(False)


def random_sedd(tokens: int = 30, length: int = 32, seed: int = 0) -> SEDD:
    """Random weights with non-zero adaLN paths and order-1 logits (spread-out draft rows)."""
    torch.manual_seed(seed)
    model = SEDD(SEDDConfig(tokens=tokens, hidden_size=64, cond_dim=32, length=length,
                            n_blocks=2, n_heads=2)).eval()
    for name, param in model.named_parameters():
        if "adaLN" in name:
            torch.nn.init.normal_(param, std=0.1)
    torch.nn.init.normal_(model.output_layer.linear.weight, std=0.1)
    return model.requires_grad_(False)


def initial_indices(drafter: DiffusionDrafter, context):
    prefix = list(context[-(drafter.window - drafter.num_draft_tokens):])
    indices = torch.tensor([prefix + [drafter.mask_token_id] * drafter.num_draft_tokens])
    positions = len(prefix) + torch.arange(drafter.num_draft_tokens)[None]
    return indices, positions


def normalized(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.double()
    return rows / rows.sum(-1, keepdim=True)


def enumerate_left_to_right(drafter: DiffusionDrafter, context, known: dict[int, int] | None = None):
    """Every draft with its probability and recorded rows, by walking the drafter's own steps.
    `known` {draft position: token}: positions revealed before drafting (prompt lookup); their
    token is fixed and their recorded row is one-hot."""
    known = known or {}
    indices, positions = initial_indices(drafter, context)
    grid = time_grid(drafter.num_steps)
    paths = [((), 1.0, [])]
    for step in range(drafter.num_steps):
        start, end = drafter.block_bounds[step], drafter.block_bounds[step + 1]
        free = [j for j in range(start, end) if j not in known]
        choices = [[known[j]] if j in known else range(VOCAB) for j in range(start, end)]
        next_paths = []
        for tokens, weight, rows in paths:
            current = indices.clone()
            for j, token in known.items():
                current[0, positions[0, j]] = token
            current[0, positions[0, :len(tokens)]] = torch.tensor(tokens, dtype=torch.long)
            block_rows = None
            if free:  # a block whose positions are all revealed runs no forward
                log_score = drafter._log_scores(current, None, positions[:, start:end], grid[step])
                block_rows = normalized(tempered_probs(log_score[..., :-1], torch.ones(1))[0])
            step_rows = [torch.nn.functional.one_hot(torch.tensor(known[j]), VOCAB).double()
                         if j in known else block_rows[j - start] for j in range(start, end)]
            for block in itertools.product(*choices):
                w = weight
                for j in free:
                    w *= float(block_rows[j - start, block[j - start]])
                next_paths.append((tokens + block, w, rows + step_rows))
        paths = next_paths
    return paths


def enumerate_random_order(drafter: DiffusionDrafter, context, times=None, keep_rows: bool = True):
    """Every path of the drafter's `random` order: (draft tokens, probability, rows recorded at
    unmasking), walking the drafter's own forward times and step law (`random_order_times`,
    `analytic_step_law`). `times` replaces the forward times (to enumerate the old behaviour);
    keep_rows=False merges paths by their tokens (rows None): the draft law only, much faster."""
    indices, positions = initial_indices(drafter, context)
    num_draft = drafter.num_draft_tokens
    times = drafter.random_order_times() if times is None else times
    laws = {}  # (step, tokens) -> (P(unmask) [num_draft], rows [num_draft, VOCAB]) of that forward
    # (tokens, the forward each recorded row came from) -> probability
    paths = {((None,) * num_draft, (None,) * num_draft): 1.0}
    for step, (t, s) in enumerate(times):
        next_paths = defaultdict(float)
        for (tokens, origins), weight in paths.items():
            if (step, tokens) not in laws:
                current = indices.clone()
                for j, token in enumerate(tokens):
                    if token is not None:
                        current[0, positions[0, j]] = token
                log_score = drafter._log_scores(current, None, positions, t)
                p_unmask, step_rows = analytic_step_law(log_score, t, s, torch.ones(1))
                laws[(step, tokens)] = (p_unmask[0].double(), normalized(step_rows[0]))
            p_unmask, step_rows = laws[(step, tokens)]
            origin = (step, tokens) if keep_rows else None
            options = []  # per position: list of (token or None, origin of its row, probability)
            for j in range(num_draft):
                if tokens[j] is not None:
                    options.append([(tokens[j], origins[j], 1.0)])
                    continue
                choice = [(y, origin, float(p_unmask[j] * step_rows[j, y])) for y in range(VOCAB)]
                choice.append((None, None, 1.0 - float(p_unmask[j])))  # 0 at the final denoise
                options.append(choice)
            for combo in itertools.product(*options):
                w = weight
                for _, _, p in combo:
                    w *= p
                if w > 0:
                    next_paths[(tuple(c[0] for c in combo), tuple(c[1] for c in combo))] += w
        paths = next_paths
    assert all(None not in tokens for tokens, _ in paths)
    return [(tokens, w, [laws[o][1][j] for j, o in enumerate(origins)] if keep_rows else None)
            for (tokens, origins), w in paths.items()]


def reference_sampler_law(model: SEDD, context, num_draft: int, num_steps: int) -> dict:
    """Exact draft law of the reference SEDD sampler, enumerated from its own operations.

    louaaron/Score-Entropy-Discrete-Diffusion, sampling.get_pc_sampler(predictor="analytic",
    steps=num_steps, denoise=True, eps=1e-5, proj_fun=<write the context>): for i < num_steps,
    AnalyticPredictor.update_fn at t = timesteps[i] with step_size (1 - eps) / num_steps, then
    Denoiser.update_fn at timesteps[-1]; the absorbing graph's staggered_score and transp_transition;
    score_fn(sampling=True) = exp(model output); sample_categorical = argmax(probs / Exp(1)), a draw
    proportional to the positive entries of probs. Written independently of drafting/diffusion.py (float64).
    """
    dim = model.config.vocab_size  # tokens + the absorbing state, the last index
    eps = 1e-5
    timesteps = torch.linspace(1, eps, num_steps + 1, dtype=torch.float64)
    dt = (1 - eps) / num_steps

    def total_noise_ref(t):  # LogLinearNoise(eps=1e-3).total_noise
        return -torch.log1p(-(1 - 1e-3) * t)

    def staggered_score(score, dsigma):  # Absorbing.staggered_score
        extra_const = (1 - dsigma.exp()) * score.sum(dim=-1)
        score = score * dsigma.exp()
        score[..., -1] += extra_const
        return score

    def transp_transition(x, sigma):  # Absorbing.transp_transition
        edge = (-sigma).exp() * torch.nn.functional.one_hot(x, num_classes=dim)
        edge += torch.where(x == dim - 1, 1 - (-sigma).exp(), 0)[..., None]
        return edge

    def update(states, sigma, dsigma, truncate):
        out = defaultdict(float)
        for x, weight in states.items():
            x_t = torch.tensor([x])
            score = model(x_t, sigma.reshape(1)).exp()
            probs = (staggered_score(score, dsigma) * transp_transition(x_t, dsigma))[0]
            if truncate:  # the Denoiser drops the absorbing state
                probs = probs[..., :-1]
            law = probs.clamp(min=0)
            law = law / law.sum(-1, keepdim=True)
            choices = [[(y, float(law[j, y])) for y in range(law.shape[-1]) if law[j, y] > 0]
                       for j in range(len(context), len(x))]
            for combo in itertools.product(*choices):
                w = weight
                for _, p in combo:
                    w *= p
                out[tuple(context) + tuple(y for y, _ in combo)] += w
        return out

    states = {tuple(context) + (dim - 1,) * num_draft: 1.0}
    for i in range(num_steps):
        curr_sigma, next_sigma = total_noise_ref(timesteps[i]), total_noise_ref(timesteps[i] - dt)
        states = update(states, curr_sigma, curr_sigma - next_sigma, truncate=False)
    sigma = total_noise_ref(timesteps[-1])
    states = update(states, sigma, sigma, truncate=True)
    return {x[len(context):]: w for x, w in states.items()}


def draft_marginal(paths) -> dict[tuple[int, ...], float]:
    law = defaultdict(float)
    for tokens, weight, _ in paths:
        law[tokens] += weight
    return law


CONTEXT = [1, 3, 0, 2, 2]


@pytest.fixture
def one_thread():
    """The enumerations run thousands of tiny forwards: intra-op threads only add overhead (10x on
    a busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("num_draft, num_steps", [(2, 1), (2, 2), (3, 2), (3, 3)])
def test_left_to_right_full_q_verification_is_exact(num_draft, num_steps, one_thread):
    drafter = DiffusionDrafter(markov_sedd(), num_draft, num_steps)
    paths = enumerate_left_to_right(drafter, CONTEXT)
    assert abs(sum(w for _, w, _ in paths) - 1) < 1e-12
    horizon = num_draft + 1
    law = round_output_law(CONTEXT, paths, horizon)
    target = continuation_law(tuple(CONTEXT), horizon)
    assert total_variation(law, target) < 1e-9


@pytest.mark.parametrize("num_draft, num_steps, known", [(2, 2, {0: 3}), (3, 3, {0: 1, 1: 1}),
                                                          (3, 2, {0: 2}), (3, 1, {1: 0})])
def test_lookup_revealed_positions_are_exact(num_draft, num_steps, known, one_thread):
    """Positions filled before drafting (prompt lookup: a function of the context, so a point mass)
    with one-hot rows, the drafter denoising the others around them left to right: the round's
    output law is the target's. {1: 0} reveals a later position inside the only step's block."""
    drafter = DiffusionDrafter(markov_sedd(), num_draft, num_steps)
    paths = enumerate_left_to_right(drafter, CONTEXT, known)
    assert abs(sum(w for _, w, _ in paths) - 1) < 1e-12
    assert all(tokens[j] == token for tokens, _, _ in paths for j, token in known.items())
    horizon = num_draft + 1
    law = round_output_law(CONTEXT, paths, horizon)
    assert total_variation(law, continuation_law(tuple(CONTEXT), horizon)) < 1e-9
    # The same drafts with the revealed rows recorded as the drafter's own law instead (what a
    # proposer that forgot to record the point mass would send) are not exact: the test can fail.
    wrong = [(tokens, w, [torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64) if j in known
                          else row for j, row in enumerate(rows)]) for tokens, w, rows in paths]
    assert total_variation(round_output_law(CONTEXT, wrong, horizon),
                           continuation_law(tuple(CONTEXT), horizon)) > 1e-3


@pytest.mark.parametrize("order", ["left_to_right", "random"])
def test_revealed_drafts_follow_the_enumerated_law(order, one_thread):
    """Ties draft(revealed_tokens=...) to the enumeration: 8k float32 drafts with position 0
    revealed vs the enumerated law (left to right: also the recorded rows); every revealed
    position keeps its token with a one-hot row, a row without revealed positions (-1) drafts as
    before, under both orders."""
    drafter = DiffusionDrafter(markov_sedd(), 3, 2, order=order)
    drafter.model = drafter.model.float()
    num = 8000
    revealed = torch.full((num, 3), -1, dtype=torch.long)
    revealed[:, 0] = 2
    out = drafter.draft([CONTEXT] * num, generator=torch.Generator().manual_seed(0),
                        revealed_tokens=revealed)
    assert (out.token_ids[:, 0] == 2).all()
    assert torch.equal(out.draft_probs[:, 0], torch.nn.functional.one_hot(
        torch.full((num,), 2), VOCAB).float())
    if order == "left_to_right":
        drafter.model = drafter.model.double()
        paths = enumerate_left_to_right(drafter, CONTEXT, {0: 2})
        law = draft_marginal(paths)
        counts = Counter(map(tuple, out.token_ids.tolist()))
        keys = sorted(law)
        assert sum(counts.values()) == num and set(counts) <= set(keys)
        assert chisquare([counts.get(k, 0) for k in keys], [num * law[k] for k in keys]).pvalue > 1e-3
        rows = {tokens: torch.stack(r) for tokens, _, r in paths}
        for i in range(0, num, 397):
            tokens = tuple(out.token_ids[i].tolist())
            assert torch.allclose(normalized(out.draft_probs[i]), rows[tokens], atol=1e-6)
        drafter.model = drafter.model.float()
    generator = torch.Generator().manual_seed(5)
    plain = drafter.draft([CONTEXT], generator=generator)
    again = drafter.draft([CONTEXT], generator=torch.Generator().manual_seed(5),
                          revealed_tokens=torch.full((1, 3), -1))
    assert torch.equal(plain.token_ids, again.token_ids)


@pytest.mark.parametrize("order", ["left_to_right", "random"])
def test_revealed_rows_are_batch_invariant_under_per_row_generators(order):
    """A seeded row drafts the same whether or not its batch neighbours have revealed positions:
    steps whose positions are all revealed still draw their noise (a skipped forward must not shift
    a row's random stream)."""
    drafter = DiffusionDrafter(random_sedd(), 4, 4, order=order, window=12)
    contexts = [[1, 2, 3], [4, 5, 6, 7]]
    revealed = torch.tensor([[7, 8, -1, -1], [-1, -1, -1, -1]])
    batch = drafter.draft(contexts, temperature=[1.0, 1.0], revealed_tokens=revealed,
                          generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    for row in range(2):
        alone = drafter.draft([contexts[row]], temperature=1.0, revealed_tokens=revealed[row:row + 1],
                              generator=[torch.Generator().manual_seed(row + 1)])
        assert torch.equal(alone.token_ids[0], batch.token_ids[row])
        assert torch.allclose(alone.draft_probs[0], batch.draft_probs[row], atol=1e-5)
    assert batch.token_ids[0, :2].tolist() == [7, 8]


@pytest.mark.parametrize("num_draft, num_steps", [(2, 2), (3, 2)])
def test_random_order_full_q_verification_is_not_exact(num_draft, num_steps, one_thread):
    drafter = DiffusionDrafter(markov_sedd(), num_draft, num_steps, order="random")
    paths = enumerate_random_order(drafter, CONTEXT)
    assert abs(sum(w for _, w, _ in paths) - 1) < 1e-12
    horizon = num_draft + 1
    error = total_variation(round_output_law(CONTEXT, paths, horizon),
                            continuation_law(tuple(CONTEXT), horizon))
    assert error > 1e-3, error  # measured ~1e-2: the recorded q is not the conditional law
    # One-hot verification (draft rows = delta at the drafted token) is exact for the same drafts.
    one_hot = [(tokens, w, [torch.nn.functional.one_hot(torch.tensor(t), VOCAB).double() for t in tokens])
               for tokens, w, _ in paths]
    assert total_variation(round_output_law(CONTEXT, one_hot, horizon),
                           continuation_law(tuple(CONTEXT), horizon)) < 1e-9


def old_random_order_times(drafter: DiffusionDrafter):
    """The `random` order before issue 15: num_steps forwards, the last one (at t = grid[T - 1])
    filling every remaining mask, with no denoise forward at t = 1e-5."""
    grid = time_grid(drafter.num_steps)
    return [(grid[i], grid[i + 1]) for i in range(drafter.num_steps - 1)] + [(grid[-2], None)]


@pytest.mark.parametrize("num_steps", [1, 2, 3])
def test_random_order_is_the_reference_sampler(num_steps, one_thread):
    """Exact draft laws on the fixture (3 draft tokens): the `random` order vs the reference
    analytic sampler + denoiser. Measured TV (context CONTEXT): 1.1e-7, 5.9e-8, 3.9e-8 for
    T = 1, 2, 3 (float32 draft rows); the old behaviour: 0.031, 0.010, 0.0046."""
    model = markov_sedd()
    drafter = DiffusionDrafter(model, 3, num_steps, order="random")
    reference = reference_sampler_law(model, CONTEXT, 3, num_steps)
    assert abs(sum(reference.values()) - 1) < 1e-12
    ours = draft_marginal(enumerate_random_order(drafter, CONTEXT, keep_rows=False))
    assert total_variation(ours, reference) < 1e-6
    # The same comparison rejects the old behaviour (so the test can fail).
    old = draft_marginal(enumerate_random_order(drafter, CONTEXT, old_random_order_times(drafter),
                                                keep_rows=False))
    assert total_variation(old, reference) > 3e-3


@pytest.mark.parametrize("order, enumerate_paths", [("left_to_right", enumerate_left_to_right),
                                                    ("random", enumerate_random_order)])
def test_drafter_samples_follow_the_enumerated_law(order, enumerate_paths, one_thread):
    """Ties the enumeration to draft(): empirical draft law of 20k drafts vs the enumerated law."""
    drafter = DiffusionDrafter(markov_sedd(), 2, 2, order=order)
    law = draft_marginal(enumerate_paths(drafter, CONTEXT))
    num = 8000
    drafter.model = drafter.model.float()  # the production dtype; the law was enumerated in float64
    out = drafter.draft([CONTEXT] * num, generator=torch.Generator().manual_seed(0))
    drafter.model = drafter.model.double()
    counts = Counter(map(tuple, out.token_ids.tolist()))
    keys = sorted(law)
    observed = [counts.get(k, 0) for k in keys]
    assert sum(observed) == num
    assert chisquare(observed, [num * law[k] for k in keys]).pvalue > 1e-3
    if order == "left_to_right":  # recorded rows are exactly the enumerated conditional rows
        rows = {tokens: torch.stack(r) for tokens, _, r in enumerate_left_to_right(drafter, CONTEXT)}
        for i in range(0, num, 397):
            tokens = tuple(out.token_ids[i].tolist())
            assert torch.allclose(normalized(out.draft_probs[i]), rows[tokens], atol=1e-6)


def test_draft_probs_rows_are_distributions_covering_the_draft():
    drafter = DiffusionDrafter(random_sedd(), 6, 3)
    out = drafter.draft([[1, 2, 3], [4] * 9, [7]], temperature=[1.0, 0.7, 1.3],
                        generator=torch.Generator().manual_seed(3))
    assert out.token_ids.shape == (3, 6) and out.token_ids.dtype == torch.int64
    assert out.draft_probs.shape == (3, 6, 30) and out.draft_probs.dtype == torch.float32
    assert torch.allclose(out.draft_probs.sum(-1), torch.ones(3, 6), atol=1e-5)
    assert (torch.gather(out.draft_probs, 2, out.token_ids[..., None]) > 0).all()
    assert ((out.token_ids >= 0) & (out.token_ids < 30)).all()


def test_temperature_zero_rows_are_argmax_with_one_hot_probs():
    drafter = DiffusionDrafter(random_sedd(), 4, 2)
    out = drafter.draft([[5, 6, 7], [5, 6, 7]], temperature=[0.0, 1.0],
                        generator=torch.Generator().manual_seed(0))
    greedy_probs = out.draft_probs[0]
    assert torch.equal(greedy_probs.max(-1).values, torch.ones(4))
    assert torch.equal(greedy_probs.argmax(-1), out.token_ids[0])
    again = drafter.draft([[5, 6, 7]], temperature=0.0, generator=torch.Generator().manual_seed(99))
    assert torch.equal(again.token_ids[0], out.token_ids[0])  # greedy ignores randomness


@pytest.mark.parametrize("order", ["left_to_right", "random"])
def test_batch_equals_each_context_alone_under_per_row_generators(order):
    drafter = DiffusionDrafter(random_sedd(), 5, 3, order=order, window=12)
    contexts = [[1, 2, 3], list(range(20)), [9, 9], [4, 5, 6, 7, 8, 9, 10]]
    seeds = [11, 12, 13, 14]
    batch = drafter.draft(contexts, temperature=[1.0, 0.0, 0.8, 1.0],
                          generator=[torch.Generator().manual_seed(s) for s in seeds])
    for row, (context, seed, temp) in enumerate(zip(contexts, seeds, [1.0, 0.0, 0.8, 1.0])):
        alone = drafter.draft([context], temperature=temp, generator=[torch.Generator().manual_seed(seed)])
        assert torch.equal(alone.token_ids[0], batch.token_ids[row])
        assert torch.allclose(alone.draft_probs[0], batch.draft_probs[row], atol=1e-5)


class ForwardRecorder:
    """Wraps a SEDD model and records every forward's inputs."""

    def __init__(self, model: SEDD) -> None:
        self.model, self.calls, self.sigma_bars = model, [], []
        self.config = model.config
        self.vocab_embed = model.vocab_embed

    def __call__(self, indices, sigma_bar, attention_mask=None, output_positions=None):
        self.calls.append((indices.clone(), output_positions.clone()))
        self.sigma_bars.append(sigma_bar.clone())
        return self.model(indices, sigma_bar, attention_mask=attention_mask, output_positions=output_positions)


@pytest.mark.parametrize("order", ["left_to_right", "random"])
def test_prefix_and_unmasked_positions_never_change(order):
    model = random_sedd()
    drafter = DiffusionDrafter(model, 6, 3, order=order, window=10)
    recorder = ForwardRecorder(model)
    drafter.model = recorder
    contexts = [list(range(1, 12)), [3, 4]]  # the first is longer than window - num_draft = 4
    out = drafter.draft(contexts, generator=torch.Generator().manual_seed(0))
    # One batched forward per denoising step; `random` adds the reference's final denoise forward.
    grid = time_grid(3)
    times = grid[:3] if order == "left_to_right" else grid  # the denoise runs at grid[-1] = 1e-5
    assert len(recorder.calls) == len(times)
    for sigma_bar, t in zip(recorder.sigma_bars, times):
        assert torch.allclose(sigma_bar.double(), total_noise(t).expand(2), rtol=1e-6)
    if order == "random":
        assert float(times[-1]) == SAMPLING_EPS
    mask_id = model.config.mask_token_id
    for row, context in enumerate(contexts):
        prefix = context[-4:]
        seen: dict[int, int] = {}
        for indices, _ in recorder.calls:
            assert indices[row, :len(prefix)].tolist() == prefix
            draft_slots = indices[row, len(prefix):len(prefix) + 6].tolist()
            for j, token in enumerate(draft_slots):
                if j in seen:
                    assert token == seen[j], "an unmasked draft position changed"
                elif token != mask_id:
                    seen[j] = token
        for j, token in seen.items():
            assert out.token_ids[row, j] == token
    if order == "left_to_right":
        # The head runs only at the block being unmasked; the block is masked when it runs.
        for step, (indices, positions) in enumerate(recorder.calls):
            start, end = drafter.block_bounds[step], drafter.block_bounds[step + 1]
            assert positions.shape[1] == end - start
            assert (torch.gather(indices, 1, positions) == mask_id).all()
            assert (torch.gather(indices, 1, positions[:, :1] - 1) != mask_id).all()
    else:
        for _, positions in recorder.calls:
            assert positions.shape[1] == 6  # draft positions only, never the prefix


def test_bad_inputs_give_clear_errors():
    model = random_sedd()
    with pytest.raises(ValueError, match="num_draft_tokens 0 out of range"):
        DiffusionDrafter(model, 0, 1)
    with pytest.raises(ValueError, match=r"num_draft_tokens 8 out of range.*window - 1 = 7"):
        DiffusionDrafter(model, 8, 1, window=8)
    with pytest.raises(ValueError, match="num_steps 0 out of range"):
        DiffusionDrafter(model, 4, 0)
    with pytest.raises(ValueError, match="num_steps 5 out of range"):
        DiffusionDrafter(model, 4, 5)
    with pytest.raises(ValueError, match="window 64 out of range"):
        DiffusionDrafter(model, 4, 2, window=64)
    with pytest.raises(ValueError, match="order 'middle_out' unknown"):
        DiffusionDrafter(model, 4, 2, order="middle_out")
    drafter = DiffusionDrafter(model, 4, 2)
    with pytest.raises(ValueError, match="context 1 is empty"):
        drafter.draft([[1], []])
    with pytest.raises(ValueError, match="token id 30, outside the drafter's vocabulary"):
        drafter.draft([[1, 30]])
    with pytest.raises(ValueError, match="token id -1"):
        drafter.draft([[-1]])
    with pytest.raises(ValueError, match="at least one context"):
        drafter.draft([])
    with pytest.raises(ValueError, match="one per context"):
        drafter.draft([[1], [2]], generator=[torch.Generator()])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        drafter.draft([[1]], temperature=-1.0)
    with pytest.raises(ValueError, match=r"revealed_tokens must be \[2, 4\]"):
        drafter.draft([[1], [2]], revealed_tokens=torch.full((2, 3), -1))
    with pytest.raises(ValueError, match="revealed token id 30 outside the drafter's vocabulary"):
        drafter.draft([[1]], revealed_tokens=torch.tensor([[30, -1, -1, -1]]))


def test_autocast_drafter_runs_fp32_weights_under_bf16_autocast():
    """autocast_dtype: the reference's GPU recipe (here on CPU); rows stay float32 distributions."""
    model = random_sedd()
    plain = DiffusionDrafter(model, 4, 2)
    mixed = DiffusionDrafter(model, 4, 2, autocast_dtype=torch.bfloat16)
    contexts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    out = mixed.draft(contexts, generator=torch.Generator().manual_seed(0))
    assert out.draft_probs.dtype == torch.float32
    assert torch.allclose(out.draft_probs.sum(-1), torch.ones(2, 4), atol=1e-5)
    assert model.vocab_embed.embedding.dtype == torch.float32  # the weights are not cast
    indices, positions = initial_indices(plain, contexts[0])
    t = time_grid(2)[0]
    with torch.no_grad():
        expected = model(indices, total_noise(t).float().expand(1), output_positions=positions)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(indices, total_noise(t).float().expand(1), output_positions=positions)
        assert torch.equal(mixed._log_scores(indices, None, positions, t), autocast)
        assert not torch.equal(plain._log_scores(indices, None, positions, t).bfloat16(), autocast)
        assert torch.equal(plain._log_scores(indices, None, positions, t), expected)
    with pytest.raises(ValueError, match="autocast_dtype needs float32 weights"):
        DiffusionDrafter(random_sedd().to(torch.bfloat16), 4, 2, autocast_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="autocast_dtype torch.float64 unsupported"):
        DiffusionDrafter(model, 4, 2, autocast_dtype=torch.float64)


def test_drafting_refuses_a_model_with_active_dropout():
    torch.manual_seed(0)
    model = SEDD(SEDDConfig(tokens=30, hidden_size=64, cond_dim=32, length=32, n_blocks=2, n_heads=2,
                            dropout=0.1))
    drafter = DiffusionDrafter(model.train(), 4, 2)
    with pytest.raises(ValueError, match="train mode with dropout 0.1.*call model.eval"):
        drafter.draft([[1, 2, 3]])
    model.eval()  # eval mode: deterministic given the generator
    first = drafter.draft([[1, 2, 3]], generator=torch.Generator().manual_seed(5))
    again = drafter.draft([[1, 2, 3]], generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.token_ids, again.token_ids) and torch.equal(first.draft_probs, again.draft_probs)
