"""Every monkey-patch the plugin applies to vLLM, each checked against the installed version.

Process-wide (from `register()`, in every vLLM process):
  1. `EngineArgs.add_cli_args`: adds the specdiff flags and restores the old flag names
     (--speculative-model / --speculative-method / --num-speculative-tokens) as aliases of
     vLLM's --spec-model / --spec-method / --spec-tokens; lets --spec-method accept "specdiff".
  2. `EngineArgs.from_cli_args`: carries the --specdiff-* values into the speculative config.
  3. `EngineArgs.create_speculative_config`: translates method "specdiff" into vLLM's official
     out-of-tree hook (method "custom_class", model = our proposer class) with our options in
     `additional_config["specdiff"]`, after validating them against the drafter checkpoint and
     the target in the API process (so a bad configuration never reaches a worker).
  4. `vllm.utils.cpu_triton_utils._expand_kernel_impl` (CPU builds, vllm-project/vllm#55005): the
     C++ fallback of the rejection sampler's `expand_kernel` writes into an int64 COPY of its
     output, so per-token temperature/top-k/top-p are never written and non-greedy speculative
     decoding samples with garbage on CPU, for every method. Replaced by a torch implementation
     when the installed one is probed to be broken.
  5. `vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_only` (CPU top-k path): it reduces
     `k.max()` over the batch, which raises on an empty batch. vLLM builds spec-decode metadata on
     EVERY step of a speculative engine, also on steps where no request has drafts, and the
     rejection sampler then applies top-k to zero rows: one request with top_k kills the engine
     (vLLM's own ngram/draft_model methods too). Guarded (empty in, empty out) when the installed
     function is probed to fail on an empty batch. No vLLM report found; vllm-ascend fixed the
     same empty-batch crash in its copy of this code (vllm-project/vllm-ascend#7280).
Worker-only (installed by the proposer, i.e. only in engines that run specdiff):
  6. `GPUModelRunner.propose_draft_token_ids` (inherited by the CPU runner): hands our proposer the
     per-row sampling temperatures and generators before drafting, and afterwards stores its draft
     probabilities where the runner feeds them to the rejection sampler (`_draft_probs` /
     `_draft_prob_req_ids`; the runner fills them only for eagle/draft_model drafters).
  7. `runner.rejection_sampler` (an instance attribute, not a class patch): our verifier, unless
     `verifier = "vllm"`.
  8. `runner.rejection_sampler.forward` (instance attribute): a step in which no request has a
     draft (adaptive drafting chose 0 everywhere, prompts only) samples with the runner's plain
     sampler, as an engine without speculation does, instead of the rejection sampler's bonus
     sampler + empty rejection pass + recovered-token noise (measured at batch 1, temperature 1,
     on this CPU: median zero-draft step 70.6 ms before, 56.8 ms after). Same logits, same sampler, same [batch, 1] output.
Startup errors (API process): `sys.excepthook` prints a specdiff configuration error as one line
naming the problem and the fix (VLLM_SPECDIFF_TRACEBACK=1 keeps the traceback).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import inspect
import logging
import os
import sys
import time
from typing import Any, Callable

from .config import (ADDITIONAL_CONFIG_KEY, METHOD, PROPOSER_CLASS, SPECDIFF_ONLY_KEYS, SpecDiffConfig,
                     check_vocab, inspect_drafter, split_speculative_dict)

# Under "vllm." so that vLLM's logging configuration (handlers, level, format) applies.
logger = logging.getLogger("vllm.specdiff")

SUPPORTED_VLLM = ("0.32", "0.33")
FORCE_ENV = "VLLM_SPECDIFF_SKIP_VERSION_CHECK"
PATCH_MARK = "__specdiff_patch__"
EXPAND_KERNEL_NAME = "vllm.v1.sample.rejection_sampler.expand_kernel"
TOP_K_MODULE = "vllm.v1.sample.ops.topk_topp_sampler"
TRACEBACK_ENV = "VLLM_SPECDIFF_TRACEBACK"

# --specdiff-* flag -> (speculative-config key, type, choices)
CLI_OPTIONS: dict[str, tuple[str, type, tuple[str, ...] | None, str]] = {
    "--specdiff-steps": ("num_steps", int, None,
                         "Denoising steps per draft block, in [1, num_speculative_tokens] "
                         "(default: num_speculative_tokens)."),
    "--specdiff-window": ("window", int, None,
                          "Drafter window: context tail + draft block (default: the drafter's "
                          "trained length)."),
    "--specdiff-order": ("order", str, ("left_to_right", "random"),
                         "Unmasking order: left_to_right (exact with full q) or random "
                         "(reference SEDD sampler)."),
    "--specdiff-draft-temperature": ("draft_temperature", float, None,
                                     "Temperature of sampled drafts (default: the request's own). "
                                     "Greedy requests always get argmax drafts."),
    "--specdiff-verifier": ("verifier", str, ("auto", "specdiff", "vllm"),
                            "Rejection sampler: specdiff (ours), vllm (vLLM's own), or auto "
                            "(default: the faster one measured on the device)."),
    "--specdiff-draft-probs": ("draft_probs", str, ("auto", "full", "one_hot"),
                               "Verify with the recorded draft distribution (full) or one-hot; "
                               "auto = exact choice for the order."),
    "--specdiff-drafter-dtype": ("drafter_dtype", str, ("auto", "float32", "bfloat16", "float16",
                                                        "autocast_bfloat16"),
                                 "Drafter weights' dtype (default auto: float32 on CPU, the "
                                 "target's dtype elsewhere); autocast_bfloat16 = the reference SEDD "
                                 "GPU recipe (float32 weights, bf16 compute)."),
    "--specdiff-draft-policy": ("draft_policy", str, ("auto", "sampled", "argmax"),
                                "Conditioned drafters at temperature > 0: sampled drafts with full "
                                "q, or argmax drafts verified one-hot (auto: measured per steps, k)."),
    "--specdiff-lookup": ("lookup", lambda v: _parse_bool("--specdiff-lookup", v), None,
                          "true (default) / false: conditioned drafters reveal prompt-lookup "
                          "continuations in the block (exact: one-hot q)."),
    "--specdiff-adaptive": ("adaptive", lambda v: _parse_bool("--specdiff-adaptive", v), None,
                            "true (default) / false: draft per step and request only the tokens "
                            "that pay (acceptance x measured step cost, down to 0)."),
    "--specdiff-seed": ("seed", int, None, "Base seed of the drafter (default: the engine seed)."),
    "--specdiff-log-every": ("log_every", int, None,
                             "Log drafter time every N engine steps (0 = never; default 200)."),
}

def _parse_bool(flag: str, value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{flag} takes true or false, got {value!r}")


# name -> one-line description of each installed patch (for logs and tests).
INSTALLED: dict[str, str] = {}
# Why specdiff is unavailable on this vLLM (None while supported).
UNSUPPORTED_REASON: str | None = None
# The CPU expand function found broken and replaced (kept for tests and diagnostics).
ORIGINAL_EXPAND_IMPL: Callable | None = None


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM lacks what a patch relies on."""


