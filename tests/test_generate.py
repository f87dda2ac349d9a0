"""Standalone speculative_generate: greedy identity, exact sampling law, statistics, bad input."""
from __future__ import annotations

import copy
import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare
from transformers import GPT2Config, GPT2LMHeadModel

from vllm_specdiff import DiffusionDrafter, SEDD, SEDDConfig
from vllm_specdiff.drafting.autoregressive import AutoregressiveDrafter
from vllm_specdiff.engine.generate import speculative_generate

FIXTURE = Path(__file__).parent / "fixtures" / "markov-sedd"


def tiny_gpt2(vocab: int, seed: int, n_positions: int = 512, layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=2, n_positions=n_positions,
                        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # sharper next-token laws than the default init: fewer near-ties
        model.lm_head.weight.normal_(std=0.5)
    return model


def random_sedd(tokens: int, length: int = 64) -> SEDD:
    torch.manual_seed(1)
    model = SEDD(SEDDConfig(tokens=tokens, hidden_size=64, cond_dim=32, length=length, n_blocks=1, n_heads=2))
    return model.eval()


PROMPTS = [[5, 17, 3], list(range(1, 40)), [7], [9, 9, 9, 9, 12, 30, 31, 2, 8, 44, 45]]


# CUDA runs the same checks through the GPU path (Triton verification kernels, drafters on the GPU),
# float32 with TF32 off; without a GPU (CI) those cases are skipped.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU on this machine"))]


@pytest.fixture(autouse=True)
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def target_greedy(target, prompt, max_new_tokens):
    device = next(target.parameters()).device
    out = target.generate(torch.tensor([prompt], device=device),
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                          max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def target():
    return tiny_gpt2(vocab=64, seed=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("drafter_kind", ["diffusion", "autoregressive", "self"])
def test_greedy_is_token_identical_to_target_greedy(target, drafter_kind, device):
    target = copy.deepcopy(target).to(device) if device != "cpu" else target
    if drafter_kind == "diffusion":
        drafter = DiffusionDrafter(random_sedd(64).to(device), num_draft_tokens=6, num_steps=2, window=16)
    elif drafter_kind == "autoregressive":
        drafter = AutoregressiveDrafter(tiny_gpt2(vocab=64, seed=5, layers=1).to(device), num_draft_tokens=4,
                                        window=32)
    else:  # the target drafting for itself: every greedy draft must be accepted
        drafter = AutoregressiveDrafter(target, num_draft_tokens=5)
    result = speculative_generate(target, drafter, PROMPTS, max_new_tokens=210, temperature=0.0)
    for prompt, sequence in zip(PROMPTS, result.sequences):
        assert len(sequence) == 210
        assert sequence == target_greedy(target, prompt, 210)
    stats = result.stats
    assert stats.num_drafts == sum(stats.acceptance_histogram)
    assert stats.num_draft_tokens == stats.num_drafts * drafter.num_draft_tokens
    if drafter_kind == "self":
        assert stats.acceptance_histogram[-1] >= stats.num_drafts - len(PROMPTS)  # all but the last rounds
        assert stats.mean_acceptance_length > 5.5


def test_eos_stops_generation(target):
    drafter = DiffusionDrafter(random_sedd(64), num_draft_tokens=4, num_steps=2)
    greedy = target_greedy(target, PROMPTS[0], 30)
    eos = greedy[10]
    result = speculative_generate(target, drafter, [PROMPTS[0], PROMPTS[1]], max_new_tokens=30,
                                  temperature=0.0, eos_token_id=eos)
    assert result.sequences[0] == greedy[:greedy.index(eos) + 1]


def exact_continuation_law(target, prompt, horizon, vocab):
    law = {}
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=horizon):
            ids = torch.tensor([list(prompt) + list(seq)])
            probs = torch.softmax(target(ids).logits[0].double(), -1)
            p = 1.0
            for i, token in enumerate(seq):
                p *= float(probs[len(prompt) - 1 + i, token])
            law[seq] = p
    return law


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_one_law_matches_the_target_exactly(device):
    """3-token continuations through diffusion drafts + full-q verification follow the target law."""
    vocab = 4
    target = tiny_gpt2(vocab=vocab, seed=3)
    with torch.no_grad():
        target.lm_head.weight.normal_(std=0.3)
    prompt, horizon, n = [1, 2, 3, 0, 1], 3, 6000
    law = exact_continuation_law(target, prompt, horizon, vocab)  # on the CPU, before the move
    drafter = DiffusionDrafter(SEDD.from_pretrained(FIXTURE).to(device), num_draft_tokens=2, num_steps=2)
    result = speculative_generate(target.to(device), drafter, [prompt] * n, max_new_tokens=horizon,
                                  temperature=1.0, generator=torch.Generator(device).manual_seed(0))
    counts = Counter(tuple(s) for s in result.sequences)
    keys = sorted(law)
    assert chisquare([counts.get(k, 0) for k in keys], [n * law[k] for k in keys]).pvalue > 1e-3
    assert result.stats.num_accepted_tokens > 0
    # The same test has power: a slightly different target law is rejected.
    other = tiny_gpt2(vocab=vocab, seed=4)
    wrong = exact_continuation_law(other, prompt, horizon, vocab)
    assert chisquare([counts.get(k, 0) for k in keys], [n * wrong[k] for k in keys]).pvalue < 1e-6


def test_bad_inputs(target):
    drafter = DiffusionDrafter(random_sedd(50), num_draft_tokens=4, num_steps=2)
    with pytest.raises(ValueError, match=r"drafter vocabulary \(50 tokens\) differs from the target's \(64\)"):
        speculative_generate(target, drafter, [[1, 2]], max_new_tokens=4)
    drafter = DiffusionDrafter(random_sedd(64), num_draft_tokens=4, num_steps=2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        speculative_generate(target, drafter, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt 1 has 600 tokens.*exceeds the target's context of 512"):
        speculative_generate(target, drafter, [[1], [1] * 600], max_new_tokens=4)
    with pytest.raises(ValueError, match="context 0 is empty"):
        speculative_generate(target, drafter, [[]], max_new_tokens=4)
