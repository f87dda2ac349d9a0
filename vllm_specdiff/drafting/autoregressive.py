"""The classic speculative-decoding drafter: a small causal LM drafts k tokens one by one.

The baseline for the diffusion drafters (and the model behind vLLM's draft_model speculator
in the benchmarks); any Hugging Face causal LM with the target's tokenizer.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import DraftOutput, Generators, temperatures_tensor, tempered_probs, validate_contexts


class AutoregressiveDrafter:
    """The classic speculative-decoding drafter: a small causal LM drafts k tokens one by one.

    Drafts from the last `window` context tokens; row j of draft_probs is the tempered softmax the
    token was sampled from (one-hot argmax at temperature 0), so full-q verification is exact.
    """

    def __init__(self, model, num_draft_tokens: int, window: int | None = None) -> None:
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens {num_draft_tokens} out of range: it must be >= 1")
        max_positions = getattr(model.config, "max_position_embeddings", None) or 2048
        self.window = window or max_positions - num_draft_tokens
        if self.window + num_draft_tokens > max_positions:
            raise ValueError(f"window {self.window} + num_draft_tokens {num_draft_tokens} exceeds the "
                             f"drafter's context ({max_positions}): lower the window")
        self.model = model.eval()
        self.num_draft_tokens = num_draft_tokens
        self.vocab_size = model.config.vocab_size

    @torch.inference_mode()
    def draft(self, contexts: Sequence[Sequence[int]],
              temperature: float | Sequence[float] | torch.Tensor = 1.0,
              generator: Generators = None) -> DraftOutput:
        validate_contexts(contexts, self.vocab_size)
        device = next(self.model.parameters()).device
        batch = len(contexts)
        temperature = temperatures_tensor(temperature, batch, device)
        windows = [list(c[-self.window:]) for c in contexts]
        batch_ids, attention_mask = left_pad(windows, device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        tokens, rows = [], []
        step_ids = batch_ids
        for _ in range(self.num_draft_tokens):
            out = self.model(input_ids=step_ids, attention_mask=attention_mask,
                             position_ids=positions[:, -step_ids.shape[1]:], past_key_values=cache,
                             use_cache=True)
            cache = out.past_key_values
            probs = tempered_probs(out.logits[:, -1:, :self.vocab_size], temperature)[:, 0]
            noise = _exponential(generator, probs.shape, device)
            token = torch.argmax(probs / noise, dim=-1)  # exponential race
            tokens.append(token)
            rows.append(probs)
            step_ids = token[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        return DraftOutput(token_ids=torch.stack(tokens, dim=1), draft_probs=torch.stack(rows, dim=1))


def _exponential(generator: Generators, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.empty(shape, device=device).exponential_(generator=generator)
    return torch.stack([torch.empty(shape[1:], device=device).exponential_(generator=g) for g in generator])


def left_pad(sequences: Sequence[Sequence[int]], device: torch.device,
             pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [batch, max_len] and the matching 0/1 attention mask."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), length), dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, length - len(seq):] = 1
    return ids, mask
