"""Batched lossless verification of draft tokens (speculative sampling).

Implements Algorithm 1 of Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding" (also Chen et al. 2023) on vLLM's flattened ragged batch:

- draft position i of a request, drafted token x_i drawn from draft law q_i, target law p_i:
  accept x_i iff u_i * q_i(x_i) <= p_i(x_i), u_i ~ U[0, 1);
- at the first rejection emit a recovered token ~ normalize(max(p_i - q_i, 0)) and stop;
- if every draft is accepted emit a bonus token ~ p_{num_draft_tokens + 1}.

p is the target law the output must follow: softmax(target_logits / temperature) after top-k then
top-p filtering. One-hot verification (draft_probs=None) uses q_i = delta(x_i): accept with
probability p_i(x_i), recover from p_i with x_i removed. It is exact for ANY drafting procedure;
full-q verification is exact only when q_i is the law of x_i given the context and x_<i
(shared/docs/lossless.md). Greedy rows (temperature 0) accept iff x_i == argmax p_i and emit the
target argmax, so the output equals target greedy decoding.

A draft id PLACEHOLDER_TOKEN_ID (-1; vLLM pads drafts with it, e.g. after a grammar cut them short)
is never accepted, and the token emitted at its position is drawn from p itself (q = 0 there: the
position proposed nothing), so padding never changes the output law.

Two layouts of the target logits:
- `rejection_sample`: [num_tokens + batch, vocab], per request its draft positions then its bonus
  position; it draws the bonus token itself (the standalone loop and the Triton kernels);
- `rejection_sample_drafts`: [num_tokens, vocab], the draft positions only, with the bonus tokens
  drawn by the caller (vLLM's RejectionSampler contract: its sampler draws them with every logits
  processor applied). It can also replace the acceptance rule by fixed per-position rates (vLLM's
  "synthetic" rejection sampling, a benchmarking mode).

Random numbers are drawn outside (`draw_random`), so every implementation is a deterministic
function of its inputs: `rejection_sample_reference` (pure PyTorch; the specification, CPU path and
test oracle) and the Triton kernels in `vllm_specdiff.kernels.rejection` agree token for token
under shared randomness. Categorical draws use the exponential race argmax(weights / E),
E ~ Exp(1) i.i.d., which picks v with probability weights_v / sum(weights) without normalising and
without host syncs. Edge cases: a draft token with q(x) = 0 is accepted (u * 0 <= p(x)), which is
the limit of the rule; if max(p - q, 0) is all zero (p == q numerically) the recovered token is
drawn from p.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

PLACEHOLDER_TOKEN_ID = -1

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)

Generators = torch.Generator | Sequence[torch.Generator | None] | None
# The recovered tokens' Exp(1) noise: a [batch, vocab] table drawn up front, or a source that draws
# rows on demand, called once with the rows (requests) that rejected a sampled draft
# (`exponential_rows`): a step whose drafts are all accepted, or greedy, draws nothing.
ExponentialSource = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RejectionOutput:
    # [batch, max_draft_len + 1] int64: accepted draft tokens, then the recovered or bonus token,
    # then PLACEHOLDER_TOKEN_ID.
    output_token_ids: torch.Tensor
    # [batch] int64: number of accepted DRAFT tokens (tokens emitted = num_accepted + 1).
    num_accepted: torch.Tensor


# ------------------------------------------------------------------------------------------------
# Layout of the flattened ragged batch (vLLM convention)
# ------------------------------------------------------------------------------------------------

def num_draft_tokens_per_request(cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """[batch] int64 draft lengths from the inclusive cumulative sum [batch]."""
    cu = cu_num_draft_tokens.long()
    return torch.diff(cu, prepend=cu.new_zeros(1))


def request_index(counts: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int64: request id of each flattened entry, request b owning counts[b] entries.

    `total` is passed (it is known from tensor shapes) so repeat_interleave needs no host sync.
    """
    requests = torch.arange(counts.shape[0], device=counts.device)
    return torch.repeat_interleave(requests, counts, output_size=total)


def _max_draft_len(cu_num_draft_tokens: torch.Tensor) -> int:
    if cu_num_draft_tokens.shape[0] == 0:
        return 0
    # The one host sync this module allows: pass max_draft_len to avoid it.
    return int(num_draft_tokens_per_request(cu_num_draft_tokens).max())


