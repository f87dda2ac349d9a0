"""Losslessness and behaviour of batched speculative verification (vllm_specdiff.verification).

- Exact enumeration (tiny vocabulary): the output law of one speculative round is computed by
  querying `rejection_sample_reference` itself: acceptance probabilities by bisection on u (the code
  decides accept/reject), recovered/bonus laws by bisection on the exponential-race inputs (the code
  decides which of two tokens wins the race, which reveals the ratio of their weights). Nothing of
  the algorithm is re-derived here; only the target law is written down independently.
- Chi-square over >= 100k seeded rounds through `rejection_sample`, with a power check.
- Greedy rows, placeholders, top-k/top-p filtering, random-number drawing, input validation.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from vllm_specdiff.verification import (
    PLACEHOLDER_TOKEN_ID,
    draw_random,
    rejection_sample,
    rejection_sample_reference,
    top_k_top_p_mask,
)

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Thousands of tiny-tensor calls: intra-op threads only add contention (10x slower on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Toy models: conditional tables indexed by the prefix
# ------------------------------------------------------------------------------------------------

def random_tables(vocab: int, depth: int, scale: float, seed: int) -> list[torch.Tensor]:
    """tables[i]: logits [vocab]*i + [vocab] of the next token after a prefix of length i."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn([vocab] * (i + 1), generator=generator, dtype=torch.float64) * scale
            for i in range(depth)]


def lookup(tables: list[torch.Tensor], prefixes: torch.Tensor, length: int) -> torch.Tensor:
    """[N, vocab] logits of the next token after prefixes[:, :length] (prefixes [N, >= length])."""
    if length == 0:
        return tables[0].expand(prefixes.shape[0], -1)
    return tables[length][tuple(prefixes[:, :length].T)]


def expected_target_law(logits: torch.Tensor, temperature: float, top_k: int, top_p: float
                        ) -> torch.Tensor:
    """Target law written out independently: softmax(logits / T), top-k, then top-p (float64)."""
    out = torch.empty_like(logits, dtype=torch.float64)
    for row in range(logits.shape[0]):
        scaled = [float(value) / temperature for value in logits[row]]
        order = sorted(range(len(scaled)), key=lambda v: -scaled[v])
        kept = order[:top_k] if 0 < top_k < len(scaled) else order
        weights = [math.exp(scaled[v] - scaled[kept[0]]) for v in kept]
        total = sum(weights)
        mass, nucleus = 0.0, []
        for v, weight in zip(kept, weights):
            if mass >= top_p and top_p < 1.0:
                break
            nucleus.append(v)
            mass += weight / total
        law = torch.zeros(len(scaled), dtype=torch.float64)
        for v in nucleus:
            law[v] = math.exp(scaled[v] - scaled[kept[0]])
        out[row] = law / law.sum()
    return out


def target_law_tables(target_tables: list[torch.Tensor], temperature: float, top_k: int,
                      top_p: float) -> list[torch.Tensor]:
    """Like target_tables, holding the (filtered) target law instead of logits."""
    laws = []
    for table in target_tables:
        vocab = table.shape[-1]
        laws.append(expected_target_law(table.reshape(-1, vocab), temperature, top_k, top_p)
                    .reshape(table.shape))
    return laws


def target_joint_law(target_tables: list[torch.Tensor], vocab: int, length: int, temperature: float,
                     top_k: int, top_p: float) -> torch.Tensor:
    """[vocab ** length] law of the first `length` target tokens (row-major over sequences)."""
    sequences = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    law = torch.ones(sequences.shape[0], dtype=torch.float64)
    for position in range(length):
        conditional = expected_target_law(lookup(target_tables, sequences, position), temperature,
                                          top_k, top_p)
        law *= conditional.gather(1, sequences[:, position:position + 1]).squeeze(1)
    return law


# ------------------------------------------------------------------------------------------------
# Drafting procedures: every draft with its probability and the q recorded for each position
# ------------------------------------------------------------------------------------------------