class SpecDiffConfigError(ValueError):
    """A specdiff setting is invalid; the message names the setting and the fix (one line)."""


# ---------------------------------------------------------------------------------------------------
# Version checks
# ---------------------------------------------------------------------------------------------------
def vllm_version() -> str:
    from vllm import __version__

    return __version__


def check_vllm_version() -> None:
    """Raise UnsupportedVLLMError unless vLLM is one of SUPPORTED_VLLM (or the check is skipped)."""
    version = vllm_version()
    if os.environ.get(FORCE_ENV) == "1":
        return
    if ".".join(version.split("+")[0].split(".")[:2]) not in SUPPORTED_VLLM:
        raise UnsupportedVLLMError(
            f"vllm-specdiff supports vLLM {' and '.join(v + '.x' for v in SUPPORTED_VLLM)}; found "
            f"vLLM {version}. Install a supported vLLM (pip install 'vllm-specdiff[cuda]' or "
            f"'[cpu]'), or set {FORCE_ENV}=1 to try anyway")


def _require(owner: Any, attr: str, params: tuple[str, ...] = ()) -> Callable:
    """The attribute a patch wraps, with the parameters the patch relies on, or a clear error."""
    where = f"{getattr(owner, '__module__', '')}.{getattr(owner, '__qualname__', owner)}.{attr}"
    target = getattr(owner, attr, None)
    if target is None:
        raise UnsupportedVLLMError(f"vllm-specdiff cannot patch {where}: it does not exist in vLLM "
                                   f"{vllm_version()} (supported: {', '.join(SUPPORTED_VLLM)})")
    if params:
        found = tuple(inspect.signature(target).parameters)
        missing = [p for p in params if p not in found]
        if missing:
            raise UnsupportedVLLMError(
                f"vllm-specdiff cannot patch {where} in vLLM {vllm_version()}: it lacks the "
                f"parameter(s) {missing} (found {found}; supported: {', '.join(SUPPORTED_VLLM)})")
    return target


def _is_patched(func: Any) -> bool:
    return getattr(getattr(func, "__func__", func), PATCH_MARK, False)


def _mark(func: Callable) -> Callable:
    setattr(func, PATCH_MARK, True)
    return func


