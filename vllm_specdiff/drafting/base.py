"""The contract every drafter keeps: draft token ids and the law each was sampled from.

`Drafter` is what verification needs from any drafter (diffusion, autoregressive, conditioned):
token ids [batch, num_draft_tokens] and, per token, the law it was drawn from
(shared/docs/lossless.md). The helpers are the input checks and sampling pieces drafters share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class DraftOutput:
    token_ids: torch.Tensor  # [batch, num_draft_tokens] int64
    draft_probs: torch.Tensor  # [batch, num_draft_tokens, vocab] float32; row j = law x_j was drawn from


@runtime_checkable
class Drafter(Protocol):
    """What verification needs from any drafter (diffusion or autoregressive)."""

    vocab_size: int
    num_draft_tokens: int

    def draft(self, contexts: Sequence[Sequence[int]],
              temperature: float | Sequence[float] | torch.Tensor = 1.0,
              generator: Generators = None) -> DraftOutput: ...


def validate_contexts(contexts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Clear errors for the inputs every drafter rejects."""
    if len(contexts) == 0:
        raise ValueError("draft() needs at least one context")
    for row, context in enumerate(contexts):
        if len(context) == 0:
            raise ValueError(f"context {row} is empty: a drafter needs at least one token to "
                             "condition on (start prompts with a BOS/EOS token)")
        low, high = min(context), max(context)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"context {row} holds token id {bad}, outside the drafter's vocabulary "
                             f"[0, {vocab_size}): the drafter and the target must share one tokenizer")


def temperatures_tensor(temperature: float | Sequence[float] | torch.Tensor, batch: int,
                        device: torch.device) -> torch.Tensor:
    """Per-row draft temperatures as float32 [batch]; 0 means an argmax (greedy) draft."""
    values = torch.as_tensor(temperature, dtype=torch.float32, device=device)
    if values.ndim == 0:
        values = values.expand(batch)
    if values.shape != (batch,):
        raise ValueError(f"temperature must be a float or one value per context ({batch}), "
                         f"got shape {tuple(values.shape)}")
    if bool((values < 0).any()):
        raise ValueError("draft temperature must be >= 0 (0 = greedy/argmax drafts)")
    return values


def draw_noise(generator: Generators, batch: int, shape: tuple[int, ...], device: torch.device,
               kind: str) -> torch.Tensor:
    """Noise [batch, *shape]; with one generator per row, row r's noise depends only on generator r,
    so a batch draws exactly what each context would draw alone."""
    def fill(tensor: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        return tensor.exponential_(generator=gen) if kind == "exponential" else tensor.uniform_(generator=gen)

    if generator is None or isinstance(generator, torch.Generator):
        return fill(torch.empty((batch, *shape), device=device), generator)
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for {batch} contexts: pass one per context")
    return torch.stack([fill(torch.empty(shape, device=device), gen) for gen in generator])


def tempered_probs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """softmax(logits / temperature) per row, one-hot argmax where temperature == 0.

    logits: [batch, positions, vocab]; temperature: [batch]. Returns float32.
    """
    greedy = (temperature == 0)[:, None, None]
    safe_temperature = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    probs = torch.softmax(logits.float() / safe_temperature[:, None, None], dim=-1)
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, probs)
