"""Adaptive draft length: per step and per request, how many draft tokens (down to 0) pay.

Model (the paper's remark that gamma must be calibrated; vLLM's num_speculative_tokens_per_batch_size;
DSpark's confidence-scheduled verification):
- request i accepts each further draft token with probability a_i (running estimate: a Beta prior
  updated by the request's own accepted / drafted counts), so its j-th draft token adds a_i^j expected
  tokens to the step;
- a step costs  time = c_base + c_token * (num_reqs + K) + c_draft * [K > 0],  K = total draft tokens,
  fitted online by least squares from the measured wall time of the engine's steps (with a prior
  from the first steps, so the policy works before it has data);
- allocation is greedy in marginal value: draft tokens (i, j) sorted by a_i^j are added while the
  throughput sum_i E_i / time increases; if no allocation beats drafting nothing, nobody drafts.
Every `explore_every` steps the full draft length is proposed for everyone, so estimates of requests
and costs that fell to zero drafts keep being refreshed. Exactness is unaffected: drafting fewer
tokens only changes how many tokens a round can gain.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class AdaptiveDraftLength:
    max_draft_tokens: int
    prior_accept: float = 0.5  # Beta prior mean of the per-token acceptance of a new request
    prior_weight: float = 4.0  # pseudo draft tokens behind that prior
    explore_every: int = 16
    history: int = 128
    min_fit_steps: int = 12
    # Prior costs in units of one no-draft step of one request (used until enough steps are timed).
    prior_token_cost: float = 0.15
    prior_draft_cost: float = 0.5
    timed: bool = True  # False: never fit wall times (deterministic decisions across ranks)
    _accepted: dict[str, float] = field(default_factory=dict)
    _drafted: dict[str, float] = field(default_factory=dict)
    _steps: deque = field(default_factory=deque)
    _step: int = 0
    _coef: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}")
        if not 0 < self.prior_accept < 1:
            raise ValueError(f"prior_accept must be in (0, 1), got {self.prior_accept}")

    # ---- observations ----
    def record_acceptance(self, req_id: str, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        # Acceptance of the j-th token given the earlier ones: accepted of drafted "trials" where the
        # first rejection ends the round (a geometric count): trials = accepted + (1 if rejected).
        trials = accepted + (1 if accepted < drafted else 0)
        self._accepted[req_id] = self._accepted.get(req_id, 0.0) + accepted
        self._drafted[req_id] = self._drafted.get(req_id, 0.0) + trials

    def forget(self, req_id: str) -> None:
        self._accepted.pop(req_id, None)
        self._drafted.pop(req_id, None)

    def record_step(self, num_reqs: int, num_draft_tokens: int, seconds: float) -> None:
        if not self.timed or num_reqs <= 0 or seconds <= 0:
            return
        if len(self._steps) >= self.min_fit_steps and \
                seconds > 20 * self.step_time(num_reqs, num_draft_tokens):
            return  # an idle gap between steps, not a step
        self._steps.append((num_reqs, num_draft_tokens, seconds))
        while len(self._steps) > self.history:
            self._steps.popleft()
        self._coef = None

    # ---- estimates ----
    def acceptance(self, req_id: str) -> float:
        accepted = self._accepted.get(req_id, 0.0) + self.prior_accept * self.prior_weight
        trials = self._drafted.get(req_id, 0.0) + self.prior_weight
        return min(max(accepted / trials, 0.0), 0.999)

    def cost_coefficients(self) -> np.ndarray:
        """(c_base, c_token, c_draft) in seconds; a least-squares fit over the timed steps once both
        kinds (with and without drafts) were seen, else the prior scaled by the mean plain step."""
        if self._coef is not None:
            return self._coef
        rows = np.array(self._steps, dtype=np.float64).reshape(-1, 3)
        plain = rows[rows[:, 1] == 0]
        unit = float(np.median(plain[:, 2] / (1 + self.prior_token_cost * plain[:, 0]))) if len(plain) \
            else (float(np.median(rows[:, 2])) if len(rows) else 1.0)
        prior = np.array([unit, unit * self.prior_token_cost, unit * self.prior_draft_cost])
        coef = prior
        drafted = rows[:, 1] > 0
        if len(rows) >= self.min_fit_steps and drafted.any() and (~drafted).any():
            design = np.stack([np.ones(len(rows)), rows[:, 0] + rows[:, 1], drafted.astype(float)], 1)
            # Ridge towards the prior keeps the fit sane with few distinct batch shapes.
            lam = 1e-2 * len(rows)
            lhs = design.T @ design + lam * np.eye(3)
            rhs = design.T @ rows[:, 2] + lam * prior
            fit = np.linalg.solve(lhs, rhs)
            coef = np.maximum(fit, 0.0)
            coef[0] = max(coef[0], 1e-6)
        self._coef = coef
        return coef

    def step_time(self, num_reqs: int, num_draft_tokens: int) -> float:
        base, token, draft = self.cost_coefficients()
        return base + token * (num_reqs + num_draft_tokens) + (draft if num_draft_tokens else 0.0)

    # ---- decision ----
    def allocate(self, req_ids: Sequence[str]) -> list[int]:
        """Draft tokens per request for this step (same order as req_ids)."""
        self._step += 1
        n = len(req_ids)
        if n == 0:
            return []
        if self.explore_every and self._step % self.explore_every == 0:
            return [self.max_draft_tokens] * n
        rates = np.array([self.acceptance(r) for r in req_ids])
        # Marginal expected tokens of each request's j-th draft token: a_i^j (j = 1..k).
        powers = rates[:, None] ** np.arange(1, self.max_draft_tokens + 1)[None, :]
        order = np.argsort(-powers, axis=None, kind="stable")
        best_value = n / self.step_time(n, 0)
        best_count = 0
        gained = float(n)
        for count, flat in enumerate(order, start=1):
            gained += float(powers.flat[flat])
            value = gained / self.step_time(n, count)
            if value > best_value:
                best_value, best_count = value, count
        alloc = [0] * n
        for flat in order[:best_count]:
            alloc[int(flat) // self.max_draft_tokens] += 1
        return alloc
