"""Triton kernels for batched lossless verification (Leviathan et al. 2023, Algorithm 1).

Same inputs, semantics and outputs as `vllm_specdiff.verification.rejection_sample_reference`, which
is the specification; under shared random numbers the two agree token for token. (The kernels sum
exp() in another order and race in log space, so a draw whose u or race scores tie to within float
rounding, about 1e-7 relative, could go the other way: vanishingly rare, and never a bias.)

Two launches, no host syncs, no [num_tokens, vocab] fp32 probability tensor:

1. `_target_row_stats_kernel`, one program per (request, position) row of target_logits (draft
   positions and the bonus position). It reads the logit row ONCE in vocab tiles (fp32/bf16/fp16,
   converted per tile) and keeps, online:
   - max and sum of exp(z - max) of z = logits / temperature (online softmax), which give
     p(v) = exp(z_v - max) / sum for any single v later;
   - the argmax of z (first index on ties, like torch.argmax): the greedy token;
   - for bonus rows and one-hot draft rows, the exponential-race winner argmax(p / E), computed as
     argmax(z - log E), which needs neither max nor sum (one-hot rows exclude the drafted token).
2. `_verify_kernel`, one program per request, walks its draft positions in order: greedy rows
   compare with the argmax; random rows accept iff u * q(x) <= p(x), reading the single logit z_x
   and q(x). The token after the last accepted draft is the greedy/race token of that row, except
   for a rejection with full draft probs: normalize(max(p - q, 0)) needs the row's max and sum, so
   that ONE row per request is read a second time, with its draft probs, for the residual race.

Top-k / top-p rows fall back to a torch pre-pass (`mask_filtered_logits`: sort, mask to -inf) over
the logits before the kernels; the kernels then see filtered logits and behave as above.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_specdiff.verification import (
    PLACEHOLDER_TOKEN_ID,
    RejectionOutput,
    _max_draft_len,
    check_rejection_inputs,
    mask_filtered_logits,
)

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _draft_range(cu_num_draft_tokens_ptr, request):
    """(first flattened draft token, number of drafts) of `request`, int64."""
    draft_end = tl.load(cu_num_draft_tokens_ptr + request).to(tl.int64)
    draft_start = tl.load(cu_num_draft_tokens_ptr + request - 1, mask=request > 0, other=0)
    draft_start = draft_start.to(tl.int64)
    return draft_start, draft_end - draft_start


@triton.jit
def _target_row_stats_kernel(
    row_stats_ptr,  # [num_rows, 2] float32 out: (max z, sum exp(z - max)), z = logits / temperature
    row_tokens_ptr,  # [num_rows, 2] int32 out: (argmax z, race winner argmax(p / E) or -1)
    target_logits_ptr,  # [num_rows, vocab] fp32/bf16/fp16, contiguous
    exponential_ptr,  # [batch, vocab] float32, contiguous
    draft_token_ids_ptr,  # [num_tokens]
    cu_num_draft_tokens_ptr,  # [batch]
    temperature_ptr,  # [batch] float32
    vocab_size,
    ONE_HOT: tl.constexpr,  # no draft probs: draft rows race over p without the drafted token
    BLOCK_SIZE: tl.constexpr,
):
    request = tl.program_id(0)
    position = tl.program_id(1)
    draft_start, num_draft = _draft_range(cu_num_draft_tokens_ptr, request)
    if position > num_draft:
        return
    row = draft_start + request + position  # int64; the bonus row when position == num_draft
    is_draft_row = position < num_draft
    temperature = tl.load(temperature_ptr + request)
    is_greedy = temperature == 0.0
    temperature = tl.where(is_greedy, 1.0, temperature)
    # Full-q draft rows are raced over max(p - q, 0) by _verify_kernel, which has max and sum.
    needs_race = (not is_greedy) and ((not is_draft_row) or ONE_HOT)
    excluded = tl.load(draft_token_ids_ptr + draft_start + position,
                       mask=is_draft_row and ONE_HOT, other=-1).to(tl.int32)

    logits_row_ptr = target_logits_ptr + row * vocab_size
    exponential_row_ptr = exponential_ptr + request.to(tl.int64) * vocab_size
    row_max = tl.full((), float("-inf"), tl.float32)
    row_sum = tl.full((), 0.0, tl.float32)
    argmax_value = tl.full((), float("-inf"), tl.float32)
    argmax_index = tl.full((), 0, tl.int32)  # torch.argmax of an all -inf row is 0
    race_value = tl.full((), float("-inf"), tl.float32)
    race_index = tl.full((), -1, tl.int32)
    for vocab_start in range(0, vocab_size, BLOCK_SIZE):
        offsets = vocab_start + tl.arange(0, BLOCK_SIZE)
        in_vocab = offsets < vocab_size
        scaled = tl.load(logits_row_ptr + offsets, mask=in_vocab, other=float("-inf"))
        scaled = scaled.to(tl.float32) / temperature
        # Strict > across tiles and leftmost index within a tile: the first maximal index overall.
        tile_max, tile_argmax = tl.max(scaled, axis=0, return_indices=True,
                                       return_indices_tie_break_left=True)
        if tile_max > argmax_value:
            argmax_value = tile_max
            argmax_index = vocab_start + tile_argmax
        new_max = tl.maximum(row_max, tile_max)
        # While every logit so far is -inf (filtered), shift by 0 to avoid -inf - -inf = nan.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(scaled - shift), axis=0)
        row_max = new_max
        if needs_race:
            exponential = tl.load(exponential_row_ptr + offsets, mask=in_vocab, other=1.0)
            # argmax(p / E) = argmax(z - log E): the race needs no normalisation, so one pass.
            race_scores = scaled - tl.log(exponential)
            race_scores = tl.where(in_vocab & (offsets != excluded), race_scores, float("-inf"))
            tile_best, tile_winner = tl.max(race_scores, axis=0, return_indices=True,
                                            return_indices_tie_break_left=True)
            if tile_best > race_value:
                race_value = tile_best
                race_index = vocab_start + tile_winner
    tl.store(row_stats_ptr + 2 * row, row_max)
    tl.store(row_stats_ptr + 2 * row + 1, row_sum)
    tl.store(row_tokens_ptr + 2 * row, argmax_index)
    tl.store(row_tokens_ptr + 2 * row + 1, race_index)


@triton.jit
def _residual_race(
    logits_row_ptr,  # [vocab] target logits of the rejected row
    draft_probs_row_ptr,  # [vocab] draft law of the rejected position
    exponential_row_ptr,  # [vocab] Exp(1) of the request
    temperature,
    row_max,
    row_sum,
    vocab_size,
    BLOCK_SIZE: tl.constexpr,
):
    """Recovered token argmax(max(p - q, 0) / E); argmax(p / E) if max(p - q, 0) is all zero."""
    residual_value = tl.full((), -1.0, tl.float32)
    residual_index = tl.full((), 0, tl.int32)
    target_value = tl.full((), -1.0, tl.float32)
    target_index = tl.full((), 0, tl.int32)
    for vocab_start in range(0, vocab_size, BLOCK_SIZE):
        offsets = vocab_start + tl.arange(0, BLOCK_SIZE)
        in_vocab = offsets < vocab_size
        scaled = tl.load(logits_row_ptr + offsets, mask=in_vocab, other=float("-inf"))
        target_probs = tl.exp(scaled.to(tl.float32) / temperature - row_max) / row_sum
        draft_probs = tl.load(draft_probs_row_ptr + offsets, mask=in_vocab, other=0.0)
        exponential = tl.load(exponential_row_ptr + offsets, mask=in_vocab, other=1.0)
        residual = tl.maximum(target_probs - draft_probs.to(tl.float32), 0.0)
        residual_scores = tl.where(in_vocab, residual / exponential, -1.0)
        target_scores = tl.where(in_vocab, target_probs / exponential, -1.0)
        tile_best, tile_winner = tl.max(residual_scores, axis=0, return_indices=True,
                                        return_indices_tie_break_left=True)
        if tile_best > residual_value:
            residual_value = tile_best
            residual_index = vocab_start + tile_winner
        tile_best, tile_winner = tl.max(target_scores, axis=0, return_indices=True,
                                        return_indices_tie_break_left=True)
        if tile_best > target_value:
            target_value = tile_best
            target_index = vocab_start + tile_winner
    return tl.where(residual_value > 0.0, residual_index, target_index)


@triton.jit
def _verify_kernel(
    output_token_ids_ptr,  # [batch, output_width] int64, prefilled with PLACEHOLDER_TOKEN_ID
    num_accepted_ptr,  # [batch] int64 out
    row_stats_ptr,  # [num_rows, 2] float32 from _target_row_stats_kernel
    row_tokens_ptr,  # [num_rows, 2] int32 from _target_row_stats_kernel
    target_logits_ptr,  # [num_rows, vocab]
    draft_probs_ptr,  # [num_tokens, vocab] fp32/bf16/fp16, or None when not HAS_DRAFT_PROBS
    exponential_ptr,  # [batch, vocab] float32
    draft_token_ids_ptr,  # [num_tokens]
    cu_num_draft_tokens_ptr,  # [batch]
    temperature_ptr,  # [batch] float32
    uniform_samples_ptr,  # [num_tokens] float64
    vocab_size,
    output_width,
    HAS_DRAFT_PROBS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    request = tl.program_id(0)
    draft_start, num_draft = _draft_range(cu_num_draft_tokens_ptr, request)
    temperature = tl.load(temperature_ptr + request)
    is_greedy = temperature == 0.0
    temperature = tl.where(is_greedy, 1.0, temperature)
    first_row = draft_start + request
    output_row_ptr = output_token_ids_ptr + request.to(tl.int64) * output_width

    num_accepted = tl.full((), 0, tl.int64)
    for position in range(0, num_draft):
        # Still accepting iff every earlier draft was accepted.
        if num_accepted == position:
            token = draft_start + position
            row = first_row + position
            draft_token = tl.load(draft_token_ids_ptr + token)
            if is_greedy:
                accepted = draft_token == tl.load(row_tokens_ptr + 2 * row)
            else:
                scaled = tl.load(target_logits_ptr + row * vocab_size + draft_token)
                scaled = scaled.to(tl.float32) / temperature
                target_prob = (tl.exp(scaled - tl.load(row_stats_ptr + 2 * row))
                               / tl.load(row_stats_ptr + 2 * row + 1))
                if HAS_DRAFT_PROBS:
                    draft_prob = tl.load(draft_probs_ptr + token * vocab_size + draft_token)
                    draft_prob = draft_prob.to(tl.float32)
                else:
                    draft_prob = tl.full((), 1.0, tl.float32)
                uniform = tl.load(uniform_samples_ptr + token)
                accepted = uniform * draft_prob.to(tl.float64) <= target_prob.to(tl.float64)
            if accepted:
                tl.store(output_row_ptr + position, draft_token.to(tl.int64))
                num_accepted += 1

    # The row after the accepted drafts: the rejected position, or the bonus position.
    final_row = first_row + num_accepted
    greedy_token = tl.load(row_tokens_ptr + 2 * final_row)
    race_token = tl.load(row_tokens_ptr + 2 * final_row + 1)
    rejected = num_accepted < num_draft
    if HAS_DRAFT_PROBS:
        if rejected and (not is_greedy):
            race_token = _residual_race(
                target_logits_ptr + final_row * vocab_size,
                draft_probs_ptr + (draft_start + num_accepted) * vocab_size,
                exponential_ptr + request.to(tl.int64) * vocab_size,
                temperature,
                tl.load(row_stats_ptr + 2 * final_row),
                tl.load(row_stats_ptr + 2 * final_row + 1),
                vocab_size,
                BLOCK_SIZE,
            )
    else:
        # Race -1: p without the drafted token is all zero, so recover from p: the drafted token.
        rejected_draft = tl.load(draft_token_ids_ptr + draft_start + num_accepted, mask=rejected,
                                 other=0)
        race_token = tl.where(race_token < 0, rejected_draft.to(tl.int32), race_token)
    final_token = tl.where(is_greedy, greedy_token, race_token)
    tl.store(output_row_ptr + num_accepted, final_token.to(tl.int64))
    tl.store(num_accepted_ptr + request, num_accepted)


def _check_kernel_input(name: str, tensor: torch.Tensor, ndim: int,
                        dtypes: tuple[torch.dtype, ...]) -> None:
    assert tensor.ndim == ndim, f"{name}: expected {ndim}-D, got shape {tuple(tensor.shape)}"
    assert tensor.dtype in dtypes, f"{name}: expected one of {dtypes}, got {tensor.dtype}"
    assert tensor.is_contiguous(), f"{name} must be contiguous"


def launch_target_row_stats(
    row_stats: torch.Tensor,  # [num_rows, 2] float32 out
    row_tokens: torch.Tensor,  # [num_rows, 2] int32 out
    target_logits: torch.Tensor,  # [num_rows, vocab]
    exponential_samples: torch.Tensor,  # [batch, vocab] float32
    draft_token_ids: torch.Tensor,  # [num_tokens]
    cu_num_draft_tokens: torch.Tensor,  # [batch]
    temperature: torch.Tensor,  # [batch] float32
    max_draft_len: int,
    one_hot: bool,
    block_size: int,
) -> None:
    _check_kernel_input("row_stats", row_stats, 2, (torch.float32,))
    _check_kernel_input("row_tokens", row_tokens, 2, (torch.int32,))
    _check_kernel_input("target_logits", target_logits, 2, _LOGIT_DTYPES)
    _check_kernel_input("exponential_samples", exponential_samples, 2, (torch.float32,))
    _check_kernel_input("draft_token_ids", draft_token_ids, 1, _INDEX_DTYPES)
    _check_kernel_input("cu_num_draft_tokens", cu_num_draft_tokens, 1, _INDEX_DTYPES)
    _check_kernel_input("temperature", temperature, 1, (torch.float32,))
    batch, vocab = exponential_samples.shape
    assert row_stats.shape == row_tokens.shape == (target_logits.shape[0], 2)
    assert target_logits.shape[1] == vocab
    grid = (batch, max_draft_len + 1)
    _target_row_stats_kernel[grid](
        row_stats, row_tokens, target_logits, exponential_samples, draft_token_ids,
        cu_num_draft_tokens, temperature, vocab,
        ONE_HOT=one_hot, BLOCK_SIZE=block_size,
    )


def launch_verify(
    output_token_ids: torch.Tensor,  # [batch, max_draft_len + 1] int64, prefilled placeholders
    num_accepted: torch.Tensor,  # [batch] int64 out
    row_stats: torch.Tensor,  # [num_rows, 2] float32
    row_tokens: torch.Tensor,  # [num_rows, 2] int32
    target_logits: torch.Tensor,  # [num_rows, vocab]
    draft_probs: torch.Tensor | None,  # [num_tokens, vocab]
    exponential_samples: torch.Tensor,  # [batch, vocab] float32
    draft_token_ids: torch.Tensor,  # [num_tokens]
    cu_num_draft_tokens: torch.Tensor,  # [batch]
    temperature: torch.Tensor,  # [batch] float32
    uniform_samples: torch.Tensor,  # [num_tokens] float64
    block_size: int,
) -> None:
    _check_kernel_input("output_token_ids", output_token_ids, 2, (torch.int64,))
    _check_kernel_input("num_accepted", num_accepted, 1, (torch.int64,))
    _check_kernel_input("row_stats", row_stats, 2, (torch.float32,))
    _check_kernel_input("row_tokens", row_tokens, 2, (torch.int32,))
    _check_kernel_input("target_logits", target_logits, 2, _LOGIT_DTYPES)
    if draft_probs is not None:
        _check_kernel_input("draft_probs", draft_probs, 2, _LOGIT_DTYPES)
    _check_kernel_input("exponential_samples", exponential_samples, 2, (torch.float32,))
    _check_kernel_input("draft_token_ids", draft_token_ids, 1, _INDEX_DTYPES)
    _check_kernel_input("cu_num_draft_tokens", cu_num_draft_tokens, 1, _INDEX_DTYPES)
    _check_kernel_input("temperature", temperature, 1, (torch.float32,))
    _check_kernel_input("uniform_samples", uniform_samples, 1, (torch.float64,))
    batch, vocab = exponential_samples.shape
    _verify_kernel[(batch,)](
        output_token_ids, num_accepted, row_stats, row_tokens, target_logits, draft_probs,
        exponential_samples, draft_token_ids, cu_num_draft_tokens, temperature, uniform_samples,
        vocab, output_token_ids.shape[1],
        HAS_DRAFT_PROBS=draft_probs is not None, BLOCK_SIZE=block_size,
    )


def rejection_sample_triton(
    draft_token_ids: torch.Tensor,  # [num_tokens] int
    cu_num_draft_tokens: torch.Tensor,  # [batch] int
    draft_probs: torch.Tensor | None,  # [num_tokens, vocab] fp32/bf16/fp16; None = one-hot
    target_logits: torch.Tensor,  # [num_tokens + batch, vocab] fp32/bf16/fp16
    temperature: torch.Tensor,  # [batch] float32
    top_k: torch.Tensor | None,  # [batch] int
    top_p: torch.Tensor | None,  # [batch] float32
    uniform_samples: torch.Tensor,  # [num_tokens] float64
    exponential_samples: torch.Tensor,  # [batch, vocab] float32
    max_draft_len: int | None = None,
    *,
    block_size: int = 1024,
) -> RejectionOutput:
    """Triton implementation of `rejection_sample` (Leviathan et al. 2023, Algorithm 1).

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests). block_size is the
    vocab tile (a power of two). Top-k/top-p use the torch pre-pass `mask_filtered_logits`.
    """
    batch, num_tokens, vocab = check_rejection_inputs(
        draft_token_ids, cu_num_draft_tokens, draft_probs, target_logits, temperature, top_k, top_p,
        uniform_samples, exponential_samples, max_draft_len)
    if max_draft_len is None:
        max_draft_len = _max_draft_len(cu_num_draft_tokens)
    device = target_logits.device
    output_token_ids = torch.full((batch, max_draft_len + 1), PLACEHOLDER_TOKEN_ID,
                                  dtype=torch.int64, device=device)
    num_accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return RejectionOutput(output_token_ids=output_token_ids, num_accepted=num_accepted)
    target_logits = mask_filtered_logits(target_logits, cu_num_draft_tokens, temperature, top_k,
                                         top_p).contiguous()
    # No-ops for inputs that already follow the documented dtypes and layout.
    draft_token_ids = draft_token_ids.contiguous()
    cu_num_draft_tokens = cu_num_draft_tokens.contiguous()
    draft_probs = None if draft_probs is None else draft_probs.contiguous()
    temperature = temperature.to(torch.float32).contiguous()
    uniform_samples = uniform_samples.contiguous()
    exponential_samples = exponential_samples.to(torch.float32).contiguous()
    num_rows = num_tokens + batch
    row_stats = torch.empty((num_rows, 2), dtype=torch.float32, device=device)
    row_tokens = torch.empty((num_rows, 2), dtype=torch.int32, device=device)
    launch_target_row_stats(
        row_stats, row_tokens, target_logits, exponential_samples, draft_token_ids,
        cu_num_draft_tokens, temperature, max_draft_len, one_hot=draft_probs is None,
        block_size=block_size)
    launch_verify(
        output_token_ids, num_accepted, row_stats, row_tokens, target_logits, draft_probs,
        exponential_samples, draft_token_ids, cu_num_draft_tokens, temperature, uniform_samples,
        block_size=block_size)
    return RejectionOutput(output_token_ids=output_token_ids, num_accepted=num_accepted)


__all__ = ["launch_target_row_stats", "launch_verify", "rejection_sample_triton"]
