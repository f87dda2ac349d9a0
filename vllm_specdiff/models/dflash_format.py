"""Export a conditioned drafter in the DFlash format that vLLM's own `dflash` method loads.

vLLM's `DFlashDraftModel` (vllm/model_executor/models/qwen3_dflash.py) is the one-step special case
of our conditioned denoiser: Qwen3 decoder layers (per-head q/k RMSNorm), context states
hidden_norm(fc(concatenated target layers)) injected as keys/values in every layer, the block
[anchor, MASK x k] in one bidirectional forward, the target's embedding, and the draft vocabulary
mapped to target ids by `d2t` (target id = draft id + d2t[draft id]). A drafter trained with
`dflash_compatible()` flags (no per-layer feature scaling, q/k norm, no extra anchor inputs) maps
onto it tensor for tensor; `export_dflash` writes the folder, and `vllm-specdiff train --kind dflash`
trains such a drafter with the same data and budget as ours, so vLLM's dflash is measured as a peer.

The mask state: vLLM fills masked slots with `dflash_config.mask_token_id` and, when the folder has
`mask_embedding.pt`, replaces that token's embedding by the trained mask embedding. The id is one the
target never emits in running text (`choose_mask_token_id`); the anchor is embedded normally unless it
is that token.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from .conditioned import ConditionedConfig, ConditionedDenoiser


class DFlashExportError(ValueError):
    """A drafter that vLLM's DFlash model cannot represent."""


def dflash_compatible(config: ConditionedConfig) -> ConditionedConfig:
    """The config restricted to what vLLM's DFlash model computes."""
    return replace(config, anchor_feature=False, last_token_feature=False, fuse_scaling=False,
                   qk_norm=True)


def check_exportable(config: ConditionedConfig) -> None:
    extra = [name for name, on in (("anchor_feature", config.anchor_feature),
                                   ("last_token_feature", config.last_token_feature),
                                   ("fuse_scaling", config.fuse_scaling),
                                   ("qk_norm off", not config.qk_norm)) if on]
    if extra:
        raise DFlashExportError(
            f"vLLM's DFlash model has no {', '.join(extra)}: train the drafter with "
            "`vllm-specdiff train --kind dflash` (see models.dflash_format.dflash_compatible)")


def choose_mask_token_id(tokenizer) -> int:
    """A token running text never contains: the last added (special) token of the vocabulary that is
    not EOS/BOS/PAD or a listed special token (SmolLM2: 16, `<empty_output>`), else the last id."""
    reserved = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id,
                *getattr(tokenizer, "all_special_ids", [])}
    added = sorted(i for i in getattr(tokenizer, "added_tokens_decoder", {}) if i not in reserved)
    return int(added[-1]) if added else int(len(tokenizer) - 1)


def export_dflash(model: ConditionedDenoiser, directory: str | Path, mask_token_id: int,
                  dtype: torch.dtype = torch.float16, max_position_embeddings: int = 8192) -> Path:
    """Write config.json, model.safetensors and mask_embedding.pt for vLLM's `dflash` method."""
    from safetensors.torch import save_file

    config = model.config
    check_exportable(config)
    if not 0 <= mask_token_id < config.vocab_size:
        raise DFlashExportError(f"mask_token_id {mask_token_id} outside the vocabulary "
                                f"[0, {config.vocab_size})")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {"fc.weight": state["fc.weight"],
                                        "hidden_norm.weight": state["hidden_norm.weight"],
                                        "norm.weight": state["norm.weight"]}
    for i in range(config.num_layers):
        prefix = f"layers.{i}."
        for name, tensor in state.items():
            if name.startswith(prefix):
                tensors[name] = tensor
    draft_vocab = state["draft_vocab"].long()
    full = draft_vocab.numel() == config.vocab_size
    if not full:  # the draft rows of the target's head, and vLLM's offset map to target ids
        tensors["lm_head.weight"] = model.draft_head.detach().cpu()
        tensors["d2t"] = draft_vocab - torch.arange(draft_vocab.numel())
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"))
    torch.save({"mask_token_id": int(mask_token_id),
                "embedding": model.mask_embedding.detach().cpu().to(dtype)}, out / "mask_embedding.pt")
    hf_config = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": config.vocab_size,
        "draft_vocab_size": int(draft_vocab.numel()),
        "target_hidden_size": config.target_hidden_size,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "block_size": config.block_size,
        "num_target_layers": config.target_num_layers,
        "dflash_config": {"mask_token_id": int(mask_token_id),
                          "target_layer_ids": list(config.target_layer_ids)},
        "torch_dtype": str(dtype).removeprefix("torch."),
        "specdiff_export": {"tokenizer_fingerprint": config.tokenizer_fingerprint,
                            "target_name": config.target_name},
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return out
