"""SEDD model and the published checkpoint format."""
from __future__ import annotations

import json
import math

import pytest
import torch

from vllm_specdiff import SEDD, SEDDConfig
from vllm_specdiff.models.sedd_checkpoint import CheckpointError, check_state_dict, config_from_dict
from vllm_specdiff.diffusion import log_expm1, total_noise

# The config.json of louaaron/sedd-small: the whole training config, nested.
PUBLISHED_SMALL_CONFIG = {
    "ngpus": 8, "tokens": 50257,
    "training": {"batch_size": 512, "accum": 1, "n_iters": 1300001, "snapshot_freq": 50000,
                 "log_freq": 50, "eval_freq": 100, "snapshot_freq_for_preemption": 10000,
                 "weight": "standard", "snapshot_sampling": True, "ema": 0.9999},
    "data": {"train": "openwebtext", "valid": "wikitext103", "cache_dir": "data"},
    "graph": {"type": "absorb", "file": "data", "report_all": False},
    "noise": {"type": "loglinear", "sigma_min": 0.0001, "sigma_max": 20},
    "sampling": {"predictor": "euler", "steps": 128, "noise_removal": True},
    "eval": {"batch_size": 512, "perplexity": True, "perplexity_batch_size": 32},
    "optim": {"weight_decay": 0, "optimizer": "AdamW", "lr": 0.0003, "beta1": 0.9, "beta2": 0.999,
              "eps": 1e-08, "warmup": 2500, "grad_clip": 1.0},
    "model": {"name": "small", "type": "ddit", "hidden_size": 768, "cond_dim": 128, "length": 1024,
              "n_blocks": 12, "n_heads": 12, "scale_by_sigma": True, "dropout": 0.1},
    "work_dir": "exp_local/openwebtext/2023.12.06/000000",
}


