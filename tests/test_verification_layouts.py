"""`rejection_sample_drafts` (vLLM's layout: draft rows only, bonus tokens given) against the
reference (interleaved rows, its own bonus), placeholder draft ids, and synthetic acceptance.

The reference is the specification: under shared random numbers the draft-rows layout must emit the
same tokens whenever it is handed the bonus tokens the reference draws itself.
"""
from __future__ import annotations

import pytest
import torch

from vllm_specdiff.verification import (
    PLACEHOLDER_TOKEN_ID,
    draft_position_scaled_logits,
    draw_random,
    exponential_race,
    rejection_sample_drafts,
    rejection_sample_reference,
    target_scaled_logits,
)


def interleaved_case(num_draft: list[int], vocab: int, seed: int, one_hot: bool,
                     greedy_every: int = 3, filters: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    cu = torch.tensor(num_draft).cumsum(0)
    num_tokens, batch = int(cu[-1]), len(num_draft)
    draft_probs = torch.randn(num_tokens, vocab, generator=generator).softmax(-1)
    uniform, exponential = draw_random(cu, vocab, generator, "cpu")
    temperature = torch.rand(batch, generator=generator) + 0.5
    temperature[::greedy_every] = 0.0
    return dict(
        draft_token_ids=torch.multinomial(draft_probs, 1, generator=generator).squeeze(1),
        cu_num_draft_tokens=cu, draft_probs=None if one_hot else draft_probs,
        target_logits=torch.randn(num_tokens + batch, vocab, generator=generator) * 2,
        temperature=temperature,
        top_k=torch.randint(0, vocab, (batch,), generator=generator) if filters else None,
        top_p=torch.rand(batch, generator=generator) * 0.5 + 0.5 if filters else None,
        uniform_samples=uniform, exponential_samples=exponential)


def split_rows(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(draft rows [num_tokens, vocab], the reference's own bonus tokens [batch])."""
    cu = case["cu_num_draft_tokens"]
    batch, rows = cu.shape[0], case["target_logits"].shape[0]
    bonus_rows = cu + torch.arange(batch)
    is_bonus = torch.zeros(rows, dtype=torch.bool)
    is_bonus[bonus_rows] = True
    scaled = target_scaled_logits(case["target_logits"], cu, case["temperature"], case["top_k"],
                                  case["top_p"])[bonus_rows]
    bonus = torch.where(case["temperature"] == 0, scaled.argmax(-1),
                        exponential_race(scaled.softmax(-1), case["exponential_samples"]))
    return case["target_logits"][~is_bonus], bonus


@pytest.mark.parametrize("kind", ["mixed", "all_greedy", "all_sampled"])
@pytest.mark.parametrize("one_hot", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_draft_rows_layout_equals_the_reference(one_hot: bool, seed: int, kind: str) -> None:
    # A batch of one kind takes its own shortcut (no target law for greedy-only batches, no argmax
    # for sampled-only ones): each must emit what the reference emits.
    case = interleaved_case([3, 0, 5, 1, 4, 2, 5], vocab=11, seed=seed, one_hot=one_hot,
                            filters=seed % 2 == 0, greedy_every=1 if kind == "all_greedy" else 3)
    if kind == "all_sampled":
        case["temperature"] = case["temperature"].clamp(min=0.5)
    expected = rejection_sample_reference(**case)
    draft_rows, bonus = split_rows(case)
    out = rejection_sample_drafts(**{**case, "target_logits": draft_rows},
                                  bonus_token_ids=bonus)
    assert torch.equal(out.output_token_ids, expected.output_token_ids)
    assert torch.equal(out.num_accepted, expected.num_accepted)
    scaled = draft_position_scaled_logits(draft_rows, case["cu_num_draft_tokens"],
                                          case["temperature"], case["top_k"], case["top_p"])
    cu, batch = case["cu_num_draft_tokens"], case["cu_num_draft_tokens"].shape[0]
    is_draft = torch.ones(draft_rows.shape[0] + batch, dtype=torch.bool)
    is_draft[cu + torch.arange(batch)] = False
    reference_scaled = target_scaled_logits(case["target_logits"], cu, case["temperature"],
                                            case["top_k"], case["top_p"])[is_draft]
    assert torch.equal(scaled, reference_scaled)


@pytest.mark.parametrize("one_hot", [True, False])
@pytest.mark.parametrize("greedy", [True, False])
def test_placeholder_is_rejected_and_its_position_drawn_from_the_target_law(one_hot: bool,
                                                                            greedy: bool) -> None:
    """Drafts [x, -1, -1]: a placeholder proposed nothing (q = 0), so its position emits a token
    from p (the exponential race over p itself), after x if x is accepted."""
    vocab, checked = 9, 0
    for seed in range(40):
        case = interleaved_case([3], vocab, seed, one_hot, greedy_every=1 if greedy else 10,
                                filters=False)
        if not greedy:
            case["temperature"][:] = 1.0
        case["draft_token_ids"][1:] = PLACEHOLDER_TOKEN_ID
        draft_rows, bonus = split_rows(case)
        for function, logits in ((rejection_sample_reference, case["target_logits"]),
                                 (rejection_sample_drafts, draft_rows)):
            extra = {} if function is rejection_sample_reference else {"bonus_token_ids": bonus}
            out = function(**{**case, "target_logits": logits}, **extra)
            num_accepted = int(out.num_accepted)
            checked += num_accepted
            assert num_accepted <= 1
            if num_accepted == 1:  # x accepted: position 1 (the placeholder) is drawn from p_1
                scaled = draft_position_scaled_logits(draft_rows, case["cu_num_draft_tokens"],
                                                      case["temperature"], None, None)[1]
                expected = (scaled.argmax() if greedy else
                            exponential_race(scaled.softmax(-1)[None], case["exponential_samples"])[0])
                assert out.output_token_ids[0].tolist() == [
                    int(case["draft_token_ids"][0]), int(expected), PLACEHOLDER_TOKEN_ID,
                    PLACEHOLDER_TOKEN_ID]
            else:  # x rejected: the placeholders are never reached
                assert (out.output_token_ids[0, 1:] == PLACEHOLDER_TOKEN_ID).all()
    assert checked > 0  # some seeds accept x, so the placeholder position is reached


@pytest.mark.parametrize("greedy", [True, False])
def test_synthetic_acceptance_rates(greedy: bool) -> None:
    case = interleaved_case([2, 1, 3], vocab=7, seed=0, one_hot=True,
                            greedy_every=1 if greedy else 10, filters=False)
    if not greedy:
        case["temperature"][:] = 1.0
    draft_rows, bonus = split_rows(case)
    case = {**case, "target_logits": draft_rows}
    accept_all = rejection_sample_drafts(**case, bonus_token_ids=bonus,
                                         acceptance_rates=torch.ones(3))
    drafts = case["draft_token_ids"].tolist()
    assert accept_all.output_token_ids.tolist() == [
        [*drafts[0:2], int(bonus[0]), -1], [drafts[2], int(bonus[1]), -1, -1],
        [*drafts[3:6], int(bonus[2])]]
    reject_all = rejection_sample_drafts(**case, bonus_token_ids=bonus,
                                         acceptance_rates=torch.zeros(3))
    assert reject_all.num_accepted.tolist() == [0, 0, 0]
    assert (reject_all.output_token_ids[:, 0] >= 0).all()
    if greedy:  # a rejected greedy position emits the target argmax
        first_rows = draft_rows[torch.tensor([0, 2, 3])]
        assert reject_all.output_token_ids[:, 0].tolist() == first_rows.argmax(-1).tolist()


class RecordingRows:
    """An exponential source that hands out rows of a pre-drawn [batch, vocab] table and records
    which rows were asked for (the lazy path must agree with the eager one under that table)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table, self.asked = table, []

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.asked.extend(rows.tolist())
        return self.table[rows]


@pytest.mark.parametrize("one_hot", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_lazy_recovery_equals_eager_and_draws_only_for_rejected_sampled_rows(
        one_hot: bool, seed: int) -> None:
    num_draft = [3, 0, 2, 4, 1, 0, 3]
    case = interleaved_case(num_draft, vocab=11, seed=seed, one_hot=one_hot)
    if seed % 2:  # some placeholders (vLLM's padding) in the lazy path too
        case["draft_token_ids"][torch.tensor([1, 6])] = PLACEHOLDER_TOKEN_ID
    draft_rows, bonus = split_rows(case)
    case = {**case, "target_logits": draft_rows}
    eager = rejection_sample_drafts(**case, bonus_token_ids=bonus)
    source = RecordingRows(case["exponential_samples"])
    lazy = rejection_sample_drafts(**{**case, "exponential_samples": source},
                                   bonus_token_ids=bonus)
    assert torch.equal(lazy.output_token_ids, eager.output_token_ids)
    assert torch.equal(lazy.num_accepted, eager.num_accepted)
    rejected_sampled = [b for b, n in enumerate(num_draft)
                        if int(eager.num_accepted[b]) < n and float(case["temperature"][b]) > 0]
    assert source.asked == rejected_sampled


def test_lazy_recovery_draws_nothing_when_every_draft_is_accepted_or_greedy() -> None:
    case = interleaved_case([2, 1, 3], vocab=7, seed=0, one_hot=True, greedy_every=10,
                            filters=False)
    draft_rows, bonus = split_rows(case)
    case = {**case, "target_logits": draft_rows}
    source = RecordingRows(case["exponential_samples"])
    rejection_sample_drafts(**{**case, "exponential_samples": source}, bonus_token_ids=bonus,
                            acceptance_rates=torch.ones(3))
    assert source.asked == []
    case["temperature"][:] = 0.0
    rejection_sample_drafts(**{**case, "exponential_samples": source}, bonus_token_ids=bonus)
    assert source.asked == []
