"""Offline vLLM benchmark: no speculation vs the speculators vLLM ships vs specdiff.

For a target and its drafters, with the embedded models by default (SmolLM2-135M + the project's
drafters; any local or hub paths work), on held-out BBC News prompts or a JSONL file of prompts.
Every engine is built once, in its own spawned process, and serves every (temperature, batch size)
pair. Engines (`--methods`), in run order:

- none: no speculation, first and (full runs) again last, so drift of a shared machine shows;
- ngram: vLLM's prompt-lookup speculator, a sweep over k (the --draft-model-k list);
- draft_model: vLLM's draft_model speculator (the AR drafter) on Model Runner V1 without async
  scheduling, the setting that specdiff's `custom_class` hook forces: the fair comparison; a sweep
  over k;
- draft_model_default: draft_model on vLLM's default runner and scheduling (V2 runner where vLLM
  picks it; async scheduling on), for what a user of stock vLLM gets;
- dflash: vLLM's own dflash method with a DFlash-format drafter (`--dflash-drafter`, trained by
  `vllm-specdiff train --kind dflash`), a sweep over k (the --draft-model-k list); in the default
  --methods only when that folder exists;
- specdiff: the standalone SEDD drafter, a sweep over num_draft_tokens at a fixed num_steps and
  over num_steps at a fixed num_draft_tokens (`--sweep axes`, default) or their full grid
  (`--sweep grid`);
- specdiff_conditioned: specdiff with the conditioned drafter (`--conditioned-drafter`) at the
  `--conditioned` k:T pairs, with its adaptive and lookup options (`--[no-]adaptive`,
  `--[no-]lookup`, both on by default).

    python benchmarks/bench_offline.py --quick       # small grid, one engine per method
    python benchmarks/bench_offline.py               # the full grid (see benchmarks/README.md)

Writes one JSON line per (engine, temperature, batch) to --out (default benchmarks/results/),
prints a table, and draws three PNGs: speedup vs num_steps, acceptance length vs num_draft_tokens,
tokens/s vs batch size. speedup is tokens/s over no speculation at the same temperature and batch,
measured in the same run (the mean of the baseline's runs).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plots import format_table, group_points, plot_lines, write_jsonl  # noqa: E402

from vllm_specdiff.offline import (EngineSpec, add_speedups, default_dtype, device_name,  # noqa: E402
                                   run_engine)

RUNNERS = ("v1", "default")
ENGINE_KINDS = ("none", "ngram", "draft_model", "draft_model_default", "dflash", "specdiff",
                "specdiff_conditioned")
# Engine families (a row's method, specdiff split by drafter kind) in run and table order.
FAMILIES = ("none", "ngram", "draft_model", "dflash", "specdiff-sedd", "specdiff-conditioned")
# Drafter options: args attribute -> (vllm_specdiff.assets default, methods that need the folder to
# exist; dflash's folder is checked by speculator_specs, it needs a config.json).
DRAFTER_OPTIONS = {
    "sedd_drafter": ("SEDD_DRAFTER_DIR", ("specdiff",)),
    "ar_drafter": ("AR_DRAFTER_DIR", ("draft_model", "draft_model_default")),
    "dflash_drafter": ("DFLASH_DRAFTER_DIR", ()),
    "conditioned_drafter": ("CONDITIONED_DRAFTER_DIR", ("specdiff_conditioned",)),
}
# Environment for offline CPU runs without a model hub (shared/docs/vllm.md); user values win.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


@dataclass(frozen=True)
class BenchEngine:
    """One engine of the benchmark: an EngineSpec and the model runner it runs on.

    runner "v1": Model Runner V1 without async scheduling (what offline.run_engine sets, and what
    specdiff's custom_class hook forces). runner "default": whatever this vLLM picks by itself.
    """

    spec: EngineSpec
    runner: str = "v1"
    baseline_run: int = 0  # 0, 1: the first / the repeated no-speculation engine

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner {self.runner!r} unknown: choose one of {RUNNERS}")
        if self.runner == "default" and self.spec.method == "specdiff":
            raise ValueError("specdiff runs on Model Runner V1 only (custom_class forces it)")

    @property
    def label(self) -> str:
        label = self.spec.label
        if self.runner == "default":
            label += " (default runner)"
        if self.spec.method == "none" and self.baseline_run:
            label += f" (rerun {self.baseline_run})"
        return label


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def specdiff_grid(num_draft_tokens: Sequence[int], num_steps: Sequence[int], sweep: str,
                  base_num_draft_tokens: int, base_num_steps: int) -> list[tuple[int, int]]:
    """(num_draft_tokens, num_steps) pairs, every pair with 1 <= num_steps <= num_draft_tokens.

    sweep "axes": num_draft_tokens at base_num_steps (clipped to k) plus num_steps at
    base_num_draft_tokens; "grid": the full cross product.
    """
    if sweep == "grid":
        pairs = [(k, t) for k in num_draft_tokens for t in num_steps]
    elif sweep == "axes":
        pairs = [(k, min(base_num_steps, k)) for k in num_draft_tokens]
        pairs += [(base_num_draft_tokens, t) for t in num_steps]
    else:
        raise ValueError(f"sweep {sweep!r} unknown: choose axes or grid")
    out: list[tuple[int, int]] = []
    for k, t in pairs:
        if 1 <= t <= k and (k, t) not in out:
            out.append((k, t))
    return sorted(out)


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """'8:2,16:4' -> [(8, 2), (16, 4)] (num_draft_tokens:num_steps)."""
    pairs = []
    for item in text.split(","):
        if item.strip():
            k, _, t = item.partition(":")
            pairs.append((int(k), int(t)))
    return pairs


def dflash_drafter_problem(drafter: str | None) -> str | None:
    """Why `drafter` cannot serve vLLM's dflash method (no config.json there), or None."""
    if drafter and (Path(drafter) / "config.json").is_file():
        return None
    return (f"the DFlash drafter folder {drafter} has no config.json: train one with "
            "`vllm-specdiff train --kind dflash --out DIR` and pass --dflash-drafter DIR")


def conditioned_specs(drafter: str | None, pairs: Sequence[tuple[int, int]], adaptive: bool,
                      lookup: bool) -> list[EngineSpec]:
    """specdiff with the conditioned drafter at each (k, T) pair, adaptive and lookup recorded."""
    options = (("adaptive", adaptive), ("lookup", lookup))
    specs = [EngineSpec("specdiff", drafter=drafter, num_draft_tokens=k, num_steps=t,
                        options=options) for k, t in pairs]
    if specs and specs[0].kind != "conditioned":
        raise ValueError(f"{drafter} is not a conditioned drafter checkpoint (its config.json): "
                         "pass --conditioned-drafter DIR")
    return specs


def speculator_specs(kinds: Sequence[str], *, sedd: str | None = None, ar: str | None = None,
                     dflash: str | None = None, conditioned: str | None = None,
                     draft_model_k: Sequence[int] = (), default_runner_k: Sequence[int] = (),
                     specdiff_pairs: Sequence[tuple[int, int]] = (),
                     conditioned_pairs: Sequence[tuple[int, int]] = (), window: int | None = None,
                     adaptive: bool = True, lookup: bool = True) -> list[tuple[EngineSpec, str]]:
    """The speculating engines of `kinds` as (EngineSpec, runner), in run order: ngram,
    draft_model (runner v1, then "default"), dflash, specdiff SEDD, specdiff conditioned.

    ngram and dflash sweep draft_model_k. Raises ValueError for an unknown kind, a dflash folder
    without config.json or a conditioned drafter that is not one (only when that kind is asked).
    Shared by bench_offline (engines) and bench_serve (servers).
    """
    unknown = set(kinds) - set(ENGINE_KINDS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}: choose from {ENGINE_KINDS}")
    specs: list[tuple[EngineSpec, str]] = []
    if "ngram" in kinds:
        specs += [(EngineSpec("ngram", num_draft_tokens=k), "v1") for k in draft_model_k]
    if "draft_model" in kinds:
        specs += [(EngineSpec("draft_model", drafter=ar, num_draft_tokens=k), "v1")
                  for k in draft_model_k]
    if "draft_model_default" in kinds:
        specs += [(EngineSpec("draft_model", drafter=ar, num_draft_tokens=k), "default")
                  for k in default_runner_k]
    if "dflash" in kinds:
        problem = dflash_drafter_problem(dflash)
        if problem:
            raise ValueError(problem)
        specs += [(EngineSpec("dflash", drafter=dflash, num_draft_tokens=k), "v1")
                  for k in draft_model_k]
    if "specdiff" in kinds:
        specs += [(EngineSpec("specdiff", drafter=sedd, num_draft_tokens=k, num_steps=t,
                              window=window, options=(("adaptive", adaptive), ("lookup", lookup))),
                   "v1") for k, t in specdiff_pairs]
    if "specdiff_conditioned" in kinds:
        specs += [(spec, "v1") for spec in conditioned_specs(conditioned, conditioned_pairs,
                                                             adaptive, lookup)]
    return specs


def build_engines(kinds: Sequence[str], sedd_drafter: str | None, ar_drafter: str | None,
                  draft_model_k: Sequence[int], default_runner_k: Sequence[int],
                  specdiff_pairs: Sequence[tuple[int, int]], window: int | None,
                  baseline_reruns: int, *, dflash_drafter: str | None = None,
                  conditioned_drafter: str | None = None,
                  conditioned_pairs: Sequence[tuple[int, int]] = (), adaptive: bool = True,
                  lookup: bool = True) -> list[BenchEngine]:
    """The engines of one run, in run order: baseline first, then the speculators
    (speculator_specs), then the baseline again (baseline_reruns - 1 more times)."""
    specs = speculator_specs(kinds, sedd=sedd_drafter, ar=ar_drafter, dflash=dflash_drafter,
                             conditioned=conditioned_drafter, draft_model_k=draft_model_k,
                             default_runner_k=default_runner_k, specdiff_pairs=specdiff_pairs,
                             conditioned_pairs=conditioned_pairs, window=window,
                             adaptive=adaptive, lookup=lookup)
    engines = [BenchEngine(EngineSpec("none"))] if "none" in kinds else []
    engines += [BenchEngine(spec, runner) for spec, runner in specs]
    if "none" in kinds:
        engines += [BenchEngine(EngineSpec("none"), baseline_run=i) for i in range(1, baseline_reruns)]
    return engines


def default_runner_is_v1_no_async() -> bool:
    """True where vLLM's defaults already are Model Runner V1 without async scheduling: the CPU
    platform forces async_scheduling = False, and the V2 runner needs Triton, which has no CPU
    backend (vllm/platforms/cpu.py, VllmConfig.use_v2_model_runner in vLLM 0.32)."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# Running one engine in a spawned process

def _use_runner(runner: str) -> None:
    """Make offline.run_engine's `LLM(...)` run on `runner` and record what vLLM picked.

    run_engine pins Model Runner V1 (VLLM_USE_V2_MODEL_RUNNER=0, set only if unset) and passes
    async_scheduling=False. For runner "default" this subclass removes both before vLLM reads
    them, so vLLM chooses as it does for any user. Only ever called in a spawned child process.
    """
    import vllm

    base = vllm.LLM

    class RecordingLLM(base):  # type: ignore[misc, valid-type]
        chosen: dict[str, Any] = {}

        def __init__(self, *args, **kwargs):
            if runner == "default":
                os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
                kwargs.pop("async_scheduling", None)
            else:
                os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            super().__init__(*args, **kwargs)
            config = getattr(getattr(self, "llm_engine", None), "vllm_config", None)
            if config is not None:
                RecordingLLM.chosen.update(
                    model_runner="v2" if getattr(config, "use_v2_model_runner", False) else "v1",
                    async_scheduling=bool(config.scheduler_config.async_scheduling))

    vllm.LLM = RecordingLLM
    _use_runner.recorder = RecordingLLM  # type: ignore[attr-defined]


def _engine_child(queue, engine: BenchEngine, args: tuple, kwargs: dict) -> None:
    try:
        _use_runner(engine.runner)
        rows = run_engine(engine.spec, *args, **kwargs)
        chosen = _use_runner.recorder.chosen  # type: ignore[attr-defined]
        for row in rows:
            row.update(chosen)
        queue.put(("ok", rows))
    except BaseException as err:  # report, never hang the parent
        import traceback

        queue.put(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def run_engine_isolated(engine: BenchEngine, *args, **kwargs) -> list[dict[str, Any]]:
    """offline.run_engine for one BenchEngine in a fresh spawned process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_engine_child, args=(queue, engine, args, kwargs))
    process.start()
    try:
        while True:
            try:
                status, payload = queue.get(timeout=5)
                break
            except Exception:  # queue.Empty: keep waiting while the child lives
                if not process.is_alive():
                    raise RuntimeError(f"engine {engine.label}: process died "
                                       f"(exit code {process.exitcode})") from None
    finally:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    if status != "ok":
        raise RuntimeError(f"engine {engine.label} failed:\n{payload}")
    return payload