def published_shapes(hidden: int, cond: int, n_blocks: int, n_heads: int, vocab: int = 50258):
    """The published state-dict table (shared/docs/sedd.md), written out independently of models/sedd.py."""
    shapes = {
        "vocab_embed.embedding": (vocab, hidden),
        "sigma_map.mlp.0.weight": (cond, 256), "sigma_map.mlp.0.bias": (cond,),
        "sigma_map.mlp.2.weight": (cond, cond), "sigma_map.mlp.2.bias": (cond,),
        "rotary_emb.inv_freq": (hidden // n_heads // 2,),
        "output_layer.norm_final.weight": (hidden,),
        "output_layer.linear.weight": (vocab, hidden), "output_layer.linear.bias": (vocab,),
        "output_layer.adaLN_modulation.weight": (2 * hidden, cond),
        "output_layer.adaLN_modulation.bias": (2 * hidden,),
    }
    for i in range(n_blocks):
        shapes.update({
            f"blocks.{i}.norm1.weight": (hidden,), f"blocks.{i}.attn_qkv.weight": (3 * hidden, hidden),
            f"blocks.{i}.attn_out.weight": (hidden, hidden), f"blocks.{i}.norm2.weight": (hidden,),
            f"blocks.{i}.mlp.0.weight": (4 * hidden, hidden), f"blocks.{i}.mlp.0.bias": (4 * hidden,),
            f"blocks.{i}.mlp.2.weight": (hidden, 4 * hidden), f"blocks.{i}.mlp.2.bias": (hidden,),
            f"blocks.{i}.adaLN_modulation.weight": (6 * hidden, cond),
            f"blocks.{i}.adaLN_modulation.bias": (6 * hidden,),
        })
    return shapes


def small_variant_config(**overrides) -> dict:
    raw = json.loads(json.dumps(PUBLISHED_SMALL_CONFIG))
    raw["tokens"] = overrides.pop("tokens", 50)
    raw["model"].update({"hidden_size": 64, "cond_dim": 32, "length": 64, "n_blocks": 2,
                         "n_heads": 2, **overrides})
    return raw


def write_checkpoint(folder, raw_config: dict, seed: int = 0) -> SEDD:
    torch.manual_seed(seed)
    model = SEDD(config_from_dict(raw_config))
    for param in model.parameters():  # the reference zero-inits adaLN; make every path non-trivial
        torch.nn.init.normal_(param, std=0.2)
    model.raw_config = raw_config
    model.save_pretrained(folder)
    return model


def test_published_small_shapes_on_meta_device():
    config = config_from_dict(PUBLISHED_SMALL_CONFIG)
    assert (config.tokens, config.vocab_size, config.mask_token_id) == (50257, 50258, 50257)
    with torch.device("meta"):
        model = SEDD(config)
    expected = published_shapes(768, 128, 12, 12)
    assert len(expected) == 131
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    check_state_dict(model, {k: torch.empty(s, device="meta") for k, s in expected.items()})
    num_params = sum(math.prod(s) for s in expected.values())
    assert abs(num_params / 1e6 - 169.6) < 0.1


def test_medium_config_shapes_on_meta_device():
    raw = json.loads(json.dumps(PUBLISHED_SMALL_CONFIG))
    raw["model"].update({"name": "medium", "hidden_size": 1024, "n_blocks": 24, "n_heads": 16})
    with torch.device("meta"):
        model = SEDD(config_from_dict(raw))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == published_shapes(1024, 128, 24, 16)


def test_small_variant_loads_strictly_and_round_trips(tmp_path):
    raw = small_variant_config()
    original = write_checkpoint(tmp_path / "a", raw)
    loaded = SEDD.from_pretrained(tmp_path / "a")
    assert loaded.raw_config == raw  # unknown keys survive, ignored by the model
    indices = torch.randint(0, 51, (2, 16))
    sigma_bar = torch.tensor([0.3, 2.0])
    assert torch.equal(original.eval()(indices, sigma_bar), loaded(indices, sigma_bar))
    loaded.save_pretrained(tmp_path / "b")
    again = SEDD.from_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == raw
    for (name, a), (_, b) in zip(loaded.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_pytorch_model_bin_is_read(tmp_path):
    raw = small_variant_config()
    model = write_checkpoint(tmp_path, raw)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = SEDD.from_pretrained(tmp_path)
    assert torch.equal(loaded.output_layer.linear.weight, model.output_layer.linear.weight)


def test_bf16_forward_close_to_fp32(tmp_path):
    write_checkpoint(tmp_path, small_variant_config())
    fp32 = SEDD.from_pretrained(tmp_path)
    bf16 = SEDD.from_pretrained(tmp_path, dtype=torch.bfloat16)
    indices = torch.randint(0, 51, (2, 16))
    sigma_bar = torch.tensor([0.5, 1.5])
    out32, out16 = fp32(indices, sigma_bar), bf16(indices, sigma_bar).float()
    assert out16.dtype == torch.float32 and torch.isfinite(out16).all()
    assert torch.allclose(torch.softmax(out32, -1), torch.softmax(out16, -1), atol=0.05)


def test_strict_loading_names_missing_unexpected_and_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    write_checkpoint(tmp_path, small_variant_config())
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["blocks.1.norm2.weight"]
    state["module.extra"] = torch.zeros(1)
    state["output_layer.linear.bias"] = torch.zeros(7)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        SEDD.from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing keys (1): blocks.1.norm2.weight" in message
    assert "unexpected keys (1): module.extra" in message
    assert "output_layer.linear.bias: checkpoint (7,) vs model (51,)" in message


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        SEDD.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        SEDD.from_pretrained(tmp_path / "empty")
    write_checkpoint(tmp_path / "ok", small_variant_config())
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        SEDD.from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights are missing"):
        SEDD.from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SEDD.from_pretrained(tmp_path / "ok")


def test_hub_id_offline_says_pass_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="could not fetch SEDD checkpoint 'louaaron/sedd-small'"
                                              ".*pass the local folder"):
        SEDD.from_pretrained("sedd-small")


def test_non_absorbing_graph_rejected():
    raw = small_variant_config()
    raw["graph"]["type"] = "uniform"
    with pytest.raises(CheckpointError, match="only 'absorb'"):
        config_from_dict(raw)


def test_scale_by_sigma_offset_and_current_token_zero():
    torch.manual_seed(0)
    config = SEDDConfig(tokens=20, hidden_size=64, cond_dim=32, length=32, n_blocks=1, n_heads=2)
    scaled = SEDD(config).eval()
    for param in scaled.parameters():
        torch.nn.init.normal_(param, std=0.2)
    unscaled = SEDD(SEDDConfig(**{**config.__dict__, "scale_by_sigma": False})).eval()
    unscaled.load_state_dict(scaled.state_dict())
    indices = torch.randint(0, 21, (3, 10))
    sigma_bar = total_noise(torch.tensor([0.9, 0.3, 1e-3]))  # 0.3 / 1e-3 hit the expm1 branch
    out, raw = scaled(indices, sigma_bar), unscaled(indices, sigma_bar)
    current = torch.nn.functional.one_hot(indices, 21).bool()
    assert torch.all(out[current] == 0) and torch.all(raw[current] == 0)
    expected_offset = torch.log(torch.exp(sigma_bar.double()) - 1) + math.log(20)  # V - 1 = tokens
    offset = (raw - out)[~current].view(3, -1)
    assert torch.allclose(offset.double(), expected_offset[:, None].expand_as(offset), atol=1e-4)
    assert torch.allclose(log_expm1(torch.tensor([1e-4, 0.49, 0.51, 30.0], dtype=torch.float64)),
                          torch.log(torch.expm1(torch.tensor([1e-4, 0.49, 0.51, 30.0], dtype=torch.float64))))


def test_output_positions_equal_full_output():
    torch.manual_seed(0)
    model = SEDD(SEDDConfig(tokens=20, hidden_size=64, cond_dim=32, length=32, n_blocks=2, n_heads=2)).eval()
    indices = torch.randint(0, 21, (2, 12))
    sigma_bar = torch.tensor([0.7, 1.1])
    positions = torch.tensor([[3, 4, 11], [0, 5, 6]])
    full = model(indices, sigma_bar)
    part = model(indices, sigma_bar, output_positions=positions)
    assert torch.allclose(part, torch.gather(full, 1, positions[..., None].expand(-1, -1, 21)), atol=1e-5)


def test_padding_mask_makes_ragged_rows_match_alone():
    torch.manual_seed(0)
    model = SEDD(SEDDConfig(tokens=20, hidden_size=64, cond_dim=32, length=32, n_blocks=2, n_heads=2)).eval()
    short = torch.randint(0, 21, (1, 5))
    padded = torch.cat([short, torch.full((1, 4), 20)], dim=1)
    mask = torch.arange(9)[None] < 5
    alone = model(short, torch.tensor([0.5]))
    batched = model(padded, torch.tensor([0.5]), attention_mask=mask)[:, :5]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="n_heads"):
        SEDDConfig(tokens=10, hidden_size=60, n_heads=8)


