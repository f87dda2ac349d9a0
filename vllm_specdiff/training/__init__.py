"""Training drafters for a target: SEDD (score entropy) and a small autoregressive baseline.

- `score_entropy` / `dwdse_loss`: the diffusion-weighted denoising score entropy of SEDD for the
  absorbing graph and the log-linear noise schedule (Lou, Meng, Ermon, ICML 2024, Eq. 9-10 and the
  reference `losses.py` / `graph_lib.Absorbing.score_entropy`).
- `train_sedd`: from scratch or fine-tuning a published-format checkpoint; AdamW, linear warmup,
  cosine decay, gradient clipping, optional EMA, periodic checkpoints via `SEDD.save_pretrained`.
- `train_ar`: the same data pipeline trains a small Llama drafter (the baseline for vLLM's
  draft_model speculator) saved as an ordinary Hugging Face folder.
- `generate_distillation_docs`: training text sampled from the target with vLLM offline generation
  (prompts from the training split only), cached to a JSON-lines file and mixed with the corpus.
- `add_train_args` / `run_train`: the `vllm-specdiff train ...` command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from vllm_specdiff import data as data_lib
from vllm_specdiff.diffusion import (log_expm1, mask_probability, rate_noise, scale_by_sigma,
                                     total_noise)

# The reference trainer samples t ~ U(SAMPLING_EPS_T, 1): sigma_bar(t) stays away from 0.
TRAIN_T_EPS = 1e-3


# --------------------------------------------------------------------------- score entropy

def score_entropy(log_score: torch.Tensor, x0: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
    """Score entropy at MASKED positions of the absorbing graph (no time weighting).

    For a position whose perturbed token is the mask and whose clean token is x0, with s = log_score,
    r = 1 / (e^sigma_bar - 1) (the true ratio p_t(x0) / p_t(mask) for the log-linear absorbing
    process) and K(a) = a (log a - 1):

        entropy = sum_{y != mask} exp(s_y) - r * s_{x0} + K(r)          (>= 0, = 0 iff exact)

    which is the reference `Absorbing.score_entropy` (pos_term - neg_term + const).

    log_score: [num, vocab_with_mask] (mask = last column, scale_by_sigma applied);
    x0: [num] int64 clean tokens; sigma_bar: [num] total noise. Returns [num].
    """
    sigma_bar = sigma_bar.to(log_score.dtype)
    # expm1 is exact for small sigma_bar; exp - 1 is as good above 0.5 (reference switch point).
    esigm1 = torch.where(sigma_bar < 0.5, torch.expm1(sigma_bar), torch.exp(sigma_bar) - 1)
    ratio = 1.0 / esigm1  # [num]
    neg_term = ratio * torch.gather(log_score, -1, x0[:, None]).squeeze(-1)
    # logsumexp then exp: the same value as exp(.).sum(), without overflow for confident scores.
    pos_term = torch.logsumexp(log_score[:, :-1], dim=-1).exp()
    const = ratio * (ratio.log() - 1)
    return pos_term - neg_term + const


def dwdse_loss(log_score: torch.Tensor, x0: torch.Tensor, perturbed: torch.Tensor,
               sigma_bar: torch.Tensor, dsigma: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Per-sequence DWDSE loss: sum over masked positions of sigma(t) * score_entropy.

    Reference form: entropy [B, L] is 0 at unmasked positions; loss = (dsigma[:, None] * entropy).sum(-1).
    With t ~ U(0, 1) its expectation bounds -log p(x0) in nats (Lou et al. 2024, Thm. 3.6).

    log_score: [batch, length, vocab_with_mask]; x0, perturbed: [batch, length] int64;
    sigma_bar, dsigma: [batch]. Returns [batch].
    """
    masked = perturbed == mask_token_id  # [batch, length]
    rows = torch.arange(x0.shape[0], device=x0.device)[:, None].expand_as(x0)[masked]
    entropy = torch.zeros(x0.shape, dtype=log_score.dtype, device=log_score.device)
    entropy[masked] = score_entropy(log_score[masked], x0[masked], sigma_bar[rows])
    return (dsigma[:, None].to(entropy.dtype) * entropy).sum(-1)


