"""The SEDD diffusion drafter: num_draft_tokens tokens per context and the law each was drawn from.

`DiffusionDrafter` drafts a whole block with a SEDD model in num_steps parallel denoising steps.
Its unmasking order is part of the correctness contract (shared/docs/lossless.md):

- ``left_to_right`` (default): step i unmasks the i-th leftmost block of draft positions and samples
  each from q_j = softmax(logits_j / temperature). Positions in a block are conditionally independent
  given the earlier blocks and the context, so q_j is exactly the law of x_j given (context, x_<j):
  speculative sampling with these draft_probs is lossless.
- ``random``: the reference SEDD sampler (the reference code's `sampling.get_pc_sampler` with the
  analytic predictor and noise removal, Lou et al. 2024): num_steps analytic (Tweedie tau-leaping) steps t -> s on
  linspace(1, 1e-5, num_steps + 1), where a masked position unmasks with probability
  (e^delta - 1) sum_y s_y and its token is drawn from the same softmax, then the reference's
  Denoiser forward at t = 1e-5, which fills every position still masked: num_steps + 1 forwards.
  Each token's recorded q is the softmax of the forward that unmasked it. That q is NOT the
  conditional law of x_j given x_<j (later-unmasked left tokens saw x_j), so full-q verification is
  only approximate. Verify its drafts one-hot for exactness.

Precision: the model computes in its weights' dtype; with `autocast_dtype` (float32 weights) every
forward runs under torch.autocast, the reference's recipe on GPU (blocks and output layer in bf16,
the sigma embedding, the timestep MLP, LayerNorm and the rotary angles in fp32).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..diffusion import sample_exponential_race, time_grid, total_noise, unmask_probability
from ..models.sedd import SEDD
from .base import (DraftOutput, Generators, draw_noise, tempered_probs, temperatures_tensor,
                   validate_contexts)

ORDERS = ("left_to_right", "random")
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def analytic_step_law(log_score: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None,
                      temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the reference sampler at masked positions: (P(unmask) [batch, positions],
    q [batch, positions, vocab] float32, the law of the token given that it unmasks).

    s = None is the reference's final Denoiser (every masked position unmasks). Otherwise the
    analytic step t -> s: P(y) = (e^delta - 1) s_y, delta = sigma_bar(t) - sigma_bar(s) (sedd.md).
    log_score: [batch, positions, vocab + 1] at time t; t, s: scalars; temperature: [batch].
    """
    # The sigma offsets of scale_by_sigma cancel in the softmax; drop the mask column.
    probs = tempered_probs(log_score[..., :-1], temperature)
    if s is None:
        return torch.ones_like(probs[..., 0]), probs
    return unmask_probability(log_score, total_noise(t), total_noise(s)), probs


