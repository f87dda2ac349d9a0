"""SEDD training: the score-entropy loss, its fast path, a tiny training run, checkpoint round trip."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from vllm_specdiff import data, training
from vllm_specdiff.diffusion import rate_noise, total_noise
from vllm_specdiff.models.sedd import SEDD, SEDDConfig

TINY = SEDDConfig(tokens=63, hidden_size=32, cond_dim=16, length=32, n_blocks=1, n_heads=1)


def _tiny_model(seed: int = 0) -> SEDD:
    torch.manual_seed(seed)
    return SEDD(TINY)


def _stream(n: int = 4096, seed: int = 0) -> torch.Tensor:
    """A learnable toy language: runs of 8 consecutive tokens starting at 0..7 (tokens 0..14)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 8, (n // 8,), generator=gen)
    return (starts[:, None] + torch.arange(8)).reshape(-1)


def test_score_entropy_is_zero_at_the_true_score_and_positive_elsewhere():
    vocab = TINY.vocab_size
    sigma_bar = torch.tensor([0.01, 0.7, 3.0], dtype=torch.float64)
    x0 = torch.tensor([4, 0, 62])
    ratio = 1 / torch.expm1(sigma_bar)
    exact = torch.full((3, vocab), -1e4, dtype=torch.float64)
    exact[torch.arange(3), x0] = ratio.log()
    exact[:, -1] = 0.0
    assert torch.allclose(training.score_entropy(exact, x0, sigma_bar),
                          torch.zeros(3, dtype=torch.float64), atol=1e-9)
    off = exact.clone()
    off[torch.arange(3), x0] += 0.3
    assert (training.score_entropy(off, x0, sigma_bar) > 1e-3).all()


def test_score_entropy_matches_the_reference_formula():
    gen = torch.Generator().manual_seed(1)
    log_score = torch.randn(5, TINY.vocab_size, generator=gen, dtype=torch.float64) * 3
    x0 = torch.randint(0, TINY.tokens, (5,), generator=gen)
    sigma_bar = torch.rand(5, generator=gen, dtype=torch.float64) * 4
    ratio = 1 / (torch.exp(sigma_bar) - 1)
    expected = (log_score[:, :-1].exp().sum(-1) - ratio * log_score[torch.arange(5), x0]
                + ratio * (ratio.log() - 1))
    assert torch.allclose(training.score_entropy(log_score, x0, sigma_bar), expected)


def test_fast_masked_path_equals_the_full_forward_and_reference_loss():
    model = _tiny_model()
    for p in model.output_layer.parameters():  # non-zero head
        torch.nn.init.normal_(p, std=0.5)
    x0 = _stream()[: 4 * 32].view(4, 32)
    t = torch.tensor([0.05, 0.3, 0.6, 0.999])
    perturbed = training.perturb(x0, t, TINY.mask_token_id, torch.Generator().manual_seed(0))
    masked = perturbed == TINY.mask_token_id
    sigma_bar, dsigma = total_noise(t), rate_noise(t)
    with torch.no_grad():
        full = model(perturbed, sigma_bar)
        fast = training.masked_log_scores(model, perturbed, sigma_bar, masked)
        assert torch.allclose(fast, full[masked], atol=1e-5, rtol=1e-5)
        reference = training.dwdse_loss(full, x0, perturbed, sigma_bar, dsigma,
                                        TINY.mask_token_id).mean()
        batch = training.sedd_batch_loss(model, x0, torch.Generator().manual_seed(0), t)
    assert torch.allclose(batch, reference, rtol=1e-5)


def test_initial_loss_equals_the_uniform_score_bound():
    """With the reference (zero) init every score is uniform: the loss is finite and positive."""
    model = _tiny_model()
    training.init_sedd_weights(model)
    x0 = _stream()[: 8 * 32].view(8, 32)
    loss = training.sedd_batch_loss(model, x0, torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_loss_decreases_on_a_tiny_config():
    torch.manual_seed(0)
    model = SEDD(TINY)
    training.init_sedd_weights(model)
    stream = _stream()
    windows = data.fixed_windows(stream, 32, 16)
    before = training.evaluate_sedd(model, windows, num_t=4)["nats_per_token"]
    batches = data.random_windows(stream, 32, 8, torch.Generator().manual_seed(0))
    cfg = training.TrainConfig(steps=30, batch_size=8, seq_len=32, lr=1e-2, warmup=5, eval_every=10**9,
                               checkpoint_every=10**9)
    result, _ = training._train_loop(model, lambda x, g: training.sedd_batch_loss(model, x, g),
                                     batches, cfg, "test")
    after = training.evaluate_sedd(model, windows, num_t=4)["nats_per_token"]
    assert result.steps == 30
    assert after < 0.75 * before, (before, after)


class _TinyTokenizer:
    def __init__(self, n: int) -> None:
        self.n = n
        self.eos_token_id = n - 1

    def __len__(self) -> int:
        return self.n

    def save_pretrained(self, directory: str) -> None:
        pass


@pytest.mark.parametrize("export_dtype", [torch.float32, torch.float16])
def test_trained_checkpoint_reloads_with_identical_outputs(tmp_path, export_dtype):
    stream = _stream()
    cfg = training.TrainConfig(steps=6, batch_size=4, seq_len=32, warmup=2, eval_every=3,
                               checkpoint_every=3, eval_windows=4, ema=0.5)
    result, exported = training.train_sedd(TINY, _TinyTokenizer(TINY.tokens), cfg, tmp_path / "out",
                                           tmp_path / "work", stream, data.fixed_windows(stream, 32, 4),
                                           export_dtype=export_dtype)
    assert result.steps == 6 and len(result.evals) == 2
    assert exported.vocab_embed.embedding.dtype == export_dtype
    reloaded = SEDD.from_pretrained(tmp_path / "out", dtype=export_dtype)
    indices = stream[:64].view(2, 32).clone()
    indices[:, 20:] = TINY.mask_token_id
    sigma_bar = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        assert torch.equal(reloaded(indices, sigma_bar), exported(indices, sigma_bar))
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["tokens"] == TINY.tokens and raw["model"]["n_blocks"] == 1
    assert raw["training"]["steps"] == 6
    assert (tmp_path / "work" / "checkpoint-latest" / "model.safetensors").exists()
    assert json.loads((tmp_path / "out" / "training.json").read_text())["result"]["steps"] == 6


def test_perturb_masks_at_the_schedule_rate():
    x0 = torch.zeros(4, 20000, dtype=torch.long)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    masked = training.perturb(x0, t, 99, torch.Generator().manual_seed(0)) == 99
    rate = masked.float().mean(-1)
    assert torch.allclose(rate, (1 - 1e-3) * t, atol=0.015)


def test_sample_times_are_in_range_and_stratified():
    t = training.sample_times(16, torch.Generator().manual_seed(0))
    assert t.min() >= training.TRAIN_T_EPS and t.max() <= 1
    assert torch.equal(torch.sort(torch.floor(t * 16)).values.long().clamp(max=15), torch.arange(16))


def test_suffix_perturb_keeps_the_prefix_clean():
    x0 = torch.zeros(3, 40, dtype=torch.long)
    t = torch.tensor([1.0, 1.0, 0.5])
    suffix = torch.tensor([1, 16, 40])
    out = training.suffix_perturb(x0, t, suffix, 99, torch.Generator().manual_seed(0))
    for row, k in enumerate(suffix.tolist()):
        assert (out[row, : 40 - k] == 0).all()
    assert (out[0, -1:] == 99).all() and (out[1, -16:] == 99).all()  # p = 0.999
    assert 5 < int((out[2] == 99).sum()) < 35


def test_head_subsampling_is_exact_when_every_position_fits():
    model = _tiny_model()
    for p in model.output_layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x0 = _stream()[: 4 * 32].view(4, 32)
    with torch.no_grad():
        full = training.sedd_batch_loss(model, x0, torch.Generator().manual_seed(0), suffix_fraction=0.5)
        same = training.sedd_batch_loss(model, x0, torch.Generator().manual_seed(0), suffix_fraction=0.5,
                                        max_head_positions=4 * 32)
        sub = training.sedd_batch_loss(model, x0, torch.Generator().manual_seed(0), suffix_fraction=0.5,
                                       max_head_positions=8)
    assert torch.equal(full, same)
    assert math.isfinite(sub.item()) and sub.item() > 0


def test_ar_loss_matches_transformers_and_subsamples():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=1,
                                         num_key_value_heads=1, tie_word_embeddings=True))
    x = _stream()[:64].view(2, 32)
    with torch.no_grad():
        assert torch.allclose(training.ar_batch_loss(model, x), model(input_ids=x, labels=x).loss)
        assert math.isfinite(training.ar_batch_loss(model, x, torch.Generator().manual_seed(0), 8).item())