# ---------------------------------------------------------------------------------------------------
# Entry from register()
# ---------------------------------------------------------------------------------------------------
def install_process_patches() -> None:
    """Patches 1-5 and the startup-error hook. Never raises: an unsupported vLLM keeps working,
    only specdiff is refused.

    The EngineArgs patches wait for `vllm.engine.arg_utils` to be imported: vLLM's API process has
    imported it before it loads plugins, while importing it in every worker would cost seconds. The
    top-k guard likewise waits for vLLM's sampler module.
    """
    try:
        install_cpu_expand_fix()
    except Exception:  # the fix is best effort; never break vLLM from a plugin hook
        logger.exception("vllm-specdiff: could not install the CPU expand-kernel fix")
    when_imported(TOP_K_MODULE, install_empty_top_k_fix)
    when_imported("vllm.engine.arg_utils", install_engine_patches)
    install_startup_error_hook()


def install_engine_patches() -> None:
    """Patches 1-3, or on an unsupported vLLM the guard that refuses 'specdiff' with the reason."""
    global UNSUPPORTED_REASON
    try:
        check_vllm_version()
        patch_engine_args()
    except UnsupportedVLLMError as err:
        UNSUPPORTED_REASON = str(err)
        logger.error("%s. The 'specdiff' speculative method is unavailable; vLLM's own methods are "
                     "unaffected.", err)
        _install_guard()


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs `callback` right after `module_name` is first imported (then removes itself)."""

    def __init__(self, module_name: str, callback: Callable[[], None]) -> None:
        self.module_name = module_name
        self.callback = callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the regular finders
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_patch(module):
            exec_module(module)
            try:
                callback()
            except Exception:  # a plugin bug must not break `import vllm...`
                logger.exception("vllm-specdiff: patching %s failed", fullname)

        spec.loader.exec_module = exec_then_patch
        return spec


def when_imported(module_name: str, callback: Callable[[], None]) -> None:
    if module_name in sys.modules:
        callback()
    elif not any(isinstance(f, _PostImportHook) and f.module_name == module_name
                 for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook(module_name, callback))


def _install_guard() -> None:
    """On an unsupported vLLM: refuse method 'specdiff' with the version error, touch nothing else."""
    try:
        from vllm.engine.arg_utils import EngineArgs
    except Exception:
        return
    original = getattr(EngineArgs, "create_speculative_config", None)
    if original is None or _is_patched(original):
        return

    @functools.wraps(original)
    def create_speculative_config(self, *args, **kwargs):
        spec = getattr(self, "speculative_config", None) or {}
        if METHOD in (getattr(self, "spec_method", None), spec.get("method")):
            raise UnsupportedVLLMError(UNSUPPORTED_REASON)
        return original(self, *args, **kwargs)

    EngineArgs.create_speculative_config = _mark(create_speculative_config)
    INSTALLED["guard"] = "EngineArgs.create_speculative_config refuses 'specdiff' (unsupported vLLM)"


# ---------------------------------------------------------------------------------------------------
# 1-3: EngineArgs
# ---------------------------------------------------------------------------------------------------
def patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    add_cli_args = _require(EngineArgs, "add_cli_args", ("parser",))
    from_cli_args = _require(EngineArgs, "from_cli_args", ("args",))
    create_spec = _require(EngineArgs, "create_speculative_config",
                           ("self", "target_model_config", "target_parallel_config"))
    for field in ("speculative_config", "spec_method", "spec_model", "spec_tokens",
                  "additional_config"):
        if field not in EngineArgs.__dataclass_fields__:
            raise UnsupportedVLLMError(f"vllm-specdiff needs EngineArgs.{field}, which vLLM "
                                       f"{vllm_version()} lacks")

    if not _is_patched(add_cli_args):
        @functools.wraps(add_cli_args)
        def patched_add_cli_args(parser):
            parser = add_cli_args(parser)
            extend_parser(parser)
            return parser

        EngineArgs.add_cli_args = staticmethod(_mark(patched_add_cli_args))
        INSTALLED["add_cli_args"] = "EngineArgs.add_cli_args: specdiff flags + old flag names"

    if not _is_patched(from_cli_args):
        original_from_cli = from_cli_args.__func__

        @functools.wraps(original_from_cli)
        def patched_from_cli_args(cls, args):
            engine_args = original_from_cli(cls, args)
            with _config_errors():
                merge_cli_options(engine_args, args)
            return engine_args

        EngineArgs.from_cli_args = classmethod(_mark(patched_from_cli_args))
        INSTALLED["from_cli_args"] = "EngineArgs.from_cli_args: carries --specdiff-* values"

    if not _is_patched(create_spec):
        @functools.wraps(create_spec)
        def patched_create_speculative_config(self, target_model_config, target_parallel_config):
            with _config_errors():
                translate_engine_args(self, target_model_config)
            return create_spec(self, target_model_config, target_parallel_config)

        EngineArgs.create_speculative_config = _mark(patched_create_speculative_config)
        INSTALLED["create_speculative_config"] = ("EngineArgs.create_speculative_config: specdiff "
                                                  "-> custom_class + additional_config")


def extend_parser(parser) -> None:
    """Add the specdiff flag group (idempotent: a parser that has them is left alone)."""
    if "--specdiff-steps" in parser._option_string_actions:
        return
    for action in parser._actions:
        if action.dest == "spec_method" and action.choices is not None \
                and METHOD not in action.choices:
            action.choices = [*action.choices, METHOD]
    group = parser.add_argument_group(
        "SpecDiff", "Speculative Diffusion Decoding (vllm-specdiff plugin): --speculative-method "
        "specdiff --speculative-model SEDD_DRAFTER --num-speculative-tokens N [--specdiff-*]")
    aliases = (("--speculative-model", "spec_model", str,
                "SEDD drafter (local folder, hub id, sedd-small, sedd-medium). Alias of --spec-model."),
               ("--speculative-method", "spec_method", str,
                "Speculative method, e.g. specdiff. Alias of --spec-method."),
               ("--num-speculative-tokens", "spec_tokens", int,
                "Draft tokens per step. Alias of --spec-tokens."))
    for flag, dest, kind, help_text in aliases:
        if flag not in parser._option_string_actions:
            group.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
    for flag, (key, kind, choices, help_text) in CLI_OPTIONS.items():
        group.add_argument(flag, dest=f"specdiff_{key}", type=kind, choices=choices, default=None,
                           help=help_text)


def merge_cli_options(engine_args, args) -> None:
    """Move the --specdiff-* values from the argparse namespace into the speculative config."""
    values = {key: getattr(args, f"specdiff_{key}") for key, *_ in CLI_OPTIONS.values()
              if getattr(args, f"specdiff_{key}", None) is not None}
    if not values:
        return
    spec = dict(engine_args.speculative_config or {})
    for key, value in values.items():
        if key in spec and spec[key] != value:
            raise ValueError(f"--specdiff-{key.replace('_', '-')} and --speculative-config['{key}'] "
                             "are mutually exclusive")
        spec[key] = value
    engine_args.speculative_config = spec


def _speculative_config_fields() -> frozenset[str]:
    import dataclasses

    from vllm.config import SpeculativeConfig

    return frozenset(f.name for f in dataclasses.fields(SpeculativeConfig))


def translate_engine_args(engine_args, target_model_config) -> SpecDiffConfig | None:
    """Method 'specdiff' -> custom_class + additional_config['specdiff'], validated. Else no-op."""
    spec = dict(engine_args.speculative_config or {})
    spec = {str(k).replace("-", "_"): v for k, v in spec.items()}
    method = engine_args.spec_method or spec.get("method")
    if method != METHOD:
        stray = [k for k in SPECDIFF_ONLY_KEYS if k in spec]
        if stray:
            raise ValueError(f"specdiff: the option(s) {stray} (--specdiff-*) only apply to the "
                             f"specdiff method; add --speculative-method specdiff (method "
                             f"{method!r} was selected)")
        return None
    for flag, key, value in (("--spec-method", "method", engine_args.spec_method),
                             ("--spec-model", "model", engine_args.spec_model),
                             ("--spec-tokens", "num_speculative_tokens", engine_args.spec_tokens)):
        if value is None:
            continue
        if key in spec and spec[key] != value:
            raise ValueError(f"{flag} and --speculative-config['{key}'] are mutually exclusive")
        spec[key] = value
    passthrough_keys = _speculative_config_fields() - {"method", "model", "num_speculative_tokens"}
    options, passthrough = split_speculative_dict(spec, passthrough_keys)
    requested = options.drafter
    conditioned = inspect_conditioned_drafter(options, target_model_config)
    if conditioned is not None:
        options = conditioned
    else:
        folder, sedd_config = inspect_drafter(options.drafter)
        options = options.resolve(sedd_config.length, drafter=str(folder))
        check_vocab(folder, sedd_config.tokens, target_model_config.get_vocab_size(),
                    None if target_model_config.skip_tokenizer_init else target_model_config.tokenizer,
                    trust_remote_code=target_model_config.trust_remote_code, drafter_name=requested)
    options = choose_verifier(options, passthrough.get("rejection_sample_method") or "standard")
    if not options.is_exact:
        logger.warning("specdiff: order 'random' verified with the recorded draft probabilities is "
                       "APPROXIMATE (the output law differs slightly from the target's; "
                       "shared/docs/lossless.md). Use order left_to_right or draft_probs one_hot "
                       "for lossless decoding")
    engine_args.spec_method = engine_args.spec_model = engine_args.spec_tokens = None
    engine_args.speculative_config = {**passthrough, "method": "custom_class",
                                      "model": PROPOSER_CLASS,
                                      "num_speculative_tokens": options.num_draft_tokens}
    engine_args.additional_config = {**(engine_args.additional_config or {}),
                                     ADDITIONAL_CONFIG_KEY: options.to_dict()}
    logger.info("specdiff: drafter %s (%s), %d draft tokens, %d steps, window %s, order %s, "
                "draft probs %s, verifier %s", requested, options.drafter, options.num_draft_tokens,
                options.num_steps, options.window, options.order,
                "full" if options.use_full_draft_probs else "one-hot", options.verifier)
    return options


def inspect_conditioned_drafter(options: SpecDiffConfig, target_model_config) -> SpecDiffConfig | None:
    """Startup checks of a target-conditioned drafter (None when the drafter is a SEDD checkpoint):
    readable config, weights matching it, the target's vocabulary / hidden size / layers, the
    tokenizer fingerprint, and num_speculative_tokens within the trained block."""
    import dataclasses
    from pathlib import Path

    from ..models.conditioned_checkpoint import (ConditionedCheckpointError, check_target,
                                                 is_conditioned_checkpoint, read_conditioned_config,
                                                 tokenizer_fingerprint)

    folder = Path(options.drafter).expanduser()
    if not (folder.is_dir() and is_conditioned_checkpoint(folder)):
        return None
    try:
        config = read_conditioned_config(folder)
        _check_conditioned_weights(folder, config)
        fingerprint = None
        if not target_model_config.skip_tokenizer_init:
            from transformers import AutoTokenizer

            fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(
                target_model_config.tokenizer, trust_remote_code=target_model_config.trust_remote_code))
        check_target(config, target_model_config.hf_config, fingerprint, drafter_name=str(folder))
    except ConditionedCheckpointError as err:
        raise ValueError(f"specdiff: drafter checkpoint {options.drafter!r} (--speculative-model) is "
                         f"unusable: {err}") from err
    if options.num_draft_tokens > config.num_draft_tokens:
        raise ValueError(f"specdiff: num_speculative_tokens {options.num_draft_tokens} exceeds the "
                         f"{config.num_draft_tokens} draft positions the conditioned drafter "
                         f"{folder} was trained for: use at most {config.num_draft_tokens}")
    if options.window is not None or options.order != "left_to_right":
        raise ValueError("specdiff: window and order apply to standalone SEDD drafters only; the "
                         "conditioned drafter reads the whole context and drafts left to right")
    # T = k unless set, as for SEDD drafters: measured faster than T = 1 at temperature 0 in every
    # cell of bench_peers and bench_serve, mixed at temperature 1 (README, "Options").
    num_steps = options.num_draft_tokens if options.num_steps is None else options.num_steps
    return dataclasses.replace(options, num_steps=num_steps, drafter=str(folder.resolve()))


def _check_conditioned_weights(folder, config) -> None:
    """Tensor names and shapes from the safetensors header (cheap), against the config."""
    import torch

    from ..models.conditioned import ConditionedDenoiser
    from ..models.conditioned_checkpoint import ConditionedCheckpointError
    from .config import safetensors_shapes

    path = folder / "model.safetensors"
    if not path.is_file():
        raise ConditionedCheckpointError(f"{folder} has no model.safetensors: the weights are missing")
    try:
        stored = safetensors_shapes(path)
    except Exception as err:
        raise ConditionedCheckpointError(f"{path} could not be read ({type(err).__name__}: {err}); "
                                         "the file is corrupt or truncated") from err
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ConditionedDenoiser(config).state_dict().items()}
    if stored != expected:
        missing = sorted(set(expected) - set(stored))[:5]
        unexpected = sorted(set(stored) - set(expected))[:5]
        shapes = [f"{k}: {stored[k]} vs {v}" for k, v in expected.items()
                  if k in stored and stored[k] != v][:5]
        raise ConditionedCheckpointError(f"{path} does not match its config.json: missing {missing}, "
                                         f"unexpected {unexpected}, shape differences {shapes}")


def choose_verifier(options: SpecDiffConfig, rejection_method: str) -> SpecDiffConfig:
    """Refuse, at startup, a rejection_sample_method that cannot run here; 'auto' never picks
    vLLM's sampler where it is known to fail (it then picks ours) and an explicit 'vllm' is refused
    there with the fix."""
    import dataclasses

    from .sampler import check_rejection_sample_method

    check_rejection_sample_method(rejection_method)
    if rejection_method == "synthetic" and _cpu_sampler_lacks_synthetic():
        # Our verifier implements it, but it is bound to the runner at the first drafting step:
        # the step before (the prompt's, without drafts) runs vLLM's sampler, which asserts.
        raise SpecDiffConfigError(
            "specdiff: rejection_sample_method 'synthetic' cannot run on this CPU build: vLLM's C++ "
            "rejection kernels do not implement it and an engine's first step runs vLLM's sampler "
            "whichever verifier is chosen. Use rejection_sample_method 'standard' on CPU "
            "(synthetic runs on CUDA)")
    if options.verifier == "specdiff":
        return options
    problem = vllm_sampler_problem()
    if problem is None:
        return options
    if options.verifier == "vllm":
        raise SpecDiffConfigError(f"specdiff: --specdiff-verifier vllm cannot run here: {problem}. "
                                  "Use --specdiff-verifier specdiff (or auto)")
    logger.info("specdiff: verifier auto -> specdiff: %s", problem)
    return dataclasses.replace(options, verifier="specdiff")


def vllm_sampler_problem() -> str | None:
    """Why vLLM's own rejection sampler would fail in this installation, or None."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or install_empty_top_k_fix():
        return None
    from vllm.v1.sample.ops import topk_topp_sampler

    if _top_k_only_is_broken(topk_topp_sampler.apply_top_k_only):
        return ("vLLM's CPU top-k fails on steps without drafts (empty batch) and the plugin could "
                "not guard it")
    return None


