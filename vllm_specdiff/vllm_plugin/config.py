"""The specdiff options of a vLLM engine: one frozen dataclass, built and validated at the edges.

Users write them in vLLM's speculative config (JSON `--speculative-config`, `LLM(speculative_config=...)`,
or the `--specdiff-*` flags); the plugin moves them to `additional_config["specdiff"]`, which vLLM hashes
and ships to every worker, where the proposer reads them back with `SpecDiffConfig.from_dict`.

Keys of the speculative config (vLLM's names where vLLM has one):
    method                 "specdiff"
    model                  the SEDD drafter: local folder, hub id, or sedd-small / sedd-medium
    num_speculative_tokens draft tokens per step (num_draft_tokens)
    num_steps              denoising steps per draft block, in [1, num_speculative_tokens]
                           (default: num_speculative_tokens, for both drafter kinds)
    window                 drafter context window incl. the draft block (default: drafter length)
    order                  "left_to_right" (exact with full q) | "random" (reference SEDD sampler)
    draft_temperature      temperature of sampled drafts; None = the request's own temperature.
                           Greedy requests (temperature 0) always get argmax drafts.
    verifier               "specdiff" (our batched rejection sampler) | "vllm" (vLLM's own) |
                           "auto" (default: the faster one measured on the device, DEFAULT_VERIFIER)
    draft_probs            "full" | "one_hot" | "auto" (= full for left_to_right, one_hot for random:
                           the exact choice for each order, shared/docs/lossless.md)
    drafter_dtype          "auto" (float32 on CPU, where bf16 matmuls are ~2x slower for the small
                           drafter; the target's dtype elsewhere) | "float32" | "bfloat16" | "float16"
                           | "autocast_bfloat16" (float32 weights under bf16 autocast: the reference
                           SEDD code's GPU recipe; standalone SEDD drafters only)
    draft_policy           conditioned drafters at temperature > 0: "sampled" (drafts sampled from
                           the drafter's law, verified with full q) | "argmax" (argmax drafts,
                           verified one-hot) | "auto" (the better one measured per num_steps, k:
                           auto_draft_policy, sampled today). Both are exact; temperature 0 is
                           always argmax.
    adaptive               true (default): per step and request, draft only the tokens that pay
                           (drafting.adaptive: acceptance so far x measured step costs, down to 0;
                           in a closed batch, where no request waits for a slot, planned for the
                           batch's end); false: always num_speculative_tokens
    lookup                 true (default): both drafters (SEDD and conditioned) take prompt-lookup
                           continuations of the context as revealed block positions
                           (drafting.lookup); false: off
    seed                   base seed of the drafter's per-step generators (default: the engine seed)
    log_every              log drafter time every N engine steps (0 = never)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

METHOD = "specdiff"
ADDITIONAL_CONFIG_KEY = "specdiff"
PROPOSER_CLASS = "vllm_specdiff.vllm_plugin.proposer.SpecDiffProposer"
ORDERS = ("left_to_right", "random")
VERIFIERS = ("auto", "specdiff", "vllm")
# verifier "auto": the faster one measured per device. CPU (2-core AVX2 EPYC, float32, vocab 49,152,
# full q, median ms per RejectionSampler.forward, `benchmarks/bench_rejection.py`,
# results/rejection-cpu-plugin.jsonl):
#   batch x drafts      1x4   1x8   4x8   16x4  16x8
#   specdiff greedy     1.4   2.0   5.4   10.5  18.5      T=1:  5.1   5.9  23.1  56.6  88.5
#   vllm     greedy     0.9   1.4   6.2   11.2  19.6      T=1:  4.2   5.0  24.9  64.3  89.8   -> vllm
# (vLLM's CPU sampler with the plugin's #55005 fix; within noise of ours since ours draws the
#  recovered tokens' noise lazily and skips unneeded passes; vLLM's is the one vLLM's peers use.)
#   cuda: our Triton kernels, 2.3-7x faster than the PyTorch reference on an H200 (bf16, vocab 50,257,
#         results/rejection-cuda.jsonl); vLLM's GPU sampler not timed (no vLLM on that machine).
DEFAULT_VERIFIER = {"cpu": "vllm", "cuda": "specdiff"}
DRAFT_PROBS_MODES = ("auto", "full", "one_hot")
DRAFTER_DTYPES = ("auto", "float32", "bfloat16", "float16", "autocast_bfloat16")
DRAFT_POLICIES = ("auto", "sampled", "argmax")

# speculative-config key -> (SpecDiffConfig field, CLI flag that sets it)
KEYS: dict[str, tuple[str, str]] = {
    "model": ("drafter", "--speculative-model"),
    "num_speculative_tokens": ("num_draft_tokens", "--num-speculative-tokens"),
    "num_steps": ("num_steps", "--specdiff-steps"),
    "window": ("window", "--specdiff-window"),
    "order": ("order", "--specdiff-order"),
    "draft_temperature": ("draft_temperature", "--specdiff-draft-temperature"),
    "verifier": ("verifier", "--specdiff-verifier"),
    "draft_probs": ("draft_probs", "--specdiff-draft-probs"),
    "drafter_dtype": ("drafter_dtype", "--specdiff-drafter-dtype"),
    "draft_policy": ("draft_policy", "--specdiff-draft-policy"),
    "adaptive": ("adaptive", "--specdiff-adaptive"),
    "lookup": ("lookup", "--specdiff-lookup"),
    "seed": ("seed", "--specdiff-seed"),
    "log_every": ("log_every", "--specdiff-log-every"),
}
# Our keys that vLLM's SpeculativeConfig does not know (they must never reach it).
SPECDIFF_ONLY_KEYS = ("num_steps", "window", "order", "draft_temperature", "verifier", "draft_probs",
                      "drafter_dtype", "draft_policy", "adaptive", "lookup", "seed",
                      "log_every")


def _flag(field: str) -> str:
    for key, (name, flag) in KEYS.items():
        if name == field:
            return f"{key} ({flag})"
    return field


def _check_int(field: str, value: Any, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"specdiff: {_flag(field)} must be an integer, got {value!r}")


@dataclass(frozen=True)
class SpecDiffConfig:
    """Validated specdiff options; `resolve` fills the defaults that depend on the drafter."""

    drafter: str
    num_draft_tokens: int
    num_steps: int | None = None
    window: int | None = None
    order: str = "left_to_right"
    draft_temperature: float | None = None
    verifier: str = "auto"
    draft_probs: str = "auto"
    drafter_dtype: str = "auto"
    draft_policy: str = "auto"
    adaptive: bool = True
    lookup: bool = True
    seed: int | None = None
    log_every: int = 200

    def __post_init__(self) -> None:
        if not isinstance(self.drafter, str) or not self.drafter:
            raise ValueError("specdiff: model (--speculative-model) must name the SEDD drafter: a local "
                             "folder, a hub id, or sedd-small / sedd-medium")
        _check_int("num_draft_tokens", self.num_draft_tokens, optional=False)
        if self.num_draft_tokens < 1:
            raise ValueError(f"specdiff: {_flag('num_draft_tokens')} must be >= 1, got "
                             f"{self.num_draft_tokens}")
        _check_int("num_steps", self.num_steps, optional=True)
        if self.num_steps is not None and not 1 <= self.num_steps <= self.num_draft_tokens:
            raise ValueError(
                f"specdiff: {_flag('num_steps')} must be in [1, num_speculative_tokens = "
                f"{self.num_draft_tokens}], got {self.num_steps}: each denoising step unmasks at least "
                "one draft position, so more steps than draft tokens would run forwards for nothing")
        _check_int("window", self.window, optional=True)
        if self.window is not None and self.num_draft_tokens >= self.window:
            raise ValueError(
                f"specdiff: {_flag('num_draft_tokens')} = {self.num_draft_tokens} must be smaller than "
                f"the drafter window {self.window} ({_flag('window')}): the window holds the context "
                "tail AND the draft block; lower num_speculative_tokens or raise the window")
        if self.order not in ORDERS:
            raise ValueError(f"specdiff: {_flag('order')} must be one of {ORDERS}, got {self.order!r}")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"specdiff: {_flag('verifier')} must be one of {VERIFIERS}, "
                             f"got {self.verifier!r}")
        if self.draft_probs not in DRAFT_PROBS_MODES:
            raise ValueError(f"specdiff: {_flag('draft_probs')} must be one of {DRAFT_PROBS_MODES}, "
                             f"got {self.draft_probs!r}")
        if self.drafter_dtype not in DRAFTER_DTYPES:
            raise ValueError(f"specdiff: {_flag('drafter_dtype')} must be one of {DRAFTER_DTYPES}, "
                             f"got {self.drafter_dtype!r}")
        for name in ("adaptive", "lookup"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"specdiff: {_flag(name)} must be true or false, got "
                                 f"{getattr(self, name)!r}")
        if self.draft_policy not in DRAFT_POLICIES:
            raise ValueError(f"specdiff: {_flag('draft_policy')} must be one of {DRAFT_POLICIES}, "
                             f"got {self.draft_policy!r}")
        if self.draft_temperature is not None:
            if isinstance(self.draft_temperature, bool) or not isinstance(self.draft_temperature,
                                                                          (int, float)):
                raise ValueError(f"specdiff: {_flag('draft_temperature')} must be a number, got "
                                 f"{self.draft_temperature!r}")
            if not math.isfinite(self.draft_temperature) or self.draft_temperature < 0:
                raise ValueError(f"specdiff: {_flag('draft_temperature')} must be a finite number >= 0 "
                                 f"(0 = argmax drafts), got {self.draft_temperature}")
        _check_int("seed", self.seed, optional=True)
        _check_int("log_every", self.log_every, optional=False)
        if self.log_every < 0:
            raise ValueError(f"specdiff: {_flag('log_every')} must be >= 0 (0 = never), "
                             f"got {self.log_every}")

    # ---- derived values ----
    def verifier_for(self, device_type: str) -> str:
        """The rejection sampler to run on a device ("auto" -> DEFAULT_VERIFIER, else vLLM's).

        "auto" never reaches a worker where vLLM's sampler is known to fail: at startup,
        patches.choose_verifier turns it into "specdiff" there (and refuses an explicit "vllm").
        """
        if self.verifier != "auto":
            return self.verifier
        return DEFAULT_VERIFIER.get(device_type, "vllm")

    def drafter_dtype_for(self, device_type: str, target_dtype: "torch.dtype") -> "torch.dtype":
        """The drafter's dtype: the explicit choice, else float32 on CPU and the target's elsewhere.

        The drafter's dtype never affects exactness (its draft_probs are float32 and verification
        only needs them to be the law the drafts were sampled from), only its speed.
        """
        import torch

        if self.drafter_dtype == "autocast_bfloat16":
            return torch.float32  # float32 weights, bf16 compute: the reference SEDD GPU recipe
        if self.drafter_dtype != "auto":
            return getattr(torch, self.drafter_dtype)
        return torch.float32 if device_type == "cpu" else target_dtype

    @property
    def autocast_dtype(self) -> "torch.dtype | None":
        """bf16 autocast over float32 weights for drafter_dtype 'autocast_bfloat16', else None."""
        import torch

        return torch.bfloat16 if self.drafter_dtype == "autocast_bfloat16" else None

    def policy_for(self, num_steps: int, num_draft_tokens: int) -> str:
        """The conditioned drafter's policy at temperature > 0 ('auto' -> auto_draft_policy)."""
        if self.draft_policy != "auto":
            return self.draft_policy
        return auto_draft_policy(num_steps, num_draft_tokens)

    @property
    def use_full_draft_probs(self) -> bool:
        """Verify with the recorded q (True) or one-hot (False); 'auto' picks the exact choice."""
        if self.draft_probs == "auto":
            return self.order == "left_to_right"
        return self.draft_probs == "full"

    @property
    def is_exact(self) -> bool:
        """Whether verification is lossless (shared/docs/lossless.md): random order + full q is not."""
        return not (self.order == "random" and self.use_full_draft_probs)

    def resolve(self, drafter_length: int, drafter: str | None = None) -> "SpecDiffConfig":
        """Fill the drafter-dependent defaults and check them against the drafter's trained length."""
        window = drafter_length if self.window is None else self.window
        if not 2 <= window <= drafter_length:
            raise ValueError(
                f"specdiff: {_flag('window')} = {window} is out of range: it must be in [2, "
                f"{drafter_length}], the drafter's trained length (config model.length); the drafter "
                "cannot attend beyond the positions it was trained on")
        if self.num_draft_tokens >= window:
            raise ValueError(
                f"specdiff: {_flag('num_draft_tokens')} = {self.num_draft_tokens} must be smaller than "
                f"the drafter window {window}: lower num_speculative_tokens or raise "
                f"{_flag('window')} (at most the drafter length {drafter_length})")
        num_steps = self.num_draft_tokens if self.num_steps is None else self.num_steps
        return dataclasses.replace(self, window=window, num_steps=num_steps,
                                   drafter=self.drafter if drafter is None else drafter)

    # ---- (de)serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SpecDiffConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"specdiff: unknown option(s) {unknown} in additional_config"
                             f"['{ADDITIONAL_CONFIG_KEY}']; known: {sorted(names)}")
        return cls(**raw)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "SpecDiffConfig":
        raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if not isinstance(raw, Mapping):
            raise ValueError(
                f"specdiff: additional_config['{ADDITIONAL_CONFIG_KEY}'] is missing: the specdiff "
                f"proposer ({PROPOSER_CLASS}) must be selected with method 'specdiff' (e.g. "
                "--speculative-method specdiff or speculative_config={'method': 'specdiff', ...}), "
                "not as a bare custom_class")
        return cls.from_dict(raw)