def perturb(x0: torch.Tensor, t: torch.Tensor, mask_token_id: int,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Forward absorbing process: each token becomes the mask with probability (1 - eps) t.

    x0: [batch, length]; t: [batch]. Returns the perturbed indices [batch, length].
    """
    uniform = torch.rand(x0.shape, generator=generator, device=x0.device)
    move = uniform < mask_probability(t)[:, None]
    return torch.where(move, torch.full_like(x0, mask_token_id), x0)


def sample_times(batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """t in [TRAIN_T_EPS, 1], stratified over the batch: each t_i is still marginally uniform,
    the batch covers the interval evenly (lower-variance loss than i.i.d. draws). Returns [batch]."""
    u = (torch.arange(batch_size, device=device) + torch.rand(batch_size, generator=generator,
                                                               device=device)) / batch_size
    u = u[torch.randperm(batch_size, generator=generator, device=device)]
    return (1 - TRAIN_T_EPS) * u + TRAIN_T_EPS


def _head_inputs(model, perturbed: torch.Tensor, sigma_bar: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """The modulated final hidden states at positions (rows, cols), ready for output_layer.linear.

    The model's own trunk, then the final layer up to its vocabulary projection (a test checks
    equality with SEDD.forward); the head is position-wise, so running it only where the loss
    needs it is exact. Returns [num, hidden].
    """
    from vllm_specdiff.models.sedd import _modulate

    x, cond = model.trunk(perturbed, sigma_bar)  # [batch, length, hidden], [batch, cond_dim]
    head = model.output_layer
    shift, scale = head.adaLN_modulation(cond).chunk(2, dim=-1)  # [batch, hidden] each
    return _modulate(head.norm_final(x[rows, cols]), shift[rows], scale[rows])


def masked_log_scores(model, perturbed: torch.Tensor, sigma_bar: torch.Tensor,
                      masked: torch.Tensor) -> torch.Tensor:
    """model(perturbed, sigma_bar)[masked], running the vocabulary head at masked positions only.

    Returns [num_masked, vocab_with_mask] (row-major order of `masked`).
    """
    rows, cols = masked.nonzero(as_tuple=True)
    raw = model.output_layer.linear(_head_inputs(model, perturbed, sigma_bar, rows, cols))
    if model.config.scale_by_sigma:
        raw = scale_by_sigma(raw[:, None], sigma_bar[rows])[:, 0]
    # The current token is the mask: its entry is 0 in SEDD.forward.
    return torch.cat([raw[:, :-1], torch.zeros_like(raw[:, -1:])], dim=-1)


def _token_score_entropy(raw_tokens: torch.Tensor, offset: torch.Tensor, x0: torch.Tensor,
                         sigma_bar: torch.Tensor) -> torch.Tensor:
    """score_entropy with log_score[:, :-1] = raw_tokens - offset[:, None], never materialising
    the shifted [num, tokens] tensor (the training hot spot). raw_tokens: [num, tokens]."""
    esigm1 = torch.where(sigma_bar < 0.5, torch.expm1(sigma_bar), torch.exp(sigma_bar) - 1)
    ratio = 1.0 / esigm1
    neg_term = ratio * (torch.gather(raw_tokens, -1, x0[:, None]).squeeze(-1) - offset)
    pos_term = torch.exp(torch.logsumexp(raw_tokens, dim=-1) - offset)
    return pos_term - neg_term + ratio * (ratio.log() - 1)


def suffix_perturb(x0: torch.Tensor, t: torch.Tensor, suffix_len: torch.Tensor, mask_token_id: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Drafting-shaped perturbation: the prefix stays clean, each of the last suffix_len[i]
    positions of row i is masked with probability (1 - eps) t[i].

    This is the state a prefix-conditioned drafter is in at every sampling step (clean context,
    partly masked draft block). The optimal score at a masked position is the same as under the
    uniform process, r(sigma_bar) * p(x_i | visible tokens), so the score-entropy target is unchanged.
    x0: [batch, length]; t, suffix_len: [batch]. Returns [batch, length].
    """
    length = x0.shape[1]
    in_suffix = torch.arange(length, device=x0.device)[None] >= (length - suffix_len)[:, None]
    uniform = torch.rand(x0.shape, generator=generator, device=x0.device)
    move = in_suffix & (uniform < mask_probability(t)[:, None])
    return torch.where(move, torch.full_like(x0, mask_token_id), x0)


def sedd_batch_loss(model, x0: torch.Tensor, generator: torch.Generator | None = None,
                    t: torch.Tensor | None = None, suffix_fraction: float = 0.0,
                    suffix_max: int = 16, max_head_positions: int | None = None) -> torch.Tensor:
    """Monte-Carlo DWDSE of a batch of clean windows x0 [batch, length].

    With suffix_fraction = 0 (the reference objective) this is the mean over the batch of the
    per-sequence loss (nats per sequence; in expectation an upper bound on -log p(x0)).
    With suffix_fraction > 0 the first round(fraction * batch) rows are perturbed by
    `suffix_perturb` with suffix lengths ~ U{1..suffix_max}; every row's loss is then divided by
    its number of candidate positions (length, or its suffix length) so that both kinds weigh
    the same, and the batch mean is nats per candidate token.
    max_head_positions: evaluate the vocabulary head at at most this many masked positions,
    drawn uniformly without replacement and weighted by num_masked / max_head_positions
    (an unbiased estimate of the same loss at a fraction of the head's cost).
    """
    mask_id = model.config.mask_token_id
    batch, length = x0.shape
    if t is None:
        t = sample_times(batch, generator, x0.device)
    sigma_bar, dsigma = total_noise(t), rate_noise(t)
    perturbed = perturb(x0, t, mask_id, generator)
    num_suffix = round(suffix_fraction * batch)
    candidates = torch.full((batch,), float(length), device=x0.device)
    if num_suffix:
        suffix_len = torch.randint(1, suffix_max + 1, (num_suffix,), generator=generator,
                                   device=x0.device)
        perturbed[:num_suffix] = suffix_perturb(x0[:num_suffix], t[:num_suffix], suffix_len, mask_id,
                                                generator)
        candidates[:num_suffix] = suffix_len.float()
    rows, cols = (perturbed == mask_id).nonzero(as_tuple=True)
    weight = 1.0
    if max_head_positions is not None and rows.numel() > max_head_positions:
        pick = torch.randperm(rows.numel(), generator=generator, device=x0.device)[:max_head_positions]
        weight = rows.numel() / max_head_positions
        rows, cols = rows[pick], cols[pick]
    hidden = _head_inputs(model, perturbed, sigma_bar, rows, cols)  # [num, hidden]
    linear = model.output_layer.linear
    # The mask column never enters the loss: leave it out of the head's matmul.
    raw_tokens = F.linear(hidden, linear.weight[:-1], linear.bias[:-1])  # [num, tokens]
    sb = sigma_bar[rows].to(raw_tokens.dtype)
    if model.config.scale_by_sigma:
        offset = log_expm1(sb) + math.log(model.config.tokens)
    else:
        offset = torch.zeros_like(sb)
    entropy = _token_score_entropy(raw_tokens, offset, x0[rows, cols], sb)  # [num]
    per_seq = torch.zeros(batch, dtype=entropy.dtype, device=x0.device)
    per_seq = per_seq.index_add(0, rows, weight * dsigma[rows].to(entropy.dtype) * entropy)
    if num_suffix:
        return (per_seq / candidates).mean()
    return per_seq.mean()