# ---- published-checkpoint fidelity: rotary buffer, precision recipe, dropout config (issue 15)

def _rewrite_weights(folder, **replace) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    for key, value in replace.items():
        if value is None:
            del state[key.replace("__", ".")]
        else:
            state[key.replace("__", ".")] = value
    save_file(state, str(folder / "model.safetensors"))


def test_checkpoint_inv_freq_is_used_and_a_non_standard_one_is_reported(tmp_path):
    raw = small_variant_config()
    write_checkpoint(tmp_path, raw)
    standard = SEDD.from_pretrained(tmp_path)
    head_dim = standard.config.head_dim
    formula = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    assert torch.equal(standard.rotary_emb.inv_freq, formula)
    other = 1.0 / (500000 ** (torch.arange(0, head_dim, 2).float() / head_dim))  # a Llama-3-like base
    _rewrite_weights(tmp_path, rotary_emb__inv_freq=other)
    with pytest.warns(UserWarning, match=r"rotary_emb.inv_freq is not the standard rotary formula "
                                         r"1/10000\^\(2i/32\).*checkpoint .* vs formula .*Using the "
                                         r"checkpoint's values"):
        loaded = SEDD.from_pretrained(tmp_path)
    assert torch.equal(loaded.rotary_emb.inv_freq, other)
    # The forward rotates with the buffer (no recomputation from the formula).
    indices = torch.randint(0, 51, (2, 40))
    sigma_bar = torch.tensor([0.5, 1.5])
    out = loaded(indices, sigma_bar)
    assert not torch.allclose(out, standard(indices, sigma_bar), atol=1e-3)
    standard.rotary_emb.inv_freq = other.clone()  # the same weights, the same buffer
    assert torch.equal(out, standard(indices, sigma_bar))