def autoregressive_drafts(vocab: int, num_draft: int, seed: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_i ~ q_i(. | x_<i), recording q_i: the conditional law (the exact case).

    Returns drafts [N, num_draft], probability [N], recorded draft_probs [N, num_draft, vocab].
    """
    tables = random_tables(vocab, num_draft, 1.5, seed)
    drafts = torch.tensor(list(itertools.product(range(vocab), repeat=num_draft)))
    draft_probs = torch.stack([lookup(tables, drafts, i).softmax(-1) for i in range(num_draft)], 1)
    probability = draft_probs.gather(2, drafts.unsqueeze(2)).squeeze(2).prod(1)
    return drafts, probability, draft_probs


def reverse_order_drafts(vocab: int, num_draft: int, seed: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A joint law J sampled right to left (like a random unmasking order), recording q_i = J(x_i |
    x_>i): x_i was generated looking at later tokens, so q_i is NOT the law of x_i given x_<i."""
    generator = torch.Generator().manual_seed(seed)
    joint = (torch.randn([vocab] * num_draft, generator=generator, dtype=torch.float64) * 2.0)
    joint = joint.flatten().softmax(-1).reshape([vocab] * num_draft)
    drafts = torch.tensor(list(itertools.product(range(vocab), repeat=num_draft)))
    recorded = []
    for i in range(num_draft):
        later_marginal = joint.sum(dim=tuple(range(i))) if i > 0 else joint  # [vocab]*(n - i)
        if i == num_draft - 1:
            rows = later_marginal.expand(drafts.shape[0], -1)
        else:
            rows = later_marginal.movedim(0, -1)[tuple(drafts[:, i + 1:].T)]  # [N, vocab]
        recorded.append(rows / rows.sum(-1, keepdim=True))
    probability = joint[tuple(drafts.T)]
    return drafts, probability, torch.stack(recorded, 1)


# ------------------------------------------------------------------------------------------------
# Exact output law of one round, measured through rejection_sample_reference
# ------------------------------------------------------------------------------------------------

_BISECTION_STEPS = 48
_NEVER = 1e150  # an exponential so large that the token cannot win the race


class RoundProbe:
    """Runs batches of single rounds (request r = one draft sequence) through the reference."""

    def __init__(self, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
                 target_tables: list[torch.Tensor], temperature: float, top_k: int, top_p: float):
        self.drafts = drafts  # [N, num_draft]
        self.draft_probs = draft_probs  # [N, num_draft, vocab] or None (one-hot)
        self.num_draft = drafts.shape[1]
        self.vocab = target_tables[0].shape[0]
        # [N, num_draft + 1, vocab]: row i = target logits after x_<i (row num_draft: bonus).
        self.row_logits = torch.stack(
            [lookup(target_tables, drafts, i) for i in range(self.num_draft + 1)], 1)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def run(self, which: torch.Tensor, uniform: torch.Tensor, exponential: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """which [R] draft index, uniform [R, num_draft], exponential [R, vocab] ->
        (output_token_ids [R, num_draft + 1], num_accepted [R])."""
        num_requests, n = which.shape[0], self.num_draft
        out = rejection_sample_reference(
            draft_token_ids=self.drafts[which].reshape(-1),
            cu_num_draft_tokens=torch.arange(1, num_requests + 1) * n,
            draft_probs=None if self.draft_probs is None
            else self.draft_probs[which].reshape(-1, self.vocab),
            target_logits=self.row_logits[which].reshape(-1, self.vocab),
            temperature=torch.full((num_requests,), self.temperature, dtype=torch.float64),
            top_k=torch.full((num_requests,), self.top_k) if self.top_k > 0 else None,
            top_p=torch.full((num_requests,), self.top_p) if self.top_p < 1.0 else None,
            uniform_samples=uniform.reshape(-1).to(torch.float64),
            exponential_samples=exponential.to(torch.float64),
            max_draft_len=n,
        )
        return out.output_token_ids, out.num_accepted

    def acceptance_probabilities(self) -> torch.Tensor:
        """[N, num_draft] P(accept x_i | reached i) = measure of the u_i the code accepts."""
        num_drafts, n = self.drafts.shape
        which = torch.arange(num_drafts).repeat_interleave(n)  # query (draft, position)
        position = torch.arange(n).repeat(num_drafts)
        slots = torch.arange(n).unsqueeze(0)
        # u = 0 before the probed position (always accepted), 0.5 after it (irrelevant).
        base = torch.where(slots < position.unsqueeze(1), 0.0, 0.5).to(torch.float64)
        low = torch.zeros(which.shape[0], dtype=torch.float64)
        high = torch.ones_like(low)
        exponential = torch.ones(which.shape[0], self.vocab, dtype=torch.float64)
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            uniform = torch.where(slots == position.unsqueeze(1), middle.unsqueeze(1), base)
            _, num_accepted = self.run(which, uniform, exponential)
            accepted = num_accepted > position
            low = torch.where(accepted, middle, low)
            high = torch.where(accepted, high, middle)
        return ((low + high) / 2).reshape(num_drafts, n)

    def emitted_laws(self, acceptance: torch.Tensor) -> torch.Tensor:
        """[N, num_draft + 1, vocab] law of the token emitted at slot k (k < num_draft: recovered
        after rejecting x_k; k = num_draft: bonus). Only the race inputs are varied: the code says
        which of two tokens wins argmax(w / E), and bisection on E_b / E_a yields w_b / w_a."""
        num_drafts, n, vocab = self.drafts.shape[0], self.num_draft, self.vocab
        which = torch.arange(num_drafts).repeat_interleave(n + 1)
        slot = torch.arange(n + 1).repeat(num_drafts)
        positions = torch.arange(n).unsqueeze(0)
        reject_u = ((acceptance[which] + 1) / 2).gather(1, slot.clamp(max=n - 1).unsqueeze(1))
        uniform = torch.where(positions < slot.unsqueeze(1), 0.0, 0.5).to(torch.float64)
        uniform = torch.where(positions == slot.unsqueeze(1), reject_u, uniform)
        reachable = (slot == n) | (acceptance[which].gather(
            1, slot.clamp(max=n - 1).unsqueeze(1)).squeeze(1) < 1 - 1e-12)

        def winners(exponential: torch.Tensor, repeat: int) -> torch.Tensor:
            output, num_accepted = self.run(which.repeat(repeat), uniform.repeat(repeat, 1),
                                            exponential)
            assert torch.equal(num_accepted[reachable.repeat(repeat)],
                               slot.repeat(repeat)[reachable.repeat(repeat)])
            return output.gather(1, slot.repeat(repeat).unsqueeze(1)).squeeze(1)

        num_queries = which.shape[0]
        # Support: token v alone has a finite exponential; it wins iff its weight is positive.
        exponential = torch.full((vocab, num_queries, vocab), _NEVER, dtype=torch.float64)
        for v in range(vocab):
            exponential[v, :, v] = 1.0
        support = (winners(exponential.reshape(-1, vocab), vocab).reshape(vocab, num_queries)
                   == torch.arange(vocab).unsqueeze(1)).T  # [queries, vocab]
        anchor = support.long().argmax(1)  # first supported token: weight 1
        low = torch.full((vocab, num_queries), -30.0, dtype=torch.float64)
        high = torch.full_like(low, 30.0)
        rivals = torch.arange(vocab).unsqueeze(1).expand(vocab, num_queries)
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2  # log(E_b / E_a); b wins iff middle < log(w_b / w_a)
            exponential = torch.full((vocab, num_queries, vocab), _NEVER, dtype=torch.float64)
            exponential.scatter_(2, anchor.expand(vocab, num_queries).unsqueeze(2), 1.0)
            exponential.scatter_(2, rivals.unsqueeze(2), middle.exp().unsqueeze(2))
            rival_wins = winners(exponential.reshape(-1, vocab), vocab).reshape(vocab, num_queries)
            rival_wins = rival_wins == rivals
            low = torch.where(rival_wins, middle, low)
            high = torch.where(rival_wins, high, middle)
        log_ratio = ((low + high) / 2).T  # [queries, vocab]
        weights = torch.where(support, log_ratio.exp(), 0.0)
        weights[torch.arange(num_queries), anchor] = 1.0
        laws = weights / weights.sum(1, keepdim=True)
        return torch.where(reachable.unsqueeze(1), laws, 0.0).reshape(num_drafts, n + 1, vocab)


def exact_round_law(drafts: torch.Tensor, probability: torch.Tensor,
                    draft_probs: torch.Tensor | None, target_tables: list[torch.Tensor],
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[vocab ** (num_draft + 1)] law of the first num_draft + 1 tokens when one speculative round
    is followed by target sampling (tokens after the round's output drawn from the target law)."""
    probe = RoundProbe(drafts, draft_probs, target_tables, temperature, top_k, top_p)
    vocab, n = probe.vocab, probe.num_draft
    acceptance = probe.acceptance_probabilities()  # [N, n]
    emitted = probe.emitted_laws(acceptance)  # [N, n + 1, vocab]
    sequences = torch.tensor(list(itertools.product(range(vocab), repeat=n + 1)))
    continuation = torch.ones(sequences.shape[0], n + 2, dtype=torch.float64)
    for position in range(n, -1, -1):  # continuation[:, j] = P_target(y_j..y_n | y_<j)
        conditional = expected_target_law(lookup(target_tables, sequences, position), temperature,
                                          top_k, top_p)
        continuation[:, position] = continuation[:, position + 1] * conditional.gather(
            1, sequences[:, position:position + 1]).squeeze(1)
    law = torch.zeros(sequences.shape[0], dtype=torch.float64)
    for draft_index in range(drafts.shape[0]):
        draft = drafts[draft_index]
        reach = probability[draft_index]  # P(draft) * P(accept x_<k)
        for k in range(n + 1):
            stop = 1.0 if k == n else 1.0 - acceptance[draft_index, k]
            matches_prefix = (sequences[:, :k] == draft[:k]).all(1)
            token_law = emitted[draft_index, k].gather(0, sequences[:, k])
            law += torch.where(matches_prefix, reach * stop * token_law
                               * continuation[:, k + 1], 0.0)
            if k < n:
                reach = reach * acceptance[draft_index, k]
    return law


def total_variation(law: torch.Tensor, other: torch.Tensor) -> float:
    return 0.5 * float((law - other).abs().sum())


@pytest.mark.parametrize("vocab,num_draft", [(3, 2), (4, 2), (3, 3)])
def test_exact_full_q_with_conditional_draft_law(vocab: int, num_draft: int) -> None:
    target = random_tables(vocab, num_draft + 1, 1.5, seed=1)
    drafts, probability, draft_probs = autoregressive_drafts(vocab, num_draft, seed=2)
    law = exact_round_law(drafts, probability, draft_probs, target)
    expected = target_joint_law(target, vocab, num_draft + 1, 1.0, 0, 1.0)
    assert abs(float(law.sum()) - 1.0) < 1e-12
    assert total_variation(law, expected) < 1e-9


def test_exact_full_q_with_temperature_top_k_top_p() -> None:
    vocab, num_draft, temperature, top_k, top_p = 5, 2, 0.7, 4, 0.9
    target = random_tables(vocab, num_draft + 1, 1.5, seed=3)
    drafts, probability, draft_probs = autoregressive_drafts(vocab, num_draft, seed=4)
    law = exact_round_law(drafts, probability, draft_probs, target, temperature, top_k, top_p)
    expected = target_joint_law(target, vocab, num_draft + 1, temperature, top_k, top_p)
    assert (expected == 0).any(), "the filters should remove some sequences"
    assert total_variation(law, expected) < 1e-9


@pytest.mark.parametrize("vocab,num_draft", [(3, 2), (4, 3)])
def test_exact_one_hot_even_when_recorded_q_is_not_conditional(vocab: int, num_draft: int) -> None:
    target = random_tables(vocab, num_draft + 1, 1.5, seed=5)
    drafts, probability, recorded = reverse_order_drafts(vocab, num_draft, seed=6)
    expected = target_joint_law(target, vocab, num_draft + 1, 1.0, 0, 1.0)
    one_hot_error = total_variation(exact_round_law(drafts, probability, None, target), expected)
    full_q_error = total_variation(exact_round_law(drafts, probability, recorded, target), expected)
    assert one_hot_error < 1e-9
    assert full_q_error > 1e-3, f"non-conditional recorded q should be wrong: {full_q_error}"


# ------------------------------------------------------------------------------------------------
# Chi-square over many seeded rounds through rejection_sample
# ------------------------------------------------------------------------------------------------

def sample_rounds(num_rounds: int, vocab: int, num_draft: int, one_hot: bool, temperature: float,
                  top_k: int, top_p: float, target: list[torch.Tensor],
                  verify_target: list[torch.Tensor], seed: int, device: str = "cpu") -> torch.Tensor:
    """[num_rounds] index of the first num_draft + 1 tokens (row-major) of one batched round per
    request, verified against `verify_target` and continued with `target` sampling. On a CUDA
    `device` the verification runs in the Triton kernels (what `rejection_sample` picks there)."""
    generator = torch.Generator().manual_seed(seed)
    draft_tables = random_tables(vocab, num_draft, 1.0, seed + 1)
    drafts = torch.zeros(num_rounds, num_draft, dtype=torch.int64)
    draft_probs = torch.zeros(num_rounds, num_draft, vocab)
    for i in range(num_draft):
        draft_probs[:, i] = lookup(draft_tables, drafts, i).softmax(-1).float()
        drafts[:, i] = torch.multinomial(draft_probs[:, i], 1, generator=generator).squeeze(1)
    row_logits = torch.stack([lookup(verify_target, drafts, i) for i in range(num_draft + 1)], 1)
    cu_num_draft_tokens = torch.arange(1, num_rounds + 1) * num_draft
    uniform, exponential = draw_random(cu_num_draft_tokens, vocab, generator, "cpu")
    inputs = (drafts.reshape(-1), cu_num_draft_tokens,
              None if one_hot else draft_probs.reshape(-1, vocab),
              row_logits.reshape(-1, vocab).float(), torch.full((num_rounds,), temperature),
              torch.full((num_rounds,), top_k), torch.full((num_rounds,), top_p), uniform,
              exponential)
    out = rejection_sample(*(x if x is None else x.to(device) for x in inputs))
    tokens = out.output_token_ids.cpu().clone()  # [num_rounds, num_draft + 1]
    num_accepted = out.num_accepted.cpu()
    laws = target_law_tables(target, temperature, top_k, top_p)
    for position in range(1, num_draft + 1):  # continue each round with target sampling
        law = lookup(laws, tokens.clamp(min=0), position)
        sampled = torch.multinomial(law, 1, generator=generator).squeeze(1)
        emitted = num_accepted >= position
        tokens[:, position] = torch.where(emitted, tokens[:, position], sampled)
    assert (tokens >= 0).all()
    return (tokens * vocab ** torch.arange(num_draft, -1, -1)).sum(1)


def chi_square_p_value(cells: torch.Tensor, law: torch.Tensor) -> float:
    observed = torch.bincount(cells, minlength=law.shape[0]).double()
    if observed[law == 0].sum() > 0:
        return 0.0  # a sequence the law cannot produce (e.g. a filtered-out token) was emitted
    nonzero = law > 0
    expected = law[nonzero] / law[nonzero].sum() * observed.sum()
    return float(scipy_stats.chisquare(observed[nonzero].numpy(), expected.numpy()).pvalue)


CHI_SQUARE_CASES = {
    "full_q": dict(one_hot=False, temperature=1.0, top_k=0, top_p=1.0),
    "one_hot": dict(one_hot=True, temperature=1.0, top_k=0, top_p=1.0),
    "full_q_filtered": dict(one_hot=False, temperature=0.8, top_k=3, top_p=0.85),
}


# On CUDA the law check runs through the compiled Triton kernels (one 120k-request batch); without a
# GPU (CI) those cases are skipped.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU on this machine"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CHI_SQUARE_CASES))
def test_chi_square_output_law_equals_target_law(case: str, device: str) -> None:
    if device == "cuda":
        pytest.importorskip("triton")
    vocab, num_draft, num_rounds = 4, 2, 120_000
    params = CHI_SQUARE_CASES[case]
    target = random_tables(vocab, num_draft + 1, 1.2, seed=10)
    law = target_joint_law(target, vocab, num_draft + 1, params["temperature"], params["top_k"],
                           params["top_p"])
    cells = sample_rounds(num_rounds, vocab, num_draft, target=target, verify_target=target,
                          seed=11, device=device, **params)
    assert chi_square_p_value(cells, law) > 1e-3
    # Power: verifying against a slightly different target must be detected.
    wrong = [table + 0.3 * torch.randn(table.shape, generator=torch.Generator().manual_seed(12),
                                       dtype=torch.float64) for table in target]
    wrong_cells = sample_rounds(num_rounds, vocab, num_draft, target=target, verify_target=wrong,
                                seed=11, device=device, **params)
    assert chi_square_p_value(wrong_cells, law) < 1e-6


# ------------------------------------------------------------------------------------------------
# Behaviour
# ------------------------------------------------------------------------------------------------

def ragged_inputs(num_draft: list[int], vocab: int, seed: int, one_hot: bool = False
                  ) -> dict[str, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    cu = torch.tensor(num_draft).cumsum(0)
    num_tokens, batch = int(cu[-1]), len(num_draft)
    draft_probs = torch.randn(num_tokens, vocab, generator=generator).softmax(-1)
    uniform, exponential = draw_random(cu, vocab, generator, "cpu")
    return dict(
        draft_token_ids=torch.multinomial(draft_probs, 1, generator=generator).squeeze(1)
        if num_tokens else torch.zeros(0, dtype=torch.int64),
        cu_num_draft_tokens=cu, draft_probs=None if one_hot else draft_probs,
        target_logits=torch.randn(num_tokens + batch, vocab, generator=generator),
        temperature=torch.rand(batch, generator=generator) + 0.5, top_k=None, top_p=None,
        uniform_samples=uniform, exponential_samples=exponential)


def test_greedy_rows_emit_the_target_argmax_chain() -> None:
    vocab, num_draft = 7, [4, 0, 3, 5, 2]
    inputs = ragged_inputs(num_draft, vocab, seed=20)
    argmax = inputs["target_logits"].argmax(-1)
    cu = inputs["cu_num_draft_tokens"]
    starts = (cu - torch.tensor(num_draft)).tolist()
    drafts = inputs["draft_token_ids"]
    for request, (start, n) in enumerate(zip(starts, num_draft)):  # agree on a prefix
        for i in range(min(request, n)):
            drafts[start + i] = argmax[start + request + i]
    inputs["temperature"] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.9])
    out = rejection_sample(**inputs)
    for request, (start, n) in enumerate(zip(starts, num_draft[:4])):
        rows = argmax[start + request:start + request + n + 1]
        agree = (drafts[start:start + n] == rows[:n]).long().cumprod(0).sum()
        assert int(out.num_accepted[request]) == int(agree)
        assert out.output_token_ids[request, :agree + 1].tolist() == rows[:agree + 1].tolist()


def test_greedy_speculation_reproduces_target_greedy_decoding() -> None:
    vocab, num_draft, length = 11, 4, 200
    target = random_tables(vocab, 3, 2.0, seed=21)[2]  # next-token logits given the last 2 tokens
    drafter = target + 1.5 * torch.randn(target.shape, generator=torch.Generator().manual_seed(22),
                                         dtype=torch.float64)
    greedy = [1, 2]
    while len(greedy) < length + 2:
        greedy.append(int(target[greedy[-2], greedy[-1]].argmax()))
    generated, accepted_total = [1, 2], 0
    while len(generated) < length + 2:
        drafts = list(generated)
        for _ in range(num_draft):
            drafts.append(int(drafter[drafts[-2], drafts[-1]].argmax()))
        rows = torch.stack([target[drafts[i - 2], drafts[i - 1]]
                            for i in range(len(generated), len(drafts) + 1)]).float()
        uniform, exponential = draw_random(torch.tensor([num_draft]), vocab, None, "cpu")
        out = rejection_sample(torch.tensor(drafts[len(generated):]), torch.tensor([num_draft]),
                               None, rows, torch.zeros(1), None, None, uniform, exponential)
        accepted_total += int(out.num_accepted[0])
        generated += out.output_token_ids[0, :int(out.num_accepted[0]) + 1].tolist()
    assert generated[:length + 2] == greedy[:length + 2]
    assert accepted_total > 0, "the drafter should get some tokens accepted"


def test_output_layout_and_placeholders() -> None:
    vocab, num_draft = 9, [3, 0, 1, 2]
    inputs = ragged_inputs(num_draft, vocab, seed=23)
    out = rejection_sample(**inputs, max_draft_len=6)
    assert out.output_token_ids.shape == (4, 7) and out.output_token_ids.dtype == torch.int64
    assert out.num_accepted.dtype == torch.int64
    assert (out.num_accepted <= torch.tensor(num_draft)).all()
    slots = torch.arange(7)
    emitted = slots < (out.num_accepted + 1).unsqueeze(1)
    assert (out.output_token_ids[~emitted] == PLACEHOLDER_TOKEN_ID).all()
    assert ((out.output_token_ids[emitted] >= 0) & (out.output_token_ids[emitted] < vocab)).all()
    starts = (inputs["cu_num_draft_tokens"] - torch.tensor(num_draft)).tolist()
    for request, start in enumerate(starts):
        accepted = int(out.num_accepted[request])
        assert out.output_token_ids[request, :accepted].tolist() == \
            inputs["draft_token_ids"][start:start + accepted].tolist()
    assert int(out.num_accepted[1]) == 0  # the request without drafts emits only its bonus token
    default_width = rejection_sample(**inputs)
    assert default_width.output_token_ids.shape == (4, 4)
    assert torch.equal(default_width.output_token_ids, out.output_token_ids[:, :4])


def test_one_hot_uses_the_target_probability_of_the_drafted_token() -> None:
    # q = delta(x): accept iff u <= p(x). With u just below / above p(x) the outcome flips.
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    target_prob_of_draft = float(logits[0].softmax(-1)[1])
    outcomes = []
    for u in (target_prob_of_draft * (1 - 1e-9), target_prob_of_draft * (1 + 1e-9)):
        out = rejection_sample_reference(
            torch.tensor([1]), torch.tensor([1]), None, logits, torch.ones(1, dtype=torch.float64),
            None, None, torch.tensor([u], dtype=torch.float64),
            torch.tensor([[1.0, 1e-6, 1.0]], dtype=torch.float64))
        outcomes.append((int(out.num_accepted[0]), out.output_token_ids[0].tolist()))
    # Rejected: the residual removes token 1, whose E is tiny, so the race must not pick it.
    assert outcomes == [(1, [1, 1]), (0, [2, PLACEHOLDER_TOKEN_ID])]


def test_all_zero_residual_falls_back_to_the_target_law() -> None:
    # q >= p everywhere (q = 1.001 p): max(p - q, 0) is all zero; a rejection recovers from p.
    vocab, num_rounds = 4, 50_000
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0]).repeat(2 * num_rounds, 1)
    target_probs = logits[0].softmax(-1)
    cu = torch.arange(1, num_rounds + 1)
    uniform, exponential = draw_random(cu, vocab, torch.Generator().manual_seed(24), "cpu")
    out = rejection_sample(torch.full((num_rounds,), 2), cu,
                           (target_probs * 1.001).repeat(num_rounds, 1), logits,
                           torch.ones(num_rounds), None, None, torch.full_like(uniform, 0.9995),
                           exponential)
    assert (out.num_accepted == 0).all()
    counts = torch.bincount(out.output_token_ids[:, 0], minlength=vocab).double()
    expected = target_probs.double() / target_probs.double().sum() * num_rounds
    assert scipy_stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_top_k_top_p_mask() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, 2.0], [0.0, 5.0, 0.1, 0.2, -1.0]])
    mask = top_k_top_p_mask(logits, torch.tensor([2, 0]), None)
    # Row 0: top-2 keeps 3.0 and the two tied 2.0 (value threshold); row 1: top-k off.
    assert mask.tolist() == [[False, True, False, True, False], [False] * 5]
    mask = top_k_top_p_mask(logits, None, torch.tensor([1.0, 0.5]))
    assert mask[0].tolist() == [False] * 5
    assert mask[1].tolist() == [True, False, True, True, True]  # p(5.0) > 0.5 alone
    # Row 0: top-5 is off (k >= vocab); p(3.0) = 0.52 >= 0.5 alone. Row 1: top-3 keeps
    # {5.0, 0.2, 0.1}; their mass before 0.1 is 0.993 < 0.999, so top-p keeps all three.
    mask = top_k_top_p_mask(logits, torch.tensor([5, 3]), torch.tensor([0.5, 0.999]))
    assert mask[0].tolist() == [False, True, True, True, True]
    assert mask[1].tolist() == [True, False, False, False, True]