class TargetWindows:
    """Endless batches of token windows [batch, seq_len] cut from a conditioned feature store (the
    target's own continuations and its top-k next-token log-probabilities at every position);
    `last` holds the (rows, starts) of the batch just returned, for `sedd_target_loss`."""

    def __init__(self, store, seq_len: int, batch_size: int, generator: torch.Generator) -> None:
        if store.token_ids.shape[1] < seq_len:
            raise ValueError(f"the feature store's sequences have {store.token_ids.shape[1]} tokens, "
                             f"fewer than --seq-len {seq_len}")
        self.store, self.seq_len, self.batch_size, self.generator = store, seq_len, batch_size, generator
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __iter__(self) -> "TargetWindows":
        return self

    def __next__(self) -> torch.Tensor:
        n, length = self.store.token_ids.shape
        rows = torch.randint(0, n, (self.batch_size,), generator=self.generator)
        starts = torch.randint(0, length - self.seq_len + 1, (self.batch_size,),
                               generator=self.generator)
        self.last = (rows, starts)
        return self.store.token_ids[rows[:, None], starts[:, None] + torch.arange(self.seq_len)]


def sedd_target_loss(model, x0: torch.Tensor, store, rows: torch.Tensor, starts: torch.Tensor,
                     generator: torch.Generator | None = None, suffix_max: int = 8,
                     gamma: float = 4.0, ce_weight: float = 1.0) -> torch.Tensor:
    """Distillation loss of a SEDD drafter in its drafting state, from the target's own laws.

    Each window x0 [batch, length] keeps a clean prefix and masks its last m ~ U{1..suffix_max}
    tokens, at a noise level sigma_bar(t), t ~ U(eps, 1) (the states of SpecDiff's left-to-right
    sampler at every step). At masked slot j (1 = the first) the drafter's law, softmax of its
    token scores (with scale_by_sigma the offset is the same for every token), is pulled towards
    the target's next-token law at that position (its stored top-k, KL) plus cross-entropy on the
    true token, weighted exp(-(j - 1) / gamma). Slot 1's target law is exactly the law a drafter
    of the next token should have; later slots use the target's law given the true earlier tokens
    (teacher forcing, as the conditioned trainer does). A dense, low-variance signal where the
    score-entropy objective gives the drafting state one sampled token per position.
    """
    mask_id = model.config.mask_token_id
    batch, length = x0.shape
    t = sample_times(batch, generator, x0.device)
    sigma_bar = total_noise(t)
    suffix = torch.randint(1, suffix_max + 1, (batch,), generator=generator).to(x0.device)
    position = torch.arange(length, device=x0.device)
    masked = position[None] >= (length - suffix)[:, None]  # [batch, length]
    perturbed = torch.where(masked, torch.full_like(x0, mask_id), x0)
    b, cols = masked.nonzero(as_tuple=True)
    hidden = _head_inputs(model, perturbed, sigma_bar, b, cols)
    linear = model.output_layer.linear
    log_q = F.linear(hidden, linear.weight[:-1], linear.bias[:-1]).log_softmax(-1)  # [num, tokens]
    # The target's law of the token at absolute position p is stored at position p - 1.
    absolute = starts[b] + cols
    top_ids = store.topk_ids[rows[b], absolute - 1]  # [num, K]
    top_logp = store.topk_logprobs[rows[b], absolute - 1].float()
    top_p = top_logp.exp()
    kl = (top_p * (top_logp - log_q.gather(1, top_ids))).sum(-1)
    ce = -log_q.gather(1, x0[b, cols][:, None]).squeeze(1)
    slot = cols - (length - suffix[b])  # 0 = first masked slot
    weight = torch.exp(-slot.float() / gamma)
    return ((kl + ce_weight * ce) * weight).sum() / weight.sum()


def init_sedd_weights(model) -> None:
    """The reference initialisation: adaLN modulations and the output projection start at zero,
    so each block starts as the identity and the initial scores are uniform."""
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation.weight.zero_()
            block.adaLN_modulation.bias.zero_()
        model.output_layer.adaLN_modulation.weight.zero_()
        model.output_layer.adaLN_modulation.bias.zero_()
        model.output_layer.linear.weight.zero_()
        model.output_layer.linear.bias.zero_()