def check_rejection_inputs(
    draft_token_ids: torch.Tensor,
    cu_num_draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    uniform_samples: torch.Tensor,
    exponential_samples: torch.Tensor,
    max_draft_len: int | None,
    *,
    bonus_rows: bool = True,
) -> tuple[int, int, int]:
    """Validate shapes, dtypes and devices; return (batch, num_tokens, vocab).

    bonus_rows: target_logits holds each request's bonus position too ([num_tokens + batch, vocab],
    `rejection_sample`) or the draft positions only ([num_tokens, vocab], `rejection_sample_drafts`).
    Raises ValueError naming the argument and what it should be. Values are only inspected when
    cu_num_draft_tokens lives on the CPU (reading a device tensor would be a host sync).
    """

    def fail(name: str, tensor: torch.Tensor, expected: str) -> None:
        raise ValueError(f"rejection_sample: {name} must be {expected}, got shape "
                         f"{tuple(tensor.shape)} dtype {tensor.dtype}")

    if draft_token_ids.ndim != 1 or draft_token_ids.dtype not in _INDEX_DTYPES:
        fail("draft_token_ids", draft_token_ids, "a 1-D int32/int64 tensor [num_tokens]")
    if cu_num_draft_tokens.ndim != 1 or cu_num_draft_tokens.dtype not in _INDEX_DTYPES:
        fail("cu_num_draft_tokens", cu_num_draft_tokens, "a 1-D int32/int64 tensor [batch]")
    num_tokens = draft_token_ids.shape[0]
    batch = cu_num_draft_tokens.shape[0]
    rows, layout = ((num_tokens + batch, "[num_tokens + batch, vocab]") if bonus_rows
                    else (num_tokens, "[num_tokens, vocab]"))
    if target_logits.ndim != 2 or target_logits.dtype not in _LOGIT_DTYPES:
        fail("target_logits", target_logits, f"a 2-D float tensor {layout}")
    vocab = target_logits.shape[1]
    if target_logits.shape[0] != rows or vocab == 0:
        fail("target_logits", target_logits,
             f"{layout} with {rows} rows and vocab > 0 ("
             + ("each request's draft positions then its bonus position)" if bonus_rows
                else "the draft positions only)"))
    if draft_probs is not None and (draft_probs.shape != (num_tokens, vocab)
                                    or draft_probs.dtype not in _LOGIT_DTYPES):
        fail("draft_probs", draft_probs, f"None or a float tensor [num_tokens, vocab] = "
             f"[{num_tokens}, {vocab}]")
    if temperature.shape != (batch,) or not temperature.is_floating_point():
        fail("temperature", temperature, f"a float tensor [batch] = [{batch}]")
    if top_k is not None and (top_k.shape != (batch,) or top_k.dtype not in _INDEX_DTYPES):
        fail("top_k", top_k, f"None or an int32/int64 tensor [batch] = [{batch}]")
    if top_p is not None and (top_p.shape != (batch,) or not top_p.is_floating_point()):
        fail("top_p", top_p, f"None or a float tensor [batch] = [{batch}]")
    if uniform_samples.shape != (num_tokens,) or uniform_samples.dtype != torch.float64:
        fail("uniform_samples", uniform_samples, f"a float64 tensor [num_tokens] = [{num_tokens}] "
             "(see draw_random)")
    if callable(exponential_samples) and not isinstance(exponential_samples, torch.Tensor):
        if bonus_rows:  # the reference draws its bonus tokens from the same table
            raise ValueError("rejection_sample: exponential_samples must be a [batch, vocab] "
                             "tensor here (a row source is taken by rejection_sample_drafts only)")
        exponential_samples = None  # drawn on demand, with the right shape
    elif exponential_samples.shape != (batch, vocab) or not exponential_samples.is_floating_point():
        fail("exponential_samples", exponential_samples,
             f"a float tensor [batch, vocab] = [{batch}, {vocab}] (see draw_random), or a row "
             "source (see exponential_rows)")
    if max_draft_len is not None and (not isinstance(max_draft_len, int) or max_draft_len < 0):
        raise ValueError(f"rejection_sample: max_draft_len must be None or an int >= 0, "
                         f"got {max_draft_len!r}")
    named = {"draft_token_ids": draft_token_ids, "cu_num_draft_tokens": cu_num_draft_tokens,
             "draft_probs": draft_probs, "temperature": temperature, "top_k": top_k,
             "top_p": top_p, "uniform_samples": uniform_samples,
             "exponential_samples": exponential_samples}
    for name, tensor in named.items():
        if tensor is not None and tensor.device != target_logits.device:
            raise ValueError(f"rejection_sample: {name} is on {tensor.device} but target_logits is "
                             f"on {target_logits.device}; move all inputs to one device")
    if cu_num_draft_tokens.device.type == "cpu" and batch > 0:
        num_draft = num_draft_tokens_per_request(cu_num_draft_tokens)
        if bool((num_draft < 0).any()) or int(cu_num_draft_tokens[-1]) != num_tokens:
            raise ValueError("rejection_sample: cu_num_draft_tokens must be the inclusive "
                             "cumulative sum of draft lengths ending at num_tokens="
                             f"{num_tokens}, got {cu_num_draft_tokens.tolist()}")
        if max_draft_len is not None and int(num_draft.max()) > max_draft_len:
            raise ValueError(f"rejection_sample: max_draft_len={max_draft_len} is smaller than the "
                             f"longest draft ({int(num_draft.max())} tokens)")
    return batch, num_tokens, vocab


