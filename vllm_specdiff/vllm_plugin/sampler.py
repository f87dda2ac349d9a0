"""Our verifier as a drop-in for vLLM's RejectionSampler (installed on the runner by the proposer).

The contract of `RejectionSampler.forward(metadata, draft_probs, logits, sampling_metadata)`, as
vLLM's own tests/v1/sample/test_rejection_sampler.py define it (tests/test_vllm_upstream_sampler.py
runs them against this class):
- `logits` is read ONLY through `metadata.target_logits_indices` (the target's logits at each draft
  position, in draft order) and `metadata.bonus_logits_indices`; no row layout is assumed and
  nothing is written into it;
- bonus tokens come from vLLM's own sampler (`self.sampler`: every logits processor, the request's
  generator), shaped [batch] or [batch, 1];
- a draft id PLACEHOLDER_TOKEN_ID (-1, vLLM's padding) is never accepted;
- `spec_config.rejection_sample_method`: "standard", or "synthetic" (fixed per-position acceptance
  rates, vLLM's benchmarking mode); any other method is refused when the sampler is built;
- returns SamplerOutput(sampled_token_ids int32 [batch, max_spec_len + 1], -1 after the last token).

The target law (temperature, top-k, top-p) is applied inside vllm_specdiff.verification, on the
target side only, so it holds for every request whatever the drafter did.
"""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..verification import (draft_position_scaled_logits, draw_random, draw_uniform_samples,
                            exponential_rows, rejection_sample, rejection_sample_drafts)

REJECTION_SAMPLE_METHODS = ("standard", "synthetic")

_SAMPLER_CLASS: type | None = None


def check_rejection_sample_method(method: Any) -> None:
    """Raise ValueError unless our verifier implements vLLM's rejection_sample_method `method`."""
    if isinstance(method, str) and method not in REJECTION_SAMPLE_METHODS:
        raise ValueError(
            f"specdiff: rejection_sample_method {method!r} is not implemented by the specdiff "
            f"verifier (it implements {', '.join(REJECTION_SAMPLE_METHODS)}); vLLM implements "
            "'block' only in its V2 model runner, which the specdiff method (custom_class) cannot "
            "use. Remove rejection_sample_method from --speculative-config or set it to 'standard'")


def _triton_kernels(device: torch.device | str | None):
    """rejection_sample's Triton path on CUDA with triton installed, else None (PyTorch path)."""
    if device is None or torch.device(device).type != "cuda":
        return None
    if importlib.util.find_spec("triton") is None:
        return None
    return rejection_sample


