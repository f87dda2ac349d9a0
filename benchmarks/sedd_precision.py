"""How far reduced-precision SEDD drafting is from float32: total variation of the draft rows q.

The reference SEDD code (louaaron/Score-Entropy-Discrete-Diffusion) keeps float32 weights and runs the
transformer blocks and the output layer under bf16 autocast on GPU, with the sigma embedding, the
timestep MLP, LayerNorm and the rotary angles in float32 (on CPU its autocast is a no-op: float32).
Three precisions of the same checkpoint, on held-out text windows at the drafting state (context,
then num_draft_tokens masks):

    float32            float32 weights and arithmetic: the reference's math
    autocast-bfloat16  float32 weights under bf16 autocast (DiffusionDrafter(autocast_dtype=bf16)):
                       the reference's GPU recipe
    bfloat16           the whole model cast to bf16 (SEDD.from_pretrained(dtype=bf16)): what
                       drafter_dtype "auto" gives with a bf16 target on GPU
    autocast-bfloat16-fp32-head   diagnostic, not a product mode: the blocks under bf16 autocast,
                       the output layer (the vocabulary logits) in float32

For each pair of modes and time t: the TV between their q = softmax(logits) at every draft position
(mean, 90th percentile, max) and the mean |difference| of the analytic step's P(unmask).
bf16 runs on CPU through autocast / emulation: the numbers hold for any device, the speed does not.

    .venv/bin/python benchmarks/sedd_precision.py            # the committed sedd-smollm2 drafter
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plots import format_table, write_jsonl  # noqa: E402

from vllm_specdiff.assets import AR_DRAFTER_DIR, SEDD_DRAFTER_DIR  # noqa: E402
from vllm_specdiff.diffusion import time_grid, total_noise, unmask_probability  # noqa: E402
from vllm_specdiff.drafter import DiffusionDrafter  # noqa: E402
from vllm_specdiff.model import SEDD  # noqa: E402

# (mode, baseline) pairs compared: each reduced precision vs float32, and the all-bf16 cast vs the
# reference's recipe.
PAIRS = (("autocast-bfloat16", "float32"), ("bfloat16", "float32"), ("bfloat16", "autocast-bfloat16"),
         ("autocast-bfloat16-fp32-head", "float32"))


class Fp32HeadDrafter(DiffusionDrafter):
    """Diagnostic: the transformer body under bf16 autocast, the output layer in float32."""

    def _log_scores(self, indices, attention_mask, output_positions, t):
        sigma_bar = total_noise(t).to(torch.float32).expand(indices.shape[0])
        with torch.autocast(indices.device.type, dtype=torch.bfloat16):
            hidden, cond = self.model.trunk(indices, sigma_bar, attention_mask)
        hidden = torch.gather(hidden.float(), 1, output_positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.model.head(hidden, cond.float(), sigma_bar, torch.gather(indices, 1, output_positions))


def heldout_contexts(tokenizer_dir: Path, num: int, length: int) -> torch.Tensor:
    """`num` held-out windows of `length` tokens (the benchmark prompts' split, never trained on)."""
    from transformers import AutoTokenizer

    from vllm_specdiff import data

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return data.fixed_windows(data.token_stream(tokenizer, "heldout"), length, num)


def draft_rows(drafter: DiffusionDrafter, contexts: torch.Tensor, t: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """q rows [batch, num_draft, tokens] (float64) and P(unmask) for the step t -> t / 2 at the
    drafting state: every context followed by num_draft_tokens masks."""
    batch, num_draft = contexts.shape[0], drafter.num_draft_tokens
    masks = torch.full((batch, num_draft), drafter.mask_token_id, dtype=torch.long)
    indices = torch.cat([contexts, masks], dim=1)
    positions = contexts.shape[1] + torch.arange(num_draft).expand(batch, -1)
    with torch.inference_mode():
        log_score = drafter._log_scores(indices, None, positions, t)
    p_unmask = unmask_probability(log_score, total_noise(t), total_noise(t / 2))
    return torch.softmax(log_score[..., :-1].double(), dim=-1), p_unmask.double()


def measure(checkpoint: Path, contexts: torch.Tensor, num_draft: int, times: list[float]) -> list[dict]:
    fp32 = SEDD.from_pretrained(checkpoint, dtype=torch.float32)
    drafters = {
        "float32": DiffusionDrafter(fp32, num_draft, 1),
        "autocast-bfloat16": DiffusionDrafter(fp32, num_draft, 1, autocast_dtype=torch.bfloat16),
        "bfloat16": DiffusionDrafter(SEDD.from_pretrained(checkpoint, dtype=torch.bfloat16), num_draft, 1),
        "autocast-bfloat16-fp32-head": Fp32HeadDrafter(fp32, num_draft, 1),
    }
    rows = []
    for t in times:
        t_tensor = torch.tensor(t, dtype=torch.float64)
        results = {}
        for mode, drafter in drafters.items():
            start = time.perf_counter()
            results[mode] = draft_rows(drafter, contexts, t_tensor)
            results[mode] += (time.perf_counter() - start,)
        for mode, baseline in PAIRS:
            q, p_unmask, seconds = results[mode]
            base_q, base_p, _ = results[baseline]
            tv = 0.5 * (q - base_q).abs().sum(-1).flatten()  # [batch * num_draft]
            rows.append({
                "checkpoint": checkpoint.name, "mode": mode, "vs": baseline, "t": t, "positions": tv.numel(),
                "num_draft_tokens": num_draft, "context_tokens": contexts.shape[1],
                "tv_mean": float(tv.mean()), "tv_p90": float(tv.quantile(0.9)), "tv_max": float(tv.max()),
                "p_unmask_abs_diff_mean": float((p_unmask - base_p).abs().mean()),
                "forward_s": seconds, "float32_forward_s": results["float32"][2],
                "device": "cpu", "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
            })
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=SEDD_DRAFTER_DIR)
    parser.add_argument("--tokenizer", type=Path, default=AR_DRAFTER_DIR,
                        help="folder with the checkpoint's tokenizer (for the held-out text)")
    parser.add_argument("--num-contexts", type=int, default=32)
    parser.add_argument("--num-draft-tokens", type=int, default=8)
    parser.add_argument("--times", type=float, nargs="+", default=[1.0, 0.5, float(time_grid(1)[-1])],
                        help="diffusion times t of the measured forwards (1 = first drafting step)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SEDD.from_pretrained(args.checkpoint).config
    window = heldout_contexts(args.tokenizer, args.num_contexts, config.length)
    contexts = window[:, : config.length - args.num_draft_tokens]
    rows = measure(args.checkpoint, contexts, args.num_draft_tokens, args.times)
    print(f"{args.checkpoint.name}: {contexts.shape[0]} held-out contexts of {contexts.shape[1]} tokens, "
          f"{args.num_draft_tokens} masked draft positions; TV of q per position")
    print(format_table(rows, [("mode", lambda r: r["mode"], ""), ("vs", lambda r: r["vs"], ""),
                              ("t", lambda r: r["t"], "g"),
                              ("TV mean", lambda r: r["tv_mean"], ".2e"),
                              ("TV p90", lambda r: r["tv_p90"], ".2e"),
                              ("TV max", lambda r: r["tv_max"], ".2e"),
                              ("|dP(unmask)|", lambda r: r["p_unmask_abs_diff_mean"], ".1e")]))
    path = write_jsonl(args.out / "sedd-precision-cpu.jsonl", rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