# ---------------------------------------------------------------------------------------------
# Results

def baseline_drift(rows: Sequence[dict[str, Any]]) -> float | None:
    """Largest relative spread of the no-speculation runs at one (temperature, batch), or None."""
    by_key: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("method") == "none" and r.get("tokens_per_s"):
            by_key.setdefault((r["temperature"], r["batch"]), []).append(r["tokens_per_s"])
    spreads = [(max(v) - min(v)) / (sum(v) / len(v)) for v in by_key.values() if len(v) > 1]
    return max(spreads) if spreads else None


def _accept(row: dict[str, Any]) -> float | None:
    return row.get("mean_acceptance_length")


def engine_family(row: dict[str, Any]) -> str:
    """The row's method, specdiff split by drafter kind (specdiff-sedd, specdiff-conditioned), so
    that plots and tables never mix the two drafters. Rows without "kind" (older results) are
    SEDD."""
    if row["method"] != "specdiff":
        return row["method"]
    return f"specdiff-{row.get('kind') or 'sedd'}"


def family_rank(row: dict[str, Any]) -> int:
    """The row's engine family's position in FAMILIES (run order); unknown families last."""
    family = engine_family(row)
    return FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)


TABLE_COLUMNS = [
    ("engine", lambda r: r["label"], ""),
    ("runner", lambda r: (f"{r.get('model_runner', r.get('runner'))}"
                          f"{'+async' if r.get('async_scheduling') else ''}"), ""),
    ("temp", lambda r: r.get("temperature"), "g"),
    ("batch", lambda r: r.get("batch"), "d"),
    ("tok/s", lambda r: r.get("tokens_per_s"), ".1f"),
    ("accept len", _accept, ".2f"),
    ("speedup", lambda r: r.get("speedup"), ".2f"),
    ("vs draft_model", lambda r: r.get("speedup_vs_draft_model"), ".2f"),
    ("vs best peer", lambda r: r.get("speedup_vs_best_peer"), ".2f"),
    ("note", lambda r: r.get("error", "").splitlines()[0][:60] if r.get("error") else "", ""),
]


