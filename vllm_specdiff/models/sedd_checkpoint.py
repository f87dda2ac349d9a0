"""Reading and writing SEDD checkpoints in the published `louaaron/sedd-*` format.

A checkpoint is a folder (or hub repo) with `config.json` (a nested dump of the whole training
config) and `model.safetensors` or `pytorch_model.bin` (a plain state dict, no `module.` prefix).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .sedd import ROTARY_BASE, SEDD, SEDDConfig, standard_inv_freq

# Short names users type on the command line -> the published hub ids.
SHORT_NAMES = {
    "sedd-small": "louaaron/sedd-small",
    "sedd-medium": "louaaron/sedd-medium",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# A buffer the loader can rebuild from the config when a checkpoint lacks it.
INV_FREQ_KEY = "rotary_emb.inv_freq"


class CheckpointError(ValueError):
    """A SEDD checkpoint is missing, unreachable, corrupt or does not match the architecture."""


def config_from_dict(raw: dict[str, Any]) -> SEDDConfig:
    """Build a SEDDConfig from the nested training-config dump; other keys are ignored."""
    try:
        model = raw["model"]
        graph_type = raw.get("graph", {}).get("type", "absorb")
        noise_type = raw.get("noise", {}).get("type", "loglinear")
        if graph_type != "absorb":
            raise CheckpointError(f"graph.type {graph_type!r} is not supported: only 'absorb' "
                                  "(masked) SEDD models can draft; use an absorbing checkpoint")
        if noise_type != "loglinear":
            raise CheckpointError(f"noise.type {noise_type!r} is not supported: only 'loglinear'")
        return SEDDConfig(tokens=int(raw["tokens"]), hidden_size=int(model["hidden_size"]),
                          cond_dim=int(model["cond_dim"]), length=int(model["length"]),
                          n_blocks=int(model["n_blocks"]), n_heads=int(model["n_heads"]),
                          scale_by_sigma=bool(model.get("scale_by_sigma", True)),
                          dropout=float(model.get("dropout", 0.0)))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"config.json lacks the SEDD field {err}: expected the nested "
                              "format with 'tokens' and model.{hidden_size, cond_dim, length, "
                              "n_blocks, n_heads}") from err


def config_to_dict(config: SEDDConfig) -> dict[str, Any]:
    """The minimal nested config.json that `config_from_dict` (and the reference code) reads."""
    return {
        "tokens": config.tokens,
        "graph": {"type": "absorb"},
        "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "model": {"name": "custom", "type": "ddit", "hidden_size": config.hidden_size,
                  "cond_dim": config.cond_dim, "length": config.length,
                  "n_blocks": config.n_blocks, "n_heads": config.n_heads,
                  "scale_by_sigma": config.scale_by_sigma, "dropout": config.dropout},
    }


def resolve_checkpoint(name: str | Path) -> Path:
    """A local folder as is; a short name or hub id through huggingface_hub (when reachable)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{name} is a file; pass the checkpoint folder that holds "
                              "config.json and model.safetensors")
    hub_id = SHORT_NAMES.get(str(name), str(name))
    if str(name).startswith((".", "/", "~")) or str(hub_id).count("/") != 1:
        raise CheckpointError(f"SEDD checkpoint {name!r} not found: no such folder, and it is not a "
                              f"hub id (owner/name) or one of {sorted(SHORT_NAMES)}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=["config.json", *WEIGHT_FILES]))
    except Exception as err:  # offline, unknown repo, network error: all mean "not fetched"
        raise CheckpointError(
            f"could not fetch SEDD checkpoint {hub_id!r} from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Without hub access, download it elsewhere and pass the local folder instead") from err


def read_raw_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json: not a SEDD checkpoint folder")
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err}); the checkpoint is "
                              "corrupt, download it again") from err


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    for filename in WEIGHT_FILES:
        weights = folder / filename
        if not weights.is_file():
            continue
        try:
            if filename.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(weights))
            return torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{weights} could not be read ({type(err).__name__}: {err}); "
                                  "the file is corrupt or truncated, download it again") from err
    raise CheckpointError(f"{folder} has none of {WEIGHT_FILES}: the weights are missing")