# ------------------------------------------------------------------------------------------------
# Target law: temperature, then top-k, then top-p
# ------------------------------------------------------------------------------------------------

def top_k_top_p_mask(
    scaled_logits: torch.Tensor,  # [rows, vocab] float
    top_k: torch.Tensor | None,  # [rows] int; <= 0 or >= vocab = off
    top_p: torch.Tensor | None,  # [rows] float; >= 1 = off
) -> torch.Tensor:
    """[rows, vocab] bool, True where a token is filtered out (top-k first, then top-p).

    Thresholds are on values, so tokens tied with the last kept one are kept: the mask does not
    depend on how a sort orders ties. Top-p keeps the smallest prefix of the sorted law (after
    top-k) whose mass reaches top_p, and always the most likely token.
    """
    rows, vocab = scaled_logits.shape
    sorted_logits = scaled_logits.sort(dim=-1, descending=True).values  # [rows, vocab]
    mask = torch.zeros_like(scaled_logits, dtype=torch.bool)
    if top_k is not None:
        keep_count = top_k.long()
        keep_count = torch.where((keep_count <= 0) | (keep_count >= vocab),
                                 torch.full_like(keep_count, vocab), keep_count)
        kth_logit = sorted_logits.gather(1, (keep_count - 1).unsqueeze(1))  # [rows, 1]
        mask |= scaled_logits < kth_logit
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_logit, float("-inf"))
    if top_p is not None:
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [rows, vocab]
        nucleus_mass = top_p.to(sorted_probs.dtype).unsqueeze(1)  # [rows, 1]
        keep = (mass_before < nucleus_mass) | (nucleus_mass >= 1.0)
        num_keep = keep.sum(dim=1, keepdim=True).clamp(min=1)  # a prefix: mass_before is sorted
        last_kept_logit = sorted_logits.gather(1, num_keep - 1)  # [rows, 1]
        mask |= scaled_logits < last_kept_logit
    return mask


