"""Held-out drafter quality on the embedded target: simulated acceptance lengths, temperature-1
expectations, drafter cost per round and the learning curve of the conditioned drafter.

Sequences: the target's own greedy continuations of held-out BBC prompts (the feature store that
`vllm-specdiff train --kind conditioned` builds in its work dir). Every continuation position
(evenly spaced) is an anchor. Simulated acceptance length (greedy) = 1 + leading drafts equal to the
target's greedy tokens. At temperature 1 (conditioned drafter, both policies) the expected
acceptance length uses the target's probabilities of the drafted tokens (one target forward over
context + drafts per anchor): argmax + one-hot: 1 + sum_j prod_{i<=j} p_i(d_i), exact; sampled +
full q: the same with min(1, p_i / q_i), averaged over sampled drafts (Monte Carlo).

    python benchmarks/eval_drafters.py --work-dir ~/.cache/vllm-specdiff/train-conditioned-smollm2
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


def sequence_drafter_greedy(drafter, store, k: int, start: int, anchors_per_seq: int) -> dict:
    """Simulated greedy acceptance of a token-only drafter (SEDD, AR) on the same anchors."""
    seq_len = store.token_ids.shape[1]
    anchors = torch.linspace(start, seq_len - k - 1, anchors_per_seq).round().long().unique()
    lengths, per_slot = [], torch.zeros(k)
    for row in range(store.num_sequences):
        tokens = store.token_ids[row]
        contexts = [tokens[:a + 1].tolist() for a in anchors.tolist()]
        out = drafter.draft(contexts, temperature=0.0)
        pos = anchors[:, None] + torch.arange(1, k + 1)
        greedy = store.topk_ids[row, pos - 1, 0]
        ok = (out.token_ids[:, :k] == greedy) & (tokens[pos] == greedy)
        run = ok.long().cumprod(-1)
        lengths.append(1 + run.sum(-1))
        per_slot += run.sum(0).float()
    lengths = torch.cat(lengths).float()
    return {"acceptance_length": round(float(lengths.mean()), 4),
            "slot_accept": [round(float(v), 4) for v in per_slot / lengths.numel()],
            "anchors": int(lengths.numel())}


def context_sensitivity(drafter, store, start: int, num_contexts: int = 24) -> dict:
    """How much a token-only drafter's law depends on its context: the mean total variation
    distance between the first-slot draft laws of different held-out contexts (each sequence cut
    at `start` + its row index, so the contexts end at different positions), and the mean
    probability the law puts on the target's greedy next token. A drafter that ignores its
    context has TV ~0 whatever the contexts are."""
    rows = min(num_contexts, store.num_sequences)
    cuts = [start + row for row in range(rows)]
    contexts = [store.token_ids[row, :cut + 1].tolist() for row, cut in enumerate(cuts)]
    out = drafter.draft(contexts, temperature=1.0, generator=torch.Generator().manual_seed(0))
    laws = out.draft_probs[:, 0].double()  # [rows, vocab]
    tv = 0.5 * (laws[:, None] - laws[None]).abs().sum(-1)
    pairs = ~torch.eye(rows, dtype=torch.bool)
    greedy = torch.stack([store.topk_ids[row, cut, 0] for row, cut in enumerate(cuts)])
    return {"context_tv": round(float(tv[pairs].mean()), 5),
            "p_target_greedy": round(float(laws[torch.arange(rows), greedy].mean()), 5),
            "contexts": rows}


def ngram_greedy(store, k: int, start: int, anchors_per_seq: int) -> dict:
    """Simulated greedy acceptance of prompt lookup (vLLM's ngram: n from 4 down to 2) on the same
    anchors; no match = no drafts (acceptance length 1)."""
    from vllm_specdiff.drafting.lookup import prompt_lookup

    seq_len = store.token_ids.shape[1]
    anchors = torch.linspace(start, seq_len - k - 1, anchors_per_seq).round().long().unique()
    lengths, per_slot = [], torch.zeros(k)
    for row in range(store.num_sequences):
        tokens = store.token_ids[row].numpy()
        for a in anchors.tolist():
            guess = prompt_lookup(tokens, a + 1, k, min_n=2, max_n=4)
            run = 0
            for j, token in enumerate(guess):
                greedy = int(store.topk_ids[row, a + j, 0])
                if token != greedy or int(tokens[a + 1 + j]) != greedy:
                    break
                run += 1
            per_slot[:run] += 1
            lengths.append(1 + run)
    return {"acceptance_length": round(sum(lengths) / len(lengths), 4),
            "slot_accept": [round(float(v), 4) for v in per_slot / len(lengths)],
            "anchors": len(lengths)}


@torch.no_grad()
def temperature_one_expectation(model, target, store, k: int, num_steps: int, policy: str,
                                start: int, anchors_per_seq: int, samples: int = 4) -> float:
    """Expected acceptance length at temperature 1 (see the module docstring)."""
    from vllm_specdiff.drafting.conditioned import ConditionedDrafter

    drafter = ConditionedDrafter(model, k, num_steps, policy)
    seq_len = store.token_ids.shape[1]
    anchors = torch.linspace(start, seq_len - k - 1, anchors_per_seq).round().long().unique().tolist()
    values = []
    gen = torch.Generator().manual_seed(0)
    for row in range(store.num_sequences):
        cache = drafter.new_cache(len(anchors) * samples, seq_len + k + 1)
        slots, feats = [], []
        for i, a in enumerate(anchors):
            for s in range(samples):
                slots.append(i * samples + s)
                feats.append(store.features[row, :a].float())
        cache.append(slots, feats)
        anchor_ids = torch.tensor([int(store.token_ids[row, a]) for a in anchors
                                   for _ in range(samples)])
        out = drafter.draft(cache, slots, anchor_ids, torch.ones(len(slots)), generator=gen)
        for j, a in enumerate(a for a in anchors for _ in range(samples)):
            ids = torch.cat([store.token_ids[row, :a + 1], out.token_ids[j]])[None]
            probs = torch.softmax(target(ids).logits[0, a:a + k].float(), -1)  # p of drafts 1..k
            p = probs.gather(1, out.token_ids[j][:, None])[:, 0]
            q = out.draft_probs[j].gather(1, out.token_ids[j][:, None])[:, 0]
            accept = torch.clamp(p / q.clamp(min=1e-12), max=1.0)
            values.append(1 + float(accept.cumprod(0).sum()))
    return round(sum(values) / len(values), 4)


@torch.no_grad()
def costs(model, target, k: int, num_steps: int, batch: int, context: int = 128,
          repeats: int = 5) -> dict:
    """ms per drafter round (context cache, T steps) vs a target decode step and a (k+1)-token
    verify with the target's KV cache (HF, this machine)."""
    from transformers import DynamicCache

    from vllm_specdiff.drafting.conditioned import ConditionedDrafter

    drafter = ConditionedDrafter(model, k, num_steps, "argmax")
    feature_size = model.config.feature_size
    cache = drafter.new_cache(batch, context + 64)
    cache.append(range(batch), [torch.randn(context, feature_size)] * batch)

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1e3 * (time.perf_counter() - start) / repeats

    anchors = torch.ones(batch, dtype=torch.long)
    draft_ms = timed(lambda: drafter.draft(cache, list(range(batch)), anchors, torch.zeros(batch)))
    # The same round with the full 49k head instead of the reduced draft vocabulary.
    reduced = model.draft_vocab
    model.draft_vocab = torch.arange(model.config.vocab_size)
    model.invalidate_head_cache()
    full_vocab_ms = timed(lambda: drafter.draft(cache, list(range(batch)), anchors, torch.zeros(batch)))
    model.draft_vocab = reduced
    model.invalidate_head_cache()
    ids = torch.randint(100, 1000, (batch, context))
    prefill = target(ids, use_cache=True).past_key_values

    def step(n: int):
        kv = DynamicCache()
        for layer in range(len(prefill.layers)):
            kv.update(prefill.layers[layer].keys.clone(), prefill.layers[layer].values.clone(), layer)
        target(torch.randint(100, 1000, (batch, n)), past_key_values=kv, use_cache=True)

    decode_ms = timed(lambda: step(1))
    verify_ms = timed(lambda: step(k + 1))
    return {"batch": batch, "num_draft_tokens": k, "num_steps": num_steps, "drafter_ms": draft_ms,
            "drafter_ms_full_vocabulary": full_vocab_ms,
            "target_decode_ms": decode_ms, "target_verify_ms": verify_ms}


def plot_acceptance_vs_k(rows: list[dict], path: str) -> None:
    """Simulated greedy acceptance length vs k, one line per drafter (its T = 1 rows, or its only T)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["drafter"] for r in rows):
        mine = [r for r in rows if r["drafter"] == name]
        if any(r["num_steps"] == 1 for r in mine) and name != "ar (draft_model)":
            mine = [r for r in mine if r["num_steps"] == 1]
        mine = sorted(mine, key=lambda r: r["num_draft_tokens"])
        ax.plot([r["num_draft_tokens"] for r in mine], [r["acceptance_length"] for r in mine],
                marker="o", label=name)
    ax.set_xlabel("draft tokens k")
    ax.set_ylabel("simulated acceptance length (greedy)")
    ax.set_title("held-out BBC, SmolLM2-135M's own greedy text")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from vllm_specdiff.assets import (AR_DRAFTER_DIR, CONDITIONED_DRAFTER_DIR, SEDD_DRAFTER_DIR,
                                      prepare_target, target_tokenizer)
    from vllm_specdiff.data.target_features import load_feature_store
    from vllm_specdiff.drafting.autoregressive import AutoregressiveDrafter
    from vllm_specdiff.drafting.diffusion import DiffusionDrafter
    from vllm_specdiff.models.conditioned_checkpoint import load_conditioned, tokenizer_fingerprint
    from vllm_specdiff.models.sedd import SEDD
    from vllm_specdiff.training.conditioned import simulated_acceptance

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", required=True, help="the conditioned trainer's work dir")
    parser.add_argument("--drafter", default=str(CONDITIONED_DRAFTER_DIR))
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                        help="more conditioned-format drafters for the greedy table (T = 1), e.g. "
                             "'dflash (peer)=WORK/drafter' (the DFlash peer's copy in our format) or "
                             "an earlier version")
    parser.add_argument("--sedd", action="append", default=[], metavar="NAME=DIR",
                        help="another standalone SEDD drafter to evaluate beside the shipped one "
                             "(e.g. a retrained one before it is shipped)")
    parser.add_argument("--k-plot", default="benchmarks/results/acceptance-vs-k.png")
    parser.add_argument("--curve", action="append", default=[], metavar="NAME=JSONL",
                        help="more learning curves (a trainer's learning_curve.jsonl) drawn beside "
                             "the work dir's, e.g. an earlier run on less data")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--anchors-per-seq", type=int, default=16)
    parser.add_argument("--t1-sequences", type=int, default=6)
    parser.add_argument("--parts", default="greedy,t1,costs",
                        help="comma-separated: greedy, t1, costs (costs need an idle machine)")
    parser.add_argument("--t1-configs", default="4:1,4:4,8:1,8:2", help="k:T pairs at temperature 1")
    parser.add_argument("--out", default="benchmarks/results/drafters-heldout.json")
    parser.add_argument("--plot", default="benchmarks/results/learning-curve.png")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    work = Path(args.work_dir).expanduser()
    store = load_feature_store(work / "features-heldout")
    target = AutoModelForCausalLM.from_pretrained(prepare_target(), dtype=torch.float32).eval()
    model = load_conditioned(args.drafter, target.get_input_embeddings().weight,
                             target.get_output_embeddings().weight, target_config=target.config,
                             fingerprint=tokenizer_fingerprint(target_tokenizer()))
    start = args.prompt_tokens
    parts = set(args.parts.split(","))
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    rows = previous.get("greedy", []) if "greedy" not in parts else []
    for k in ((2, 4, 8) if "greedy" in parts else ()):
        for steps in sorted({1, 2, k}):
            if steps > k:
                continue
            r = simulated_acceptance(model, store, k, steps, start=start,
                                     anchors_per_seq=args.anchors_per_seq)
            rows.append({"drafter": "conditioned", **r})
            print(json.dumps(rows[-1]), flush=True)
    for spec in (args.compare if "greedy" in parts else ()):
        name, _, folder = spec.rpartition("=")
        other = load_conditioned(folder, target.get_input_embeddings().weight,
                                 target.get_output_embeddings().weight, target_config=target.config)
        for k in (2, 4, 8):
            r = simulated_acceptance(other, store, k, 1, start=start, anchors_per_seq=args.anchors_per_seq)
            rows.append({"drafter": name, **r})
            print(json.dumps(rows[-1]), flush=True)
    for k in ((2, 4, 8) if "greedy" in parts else ()):
        r = ngram_greedy(store, k, start, args.anchors_per_seq)
        rows.append({"drafter": "ngram (prompt lookup)", "num_draft_tokens": k, "num_steps": 0, **r})
        print(json.dumps(rows[-1]), flush=True)
    sedd_drafters = [("sedd (standalone)", str(SEDD_DRAFTER_DIR))] + [
        (f"sedd (standalone) {name}", folder) for name, _, folder in
        (spec.rpartition("=") for spec in args.sedd)]
    for name, folder in (sedd_drafters if "greedy" in parts else ()):
        sedd = SEDD.from_pretrained(Path(folder).expanduser()).eval()
        context = context_sensitivity(DiffusionDrafter(sedd, 4, 1, window=128), store, start)
        for k, steps in ((4, 1), (8, 2)):
            r = sequence_drafter_greedy(DiffusionDrafter(sedd, k, steps, window=128), store, k,
                                        start, args.anchors_per_seq)
            rows.append({"drafter": name, "num_draft_tokens": k, "num_steps": steps, **r,
                         **context})
            print(json.dumps(rows[-1]), flush=True)
    ar = AutoModelForCausalLM.from_pretrained(AR_DRAFTER_DIR, dtype=torch.float32).eval()
    for k in ((2, 4, 8) if "greedy" in parts else ()):
        r = sequence_drafter_greedy(AutoregressiveDrafter(ar, k, window=128), store, k, start,
                                    args.anchors_per_seq)
        rows.append({"drafter": "ar (draft_model)", "num_draft_tokens": k, "num_steps": k, **r})
        print(json.dumps(rows[-1]), flush=True)
    subset = store.select(torch.arange(min(args.t1_sequences, store.num_sequences)))
    t1 = previous.get("temperature_1", []) if "t1" not in parts else []
    configs = [tuple(int(v) for v in pair.split(":")) for pair in args.t1_configs.split(",")]
    for k, steps in (configs if "t1" in parts else ()):
        for policy in ("argmax", "sampled"):
            value = temperature_one_expectation(model, target, subset, k, steps, policy, start, 8)
            t1.append({"num_draft_tokens": k, "num_steps": steps, "policy": policy,
                       "expected_acceptance_length_t1": value})
            print(json.dumps(t1[-1]), flush=True)
    cost_rows = previous.get("costs", []) if "costs" not in parts else [
        costs(model, target, k, steps, batch) for batch in (1, 8) for k, steps in ((4, 1), (8, 2))]
    for c in cost_rows:
        greedy = next(r["acceptance_length"] for r in rows if r["drafter"] == "conditioned"
                      and r["num_draft_tokens"] == c["num_draft_tokens"]
                      and r["num_steps"] == c["num_steps"])
        if "costs" not in parts:
            continue
        c["projected_speedup_greedy"] = round(greedy * c["target_decode_ms"]
                                              / (c["drafter_ms"] + c["target_verify_ms"]), 3)
        print(json.dumps(c), flush=True)
    curve_path = work / "learning_curve.jsonl"
    curve = [json.loads(line) for line in curve_path.read_text().splitlines()] if curve_path.exists() else []
    payload = {"greedy": rows, "temperature_1": t1, "costs": cost_rows, "learning_curve": curve,
               "heldout_sequences": store.num_sequences}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{'drafter':<20} {'k':>3} {'T':>3} {'accept len':>10}  slot accept")
    for r in rows:
        context = (f"  context TV {r['context_tv']:.4f}, p(target greedy) "
                   f"{r['p_target_greedy']:.4f}" if "context_tv" in r else "")
        print(f"{r['drafter']:<20} {r['num_draft_tokens']:>3} {r['num_steps']:>3} "
              f"{r['acceptance_length']:>10.3f}  {r['slot_accept'][:4]}{context}")
    print("\ntemperature 1, conditioned drafter: expected acceptance length")
    for r in t1:
        print(f"  k={r['num_draft_tokens']} T={r['num_steps']} {r['policy']:<8} "
              f"{r['expected_acceptance_length_t1']:.3f}")
    print("\ncost per round (ms, HF float32 on this machine)")
    for c in cost_rows:
        print(f"  batch {c['batch']} k={c['num_draft_tokens']} T={c['num_steps']}: drafter "
              f"{c['drafter_ms']:.1f} (full 49k head {c['drafter_ms_full_vocabulary']:.1f}), target decode {c['target_decode_ms']:.1f}, verify "
              f"{c['target_verify_ms']:.1f} -> projected {c['projected_speedup_greedy']:.2f}x (greedy)")
    if rows:
        plot_acceptance_vs_k(rows, args.k_plot)
        print(f"wrote {args.k_plot}")
    if curve:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        curves = [("this work dir", curve)]
        for spec in args.curve:
            name, _, path = spec.rpartition("=")
            lines = Path(path).expanduser().read_text().splitlines()
            curves.append((name, [json.loads(line) for line in lines if line.strip()]))
        for name, points in curves:
            ax.plot([c["positions_seen"] / 1e6 for c in points],
                    [c["acceptance_length"] for c in points], marker="o", label=name)
        if len(curves) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel("predicted block positions seen in training (millions)")
        ax.set_ylabel("held-out simulated acceptance length (k=8, T=1)")
        ax.set_title("conditioned drafter, SmolLM2-135M, 2-core CPU")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