def test_target_init_starts_from_the_unigram_and_target_embeddings(tmp_path):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    save_file({"model.embed_tokens.weight": torch.randn(TINY.tokens, 48, generator=gen)},
              str(tmp_path / "model.safetensors"))
    stream = _stream()
    model = _tiny_model()
    training.init_sedd_weights(model)
    training.init_sedd_from_target(model, tmp_path, stream)
    log_p = training.unigram_log_probs(stream, TINY.tokens)
    assert torch.allclose(log_p.exp().sum(), torch.tensor(1.0))
    indices = torch.full((1, 32), TINY.mask_token_id)
    with torch.no_grad():
        raw = model(indices, torch.tensor([3.0]))[0, :, :-1]
    # Fully masked input: the prediction is the corpus unigram (the blocks start as the identity).
    log_q = torch.log_softmax(raw, -1)
    assert (log_q - log_p[None]).abs().max() < 0.5  # up to the small random output weights
    assert log_p.argmax() == 7  # token 7 is in every run
    projection = training.target_embedding_projection(tmp_path, TINY.hidden_size, 0.02)
    assert projection.shape == (TINY.tokens, TINY.hidden_size)
    assert abs(projection.std().item() - 0.02) < 1e-4


def test_dropout_from_the_config_acts_in_training_only(tmp_path):
    """config model.dropout (the published models: 0.1) perturbs the training forward only; the
    evaluation and the exported drafter run in eval mode; the export keeps the config's value."""
    config = dataclasses.replace(TINY, dropout=0.3)
    torch.manual_seed(0)
    model = SEDD(config)  # default init: non-zero residual branches
    x0 = _stream()[: 4 * 32].view(4, 32)

    def loss() -> float:
        return training.sedd_batch_loss(model, x0, torch.Generator().manual_seed(0)).item()

    model.train()
    assert loss() != loss()
    model.eval()
    assert loss() == loss()
    modes = []  # (training, dropout) of every forward of the first block during train_sedd
    model.blocks[0].register_forward_hook(lambda m, _i, _o: modes.append((m.training, m.dropout)))
    stream = _stream()
    cfg = training.TrainConfig(steps=2, batch_size=4, seq_len=32, warmup=1, eval_every=10**9,
                               checkpoint_every=10**9, eval_windows=4)
    _, exported = training.train_sedd(model, _TinyTokenizer(TINY.tokens), cfg, tmp_path / "out",
                                      tmp_path / "work", stream, data.fixed_windows(stream, 32, 4),
                                      export_dtype=torch.float32)
    assert modes[:2] == [(True, 0.3)] * 2  # the two training steps
    assert set(modes[2:]) == {(False, 0.3)}  # the evaluation
    assert not exported.training
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model"]["dropout"] == 0.3
    assert SEDD.from_pretrained(tmp_path / "out").config.dropout == 0.3
