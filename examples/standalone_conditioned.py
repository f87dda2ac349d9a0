"""Speculative decoding without vLLM: any Hugging Face causal LM target and the conditioned drafter.

`speculative_generate` runs the target with its KV cache and feeds the drafter the target's hidden
states of every processed position; each round drafts k tokens in T denoising steps and verifies
them in one target forward (lossless speculative sampling). At temperature 0 the output is the
target's own greedy decoding, which this example checks against `target.generate`.

    .venv/bin/python examples/standalone_conditioned.py --max-tokens 48
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=None, help="default: num_draft_tokens")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from vllm_specdiff import speculative_generate
    from vllm_specdiff.assets import CONDITIONED_DRAFTER_DIR, prepare_target, target_tokenizer
    from vllm_specdiff.data import heldout_prompts
    from vllm_specdiff.drafting.conditioned import ConditionedDrafter
    from vllm_specdiff.models.conditioned_checkpoint import load_conditioned

    target = AutoModelForCausalLM.from_pretrained(prepare_target(), dtype=torch.float32).eval()
    model = load_conditioned(CONDITIONED_DRAFTER_DIR, target.get_input_embeddings().weight,
                             target.get_output_embeddings().weight, target_config=target.config)
    drafter = ConditionedDrafter(model, num_draft_tokens=args.num_draft_tokens,
                                 num_steps=args.num_steps or args.num_draft_tokens)
    tokenizer = target_tokenizer()
    prompts = heldout_prompts(tokenizer, args.num_prompts, 48)
    result = speculative_generate(target, drafter, prompts, args.max_tokens, temperature=0.0)
    identical = True
    for prompt, ours in zip(prompts, result.sequences):
        with torch.no_grad():
            reference = target.generate(torch.tensor([prompt]), max_new_tokens=args.max_tokens,
                                        do_sample=False, pad_token_id=target.config.eos_token_id)
        reference = reference[0, len(prompt):].tolist()  # shorter when the target ends (eos)
        identical &= list(ours[:len(reference)]) == reference
        print(f"+++ {tokenizer.decode(ours)!r}")
    stats = result.stats
    print(f"acceptance length {stats.mean_acceptance_length:.2f} tokens per round; "
          f"identical to the target's greedy output: {identical}")
    return identical


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