def _row_parameters(
    cu_num_draft_tokens: torch.Tensor,  # [batch]
    num_rows: int,
    temperature: torch.Tensor,  # [batch]
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row (draft and bonus positions) temperature, top_k, top_p; greedy rows filter nothing."""
    row_request = request_index(num_draft_tokens_per_request(cu_num_draft_tokens) + 1, num_rows)
    return _request_parameters(row_request, temperature, top_k, top_p)


def _request_parameters(
    row_request: torch.Tensor,  # [num_rows] request of each row
    temperature: torch.Tensor,  # [batch]
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Each row's temperature (1 for greedy rows), top_k and top_p (off for greedy rows)."""
    is_greedy = (temperature == 0)[row_request]  # [num_rows]
    row_temperature = torch.where(is_greedy, torch.ones_like(temperature[row_request]),
                                  temperature[row_request])
    row_top_k = None if top_k is None else top_k[row_request].masked_fill(is_greedy, 0)
    row_top_p = None if top_p is None else top_p[row_request].masked_fill(is_greedy, 1.0)
    return row_temperature, row_top_k, row_top_p


def target_scaled_logits(
    target_logits: torch.Tensor,  # [num_tokens + batch, vocab]
    cu_num_draft_tokens: torch.Tensor,  # [batch]
    temperature: torch.Tensor,  # [batch]
    top_k: torch.Tensor | None,  # [batch]
    top_p: torch.Tensor | None,  # [batch]
) -> torch.Tensor:
    """[num_tokens + batch, vocab] logits / temperature, filtered tokens at -inf.

    softmax of the result is the target law p. Computed in float32 (float64 for float64 input).
    Greedy rows (temperature 0) are returned unscaled and unfiltered: their argmax is the target's
    greedy token.
    """
    row_request = request_index(num_draft_tokens_per_request(cu_num_draft_tokens) + 1,
                                target_logits.shape[0])
    return _scaled_rows(target_logits, row_request, temperature, top_k, top_p)


def draft_position_scaled_logits(
    target_logits: torch.Tensor,  # [num_tokens, vocab]: the draft positions only
    cu_num_draft_tokens: torch.Tensor,  # [batch]
    temperature: torch.Tensor,  # [batch]
    top_k: torch.Tensor | None,  # [batch]
    top_p: torch.Tensor | None,  # [batch]
) -> torch.Tensor:
    """`target_scaled_logits` for the layout of `rejection_sample_drafts` (no bonus rows)."""
    num_draft = num_draft_tokens_per_request(cu_num_draft_tokens)
    return _scaled_rows(target_logits, request_index(num_draft, target_logits.shape[0]),
                        temperature, top_k, top_p)


def _scaled_rows(
    logits: torch.Tensor,  # [num_rows, vocab]
    row_request: torch.Tensor,  # [num_rows] request of each row
    temperature: torch.Tensor,  # [batch]
    top_k: torch.Tensor | None,  # [batch]
    top_p: torch.Tensor | None,  # [batch]
) -> torch.Tensor:
    """[num_rows, vocab] logits / temperature with the filtered tokens at -inf (any row layout)."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    row_temperature, row_top_k, row_top_p = _request_parameters(row_request, temperature, top_k,
                                                                top_p)
    scaled = logits.to(compute_dtype) / row_temperature.to(compute_dtype).unsqueeze(1)
    if row_top_k is None and row_top_p is None:
        return scaled
    # In place: `scaled` is this function's own tensor (the division allocated it).
    return scaled.masked_fill_(top_k_top_p_mask(scaled, row_top_k, row_top_p), float("-inf"))


def mask_filtered_logits(
    target_logits: torch.Tensor,  # [num_tokens + batch, vocab]
    cu_num_draft_tokens: torch.Tensor,  # [batch]
    temperature: torch.Tensor,  # [batch]
    top_k: torch.Tensor | None,  # [batch]
    top_p: torch.Tensor | None,  # [batch]
) -> torch.Tensor:
    """target_logits (same dtype) with the tokens top-k/top-p filter out set to -inf.

    The torch pre-pass of the Triton path: the mask is computed exactly as in
    `target_scaled_logits`, so (masked / temperature) equals its result bit for bit.
    """
    if top_k is None and top_p is None:
        return target_logits
    row_temperature, row_top_k, row_top_p = _row_parameters(
        cu_num_draft_tokens, target_logits.shape[0], temperature, top_k, top_p)
    scaled = target_logits.float() / row_temperature.float().unsqueeze(1)
    return target_logits.masked_fill(top_k_top_p_mask(scaled, row_top_k, row_top_p), float("-inf"))


def exponential_race(
    weights: torch.Tensor,  # [rows, vocab] >= 0, not necessarily normalised
    exponential_samples: torch.Tensor,  # [rows, vocab] Exp(1)
) -> torch.Tensor:
    """[rows] int64 argmax(weights / E): token v with probability weights_v / sum(weights)."""
    return (weights / exponential_samples).argmax(dim=-1)


# ------------------------------------------------------------------------------------------------
# Random numbers
# ------------------------------------------------------------------------------------------------

def draw_random(
    cu_num_draft_tokens: torch.Tensor,  # [batch]
    vocab_size: int,
    generators: Generators,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw uniform_samples [num_tokens] float64 in [0, 1) and exponential_samples [batch, vocab]
    float32 Exp(1).

    generators: None (global RNG), one torch.Generator for the whole batch, or one per request
    (None entries use the global RNG), which makes each request reproducible on its own. The sizes
    are read from cu_num_draft_tokens on the host: pass it on the CPU to avoid a device sync.
    Exponentials are clamped to the smallest normal float so weights / E is never 0 / 0.
    """
    batch = cu_num_draft_tokens.shape[0]
    uniform_samples = draw_uniform_samples(cu_num_draft_tokens, generators, device)
    per_request = generators is not None and not isinstance(generators, torch.Generator)
    exponential_samples = torch.empty(batch, vocab_size, dtype=torch.float32, device=device)
    exponential_samples.exponential_(generator=None if per_request else generators)
    if per_request:
        for request, generator in enumerate(generators):
            if generator is not None:
                exponential_samples[request].exponential_(generator=generator)
    exponential_samples.clamp_(min=torch.finfo(torch.float32).tiny)
    return uniform_samples, exponential_samples


def draw_uniform_samples(
    cu_num_draft_tokens: torch.Tensor,  # [batch]
    generators: Generators,
    device: torch.device | str,
) -> torch.Tensor:
    """uniform_samples [num_tokens] float64 in [0, 1), as `draw_random` draws them (the same
    generators rule); pair it with `exponential_rows` for recovered tokens drawn on demand."""
    cu = cu_num_draft_tokens.to("cpu", torch.int64)
    batch = cu.shape[0]
    num_tokens = int(cu[-1]) if batch > 0 else 0
    per_request = generators is not None and not isinstance(generators, torch.Generator)
    shared = None if per_request else generators
    uniform_samples = torch.rand(num_tokens, dtype=torch.float64, device=device, generator=shared)
    if per_request:
        if len(generators) != batch:
            raise ValueError(f"draw_random: got {len(generators)} generators for {batch} requests")
        starts = (cu - num_draft_tokens_per_request(cu)).tolist()
        for request, generator in enumerate(generators):
            if generator is None:
                continue
            start, end = starts[request], int(cu[request])
            uniform_samples[start:end] = torch.rand(end - start, dtype=torch.float64, device=device,
                                                    generator=generator)
    return uniform_samples


def exponential_rows(
    vocab_size: int,
    generators: Sequence[torch.Generator | None] | None,
    device: torch.device | str,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A row source for `rejection_sample_drafts`: called with request indices [rows], it draws
    [rows, vocab] float32 Exp(1), each seeded request's row from its own generator (None entries
    and `generators=None` use the global RNG), clamped like `draw_random`.

    The rows are drawn after acceptance is decided, only for the requests that need a recovered
    token. They are fresh noise, independent of the uniforms that decided acceptance, so the
    recovered token still follows normalize(max(p - q, 0)); an eager [batch, vocab] table costs
    batch x vocab draws on every step with a draft (12-15 ms at batch 16 on a 2-core CPU).
    """

    def draw(rows: torch.Tensor) -> torch.Tensor:
        # As draw_random: every row from the global RNG, then seeded rows from their generators.
        out = torch.empty(rows.shape[0], vocab_size, dtype=torch.float32, device=device)
        out.exponential_()
        if generators is not None:
            for i, request in enumerate(rows.tolist()):
                if generators[request] is not None:
                    out[i].exponential_(generator=generators[request])
        return out.clamp_(min=torch.finfo(torch.float32).tiny)

    return draw


# ------------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------------

def rejection_sample_reference(
    draft_token_ids: torch.Tensor,  # [num_tokens] int
    cu_num_draft_tokens: torch.Tensor,  # [batch] int, inclusive cumulative sum of draft lengths
    draft_probs: torch.Tensor | None,  # [num_tokens, vocab]; None = one-hot verification
    target_logits: torch.Tensor,  # [num_tokens + batch, vocab]: per request drafts, then bonus
    temperature: torch.Tensor,  # [batch] float; 0 = greedy
    top_k: torch.Tensor | None,  # [batch] int; 0 or >= vocab = off
    top_p: torch.Tensor | None,  # [batch] float; 1.0 = off
    uniform_samples: torch.Tensor,  # [num_tokens] float64 in [0, 1)
    exponential_samples: torch.Tensor,  # [batch, vocab] Exp(1): recovered OR bonus token race
    max_draft_len: int | None = None,
) -> RejectionOutput:
    """Pure PyTorch speculative sampling (Leviathan et al. 2023, Algorithm 1), batched.

    The specification of `rejection_sample`, its CPU path and the oracle of the kernel tests.
    Vectorised over all draft positions; the residual law max(p - q, 0) is built only at each
    request's first rejection; no host syncs unless max_draft_len is None. Float64
    inputs are computed in float64 (used by the exact-enumeration tests). Placeholder drafts (-1)
    are handled here; the Triton kernels expect valid ids (vLLM batches with placeholders take this
    path: vllm_plugin/sampler.py).
    """
    batch, num_tokens, vocab = check_rejection_inputs(
        draft_token_ids, cu_num_draft_tokens, draft_probs, target_logits, temperature, top_k, top_p,
        uniform_samples, exponential_samples, max_draft_len)
    if max_draft_len is None:
        max_draft_len = _max_draft_len(cu_num_draft_tokens)
    device = target_logits.device
    num_draft = num_draft_tokens_per_request(cu_num_draft_tokens)  # [batch]
    token_request = request_index(num_draft, num_tokens)  # [num_tokens]
    token_row = torch.arange(num_tokens, device=device) + token_request  # row of target_logits
    bonus_row = cu_num_draft_tokens.long() + torch.arange(batch, device=device)  # [batch]
    is_greedy = temperature == 0  # [batch]

    scaled_logits = target_scaled_logits(target_logits, cu_num_draft_tokens, temperature, top_k,
                                         top_p)  # [num_rows, vocab]
    target_probs = scaled_logits.softmax(dim=-1)  # [num_rows, vocab]
    target_argmax = scaled_logits.argmax(dim=-1)  # [num_rows]; greedy rows are unscaled
    bonus = torch.where(is_greedy, target_argmax[bonus_row],
                        exponential_race(target_probs[bonus_row], exponential_samples))
    return _accept_then_emit(draft_token_ids, cu_num_draft_tokens, draft_probs, target_probs,
                             target_argmax, token_row, is_greedy, bonus, uniform_samples,
                             exponential_samples, max_draft_len)


def _accept_then_emit(
    draft_token_ids: torch.Tensor,  # [num_tokens] int; negative = placeholder
    cu_num_draft_tokens: torch.Tensor,  # [batch]
    draft_probs: torch.Tensor | None,  # [num_tokens, vocab]
    target_probs: torch.Tensor | None,  # [num_rows, vocab] target law p; None: all rows greedy
    target_argmax: torch.Tensor | None,  # [num_rows] argmax of each row's logits; None: no greedy row
    token_row: torch.Tensor,  # [num_tokens] row of target_probs at each draft position
    is_greedy: torch.Tensor,  # [batch] bool
    bonus: torch.Tensor,  # [batch] int: the token after a fully accepted block
    uniform_samples: torch.Tensor,  # [num_tokens] float64
    exponential_samples: ExponentialSource,  # [batch, vocab] or a row source
    max_draft_len: int,
    acceptance_rates: torch.Tensor | None = None,  # [>= max_draft_len]: synthetic acceptance
) -> RejectionOutput:
    """The accept / recover step shared by both layouts (Algorithm 1 of Leviathan et al. 2023).

    Vectorised over all draft positions; the residual law max(p - q, 0) is built only at each
    request's first rejection; no host syncs.
    """
    device = draft_token_ids.device
    num_tokens, batch = draft_token_ids.shape[0], cu_num_draft_tokens.shape[0]
    num_draft = num_draft_tokens_per_request(cu_num_draft_tokens)  # [batch]
    draft_start = cu_num_draft_tokens.long() - num_draft  # [batch]
    token_request = request_index(num_draft, num_tokens)  # [num_tokens]
    token_position = torch.arange(num_tokens, device=device) - draft_start[token_request]
    drafts = draft_token_ids.long()  # [num_tokens]
    is_placeholder = drafts < 0  # [num_tokens]: padding, never accepted
    safe_drafts = drafts.clamp(min=0)  # a valid index for the gathers below

    if acceptance_rates is not None:
        # synthetic: a fixed acceptance probability per position, greedy rows included
        accepted = uniform_samples < acceptance_rates.double()[token_position]
    elif target_probs is None:  # every row greedy
        accepted = drafts == target_argmax[token_row]
    else:
        # Draft positions: acceptance needs only p(x_i) and q(x_i).
        target_prob_of_draft = target_probs[token_row, safe_drafts]  # [num_tokens]
        if draft_probs is None:
            draft_prob_of_draft = torch.ones_like(target_prob_of_draft)
        else:
            draft_prob_of_draft = draft_probs[torch.arange(num_tokens, device=device),
                                              safe_drafts].to(target_probs.dtype)
        accepted = (uniform_samples * draft_prob_of_draft.double()
                    <= target_prob_of_draft.double())
        if target_argmax is not None:
            accepted = torch.where(is_greedy[token_request], drafts == target_argmax[token_row],
                                   accepted)
    accepted &= ~is_placeholder

    width = max_draft_len + 1
    accepted_padded = torch.zeros(batch, width, dtype=torch.bool, device=device)
    accepted_padded[token_request, token_position] = accepted
    num_accepted = accepted_padded.long().cumprod(dim=1).sum(dim=1)  # [batch] leading accepts

    # One final token per request: the recovered token at its first rejection, else the bonus.
    # The residual max(p - q, 0) is built only for that one row per request, not for every draft.
    final_token = bonus.long()
    if num_tokens > 0:
        last_draft = (num_draft - 1).clamp(min=0)
        reject_token = (draft_start + torch.minimum(num_accepted, last_draft)).clamp(max=num_tokens - 1)
        reject_row = token_row[reject_token]  # [batch]
        rejected = num_accepted < num_draft  # [batch]
        greedy_token = None if target_argmax is None else target_argmax[reject_row]
        if target_probs is None:  # every row greedy
            recovered = greedy_token
        elif isinstance(exponential_samples, torch.Tensor):
            sampled_token = exponential_race(
                _residual(target_probs, draft_probs, reject_row, reject_token, safe_drafts,
                          is_placeholder), exponential_samples)
            recovered = (sampled_token if greedy_token is None
                         else torch.where(is_greedy, greedy_token, sampled_token))
        else:  # a row source: residuals and noise only for the rows that recover a sampled token
            recovered = (torch.zeros_like(num_accepted) if greedy_token is None
                         else greedy_token.clone())
            rows = (rejected & ~is_greedy).nonzero().squeeze(1)  # one host sync
            if rows.numel():
                residual = _residual(target_probs, draft_probs, reject_row[rows],
                                     reject_token[rows], safe_drafts, is_placeholder)
                recovered = recovered.index_put((rows,), exponential_race(
                    residual, exponential_samples(rows)))
        final_token = torch.where(rejected, recovered, final_token)

    draft_padded = torch.full((batch, width), PLACEHOLDER_TOKEN_ID, dtype=torch.int64,
                              device=device)
    draft_padded[token_request, token_position] = drafts
    slot = torch.arange(width, device=device).unsqueeze(0)  # [1, width]
    output = torch.where(slot < num_accepted.unsqueeze(1), draft_padded, PLACEHOLDER_TOKEN_ID)
    output = torch.where(slot == num_accepted.unsqueeze(1), final_token.unsqueeze(1), output)
    return RejectionOutput(output_token_ids=output, num_accepted=num_accepted)


def _residual(
    target_probs: torch.Tensor,  # [num_rows, vocab]
    draft_probs: torch.Tensor | None,  # [num_tokens, vocab]; None = one-hot
    reject_row: torch.Tensor,  # [n] row of target_probs at each rejection
    reject_token: torch.Tensor,  # [n] draft position of each rejection
    safe_drafts: torch.Tensor,  # [num_tokens] draft ids, placeholders clamped to 0
    is_placeholder: torch.Tensor,  # [num_tokens] bool
) -> torch.Tensor:
    """[n, vocab] weights of the recovered token at each rejection: max(p - q, 0) (one-hot q:
    p without the drafted token); p itself where the draft was a placeholder (it proposed
    nothing, q = 0) or the residual is all zero (p == q numerically)."""
    reject_target_probs = target_probs[reject_row]
    if draft_probs is None:
        residual = reject_target_probs.scatter(1, safe_drafts[reject_token].unsqueeze(1), 0.0)
    else:
        residual = (reject_target_probs
                    - draft_probs[reject_token].to(target_probs.dtype)).clamp(min=0.0)
    recover_from_target = (is_placeholder[reject_token].unsqueeze(1)
                           | (residual.amax(dim=-1, keepdim=True) <= 0))
    return torch.where(recover_from_target, reject_target_probs, residual)


def rejection_sample_drafts(
    draft_token_ids: torch.Tensor,  # [num_tokens] int; PLACEHOLDER_TOKEN_ID = padding
    cu_num_draft_tokens: torch.Tensor,  # [batch] int, inclusive cumulative sum of draft lengths
    draft_probs: torch.Tensor | None,  # [num_tokens, vocab]; None = one-hot verification
    target_logits: torch.Tensor,  # [num_tokens, vocab]: the target's logits AT the draft positions
    temperature: torch.Tensor,  # [batch] float; 0 = greedy
    top_k: torch.Tensor | None,  # [batch] int; 0 or >= vocab = off
    top_p: torch.Tensor | None,  # [batch] float; 1.0 = off
    bonus_token_ids: torch.Tensor,  # [batch] int: emitted when every draft is accepted
    uniform_samples: torch.Tensor,  # [num_tokens] float64 in [0, 1)
    exponential_samples: ExponentialSource,  # [batch, vocab] Exp(1) for the recovered token's
    # race, or a row source (exponential_rows) drawn only for the rows that recover a sampled token
    max_draft_len: int | None = None,
    acceptance_rates: torch.Tensor | None = None,  # [>= max_draft_len] float in [0, 1]
) -> RejectionOutput:
    """Speculative sampling over the draft positions only, the bonus tokens given (pure PyTorch).

    The same rule as `rejection_sample_reference` (token for token, given the same bonus tokens and
    random numbers), on vLLM's RejectionSampler layout: the caller gathers the target logits at the
    draft positions (in any order its metadata describes) and draws the bonus tokens. Rows of
    target_logits are in draft order: row i is the target's logits at draft position i.

    acceptance_rates: None for the speculative-sampling rule (lossless). Otherwise vLLM's
    "synthetic" rejection sampling, a benchmarking mode that is NOT lossless: the draft at position
    j is accepted with probability acceptance_rates[j] whatever the laws, a rejection emits what a
    real rejection would (greedy: the target argmax; sampled: a recovered token).
    """
    batch, num_tokens, vocab = check_rejection_inputs(
        draft_token_ids, cu_num_draft_tokens, draft_probs, target_logits, temperature, top_k, top_p,
        uniform_samples, exponential_samples, max_draft_len, bonus_rows=False)
    if bonus_token_ids.shape != (batch,) or bonus_token_ids.dtype not in _INDEX_DTYPES:
        raise ValueError(f"rejection_sample_drafts: bonus_token_ids must be an int32/int64 tensor "
                         f"[batch] = [{batch}], got shape {tuple(bonus_token_ids.shape)} dtype "
                         f"{bonus_token_ids.dtype}")
    if acceptance_rates is not None and (acceptance_rates.ndim != 1
                                         or not acceptance_rates.is_floating_point()):
        raise ValueError("rejection_sample_drafts: acceptance_rates must be None or a 1-D float "
                         f"tensor [>= max_draft_len], got shape {tuple(acceptance_rates.shape)}")
    if max_draft_len is None:
        max_draft_len = _max_draft_len(cu_num_draft_tokens)
    device = target_logits.device
    token_request = request_index(num_draft_tokens_per_request(cu_num_draft_tokens), num_tokens)
    is_greedy = temperature == 0  # [batch]
    # What the rows need (two host syncs): greedy rows the argmax of the raw logits, sampled rows
    # the target law p. A batch of one kind skips the other's [num_tokens, vocab] pass.
    any_greedy, any_sampled = bool(is_greedy.any()), not bool(is_greedy.all())
    if any_sampled:
        scaled_logits = _scaled_rows(target_logits, token_request, temperature, top_k, top_p)
        target_probs = scaled_logits.softmax(dim=-1)
        target_argmax = scaled_logits.argmax(dim=-1) if any_greedy else None
    else:
        target_probs, target_argmax = None, target_logits.argmax(dim=-1)
    return _accept_then_emit(
        draft_token_ids, cu_num_draft_tokens, draft_probs, target_probs, target_argmax,
        torch.arange(num_tokens, device=device), is_greedy, bonus_token_ids.to(device),
        uniform_samples, exponential_samples, max_draft_len, acceptance_rates)


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [num_tokens] int
    cu_num_draft_tokens: torch.Tensor,  # [batch] int, inclusive cumulative sum of draft lengths
    draft_probs: torch.Tensor | None,  # [num_tokens, vocab]; None = one-hot verification
    target_logits: torch.Tensor,  # [num_tokens + batch, vocab]: per request drafts, then bonus
    temperature: torch.Tensor,  # [batch] float; 0 = greedy
    top_k: torch.Tensor | None,  # [batch] int; 0 or >= vocab = off
    top_p: torch.Tensor | None,  # [batch] float; 1.0 = off
    uniform_samples: torch.Tensor,  # [num_tokens] float64 in [0, 1)
    exponential_samples: torch.Tensor,  # [batch, vocab] Exp(1): recovered OR bonus token race
    max_draft_len: int | None = None,
) -> RejectionOutput:
    """Speculative sampling (Leviathan et al. 2023, Algorithm 1) for a ragged batch.

    Triton kernels when the inputs are on CUDA and triton is installed, else
    `rejection_sample_reference`; both follow the module docstring and agree token for token.
    """
    args = (draft_token_ids, cu_num_draft_tokens, draft_probs, target_logits, temperature, top_k,
            top_p, uniform_samples, exponential_samples, max_draft_len)
    if target_logits.is_cuda and target_logits.dtype != torch.float64 and _triton_available():
        from vllm_specdiff.kernels.rejection import rejection_sample_triton

        return rejection_sample_triton(*args)
    return rejection_sample_reference(*args)


__all__ = [
    "PLACEHOLDER_TOKEN_ID",
    "RejectionOutput",
    "check_rejection_inputs",
    "draft_position_scaled_logits",
    "draw_random",
    "draw_uniform_samples",
    "exponential_race",
    "exponential_rows",
    "mask_filtered_logits",
    "rejection_sample",
    "rejection_sample_drafts",
    "rejection_sample_reference",
    "target_scaled_logits",
    "top_k_top_p_mask",
]
