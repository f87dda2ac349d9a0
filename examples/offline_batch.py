"""Offline batch generation with vLLM and specdiff on the embedded models.

The target is SmolLM2-135M (built from a registry package on first use, no hub); the drafter is
the shipped target-conditioned one. Everything else is the plugin's defaults: k = 4 draft tokens,
T = k denoising steps, adaptive draft length and prompt lookup. Output follows the target's
distribution exactly (temperature 0: the target's own greedy tokens).

    .venv/bin/python examples/offline_batch.py --max-tokens 64 --temperature 0
"""
from __future__ import annotations

import argparse
import os

# vLLM on CPU: a 1 GiB KV cache (it reserves most of the RAM otherwise), no hub, no telemetry.
for _name, _value in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("HF_HUB_OFFLINE", "1"),
                      ("VLLM_NO_USAGE_STATS", "1")):
    os.environ.setdefault(_name, _value)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)

    from vllm import LLM, SamplingParams

    from vllm_specdiff.assets import CONDITIONED_DRAFTER_DIR, prepare_target, target_tokenizer
    from vllm_specdiff.data import heldout_prompts

    target = str(prepare_target())
    tokenizer = target_tokenizer()
    prompts = [tokenizer.decode(ids) for ids in heldout_prompts(tokenizer, args.num_prompts, 48)]
    # float32: bf16 is emulated on most CPUs; enforce_eager: no graph compilation (minutes on CPU).
    llm = LLM(model=target, dtype="float32", max_model_len=1024, max_num_seqs=args.num_prompts,
              enforce_eager=True,
              speculative_config={"method": "specdiff", "model": str(CONDITIONED_DRAFTER_DIR),
                                  "num_speculative_tokens": 4},
              disable_log_stats=False)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
    outputs = llm.generate(prompts, params)
    texts = [out.outputs[0].text for out in outputs]
    for prompt, text in zip(prompts, texts):
        print(f"--- {prompt[-60:]!r}\n+++ {text!r}")
    counters = {m.name: m.value for m in llm.get_metrics()
                if m.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens")}
    drafts = counters.get("vllm:spec_decode_num_drafts", 0)
    if drafts:
        accepted = counters.get("vllm:spec_decode_num_accepted_tokens", 0)
        print(f"{drafts} drafting rounds, acceptance length {1 + accepted / drafts:.2f} tokens per round")
    return texts


if __name__ == "__main__":
    main()
