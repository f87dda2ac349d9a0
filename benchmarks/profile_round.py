"""Where a speculative round's time goes inside vLLM (CPU or GPU), per engine step, by part.

vLLM's model runner marks its phases with `record_function_or_nullcontext` (preprocess, forward,
postprocess, sample = verification, draft = the proposer, bookkeep, ...). This script installs a
timing context for those marks in an in-process engine and reports ms per step and part, for no
speculation and for specdiff, at several batch sizes: the target forward of k + 1 tokens vs 1,
rejection sampling, the drafter, and the rest (host syncs and Python in the runner and the plugin).

    python benchmarks/profile_round.py --batches 1,8 --max-tokens 64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

for _key, _value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
                     "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
                     "VLLM_USE_V2_MODEL_RUNNER": "0"}.items():
    os.environ.setdefault(_key, _value)

TIMES: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)


@contextmanager
def _timed(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        TIMES[name] += time.perf_counter() - start
        COUNTS[name] += 1


def profile(spec, target: str, prompts, batch: int, max_tokens: int, temperature: float,
            dtype: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.v1 import utils as v1_utils

    v1_utils._PROFILER_FUNC = _timed
    llm = LLM(model=target, dtype=dtype, enforce_eager=True, max_model_len=1024, seed=0,
              speculative_config=spec.speculative_config(), disable_log_stats=False,
              async_scheduling=False, distributed_executor_backend="uni", max_num_seqs=batch)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True, seed=0)
    llm.generate([{"prompt_token_ids": list(prompts[0])}], SamplingParams(max_tokens=8),
                 use_tqdm=False)
    TIMES.clear()
    COUNTS.clear()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts[:batch]], params,
                        use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = max(COUNTS.get("gpu_model_runner: forward", 1), 1)
    parts = {name.replace("gpu_model_runner: ", ""): 1e3 * seconds / steps
             for name, seconds in TIMES.items()}
    counted = sum(v for k, v in TIMES.items() if k.startswith("gpu_model_runner"))
    parts["other (scheduler, engine, outside the runner)"] = 1e3 * (wall - counted) / steps
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    cleanup_dist_env_and_memory()
    return {"label": spec.label, "batch": batch, "temperature": temperature, "steps": steps,
            "tokens": tokens, "wall_s": wall, "tokens_per_step": tokens / steps,
            "ms_per_step": 1e3 * wall / steps, "ms_per_token": 1e3 * wall / tokens,
            "parts_ms_per_step": parts}


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from vllm_specdiff.assets import CONDITIONED_DRAFTER_DIR, prepare_target, target_tokenizer
    from vllm_specdiff.data import heldout_prompts
    from vllm_specdiff.offline import EngineSpec, default_dtype, device_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=1)
    parser.add_argument("--drafter", default=str(CONDITIONED_DRAFTER_DIR))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=False,
                        help="adaptive drafting (off by default: profile full rounds)")
    parser.add_argument("--out", default="benchmarks/results/round-profile.jsonl")
    args = parser.parse_args(argv)
    dtype = default_dtype(args.dtype)
    target = str(prepare_target())
    prompts = heldout_prompts(target_tokenizer(), max(int(b) for b in args.batches.split(",")), 64)
    specs = [EngineSpec("none"),
             EngineSpec("specdiff", drafter=args.drafter, num_draft_tokens=args.num_draft_tokens,
                        num_steps=args.num_steps, options=(("adaptive", args.adaptive),))]
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for spec in specs:
            row = profile(spec, target, prompts, batch, args.max_tokens, args.temperature, dtype)
            row.update(device=device_name(), dtype=dtype)
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    names = sorted({k for r in rows for k in r["parts_ms_per_step"]})
    print(f"\nms per engine step by part ({rows[0]['device']}, {dtype}, temperature "
          f"{args.temperature:g}, {args.max_tokens} new tokens)")
    print(f"{'part':<48}" + "".join(f"{r['label'][:18] + ' b' + str(r['batch']):>26}" for r in rows))
    for name in names:
        print(f"{name:<48}" + "".join(f"{r['parts_ms_per_step'].get(name, 0.0):>26.2f}" for r in rows))
    for key in ("ms_per_step", "tokens_per_step", "ms_per_token"):
        print(f"{key:<48}" + "".join(f"{r[key]:>26.2f}" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