def _cpu_sampler_lacks_synthetic() -> bool:
    """vLLM's C++ fallbacks of the rejection kernels (CPU builds without Triton) assert when asked
    for synthetic mode; probed on empty inputs."""
    import torch

    try:
        from vllm.triton_utils import HAS_TRITON
        from vllm.utils import cpu_triton_utils
    except ImportError:
        return False
    impl = getattr(cpu_triton_utils, "_rejection_greedy_sample_kernel_impl", None)
    if HAS_TRITON or impl is None:
        return False
    empty = torch.empty(0, dtype=torch.int64)
    try:
        impl(empty.view(0, 1), empty, empty, empty, empty, None, 0, None, None,
             SYNTHETIC_MODE=True)
    except AssertionError:
        return True
    except Exception:  # past the assertion (e.g. the C++ ops are not loaded in this process)
        return False
    return False


@contextlib.contextmanager
def _config_errors():
    """Re-raise a specdiff ValueError as SpecDiffConfigError (still a ValueError), so that the
    startup-error hook can print it as one line; the original stays chained for tracebacks."""
    try:
        yield
    except SpecDiffConfigError:
        raise
    except ValueError as err:
        raise SpecDiffConfigError(str(err)) from err


# ---------------------------------------------------------------------------------------------------
# 4: CPU expand kernel (vllm-project/vllm#55005)
# ---------------------------------------------------------------------------------------------------
def expand_batch_values(output, input_val, cu_num_tokens, replace_from, replace_to,
                        MAX_NUM_TOKENS=None) -> None:  # noqa: N803 (the kernel's own name)
    """Intended semantics of rejection_sampler.expand_kernel, in torch.

    output[cu[i-1]:cu[i]] = input_val[i], with input_val[i] == replace_from written as replace_to.
    output: [num_tokens]; input_val: [batch]; cu_num_tokens: [batch] inclusive cumsum.
    """
    import torch

    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))  # [batch] tokens per request
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    # output_size: no host sync to size the result (output is [cu[-1]] by construction).
    output.copy_(torch.repeat_interleave(values, counts, output_size=output.shape[0]))