def table_order(row: dict[str, Any]) -> tuple:
    return (row.get("temperature") or 0, row.get("batch") or 0, family_rank(row),
            row.get("runner") != "v1", row.get("num_draft_tokens") or 0, row.get("num_steps") or 0,
            row.get("baseline_run", 0))


def write_plots(rows: Sequence[dict[str, Any]], prefix: Path) -> list[Path]:
    """speedup vs num_steps (specdiff, one line per drafter kind, k and batch), acceptance length
    vs num_draft_tokens (one line per engine family, and T for specdiff), tokens/s vs batch size."""
    ok = [r for r in rows if r.get("tokens_per_s")]
    specdiff = [r for r in ok if r["method"] == "specdiff"]
    drafted = [r for r in ok if r["method"] != "none" and r.get("runner") == "v1"]
    paths = [
        plot_lines(f"{prefix}-speedup_vs_steps.png",
                   group_points(specdiff, lambda r: f"temperature {r['temperature']:g}",
                                lambda r: (f"{engine_family(r)} k={r['num_draft_tokens']} "
                                           f"batch {r['batch']}"),
                                lambda r: r["num_steps"], lambda r: r.get("speedup")),
                   "num_steps (denoising steps per draft)", "speedup over no speculation",
                   "specdiff: speedup vs diffusion steps", hline=1.0),
        plot_lines(f"{prefix}-acceptance_vs_draft_tokens.png",
                   group_points(drafted, lambda r: f"temperature {r['temperature']:g}",
                                lambda r: engine_family(r) + (f" T={r['num_steps']}"
                                                              if r["method"] == "specdiff" else ""),
                                lambda r: r["num_draft_tokens"], _accept),
                   "num_draft_tokens (k)", "mean acceptance length (tokens / round)",
                   "acceptance length vs draft length (mean over batch sizes)", logx=True),
        plot_lines(f"{prefix}-tokens_per_s_vs_batch.png",
                   group_points([r for r in ok if not r.get("baseline_run")],
                                lambda r: f"temperature {r['temperature']:g}",
                                lambda r: r["label"], lambda r: r["batch"],
                                lambda r: r["tokens_per_s"]),
                   "batch size", "output tokens / s", "throughput vs batch size", logx=True),
    ]
    return [p for p in paths if p is not None]


