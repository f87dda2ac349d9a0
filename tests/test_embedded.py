"""The shipped drafters against the real SmolLM2-135M target on held-out BBC prompts.

Floors are set from measurement (see README, "Embedded models") with a margin; they guard against
a broken export, a tokenizer mismatch or a drafter/order regression, not against noise.
"""
from __future__ import annotations

import pytest
import torch

from vllm_specdiff import DiffusionDrafter, SEDD
from vllm_specdiff.assets import AR_DRAFTER_DIR, SEDD_DRAFTER_DIR, prepare_target, target_tokenizer
from vllm_specdiff.data import heldout_prompts
from vllm_specdiff.drafting.autoregressive import AutoregressiveDrafter
from vllm_specdiff.engine.generate import speculative_generate

NUM_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 48, 48
# Mean acceptance length (tokens per round, greedy) measured on these prompts: SEDD (k=8, T=2,
# window 128) 1.079; a drafter that matches nothing gives 1.00. Floors sit between the two.
SEDD_FLOOR = 1.04
AR_FLOOR = 1.20


@pytest.fixture(scope="module")
def target_and_prompts():
    from transformers import AutoModelForCausalLM

    folder = prepare_target()
    target = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = heldout_prompts(target_tokenizer(), NUM_PROMPTS, PROMPT_TOKENS)
    return target, prompts


def target_greedy(target, prompt):
    ids = torch.tensor([prompt])
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_shipped_sedd_drafter_is_exact_and_reaches_its_floor(target_and_prompts):
    target, prompts = target_and_prompts
    sedd = SEDD.from_pretrained(SEDD_DRAFTER_DIR)
    assert sedd.config.tokens == target.config.vocab_size
    drafter = DiffusionDrafter(sedd, num_draft_tokens=8, num_steps=2, window=128)
    result = speculative_generate(target, drafter, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
    for prompt, sequence in zip(prompts, result.sequences):
        assert sequence == target_greedy(target, prompt)
    print(f"SEDD drafter: mean acceptance length {result.stats.mean_acceptance_length:.3f}, "
          f"histogram {result.stats.acceptance_histogram}")
    assert result.stats.mean_acceptance_length >= SEDD_FLOOR


def test_shipped_ar_drafter_reaches_its_floor(target_and_prompts):
    from transformers import AutoModelForCausalLM

    target, prompts = target_and_prompts
    ar = AutoModelForCausalLM.from_pretrained(AR_DRAFTER_DIR, dtype=torch.float32)
    drafter = AutoregressiveDrafter(ar, num_draft_tokens=4, window=128)
    result = speculative_generate(target, drafter, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
    print(f"AR drafter: mean acceptance length {result.stats.mean_acceptance_length:.3f}, "
          f"histogram {result.stats.acceptance_histogram}")
    assert result.stats.mean_acceptance_length >= AR_FLOOR