def test_temperature_top_k_top_p_rows_never_emit_filtered_tokens() -> None:
    vocab = 50
    inputs = ragged_inputs([3, 2, 4, 1] * 50, vocab, seed=25)
    batch = 200
    inputs["top_k"] = torch.tensor([1, 5, 0, 50] * 50)
    inputs["top_p"] = torch.tensor([1.0, 1.0, 0.3, 0.5] * 50)
    inputs["temperature"] = torch.tensor([1.0, 0.5, 2.0, 1.3] * 50)
    out = rejection_sample(**inputs)
    cu = inputs["cu_num_draft_tokens"]
    starts = (cu - torch.diff(cu, prepend=torch.zeros(1, dtype=cu.dtype))).tolist()
    for request in range(batch):
        for slot in range(int(out.num_accepted[request]) + 1):
            row = starts[request] + request + slot
            logits = inputs["target_logits"][row:row + 1].double() / inputs["temperature"][request]
            law = expected_target_law(logits, 1.0, int(inputs["top_k"][request]),
                                      float(inputs["top_p"][request]))[0]
            token = int(out.output_token_ids[request, slot])
            assert law[token] > 0, (request, slot, token)
            if request % 4 == 0:  # top_k = 1: only the argmax can be emitted
                assert token == int(logits.argmax())


