"""The specdiff proposer (vLLM `custom_class` hook) and the verifier it installs.

vLLM builds `SpecDiffProposer(vllm_config)` in every worker of the last pipeline stage, calls
`load_model(target_model)`, then once per engine step `propose(...)` with the rows of the input batch.
The runner patch (patches.py) hands the proposer each row's sampling temperature and generator
before that call and stores `take_last_draft_probs()` after it, so verification sees the full draft
law q of every draft token.

Randomness is a pure function of (seed, engine step, row) — or of (seed, request seed, position) for
seeded requests — so every tensor-parallel rank drafts bit-identically (each rank verifies with its
own copy of q) and a seeded request is reproducible whatever it is batched with.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .config import SpecDiffConfig

# Under "vllm." so that vLLM's logging configuration (handlers, level, format) applies.
logger = logging.getLogger("vllm.specdiff")

_MASK64 = (1 << 64) - 1
# Diagnostics: with VLLM_SPECDIFF_DRAFT_DIGEST=1 every rank keeps a SHA-256 over all its drafts and
# draft probabilities (stats["digest"]), so tensor-parallel ranks can be checked for agreement.
DIGEST_ENV = "VLLM_SPECDIFF_DRAFT_DIGEST"


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over a running hash): stateless and equal on
    every process, unlike Python's hash()."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


class SpecDiffProposer:
    """Drafts num_speculative_tokens tokens per running request with one batched drafter call."""

    def __init__(self, vllm_config: Any) -> None:
        from . import patches

        self.config = SpecDiffConfig.from_additional_config(vllm_config.additional_config)
        patches.install_runner_patch()
        spec_config = vllm_config.speculative_config
        self.num_draft_tokens = int(spec_config.num_speculative_tokens)
        if self.num_draft_tokens != self.config.num_draft_tokens:
            raise ValueError(f"specdiff: speculative_config.num_speculative_tokens "
                             f"{self.num_draft_tokens} differs from additional_config['specdiff'] "
                             f"num_draft_tokens {self.config.num_draft_tokens}")
        model_config = vllm_config.model_config
        self.target_vocab_size = int(model_config.get_vocab_size())
        self.max_model_len = int(model_config.max_model_len)
        self.device = torch.device(vllm_config.device_config.device)
        target_dtype = model_config.dtype if isinstance(model_config.dtype, torch.dtype) else torch.float32
        self.dtype = self.config.drafter_dtype_for(self.device.type, target_dtype)
        seed = self.config.seed if self.config.seed is not None else model_config.seed
        self.seed = int(seed or 0)
        self.drafter = None
        self._window_tail = 0
        self._step = 0
        self._runner_bound = False
        self.verifier: str | None = None  # resolved per device in bind_runner
        self._row_temperature: np.ndarray | None = None
        self._row_generators: Mapping[int, torch.Generator] = {}
        self._last_draft_probs: torch.Tensor | None = None
        # Drafter time (reported every config.log_every steps; also readable in tests).
        self.stats = {"steps": 0, "drafted_rows": 0, "draft_seconds": 0.0, "failures": 0}
        self._log_mark = (0, 0, 0.0)
        self._digest = hashlib.sha256() if os.environ.get(DIGEST_ENV) == "1" else None

    # ---- vLLM hooks ----
    def load_model(self, target_model: Any = None) -> None:
        """Load the SEDD drafter (the target is not needed: the drafter reads token ids only)."""
        from ..drafter import DiffusionDrafter
        from ..model import SEDD

        config = self.config
        model = SEDD.from_pretrained(config.drafter, device=self.device, dtype=self.dtype)
        if model.config.tokens != self.target_vocab_size:
            raise ValueError(f"specdiff: the drafter has {model.config.tokens} tokens but the target "
                             f"vocab_size is {self.target_vocab_size}")
        self.drafter = DiffusionDrafter(model, num_draft_tokens=self.num_draft_tokens,
                                        num_steps=config.num_steps or self.num_draft_tokens,
                                        order=config.order, window=config.window)
        self._window_tail = self.drafter.window - self.num_draft_tokens
        logger.info("specdiff: drafter loaded on %s (%s): %d draft tokens, %d steps, window %d, %s",
                    self.device, self.dtype, self.num_draft_tokens, self.drafter.num_steps,
                    self.drafter.window, config.order)

    def bind_runner(self, runner: Any) -> None:
        """Called by the runner patch on every step; installs our verifier once."""
        if self._runner_bound:
            return
        self._runner_bound = True
        self.verifier = self.config.verifier_for(self.device.type)
        if self.verifier == "specdiff":
            from . import patches

            patches.install_rejection_sampler(runner, specdiff_rejection_sampler_class())
        logger.info("specdiff: verifying with %s rejection sampler (%s q)",
                    "the specdiff" if self.verifier == "specdiff" else "vLLM's",
                    "full" if self.config.use_full_draft_probs else "one-hot")

    def set_sampling_state(self, temperature: Sequence[float] | np.ndarray,
                           generators: Mapping[int, torch.Generator]) -> None:
        """Per-row sampling temperature (0 = greedy) and the seeded rows' generators, for the next
        propose() call; rows are those of the input batch (aligned with sampled_token_ids)."""
        self._row_temperature = np.asarray(temperature, dtype=np.float32)
        self._row_generators = generators

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None) -> list[list[int]]:
        """Draft ids per row ([] = no draft); one drafter call for every row that needs a draft."""
        step = self._step
        self._step += 1
        self._last_draft_probs = None
        num_rows = len(sampled_token_ids)
        drafts: list[list[int]] = [[] for _ in range(num_rows)]
        rows = [row for row, sampled in enumerate(sampled_token_ids)
                if sampled and 0 < int(num_tokens_no_spec[row]) < self.max_model_len]
        temperature, self._row_temperature = self._row_temperature, None
        generators, self._row_generators = self._row_generators, {}
        if not rows or self.drafter is None:
            return drafts
        contexts = []
        for row in rows:
            end = int(num_tokens_no_spec[row])
            contexts.append(token_ids_cpu[row, max(0, end - self._window_tail):end].tolist())
        draft_temperature = self._draft_temperatures(rows, temperature)
        row_generators = self._generators(step, rows, num_tokens_no_spec, generators)
        start = time.perf_counter()
        try:
            out = self.drafter.draft(contexts, temperature=draft_temperature,
                                     generator=row_generators)
            token_ids = out.token_ids.tolist()  # the host copy waits for the drafter
        except Exception:
            # Drafting only speeds decoding up: a failing step runs without drafts (still exact).
            self.stats["failures"] += 1
            if self.stats["failures"] == 1:
                logger.exception("specdiff: the drafter failed; this step runs without drafts")
            return drafts
        elapsed = time.perf_counter() - start
        for row, ids in zip(rows, token_ids):
            drafts[row] = ids
        if self.config.use_full_draft_probs:
            if len(rows) == num_rows:
                self._last_draft_probs = out.draft_probs
            else:  # rows without drafts are never read (they schedule 0 draft tokens)
                probs = out.draft_probs.new_zeros((num_rows, *out.draft_probs.shape[1:]))
                probs[torch.tensor(rows, device=probs.device)] = out.draft_probs
                self._last_draft_probs = probs
        self._record(len(rows), elapsed)
        if self._digest is not None:
            self._digest.update(repr((step, drafts)).encode())
            self._digest.update(out.draft_probs.detach().cpu().numpy().tobytes())
            self.stats["digest"] = self._digest.hexdigest()
        return drafts

    def take_last_draft_probs(self) -> torch.Tensor | None:
        """float32 [len(sampled_token_ids), num_draft_tokens, vocab] of the last propose(), rows
        aligned with the input batch; None for one-hot verification or when nothing was drafted."""
        probs, self._last_draft_probs = self._last_draft_probs, None
        return probs

    # ---- helpers ----
    def _draft_temperatures(self, rows: list[int], temperature: np.ndarray | None) -> torch.Tensor:
        """Argmax drafts for greedy rows, the configured (or the request's) temperature otherwise."""
        if temperature is None:  # no sampling state (runner patch absent): treat rows as sampled
            request = np.ones(len(rows), dtype=np.float32)
        else:
            request = temperature[rows]
        fixed = self.config.draft_temperature
        values = request if fixed is None else np.where(request > 0, np.float32(fixed), 0.0)
        return torch.as_tensor(np.asarray(values, dtype=np.float32))

    def _generators(self, step: int, rows: list[int], num_tokens_no_spec: np.ndarray,
                    generators: Mapping[int, torch.Generator]) -> torch.Generator | list:
        """One generator per step, or one per row when some rows belong to seeded requests."""
        device = self.device
        seeded = [row for row in rows if row in generators]
        if not seeded:
            return torch.Generator(device=device).manual_seed(mix_seed(self.seed, step))
        row_generators = []
        for row in rows:
            if row in generators:
                # Depends only on the request (its seed and length): reproducible in any batch.
                seed = mix_seed(self.seed, generators[row].initial_seed(),
                                int(num_tokens_no_spec[row]))
            else:
                seed = mix_seed(self.seed, step, row, 1)
            row_generators.append(torch.Generator(device=device).manual_seed(seed))
        return row_generators

    def _record(self, num_rows: int, elapsed: float) -> None:
        stats = self.stats
        stats["steps"] += 1
        stats["drafted_rows"] += num_rows
        stats["draft_seconds"] += elapsed
        every = self.config.log_every
        if every and stats["steps"] % every == 0:
            steps0, rows0, seconds0 = self._log_mark
            steps = stats["steps"] - steps0
            logger.info("specdiff drafter: %.2f ms/step over the last %d steps (%.1f rows/step, "
                        "%d steps, %.2f s in total)",
                        1e3 * (stats["draft_seconds"] - seconds0) / steps, steps,
                        (stats["drafted_rows"] - rows0) / steps, stats["steps"],
                        stats["draft_seconds"])
            self._log_mark = (stats["steps"], stats["drafted_rows"], stats["draft_seconds"])


# ---------------------------------------------------------------------------------------------------
# Verifier: vLLM's RejectionSampler with the accept/recover step of vllm_specdiff.verification
# ---------------------------------------------------------------------------------------------------
_SAMPLER_CLASS: type | None = None


def specdiff_rejection_sampler_class() -> type:
    """Defined lazily: subclassing vLLM's RejectionSampler imports vLLM's sampling stack."""
    global _SAMPLER_CLASS
    if _SAMPLER_CLASS is not None:
        return _SAMPLER_CLASS
    from dataclasses import replace

    from vllm.v1.outputs import SamplerOutput
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    from ..verification import draw_random, rejection_sample

    class SpecDiffRejectionSampler(RejectionSampler):
        """vLLM's handling of logits processors, the bonus token and logprobs; our batched
        speculative sampling (vllm_specdiff.verification.rejection_sample) for the draft positions.

        The target law (temperature, top-k, top-p) is applied inside rejection_sample, on the
        target side only, so it is respected for every request whatever the drafter did.
        """

        def forward(self, metadata, draft_probs, logits, sampling_metadata) -> SamplerOutput:
            bonus_logits = logits[metadata.bonus_logits_indices]
            # vLLM's sampler draws the bonus token: it applies every logits processor and uses the
            # request's generator, exactly as without speculation.
            bonus_sampler_output = self.sampler(
                logits=bonus_logits,
                sampling_metadata=replace(sampling_metadata, max_num_logprobs=-1),
                predict_bonus_token=True,
                logprobs_mode_override=("processed_logits" if self.is_processed_logprobs_mode
                                        else "raw_logits"),
            )
            bonus_token_ids = bonus_sampler_output.sampled_token_ids  # [batch, 1]

            raw_target_logits = logits[metadata.target_logits_indices].to(torch.float32)
            target_logits = raw_target_logits
            if not self.is_processed_logprobs_mode:
                target_logits = target_logits.clone()
            target_logits = self.apply_logits_processors(target_logits, sampling_metadata, metadata)

            num_tokens = target_logits.shape[0]
            batch = len(metadata.num_draft_tokens)
            vocab = target_logits.shape[1]
            device = target_logits.device
            # vLLM's logits layout: per request its draft positions, then its bonus position. The
            # bonus rows only feed rejection_sample's own bonus, which is replaced below.
            all_logits = torch.empty((num_tokens + batch, vocab), dtype=torch.float32, device=device)
            all_logits[metadata.target_logits_indices] = target_logits
            all_logits[metadata.bonus_logits_indices] = bonus_logits.to(torch.float32)
            cu_cpu = torch.as_tensor(np.cumsum(metadata.num_draft_tokens, dtype=np.int64))
            temperature = sampling_metadata.temperature
            if temperature is None:  # all greedy
                temperature = torch.zeros(batch, dtype=torch.float32, device=device)
            gens = sampling_metadata.generators
            generators = [gens.get(i) for i in range(batch)] if gens else None
            uniform_samples, exponential_samples = draw_random(cu_cpu, vocab, generators, device)
            out = rejection_sample(
                metadata.draft_token_ids, metadata.cu_num_draft_tokens,
                None if draft_probs is None else draft_probs.to(torch.float32).contiguous(),
                all_logits, temperature.to(torch.float32), sampling_metadata.top_k,
                sampling_metadata.top_p, uniform_samples, exponential_samples,
                max_draft_len=metadata.max_spec_len)
            output_token_ids = out.output_token_ids
            num_draft = torch.as_tensor(metadata.num_draft_tokens, dtype=torch.int64).to(device)
            has_bonus = (out.num_accepted == num_draft).unsqueeze(1)  # [batch, 1]
            slot = num_draft.unsqueeze(1)
            current = output_token_ids.gather(1, slot)
            output_token_ids = output_token_ids.scatter(
                1, slot, torch.where(has_bonus, bonus_token_ids.to(torch.int64), current))
            output_token_ids = output_token_ids.to(torch.int32)  # SamplerOutput's dtype

            logprobs_tensors = None
            if sampling_metadata.max_num_logprobs is not None:
                logprobs_tensors = self._get_logprobs_tensors(
                    sampling_metadata.max_num_logprobs, metadata, logits,
                    target_logits if self.is_processed_logprobs_mode else raw_target_logits,
                    bonus_sampler_output.logprobs_tensors.logprobs, output_token_ids)
            return SamplerOutput(sampled_token_ids=output_token_ids,
                                 logprobs_tensors=logprobs_tensors)

    _SAMPLER_CLASS = SpecDiffRejectionSampler
    return _SAMPLER_CLASS
