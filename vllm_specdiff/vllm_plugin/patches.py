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
Worker-only (installed by the proposer, i.e. only in engines that run specdiff):
  5. `GPUModelRunner.propose_draft_token_ids` (inherited by the CPU runner): hands our proposer the
     per-row sampling temperatures and generators before drafting, and afterwards stores its draft
     probabilities where the runner feeds them to the rejection sampler (`_draft_probs` /
     `_draft_prob_req_ids`; the runner fills them only for eagle/draft_model drafters).
  6. `runner.rejection_sampler` (an instance attribute, not a class patch): our verifier, unless
     `verifier = "vllm"`.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import logging
import os
import sys
from typing import Any, Callable

from .config import (ADDITIONAL_CONFIG_KEY, METHOD, PROPOSER_CLASS, SPECDIFF_ONLY_KEYS, SpecDiffConfig,
                     check_vocab, inspect_drafter, split_speculative_dict)

# Under "vllm." so that vLLM's logging configuration (handlers, level, format) applies.
logger = logging.getLogger("vllm.specdiff")

SUPPORTED_VLLM = ("0.32", "0.33")
FORCE_ENV = "VLLM_SPECDIFF_SKIP_VERSION_CHECK"
PATCH_MARK = "__specdiff_patch__"
EXPAND_KERNEL_NAME = "vllm.v1.sample.rejection_sampler.expand_kernel"

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
    "--specdiff-drafter-dtype": ("drafter_dtype", str, ("auto", "float32", "bfloat16", "float16"),
                                 "Drafter weights' dtype (default auto: float32 on CPU, the "
                                 "target's dtype elsewhere)."),
    "--specdiff-seed": ("seed", int, None, "Base seed of the drafter (default: the engine seed)."),
    "--specdiff-log-every": ("log_every", int, None,
                             "Log drafter time every N engine steps (0 = never; default 200)."),
}

# name -> one-line description of each installed patch (for logs and tests).
INSTALLED: dict[str, str] = {}
# Why specdiff is unavailable on this vLLM (None while supported).
UNSUPPORTED_REASON: str | None = None
# The CPU expand function found broken and replaced (kept for tests and diagnostics).
ORIGINAL_EXPAND_IMPL: Callable | None = None


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM lacks what a patch relies on."""


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
    """Patches 1-4. Never raises: an unsupported vLLM keeps working, only specdiff is refused.

    The EngineArgs patches wait for `vllm.engine.arg_utils` to be imported: vLLM's API process has
    imported it before it loads plugins, while importing it in every worker would cost seconds.
    """
    try:
        install_cpu_expand_fix()
    except Exception:  # the fix is best effort; never break vLLM from a plugin hook
        logger.exception("vllm-specdiff: could not install the CPU expand-kernel fix")
    when_imported("vllm.engine.arg_utils", install_engine_patches)


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
            merge_cli_options(engine_args, args)
            return engine_args

        EngineArgs.from_cli_args = classmethod(_mark(patched_from_cli_args))
        INSTALLED["from_cli_args"] = "EngineArgs.from_cli_args: carries --specdiff-* values"

    if not _is_patched(create_spec):
        @functools.wraps(create_spec)
        def patched_create_speculative_config(self, target_model_config, target_parallel_config):
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
    folder, sedd_config = inspect_drafter(options.drafter)
    requested = options.drafter
    options = options.resolve(sedd_config.length, drafter=str(folder))
    check_vocab(folder, sedd_config.tokens, target_model_config.get_vocab_size(),
                None if target_model_config.skip_tokenizer_init else target_model_config.tokenizer,
                trust_remote_code=target_model_config.trust_remote_code, drafter_name=requested)
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
    logger.info("specdiff: drafter %s (%s), %d draft tokens, %d steps, window %d, order %s, "
                "draft probs %s, verifier %s", requested, folder, options.num_draft_tokens,
                options.num_steps, options.window, options.order,
                "full" if options.use_full_draft_probs else "one-hot", options.verifier)
    return options


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
# 5-6: the model runner (workers of specdiff engines only)
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

    @functools.wraps(original)
    def propose_draft_token_ids(self, *args, **kwargs):
        from .proposer import SpecDiffProposer

        drafter = getattr(self, "drafter", None)
        if not isinstance(drafter, SpecDiffProposer):
            return original(self, *args, **kwargs)
        drafter.bind_runner(self)
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
        return draft_token_ids

    GPUModelRunner.propose_draft_token_ids = _mark(propose_draft_token_ids)
    INSTALLED["propose_draft_token_ids"] = ("GPUModelRunner.propose_draft_token_ids: sampling state "
                                            "in, draft probabilities out")


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