def unigram_log_probs(stream: torch.Tensor, tokens: int, smoothing: float = 0.1) -> torch.Tensor:
    """Smoothed log unigram frequencies [tokens] of a token stream."""
    counts = torch.bincount(stream, minlength=tokens)[:tokens].double() + smoothing
    return (counts / counts.sum()).log().float()


def target_embedding_projection(target_dir: str | os.PathLike, dim: int, std: float) -> torch.Tensor:
    """The target's input embeddings reduced to `dim` principal components, scaled to `std`.

    A cheap transfer from the target to a narrow drafter: tokens the target embeds alike start
    alike. Returns [target_vocab, dim] float32.
    """
    from safetensors import safe_open

    weights = Path(target_dir) / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        name = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        emb = f.get_tensor(name).float()  # [vocab, target_hidden]
    emb = emb - emb.mean(0)
    _, vectors = torch.linalg.eigh(emb.T @ emb)  # ascending eigenvalues
    proj = emb @ vectors[:, -dim:].flip(-1)  # [vocab, dim], leading components first
    return proj * (std / proj.std())


@torch.no_grad()
def init_sedd_from_target(model, target_dir: str | os.PathLike, stream: torch.Tensor) -> None:
    """Start a SEDD drafter from the target's knowledge instead of from nothing.

    vocab_embed and the output projection get the target's embeddings' principal components
    (the output ones small, 0.02, so the adaLN-zero blocks still start as the identity but
    gradients reach them at once); the output bias gets the training text's log unigram
    frequencies + log(tokens), i.e. the optimal raw score of a context-free model under
    scale_by_sigma (log s_y = raw_y - log(e^sigma_bar - 1) - log(tokens)).
    """
    tokens = model.config.tokens
    embed = model.vocab_embed.embedding
    proj = target_embedding_projection(target_dir, model.config.hidden_size, 1.0)[:tokens]
    embed[:tokens] = proj * embed[:tokens].std()
    linear = model.output_layer.linear
    linear.weight[:tokens] = proj * 0.02
    linear.bias[:tokens] = unigram_log_probs(stream, tokens) + math.log(tokens)


