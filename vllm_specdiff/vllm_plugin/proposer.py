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
        # Conditioned drafters: engine-side state (context caches) and the target layers they read.
        self.conditioned = None
        self.aux_layers: tuple[int, ...] | None = None
        scheduler_config = getattr(vllm_config, "scheduler_config", None)
        self.max_num_seqs = int(getattr(scheduler_config, "max_num_seqs", None) or 256)
        self._req_ids: list[str] = []
        self.adaptive = None
        if self.config.adaptive:
            from ..drafting.adaptive import AdaptiveDraftLength, RefillWatch

            # Ranks must draft alike: with tensor parallelism the decision uses only what every rank
            # sees identically (acceptance), with the cost model's prior instead of wall times.
            tp = int(getattr(getattr(vllm_config, "parallel_config", None), "tensor_parallel_size",
                             1) or 1)
            self.adaptive = AdaptiveDraftLength(self.num_draft_tokens, timed=tp == 1)
            self._refill = RefillWatch()
        self._remaining: dict[str, int] = {}  # closed batch: tokens each request may still generate
        self._last_step_time: float | None = None
        # The last propose(): whether the drafter model ran, and per request how many leading draft
        # tokens came from prompt lookup (adaptive drafting learns both sources apart).
        self._drafter_ran = False
        self._drafter_seconds = 0.0
        self._lookup_used: dict[str, int] = {}
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
        """Load the drafter: a standalone SEDD drafter reads token ids only; a conditioned one also
        takes the target's embedding and head and asks for the target's layer outputs."""
        from ..drafter import DiffusionDrafter
        from ..model import SEDD
        from ..models.conditioned_checkpoint import is_conditioned_checkpoint

        config = self.config
        if is_conditioned_checkpoint(config.drafter):
            self._load_conditioned(target_model)
            return
        model = SEDD.from_pretrained(config.drafter, device=self.device, dtype=self.dtype)
        if model.config.tokens != self.target_vocab_size:
            raise ValueError(f"specdiff: the drafter has {model.config.tokens} tokens but the target "
                             f"vocab_size is {self.target_vocab_size}")
        self.drafter = DiffusionDrafter(model, num_draft_tokens=self.num_draft_tokens,
                                        num_steps=config.num_steps or self.num_draft_tokens,
                                        order=config.order, window=config.window,
                                        autocast_dtype=config.autocast_dtype)
        self._window_tail = self.drafter.window - self.num_draft_tokens
        logger.info("specdiff: drafter loaded on %s (%s): %d draft tokens, %d steps, window %d, %s",
                    self.device, self.dtype, self.num_draft_tokens, self.drafter.num_steps,
                    self.drafter.window, config.order)

    def _load_conditioned(self, target_model: Any) -> None:
        from ..drafting.conditioned import ConditionedDrafter
        from ..models.conditioned_checkpoint import load_conditioned, read_conditioned_config
        from .conditioned import (ConditionedState, aux_layer_ids, check_target_supports_aux,
                                  target_embedding_and_head)

        config = self.config
        if target_model is None:
            raise ValueError("specdiff: the conditioned drafter needs the target model at load time")
        check_target_supports_aux(target_model)
        drafter_config = read_conditioned_config(config.drafter)
        embed, head = target_embedding_and_head(target_model, drafter_config.vocab_size)
        model = load_conditioned(config.drafter, embed, head, device=self.device, dtype=self.dtype)
        num_steps = config.num_steps or self.num_draft_tokens  # resolved at startup (patches)
        drafter = ConditionedDrafter(model, self.num_draft_tokens, num_steps=num_steps,
                                     policy=config.policy_for(num_steps, self.num_draft_tokens))
        self.conditioned = ConditionedState(drafter, self.max_num_seqs, self.max_model_len)
        self.drafter = drafter
        self.stats["num_steps"] = drafter.num_steps
        self.aux_layers = aux_layer_ids(drafter_config.target_layer_ids)
        logger.info("specdiff: conditioned drafter loaded on %s (%s): %d draft tokens, %d steps, "
                    "draft policy at temperature > 0: %s, target layers %s", self.device, self.dtype,
                    self.num_draft_tokens, drafter.num_steps, drafter.policy,
                    list(drafter_config.target_layer_ids))

    def observe_step(self, runner: Any, scheduler_output: Any, sampled_token_ids: Any,
                     aux_hidden_states: Any, spec_decode_metadata: Any,
                     common_attn_metadata: Any) -> None:
        """Called by the runner patch before propose(): request ids, per-request acceptance and the
        step's wall time for adaptive drafting, and the target states of a conditioned drafter."""
        batch = runner.input_batch
        req_ids = list(batch.req_ids[:batch.num_reqs])
        self._req_ids = req_ids
        finished = list(getattr(scheduler_output, "finished_req_ids", ()) or ())
        num_drafts = None if spec_decode_metadata is None else spec_decode_metadata.num_draft_tokens
        if self.adaptive is not None:
            now = time.perf_counter()
            total = int(sum(num_drafts)) if num_drafts is not None else 0
            # A step that also prefills (a new prompt: ~1 s at batch 16 here) is not a decode step
            # of its batch size and would price drafting as free or ruinous; it is not recorded.
            scheduled = int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0)
            decode_only = scheduled <= len(req_ids) + total
            if self._last_step_time is not None and decode_only:
                self.adaptive.record_step(len(req_ids), total, now - self._last_step_time,
                                          drafter_ran=self._drafter_ran,
                                          drafter_seconds=self._drafter_seconds)
            self._last_step_time = now
            for req_id in finished:
                self.adaptive.forget(req_id)
            new = len(getattr(scheduler_output, "scheduled_new_reqs", ()) or ())
            self._refill.observe(len(finished), new, max(len(req_ids) - new, 0))
            self._remaining = self._remaining_tokens(runner, req_ids) if self._refill.closed else {}
            if num_drafts is not None and isinstance(sampled_token_ids, list):
                for i, req_id in enumerate(req_ids[:len(sampled_token_ids)]):
                    drafted = int(num_drafts[i])
                    if drafted and sampled_token_ids[i]:
                        self.adaptive.record_acceptance(req_id, drafted,
                                                        len(sampled_token_ids[i]) - 1,
                                                        lookup=self._lookup_used.get(req_id, 0))
        if self.conditioned is not None:
            self._observe_target_states(req_ids, finished, sampled_token_ids, aux_hidden_states,
                                        num_drafts, common_attn_metadata)

    def _observe_target_states(self, req_ids: list[str], finished: list[str], sampled_token_ids: Any,
                               aux_hidden_states: Any, num_drafts: Any,
                               common_attn_metadata: Any) -> None:
        if common_attn_metadata is None:
            self.conditioned.observe(req_ids, finished, [], None, np.zeros(1), np.zeros(0), None)
            return
        num_reqs = len(req_ids)
        query_start_loc = common_attn_metadata.query_start_loc_cpu[:num_reqs + 1].numpy()
        seq_lens = common_attn_metadata.seq_lens[:num_reqs].cpu().numpy()
        if not isinstance(sampled_token_ids, list):
            sampled_token_ids = []  # not a custom_class step shape; nothing is drafted below
        try:
            self.conditioned.observe(req_ids, finished, sampled_token_ids, aux_hidden_states,
                                     query_start_loc, seq_lens, num_drafts)
        except Exception:
            self.stats["failures"] += 1
            if self.stats["failures"] == 1:
                logger.exception("specdiff: updating the conditioned drafter's context failed; "
                                 "affected requests draft from a restarted context")
            for req_id in req_ids:
                self.conditioned.release(req_id)

    def bind_runner(self, runner: Any) -> None:
        """Called by the runner patch on every step; installs our verifier once."""
        if self._runner_bound:
            return
        self._runner_bound = True
        self.verifier = self.config.verifier_for(self.device.type)
        self.stats["verifier"] = self.verifier
        from . import patches

        if self.verifier == "specdiff":
            patches.install_rejection_sampler(runner, specdiff_rejection_sampler_class())
        patches.install_zero_draft_fast_path(runner, self.stats)
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
        self._drafter_ran, self._drafter_seconds, self._lookup_used = False, 0.0, {}
        if not rows or self.drafter is None:
            return drafts
        found: dict[int, list[int]] = {}
        if self.conditioned is not None:
            # Rows whose cached context ends right before their anchor (the last sampled token)
            # draft; the others (states missing) run this step without drafts.
            req_ids = self._req_ids
            rows = [row for row in rows if row < len(req_ids) and self.conditioned.anchor_ready(
                req_ids[row], int(num_tokens_no_spec[row]) - 1)]
        if self.config.lookup:
            found = self._lookup(rows, token_ids_cpu, num_tokens_no_spec)
        lengths = self._draft_lengths(rows, found, temperature)
        rows = [row for row in rows if lengths.get(row, self.num_draft_tokens) > 0]
        if not rows:
            return drafts
        model_rows = self._take_lookup_only(rows, lengths, found, drafts)
        if not model_rows:
            return drafts
        if self.conditioned is not None:
            drafts = self._propose_conditioned(step, model_rows, sampled_token_ids,
                                               num_tokens_no_spec, temperature, generators, drafts,
                                               lengths, found)
        else:
            drafts = self._propose_sedd(step, model_rows, num_tokens_no_spec, token_ids_cpu,
                                        temperature, generators, drafts, lengths, found)
        if self._last_draft_probs is not None:
            # Lookup-only rows beside rows with full q (the tensor holds zeros for them): their
            # law is a point mass, one-hot q.
            probs = self._last_draft_probs
            for row in rows:
                if row not in model_rows:
                    ids = torch.tensor(drafts[row], device=probs.device)
                    probs[row, torch.arange(len(ids), device=probs.device), ids] = 1.0
        return drafts

    def _take_lookup_only(self, rows: list[int], lengths: dict[int, int],
                          found: dict[int, list[int]], drafts: list[list[int]]) -> list[int]:
        """Rows whose draft is all lookup tokens get them here (no drafter: ngram's cost); the
        lookup tokens used per request are recorded for adaptive drafting. Returns the rows the
        drafter must draft for."""
        k = self.num_draft_tokens
        req_ids = self._req_ids
        model_rows = []
        for row in rows:
            length = lengths.get(row, k)
            used = min(len(found.get(row, ())), length)
            if used and row < len(req_ids):
                self._lookup_used[req_ids[row]] = used
            self.stats["lookup_tokens"] = self.stats.get("lookup_tokens", 0) + used
            if length <= used:
                drafts[row] = found[row][:length]
                self.stats["lookup_only_rows"] = self.stats.get("lookup_only_rows", 0) + 1
            else:
                model_rows.append(row)
        return model_rows

    def _revealed(self, rows: list[int], found: dict[int, list[int]]) -> torch.Tensor | None:
        """[len(rows), k] lookup tokens as revealed block positions (-1 = to denoise), or None."""
        if not any(row in found for row in rows):
            return None
        revealed = torch.full((len(rows), self.num_draft_tokens), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            if row in found:
                revealed[i, :len(found[row])] = torch.tensor(found[row])
        return revealed

    def _propose_sedd(self, step: int, rows: list[int], num_tokens_no_spec: np.ndarray,
                      token_ids_cpu: np.ndarray, temperature: np.ndarray | None,
                      generators: Mapping[int, torch.Generator], drafts: list[list[int]],
                      lengths: dict[int, int], found: dict[int, list[int]]) -> list[list[int]]:
        """The standalone SEDD drafter: one batched call over the rows' context windows, lookup
        tokens revealed in their blocks."""
        contexts = []
        for row in rows:
            end = int(num_tokens_no_spec[row])
            contexts.append(token_ids_cpu[row, max(0, end - self._window_tail):end].tolist())
        draft_temperature = self._draft_temperatures(rows, temperature)
        row_generators = self._generators(step, rows, num_tokens_no_spec, generators)
        start = time.perf_counter()
        self._drafter_ran = True
        try:
            out = self.drafter.draft(contexts, temperature=draft_temperature,
                                     generator=row_generators,
                                     revealed_tokens=self._revealed(rows, found))
            token_ids = out.token_ids.tolist()  # the host copy waits for the drafter
        except Exception:
            self._lookup_used = {}
            return self._drafting_failed([[] for _ in drafts])
        elapsed = time.perf_counter() - start
        for row, ids in zip(rows, token_ids):
            drafts[row] = ids[:lengths.get(row, len(ids))]
        if self.config.use_full_draft_probs:
            self._keep_draft_probs(out.draft_probs, rows, len(drafts))
        self._record(len(rows), elapsed)
        if self._digest is not None:
            self._digest.update(repr((step, drafts)).encode())
            self._digest.update(out.draft_probs.detach().cpu().numpy().tobytes())
            self.stats["digest"] = self._digest.hexdigest()
        return drafts

    def _lookup(self, rows: list[int], token_ids_cpu: np.ndarray,
                num_tokens_no_spec: np.ndarray) -> dict[int, list[int]]:
        """Prompt lookup per row: a continuation of the suffix found in the context."""
        from ..drafting.lookup import prompt_lookup

        found = {}
        for row in rows:
            tokens = prompt_lookup(token_ids_cpu[row], int(num_tokens_no_spec[row]),
                                   self.num_draft_tokens)
            if tokens:
                found[row] = tokens
        return found

    def _propose_conditioned(self, step: int, rows: list[int], sampled_token_ids: list[list[int]],
                             num_tokens_no_spec: np.ndarray, temperature: np.ndarray | None,
                             generators: Mapping[int, torch.Generator], drafts: list[list[int]],
                             lengths: dict[int, int], found: dict[int, list[int]]) -> list[list[int]]:
        """The conditioned drafter from each request's cached target states: lookup tokens enter
        each block as revealed (one-hot) positions and the drafter denoises the rest around them."""
        state = self.conditioned
        req_ids = self._req_ids
        anchors = [sampled_token_ids[row][-1] for row in rows]
        draft_temperature = self._draft_temperatures(rows, temperature)
        row_generators = self._generators(step, rows, num_tokens_no_spec, generators)
        start = time.perf_counter()
        # Full q only when some row samples its drafts; all-argmax rounds verify one-hot (vLLM's
        # path without draft probabilities, identical law) and skip the [rows, k, vocab] tensor.
        sampled_rows = (self.config.use_full_draft_probs and self.drafter.policy == "sampled"
                        and bool((draft_temperature > 0).any()))
        self._drafter_ran = True
        try:
            out = state.draft([req_ids[row] for row in rows], anchors, draft_temperature,
                              row_generators, self.drafter.policy,
                              revealed_tokens=self._revealed(rows, found), with_probs=sampled_rows)
            token_ids = out.token_ids.tolist()
        except Exception:
            self._lookup_used = {}
            return self._drafting_failed([[] for _ in drafts])
        elapsed = time.perf_counter() - start
        for row, ids in zip(rows, token_ids):
            drafts[row] = ids[:lengths.get(row, len(ids))]
        if sampled_rows:
            self._keep_draft_probs(out.draft_probs, rows, len(drafts))
        self._record(len(rows), elapsed)
        return drafts

    def _keep_draft_probs(self, probs: torch.Tensor, rows: list[int], num_rows: int) -> None:
        """Keep the drafted rows' q [len(rows), k, vocab] for the verifier as [num_rows, k, vocab];
        rows without drafts stay zero and are never read (they schedule 0 draft tokens)."""
        if rows == list(range(num_rows)):
            self._last_draft_probs = probs
            return
        full = probs.new_zeros((num_rows, *probs.shape[1:]))
        full[torch.tensor(rows, device=probs.device)] = probs
        self._last_draft_probs = full

    def _drafting_failed(self, drafts: list[list[int]]) -> list[list[int]]:
        """Drafting only speeds decoding up: a failing step runs without drafts (still exact); the
        first failure is logged with its traceback."""
        self.stats["failures"] += 1
        if self.stats["failures"] == 1:
            logger.exception("specdiff: the drafter failed; this step runs without drafts")
        return drafts

    def _remaining_tokens(self, runner: Any, req_ids: list[str]) -> dict[str, int]:
        """Tokens each request may still generate (max_tokens less its output; an upper bound when
        it can stop at EOS); empty when any request's budget is unknown."""
        remaining = {}
        requests = getattr(runner, "requests", {})
        for req_id in req_ids:
            state = requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            if state is None or params is None:
                return {}
            limit = params.max_tokens
            if limit is None:
                limit = self.max_model_len - len(state.prompt_token_ids or ())
            remaining[req_id] = max(int(limit) - len(state.output_token_ids), 1)
        return remaining

    def _draft_lengths(self, rows: list[int], found: dict[int, list[int]],
                       temperature: np.ndarray | None) -> dict[int, int]:
        """Adaptive draft length per row (empty = num_draft_tokens for every row)."""
        if self.adaptive is None or not rows or len(self._req_ids) < max(rows) + 1:
            return {}
        sampled = None if temperature is None else [bool(temperature[row] > 0) for row in rows]
        ids = [self._req_ids[row] for row in rows]
        remaining = [self._remaining[r] for r in ids] \
            if self._remaining and all(r in self._remaining for r in ids) else None
        alloc = self.adaptive.allocate(ids, [len(found.get(row, ())) for row in rows], sampled,
                                       remaining)
        if remaining is not None:
            self.stats["closed_batch_steps"] = self.stats.get("closed_batch_steps", 0) + 1
        self.stats["adaptive_draft_tokens"] = self.stats.get("adaptive_draft_tokens", 0) + sum(alloc)
        self.stats["adaptive_rows"] = self.stats.get("adaptive_rows", 0) + len(rows)
        return dict(zip(rows, alloc))

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
        self._drafter_seconds = elapsed
        if self.adaptive is not None:
            self.adaptive.record_drafter(num_rows, elapsed)
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
# Verifier: lives in sampler.py; the name stays importable from here.
# ---------------------------------------------------------------------------------------------------
from .sampler import specdiff_rejection_sampler_class  # noqa: E402,F401