def auto_draft_policy(num_steps: int, num_draft_tokens: int) -> str:
    """Draft policy 'auto' for the conditioned drafter at temperature > 0: sampled drafts with full q.

    Measured (benchmarks/eval_drafters.py, held-out expected acceptance at temperature 1, shipped
    drafters of the last two rounds): sampled beats argmax + one-hot at every (k, T) tried, one-step
    blocks included: k=4 T=1 1.421 vs 1.317, k=4 T=4 1.467 vs 1.432, k=8 T=1 1.723 vs 1.609,
    k=8 T=8 1.810 vs 1.710 (the round before: +0.13 / +0.13 / - / +0.17). DFlash reports the
    opposite for its one-step blocks (1.16 vs ~3 tokens/round) with drafters trained by
    cross-entropy; ours are trained toward the target's law (KL), whose samples stay coherent.
    The arguments are kept for drafters where the choice differs per (T, k)."""
    return "sampled"


def split_speculative_dict(spec: Mapping[str, Any],
                           vllm_keys: frozenset[str] = frozenset()) -> tuple[SpecDiffConfig,
                                                                             dict[str, Any]]:
    """Split a user speculative config with method 'specdiff' into (our options, vLLM's keys).

    `vllm_keys`: the SpeculativeConfig fields that may pass through to vLLM (e.g. enforce_eager);
    any other key is an error that names the known ones.
    """
    spec = {str(k).replace("-", "_"): v for k, v in spec.items()}
    ours: dict[str, Any] = {}
    passthrough: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "method":
            continue
        if key in KEYS:
            if value is not None:
                ours[KEYS[key][0]] = value
        elif key in vllm_keys:
            passthrough[key] = value
        else:
            raise ValueError(
                f"specdiff: unknown speculative-config key {key!r}. specdiff keys: {sorted(KEYS)}; "
                "other SpeculativeConfig fields of vLLM pass through")
    if "drafter" not in ours:
        raise ValueError("specdiff: the speculative config needs 'model' (--speculative-model): the SEDD "
                         "drafter folder, hub id, or sedd-small / sedd-medium")
    if "num_draft_tokens" not in ours:
        raise ValueError("specdiff: the speculative config needs 'num_speculative_tokens' "
                         "(--num-speculative-tokens), the number of draft tokens per step (>= 1)")
    if "draft_temperature" in ours and isinstance(ours["draft_temperature"], int) \
            and not isinstance(ours["draft_temperature"], bool):
        ours["draft_temperature"] = float(ours["draft_temperature"])
    return SpecDiffConfig(**ours), passthrough


