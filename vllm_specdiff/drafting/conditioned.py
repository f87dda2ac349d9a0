"""Drafting with the target-conditioned denoiser: per-sequence context cache + exact block sampling.

A round drafts k tokens after an anchor (the last accepted / bonus token) in `num_steps` forwards over
the k + 1 block positions against cached context keys/values; step i unmasks the i-th left-to-right
chunk of slots (`step_slices`) and records the law each token was drawn from (the DiffusionDrafter
contract, shared/docs/lossless.md): slots of one chunk are conditionally independent given the
context and the earlier chunks, so the recorded q is the conditional law and full-q verification is
exact. Policies at temperature > 0:

- ``sampled``: draw each slot from softmax(logits / temperature) over the draft vocabulary, q = that
  law (0 outside the draft vocabulary);
- ``argmax``: argmax drafts, one-hot q (exact for any drafting procedure);

temperature 0 is always argmax with one-hot q. The context cache holds, per sequence slot and draft
layer, the keys/values of the fused target features of every context position; each round appends
only the positions the target just processed, never re-encoding the context.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..models.conditioned import ConditionedDenoiser

POLICIES = ("sampled", "argmax")


def step_slices(num_draft_tokens: int, num_steps: int) -> list[tuple[int, int]]:
    """Left-to-right chunks [lo, hi) of draft slots 0..k-1, one per step, sizes differing by <= 1
    (earlier chunks get the extra slot)."""
    if not 1 <= num_steps <= num_draft_tokens:
        raise ValueError(f"num_steps {num_steps} out of range: it must be in [1, num_draft_tokens = "
                         f"{num_draft_tokens}]")
    base, extra = divmod(num_draft_tokens, num_steps)
    out, lo = [], 0
    for i in range(num_steps):
        hi = lo + base + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


class ContextCache:
    """Per-slot context keys/values of every draft layer, in buffers allocated once.

    k, v: [num_layers, num_slots, kv_heads, max_len, head_dim]; a slot caches the consecutive
    absolute positions base[slot] .. base[slot] + lengths[slot] - 1 (base > 0 when the engine never
    computed the first positions, e.g. a prompt prefix served from vLLM's prefix cache: the drafter
    then reads the context it has; exactness never depends on it).
    """

    def __init__(self, model: ConditionedDenoiser, num_slots: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        config = model.config
        device = device or model.fc.weight.device
        dtype = dtype or model.fc.weight.dtype
        shape = (config.num_layers, num_slots, config.num_kv_heads, max_len, config.head_dim)
        self.model = model
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # Fused state of each slot's last cached position (the block's anchor_state).
        self.last_state = torch.zeros(num_slots, config.hidden_size, device=device, dtype=dtype)
        self.lengths = [0] * num_slots
        self.base = [0] * num_slots
        self.max_len = max_len

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    def reset(self, slot: int, base: int = 0) -> None:
        self.lengths[slot] = 0
        self.base[slot] = base
        self.last_state[slot] = 0

    def end(self, slot: int) -> int:
        """The absolute position right after the cached context (where the anchor sits)."""
        return self.base[slot] + self.lengths[slot]

    @torch.no_grad()
    def append(self, slots: Sequence[int], features: Sequence[torch.Tensor],
               starts: Sequence[int] | None = None) -> None:
        """Append features [n_i, feature_size] of each slot, in one batched projection.

        starts[i]: absolute position of the first row (default: the slot's end). A start that does
        not continue the slot (a recomputed or resumed sequence) restarts the slot there.
        """
        rows = []
        for i, (slot, feat) in enumerate(zip(slots, features)):
            if feat.shape[0] == 0:
                continue
            if starts is not None and int(starts[i]) != self.end(slot):
                self.reset(slot, int(starts[i]))
            if self.lengths[slot] + feat.shape[0] > self.max_len:
                raise ValueError(f"context cache slot {slot}: {self.lengths[slot]} + {feat.shape[0]} "
                                 f"positions exceed max_len {self.max_len}")
            rows.append((slot, feat))
        if not rows:
            return
        device = self.k.device
        feats = torch.cat([feat for _, feat in rows]).to(device)
        index = torch.cat([torch.arange(self.lengths[s], self.lengths[s] + f.shape[0])
                           for s, f in rows]).to(device)
        positions = index + torch.cat([torch.full((f.shape[0],), self.base[s], dtype=torch.long)
                                       for s, f in rows]).to(device)
        fused = self.model.fuse(feats[None])  # [1, N, hidden]
        kv = self.model.fused_key_values(fused, positions[None])  # per layer [1, kvh, N, d]
        ends = torch.tensor([f.shape[0] for _, f in rows]).cumsum(0) - 1
        self.last_state[torch.tensor([s for s, _ in rows], device=device)] = \
            fused[0, ends.to(device)].to(self.last_state.dtype)
        slot_index = torch.cat([torch.full((f.shape[0],), s, dtype=torch.long) for s, f in rows]).to(device)
        for layer, (k, v) in enumerate(kv):
            self.k[layer, slot_index, :, index] = k[0].transpose(0, 1).to(self.k.dtype)
            self.v[layer, slot_index, :, index] = v[0].transpose(0, 1).to(self.v.dtype)
        for slot, feat in rows:
            self.lengths[slot] += feat.shape[0]

    def gather(self, slots: Sequence[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                    torch.Tensor, torch.Tensor]:
        """Per-layer (k, v) [n, kv_heads, longest, head_dim], lengths [n] and anchor positions [n]."""
        lengths = [self.lengths[s] for s in slots]
        width = max(max(lengths), 1)
        device = self.k.device
        index = torch.tensor(list(slots), dtype=torch.long, device=device)
        kv = [(self.k[layer, index, :, :width], self.v[layer, index, :, :width])
              for layer in range(self.k.shape[0])]
        anchors = torch.tensor([self.end(s) for s in slots], dtype=torch.long, device=device)
        return kv, torch.tensor(lengths, dtype=torch.long, device=device), anchors

    def anchor_state(self, slots: Sequence[int]) -> torch.Tensor:
        """[n, 1, hidden]: fused state of each slot's last cached position."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self.last_state.device)
        return self.last_state[index][:, None]


class ConditionedDrafter:
    """Drafts k tokens after each anchor from a ContextCache (see module docstring)."""

    needs_target_features = True

    def __init__(self, model: ConditionedDenoiser, num_draft_tokens: int, num_steps: int = 1,
                 policy: str = "sampled") -> None:
        config = model.config
        if not 1 <= num_draft_tokens <= config.num_draft_tokens:
            raise ValueError(f"num_draft_tokens {num_draft_tokens} out of range: this drafter was "
                             f"trained for blocks of up to {config.num_draft_tokens} draft tokens")
        step_slices(num_draft_tokens, num_steps)  # validates num_steps
        if policy not in POLICIES:
            raise ValueError(f"draft policy {policy!r} unknown: choose one of {POLICIES}")
        self.model = model.eval()
        self.num_draft_tokens = num_draft_tokens
        self.num_steps = num_steps
        self.policy = policy
        self.vocab_size = config.vocab_size
        self.target_layer_ids = config.target_layer_ids

    def new_cache(self, num_slots: int, max_len: int) -> ContextCache:
        return ContextCache(self.model, num_slots, max_len)

    @torch.no_grad()
    def draft(self, cache: ContextCache, slots: Sequence[int], anchor_ids: torch.Tensor,
              temperature: torch.Tensor, generator=None, policy: str | None = None,
              num_draft_tokens: int | None = None, num_steps: int | None = None,
              revealed_tokens: torch.Tensor | None = None, with_probs: bool = True):
        """Draft after `anchor_ids` [n] for cache `slots`; temperature [n] (0 = greedy).

        revealed_tokens [n, k] (optional, -1 = unknown): slots whose token is already known given
        the context (e.g. a prompt-lookup continuation) enter the block revealed; their q is one-hot
        (a point mass given the context, exact) and they are not sampled. Returns DraftOutput with
        token_ids [n, k] and draft_probs [n, k, vocab] (None with with_probs=False: for callers
        that verify every row one-hot, the [n, k, vocab] law is not built).
        """
        from .base import DraftOutput

        policy = policy or self.policy
        k = num_draft_tokens or self.num_draft_tokens
        steps = min(num_steps or self.num_steps, k)
        model = self.model
        device = model.fc.weight.device
        n = len(slots)
        kv, lengths, anchor_positions = cache.gather(slots)
        anchor_state = cache.anchor_state(slots) if model.config.anchor_feature else None
        width = kv[0][0].shape[2]
        block = k + 1
        offsets = torch.arange(block, device=device)
        positions = anchor_positions[:, None] + offsets  # the anchor follows the cached context
        ctx_mask = torch.arange(width, device=device)[None, :] < lengths[:, None]  # [n, width]
        mask = torch.cat([ctx_mask[:, None, :].expand(n, block, width),
                          torch.ones(n, block, block, dtype=torch.bool, device=device)], dim=-1)
        mask = mask[:, None]
        ids = torch.zeros(n, block, dtype=torch.long, device=device)
        ids[:, 0] = anchor_ids.to(device)
        revealed = torch.zeros(n, block, dtype=torch.bool, device=device)
        revealed[:, 0] = True
        known = None
        if revealed_tokens is not None:
            known = revealed_tokens[:, :k].to(device) >= 0
            ids[:, 1:] = torch.where(known, revealed_tokens[:, :k].to(device), ids[:, 1:])
            revealed[:, 1:] = known
        temperature = temperature.to(device=device, dtype=torch.float32)
        sample = (temperature > 0) & (policy == "sampled")
        any_sampled = bool(sample.any())
        safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
        draft_vocab = model.draft_vocab
        probs_out = torch.zeros(n, k, self.vocab_size, device=device) if with_probs else None
        for lo, hi in step_slices(k, steps):
            todo = torch.zeros(n, block, dtype=torch.bool, device=device)
            todo[:, 1 + lo:1 + hi] = True
            todo &= ~revealed
            noise = None
            if any_sampled:  # drawn before a skip: a seeded row's stream must not depend on its batch
                noise = _exponential(generator, (n, hi - lo, len(draft_vocab)), device)
            if not bool(todo.any()):
                continue
            hidden = model.block_hidden(ids, revealed, positions, kv, mask,
                                        anchor_state)[:, 1 + lo:1 + hi]
            logits = model.draft_logits(hidden).float()  # [n, width_s, Vd]
            idx = logits.argmax(-1)
            probs = None
            if any_sampled or probs_out is not None:
                probs = torch.softmax(logits / safe_t[:, None, None], dim=-1)
            if any_sampled:  # Gumbel-style: argmax of p / Exp(1) is a draw from p
                idx = torch.where(sample[:, None], torch.argmax(probs / noise, dim=-1), idx)
            tokens = draft_vocab[idx]
            step_todo = todo[:, 1 + lo:1 + hi]
            ids[:, 1 + lo:1 + hi] = torch.where(step_todo, tokens, ids[:, 1 + lo:1 + hi])
            revealed = revealed | todo
            if probs_out is None:
                continue
            full = torch.zeros(n, hi - lo, self.vocab_size, device=device)
            full[..., draft_vocab] = probs
            one_hot = torch.zeros_like(full).scatter_(-1, tokens[..., None], 1.0)
            law = torch.where(sample[:, None, None], full, one_hot)
            probs_out[:, lo:hi] = torch.where(step_todo[..., None], law, probs_out[:, lo:hi])
        token_ids = ids[:, 1:]
        if known is not None and probs_out is not None:  # lookup slots: point mass at the token
            one_hot = torch.zeros_like(probs_out).scatter_(-1, token_ids[..., None], 1.0)
            probs_out = torch.where(known[..., None], one_hot, probs_out)
        return DraftOutput(token_ids=token_ids, draft_probs=probs_out)


def _exponential(generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Exponential(1) noise; one generator per row keeps a row's draw independent of the batch."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.empty(shape, device=device).exponential_(generator=generator)
    return torch.stack([torch.empty(shape[1:], device=device).exponential_(generator=g)
                        for g in generator])