# ---------------------------------------------------------------------------------------------
# Inputs

def load_prompts(path: str | Path, tokenizer, n: int | None) -> list[list[int]]:
    """Token id prompts from a JSONL file: one {"prompt": text} or {"prompt_token_ids": [...]}
    per line; the first n lines (all when n is None)."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if "prompt_token_ids" in item:
            prompts.append([int(t) for t in item["prompt_token_ids"]])
        elif "prompt" in item:
            if tokenizer is None:
                raise ValueError(f"{path}:{number}: a text prompt needs the target's tokenizer")
            prompts.append(list(tokenizer.encode(item["prompt"], add_special_tokens=False)))
        else:
            raise ValueError(f'{path}:{number}: expected a "prompt" or "prompt_token_ids" key')
        if not prompts[-1]:
            raise ValueError(f"{path}:{number}: empty prompt")
        if n is not None and len(prompts) == n:
            break
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def drafter_paths(args: argparse.Namespace) -> dict[str, str]:
    """Drafter folder per DRAFTER_OPTIONS attribute: the given path, else the embedded one."""
    from vllm_specdiff import assets

    return {name: getattr(args, name) or str(getattr(assets, asset))
            for name, (asset, _) in DRAFTER_OPTIONS.items()}


def choose_methods(args: argparse.Namespace) -> list[str]:
    """The methods to run: --methods, else every kind but dflash when its drafter folder is not
    there yet; less draft_model_default where it equals draft_model (unless
    --force-default-runner). A note is printed for each kind left out."""
    if args.methods:
        kinds = [k.strip() for k in args.methods.split(",") if k.strip()]
    else:
        kinds = list(ENGINE_KINDS)
        problem = dflash_drafter_problem(drafter_paths(args)["dflash_drafter"])
        if problem:
            kinds.remove("dflash")
            print(f"note: dflash left out: {problem}")
    if "draft_model_default" in kinds and not args.force_default_runner \
            and default_runner_is_v1_no_async():
        kinds.remove("draft_model_default")
        print("note: on this platform vLLM's default is already Model Runner V1 without async "
              "scheduling, so draft_model_default equals draft_model: skipped "
              "(--force-default-runner runs it anyway)")
    return kinds


def resolve_models(args: argparse.Namespace, kinds: Sequence[str]) -> tuple[str, dict[str, str]]:
    """Target path and drafter_paths (embedded defaults), failing early and clearly when a method
    of `kinds` needs an embedded drafter that is not there yet."""
    from vllm_specdiff import assets

    drafters = drafter_paths(args)
    for name, (_, needed) in DRAFTER_OPTIONS.items():
        if set(needed) & set(kinds) and getattr(args, name) is None \
                and not Path(drafters[name]).exists():
            raise SystemExit(f"the embedded drafter {drafters[name]} does not exist yet: train it "
                             f"(vllm-specdiff train ...) or pass --{name.replace('_', '-')} PATH")
    return args.target or str(assets.prepare_target()), drafters


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """--methods, --target, the drafters, and the conditioned drafter's k:T pairs and options
    (shared with bench_serve)."""
    parser.add_argument("--target", help="target model (default: embedded SmolLM2-135M)")
    parser.add_argument("--sedd-drafter", help="SEDD drafter (default: the embedded one)")
    parser.add_argument("--ar-drafter", help="draft_model drafter (default: the embedded one)")
    parser.add_argument("--dflash-drafter",
                        help="DFlash-format drafter for vLLM's dflash (default: the embedded one, "
                             "once trained)")
    parser.add_argument("--conditioned-drafter",
                        help="conditioned drafter of specdiff_conditioned (default: the embedded "
                             "one)")
    parser.add_argument("--conditioned", default="4:1",
                        help="specdiff_conditioned num_draft_tokens:num_steps list")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                        help="specdiff (both drafters): per step and request, draft only "
                             "the tokens that pay")
    parser.add_argument("--lookup", action=argparse.BooleanOptionalAction, default=True,
                        help="specdiff (both drafters): prompt-lookup continuations of the "
                             "context enter the draft block")
    parser.add_argument("--methods", help=f"comma list of {ENGINE_KINDS} (default: all, less "
                                          "dflash without its drafter and draft_model_default "
                                          "where it equals draft_model); draft_model_default = "
                                          "vLLM's default runner and scheduling")
    parser.add_argument("--force-default-runner", action="store_true",
                        help="run draft_model_default even where it equals runner v1 (CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small grid: 4 prompts x 32 tokens, batch {1,4}, ngram / draft_model "
                             "/ dflash k=4, specdiff k=8 T=2")
    add_method_options(parser)
    parser.add_argument("--prompts", help='JSONL file: {"prompt": text} or {"prompt_token_ids": '
                                          "[...]} per line (default: held-out BBC News)")
    parser.add_argument("--num-prompts", type=int, help="default 16 (quick: 4)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="BBC prompt length")
    parser.add_argument("--max-tokens", type=int, help="new tokens per prompt, default 128 (quick: 32)")
    parser.add_argument("--batches", help="comma list, default 1,4,16 (quick: 1,4)")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--draft-model-k", help="ngram, draft_model (V1 runner) and dflash k sweep, "
                                                "default 2,4,8 (quick: 4)")
    parser.add_argument("--default-runner-k", default="4", help="draft_model k on the default runner")
    parser.add_argument("--num-draft-tokens", help="specdiff k sweep, default 4,8,16,32 (quick: 8)")
    parser.add_argument("--num-steps", help="specdiff num_steps sweep, default 1,2,4,8 (quick: 2)")
    parser.add_argument("--sweep", choices=["axes", "grid"], default="axes",
                        help="axes: k sweep at --base-num-steps + T sweep at --base-num-draft-tokens")
    parser.add_argument("--base-num-draft-tokens", type=int, default=8)
    parser.add_argument("--base-num-steps", type=int, default=2)
    parser.add_argument("--window", type=int, help="specdiff drafter window (default: its length)")
    parser.add_argument("--dtype", default="auto",
                        help="auto: float32 on CPU (bf16 is emulated on most CPUs), bfloat16 on GPU")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1, help="passes over the prompts per point")
    parser.add_argument("--baseline-reruns", type=int,
                        help="no-speculation engines (first, and again last), default 2 (quick: 1)")
    parser.add_argument("--engine-process", choices=["auto", "inproc", "multiproc"], default="auto",
                        help="vLLM engine core in the engine's process (inproc, fast build) or its "
                             "own (multiproc, vLLM's default); auto = inproc with --quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", help="file name stem: offline[-TAG].jsonl (default: quick for --quick)")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def apply_quick_defaults(args: argparse.Namespace) -> None:
    """Fill the unset grid options with the full or the --quick values."""
    quick = args.quick
    defaults = {
        "num_prompts": 4 if quick else 16, "max_tokens": 32 if quick else 128,
        "batches": "1,4" if quick else "1,4,16", "draft_model_k": "4" if quick else "2,4,8",
        "num_draft_tokens": "8" if quick else "4,8,16,32",
        "num_steps": "2" if quick else "1,2,4,8",
        "baseline_reruns": 1 if quick else 2, "tag": "quick" if quick else None,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_quick_defaults(args)
    args.dtype = default_dtype(args.dtype)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    inproc = args.engine_process == "inproc" or (args.engine_process == "auto" and args.quick)
    if inproc:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # inherited by the spawned engines

    kinds = choose_methods(args)
    batches, temperatures = parse_ints(args.batches), parse_floats(args.temperatures)
    pairs = specdiff_grid(parse_ints(args.num_draft_tokens), parse_ints(args.num_steps), args.sweep,
                          args.base_num_draft_tokens, args.base_num_steps)
    target, drafters = resolve_models(args, kinds)
    engines = build_engines(kinds, drafters["sedd_drafter"], drafters["ar_drafter"],
                            parse_ints(args.draft_model_k), parse_ints(args.default_runner_k), pairs,
                            args.window, args.baseline_reruns,
                            dflash_drafter=drafters["dflash_drafter"],
                            conditioned_drafter=drafters["conditioned_drafter"],
                            conditioned_pairs=parse_pairs(args.conditioned),
                            adaptive=args.adaptive, lookup=args.lookup)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    if args.prompts:
        prompts = load_prompts(args.prompts, tokenizer, args.num_prompts)
        prompt_source = str(args.prompts)
    else:
        from vllm_specdiff.data import heldout_prompts

        prompts = heldout_prompts(tokenizer, args.num_prompts, args.prompt_tokens)
        prompt_source = f"bbc-heldout ({args.prompt_tokens} tokens each)"

    device, stem = device_name(), "offline" + (f"-{args.tag}" if args.tag else "")
    print(f"device: {device} | target {target} | dtype {args.dtype} | {len(prompts)} prompts "
          f"({prompt_source}) x {args.max_tokens} new tokens | batches {batches} | temperatures "
          f"{temperatures} | {len(engines)} engines, {'in-process' if inproc else 'multiprocess'} "
          "engine core", flush=True)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for number, engine in enumerate(engines, 1):
        t0 = time.perf_counter()
        print(f"[{number}/{len(engines)}] {engine.label}: building the engine and generating ...",
              flush=True)
        common = {"device": device, "runner": engine.runner, "baseline_run": engine.baseline_run,
                  "target": target, "max_tokens": args.max_tokens, "num_prompts": len(prompts),
                  "prompts": prompt_source, "engine_core": "inproc" if inproc else "multiproc"}
        try:
            results = run_engine_isolated(
                engine, target, prompts, batches, temperatures, args.max_tokens, dtype=args.dtype,
                seed=args.seed, max_model_len=args.max_model_len, repeats=args.repeats)
        except Exception as err:  # one failed engine must not lose the others' numbers
            print(f"    FAILED: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                  flush=True)
            rows.append({**common, "method": engine.spec.method, "kind": engine.spec.kind,
                         "label": engine.label, "drafter": engine.spec.drafter,
                         "options": dict(engine.spec.options),
                         "num_draft_tokens": engine.spec.num_draft_tokens,
                         "num_steps": engine.spec.num_steps, "dtype": args.dtype,
                         "batch": None, "temperature": None, "acceptance_histogram": None,
                         "mean_acceptance_length": None, "tokens_per_s": None,
                         "error": str(err)[-4000:]})
            continue
        for r in results:
            r.update(common, label=engine.label, sample=r.get("sample", "")[:200])
        rows += results
        elapsed = time.perf_counter() - started
        summary = ", ".join(f"T{r['temperature']:g}/b{r['batch']}: {r['tokens_per_s']:.1f} tok/s"
                            for r in results)
        print(f"    {time.perf_counter() - t0:.0f} s (build {results[0]['engine_build_s']:.0f} s); "
              f"{summary}; ~{elapsed / number * (len(engines) - number):.0f} s left", flush=True)

    add_speedups(rows)
    rows.sort(key=table_order)
    print()
    print(format_table(rows, TABLE_COLUMNS))
    drift = baseline_drift(rows)
    if drift is not None:
        print(f"\nno-speculation reruns differ by up to {100 * drift:.1f}% (machine noise; "
              "speedups use their mean)")
    print(f"\nabsolute tokens/s: {device}, {args.dtype}; speedups are ratios within this run")
    jsonl = write_jsonl(args.out / f"{stem}.jsonl", rows)
    print(f"wrote {jsonl}")
    if not args.no_plots:
        for path in write_plots(rows, args.out / stem):
            print(f"wrote {path}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
