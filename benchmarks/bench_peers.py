"""specdiff against every speculator vLLM ships, in one run (embedded target, held-out BBC prompts).

Engines (each in its own spawned process, all alive at once and timed cell by cell in turn, the
order rotating with the round; Model Runner V1 without async scheduling, eager, float32 on
CPU): no speculation; vLLM's ngram and draft_model (AR drafter); specdiff with the standalone SEDD
drafter; specdiff with the conditioned drafter at T = 1 and at the other given T; specdiff options
(adaptive, lookup) as given. Every row records method, k, T, draft policy, adaptive / lookup,
runner settings, tokens/s, the acceptance histogram and its ratios to no speculation and to the
best peer of the same (temperature, batch) cell. vLLM's dflash peer runs the DFlash-format drafter
that `vllm-specdiff train --kind dflash` trained with the same data and budget as the shipped
conditioned drafter (`--dflash DIR`, default the shipped one; `--dflash ''` leaves it out).

    python benchmarks/bench_peers.py --batches 1,4,16 --temperatures 0,1 --num-prompts 16 \
        --max-tokens 32 --out benchmarks/results/peers.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    from vllm_specdiff.assets import (AR_DRAFTER_DIR, CONDITIONED_DRAFTER_DIR, DFLASH_DRAFTER_DIR,
                                      SEDD_DRAFTER_DIR, prepare_target, target_tokenizer)
    from vllm_specdiff.data import heldout_prompts
    from vllm_specdiff.engine.offline import (EngineSpec, add_speedups, default_dtype, device_name,
                                              format_table, run_interleaved,
                                              run_isolated)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--min-prompts", type=int, default=None,
                        help="each cell runs max(batch, this) prompts (default: all of them)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole engine list this many times (in order, A B C .. A B C); "
                             "a row's tokens/s is its tokens over its seconds summed over the rounds "
                             "(each round's is kept in round_tokens_per_s): host noise averages out")
    parser.add_argument("--k", type=int, default=4, help="draft tokens of every speculator")
    parser.add_argument("--sedd-k", type=int, default=8)
    parser.add_argument("--sedd-steps", type=int, default=2)
    parser.add_argument("--cond-steps", default="1,2", help="T values of the conditioned drafter")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lookup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--verifier", choices=("auto", "specdiff", "vllm"), default=None,
                        help="specdiff engines' --specdiff-verifier (default: the plugin's auto)")
    parser.add_argument("--dflash", default=None,
                        help="DFlash-format drafter for vLLM's dflash (default: the shipped one)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--engines", default=None,
                        help="only these engine kinds, comma-separated (none, ngram, draft_model, "
                             "dflash, sedd, conditioned); default: all. A partial run is a "
                             "diagnosis, not the comparison: best-peer ratios cover the peers run")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                        help="all engines alive at once (one process each), every cell timed on "
                             "each in turn, so the host's drift hits a cell's engines alike "
                             "(default); --no-interleave: one engine after another")
    parser.add_argument("--out", default="benchmarks/results/peers.jsonl")
    args = parser.parse_args(argv)
    if args.rounds < 1 or (args.min_prompts is not None and args.min_prompts < 1):
        parser.error("--rounds and --min-prompts must be >= 1")
    if args.dflash is None:
        args.dflash = str(DFLASH_DRAFTER_DIR)
    dtype = default_dtype(args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    temperatures = [float(t) for t in args.temperatures.split(",")]
    target = str(prepare_target())
    prompts = heldout_prompts(target_tokenizer(), args.num_prompts, args.prompt_tokens)
    specdiff_options = (("adaptive", args.adaptive),) + (
        (("verifier", args.verifier),) if args.verifier else ())
    engines = [EngineSpec("none"), EngineSpec("ngram", num_draft_tokens=args.k),
               EngineSpec("draft_model", drafter=str(AR_DRAFTER_DIR), num_draft_tokens=args.k)]
    if args.dflash:
        engines.append(EngineSpec("dflash", drafter=args.dflash, num_draft_tokens=args.k))
    engines.append(EngineSpec("specdiff", drafter=str(SEDD_DRAFTER_DIR), num_draft_tokens=args.sedd_k,
                              num_steps=args.sedd_steps, options=specdiff_options))
    for steps in (int(t) for t in args.cond_steps.split(",")):
        engines.append(EngineSpec("specdiff", drafter=str(CONDITIONED_DRAFTER_DIR),
                                  num_draft_tokens=args.k, num_steps=steps,
                                  options=specdiff_options + (("lookup", args.lookup),)))
    engines.append(EngineSpec("none"))  # the baseline again: its spread bounds the noise
    if args.engines:
        kinds = set(args.engines.split(","))
        unknown = kinds - {spec.kind for spec in engines}
        if unknown:
            parser.error(f"--engines: unknown kind(s) {sorted(unknown)}; choose from "
                         f"{sorted({spec.kind for spec in engines})}")
        engines = [spec for spec in engines if spec.kind in kinds]
    results, t0 = [], time.time()
    runs: dict[int, list[list[dict]]] = {}
    if args.interleave:
        per_engine = run_interleaved(engines, target, prompts, batches, temperatures,
                                     args.max_tokens, rounds=args.rounds, dtype=dtype,
                                     min_prompts=args.min_prompts,
                                     progress=lambda line: print(f"[peers] {line}", flush=True))
        runs = dict(enumerate(per_engine))
    for round_index in range(0 if args.interleave else args.rounds):
        for index, spec in enumerate(engines):
            print(f"[peers] round {round_index + 1}/{args.rounds}: {spec.label} ...", flush=True)
            runs.setdefault(index, []).append(run_isolated(
                spec, target, prompts, batches, temperatures, args.max_tokens, dtype=dtype,
                min_prompts=args.min_prompts))
    for index in sorted(runs):
        results += merge_rounds(runs[index])
    add_speedups(results)
    device = device_name()
    for r in results:
        r.update(device=device, draft_policy="auto" if r["method"] == "specdiff" else None)
        r.pop("sample", None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in results))
    table = (f"{device}, {dtype}, {len(prompts)} held-out prompts x {args.max_tokens} new tokens, "
             f"{time.time() - t0:.0f} s" + ("" if args.dflash else
                                            "; dflash left out (no DFlash-format checkpoint given)")
             + "\n" + format_table(results) + "\n")
    out.with_suffix(".txt").write_text(table)  # the readable table beside the JSONL
    print("\n" + table, end="")
    plot(results, out.with_suffix(""))
    return 0


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One engine's rows over several rounds: tokens and seconds summed per cell (tokens/s is
    their ratio), acceptance counters summed, per-round tokens/s kept."""
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    for rows in zip(*rounds):
        row = dict(rows[0])
        row["round_tokens_per_s"] = [r["tokens_per_s"] for r in rows]
        for key in ("tokens", "seconds", "num_drafts", "num_accepted_tokens"):
            row[key] = sum(r[key] for r in rows)
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        steps = [r.get("engine_steps") or 0 for r in rows]
        for key in ("plugin_ms_per_step", "observe_ms_per_step", "drafter_ms_per_step"):
            if sum(steps) and all(r.get(key) is not None for r in rows):
                row[key] = sum(r[key] * n for r, n in zip(rows, steps)) / sum(steps)
        if sum(steps):
            row["engine_steps"] = sum(steps)
        if row["num_drafts"]:
            row["mean_acceptance_length"] = 1 + row["num_accepted_tokens"] / row["num_drafts"]
            row["acceptance_histogram"] = [sum(r["acceptance_histogram"][i] for r in rows)
                                           for i in range(len(row["acceptance_histogram"]))]
        merged.append(row)
    return merged


