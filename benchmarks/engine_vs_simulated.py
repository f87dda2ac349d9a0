"""In-engine acceptance vs the standalone simulated one, on the same held-out prompts.

Engines (vLLM, float32, greedy, 128 new tokens per prompt, batch 8): specdiff with the conditioned
drafter (k = 4, T = 1, lookup and adaptive OFF, so the drafter alone is measured) and vLLM's own
dflash with the DFlash-format peer (k = 4). Their mean acceptance length (vLLM's spec-decode
counters: 1 + accepted / drafts) is set beside the simulated acceptance length of the same drafter
(`training.conditioned.simulated_acceptance`: every continuation position of the target's greedy
text as an anchor) on the same prompts: the held-out feature store of the trainer holds exactly these
prompts and the target's greedy continuations. A large gap would mean that the engine feeds the
drafter something else than training did (context states, positions, the anchor). A second pass over
the same prompts in the same engine hits vLLM's prefix cache (KV blocks of --block-size tokens): its
acceptance measures drafting from the partial context (the states of the recomputed prompt tail
only), the plugin's choice for cached prefixes, against the full context of the first pass.

    python benchmarks/engine_vs_simulated.py --work-dir ~/.cache/vllm-specdiff/train-conditioned-v2 \
        --dflash-work-dir ~/.cache/vllm-specdiff/train-dflash-smollm2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    from vllm_specdiff.assets import (CONDITIONED_DRAFTER_DIR, DFLASH_DRAFTER_DIR, prepare_target,
                                      target_tokenizer)
    from vllm_specdiff.data import heldout_prompts
    from vllm_specdiff.data.target_features import load_feature_store
    from vllm_specdiff.engine.offline import EngineSpec, device_name, run_isolated
    from vllm_specdiff.models.conditioned_checkpoint import load_conditioned
    from vllm_specdiff.training.conditioned import simulated_acceptance

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", required=True,
                        help="the conditioned trainer's work dir (its features-heldout store)")
    parser.add_argument("--dflash-work-dir", default=None,
                        help="the dflash trainer's work dir (its drafter/ copy in our format)")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=32,
                        help="vLLM KV block size (the prefix cache works in whole blocks)")
    parser.add_argument("--out", default="benchmarks/results/engine-vs-simulated.json")
    args = parser.parse_args(argv)
    t0 = time.time()
    target_dir = str(prepare_target())
    prompts = heldout_prompts(target_tokenizer(), args.num_prompts, args.prompt_tokens)
    store = load_feature_store(Path(args.work_dir).expanduser() / "features-heldout")
    if store.token_ids.shape[0] < args.num_prompts:
        raise SystemExit(f"the held-out store has {store.token_ids.shape[0]} sequences, fewer than "
                         f"--num-prompts {args.num_prompts}")
    store = store.select(torch.arange(args.num_prompts))
    if store.token_ids[:, :args.prompt_tokens].tolist() != [list(p) for p in prompts]:
        raise SystemExit("the held-out store's prompts differ from heldout_prompts(): use the work dir "
                         "of a trainer run with the same --heldout-prompts / --prompt-tokens")
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    embed, head = target.get_input_embeddings().weight, target.get_output_embeddings().weight
    pairs = [("specdiff (conditioned)", CONDITIONED_DRAFTER_DIR,
              EngineSpec("specdiff", drafter=str(CONDITIONED_DRAFTER_DIR), num_draft_tokens=args.k,
                         num_steps=1, options=(("adaptive", False), ("lookup", False))))]
    if args.dflash_work_dir:
        pairs.append(("dflash (vLLM, peer)", Path(args.dflash_work_dir).expanduser() / "drafter",
                      EngineSpec("dflash", drafter=str(DFLASH_DRAFTER_DIR), num_draft_tokens=args.k)))
    anchors = store.token_ids.shape[1] - args.prompt_tokens - args.k - 1  # every position
    rows = []
    for name, folder, spec in pairs:
        model = load_conditioned(folder, embed, head, target_config=target.config)
        simulated = simulated_acceptance(model, store, args.k, 1, start=args.prompt_tokens,
                                         anchors_per_seq=anchors)
        # The same prompts twice in one engine: the second pass finds them in vLLM's prefix cache,
        # so the drafter only gets the states of the recomputed tail of each prompt.
        # KV blocks of 32 tokens (the CPU default, 128, is longer than the prompts: nothing would be
        # cached): the second pass finds each prompt's first 32 tokens cached.
        cold, warm = run_isolated(spec, target_dir, prompts, [args.batch], [0.0, 0.0], args.max_tokens,
                                  dtype="float32", engine_kwargs={"block_size": args.block_size})
        in_engine = cold["mean_acceptance_length"] or 1.0
        rows.append({"drafter": name, "k": args.k, "simulated": simulated["acceptance_length"],
                     "simulated_anchors": simulated["anchors"], "in_engine": round(in_engine, 4),
                     "rounds": cold["num_drafts"], "relative_gap": round(
                         in_engine / simulated["acceptance_length"] - 1, 4),
                     "in_engine_prefix_cache_hit": round(warm["mean_acceptance_length"] or 1.0, 4)})
        print(json.dumps(rows[-1]), flush=True)
    payload = {"device": device_name(), "prompts": args.num_prompts, "max_tokens": args.max_tokens,
               "batch": args.batch, "seconds": round(time.time() - t0), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{'drafter':<26} {'k':>2} {'simulated':>9} {'in engine':>9} {'gap':>7} "
          f"{'prefix-cache hit':>16}")
    for r in rows:
        print(f"{r['drafter']:<26} {r['k']:>2} {r['simulated']:>9.3f} {r['in_engine']:>9.3f} "
              f"{100 * r['relative_gap']:>6.1f}% {r['in_engine_prefix_cache_hit']:>16.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