@torch.no_grad()
def evaluate_sedd(model, windows: torch.Tensor, num_t: int = 8, batch_size: int = 8,
                  seed: int = 0) -> dict[str, float]:
    """Held-out quality of a SEDD model on clean windows [num, length].

    nats_per_token: the DWDSE bound on -log p per token, averaged over `num_t` stratified times
    (seeded, so the number is comparable between checkpoints).
    block_accuracy: the last 4 tokens of each window masked at once (t = 1 for them, prefix clean),
    the fraction whose argmax equals the true token (a proxy for draft acceptance).
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    correct, draft = 0, 0
    mask_id = model.config.mask_token_id
    for start in range(0, windows.shape[0], batch_size):
        x0 = windows[start:start + batch_size]
        for k in range(num_t):
            t = ((k + torch.rand(x0.shape[0], generator=gen)) / num_t).clamp(min=TRAIN_T_EPS)
            total += sedd_batch_loss(model, x0, gen, t).item() * x0.shape[0]
            count += x0.shape[0]
        perturbed = x0.clone()
        perturbed[:, -4:] = mask_id
        sigma_bar = total_noise(torch.ones(x0.shape[0]))
        log_score = model(perturbed, sigma_bar)[:, -4:, :-1]
        correct += (log_score.argmax(-1) == x0[:, -4:]).sum().item()
        draft += x0[:, -4:].numel()
    model.train(was_training)
    return {"nats_per_token": total / count / windows.shape[1], "block_accuracy": correct / draft}


@torch.no_grad()
def evaluate_ar(model, windows: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Held-out next-token cross-entropy (nats per token) and top-1 accuracy of a causal LM."""
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for start in range(0, windows.shape[0], batch_size):
        x = windows[start:start + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                 reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    model.train(was_training)
    return {"nats_per_token": total / count, "top1_accuracy": correct / count}


# --------------------------------------------------------------------------- generic loop

@dataclass
class TrainConfig:
    """Optimisation settings shared by the SEDD and AR trainers."""

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.0  # 0 disables; otherwise the decay of an exponential moving average
    seed: int = 0
    eval_every: int = 250
    eval_windows: int = 32
    checkpoint_every: int = 250
    threads: int | None = None
    max_minutes: float | None = None  # stop early (and still export) after this wall time
    # SEDD only: share of each batch perturbed like a drafting state (clean prefix, masked suffix).
    suffix_fraction: float = 0.0
    suffix_max: int = 16
    # Evaluate the vocabulary head at most at this many (SEDD: masked) positions per batch.
    max_head_positions: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"TrainConfig.ema must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.suffix_fraction <= 1.0:
            raise ValueError(f"TrainConfig.suffix_fraction must be in [0, 1], got {self.suffix_fraction}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")


def lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps.

    With cfg.max_minutes set, the decay follows whichever runs out first, steps or wall time, so a
    run on a busy machine still ends with a decayed learning rate.
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    if cfg.max_minutes:
        progress = max(progress, min(1.0, elapsed_s / (60 * cfg.max_minutes)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    steps: int
    wall_seconds: float
    tokens_per_second: float
    final_train_loss: float  # mean of the last 50 steps
    evals: list[dict] = field(default_factory=list)


def _train_loop(model, loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                batches: Iterator[torch.Tensor], cfg: TrainConfig, desc: str,
                evaluate: Callable[[object], dict] | None = None,
                save_checkpoint: Callable[[object, int], None] | None = None,
                start_step: int = 0, optimizer_state: dict | None = None,
                state_path: Path | None = None) -> tuple[TrainResult, object]:
    """AdamW + warmup/cosine + clipping (+ EMA). Returns the result and the model to export
    (the EMA copy when cfg.ema > 0)."""
    import copy

    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
                                  fused=True)  # one multi-threaded kernel per tensor
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    ema_model = copy.deepcopy(model).eval() if cfg.ema > 0 else None
    export = ema_model if ema_model is not None else model
    model.train()
    losses: list[float] = []
    evals: list[dict] = []
    t0 = time.time()
    tokens = 0
    bar = tqdm(range(start_step, cfg.steps), desc=desc, initial=start_step, total=cfg.steps,
               dynamic_ncols=True, mininterval=5.0)
    step = start_step
    for step in bar:
        lr = lr_at(step, cfg, time.time() - t0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0 = next(batches)
        loss = loss_fn(x0, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if ema_model is not None:
            with torch.no_grad():
                for p_ema, p in zip(ema_model.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - cfg.ema)
        tokens += x0.numel()
        losses.append(loss.item())
        if (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4g}",
                            gnorm=f"{grad_norm.item():.3g}", lr=f"{lr:.2e}",
                            tok_s=f"{tokens / (time.time() - t0):.0f}")
        done = step + 1 == cfg.steps
        out_of_time = cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes
        if evaluate is not None and ((step + 1) % cfg.eval_every == 0 or done or out_of_time):
            record = {"step": step + 1, "wall_s": round(time.time() - t0, 1),
                      "train_loss": sum(losses[-50:]) / len(losses[-50:]), **evaluate(export)}
            evals.append(record)
            bar.write(json.dumps(record))
        if save_checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0 or done or out_of_time):
            save_checkpoint(export, step + 1)
            if state_path is not None:
                torch.save({"step": step + 1, "optimizer": optimizer.state_dict(),
                            "model": model.state_dict()}, state_path)
        if out_of_time:
            bar.write(f"stopping at step {step + 1}: --max-minutes {cfg.max_minutes} reached")
            break
    bar.close()
    wall = time.time() - t0
    result = TrainResult(steps=step + 1, wall_seconds=round(wall, 1),
                         tokens_per_second=round(tokens / max(wall, 1e-9), 1),
                         final_train_loss=sum(losses[-50:]) / max(1, len(losses[-50:])), evals=evals)
    return result, export


# --------------------------------------------------------------------------- data

def training_stream(tokenizer, sources: Sequence[str] = data_lib.DEFAULT_SOURCES,
                    distill_docs: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    """Packed training tokens: the training split of the corpora, then distillation samples."""
    return data_lib.token_stream(tokenizer, "train", sources, extra_docs=distill_docs)


def heldout_windows(tokenizer, seq_len: int, max_windows: int,
                    sources: Sequence[str] = data_lib.DEFAULT_SOURCES) -> torch.Tensor:
    return data_lib.fixed_windows(data_lib.token_stream(tokenizer, "heldout", sources), seq_len,
                                  max_windows)


def generate_distillation_docs(target_dir: str | os.PathLike, tokenizer, num_prompts: int,
                               cache_path: str | os.PathLike, prompt_tokens: int = 64,
                               max_tokens: int = 128, temperature: float = 1.0, seed: int = 0,
                               chunk: int = 128, dtype: str = "bfloat16") -> list[list[int]]:
    """Documents (prompt + continuation token ids) sampled from the target with vLLM offline.

    Prompts are the first `prompt_tokens` tokens of TRAINING articles only (held-out articles never
    reach training). Results are appended chunk by chunk to the JSON-lines `cache_path`, so an
    interrupted run resumes, and a finished run is reused by later training runs.
    """
    cache_path = Path(cache_path)
    articles = data_lib.load_articles("train")
    rng = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(articles), generator=rng).tolist()
    prompts = []
    for i in order:
        ids = data_lib.encode(tokenizer, articles[i].text)
        if len(ids) > prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == num_prompts:
            break
    docs: list[list[int]] = []
    if cache_path.exists():
        docs = [json.loads(line)["token_ids"] for line in cache_path.read_text().splitlines() if line]
    if len(docs) >= len(prompts):
        return docs[:len(prompts)]

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    print(f"[vllm-specdiff] distillation: sampling {len(prompts) - len(docs)} continuations of "
          f"{max_tokens} tokens from {target_dir} (temperature {temperature})", file=sys.stderr)
    llm = LLM(model=str(target_dir), dtype=dtype, enforce_eager=True,
              max_model_len=prompt_tokens + max_tokens + 8, distributed_executor_backend="uni",
              seed=seed)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for start in range(len(docs), len(prompts), chunk):
        batch = prompts[start:start + chunk]
        params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + start + j)
                  for j in range(len(batch))]
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        with cache_path.open("a") as f:
            for prompt, out in zip(batch, outputs):
                doc = list(prompt) + list(out.outputs[0].token_ids)
                # A sampled EOS ends the document; the stream adds its own separator.
                if doc and doc[-1] == tokenizer.eos_token_id:
                    doc = doc[:-1]
                docs.append(doc)
                f.write(json.dumps({"token_ids": doc}) + "\n")
        done = min(start + chunk, len(prompts))
        print(f"[vllm-specdiff] distillation: {done}/{len(prompts)} prompts, "
              f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return docs


# --------------------------------------------------------------------------- trainers

def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def train_sedd(config_or_checkpoint, tokenizer, cfg: TrainConfig, out_dir: str | os.PathLike,
               work_dir: str | os.PathLike | None = None,
               train_stream: torch.Tensor | None = None, eval_windows: torch.Tensor | None = None,
               export_dtype: torch.dtype = torch.float16, provenance: dict | None = None,
               resume: bool = False,
               target_init: str | os.PathLike | None = None,
               target_store=None) -> tuple[TrainResult, "SEDD"]:
    """Train a SEDD drafter and export it to `out_dir` in the published checkpoint format.

    config_or_checkpoint: a SEDDConfig (from scratch, reference init) or a checkpoint folder /
    SEDD model to fine-tune. `out_dir` receives config.json (nested, with a "training" section),
    model.safetensors in `export_dtype`, the tokenizer files and training.json; `work_dir` holds
    the periodic fp32 checkpoints (checkpoint-latest/) and the resumable state.
    target_init: a target folder; a model trained from scratch then starts from the target's
    embeddings and the corpus unigram (`init_sedd_from_target`).
    target_store: a conditioned feature store (the target's continuations and top-k laws): train
    with `sedd_target_loss` on its windows instead of score entropy on `train_stream`.
    Returns the result and the exported model (in `export_dtype`).
    """
    from vllm_specdiff.models.sedd import SEDD, SEDDConfig

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if isinstance(config_or_checkpoint, SEDDConfig):
        model = SEDD(config_or_checkpoint)
        init_sedd_weights(model)
        init = "scratch"
    elif isinstance(config_or_checkpoint, SEDD):
        model, init = config_or_checkpoint, "model"
    else:
        model = SEDD.from_pretrained(config_or_checkpoint, dtype=torch.float32)
        init = str(config_or_checkpoint)
    model = model.float().train()
    if model.config.tokens != len(tokenizer):
        raise ValueError(f"SEDD tokens={model.config.tokens} but the tokenizer has {len(tokenizer)} "
                         "tokens; the drafter must share the target's vocabulary")
    if cfg.seq_len > model.config.length:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model length {model.config.length}")
    if train_stream is None:
        train_stream = training_stream(tokenizer)
    if eval_windows is None:
        eval_windows = heldout_windows(tokenizer, cfg.seq_len, cfg.eval_windows)
    if target_init is not None and init == "scratch":
        init_sedd_from_target(model, target_init, train_stream)
        init = f"scratch+target_init({target_init})"

    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir else out_dir.parent / f".{out_dir.name}-work"
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / "training_state.pt"
    start_step, optimizer_state = 0, None
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        start_step, optimizer_state = state["step"], state["optimizer"]

    num_params = sum(p.numel() for p in model.parameters())
    print(f"[vllm-specdiff] SEDD {asdict(model.config)}: {num_params / 1e6:.2f} M params; "
          f"{train_stream.numel():,} training tokens, {eval_windows.shape[0]} held-out windows",
          file=sys.stderr, flush=True)
    batch_generator = torch.Generator().manual_seed(cfg.seed + start_step)
    if target_store is not None:
        batches = TargetWindows(target_store, cfg.seq_len, cfg.batch_size, batch_generator)
    else:
        batches = data_lib.random_windows(train_stream, cfg.seq_len, cfg.batch_size,
                                          batch_generator)

    def save_checkpoint(m, step: int) -> None:
        m.save_pretrained(work_dir / "checkpoint-latest")
        _write_json(work_dir / "checkpoint-latest" / "step.json", {"step": step})

    def loss_fn(x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if target_store is not None:
            return sedd_target_loss(model, x0, target_store, *batches.last, gen,
                                    suffix_max=cfg.suffix_max)
        loss = sedd_batch_loss(model, x0, gen, suffix_fraction=cfg.suffix_fraction,
                               suffix_max=cfg.suffix_max, max_head_positions=cfg.max_head_positions)
        # Per token, so that the numbers read like (bounds on) nats per token.
        return loss if cfg.suffix_fraction else loss / x0.shape[1]

    result, export = _train_loop(
        model, loss_fn, batches, cfg, "train sedd",
        evaluate=lambda m: evaluate_sedd(m, eval_windows, seed=cfg.seed),
        save_checkpoint=save_checkpoint, start_step=start_step, optimizer_state=optimizer_state,
        state_path=state_path)

    from vllm_specdiff.models.sedd_checkpoint import config_to_dict

    exported = SEDD(export.config)  # keeps config.dropout: the exported config.json records it
    exported.load_state_dict(export.state_dict())
    exported = exported.to(export_dtype).eval()  # dropout is for training only
    raw = config_to_dict(export.config)
    raw["training"] = {"init": init, **asdict(cfg), "export_dtype": str(export_dtype),
                       **(provenance or {})}
    exported.raw_config = raw
    exported.save_pretrained(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    _write_json(out_dir / "training.json", {"kind": "sedd", "init": init, "config": asdict(cfg),
                                            "result": asdict(result), "num_params": num_params,
                                            **(provenance or {})})
    return result, exported


def ar_batch_loss(model, x: torch.Tensor, generator: torch.Generator | None = None,
                  max_head_positions: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy (nats per token) of a causal LM on windows x [batch, length].

    max_head_positions: run the vocabulary head at at most this many positions drawn uniformly
    without replacement (an unbiased estimate of the mean at a fraction of the head's cost).
    """
    hidden = model.model(input_ids=x).last_hidden_state[:, :-1]  # [batch, length - 1, hidden]
    target = x[:, 1:]
    hidden, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    if max_head_positions is not None and target.numel() > max_head_positions:
        pick = torch.randperm(target.numel(), generator=generator)[:max_head_positions]
        hidden, target = hidden[pick], target[pick]
    return F.cross_entropy(model.lm_head(hidden), target)


def ar_config(tokenizer, hidden_size: int = 160, num_layers: int = 4, num_heads: int = 5,
              intermediate_size: int | None = None):
    """A small Llama drafter with the target's vocabulary and tied embeddings.

    head_dim = hidden_size / num_heads must be >= 32 (vLLM's CPU attention rejects 16)."""
    from transformers import LlamaConfig

    head_dim = hidden_size // num_heads
    if hidden_size % num_heads or head_dim < 32 or head_dim % 2:
        raise ValueError(f"AR drafter: hidden_size {hidden_size} / num_heads {num_heads} must give an "
                         "even head_dim >= 32 (vLLM CPU attention)")
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                       intermediate_size=intermediate_size or 3 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       num_key_value_heads=num_heads, head_dim=head_dim,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"])


def train_ar(config_or_checkpoint, tokenizer, cfg: TrainConfig, out_dir: str | os.PathLike,
             work_dir: str | os.PathLike | None = None,
             train_stream: torch.Tensor | None = None, eval_windows: torch.Tensor | None = None,
             export_dtype: torch.dtype = torch.float16,
             provenance: dict | None = None,
             target_init: str | os.PathLike | None = None) -> tuple[TrainResult, "LlamaForCausalLM"]:
    """Train a small autoregressive (Llama) drafter on the same data; export a Hugging Face folder
    (config, safetensors in `export_dtype`, tokenizer) that vLLM's draft_model speculator loads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if isinstance(config_or_checkpoint, LlamaConfig):
        model, init = LlamaForCausalLM(config_or_checkpoint), "scratch"
    else:
        model = LlamaForCausalLM.from_pretrained(str(config_or_checkpoint), dtype=torch.float32)
        init = str(config_or_checkpoint)
    model = model.float().train()
    if train_stream is None:
        train_stream = training_stream(tokenizer)
    if eval_windows is None:
        eval_windows = heldout_windows(tokenizer, cfg.seq_len, cfg.eval_windows)
    if target_init is not None and init == "scratch":
        # The same transfer as the SEDD drafter gets: the target's embeddings' principal components.
        with torch.no_grad():
            embed = model.get_input_embeddings().weight
            embed.copy_(target_embedding_projection(target_init, embed.shape[1], 0.02)[:embed.shape[0]])
        init = f"scratch+target_init({target_init})"
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir else out_dir.parent / f".{out_dir.name}-work"
    work_dir.mkdir(parents=True, exist_ok=True)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"[vllm-specdiff] AR drafter: {num_params / 1e6:.2f} M params; "
          f"{train_stream.numel():,} training tokens", file=sys.stderr, flush=True)
    batches = data_lib.random_windows(train_stream, cfg.seq_len, cfg.batch_size,
                                      torch.Generator().manual_seed(cfg.seed))

    def loss_fn(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return ar_batch_loss(model, x, gen, cfg.max_head_positions)

    def save_checkpoint(m, step: int) -> None:
        m.save_pretrained(str(work_dir / "checkpoint-latest"))

    result, export = _train_loop(model, loss_fn, batches, cfg, "train ar",
                                 evaluate=lambda m: evaluate_ar(m, eval_windows),
                                 save_checkpoint=save_checkpoint,
                                 state_path=work_dir / "training_state.pt")
    export = export.to(export_dtype)
    export.config.dtype = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(export_dtype, "float32")
    export.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    _write_json(out_dir / "training.json", {"kind": "ar", "init": init, "config": asdict(cfg),
                                            "result": asdict(result), "num_params": num_params,
                                            **(provenance or {})})
    return result, export


# --------------------------------------------------------------------------- CLI

def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `vllm-specdiff train` (defaults = the shipped SEDD drafter's command)."""
    parser.add_argument("--kind", choices=("sedd", "ar", "conditioned"), default="sedd",
                        help="drafter to train: SEDD diffusion drafter, the autoregressive baseline, "
                             "or the target-conditioned block denoiser (own options: "
                             "`vllm-specdiff train --kind conditioned --help`)")
    parser.add_argument("--out", required=True, help="export folder (weights, config, tokenizer)")
    parser.add_argument("--work-dir", default=None,
                        help="checkpoints and resumable state (default: .<out>-work next to --out)")
    parser.add_argument("--target", default=None,
                        help="target model folder for the tokenizer and distillation "
                             "(default: the embedded SmolLM2-135M, prepared on first use)")
    parser.add_argument("--init", default=None,
                        help="checkpoint folder to fine-tune (default: train from scratch)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--n-blocks", type=int, default=5, help="SEDD blocks / AR layers")
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--cond-dim", type=int, default=128, help="SEDD only")
    parser.add_argument("--dropout", type=float, default=None,
                        help="SEDD from scratch: residual dropout while training (config "
                             "model.dropout; default 0, the published models used 0.1). A "
                             "fine-tuned --init checkpoint keeps its own model.dropout")
    parser.add_argument("--length", type=int, default=256, help="SEDD window length (model.length)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay (0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suffix-fraction", type=float, default=0.0,
                        help="SEDD: share of each batch masked like a drafting state (clean prefix, "
                             "masked suffix); 0 = the reference uniform objective")
    parser.add_argument("--suffix-max", type=int, default=16, help="SEDD: longest masked suffix")
    parser.add_argument("--max-head-positions", type=int, default=None,
                        help="unbiased subsample of (SEDD: masked) positions per batch for the "
                             "vocabulary head (its cost dominates with a 49k vocabulary)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-windows", type=int, default=32,
                        help="held-out windows of --seq-len tokens used by the evaluations")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop (and export) after this many minutes of training")
    parser.add_argument("--resume", action="store_true", help="SEDD: resume from --work-dir state")
    parser.add_argument("--target-init", action="store_true",
                        help="from scratch only: start from the target's embeddings (principal "
                             "components) and, for SEDD, the corpus unigram as output bias")
    parser.add_argument("--sources", default="bbc", help="comma-separated corpora: bbc[,lee]")
    parser.add_argument("--distill", type=int, default=0,
                        help="number of training prompts whose target continuations are mixed in")
    parser.add_argument("--distill-tokens", type=int, default=128, help="tokens per continuation")
    parser.add_argument("--distill-cache", default=None,
                        help="JSON-lines cache of the samples (default: <cache>/distill-<n>-<seed>.jsonl)")
    parser.add_argument("--target-features", default=None, metavar="WORK_DIR",
                        help="SEDD: train on a conditioned trainer's work dir (the target's own "
                             "continuations and top-k laws, features-train/) with the drafting-state "
                             "distillation loss instead of score entropy on --sources")
    parser.add_argument("--export-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    return parser


def run_train(args: argparse.Namespace) -> TrainResult:
    from transformers import AutoTokenizer

    from vllm_specdiff.assets import cache_root, prepare_target

    target_dir = Path(args.target) if args.target else prepare_target()
    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    sources = tuple(s for s in args.sources.split(",") if s)
    distill_docs: list[list[int]] = []
    if args.distill:
        cache = Path(args.distill_cache) if args.distill_cache else (
            cache_root() / f"distill-{args.distill}-{args.distill_tokens}-seed{args.seed}.jsonl")
        distill_docs = generate_distillation_docs(target_dir, tokenizer, args.distill, cache,
                                                  max_tokens=args.distill_tokens, seed=args.seed)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                      ema=args.ema, seed=args.seed, eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every, eval_windows=args.eval_windows, threads=args.threads,
                      max_minutes=args.max_minutes, suffix_fraction=args.suffix_fraction,
                      suffix_max=args.suffix_max, max_head_positions=args.max_head_positions)
    stream = training_stream(tokenizer, sources, distill_docs)
    windows = heldout_windows(tokenizer, cfg.seq_len, cfg.eval_windows, sources)
    provenance = {"args": {k: v for k, v in vars(args).items() if not callable(v)},
                  "sources": list(sources), "distill_prompts": args.distill,
                  "distill_tokens": args.distill_tokens, "train_tokens": int(stream.numel()),
                  "torch": torch.__version__}
    export_dtype = getattr(torch, args.export_dtype)
    t0 = time.time()
    if args.target_features and args.kind != "sedd":
        raise ValueError(f"--target-features trains SEDD drafters only, not --kind {args.kind}")
    if args.kind == "sedd":
        from vllm_specdiff.models.sedd import SEDDConfig

        if args.init and args.dropout is not None:
            raise ValueError("--dropout sets the dropout of a model trained from scratch; an --init "
                             "checkpoint trains with its own config model.dropout (edit its "
                             "config.json to change it)")
        init = args.init or SEDDConfig(tokens=len(tokenizer), hidden_size=args.hidden_size,
                                       cond_dim=args.cond_dim, length=args.length,
                                       n_blocks=args.n_blocks, n_heads=args.n_heads,
                                       dropout=args.dropout or 0.0)
        store = None
        if args.target_features:
            from vllm_specdiff.data.target_features import load_feature_store

            store = load_feature_store(Path(args.target_features).expanduser() / "features-train")
        result, _ = train_sedd(init, tokenizer, cfg, args.out, args.work_dir, stream, windows,
                            export_dtype, provenance, resume=args.resume,
                            target_init=target_dir if args.target_init else None,
                            target_store=store)
    else:
        init = args.init or ar_config(tokenizer, args.hidden_size, args.n_blocks, args.n_heads)
        result, _ = train_ar(init, tokenizer, cfg, args.out, args.work_dir, stream, windows,
                             export_dtype, provenance,
                             target_init=target_dir if args.target_init else None)
    print(json.dumps({"kind": args.kind, "out": str(args.out), "wall_s": round(time.time() - t0, 1),
                      **asdict(result)}, indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m vllm_specdiff.training ...` (the same arguments as `vllm-specdiff train`)."""
    run_train(add_train_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv))


if __name__ == "__main__":
    main()
