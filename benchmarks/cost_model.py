"""Where does SpecDiff pay off? A real-shape cost model, measured on the machine at hand.

Random-weight models with the shapes of the paper's models (GPT-2 XL 1.5B and GPT-Neo 2.7B targets,
SEDD-small drafter, GPT-2 small as the autoregressive drafter of the baseline) are built on the meta
device and materialized with a cheap uniform init (weights do not change the cost), then timed:

    t_step          one target decode step (1 token) against a KV cache of context L
    t_verify(k)     one target forward of k + 1 tokens against the same cache (verification)
    t_draft(k,T,W)  one SpecDiff drafter round: num_steps = T SEDD forwards over a window of W tokens
                    (context + k masks), the output head only at the positions unmasked in that step,
                    sampling included (vllm_specdiff.drafter.DiffusionDrafter, the shipped code)
    t_ar_step       one decode step of the autoregressive drafter (k of them per round)

and combined with an acceptance rate a (Leviathan et al. 2023, i.i.d. per-token acceptance):

    E[tokens per round] = (1 - a^(k+1)) / (1 - a)
    speedup(specdiff)   = E * t_step / (t_draft(k, T, W) + t_verify(k))
    speedup(AR drafter) = E * t_step / (k * t_ar_step + t_verify(k))

Acceptance rates: a grid (--alpha), the paper's (0.89-0.92 for SEDD-small, 0.76-0.81 for the GPT-2
drafter), and measured ones: --from-results reads bench_offline JSON lines and estimates a per
(k, T) from the acceptance histograms. The model cannot know how a depends on T: a must be measured
at the (k, T) it is used with. "Break-even a" is the smallest a at which the speedup exceeds 1.

    python benchmarks/cost_model.py --quick     # few minutes on CPU; depth extrapolated (see output)
    python benchmarks/cost_model.py             # full depth, paper-like grid

Timings are medians over --iters runs after warm-up. The targets are plain GPT-2-style decoders
(pre-LN, learned positions, tied LM head; GPT-Neo's local-attention layers are modelled as global,
which overestimates its cost at L > 256). With --scale-from-layers N, each model is timed at depth 1
and N and its cost extrapolated linearly to the full depth (stated in the output and the JSON).
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plots import format_table, plot_lines, read_jsonl, write_jsonl  # noqa: E402

from vllm_specdiff.drafter import DiffusionDrafter  # noqa: E402
from vllm_specdiff.model import SEDD, SEDDConfig  # noqa: E402

PAPER_ALPHA_SPECDIFF = (0.89, 0.91, 0.92)  # Table 2, SEDD-small drafter
PAPER_ALPHA_AR = (0.76, 0.81)  # Table 2, GPT-2 drafter


@dataclass(frozen=True)
class DecoderShape:
    """A GPT-2-style decoder-only transformer (the cost-relevant dimensions only)."""

    name: str
    hidden: int
    layers: int
    heads: int
    vocab: int = 50257
    max_positions: int = 2048

    @property
    def params(self) -> int:
        per_layer = 12 * self.hidden ** 2 + 13 * self.hidden
        return self.layers * per_layer + (self.vocab + self.max_positions) * self.hidden


TARGETS = {
    "gpt2-xl": DecoderShape("gpt2-xl", hidden=1600, layers=48, heads=25),
    "gpt-neo-2.7b": DecoderShape("gpt-neo-2.7b", hidden=2560, layers=32, heads=20),
}
AR_DRAFTER = DecoderShape("gpt2", hidden=768, layers=12, heads=12)
SEDD_SMALL = SEDDConfig(tokens=50257, hidden_size=768, cond_dim=128, length=1024, n_blocks=12,
                        n_heads=12)


# ---------------------------------------------------------------------------------------------
# The formulas (pure functions: tested without timing anything)

def expected_tokens_per_round(alpha: float, num_draft_tokens: int) -> float:
    """E[tokens per round] = (1 - a^(k+1)) / (1 - a): accepted drafts plus the one target token
    (Leviathan et al. 2023, eq. 1); k + 1 at a = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return num_draft_tokens + 1.0
    return (1.0 - alpha ** (num_draft_tokens + 1)) / (1.0 - alpha)


def predicted_speedup(alpha: float, num_draft_tokens: int, t_target_step: float,
                      t_draft_round: float, t_verify: float) -> float:
    """E[tokens per round] * t_target_step / (t_draft_round + t_verify)."""
    return (expected_tokens_per_round(alpha, num_draft_tokens) * t_target_step
            / (t_draft_round + t_verify))