class DiffusionDrafter:
    """Drafts num_draft_tokens tokens with SEDD forwards over the batch: num_steps of them for
    ``left_to_right``, num_steps + 1 for ``random`` (the reference sampler's final denoise)."""

    def __init__(self, model: SEDD, num_draft_tokens: int, num_steps: int,
                 order: str = "left_to_right", window: int | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        config = model.config
        window = config.length if window is None else window
        if not 1 < window <= config.length:
            raise ValueError(f"window {window} out of range: it must be in [2, {config.length}] "
                             "(the drafter's trained length, config model.length)")
        if not 1 <= num_draft_tokens < window:
            raise ValueError(f"num_draft_tokens {num_draft_tokens} out of range: it must be in "
                             f"[1, window - 1 = {window - 1}]; lower it or raise the window")
        if order not in ORDERS:
            raise ValueError(f"order {order!r} unknown: choose one of {ORDERS}")
        if not 1 <= num_steps <= num_draft_tokens:
            raise ValueError(f"num_steps {num_steps} out of range: it must be in [1, "
                             f"num_draft_tokens = {num_draft_tokens}] (more steps than draft "
                             "tokens would run forwards that unmask nothing)")
        if autocast_dtype is not None:
            if autocast_dtype not in AUTOCAST_DTYPES:
                raise ValueError(f"autocast_dtype {autocast_dtype} unsupported: choose one of "
                                 f"{AUTOCAST_DTYPES} or None")
            weights_dtype = model.vocab_embed.embedding.dtype
            if weights_dtype != torch.float32:
                raise ValueError(f"autocast_dtype needs float32 weights (the reference's recipe), "
                                 f"but the model is {weights_dtype}: load it with dtype=torch.float32 "
                                 "or drop autocast_dtype")
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.num_draft_tokens = num_draft_tokens
        self.num_steps = num_steps
        self.order = order
        self.window = window
        self.vocab_size = config.tokens
        self.mask_token_id = config.mask_token_id
        # Left-to-right block boundaries: step i unmasks positions [bounds[i], bounds[i + 1]).
        self.block_bounds = [i * num_draft_tokens // num_steps for i in range(num_steps + 1)]

    @property
    def device(self) -> torch.device:
        return self.model.vocab_embed.embedding.device

    @torch.inference_mode()
    def draft(self, contexts: Sequence[Sequence[int]],
              temperature: float | Sequence[float] | torch.Tensor = 1.0,
              generator: Generators = None,
              revealed_tokens: torch.Tensor | None = None) -> DraftOutput:
        """Draft for a ragged batch. `generator`: one torch.Generator for the batch, or one per context
        (then row r's draft equals drafting context r alone with generator r).

        revealed_tokens [batch, num_draft_tokens] (optional, -1 = unknown): draft positions whose
        token is already known given the context (a prompt-lookup continuation). They enter the
        sequence as clean tokens before the first forward, are never resampled, and their recorded
        q is one-hot (a point mass given the context: exact); the drafter denoises the other
        positions around them in its usual order. A left-to-right step whose positions are all
        revealed in every row runs no forward (its noise is still drawn, so a seeded row drafts
        the same in any batch)."""
        validate_contexts(contexts, self.vocab_size)
        known = None
        if revealed_tokens is not None:
            known = self._check_revealed(revealed_tokens, len(contexts))
        if getattr(self.model, "training", False) and self.model.config.dropout > 0:
            raise ValueError(f"the SEDD model is in train mode with dropout {self.model.config.dropout}: "
                             "drafts would be perturbed by dropout; call model.eval() before drafting")
        batch, device = len(contexts), self.device
        num_draft = self.num_draft_tokens
        temperature = temperatures_tensor(temperature, batch, device)

        # Each row: its last (window - num_draft) context tokens, num_draft masks, then padding.
        prefixes = [list(context[-(self.window - num_draft):]) for context in contexts]
        prefix_lens = torch.tensor([len(p) for p in prefixes], device=device)
        length = int(prefix_lens.max()) + num_draft
        indices = torch.full((batch, length), self.mask_token_id, dtype=torch.long, device=device)
        for row, prefix in enumerate(prefixes):
            indices[row, :len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        positions = torch.arange(length, device=device)
        attention_mask = None
        if bool((prefix_lens != prefix_lens[0]).any()):
            attention_mask = positions[None] < (prefix_lens + num_draft)[:, None]  # [batch, length]
        draft_positions = prefix_lens[:, None] + torch.arange(num_draft, device=device)  # [batch, num_draft]

        draft_probs = torch.empty((batch, num_draft, self.vocab_size), dtype=torch.float32, device=device)
        if known is not None:
            revealed_tokens = revealed_tokens.to(device)
            known = known.to(device)
            indices.scatter_(1, draft_positions, torch.where(known, revealed_tokens, self.mask_token_id))
            draft_probs.copy_(torch.nn.functional.one_hot(revealed_tokens.clamp(min=0),
                                                          self.vocab_size).float())
        run = self._left_to_right if self.order == "left_to_right" else self._random_order
        run(indices, attention_mask, draft_positions, temperature, generator, draft_probs, known)
        token_ids = torch.gather(indices, 1, draft_positions)
        return DraftOutput(token_ids=token_ids, draft_probs=draft_probs)

    def _check_revealed(self, revealed_tokens: torch.Tensor, batch: int) -> torch.Tensor:
        """[batch, num_draft] bool: which positions are revealed; clear errors for bad input."""
        shape = (batch, self.num_draft_tokens)
        if tuple(revealed_tokens.shape) != shape:
            raise ValueError(f"revealed_tokens must be [{shape[0]}, {shape[1]}] (contexts x "
                             f"num_draft_tokens, -1 = unknown), got {list(revealed_tokens.shape)}")
        too_large = revealed_tokens >= self.vocab_size
        if bool(too_large.any()):
            raise ValueError(f"revealed token id {int(revealed_tokens[too_large][0])} outside the "
                             f"drafter's vocabulary of {self.vocab_size} tokens")
        return revealed_tokens >= 0

    def _log_scores(self, indices: torch.Tensor, attention_mask: torch.Tensor | None,
                    output_positions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma_bar = total_noise(t).to(torch.float32).expand(indices.shape[0])
        precision = contextlib.nullcontext() if self.autocast_dtype is None else torch.autocast(
            indices.device.type, dtype=self.autocast_dtype)
        with precision:
            return self.model(indices, sigma_bar, attention_mask=attention_mask,
                              output_positions=output_positions)

    def random_order_times(self, device: torch.device | str | None = None
                           ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(t, s) of each forward of the ``random`` order: the reference's analytic steps t -> s on
        time_grid(num_steps), then its Denoiser at t = SAMPLING_EPS (s = None)."""
        grid = time_grid(self.num_steps, device)
        return [(grid[i], grid[i + 1]) for i in range(self.num_steps)] + [(grid[-1], None)]

    def _left_to_right(self, indices, attention_mask, draft_positions, temperature, generator,
                       draft_probs, known=None) -> None:
        grid = time_grid(self.num_steps, indices.device)
        batch = indices.shape[0]
        # A batch of greedy rows draws no noise (drawing ~vocab exponentials per position is a
        # quarter of a CPU draft); generators are then left untouched.
        all_greedy = bool((temperature == 0).all())
        for step in range(self.num_steps):
            start, end = self.block_bounds[step], self.block_bounds[step + 1]
            block_positions = draft_positions[:, start:end]  # [batch, block]
            todo = None if known is None else ~known[:, start:end]
            exponential = None
            if not all_greedy:
                exponential = draw_noise(generator, batch, (end - start, self.vocab_size),
                                         indices.device, "exponential")
            if todo is not None and not bool(todo.any()):
                continue  # every row knows this block: nothing to denoise
            log_score = self._log_scores(indices, attention_mask, block_positions, grid[step])
            # The sigma offsets of scale_by_sigma cancel in the softmax; drop the mask column.
            probs = tempered_probs(log_score[..., :-1], temperature)  # [batch, block, vocab]
            if all_greedy:  # one-hot rows: the race picks the argmax whatever the noise
                tokens = probs.argmax(-1)
            else:
                tokens = sample_exponential_race(probs, exponential)
            if todo is None:
                indices.scatter_(1, block_positions, tokens)
                draft_probs[:, start:end] = probs
            else:  # revealed positions keep their token and their one-hot row
                current = torch.gather(indices, 1, block_positions)
                indices.scatter_(1, block_positions, torch.where(todo, tokens, current))
                draft_probs[:, start:end] = torch.where(todo[..., None], probs,
                                                        draft_probs[:, start:end])

    def _random_order(self, indices, attention_mask, draft_positions, temperature, generator,
                      draft_probs, known=None) -> None:
        batch, num_draft = draft_positions.shape
        still_masked = torch.ones((batch, num_draft), dtype=torch.bool, device=indices.device)
        if known is not None:
            still_masked &= ~known
        for t, s in self.random_order_times(indices.device):
            log_score = self._log_scores(indices, attention_mask, draft_positions, t)
            p_unmask, probs = analytic_step_law(log_score, t, s, temperature)
            if s is None:  # the final denoise fills every remaining mask
                unmask = still_masked
            else:
                uniform = draw_noise(generator, batch, (num_draft,), indices.device, "uniform")
                unmask = still_masked & (uniform < p_unmask)
            exponential = draw_noise(generator, batch, tuple(probs.shape[1:]), indices.device,
                                     "exponential")
            tokens = sample_exponential_race(probs, exponential)
            current = torch.gather(indices, 1, draft_positions)
            indices.scatter_(1, draft_positions, torch.where(unmask, tokens, current))
            draft_probs.copy_(torch.where(unmask[..., None], probs, draft_probs))
            still_masked &= ~unmask
