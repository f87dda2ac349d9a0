"""Benchmark batched lossless verification: Triton kernels vs the PyTorch reference vs vLLM's
RejectionSampler vs the plugin's (SpecDiffRejectionSampler, the engine's verifier).

Each method is timed on the same inputs in the same process: one speculative verification of a
ragged batch (Leviathan et al. 2023, Algorithm 1), random numbers included (`draw_random` for ours;
vLLM's RejectionSampler draws its own and samples the bonus token with its Sampler).

    python benchmarks/bench_rejection.py                 # GPU: full grid, all methods available
    python benchmarks/bench_rejection.py --quick         # CPU: reference only, small grid
    python benchmarks/bench_rejection.py --vocab 49152 --num-draft-tokens 4 8 --batch 1 2 4 8 16 \
        --temperature 0            # CPU: reference vs vLLM's CPU sampler (what --specdiff-verifier picks)

Writes one JSON line per (configuration, method) to --out: device, dtype, batch, num_draft_tokens,
vocab, method, ms (median over --iters), plus draft_probs (full / one_hot) and the torch version.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from vllm_specdiff.verification import draw_random, rejection_sample_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_inputs(batch: int, num_draft_tokens: int, vocab: int, dtype: torch.dtype, one_hot: bool,
                device: torch.device, seed: int = 0,
                temperature: float = 1.0) -> dict[str, torch.Tensor | None]:
    """A batch where every request has num_draft_tokens drafts and one temperature (0 = greedy)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    num_tokens = batch * num_draft_tokens
    target_logits = torch.randn(num_tokens + batch, vocab, device=device, generator=generator) * 3
    row_of_token = torch.arange(num_tokens, device=device) + torch.arange(
        batch, device=device).repeat_interleave(num_draft_tokens)
    # A drafter that agrees with the target often enough for realistic accepted lengths.
    draft_logits = target_logits[row_of_token] + torch.randn(num_tokens, vocab, device=device,
                                                             generator=generator)
    draft_probs = draft_logits.softmax(-1)
    draft_token_ids = torch.multinomial(draft_probs, 1, generator=generator).squeeze(1)
    return dict(
        draft_token_ids=draft_token_ids,
        cu_num_draft_tokens=torch.arange(1, batch + 1, device=device) * num_draft_tokens,
        draft_probs=None if one_hot else draft_probs.to(dtype),
        target_logits=target_logits.to(dtype),
        temperature=torch.full((batch,), float(temperature), device=device),
        top_k=None,
        top_p=None,
    )


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA-synchronised on GPU)."""
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
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def ours(inputs: dict, num_draft_tokens: int, implementation: Callable) -> Callable[[], object]:
    cu = inputs["cu_num_draft_tokens"]
    cu_host = cu.cpu()  # sizes only: keeps draw_random free of device syncs
    vocab = inputs["target_logits"].shape[1]

    def run() -> object:
        uniform, exponential = draw_random(cu_host, vocab, None, cu.device)
        return implementation(**inputs, uniform_samples=uniform, exponential_samples=exponential,
                              max_draft_len=num_draft_tokens)

    return run


def vllm_method(inputs: dict, num_draft_tokens: int, plugin: bool = False) -> Callable[[], object]:
    """vLLM's RejectionSampler.forward on the same batch (metadata built like the GPU runner);
    plugin=True: the plugin's SpecDiffRejectionSampler (what a specdiff engine verifies with)."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    device = inputs["target_logits"].device
    batch = inputs["cu_num_draft_tokens"].shape[0]
    num_tokens = batch * num_draft_tokens
    rows = torch.arange(num_tokens + batch, device=device, dtype=torch.int32).view(batch, -1)
    metadata = SpecDecodeMetadata(
        draft_token_ids=inputs["draft_token_ids"].to(torch.int32),
        num_draft_tokens=[num_draft_tokens] * batch,
        cu_num_draft_tokens=inputs["cu_num_draft_tokens"].to(torch.int32),
        cu_num_sampled_tokens=(torch.arange(1, batch + 1, device=device)
                               * (num_draft_tokens + 1)).to(torch.int32),
        target_logits_indices=rows[:, :-1].reshape(-1).contiguous(),
        bonus_logits_indices=rows[:, -1].contiguous(),
        logits_indices=rows.reshape(-1),
    )
    empty = torch.empty(0, device=device)
    greedy = bool((inputs["temperature"] == 0).all())
    sampling_metadata = SamplingMetadata(
        temperature=None if greedy else inputs["temperature"], all_greedy=greedy,
        all_random=not greedy, top_p=None,
        top_k=None, generators={}, max_num_logprobs=None, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=empty, presence_penalties=empty,
        repetition_penalties=empty, output_token_ids=[[] for _ in range(batch)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
    )
    if plugin:
        from vllm_specdiff.vllm_plugin.sampler import specdiff_rejection_sampler_class

        sampler = specdiff_rejection_sampler_class()(Sampler(), device=device)
    else:
        sampler = RejectionSampler(Sampler(), device=device)
    draft_probs = None if inputs["draft_probs"] is None else inputs["draft_probs"].float()
    target_logits = inputs["target_logits"]

    def run() -> object:
        # vLLM may update logits in place: give it a fresh copy each call, as the runner does.
        return sampler(metadata, draft_probs, target_logits.clone(), sampling_metadata)

    return run


def prepare_vllm_cpu() -> str | None:
    """Set up vLLM's CPU sampler as an engine would (its C++ fallbacks for the Triton kernels, with
    the plugin's vllm#55005 fix); None when ready, else why it is skipped."""
    try:
        from vllm.platforms import current_platform

        from vllm_specdiff.vllm_plugin import patches
    except ImportError as error:
        return f"skipped (vLLM unavailable: {error})"
    if not current_platform.is_cpu():
        return "skipped (vLLM's platform here is not CPU and there is no CUDA GPU)"
    patches.install_cpu_expand_fix()
    current_platform.register_triton_kernel_overrides()
    return None


def available_methods(device: torch.device, only_reference: bool) -> dict[str, str | None]:
    """method -> None if runnable, else the reason it is skipped."""
    methods: dict[str, str | None] = {"reference": None}
    if only_reference:
        methods["triton"] = methods["vllm"] = methods["plugin"] = "skipped (--quick: reference only)"
        return methods
    if device.type != "cuda":
        methods["triton"] = "skipped (no CUDA GPU)"
        methods["vllm"] = methods["plugin"] = prepare_vllm_cpu()
        return methods
    try:
        import triton  # noqa: F401

        from vllm_specdiff.kernels.rejection import rejection_sample_triton  # noqa: F401
        methods["triton"] = None
    except ImportError as error:
        methods["triton"] = f"skipped (triton unavailable: {error})"
    try:
        import vllm.v1.sample.rejection_sampler  # noqa: F401
        methods["vllm"] = methods["plugin"] = None
    except ImportError as error:
        methods["vllm"] = methods["plugin"] = f"skipped (vLLM unavailable: {error})"
    return methods


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="CPU-sized run: reference only, batch {1, 8} x drafts {5, 20}")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="target logits and draft probs dtype")
    parser.add_argument("--one-hot", action="store_true", help="verify without draft probs")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="every request's temperature (0 = greedy verification)")
    parser.add_argument("--batch", type=int, nargs="+", default=None)
    parser.add_argument("--num-draft-tokens", type=int, nargs="+", default=None)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rejection.jsonl"))
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    batches = args.batch or ([1, 8] if args.quick else [1, 8, 64])
    draft_lengths = args.num_draft_tokens or ([5, 20] if args.quick else [5, 20, 40])
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    iters = args.iters if args.iters is not None else (3 if args.quick else 20)
    methods = available_methods(device, only_reference=args.quick)
    for method, reason in methods.items():
        if reason is not None:
            print(f"{method}: {reason}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = f"{'batch':>5} {'drafts':>6} {'vocab':>6}  " + "  ".join(
        f"{method + ' ms':>13}" for method, reason in methods.items() if reason is None)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    device_label = f"cuda ({device_name})" if device.type == "cuda" else "cpu"
    print(f"device={device} ({device_name}, torch threads {torch.get_num_threads()}) "
          f"dtype={args.dtype} draft_probs={'one_hot' if args.one_hot else 'full'} "
          f"temperature={args.temperature:g}")
    print(header)
    with args.out.open("a") as out:
        for batch in batches:
            for num_draft_tokens in draft_lengths:
                inputs = make_inputs(batch, num_draft_tokens, args.vocab, dtype, args.one_hot,
                                     device, temperature=args.temperature)
                timings = {}
                for method, reason in methods.items():
                    if reason is not None:
                        continue
                    if method == "reference":
                        fn = ours(inputs, num_draft_tokens, rejection_sample_reference)
                    elif method == "triton":
                        from vllm_specdiff.kernels.rejection import rejection_sample_triton

                        fn = ours(inputs, num_draft_tokens, rejection_sample_triton)
                    else:
                        fn = vllm_method(inputs, num_draft_tokens, plugin=method == "plugin")
                    timings[method] = time_ms(fn, device, warmup, iters)
                    out.write(json.dumps({
                        "device": device_label, "dtype": args.dtype, "batch": batch,
                        "num_draft_tokens": num_draft_tokens, "vocab": args.vocab,
                        "method": method, "ms": round(timings[method], 4),
                        "draft_probs": "one_hot" if args.one_hot else "full",
                        "temperature": args.temperature,
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    }) + "\n")
                print(f"{batch:>5} {num_draft_tokens:>6} {args.vocab:>6}  " + "  ".join(
                    f"{timings[method]:>13.3f}" for method in timings))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