def test_draw_random_per_request_generators() -> None:
    cu = torch.tensor([2, 2, 5])
    def draw(seeds: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        generators = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        return draw_random(cu, 6, generators, "cpu")
    uniform, exponential = draw([1, 2, 3])
    assert uniform.shape == (5,) and uniform.dtype == torch.float64
    assert exponential.shape == (3, 6) and exponential.dtype == torch.float32
    assert ((uniform >= 0) & (uniform < 1)).all() and (exponential > 0).all()
    other_uniform, other_exponential = draw([9, None, 3])  # request 2 depends on its generator only
    assert torch.equal(uniform[2:], other_uniform[2:])
    assert torch.equal(exponential[2], other_exponential[2])
    assert not torch.equal(uniform[:2], other_uniform[:2])
    with pytest.raises(ValueError, match="generators"):
        draw([1, 2])


BAD_INPUTS = [  # (argument, bad value) for a batch with draft lengths [2, 0, 3] and vocab 6
    ("target_logits", torch.randn(5, 6)),  # needs num_tokens + batch = 8 rows
    ("target_logits", torch.randn(8)),
    ("draft_probs", torch.rand(5, 7)),
    ("draft_token_ids", torch.zeros(5)),
    ("cu_num_draft_tokens", torch.tensor([2, 2, 4])),  # does not end at num_tokens = 5
    ("temperature", torch.ones(2)),
    ("top_k", torch.ones(3)),
    ("uniform_samples", torch.rand(5)),  # float32
    ("exponential_samples", torch.rand(3, 5)),
]


@pytest.mark.parametrize("name,value", BAD_INPUTS, ids=[name for name, _ in BAD_INPUTS])
def test_bad_inputs_raise_value_error(name: str, value: torch.Tensor) -> None:
    inputs = ragged_inputs([2, 0, 3], 6, seed=26)
    inputs[name] = value
    with pytest.raises(ValueError, match=name):
        rejection_sample(**inputs)


def test_max_draft_len_too_small_raises() -> None:
    with pytest.raises(ValueError, match="max_draft_len"):
        rejection_sample(**ragged_inputs([2, 0, 3], 6, seed=27), max_draft_len=2)


def test_exponential_rows_follow_each_request_generator() -> None:
    from vllm_specdiff.verification import exponential_rows

    def source(seeds: list[int | None]):
        generators = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        return exponential_rows(6, generators, "cpu")
    rows = source([1, 2, 3])(torch.tensor([0, 2]))
    assert rows.shape == (2, 6) and rows.dtype == torch.float32 and (rows > 0).all()
    # a seeded request's row is the first draw of its own generator, whatever else is drawn
    expected = torch.empty(6).exponential_(generator=torch.Generator().manual_seed(3))
    assert torch.equal(rows[1], expected.clamp(min=torch.finfo(torch.float32).tiny))
    assert torch.equal(source([None, None, 3])(torch.tensor([1, 2]))[1], rows[1])
    unseeded = exponential_rows(6, None, "cpu")(torch.tensor([0, 1, 2]))
    assert unseeded.shape == (3, 6) and (unseeded > 0).all()
    assert exponential_rows(6, None, "cpu")(torch.tensor([], dtype=torch.long)).shape == (0, 6)
