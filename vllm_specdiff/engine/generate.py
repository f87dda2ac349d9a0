"""Standalone SpecDiff: speculative generation with any Hugging Face causal LM as the target.

This is the reference the vLLM path is checked against, and what a user without vLLM runs.
One round (Leviathan et al. 2023, Alg. 1): the drafter proposes num_draft_tokens tokens for every
running prompt, ONE target forward scores [last token, drafts] for the whole batch with the KV
cache, and `rejection_sample` keeps the accepted prefix plus one recovered or bonus token.

Ragged batches share one KV cache: prompts are left-padded and every round appends 1 + k
entries per row; entries of rejected drafts stay in the cache but are masked out of attention
(2-D attention mask + explicit position ids), and the tail that no row accepted is cropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..drafting.autoregressive import left_pad
from ..drafting.base import validate_contexts
from ..models.conditioned import target_layer_features
from ..verification import draw_random, rejection_sample


@dataclass
class GenerationStats:
    num_drafts: int = 0  # draft rounds summed over prompts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    acceptance_histogram: list[int] = field(default_factory=list)  # [k + 1]: rounds by accepted count
    drafter_time_s: float = 0.0
    target_time_s: float = 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per round: 1 + accepted / drafts (vLLM's definition)."""
        return 1.0 + self.num_accepted_tokens / max(self.num_drafts, 1)


@dataclass
class GenerationResult:
    sequences: list[list[int]]  # new tokens per prompt (eos included when hit)
    stats: GenerationStats


def target_context_length(target) -> int:
    config = target.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError("cannot tell the target's context length: set config.max_position_embeddings")