def _expand_impl_is_broken(impl: Callable) -> bool:
    """Probe the installed function on float inputs; True when it does not write the right values
    (or cannot run here, e.g. before vLLM's CPU ops are loaded: ours is correct either way)."""
    import torch

    output = torch.full((4,), -7.0)
    try:
        impl(output, torch.tensor([0.5, 0.0, 2.0]), torch.tensor([1, 3, 4]), 0, 1)
    except Exception:
        return True
    return not torch.equal(output, torch.tensor([0.5, 1.0, 1.0, 2.0]))


def install_cpu_expand_fix() -> bool:
    """Replace the broken CPU expand fallback; True when the fix is (now or already) installed."""
    if "expand_fix" in INSTALLED:
        return True
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:
        return False
    impl = getattr(cpu_triton_utils, "_expand_kernel_impl", None)
    if impl is None or _is_patched(impl) or not _expand_impl_is_broken(impl):
        return False
    global ORIGINAL_EXPAND_IMPL
    ORIGINAL_EXPAND_IMPL = impl
    fixed = _mark(expand_batch_values)
    cpu_triton_utils._expand_kernel_impl = fixed
    # Normally the platform registers its overrides later (worker init reads the attribute we just
    # replaced). If it already did, re-register so the dispatcher routes to the fixed function.
    try:
        from vllm.triton_utils import dispatcher

        registered = dispatcher._registry.get(EXPAND_KERNEL_NAME)
        if registered is not None and registered[1] is impl:
            dispatcher.register_kernels({EXPAND_KERNEL_NAME: fixed})
    except (ImportError, AttributeError):
        pass
    INSTALLED["expand_fix"] = ("vllm.utils.cpu_triton_utils._expand_kernel_impl -> torch "
                               "repeat_interleave (vllm-project/vllm#55005)")
    logger.info("vllm-specdiff: replaced the broken CPU expand kernel (vllm#55005): speculative "
                "sampling at temperature > 0 is correct on CPU again")
    return True