def specdiff_rejection_sampler_class() -> type:
    """Defined lazily: subclassing vLLM's RejectionSampler imports vLLM's sampling stack."""
    global _SAMPLER_CLASS
    if _SAMPLER_CLASS is not None:
        return _SAMPLER_CLASS
    from vllm.v1.outputs import SamplerOutput
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    class SpecDiffRejectionSampler(RejectionSampler):
        """vLLM's logits processors, bonus token and logprobs; our batched speculative sampling
        (vllm_specdiff.verification) for the draft positions."""

        def __init__(self, sampler: Any, spec_config: Any = None,
                     device: torch.device | None = None) -> None:
            if spec_config is not None:
                check_rejection_sample_method(getattr(spec_config, "rejection_sample_method",
                                                      "standard"))
            # vLLM's constructor sets the logprobs modes and, for "synthetic", the per-position
            # conditional acceptance rates (self.synthetic_conditional_rates).
            super().__init__(sampler, spec_config, device)
            # The Triton kernels read the interleaved layout [num_tokens + batch, vocab].
            self.kernels = _triton_kernels(device)

        def forward(self, metadata, draft_probs, logits, sampling_metadata) -> SamplerOutput:
            bonus_logits = logits[metadata.bonus_logits_indices]
            bonus_sampler_output = self.sampler(
                logits=bonus_logits,
                sampling_metadata=replace(sampling_metadata, max_num_logprobs=-1),
                predict_bonus_token=True,
                logprobs_mode_override=("processed_logits" if self.is_processed_logprobs_mode
                                        else "raw_logits"),
            )
            bonus_token_ids = bonus_sampler_output.sampled_token_ids.reshape(-1)  # [batch]

            # The gather is the only copy of the target logits (as in vLLM); the raw values are
            # kept aside only when raw logprobs will be read from them.
            target_logits = logits[metadata.target_logits_indices].to(torch.float32)
            want_logprobs = sampling_metadata.max_num_logprobs is not None
            raw_target_logits = (target_logits.clone()
                                 if want_logprobs and not self.is_processed_logprobs_mode
                                 else target_logits)
            # [num_tokens, vocab]; may update target_logits in place
            target_logits = self.apply_logits_processors(target_logits, sampling_metadata,
                                                         metadata)

            num_draft = metadata.num_draft_tokens  # host list [batch]
            batch, vocab = len(num_draft), target_logits.shape[1]
            device = target_logits.device
            temperature = sampling_metadata.temperature
            if sampling_metadata.all_greedy or temperature is None:
                temperature = torch.zeros(batch, dtype=torch.float32, device=device)
            temperature = temperature.to(torch.float32)
            synthetic_rates = self.synthetic_conditional_rates
            draft_token_ids = metadata.draft_token_ids
            use_kernels = (self.kernels is not None and synthetic_rates is None
                           # The kernels expect valid draft ids; placeholders (-1, vLLM's padding
                           # after a grammar rejected drafts) are rare: this one host sync routes
                           # them to the PyTorch path, which handles them.
                           and not bool((draft_token_ids < 0).any()))
            uniform_samples, exponential_samples = self._random_numbers(
                num_draft, vocab, sampling_metadata, synthetic_rates is not None, device,
                eager=use_kernels)
            if draft_probs is not None:
                draft_probs = draft_probs.to(torch.float32).contiguous()
            args = (draft_token_ids, metadata.cu_num_draft_tokens, draft_probs, target_logits,
                    temperature, sampling_metadata.top_k, sampling_metadata.top_p)
            if use_kernels:
                output_token_ids = self._verify_with_kernels(
                    *args, bonus_token_ids, uniform_samples, exponential_samples, num_draft,
                    metadata.max_spec_len)
            else:
                output_token_ids = rejection_sample_drafts(
                    *args, bonus_token_ids, uniform_samples, exponential_samples,
                    max_draft_len=metadata.max_spec_len,
                    acceptance_rates=synthetic_rates).output_token_ids
            output_token_ids = output_token_ids.to(torch.int32)  # SamplerOutput's dtype

            logprobs_tensors = None
            if want_logprobs:
                logprobs_logits = raw_target_logits
                if self.is_processed_logprobs_mode:
                    logprobs_logits = draft_position_scaled_logits(
                        target_logits, metadata.cu_num_draft_tokens, temperature,
                        sampling_metadata.top_k, sampling_metadata.top_p)
                logprobs_tensors = self._get_logprobs_tensors(
                    sampling_metadata.max_num_logprobs, metadata, logits, logprobs_logits,
                    bonus_sampler_output.logprobs_tensors.logprobs, output_token_ids)
            return SamplerOutput(sampled_token_ids=output_token_ids,
                                 logprobs_tensors=logprobs_tensors)

        @staticmethod
        def _random_numbers(num_draft: list[int], vocab: int, sampling_metadata,
                            synthetic: bool, device: torch.device, eager: bool):
            """(uniform [num_tokens] float64, the recovered tokens' exponential noise).

            Like vLLM: seeded requests draw from their own generator, and only when they have
            drafts (a generator's stream must not depend on steps without drafts); an all-greedy
            batch draws nothing (greedy rows read neither). The noise is a row source
            (verification.exponential_rows): only requests that reject a sampled draft draw a
            [vocab] row, where vLLM draws [batch, vocab] on every step with a draft. The Triton
            kernels (`eager`) read a full table.
            """
            cu_cpu = torch.as_tensor(np.cumsum(num_draft, dtype=np.int64))
            if sampling_metadata.all_greedy and not synthetic:
                num_tokens = int(cu_cpu[-1]) if len(num_draft) else 0
                return (torch.zeros(num_tokens, dtype=torch.float64, device=device),
                        torch.ones(1, 1, device=device).expand(len(num_draft), vocab))
            gens = sampling_metadata.generators
            generators = ([gens.get(i) if n > 0 else None for i, n in enumerate(num_draft)]
                          if gens else None)
            if eager:
                return draw_random(cu_cpu, vocab, generators, device)
            return (draw_uniform_samples(cu_cpu, generators, device),
                    exponential_rows(vocab, generators, device))

        def _verify_with_kernels(self, draft_token_ids, cu_num_draft_tokens, draft_probs,
                                 target_logits, temperature, top_k, top_p, bonus_token_ids,
                                 uniform_samples, exponential_samples, num_draft: list[int],
                                 max_spec_len: int) -> torch.Tensor:
            """The Triton path: the kernels read [num_tokens + batch, vocab], per request its
            draft rows then a bonus row. The draft rows are copied into that layout by OUR index
            (computed from num_draft); the bonus rows are zeros (their token is replaced by
            vLLM's bonus token below)."""
            num_tokens, vocab = target_logits.shape
            batch = len(num_draft)
            device = target_logits.device
            draft_rows_np = np.arange(num_tokens) + np.repeat(np.arange(batch), num_draft)
            bonus_rows_np = np.cumsum(num_draft, dtype=np.int64) + np.arange(batch)
            draft_rows = torch.as_tensor(draft_rows_np, dtype=torch.int64).to(device,
                                                                              non_blocking=True)
            bonus_rows = torch.as_tensor(bonus_rows_np, dtype=torch.int64).to(device,
                                                                              non_blocking=True)
            kernel_logits = target_logits.new_empty((num_tokens + batch, vocab))
            kernel_logits.index_copy_(0, draft_rows, target_logits)
            kernel_logits.index_fill_(0, bonus_rows, 0.0)
            out = self.kernels(draft_token_ids, cu_num_draft_tokens, draft_probs, kernel_logits,
                               temperature, top_k, top_p, uniform_samples, exponential_samples,
                               max_draft_len=max_spec_len)
            output_token_ids = out.output_token_ids
            num_draft_t = torch.as_tensor(num_draft, dtype=torch.int64).to(device)
            has_bonus = (out.num_accepted == num_draft_t).unsqueeze(1)  # [batch, 1]
            slot = num_draft_t.unsqueeze(1)
            current = output_token_ids.gather(1, slot)
            return output_token_ids.scatter(
                1, slot, torch.where(has_bonus, bonus_token_ids.to(torch.int64).unsqueeze(1),
                                     current))

    _SAMPLER_CLASS = SpecDiffRejectionSampler
    return _SAMPLER_CLASS


__all__ = ["REJECTION_SAMPLE_METHODS", "check_rejection_sample_method",
           "specdiff_rejection_sampler_class"]
