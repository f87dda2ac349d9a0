"""Adaptive draft length: per step and per request, how many draft tokens (down to 0) pay.

Model (the paper's remark that gamma must be calibrated; vLLM's num_speculative_tokens_per_batch_size;
DSpark's confidence-scheduled verification):
- a draft token comes from one of two sources: prompt lookup (a continuation found in the context,
  the leading `lookup` positions of a block) or the drafter model. Request i accepts each further
  token of a source with probability a_i (a Beta estimate from the request's own accepted / tried
  counts, whose prior is the pooled rate of all recent requests of the same kind, greedy or
  sampled, so a short request is not drafted for on a blind guess), so the j-th token of its block
  adds prod_{l <= j} a_il expected tokens to the step;
- a step costs  time = f(num_reqs + K) + c_draft * [the drafter runs] + drafter(R), K = total
  draft tokens, R = rows the drafter drafts for. f, the target's cost of a step that computes T
  tokens, is piecewise linear in T with knots at powers of sqrt(2): on this CPU it is memory-bound
  below ~16 tokens and compute-bound above (measured medians 55 ms at 1 token, 67 at 10, 82 at
  16, 152 at 31), so a draft token costs ~1 ms at batch 1 and ~4.5 ms at batch 16, and one
  straight line through both prices batch 16 at 2/3 of its cost. f and c_draft are fitted by
  least squares to the measured wall time of the engine's decode steps less their drafter time,
  with a penalty on bends of f (so it extends linearly where no step was seen) and a weak prior
  from the first steps (so the policy works before it has data). Recent steps weigh most
  (half-life `half_life` steps): the host's speed drifts (the same 16-token step took 70 and
  107 ms seconds apart here), and drafting must be priced against steps timed at the same moment.
  For the same reason a controller that drafts keeps timing steps without drafts: when none with
  n/2 to 2n requests is among the last `probe_every` timed steps, the step drafts nothing (a cost
  probe; at most one in `probe_every`). Without probes, batch 16 at temperature 0 drafted lookup
  tokens in nearly every step, f(16) was extrapolated from ~22-token steps, six draft tokens were
  priced at ~0 ms (measured ~5 ms each) and the engine ran at 0.85x of no speculation.
  drafter(R) = d_0 + d_1 R is fitted from the drafter's own measured calls (its cost grows with
  the rows it drafts). A step whose drafts are all lookup tokens does not run the drafter (ngram's
  cost);
- allocation is greedy in marginal value: block positions sorted by value are added while the
  throughput sum_i E_i / time increases, once with lookup positions only and once with all; the
  best of those and of drafting nothing wins, where drafting must beat drafting nothing by
  `min_gain` (default 5%): at break-even, estimation noise and the variance of drafting steps
  make speculation a measured loss (seen at temperature 1, batch 1, on this CPU).
Closed batches (no request waits for a slot: the last wave of an offline job, a lone client;
told apart by RefillWatch): the batch ends with its last request and a step costs about the same
with fewer rows, so counting every token overvalues drafting for rows that end early anyway. Seen:
one closed batch of 16 at temperature 0, the open objective drafted for scattered rows, 61 steps
instead of 63 and 0.87x of no speculation. There allocations are planned for the batch's end
(`_plan`); with one request both objectives are the same.
Exploration: at exploration steps every request gets its lookup tokens (within half a plain step's
cost) plus one drafter token, so
the estimates of requests and costs that fell to zero drafts keep being refreshed; the drafter
token goes to as many rows as one plain step's time pays for (fewest drafter trials first; every
row before the drafter's cost is known), since one exploration for all rows can cost several plain
steps (a 16-row SEDD call: ~0.5 s against a ~0.11 s step). The interval
starts at `explore_every` and doubles (up to `max_explore_every`) while drafting keeps not paying,
so a cell where no speculation is best pays almost nothing for exploring. Exactness is unaffected:
drafting fewer tokens only changes how many tokens a round can gain.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# Per-request and pooled counts: accepted / tried tokens of each source.
_LOOKUP_ACC, _LOOKUP_TRIED, _MODEL_ACC, _MODEL_TRIED = range(4)


@dataclass
class AdaptiveDraftLength:
    max_draft_tokens: int
    prior_accept: float = 0.5  # Beta prior mean of the pooled per-token acceptance
    prior_weight: float = 4.0  # pseudo tokens behind a prior (pooled and per request)
    pool_decay: float = 0.995  # per recorded round: the pooled rate follows recent requests
    explore_every: int = 16
    max_explore_every: int = 256
    history: int = 128
    min_fit_steps: int = 12
    # Prior costs in units of one no-draft step of one request (used until enough steps are timed).
    prior_token_cost: float = 0.15
    prior_draft_cost: float = 0.5
    timed: bool = True  # False: never fit wall times (deterministic decisions across ranks)
    min_gain: float = 0.05  # predicted throughput gain a drafting allocation needs over none
    probe_every: int = 16  # while drafting: a step without drafts at most this often (cost probes)
    half_life: float = 32.0  # steps: the cost fit weighs a step by 2^(-age / half_life); 0: equally
    _counts: dict[str, np.ndarray] = field(default_factory=dict)
    _kind: dict[str, int] = field(default_factory=dict)  # 0 greedy, 1 sampled
    _pool: np.ndarray = field(default_factory=lambda: np.zeros((2, 4)))
    _steps: deque = field(default_factory=deque)
    _drafts: deque = field(default_factory=deque)  # (rows, seconds) of the drafter's calls
    _step: int = 0
    _interval: int = 0
    _next_explore: int = 0
    _coef: tuple[np.ndarray, np.ndarray, float] | None = None
    _dcoef: np.ndarray | None = None
    _last_probe: float = -np.inf

    def __post_init__(self) -> None:
        if self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}")
        if not 0 < self.prior_accept < 1:
            raise ValueError(f"prior_accept must be in (0, 1), got {self.prior_accept}")
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")
        self._interval = self.explore_every
        self._next_explore = self.explore_every if self.explore_every > 0 else np.inf

    # ---- observations ----
    def record_acceptance(self, req_id: str, drafted: int, accepted: int, lookup: int = 0) -> None:
        """A verified round: `drafted` tokens of which the first `lookup` came from prompt lookup,
        `accepted` of them accepted. Each token up to the first rejection is a trial of its source."""
        if drafted <= 0:
            return
        lookup = min(max(lookup, 0), drafted)
        counts = np.zeros(4)
        counts[_LOOKUP_ACC] = min(accepted, lookup)
        counts[_LOOKUP_TRIED] = counts[_LOOKUP_ACC] + (1 if accepted < lookup else 0)
        if accepted >= lookup:
            counts[_MODEL_ACC] = accepted - lookup
            counts[_MODEL_TRIED] = counts[_MODEL_ACC] + (1 if accepted < drafted else 0)
        own = self._counts.get(req_id)
        self._counts[req_id] = counts if own is None else own + counts
        pool = self._pool[self._kind.get(req_id, 0)]
        pool *= self.pool_decay
        pool += counts

    def forget(self, req_id: str) -> None:
        self._counts.pop(req_id, None)
        self._kind.pop(req_id, None)

    def record_drafter(self, rows: int, seconds: float) -> None:
        """Wall time of one drafter call that drafted for `rows` requests."""
        if not self.timed or rows <= 0 or seconds <= 0:
            return
        self._drafts.append((float(rows), float(seconds)))
        while len(self._drafts) > self.history:
            self._drafts.popleft()
        self._dcoef = None

    def record_step(self, num_reqs: int, num_draft_tokens: int, seconds: float,
                    drafter_ran: bool | None = None, drafter_seconds: float = 0.0) -> None:
        """Wall time of one engine step with `num_draft_tokens` drafts in total; `drafter_ran`
        (default: any drafts) says whether the drafter model ran for them, `drafter_seconds` how
        long it took (recorded apart with record_drafter; taken out of the step's time here)."""
        if not self.timed or num_reqs <= 0 or seconds <= 0:
            return
        seconds = max(seconds - drafter_seconds, 1e-6)
        ran = bool(num_draft_tokens) if drafter_ran is None else bool(drafter_ran)
        if len(self._steps) >= self.min_fit_steps and \
                seconds > 20 * self.step_time(num_reqs, num_draft_tokens, ran):
            return  # an idle gap between steps, not a step
        self._steps.append((num_reqs, num_draft_tokens, float(ran), seconds))
        while len(self._steps) > self.history:
            self._steps.popleft()
        self._coef = None

    # ---- estimates ----
    def pooled_acceptance(self, sampled: bool = False) -> tuple[float, float]:
        """(lookup, model) per-token acceptance pooled over recent requests of one kind."""
        pool = self._pool[int(sampled)]
        prior = self.prior_accept * self.prior_weight
        return ((pool[_LOOKUP_ACC] + prior) / (pool[_LOOKUP_TRIED] + self.prior_weight),
                (pool[_MODEL_ACC] + prior) / (pool[_MODEL_TRIED] + self.prior_weight))

    def acceptance(self, req_id: str) -> tuple[float, float]:
        """(lookup, model) per-token acceptance of one request: its own counts behind the pooled
        rate of its kind."""
        pooled = self.pooled_acceptance(bool(self._kind.get(req_id, 0)))
        counts = self._counts.get(req_id, np.zeros(4))
        rates = []
        for source, (acc, tried) in enumerate(((_LOOKUP_ACC, _LOOKUP_TRIED),
                                               (_MODEL_ACC, _MODEL_TRIED))):
            rate = (counts[acc] + self.prior_weight * pooled[source]) / (counts[tried] + self.prior_weight)
            rates.append(min(max(float(rate), 0.0), 0.999))
        return rates[0], rates[1]

    def cost_model(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(knots, f at the knots, c_draft), seconds: f(T) is the step time for T computed tokens,
        linear between the knots (powers of sqrt(2)); the prior (a plain step of one request as the
        unit, `prior_token_cost` units per token, `prior_draft_cost` for the drafter) until
        `min_fit_steps` steps were timed, then a least-squares fit to them."""
        if self._coef is not None:
            return self._coef
        rows = np.array(self._steps, dtype=np.float64).reshape(-1, 4)
        tokens = rows[:, 0] + rows[:, 1]
        plain = rows[rows[:, 1] == 0]
        unit = float(np.median(plain[:, 3] / (1 + self.prior_token_cost * plain[:, 0]))) if len(plain) \
            else (float(np.median(rows[:, 3] / (1 + self.prior_token_cost * tokens))) if len(rows) else 1.0)
        top = max(float(tokens.max()) if len(rows) else 1.0, 2.0)
        knots = 2.0 ** (np.arange(int(np.ceil(2 * np.log2(top))) + 1) / 2)
        prior = np.append(unit * (1 + self.prior_token_cost * knots), unit * self.prior_draft_cost)
        fit = prior
        if len(rows) >= self.min_fit_steps:
            # Recent steps count most: the host's speed drifts by 20-40% within seconds here, and
            # steps with and without drafts must be compared at the same moment.
            age = np.arange(len(rows))[::-1]
            weight = 0.5 ** (age / self.half_life) if self.half_life > 0 else np.ones(len(rows))
            m = len(knots)
            design = np.zeros((len(rows), m + 1))
            design[:, :m] = _hat_basis(tokens, knots)
            design[:, m] = rows[:, 2]
            # Bends of f: each inner knot's distance from the line through its neighbours.
            left, right = knots[1:-1] - knots[:-2], knots[2:] - knots[1:-1]
            bend = np.zeros((max(m - 2, 0), m + 1))
            for i in range(m - 2):
                bend[i, i:i + 3] = (-right[i] / (left[i] + right[i]), 1.0,
                                    -left[i] / (left[i] + right[i]))
            lam_bend, lam_prior = 1e-3 * weight.sum(), 1e-4 * weight.sum()
            lhs = (design.T * weight) @ design + lam_bend * bend.T @ bend + lam_prior * np.eye(m + 1)
            rhs = (design.T * weight) @ rows[:, 3] + lam_prior * prior
            fit = np.linalg.solve(lhs, rhs)
            fit[:m] = np.maximum.accumulate(np.maximum(fit[:m], 1e-6))  # more tokens never cost less
            # c_draft again for that f: where every drafting step ran the drafter, the split between
            # f and c_draft is the prior's, and raising f must not price those steps twice.
            ran = rows[:, 2] > 0
            resid = rows[ran, 3] - design[ran, :m] @ fit[:m]
            fit[m] = max(((weight[ran] * resid).sum() + lam_prior * prior[m])
                         / (weight[ran].sum() + lam_prior), 0.0)
        self._coef = (knots, fit[:-1], float(fit[-1]))
        return self._coef

    def token_time(self, tokens: np.ndarray | float) -> np.ndarray | float:
        """f(T): predicted seconds of a step that computes `tokens` tokens, without the drafter."""
        knots, values, _ = self.cost_model()
        slope = (values[-1] - values[-2]) / (knots[-1] - knots[-2])
        tokens = np.asarray(tokens, dtype=np.float64)
        time = np.interp(tokens, knots, values) + slope * np.maximum(tokens - knots[-1], 0.0)
        return time if time.ndim else float(time)

    def drafter_coefficients(self) -> np.ndarray:
        """(d_0, d_1): a drafter call for R rows takes d_0 + d_1 R seconds; (0, 0) before any
        call was timed (the step fit's c_draft then holds the drafter's cost)."""
        if self._dcoef is not None:
            return self._dcoef
        rows = np.array(self._drafts, dtype=np.float64).reshape(-1, 2)
        coef = np.zeros(2)
        if len(rows):
            # Ridge towards "all of it per row": one batch size seen says nothing about d_0.
            per_row = float(rows[:, 1].sum() / rows[:, 0].sum())
            design = np.stack([np.ones(len(rows)), rows[:, 0]], 1)
            lam = 1e-2 * len(rows)
            prior = np.array([0.0, per_row])
            coef = np.linalg.solve(design.T @ design + lam * np.eye(2),
                                   design.T @ rows[:, 1] + lam * prior)
            coef = np.maximum(coef, 0.0)
        self._dcoef = coef
        return coef

    def step_time(self, num_reqs: int, num_draft_tokens: int, drafter_runs: bool | None = None,
                  drafter_rows: int | None = None) -> float:
        """Predicted seconds of a step; the drafter drafts for `drafter_rows` requests (default:
        all of them when it runs)."""
        runs = bool(num_draft_tokens) if drafter_runs is None else drafter_runs
        time = self.token_time(num_reqs + num_draft_tokens)
        if runs:
            d0, d1 = self.drafter_coefficients()
            time += self.cost_model()[2] + d0 + d1 * (num_reqs if drafter_rows is None else drafter_rows)
        return time

    # ---- decision ----
    def allocate(self, req_ids: Sequence[str], lookup_lengths: Sequence[int] | None = None,
                 sampled: Sequence[bool] | None = None,
                 remaining: Sequence[int] | None = None) -> list[int]:
        """Draft tokens per request for this step (same order as req_ids). lookup_lengths: how
        many leading block positions prompt lookup fills per request (their drafts need no
        drafter); sampled: whether each request samples (temperature > 0); remaining: tokens
        each request may still generate, given when the batch is closed (no request waits for a
        slot): the step's worth is then how far it brings the batch's end, not its tokens."""
        self._step += 1
        n, k = len(req_ids), self.max_draft_tokens
        if n == 0:
            return []
        if sampled is not None:
            for req_id, is_sampled in zip(req_ids, sampled):
                self._kind[req_id] = int(bool(is_sampled))
        lookup = np.minimum(np.asarray(lookup_lengths if lookup_lengths is not None else [0] * n,
                                       dtype=np.int64), k)
        rates = np.array([self.acceptance(r) for r in req_ids]).reshape(n, 2)
        is_lookup = np.arange(k)[None, :] < lookup[:, None]  # [n, k]
        values = np.cumprod(np.where(is_lookup, rates[:, :1], rates[:, 1:]), axis=1)
        if remaining is not None:
            alloc = self._plan(values, lookup, np.asarray(remaining, dtype=np.int64))
        else:
            best = (n / self.step_time(n, 0, False) * (1 + self.min_gain), np.zeros(n, dtype=np.int64))
            for only_lookup in (True, False):
                best = self._sweep(values, is_lookup, only_lookup, best)
            alloc = best[1]
        if alloc.any() and self._needs_probe(n):
            # Drafting is priced against steps without drafts; when none was timed lately at a
            # similar batch size, this step is one (the fit would otherwise extrapolate f(n)).
            self._last_probe = self._step
            return [0] * n
        if self._step >= self._next_explore:
            # Drafting nothing is the common reason to explore: back off while it keeps being right.
            self._interval = min(2 * self._interval, self.max_explore_every) if not alloc.any() \
                else self.explore_every
            self._next_explore = self._step + self._interval
            alloc = self._explore(req_ids, alloc, lookup)
        return [int(a) for a in alloc]

    def _needs_probe(self, n: int) -> bool:
        """No step without drafts, with n/2 to 2n requests, among the last `probe_every` timed
        steps, and no probe in the last `probe_every` decisions."""
        if not self.timed or self.probe_every <= 0 or self._step - self._last_probe < self.probe_every:
            return False
        recent = list(self._steps)[-self.probe_every:]
        return not any(drafts == 0 and n / 2 <= reqs <= 2 * n for reqs, drafts, _, _ in recent)

    def _explore(self, req_ids: Sequence[str], alloc: np.ndarray, lookup: np.ndarray) -> np.ndarray:
        """An exploration step costs at most about one plain step more than a plain step: rows get
        their lookup tokens (fewest lookup trials first, ties in an order that rotates with the
        step) while those cost at most half a plain step (80 lookup tokens at batch 16 cost ~5
        plain steps here); then rows not yet drafting with the drafter get one drafter token after
        their lookup tokens, as many of them as the rest of the step's allowance pays for (fewest
        drafter trials first), all of them before a drafter call was timed."""
        n, k = len(req_ids), self.max_draft_tokens
        plain = self.step_time(n, 0, False)
        rotation = (np.arange(n) - self._step) % n
        want = np.flatnonzero(lookup > alloc)
        if len(want):
            trials = np.array([self._counts.get(req_ids[i], np.zeros(4))[_LOOKUP_TRIED] for i in want])
            for i in want[np.lexsort((rotation[want], trials))]:
                grown = alloc.copy()
                grown[i] = lookup[i]
                if self.step_time(n, int(grown.sum()), False) - plain > plain / 2:
                    break
                alloc = grown
        candidates = np.flatnonzero((lookup < k) & (alloc == lookup))  # all lookup tokens, no drafter
        if not len(candidates):
            return alloc
        if self._drafts:
            running = int((alloc > lookup).sum())
            base = int(alloc.sum())
            extra = lambda rows: self.step_time(n, base + rows, True, running + rows) - plain  # noqa: E731
            allowed = max(1, int(np.sum([extra(r) <= plain for r in range(1, len(candidates) + 1)])))
            trials = np.array([self._counts.get(req_ids[i], np.zeros(4))[_MODEL_TRIED]
                               for i in candidates])
            candidates = candidates[np.lexsort((rotation[candidates], trials))[:allowed]]
        alloc[candidates] = lookup[candidates] + 1
        return alloc

    def _plan(self, values: np.ndarray, lookup: np.ndarray, remaining: np.ndarray) -> np.ndarray:
        """Closed batch: the batch ends with its last request, so an allocation is worth the time
        the batch still takes if every step drafted like this one. Row i then gains 1 + E_i(a_i)
        tokens per step and needs s_i = r_i / (1 + E_i) steps; while m rows are left the steps
        cost f(m + their drafts) plus the drafter for those it drafts for; the remaining time is
        the sum over those phases. Allocations tried: for each makespan level L (every s_i(a)),
        each row drafts the fewest tokens that bring it to L (lookup tokens only, or any), so a
        row that ends the batch anyway, at a level no draft reaches, keeps the plain cost and
        rows that finish early anyway draft nothing. The least time wins if it beats drafting
        nothing by `min_gain`. One request: the same as the open objective (tokens per second)."""
        n, k = values.shape
        cap = np.maximum(remaining - 1, 0)  # a row never gains more tokens than it has left
        gain = np.concatenate([np.zeros((n, 1)), np.cumsum(values, axis=1)], axis=1)  # E_i(a)
        steps = remaining[:, None] / (1.0 + gain)  # [n, k+1], falling along a
        levels = np.unique(steps)
        need = (steps[None, :, :] > levels[:, None, None]).sum(axis=2)  # [L, n]: drafts to reach L
        alloc = np.concatenate([np.zeros((1, n), dtype=np.int64),  # drafting nothing first
                                np.minimum(need, np.minimum(lookup, cap)[None]),
                                np.minimum(need, np.minimum(k, cap)[None])])
        finish = remaining[None, :] / (1.0 + gain[np.arange(n)[None, :], alloc])  # [C, n]
        order = np.argsort(-finish, axis=1, kind="stable")
        finish = np.take_along_axis(finish, order, axis=1)
        tokens = np.cumsum(np.take_along_axis(alloc, order, axis=1), axis=1)
        rows = np.cumsum(np.take_along_axis(alloc > lookup[None, :], order, axis=1), axis=1)
        phase = finish - np.concatenate([finish[:, 1:], np.zeros((len(alloc), 1))], axis=1)
        draft = self.cost_model()[2]
        d0, d1 = self.drafter_coefficients()
        alive = np.arange(1, n + 1)[None, :]
        cost = self.token_time(alive + tokens) + np.where(rows > 0, draft + d0 + d1 * rows, 0.0)
        total = (phase * cost).sum(axis=1)
        plain = total[0]
        best = int(np.argmin(total))
        if alloc[best].any() and total[best] * (1 + self.min_gain) < plain:
            return alloc[best]
        return np.zeros(n, dtype=np.int64)

    def _sweep(self, values: np.ndarray, is_lookup: np.ndarray, only_lookup: bool,
               best: tuple[float, np.ndarray]) -> tuple[float, np.ndarray]:
        """Add block positions in order of value while throughput improves (over `best`); every
        prefix of that order is priced at once (~50 us for 16 rows x 8 positions)."""
        n, width = values.shape
        allowed = np.flatnonzero(is_lookup.reshape(-1)) if only_lookup else np.arange(values.size)
        if not len(allowed):
            return best
        order = allowed[np.argsort(-values.reshape(-1)[allowed], kind="stable")]
        gained = n + np.cumsum(values.reshape(-1)[order])
        # Rows the drafter drafts for after each prefix: a row counts from its first model position.
        model = np.flatnonzero(~is_lookup.reshape(-1)[order])
        first = np.zeros(len(order))
        if len(model):
            _, where = np.unique(order[model] // width, return_index=True)
            first[model[where]] = 1.0
        rows = np.cumsum(first)
        draft = self.cost_model()[2]
        d0, d1 = self.drafter_coefficients()
        time = self.token_time(n + np.arange(1, len(order) + 1))
        time = np.where(rows > 0, time + (draft + d0 + d1 * rows), time)
        value = gained / time
        count = int(np.argmax(value))  # the first of equal maxima, as adding one by one would
        if not value[count] > best[0]:
            return best
        # Values fall along each row (products of rates < 1), so the chosen positions are prefixes.
        alloc = np.bincount(order[:count + 1] // width, minlength=n).astype(np.int64)
        return float(value[count]), alloc


@dataclass
class RefillWatch:
    """Whether the batch is closed: no request waits for the slot a finishing one frees. Closed
    once a request finishes and none joins the running ones within `window` steps; open (also at
    the start) as soon as a new request joins requests that are running: a refilled slot (a
    loaded server, an offline job with more prompts than max_num_seqs) or requests trickling in
    (a server's clients; an offline `generate` schedules all its prompts in one step). New
    requests that start an empty batch in one step (the next `generate` call) change nothing.
    Counting joins only right after a finish, a server whose waves finish in lockstep never sees
    a refill and stays closed although its client refills every slot at once (the likely cause,
    not isolated from the host's drift, of a serving run at 0.72-0.95x at concurrency 16). In
    an open batch every token counts; in a closed one only how soon the batch ends."""
    window: int = 4
    _step: int = 0
    _last_finish: int | None = None
    _closed: bool = False

    def observe(self, finished: int, new: int, running: int) -> None:
        """One engine step: requests reported finished, new requests scheduled, and requests that
        were already running (decoding) beside them."""
        self._step += 1
        if new and running:
            self._closed, self._last_finish = False, None
            return
        if finished:
            self._last_finish = self._step
        if self._last_finish is not None and self._step - self._last_finish >= self.window:
            self._closed, self._last_finish = True, None

    @property
    def closed(self) -> bool:
        return self._closed


def _hat_basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """[len(x), len(knots)]: weights that interpolate linearly between the knots (x within them)."""
    x = np.clip(np.asarray(x, dtype=np.float64), knots[0], knots[-1])
    hi = np.clip(np.searchsorted(knots, x, side="right"), 1, len(knots) - 1)
    frac = (x - knots[hi - 1]) / (knots[hi] - knots[hi - 1])
    basis = np.zeros((len(x), len(knots)))
    basis[np.arange(len(x)), hi - 1] = 1.0 - frac
    basis[np.arange(len(x)), hi] = frac
    return basis
