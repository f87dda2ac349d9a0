"""The DFlash-format export (the `dflash` peer our trainer produces for vLLM's own method): tensor
names and shapes vLLM's DFlashDraftModel loads, the draft-vocabulary map, the mask embedding, and a
clear refusal of drafters vLLM cannot represent."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_specdiff.models.conditioned import ConditionedConfig, ConditionedDenoiser, init_weights
from vllm_specdiff.models.dflash_format import (DFlashExportError, choose_mask_token_id,
                                                dflash_compatible, export_dflash)


def tiny(draft_vocab: list[int] | None, **flags) -> ConditionedDenoiser:
    config = ConditionedConfig(vocab_size=10, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                               head_dim=8, intermediate_size=24, block_size=5,
                               target_layer_ids=(0, 2, 3), target_num_layers=5, target_hidden_size=12,
                               rope_theta=5e4, draft_vocab_size=len(draft_vocab) if draft_vocab else None,
                               **flags)
    model = ConditionedDenoiser(config)
    init_weights(model, std=0.3)
    if draft_vocab:
        model.draft_vocab = torch.tensor(draft_vocab)
    gen = torch.Generator().manual_seed(0)
    model.attach_target(torch.randn(10, 16, generator=gen), torch.randn(10, 16, generator=gen))
    return model


def test_export_writes_what_vllms_dflash_model_loads(tmp_path):
    base = tiny([1, 4, 5, 9]).config
    model = tiny([1, 4, 5, 9], **{k: getattr(dflash_compatible(base), k) for k in
                                  ("anchor_feature", "last_token_feature", "fuse_scaling", "qk_norm")})
    out = export_dflash(model, tmp_path / "peer", mask_token_id=7, dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["dflash_config"] == {"mask_token_id": 7, "target_layer_ids": [0, 2, 3]}
    assert (config["num_hidden_layers"], config["head_dim"], config["draft_vocab_size"]) == (2, 8, 4)
    assert config["target_hidden_size"] == 12 and config["rope_theta"] == 5e4
    tensors = load_file(str(out / "model.safetensors"))
    per_layer = {"self_attn.q_proj.weight": (16, 16), "self_attn.k_proj.weight": (8, 16),
                 "self_attn.v_proj.weight": (8, 16), "self_attn.o_proj.weight": (16, 16),
                 "self_attn.q_norm.weight": (8,), "self_attn.k_norm.weight": (8,),
                 "mlp.gate_proj.weight": (24, 16), "mlp.up_proj.weight": (24, 16),
                 "mlp.down_proj.weight": (16, 24), "input_layernorm.weight": (16,),
                 "post_attention_layernorm.weight": (16,)}
    expected = {f"layers.{i}.{name}": shape for i in range(2) for name, shape in per_layer.items()}
    expected.update({"fc.weight": (16, 36), "hidden_norm.weight": (16,), "norm.weight": (16,),
                     "lm_head.weight": (4, 16), "d2t": (4,)})
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    # vLLM maps draft id i to target id i + d2t[i]; lm_head rows are the target head's rows.
    assert (torch.arange(4) + tensors["d2t"]).tolist() == [1, 4, 5, 9]
    assert torch.equal(tensors["lm_head.weight"], model.head_weight[[1, 4, 5, 9]])
    assert torch.equal(tensors["fc.weight"], model.fc.weight.detach())
    mask = torch.load(out / "mask_embedding.pt")
    assert mask["mask_token_id"] == 7 and torch.equal(mask["embedding"], model.mask_embedding.detach())


def test_full_vocabulary_export_shares_the_targets_head(tmp_path):
    flags = {"anchor_feature": False, "fuse_scaling": False, "qk_norm": True}
    tensors = load_file(str(export_dflash(tiny(None, **flags), tmp_path / "p", 7) / "model.safetensors"))
    assert "lm_head.weight" not in tensors and "d2t" not in tensors


def test_export_refuses_what_vllm_cannot_compute(tmp_path):
    with pytest.raises(DFlashExportError, match="anchor_feature.*--kind dflash"):
        export_dflash(tiny(None), tmp_path / "p", 7)
    flags = {"anchor_feature": False, "fuse_scaling": False, "qk_norm": True}
    with pytest.raises(DFlashExportError, match="mask_token_id 10 outside"):
        export_dflash(tiny(None, **flags), tmp_path / "p", 10)


def test_mask_token_is_a_token_running_text_never_has():
    class Tok:
        eos_token_id, bos_token_id, pad_token_id = 2, 1, 2
        all_special_ids = [0, 1, 2]
        added_tokens_decoder = {i: None for i in range(17)}

        def __len__(self):
            return 100
    assert choose_mask_token_id(Tok()) == 16
    Tok.added_tokens_decoder = {}
    assert choose_mask_token_id(Tok()) == 99
