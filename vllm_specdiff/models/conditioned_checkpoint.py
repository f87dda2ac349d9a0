"""Conditioned drafter checkpoints: config.json + model.safetensors with the trained tensors only.

The target's embedding and LM head are not stored: `load_conditioned` attaches them from the target
it is given, after checking that the target is the one the drafter was trained for (vocabulary,
hidden size, number of layers, tokenizer fingerprint), with errors that name both values and the fix.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .conditioned import ConditionedConfig, ConditionedDenoiser

ARCHITECTURE = "SpecDiffConditionedDenoiser"
FORMAT_VERSION = 1


class ConditionedCheckpointError(ValueError):
    """A conditioned drafter checkpoint that is missing, corrupt or made for another target."""


def is_conditioned_checkpoint(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("architecture") == ARCHITECTURE
    except (OSError, json.JSONDecodeError):
        return False


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id) and special ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode())
    digest.update(f"{tokenizer.eos_token_id}/{tokenizer.bos_token_id}".encode())
    return digest.hexdigest()[:16]


def target_summary(target_config) -> dict[str, int]:
    """The target facts a drafter depends on, read from a transformers (or vLLM hf) config."""
    text = getattr(target_config, "text_config", None) or target_config
    return {"vocab_size": int(text.vocab_size), "hidden_size": int(text.hidden_size),
            "num_hidden_layers": int(text.num_hidden_layers)}


def check_target(config: ConditionedConfig, target_config, fingerprint: str | None = None,
                 drafter_name: str = "the drafter") -> None:
    """Raise ConditionedCheckpointError naming both values when the target does not match."""
    target = target_summary(target_config)
    pairs = (("vocabulary size", config.vocab_size, target["vocab_size"]),
             ("hidden size", config.target_hidden_size, target["hidden_size"]),
             ("number of layers", config.target_num_layers, target["num_hidden_layers"]))
    for what, mine, theirs in pairs:
        if mine != theirs:
            raise ConditionedCheckpointError(
                f"{drafter_name} was trained for a target with {what} {mine} "
                f"({config.target_name or 'unnamed'}), but the target has {what} {theirs}: use the "
                "target it was trained for, or train one for this target with `vllm-specdiff train "
                "--kind conditioned --target TARGET`")
    if fingerprint and config.tokenizer_fingerprint and fingerprint != config.tokenizer_fingerprint:
        raise ConditionedCheckpointError(
            f"{drafter_name} was trained with tokenizer {config.tokenizer_fingerprint}, the target's "
            f"tokenizer is {fingerprint}: drafter and target must share one tokenizer")


def save_conditioned(model: ConditionedDenoiser, directory: str | Path,
                     dtype: torch.dtype = torch.float16, metadata: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        tensors[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    payload = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION,
               "config": model.config.to_dict(), "metadata": metadata or {}}
    (out / "config.json").write_text(json.dumps(payload, indent=2) + "\n")


def read_conditioned_config(folder: str | Path) -> ConditionedConfig:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ConditionedCheckpointError(f"{folder} has no config.json: not a drafter checkpoint "
                                         "(train one with `vllm-specdiff train --kind conditioned`)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConditionedCheckpointError(f"{path} is not valid JSON ({exc}): the checkpoint is "
                                         "corrupt; re-export or re-download it") from exc
    if raw.get("architecture") != ARCHITECTURE:
        raise ConditionedCheckpointError(f"{path} describes {raw.get('architecture')!r}, not "
                                         f"{ARCHITECTURE!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ConditionedCheckpointError(f"{path}: format_version {raw.get('format_version')} is not "
                                         f"supported (this vllm-specdiff reads {FORMAT_VERSION})")
    try:
        return ConditionedConfig(**raw["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConditionedCheckpointError(f"{path}: invalid config ({exc})") from exc


def load_conditioned(folder: str | Path, target_embed: torch.Tensor, target_head: torch.Tensor,
                     target_config=None, fingerprint: str | None = None,
                     device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> ConditionedDenoiser:
    """Strictly load a drafter and attach the target's frozen embedding and head."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_conditioned_config(folder)
    if target_config is not None:
        check_target(config, target_config, fingerprint, drafter_name=str(folder))
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ConditionedCheckpointError(f"{folder} has no model.safetensors")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ConditionedCheckpointError(f"{weights} cannot be read ({exc}): the file is corrupt; "
                                         "re-export or re-download it") from exc
    model = ConditionedDenoiser(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ConditionedCheckpointError(
            f"{weights} does not match its config.json: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape differences {shapes[:5]}")
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype)
    model.draft_vocab = model.draft_vocab.long()
    model.attach_target(target_embed, target_head)
    return model.eval()