# ---------------------------------------------------------------------------------------------------
# 5: top-k on an empty batch (CPU; same bug class as vllm-project/vllm-ascend#7280)
# ---------------------------------------------------------------------------------------------------
def _top_k_only_is_broken(impl: Callable) -> bool:
    """Probe: True when `apply_top_k_only` fails on an empty batch (zero rows, zero k values)."""
    import torch

    try:
        out = impl(torch.empty(0, 4), torch.empty(0, dtype=torch.int64))
    except Exception:
        return True
    return tuple(out.shape) != (0, 4)


def guard_empty_batch(apply_top_k_only: Callable) -> Callable:
    """`apply_top_k_only` that returns an empty batch unchanged (there is nothing to mask)."""

    @functools.wraps(apply_top_k_only)
    def guarded(logits, k, *args, **kwargs):
        if logits.shape[0] == 0:
            return logits
        return apply_top_k_only(logits, k, *args, **kwargs)

    return _mark(guarded)


def install_empty_top_k_fix() -> bool:
    """Guard vLLM's top-k against empty batches; True when the guard is (now or already) in."""
    if "empty_top_k_fix" in INSTALLED:
        return True
    try:
        from vllm.v1.sample.ops import topk_topp_sampler
    except ImportError:
        return False
    impl = getattr(topk_topp_sampler, "apply_top_k_only", None)
    if impl is None or _is_patched(impl) or not _top_k_only_is_broken(impl):
        return False
    # apply_top_k_top_p_pytorch looks the function up in its module on every call.
    topk_topp_sampler.apply_top_k_only = guard_empty_batch(impl)
    INSTALLED["empty_top_k_fix"] = (f"{TOP_K_MODULE}.apply_top_k_only: an empty batch is returned "
                                    "unchanged (spec-decode steps without drafts)")
    logger.info("vllm-specdiff: guarded vLLM's top-k against empty batches: top-k requests no longer "
                "crash speculative engines on CPU")
    return True