def plot(results: list[dict], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for temperature in sorted({r["temperature"] for r in results}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in dict.fromkeys(r["label"] for r in results):
            rows = sorted((r for r in results if r["label"] == label and r["temperature"] == temperature),
                          key=lambda r: r["batch"])
            if label == "no speculation":  # the mean of the runs
                batches = sorted({r["batch"] for r in rows})
                ys = [sum(r["tokens_per_s"] for r in rows if r["batch"] == b)
                      / sum(1 for r in rows if r["batch"] == b) for b in batches]
                ax.plot(batches, ys, marker="o", color="black", label=label)
                continue
            ax.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o",
                    label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"tokens/s vs batch, temperature {temperature:g}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(f"{stem}-tps-t{temperature:g}.png", dpi=120)
        plt.close(fig)
    cond = [r for r in results if r.get("kind") == "conditioned"]
    if cond:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (temperature, batch) in sorted({(r["temperature"], r["batch"]) for r in cond}):
            rows = sorted((r for r in cond if (r["temperature"], r["batch"]) == (temperature, batch)),
                          key=lambda r: r["num_steps"])
            ax.plot([r["num_steps"] for r in rows], [r["speedup"] for r in rows], marker="o",
                    label=f"temperature {temperature:g}, batch {batch}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xlabel("denoising steps T")
        ax.set_ylabel("speedup over no speculation")
        ax.set_title("specdiff (conditioned drafter): speedup vs T")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(f"{stem}-speedup-vs-T.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
