"""Engine-side state of a target-conditioned drafter: per-request context caches fed by the target.

The runner patch (patches.py) enables the target's intermediate-layer outputs that the drafter's
checkpoint asks for (vLLM's aux hidden states, the EAGLE-3 / DFlash mechanism) and, every step,
hands `observe` the states of the tokens the target just processed. A request's rows in that step
are, in input-batch order (common_attn_metadata.query_start_loc_cpu):
    prefill chunk:  the chunk's prompt tokens                     -> all rows valid
    decode:         [last token, d_1 .. d_k]                      -> 1 + accepted rows valid
so the valid rows are num_scheduled - num_drafts + accepted, where accepted = len(sampled) - 1.
They enter the request's slot of a ContextCache (buffers allocated once: max_num_seqs slots of
max_model_len positions) at their absolute start position (seq_len - num_scheduled). A slot whose
positions do not continue (preempted and recomputed requests) restarts there; a prompt prefix served
from vLLM's prefix cache is never computed, so such a request drafts from the context it has.
Slots are freed when a request finishes or is aborted. Exactness never depends on any of this:
the drafts' law is recorded exactly whatever context the drafter saw.

Projection is lazy: a slot buffers its new target states (at most PENDING_LIMIT positions) and
projects them into its keys/values only when it drafts, in one batched call for all drafting slots.
A step in which adaptive drafting drafts nothing therefore costs a copy, not a drafter pass (at
batch 1 on this CPU the eager per-step projection was ~2 ms of a ~57 ms step).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

logger = logging.getLogger("vllm.specdiff")
# Upper bound for the context cache buffers; above it startup fails with the numbers and the fix.
MAX_CONTEXT_CACHE_BYTES = 4 << 30
# Positions a slot buffers before they are projected even without a draft (bounds the buffers).
PENDING_LIMIT = 64


def aux_layer_ids(target_layer_ids: Sequence[int]) -> tuple[int, ...]:
    """vLLM's aux id j is the residual stream BEFORE decoder layer j, i.e. after layer j - 1; our
    feature of layer i (HF hidden_states[i + 1]) is therefore aux id i + 1."""
    return tuple(int(i) + 1 for i in target_layer_ids)


def check_target_supports_aux(model: Any) -> None:
    from vllm.model_executor.models.interfaces import supports_eagle3

    if not supports_eagle3(model) or not hasattr(model, "set_aux_hidden_state_layers"):
        raise ValueError(
            f"specdiff: the conditioned drafter reads the target's intermediate layers, but the target "
            f"model class {type(model).__name__} cannot emit them (it does not implement vLLM's "
            "SupportsEagle3 / set_aux_hidden_state_layers). Use a target class that does (Llama, "
            "Qwen2/3, ... as for EAGLE-3 and DFlash) or a standalone SEDD drafter")


def target_embedding_and_head(model: Any, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's token embedding and LM head weights [vocab, hidden], gathered over tensor-
    parallel ranks when vLLM shards the vocabulary."""
    inner = getattr(model, "model", model)
    embed = getattr(inner, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if embed is None or head is None or not hasattr(head, "weight"):
        raise ValueError(f"specdiff: cannot find embed_tokens / lm_head on {type(model).__name__}: "
                         "the conditioned drafter reuses the target's embedding and head")
    weights = []
    for weight in (embed.weight, head.weight):
        if weight.shape[0] < vocab_size:  # vocab-parallel shard
            from vllm.distributed import tensor_model_parallel_all_gather

            weight = tensor_model_parallel_all_gather(weight.contiguous(), dim=0)
        weights.append(weight[:vocab_size].detach())
    return weights[0], weights[1]


class ConditionedState:
    """Slots, context caches and drafting for the conditioned drafter inside one worker."""

    def __init__(self, drafter, max_num_seqs: int, max_model_len: int) -> None:
        from ..drafting.conditioned import ContextCache

        model = drafter.model
        config = model.config
        itemsize = model.fc.weight.element_size()
        size = (2 * config.num_layers * max_num_seqs * config.num_kv_heads * max_model_len
                * config.head_dim * itemsize)
        if size > MAX_CONTEXT_CACHE_BYTES:
            raise ValueError(
                f"specdiff: the conditioned drafter's context cache would take {size / 2**30:.1f} GiB "
                f"({max_num_seqs} sequences x {max_model_len} positions); lower --max-num-seqs or "
                f"--max-model-len so that it stays under {MAX_CONTEXT_CACHE_BYTES / 2**30:.0f} GiB")
        self.drafter = drafter
        self.cache = ContextCache(model, max_num_seqs, max_model_len)
        self.slot_of: dict[str, int] = {}
        self.free = list(range(max_num_seqs))[::-1]
        self.last_used: dict[str, int] = {}
        # Target states observed but not yet projected, per slot; they continue cache.end(slot).
        self.pending: dict[int, list[torch.Tensor]] = {}
        self.pending_len: dict[int, int] = {}
        self.step = 0
        self.feature_order: list[int] | None = None
        ids = list(config.target_layer_ids)
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        # vLLM returns aux states sorted by layer id; the drafter wants the checkpoint's order.
        self.feature_order = None if order == list(range(len(ids))) else order

    # ---- slots ----
    def _slot(self, req_id: str, active: set[str]) -> int:
        slot = self.slot_of.get(req_id)
        if slot is not None:
            return slot
        if not self.free:  # evict the least recently used request outside this batch
            idle = [r for r in self.slot_of if r not in active]
            if not idle:
                raise RuntimeError("specdiff: no free context-cache slot")
            victim = min(idle, key=lambda r: self.last_used.get(r, -1))
            self.release(victim)
        slot = self.free.pop()
        self.slot_of[req_id] = slot
        self._restart(slot, 0)
        return slot

    def release(self, req_id: str) -> None:
        slot = self.slot_of.pop(req_id, None)
        self.last_used.pop(req_id, None)
        if slot is not None:
            self._restart(slot, 0)
            self.free.append(slot)

    def _restart(self, slot: int, base: int) -> None:
        self.cache.reset(slot, base)
        self.pending.pop(slot, None)
        self.pending_len.pop(slot, None)

    def end(self, slot: int) -> int:
        """The absolute position after the slot's context, projected or pending."""
        return self.cache.end(slot) + self.pending_len.get(slot, 0)

    def flush(self, slots: Sequence[int]) -> None:
        """Project the pending states of `slots` into their keys/values (one batched call)."""
        todo = [slot for slot in dict.fromkeys(slots) if self.pending_len.get(slot)]
        if not todo:
            return
        rows = [torch.cat(self.pending.pop(slot)) for slot in todo]
        for slot in todo:
            del self.pending_len[slot]
        self.cache.append(todo, rows)

    # ---- per step ----
    def observe(self, req_ids: Sequence[str], finished: Sequence[str], sampled_token_ids,
                aux_hidden_states: Sequence[torch.Tensor] | None, query_start_loc: np.ndarray,
                seq_lens: np.ndarray, num_draft_tokens: Sequence[int] | None) -> None:
        """Append the valid rows of this step's target states to each request's slot."""
        for req_id in finished:
            self.release(req_id)
        self.step += 1
        if aux_hidden_states is None or len(req_ids) == 0:
            return
        aux = list(aux_hidden_states)
        if self.feature_order is not None:
            aux = [aux[i] for i in self.feature_order]
        features = torch.cat(aux, dim=-1)  # [num_tokens, num_layers * hidden]
        active = set(req_ids)
        full = []
        for i, req_id in enumerate(req_ids):
            first, last = int(query_start_loc[i]), int(query_start_loc[i + 1])
            scheduled = last - first
            drafts = int(num_draft_tokens[i]) if num_draft_tokens is not None else 0
            sampled = sampled_token_ids[i] if i < len(sampled_token_ids) else []
            accepted = max(len(sampled) - 1, 0) if drafts else 0
            valid = scheduled - drafts + accepted
            if valid <= 0:
                continue
            slot = self._slot(req_id, active)
            self.last_used[req_id] = self.step
            start = int(seq_lens[i]) - scheduled
            if start != self.end(slot):  # not a continuation (recomputed / resumed): restart
                self._restart(slot, start)
            # A copy: a view would keep this step's whole feature tensor alive.
            self.pending.setdefault(slot, []).append(features[first:first + valid].clone())
            self.pending_len[slot] = self.pending_len.get(slot, 0) + valid
            if self.pending_len[slot] >= PENDING_LIMIT:
                full.append(slot)
        self.flush(full)

    def anchor_ready(self, req_id: str, anchor_position: int) -> bool:
        """True when the request's context (projected or pending) ends right before its anchor."""
        slot = self.slot_of.get(req_id)
        return slot is not None and self.cache.lengths[slot] + self.pending_len.get(slot, 0) > 0 \
            and self.end(slot) == anchor_position

    def draft(self, req_ids: Sequence[str], anchors: Sequence[int], temperature: torch.Tensor,
              generator, policy: str, num_draft_tokens: int | None = None,
              revealed_tokens: torch.Tensor | None = None, with_probs: bool = True):
        slots = [self.slot_of[r] for r in req_ids]
        self.flush(slots)
        anchor_ids = torch.tensor(list(anchors), dtype=torch.long)
        return self.drafter.draft(self.cache, slots, anchor_ids, temperature, generator=generator,
                                  policy=policy, num_draft_tokens=num_draft_tokens,
                                  revealed_tokens=revealed_tokens, with_probs=with_probs)