def break_even_alpha(num_draft_tokens: int, t_target_step: float, t_draft_round: float,
                     t_verify: float) -> float | None:
    """Smallest a with predicted speedup >= 1 (bisection; speedup grows with a), or None if even
    a = 1 loses."""
    def gain(a):
        return predicted_speedup(a, num_draft_tokens, t_target_step, t_draft_round, t_verify)

    if gain(1.0) < 1.0:
        return None
    if gain(0.0) >= 1.0:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if gain(mid) < 1.0 else (low, mid)
    return high


def alpha_from_histogram(histogram: Sequence[int]) -> float | None:
    """Per-token acceptance a from rounds counted by accepted drafts [k + 1] (bin j: j accepted).

    Maximum likelihood under i.i.d. acceptance with the round cut at k drafts: every accepted draft
    is a success, every round that stopped before k is one failure, so a = A / (A + R) with
    A = sum_j j * h[j] and R = sum_{j < k} h[j]. None without rounds.
    """
    k = len(histogram) - 1
    accepted = sum(j * count for j, count in enumerate(histogram))
    rejections = sum(histogram[:k])
    if accepted + rejections == 0:
        return None
    return accepted / (accepted + rejections)


def alpha_from_acceptance_length(mean_acceptance_length: float, num_draft_tokens: int) -> float:
    """The a whose E[tokens per round] equals a measured mean acceptance length (bisection)."""
    k = num_draft_tokens
    if not 1.0 <= mean_acceptance_length <= k + 1:
        raise ValueError(f"mean acceptance length {mean_acceptance_length} outside [1, k + 1 = {k + 1}]")
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if expected_tokens_per_round(mid, k) < mean_acceptance_length \
            else (low, mid)
    return (low + high) / 2


def measured_alphas(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """(k, T, a) per specdiff / draft_model configuration of bench_offline JSON lines, pooling the
    histograms over batch sizes (acceptance does not depend on the batch) per temperature."""
    pooled: dict[tuple, list[int]] = {}
    for r in rows:
        hist = r.get("acceptance_histogram")
        if r.get("method") not in ("specdiff", "draft_model") or not hist:
            continue
        key = (r["method"], r["num_draft_tokens"], r.get("num_steps"), r.get("temperature"))
        acc = pooled.setdefault(key, [0] * len(hist))
        for j, count in enumerate(hist):
            acc[j] += count
    out = []
    for (method, k, steps, temperature), hist in sorted(pooled.items(), key=lambda item: str(item[0])):
        alpha = alpha_from_histogram(hist)
        if alpha is not None:
            out.append({"method": method, "num_draft_tokens": k, "num_steps": steps,
                        "temperature": temperature, "alpha": alpha,
                        "mean_acceptance_length": sum(j * c for j, c in enumerate(hist)) / sum(hist) + 1})
    return out


# ---------------------------------------------------------------------------------------------
# Random-weight models

class DecoderBlock(nn.Module):
    def __init__(self, shape: DecoderShape) -> None:
        super().__init__()
        hidden = shape.hidden
        self.heads = shape.heads
        self.ln_1 = nn.LayerNorm(hidden)
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)
        self.ln_2 = nn.LayerNorm(hidden)
        self.c_fc = nn.Linear(hidden, 4 * hidden)
        self.mlp_proj = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, position: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x: [batch, new, hidden]; cache_k/v: [batch, heads, max_len, head_dim], filled up to
        `position`; the new tokens are written at [position, position + new)."""
        batch, new, hidden = x.shape
        qkv = self.c_attn(self.ln_1(x)).view(batch, new, 3, self.heads, hidden // self.heads)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [batch, heads, new, head_dim]
        cache_k[:, :, position:position + new] = k
        cache_v[:, :, position:position + new] = v
        keys, values = cache_k[:, :, :position + new], cache_v[:, :, :position + new]
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.c_proj(attn.transpose(1, 2).reshape(batch, new, hidden))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Decoder(nn.Module):
    """GPT-2-style decoder with an explicit KV cache; `layers` may be fewer than shape.layers."""

    def __init__(self, shape: DecoderShape, layers: int | None = None) -> None:
        super().__init__()
        self.shape = shape
        self.wte = nn.Embedding(shape.vocab, shape.hidden)
        self.wpe = nn.Embedding(shape.max_positions, shape.hidden)
        self.blocks = nn.ModuleList(DecoderBlock(shape) for _ in range(layers or shape.layers))
        self.ln_f = nn.LayerNorm(shape.hidden)

    def new_cache(self, batch: int, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        head_dim = self.shape.hidden // self.shape.heads
        weight = self.wte.weight
        return [(torch.randn(batch, self.shape.heads, max_len, head_dim, device=weight.device,
                             dtype=weight.dtype) * 0.1,
                 torch.randn(batch, self.shape.heads, max_len, head_dim, device=weight.device,
                             dtype=weight.dtype) * 0.1) for _ in self.blocks]

    def forward(self, tokens: torch.Tensor, position: int,
                cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """tokens: [batch, new] at positions [position, position + new) -> logits [batch, new, vocab]."""
        new = tokens.shape[1]
        positions = torch.arange(position, position + new, device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)[None]
        mask = None
        if new > 1:  # new token i sees the context and new tokens <= i
            keys = torch.arange(position + new, device=tokens.device)
            mask = keys[None, :] <= positions[:, None]  # [new, position + new]
        for block, (cache_k, cache_v) in zip(self.blocks, cache):
            x = block(x, cache_k, cache_v, position, mask)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied LM head, as GPT-2


def materialize(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A meta-device module -> real storage with a cheap random init (uniform, std 0.02; norms at
    1/0). Values only need to be finite and realistic in scale: the cost does not depend on them."""
    module = module.to(dtype=dtype).to_empty(device=device)
    bound = 0.02 * math.sqrt(3.0)
    with torch.no_grad():
        norm_params: set[int] = set()
        for sub in module.modules():
            if type(sub).__name__ == "LayerNorm":  # nn.LayerNorm and SEDD's weight-only one
                for name, param in sub.named_parameters(recurse=False):
                    param.fill_(1.0 if name == "weight" else 0.0)
                    norm_params.add(id(param))
        for name, param in module.named_parameters():
            if id(param) in norm_params:
                continue
            if name.endswith("bias"):
                param.zero_()
            else:
                param.uniform_(-bound, bound)
        for name, buffer in module.named_buffers():
            if name.endswith("inv_freq"):  # SEDD rotary frequencies
                head_dim = 2 * buffer.shape[0]
                buffer.copy_(1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float()
                                              / head_dim)))
            else:
                buffer.zero_()
    return module.eval()