def check_state_dict(model: SEDD, state_dict: dict[str, torch.Tensor]) -> None:
    """Strict comparison of keys and shapes, with every difference named in one error.

    Only `rotary_emb.inv_freq` may be absent (a derived buffer): the standard frequencies are used.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state_dict.items()}
    missing = sorted(set(expected) - set(found) - {INV_FREQ_KEY})
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{name}: checkpoint {found[name]} vs model {expected[name]}"
              for name in sorted(set(expected) & set(found)) if expected[name] != found[name]]
    if missing or unexpected or shapes:
        lines = ["the state dict does not match the SEDD architecture in config.json:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if shapes:
            lines.append(f"  shape differences ({len(shapes)}): " + "; ".join(shapes))
        raise CheckpointError("\n".join(lines))


def checkpoint_inv_freq(stored: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """The rotary frequencies to run with (float32), from the checkpoint's `rotary_emb.inv_freq`.

    The reference's load_state_dict overwrites its buffer, so the checkpoint's values are what the
    published models ran with: they are used as stored. Two cases differ:
    - absent: the standard frequencies 1 / 10000^(2i / head_dim);
    - stored in a lower precision (our fp16 / bf16 exports) and equal to the standard frequencies
      rounded to that dtype: the float32 standard frequencies the model was trained with.
    A buffer that is not the standard formula is still used (it is what the checkpoint's model
    computes) but reported with a warning naming both; a non-finite or non-positive one is an error.
    """
    standard = standard_inv_freq(head_dim)
    if stored is None:
        return standard
    stored = stored.detach().to("cpu")
    if not bool(torch.isfinite(stored).all()) or bool((stored <= 0).any()):
        raise CheckpointError(f"checkpoint {INV_FREQ_KEY} holds non-finite or non-positive values "
                              f"{stored.tolist()}: the checkpoint is corrupt")
    if stored.dtype != torch.float32 and torch.equal(stored, standard.to(stored.dtype)):
        return standard
    values = stored.float()
    # One float32 ulp of slack: the same formula evaluated on another device may round differently.
    relative = ((values - standard).abs() / standard)
    if float(relative.max()) > 2 * torch.finfo(torch.float32).eps:
        worst = int(relative.argmax())
        first = ", ".join(f"{v:.6g}" for v in values[:4].tolist())
        formula = ", ".join(f"{v:.6g}" for v in standard[:4].tolist())
        warnings.warn(
            f"checkpoint {INV_FREQ_KEY} is not the standard rotary formula "
            f"1/{ROTARY_BASE}^(2i/{head_dim}): largest relative difference {float(relative.max()):.3g} "
            f"at i = {worst} (checkpoint {float(values[worst]):.9g} vs formula "
            f"{float(standard[worst]):.9g}; first values: checkpoint [{first}, ...] vs formula "
            f"[{formula}, ...]). Using the checkpoint's values, as the reference code does",
            stacklevel=3)
    return values


def load_sedd(name: str | Path, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> SEDD:
    folder = resolve_checkpoint(name)
    raw_config = read_raw_config(folder)
    config = config_from_dict(raw_config)
    with torch.device("meta"):
        model = SEDD(config)
    state_dict = read_state_dict(folder)
    check_state_dict(model, state_dict)
    inv_freq = checkpoint_inv_freq(state_dict.get(INV_FREQ_KEY), config.head_dim)
    state_dict[INV_FREQ_KEY] = inv_freq
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.raw_config = raw_config
    return model.to(device=device, dtype=dtype).eval()


def save_sedd(model: SEDD, directory: str | Path) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw_config = model.raw_config or config_to_dict(model.config)
    (directory / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    state_dict = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    save_file(state_dict, str(directory / "model.safetensors"), metadata={"format": "pt"})