def _timer(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def speculative_generate(target, drafter, input_ids: Sequence[Sequence[int]], max_new_tokens: int,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         generator: torch.Generator | None = None,
                         eos_token_id: int | None = None,
                         draft_temperature: float | None = None) -> GenerationResult:
    """Generate up to max_new_tokens per prompt with lossless speculative sampling.

    target: a transformers causal LM (its KV cache is used); drafter: any `Drafter`
    (DiffusionDrafter or AutoregressiveDrafter) with the target's vocabulary, or a
    ConditionedDrafter, which is fed the target's hidden states of every processed position. temperature 0 is
    greedy: the output equals the target's own greedy decoding. draft_temperature defaults to the
    request temperature (0 for greedy requests). Returns new tokens per prompt and statistics.
    """
    target_vocab = target.get_output_embeddings().weight.shape[0]
    if drafter.vocab_size != target_vocab and drafter.vocab_size != target.config.vocab_size:
        raise ValueError(f"drafter vocabulary ({drafter.vocab_size} tokens) differs from the target's "
                         f"({target.config.vocab_size}): the drafter must be trained with the target's "
                         "tokenizer (see `vllm-specdiff train`)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_p <= 0 or top_p > 1 or top_k < 0:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
    validate_contexts(input_ids, drafter.vocab_size)
    num_draft = drafter.num_draft_tokens
    context_length = target_context_length(target)
    for row, prompt in enumerate(input_ids):
        # The last round may score up to num_draft tokens beyond the final emitted one.
        if len(prompt) + max_new_tokens + num_draft > context_length:
            raise ValueError(f"prompt {row} has {len(prompt)} tokens; with max_new_tokens "
                             f"{max_new_tokens} and {num_draft} draft tokens it exceeds the target's "
                             f"context of {context_length} tokens: shorten the prompt or max_new_tokens")

    device = next(target.parameters()).device
    vocab = drafter.vocab_size
    # A target-conditioned drafter reads the target's layer outputs: they come with every target
    # forward (output_hidden_states) and only the new positions enter its context cache.
    conditioned = bool(getattr(drafter, "needs_target_features", False))
    context_cache = drafter.new_cache(len(input_ids), context_length) if conditioned else None
    if draft_temperature is None:
        draft_temperature = temperature
    stats = GenerationStats(acceptance_histogram=[0] * (num_draft + 1))
    outputs: list[list[int]] = [[] for _ in input_ids]
    contexts = [list(p) for p in input_ids]
    active = list(range(len(contexts)))  # prompt index of each batch row

    # Prefill everything but each prompt's last token; that token is the first "pending" one.
    ids, cache_mask = left_pad([c[:-1] for c in contexts], device)
    cache = None
    if ids.shape[1] > 0:
        positions = (cache_mask.cumsum(-1) - 1).clamp(min=0)
        start = _timer(device)
        prefill = target(input_ids=ids, attention_mask=cache_mask, position_ids=positions,
                         use_cache=True, output_hidden_states=conditioned)
        cache = prefill.past_key_values
        stats.target_time_s += _timer(device) - start
        if conditioned:
            start = _timer(device)
            features = target_layer_features(prefill.hidden_states, drafter.target_layer_ids)
            valid = cache_mask.sum(-1).tolist()  # left-padded: the valid positions are the last ones
            context_cache.append(range(len(contexts)),
                                 [features[r, features.shape[1] - n:] for r, n in enumerate(valid)])
            stats.drafter_time_s += _timer(device) - start
    next_position = cache_mask.sum(-1)  # [batch] position id of the pending token
    pending = torch.tensor([c[-1] for c in contexts], device=device)

    while active:
        batch = len(active)
        start = _timer(device)
        if conditioned:
            draft = drafter.draft(context_cache, active, pending,
                                  torch.full((batch,), float(draft_temperature)), generator=generator)
        else:
            draft = drafter.draft([contexts[i] for i in active], temperature=draft_temperature,
                                  generator=generator)
        stats.drafter_time_s += _timer(device) - start

        start = _timer(device)
        step_ids = torch.cat([pending[:, None], draft.token_ids.to(device)], dim=1)  # [batch, 1 + k]
        attention_mask = torch.cat([cache_mask, cache_mask.new_ones(batch, 1 + num_draft)], dim=1)
        positions = next_position[:, None] + torch.arange(1 + num_draft, device=device)
        out = target(input_ids=step_ids, attention_mask=attention_mask, position_ids=positions,
                     past_key_values=cache, use_cache=True, output_hidden_states=conditioned)
        cache = out.past_key_values
        target_logits = out.logits[..., :vocab].reshape(batch * (1 + num_draft), vocab)
        cu_num_draft = torch.arange(1, batch + 1, device=device) * num_draft
        uniform, exponential = draw_random(cu_num_draft, vocab, generator, device)
        result = rejection_sample(
            draft_token_ids=draft.token_ids.to(device).reshape(-1),
            cu_num_draft_tokens=cu_num_draft,
            draft_probs=draft.draft_probs.to(device).reshape(-1, vocab),
            target_logits=target_logits,
            temperature=torch.full((batch,), float(temperature), device=device),
            top_k=torch.full((batch,), int(top_k), device=device) if top_k else None,
            top_p=torch.full((batch,), float(top_p), device=device) if top_p < 1 else None,
            uniform_samples=uniform, exponential_samples=exponential, max_draft_len=num_draft)
        stats.target_time_s += _timer(device) - start

        num_accepted = result.num_accepted.tolist()
        emitted_rows = result.output_token_ids.tolist()
        if conditioned:  # the anchor and the accepted drafts now have target states
            start = _timer(device)
            features = target_layer_features(out.hidden_states, drafter.target_layer_ids)
            context_cache.append(active, [features[r, :num_accepted[r] + 1] for r in range(batch)])
            stats.drafter_time_s += _timer(device) - start
        keep = []
        for row, prompt in enumerate(active):
            accepted = num_accepted[row]
            stats.num_drafts += 1
            stats.num_draft_tokens += num_draft
            stats.num_accepted_tokens += accepted
            stats.acceptance_histogram[accepted] += 1
            emitted = emitted_rows[row][:accepted + 1][:max_new_tokens - len(outputs[prompt])]
            finished = False
            if eos_token_id is not None and eos_token_id in emitted:
                emitted = emitted[:emitted.index(eos_token_id) + 1]
                finished = True
            outputs[prompt].extend(emitted)
            contexts[prompt].extend(emitted)
            if not finished and len(outputs[prompt]) < max_new_tokens:
                keep.append(row)

        # Cache entries: pending + accepted drafts are valid; rejected drafts are masked out.
        accepted_t = result.num_accepted.to(device)
        valid = torch.arange(1 + num_draft, device=device)[None] <= accepted_t[:, None]
        cache_mask = torch.cat([cache_mask, valid.long()], dim=1)
        next_position = next_position + 1 + accepted_t
        pending = result.output_token_ids.gather(1, accepted_t[:, None])[:, 0].to(device)
        # Drop the tail no row accepted, then the finished rows.
        unused_tail = num_draft - int(accepted_t.max())
        if unused_tail:
            cache.crop(-unused_tail)
            cache_mask = cache_mask[:, :-unused_tail]
        if len(keep) < batch:
            index = torch.tensor(keep, dtype=torch.long, device=device)
            if keep:
                cache.batch_select_indices(index)
            cache_mask, next_position, pending = cache_mask[index], next_position[index], pending[index]
        active = [active[row] for row in keep]
    return GenerationResult(sequences=outputs, stats=stats)