# ---------------------------------------------------------------------------------------------------
# Startup errors: one line
# ---------------------------------------------------------------------------------------------------
def startup_error_message(exc: BaseException | None) -> str | None:
    """The message of a specdiff configuration error in `exc` or its causes, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (SpecDiffConfigError, UnsupportedVLLMError)):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def install_startup_error_hook() -> None:
    """An uncaught specdiff configuration error (it ends `vllm serve` at startup) prints one line,
    the problem and its fix; other exceptions, and every one with VLLM_SPECDIFF_TRACEBACK=1, keep
    Python's traceback."""
    if _is_patched(sys.excepthook):
        return
    previous = sys.excepthook

    def excepthook(exc_type, exc, traceback):
        message = startup_error_message(exc)
        if message is None or os.environ.get(TRACEBACK_ENV) == "1":
            return previous(exc_type, exc, traceback)
        print(f"error: {message} ({TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)

    sys.excepthook = _mark(excepthook)


# ---------------------------------------------------------------------------------------------------
# 6-7: the model runner (workers of specdiff engines only)
# ---------------------------------------------------------------------------------------------------
def install_runner_patch() -> None:
    """Wrap GPUModelRunner.propose_draft_token_ids (the CPU runner inherits it)."""
    check_vllm_version()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = _require(GPUModelRunner, "propose_draft_token_ids",
                        ("self", "scheduler_output", "sampled_token_ids"))
    for attr in ("_get_spec_decode_draft_probs", "_sample"):
        _require(GPUModelRunner, attr)
    if _is_patched(original):
        return

    signature = inspect.signature(original)

    @functools.wraps(original)
    def propose_draft_token_ids(self, *args, **kwargs):
        from .proposer import SpecDiffProposer

        drafter = getattr(self, "drafter", None)
        if not isinstance(drafter, SpecDiffProposer):
            return original(self, *args, **kwargs)
        drafter.bind_runner(self)
        start = time.perf_counter()
        # Request ids, accepted counts, step timing and (conditioned drafters) the target's layer
        # outputs of the tokens it just processed.
        bound = signature.bind(self, *args, **kwargs).arguments
        drafter.observe_step(self, bound["scheduler_output"], bound["sampled_token_ids"],
                             bound.get("aux_hidden_states"), bound.get("spec_decode_metadata"),
                             bound.get("common_attn_metadata"))
        observed = time.perf_counter()
        batch = self.input_batch
        num_reqs = batch.num_reqs
        temperature_cpu = getattr(batch, "temperature_cpu", None)
        if temperature_cpu is not None:
            temperature = temperature_cpu[:num_reqs].copy()
        else:  # fall back to the sampling metadata's device tensor (None when all greedy)
            meta = batch.sampling_metadata
            temperature = (meta.temperature[:num_reqs].cpu().numpy() if meta.temperature is not None
                           else [0.0] * num_reqs)
        drafter.set_sampling_state(temperature, dict(batch.generators))
        draft_token_ids = original(self, *args, **kwargs)
        draft_probs = drafter.take_last_draft_probs()
        if draft_probs is not None:
            self._draft_probs = draft_probs
            self._draft_prob_req_ids = batch.req_ids.copy()
        # The plugin's own time per engine step (observing, lookup, allocation, drafting):
        # what speculation costs beyond the target's verify forward and the sampler.
        stats = drafter.stats
        stats["engine_steps"] = stats.get("engine_steps", 0) + 1
        stats["observe_seconds"] = stats.get("observe_seconds", 0.0) + observed - start
        stats["proposer_seconds"] = stats.get("proposer_seconds", 0.0) + time.perf_counter() - start
        return draft_token_ids

    GPUModelRunner.propose_draft_token_ids = _mark(propose_draft_token_ids)
    INSTALLED["propose_draft_token_ids"] = ("GPUModelRunner.propose_draft_token_ids: sampling state "
                                            "and target states in, draft probabilities out")
    for param in ("aux_hidden_states", "spec_decode_metadata", "common_attn_metadata"):
        if param not in signature.parameters:
            raise UnsupportedVLLMError(
                f"vllm-specdiff: GPUModelRunner.propose_draft_token_ids of vLLM {vllm_version()} has no "
                f"parameter {param!r} (supported: {', '.join(SUPPORTED_VLLM)})")

    setup = _require(GPUModelRunner, "_setup_eagle3_aux_hidden_state_outputs", ("self",))
    if _is_patched(setup):
        return

    @functools.wraps(setup)
    def setup_aux_hidden_state_outputs(self):
        """A conditioned specdiff drafter asks the target for its checkpoint's layers (runs at load
        time, after drafter.load_model); everything else keeps vLLM's behaviour."""
        from .proposer import SpecDiffProposer

        drafter = getattr(self, "drafter", None)
        layers = drafter.aux_layers if isinstance(drafter, SpecDiffProposer) else None
        if not layers:
            return setup(self)
        self.use_aux_hidden_state_outputs = True
        self.get_model().set_aux_hidden_state_layers(layers)
        logger.info("specdiff: the target emits the outputs of its layers %s (vLLM aux ids %s) for "
                    "the conditioned drafter", [i - 1 for i in layers], list(layers))

    GPUModelRunner._setup_eagle3_aux_hidden_state_outputs = _mark(setup_aux_hidden_state_outputs)
    INSTALLED["aux_hidden_states"] = ("GPUModelRunner._setup_eagle3_aux_hidden_state_outputs: the "
                                      "conditioned drafter's target layers")


def install_rejection_sampler(runner, sampler_cls: type) -> None:
    """Swap the runner's rejection sampler instance for ours (one engine, not the class)."""
    for attr in ("rejection_sampler", "sampler", "speculative_config", "device", "_draft_probs",
                 "_draft_prob_req_ids"):
        if not hasattr(runner, attr):
            raise UnsupportedVLLMError(
                f"vllm-specdiff cannot install its verifier: the model runner of vLLM "
                f"{vllm_version()} has no attribute {attr!r} (supported: {', '.join(SUPPORTED_VLLM)})."
                " Use --specdiff-verifier vllm")
    if isinstance(runner.rejection_sampler, sampler_cls):
        return
    runner.rejection_sampler = sampler_cls(runner.sampler, runner.speculative_config, runner.device)
    INSTALLED["rejection_sampler"] = f"runner.rejection_sampler -> {sampler_cls.__name__}"


def install_zero_draft_fast_path(runner, stats: dict | None = None) -> None:
    """Steps without any draft token sample like an engine without speculation (item 8); `stats`
    counts them (plain_sampler_steps)."""
    for attr in ("rejection_sampler", "sampler"):
        if not hasattr(runner, attr):
            raise UnsupportedVLLMError(
                f"vllm-specdiff: the model runner of vLLM {vllm_version()} has no attribute {attr!r} "
                f"(supported: {', '.join(SUPPORTED_VLLM)})")
    verifier = runner.rejection_sampler
    if _is_patched(getattr(verifier, "forward", None)):
        return
    verify = verifier.forward
    sampler = runner.sampler

    @functools.wraps(verify)
    def forward(metadata, draft_probs, logits, sampling_metadata, *args, **kwargs):
        if metadata.max_spec_len == 0 and not args and not kwargs:
            # No drafts: logits holds one row per request (its bonus position) in batch order.
            # predict_bonus_token=True is what the rejection sampler's bonus pass passes.
            if stats is not None:
                stats["plain_sampler_steps"] = stats.get("plain_sampler_steps", 0) + 1
            return sampler(logits=logits[metadata.bonus_logits_indices],
                           sampling_metadata=sampling_metadata, predict_bonus_token=True)
        return verify(metadata, draft_probs, logits, sampling_metadata, *args, **kwargs)

    verifier.forward = _mark(forward)
    INSTALLED["zero_draft_fast_path"] = ("runner.rejection_sampler.forward: steps without drafts "
                                         "use the plain sampler")