def test_inv_freq_stays_float32_missing_and_lower_precision_standard_buffers(tmp_path, recwarn):
    write_checkpoint(tmp_path, small_variant_config())
    reference = SEDD.from_pretrained(tmp_path)
    standard = reference.rotary_emb.inv_freq.clone()
    # Our fp16 exports store the standard frequencies rounded to fp16: the fp32 ones come back.
    _rewrite_weights(tmp_path, rotary_emb__inv_freq=standard.half())
    assert torch.equal(SEDD.from_pretrained(tmp_path).rotary_emb.inv_freq, standard)
    # Absent: the standard frequencies (it is the only key that may be missing).
    _rewrite_weights(tmp_path, rotary_emb__inv_freq=None)
    loaded = SEDD.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert not [w for w in recwarn if "inv_freq" in str(w.message)]
    # Casting the model keeps the frequencies in float32, unrounded, on the model's device.
    assert loaded.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.rotary_emb.inv_freq, standard)
    assert torch.equal(loaded.double().half().rotary_emb.inv_freq, standard)
    assert torch.equal(SEDD(reference.config).to(torch.bfloat16).rotary_emb.inv_freq, standard)
    _rewrite_weights(tmp_path, rotary_emb__inv_freq=torch.full_like(standard, float("nan")))
    with pytest.raises(CheckpointError, match="inv_freq holds non-finite"):
        SEDD.from_pretrained(tmp_path)


def test_bf16_autocast_follows_the_reference_recipe():
    """fp32 weights under bf16 autocast: the condition (sigma embedding + timestep MLP), LayerNorm
    and the residual stream stay fp32, the block and output-layer matmuls run in bf16."""
    torch.manual_seed(0)
    model = SEDD(SEDDConfig(tokens=20, hidden_size=64, cond_dim=32, length=32, n_blocks=2, n_heads=2)).eval()
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.2)
    seen: dict[str, torch.Tensor] = {}
    watched = {"sigma_map": model.sigma_map, "norm1": model.blocks[0].norm1,
               "attn_qkv": model.blocks[0].attn_qkv, "mlp": model.blocks[1].mlp,
               "adaLN": model.blocks[0].adaLN_modulation, "block": model.blocks[1],
               "norm_final": model.output_layer.norm_final, "linear": model.output_layer.linear}
    for name, module in watched.items():
        module.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
    indices = torch.randint(0, 21, (2, 12))
    sigma_bar = torch.tensor([0.7, 2.0])
    full = model(indices, sigma_bar)
    condition = seen["sigma_map"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(indices, sigma_bar)
    assert torch.equal(seen["sigma_map"], condition)  # bit-identical: computed outside autocast
    assert {name: seen[name].dtype for name in watched} == {
        "sigma_map": torch.float32, "norm1": torch.float32, "attn_qkv": torch.bfloat16,
        "mlp": torch.bfloat16, "adaLN": torch.bfloat16, "block": torch.float32,
        "norm_final": torch.float32, "linear": torch.bfloat16}
    assert mixed.dtype == torch.bfloat16  # the reference's log-scores are bf16 too
    assert not torch.equal(mixed.float(), full)
    assert torch.allclose(torch.softmax(mixed.float(), -1), torch.softmax(full, -1), atol=0.05)


def test_dropout_is_read_from_the_config_and_validated():
    assert config_from_dict(PUBLISHED_SMALL_CONFIG).dropout == 0.1
    raw = small_variant_config()
    del raw["model"]["dropout"]
    assert config_from_dict(raw).dropout == 0.0
    from vllm_specdiff.models.sedd_checkpoint import config_to_dict

    config = config_from_dict(small_variant_config(dropout=0.25))
    assert config_from_dict(config_to_dict(config)).dropout == 0.25
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0 \(config model.dropout\)"):
        SEDDConfig(tokens=10, hidden_size=64, n_heads=2, dropout=1.0)


def test_dropout_acts_in_train_mode_only():
    torch.manual_seed(0)
    config = SEDDConfig(tokens=20, hidden_size=64, cond_dim=32, length=32, n_blocks=2, n_heads=2, dropout=0.1)
    model = SEDD(config)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.2)
    no_dropout = SEDD(SEDDConfig(**{**config.__dict__, "dropout": 0.0})).eval()
    no_dropout.load_state_dict(model.state_dict())
    indices = torch.randint(0, 21, (2, 12))
    sigma_bar = torch.tensor([0.7, 2.0])
    model.train()
    first, second = model(indices, sigma_bar), model(indices, sigma_bar)
    assert not torch.allclose(first, second)
    model.eval()
    assert torch.equal(model(indices, sigma_bar), model(indices, sigma_bar))
    assert torch.equal(model(indices, sigma_bar), no_dropout(indices, sigma_bar))