# ---------------------------------------------------------------------------------------------------
# Startup validation against the drafter checkpoint and the target (runs in the API process).
# ---------------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def inspect_drafter(name: str):
    """Resolve the drafter checkpoint and check it without loading its weights into memory.

    Returns (folder: Path, SEDDConfig). Raises ValueError naming the checkpoint when it is missing,
    unreachable, corrupt (unreadable or truncated weights) or does not match its config.json.
    """
    from ..checkpoint import CheckpointError, config_from_dict, read_raw_config, resolve_checkpoint

    try:
        folder = resolve_checkpoint(name)
        sedd_config = config_from_dict(read_raw_config(folder))
        _check_weights(folder, sedd_config)
    except CheckpointError as err:
        raise ValueError(f"specdiff: drafter checkpoint {name!r} (--speculative-model) is unusable: "
                         f"{err}") from err
    return folder, sedd_config


def safetensors_shapes(path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, checking that the file holds all the data the
    header promises (a truncated or corrupt file raises ValueError); reads no tensor data."""
    import json
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise ValueError(f"header length {header_len} exceeds the file size {size}")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data_end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise ValueError(f"truncated: the header promises {8 + header_len + data_end} bytes, the "
                         f"file has {size}")
    return {k: tuple(v["shape"]) for k, v in header.items()}


def _check_weights(folder, sedd_config) -> None:
    """Keys, shapes and (for safetensors) file size from the header only: cheap for big drafters."""
    import torch

    from ..checkpoint import WEIGHT_FILES, CheckpointError, check_state_dict
    from ..model import SEDD

    for filename in WEIGHT_FILES:
        path = folder / filename
        if not path.is_file():
            continue
        try:
            if filename.endswith(".safetensors"):
                shapes = safetensors_shapes(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                shapes = {k: tuple(t.shape) for k, t in state.items()}
        except Exception as err:  # any parse failure means the file is not a readable checkpoint
            raise CheckpointError(f"{path} could not be read ({type(err).__name__}: {err}); the "
                                  "file is corrupt or truncated, download it again") from err
        with torch.device("meta"):
            model = SEDD(sedd_config)
        check_state_dict(model, {k: torch.empty(s, device="meta") for k, s in shapes.items()})
        return
    raise CheckpointError(f"{folder} has none of {WEIGHT_FILES}: the weights are missing")


def check_vocab(drafter_folder, drafter_tokens: int, target_vocab_size: int,
                target_tokenizer: str | None, trust_remote_code: bool = False,
                drafter_name: str = "") -> None:
    """The drafter and the target must share one vocabulary (and tokenizer, when both are known)."""
    if drafter_tokens != target_vocab_size:
        raise ValueError(
            f"specdiff: vocabulary mismatch: the drafter {drafter_name or drafter_folder} has "
            f"{drafter_tokens} tokens (config.json 'tokens') but the target model has vocab_size "
            f"{target_vocab_size}. Speculative decoding needs one shared tokenizer: pick a drafter "
            "trained on the target's tokenizer")
    has_tokenizer = any((drafter_folder / f).is_file() for f in TOKENIZER_FILES)
    if not has_tokenizer or target_tokenizer is None:
        return
    from transformers import AutoTokenizer

    drafter_vocab = AutoTokenizer.from_pretrained(str(drafter_folder)).get_vocab()
    target_vocab = AutoTokenizer.from_pretrained(
        target_tokenizer, trust_remote_code=trust_remote_code).get_vocab()
    if drafter_vocab != target_vocab:
        differing = sorted(set(drafter_vocab.items()) ^ set(target_vocab.items()), key=str)[:5]
        raise ValueError(
            f"specdiff: tokenizer mismatch: the tokenizer saved with the drafter "
            f"{drafter_name or drafter_folder} ({len(drafter_vocab)} entries) differs from the "
            f"target's {target_tokenizer} ({len(target_vocab)} entries), e.g. {differing}. "
            "Speculative decoding needs one shared tokenizer")