def build_decoder(shape: DecoderShape, layers: int, device: torch.device,
                  dtype: torch.dtype) -> Decoder:
    with torch.device("meta"):
        model = Decoder(shape, layers)
    return materialize(model, device, dtype)


def build_sedd(config: SEDDConfig, blocks: int, device: torch.device, dtype: torch.dtype) -> SEDD:
    with torch.device("meta"):
        model = SEDD(replace(config, n_blocks=blocks))
    return materialize(model, device, dtype)


# ---------------------------------------------------------------------------------------------
# Timing

def time_call(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn() in seconds (CUDA-synchronised on GPU)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def depths_to_time(full: int, scale_from_layers: int) -> list[int]:
    """[full] for exact timing, or [1, N] for a linear extrapolation from depths 1 and N."""
    if scale_from_layers <= 0 or scale_from_layers >= full:
        return [full]
    return [1, max(2, scale_from_layers)]


def extrapolate(times: dict[int, float], full: int) -> float:
    """Cost at depth `full` from costs at two depths (fixed part + per-layer part), or the exact
    timing when the full depth was timed. The per-layer part is clamped at 0 against noise."""
    if full in times:
        return times[full]
    (d1, t1), (d2, t2) = sorted(times.items())
    per_layer = max(0.0, (t2 - t1) / (d2 - d1))
    return t1 + per_layer * (full - d1)


def time_decoder(shape: DecoderShape, context: int, verify_tokens: Sequence[int], batch: int,
                 device: torch.device, dtype: torch.dtype, scale_from_layers: int, warmup: int,
                 iters: int, log: Callable[[str], None]) -> dict[str, Any]:
    """t_step and t_verify(n) for n in verify_tokens (seconds), full-depth (maybe extrapolated)."""
    per_depth: dict[int, dict[str, float]] = {}
    for depth in depths_to_time(shape.layers, scale_from_layers):
        model = build_decoder(shape, depth, device, dtype)
        cache = model.new_cache(batch, context + max(verify_tokens, default=1) + 1)
        generator = torch.Generator(device=device).manual_seed(0)

        def forward(new: int, model: Decoder = model, cache: list = cache) -> Callable[[], object]:
            tokens = torch.randint(0, shape.vocab, (batch, new), device=device, generator=generator)
            return lambda: model(tokens, context, cache)

        timings = {"step": time_call(forward(1), device, warmup, iters)}
        for n in verify_tokens:
            timings[f"verify{n}"] = time_call(forward(n), device, warmup, iters)
        per_depth[depth] = timings
        log(f"  {shape.name} depth {depth}/{shape.layers}: step {1e3 * timings['step']:.1f} ms")
        del model, cache
    keys = per_depth[next(iter(per_depth))].keys()
    full = {key: extrapolate({d: t[key] for d, t in per_depth.items()}, shape.layers) for key in keys}
    return {"t_step": full["step"], "t_verify": {n: full[f"verify{n}"] for n in verify_tokens},
            "depths_timed": sorted(per_depth)}


def time_sedd_rounds(config: SEDDConfig, rounds: Sequence[tuple[int, int, int]], batch: int,
                     device: torch.device, dtype: torch.dtype, scale_from_layers: int, warmup: int,
                     iters: int, log: Callable[[str], None]) -> dict[tuple[int, int, int], float]:
    """t_draft(k, T, W) in seconds for each (k, T, W): one DiffusionDrafter.draft call."""
    per_depth: dict[int, dict[tuple[int, int, int], float]] = {}
    for depth in depths_to_time(config.n_blocks, scale_from_layers):
        model = build_sedd(config, depth, device, dtype)
        generator = torch.Generator(device=device).manual_seed(0)
        per_depth[depth] = {}
        for k, steps, window in rounds:
            drafter = DiffusionDrafter(model, k, steps, window=window)
            contexts = torch.randint(0, config.tokens, (batch, window - k)).tolist()
            per_depth[depth][(k, steps, window)] = time_call(
                lambda: drafter.draft(contexts, temperature=1.0, generator=generator),
                device, warmup, iters)
        log(f"  sedd depth {depth}/{config.n_blocks}: {len(rounds)} (k, T, W) rounds timed")
        del model
    return {key: extrapolate({d: t[key] for d, t in per_depth.items()}, config.n_blocks)
            for key in rounds}


# ---------------------------------------------------------------------------------------------
# Report

def prediction_rows(targets: dict[str, dict[str, Any]], drafts: dict[tuple[int, int, int], float],
                    t_ar_step: float | None, alphas: Sequence[float], ar_alphas: Sequence[float],
                    ar_ks: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One row per (target, drafter configuration, alpha). The AR drafter is evaluated at ar_ks
    (default: the specdiff draft lengths); every k + 1 must be in the target's t_verify."""
    rows = []
    for name, target in targets.items():
        t_step = target["t_step"]
        for (k, steps, window), t_draft in sorted(drafts.items()):
            t_verify = target["t_verify"][k + 1]
            for alpha in alphas:
                rows.append({"record": "prediction", "target": name, "drafter": "sedd-small",
                             "num_draft_tokens": k, "num_steps": steps, "window": window,
                             "alpha": alpha, "t_target_step": t_step, "t_draft_round": t_draft,
                             "t_verify": t_verify,
                             "expected_tokens_per_round": expected_tokens_per_round(alpha, k),
                             "speedup": predicted_speedup(alpha, k, t_step, t_draft, t_verify),
                             "break_even_alpha": break_even_alpha(k, t_step, t_draft, t_verify)})
        if t_ar_step is None:
            continue
        for k in sorted(ar_ks if ar_ks is not None else {k for k, _, _ in drafts}):
            t_verify, t_draft = target["t_verify"][k + 1], k * t_ar_step
            for alpha in ar_alphas:
                rows.append({"record": "prediction", "target": name, "drafter": "gpt2 (AR)",
                             "num_draft_tokens": k, "num_steps": None, "window": None,
                             "alpha": alpha, "t_target_step": t_step, "t_draft_round": t_draft,
                             "t_verify": t_verify,
                             "expected_tokens_per_round": expected_tokens_per_round(alpha, k),
                             "speedup": predicted_speedup(alpha, k, t_step, t_draft, t_verify),
                             "break_even_alpha": break_even_alpha(k, t_step, t_draft, t_verify)})
    return rows


def summary_rows(predictions: Sequence[dict[str, Any]], shown_alphas: Sequence[float]) -> list[dict]:
    """One row per (target, drafter, k, T, W), with the speedup at each shown alpha."""
    rows: dict[tuple, dict[str, Any]] = {}
    for p in predictions:
        key = (p["target"], p["drafter"], p["num_draft_tokens"], p["num_steps"] or 0, p["window"] or 0)
        row = rows.setdefault(key, {k: p[k] for k in ("target", "drafter", "num_draft_tokens",
                                                      "num_steps", "window", "break_even_alpha")}
                              | {"draft_over_step": p["t_draft_round"] / p["t_target_step"],
                                 "verify_over_step": p["t_verify"] / p["t_target_step"]})
        if any(abs(p["alpha"] - a) < 1e-12 for a in shown_alphas):
            row[f"a={p['alpha']:g}"] = p["speedup"]
    return [rows[key] for key in sorted(rows)]


def summary_columns(shown_alphas: Sequence[float]):
    columns = [("target", lambda r: r["target"], ""), ("drafter", lambda r: r["drafter"], ""),
               ("k", lambda r: r["num_draft_tokens"], "d"), ("T", lambda r: r["num_steps"], ""),
               ("W", lambda r: r["window"], ""),
               ("draft/step", lambda r: r["draft_over_step"], ".2f"),
               ("verify/step", lambda r: r["verify_over_step"], ".2f"),
               ("break-even a", lambda r: r["break_even_alpha"], ".3f")]
    columns += [(f"x @ a={a:g}", lambda r, a=a: r.get(f"a={a:g}"), ".2f") for a in shown_alphas]
    return columns


def plot_steps_for(ks_steps: Sequence[tuple[int, int]], k: int, plot_steps: int) -> int | None:
    """The num_steps drawn for draft length k: the largest timed T <= plot_steps, else the smallest."""
    steps = sorted(t for kk, t in ks_steps if kk == k)
    if not steps:
        return None
    below = [t for t in steps if t <= plot_steps]
    return below[-1] if below else steps[0]


def plot_speedup_vs_k(predictions: Sequence[dict[str, Any]], path: Path, plot_steps: int,
                      ar_alpha: float | None) -> Path | None:
    """Predicted speedup vs k: one panel per target, one line per alpha (specdiff at the timed
    num_steps nearest to plot_steps from below, smallest window), and the AR drafter at ar_alpha."""
    panels: dict[str, dict[str, list]] = {}
    windows = sorted({p["window"] for p in predictions if p["window"]})
    ks_steps = {(p["num_draft_tokens"], p["num_steps"]) for p in predictions
                if p["drafter"] == "sedd-small"}
    styles: dict[str, dict[str, Any]] = {}
    for p in sorted(predictions, key=lambda p: -p["alpha"]):  # legend: highest a first
        panel = panels.setdefault(f"target {p['target']}", {})
        k = p["num_draft_tokens"]
        if p["drafter"] == "sedd-small":
            if p["window"] == windows[0] and p["num_steps"] == plot_steps_for(ks_steps, k, plot_steps):
                label = f"specdiff a={p['alpha']:.3g}"
                panel.setdefault(label, []).append((k, p["speedup"]))
                styles[label] = {"color": alpha_color(p["alpha"])}
        elif ar_alpha is not None and abs(p["alpha"] - ar_alpha) < 1e-12:
            label = f"AR drafter a={ar_alpha:g}"
            panel.setdefault(label, []).append((k, p["speedup"]))
            styles[label] = {"color": "black", "linestyle": "--"}
    return plot_lines(path, panels, "num_draft_tokens (k)", "predicted speedup",
                      f"predicted speedup (specdiff: largest timed T <= {plot_steps}, W = "
                      f"{windows[0] if windows else '-'})", logx=True, hline=1.0, styles=styles)


def alpha_color(alpha: float) -> tuple[float, float, float, float]:
    """One colour per acceptance rate on a fixed scale (viridis over [0, 1]), so lines never share
    a colour and the same a has the same colour in every panel and run."""
    from matplotlib import colormaps

    return colormaps["viridis"](min(max(alpha, 0.0), 1.0))


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="few minutes on CPU: L=128, W=128, k {5,20,40}, T {2,8}, cost "
                             "extrapolated from depths 1 and 4")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {list(TARGETS)}")
    parser.add_argument("--context", type=int, help="target KV context L, default 512 (quick: 128)")
    parser.add_argument("--num-draft-tokens", help="k list, default 5,10,20,40 (quick: 5,20,40)")
    parser.add_argument("--num-steps", help="T list, default 1,2,4,8,16 (quick: 2,8)")
    parser.add_argument("--windows", help="SEDD window W list (context + k), default 256 "
                                          "(quick: 128); the paper's SEDD-small has length 1024")
    parser.add_argument("--alpha", default="0.5,0.6,0.7,0.8,0.85,0.9,0.95",
                        help="acceptance-rate grid; the paper's values and --from-results are added")
    parser.add_argument("--ar-alpha", default=",".join(map(str, PAPER_ALPHA_AR)),
                        help="acceptance rates for the AR-drafter (GPT-2) baseline")
    parser.add_argument("--from-results", type=Path, action="append", default=[],
                        help="bench_offline JSON lines: adds each measured (k, T) and its a")
    parser.add_argument("--no-ar", action="store_true", help="skip the GPT-2 AR-drafter baseline")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--scale-from-layers", type=int,
                        help="time depths 1 and N and extrapolate (0 = full depth); default 0 "
                             "(quick: 4)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, help="default 1")
    parser.add_argument("--iters", type=int, help="default 5 (quick: 3)")
    parser.add_argument("--plot-steps", type=int, default=4, help="specdiff T drawn in the plot")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", help="file name stem cost_model[-TAG] (default: quick for --quick)")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quick = args.quick
    for name, full_value, quick_value in (
            ("context", 512, 128), ("num_draft_tokens", "5,10,20,40", "5,20,40"),
            ("num_steps", "1,2,4,8,16", "2,8"), ("windows", "256", "128"),
            ("scale_from_layers", 0, 4), ("warmup", 1, 1), ("iters", 5, 3),
            ("tag", None, "quick")):
        if getattr(args, name) is None:
            setattr(args, name, quick_value if quick else full_value)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda"
                                                          else "float32")
    dtype = getattr(torch, dtype_name)
    device_label = (torch.cuda.get_device_name(device) if device.type == "cuda"
                    else f"CPU {platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} threads")

    # The (k, T) grid plus every measured (k, T) from --from-results.
    measured = [m for path in args.from_results for m in measured_alphas(read_jsonl(path))]
    measured_sd = [m for m in measured if m["method"] == "specdiff"]
    measured_ar = [m for m in measured if m["method"] == "draft_model"]
    ks = sorted(set(parse_ints(args.num_draft_tokens)) | {m["num_draft_tokens"] for m in measured_sd})
    pairs = {(k, t) for k in ks for t in parse_ints(args.num_steps) if t <= k}
    pairs |= {(m["num_draft_tokens"], m["num_steps"]) for m in measured_sd}
    rounds = sorted((k, t, w) for k, t in pairs for w in parse_ints(args.windows) if k < w)
    ar_ks = sorted({k for k, _, _ in rounds} | {m["num_draft_tokens"] for m in measured_ar})
    verify = sorted({k + 1 for k, _, _ in rounds} | ({k + 1 for k in ar_ks} if not args.no_ar
                                                      else set()))
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown targets {unknown}: choose from {list(TARGETS)}")
    depth_note = ("full depth" if args.scale_from_layers <= 0 else
                  f"cost extrapolated linearly from depths 1 and {args.scale_from_layers} "
                  "to the full depth")

    def log(message: str) -> None:
        print(message, flush=True)

    log(f"device {device_label} | {dtype_name} | batch {args.batch} | target context L = "
        f"{args.context} | {depth_note} | medians of {args.iters} runs")
    started = time.perf_counter()
    targets = {}
    for name in names:
        shape = TARGETS[name]
        if args.scale_from_layers <= 0:
            log(f"{name}: ~{shape.params / 1e9:.2f}B parameters "
                f"({shape.params * torch.finfo(dtype).bits / 8 / 2**30:.1f} GiB)")
        targets[name] = time_decoder(shape, args.context, verify, args.batch, device, dtype,
                                     args.scale_from_layers, args.warmup, args.iters, log)
    t_ar_step = None
    if not args.no_ar:
        t_ar_step = time_decoder(AR_DRAFTER, args.context, [], args.batch, device, dtype,
                                 args.scale_from_layers, args.warmup, args.iters, log)["t_step"]
    drafts = time_sedd_rounds(SEDD_SMALL, rounds, args.batch, device, dtype, args.scale_from_layers,
                              args.warmup, args.iters, log)

    measured_sd_alphas = {round(m["alpha"], 4) for m in measured_sd}
    alphas = sorted(set(parse_floats(args.alpha)) | set(PAPER_ALPHA_SPECDIFF) | measured_sd_alphas)
    ar_alphas = sorted(set(parse_floats(args.ar_alpha)) | {round(m["alpha"], 4) for m in measured_ar})
    predictions = prediction_rows(targets, drafts, t_ar_step, alphas, ar_alphas, ar_ks)
    common = {"device": device_label, "dtype": dtype_name, "batch": args.batch,
              "context": args.context, "depth": depth_note}
    timing_rows = [{"record": "target_timing", "target": name, "t_step": t["t_step"],
                    "t_verify": {str(n): v for n, v in t["t_verify"].items()},
                    "depths_timed": t["depths_timed"], **common} for name, t in targets.items()]
    timing_rows += [{"record": "draft_timing", "drafter": "sedd-small", "num_draft_tokens": k,
                     "num_steps": t, "window": w, "t_draft_round": s, **common}
                    for (k, t, w), s in sorted(drafts.items())]
    if t_ar_step is not None:
        timing_rows.append({"record": "draft_timing", "drafter": "gpt2 (AR)", "t_ar_step": t_ar_step,
                            **common})

    print("\nTarget cost (ms):")
    print(format_table([{"target": n, "step": 1e3 * t["t_step"],
                         **{f"verify {v}": 1e3 * t["t_verify"][v] for v in verify}}
                        for n, t in targets.items()],
                       [("target", lambda r: r["target"], ""), ("step", lambda r: r["step"], ".1f")]
                       + [(f"verify k+1={v}", lambda r, v=v: r[f"verify {v}"], ".1f") for v in verify]))
    if t_ar_step is not None:
        print(f"GPT-2 (AR drafter) decode step: {1e3 * t_ar_step:.1f} ms")
    shown = sorted(set(PAPER_ALPHA_SPECDIFF) | measured_sd_alphas
                   | (set(ar_alphas) if t_ar_step is not None else set()))
    print("\nPredicted speedup over plain decoding (x), and the acceptance rate a needed to break even:")
    print(format_table(summary_rows(predictions, shown), summary_columns(shown)))
    if measured:
        print("\nMeasured acceptance (bench_offline), and what it predicts for the large targets:")
        rows = []
        for m in measured:
            drafter = "sedd-small" if m["method"] == "specdiff" else "gpt2 (AR)"
            for p in predictions:
                if (p["drafter"] == drafter and p["num_draft_tokens"] == m["num_draft_tokens"]
                        and p["num_steps"] == (m["num_steps"] if drafter == "sedd-small" else None)
                        and abs(p["alpha"] - round(m["alpha"], 4)) < 1e-12):
                    rows.append({**m, "target": p["target"], "window": p["window"],
                                 "speedup": p["speedup"]})
        print(format_table(rows, [("target", lambda r: r["target"], ""),
                                  ("method", lambda r: r["method"], ""),
                                  ("k", lambda r: r["num_draft_tokens"], "d"),
                                  ("T", lambda r: r["num_steps"], ""),
                                  ("temp", lambda r: r["temperature"], "g"),
                                  ("accept len", lambda r: r["mean_acceptance_length"], ".2f"),
                                  ("a", lambda r: r["alpha"], ".3f"), ("W", lambda r: r["window"], ""),
                                  ("predicted x", lambda r: r["speedup"], ".2f")]))
        timing_rows += [{"record": "measured_alpha", **m} for m in measured]
    print(f"\n{device_label}, {dtype_name}, {depth_note}. The paper's a column (0.89-0.92) is read "
          "as the per-token acceptance rate of Leviathan et al.; measure a at the (k, T) you use.")
    stem = "cost_model" + (f"-{args.tag}" if args.tag else "")
    path = write_jsonl(args.out / f"{stem}.jsonl",
                       timing_rows + [{**p, **common} for p in predictions])
    print(f"wrote {path}")
    if not args.no_plots:
        plot = plot_speedup_vs_k(predictions, args.out / f"{stem}-speedup_vs_k.png", args.plot_steps,
                                 max(ar_alphas) if ar_alphas and t_ar_step is not None else None)
        if plot:
            print(f"wrote {plot}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
