"""Pure diffusion math for SEDD's absorbing graph with the log-linear noise schedule.

Tensors in, tensors out; no module state. References: Lou, Meng, Ermon, "Discrete Diffusion
Modeling by Estimating the Ratios of the Data Distribution" (ICML 2024), Sec. 3-4 and App. C.
"""
from __future__ import annotations

import math

import torch

# The published SEDD checkpoints hard-code eps = 1e-3 for the log-linear schedule
# (config sigma_min / sigma_max are ignored by that noise type).
LOGLINEAR_EPS = 1e-3
# The reference samplers integrate from t = 1 down to this time.
SAMPLING_EPS = 1e-5


def total_noise(t: torch.Tensor) -> torch.Tensor:
    """sigma_bar(t) = -log(1 - (1 - eps) t): the total noise at time t."""
    return -torch.log1p(-(1 - LOGLINEAR_EPS) * t)


def rate_noise(t: torch.Tensor) -> torch.Tensor:
    """sigma(t) = d sigma_bar / dt = (1 - eps) / (1 - (1 - eps) t)."""
    return (1 - LOGLINEAR_EPS) / (1 - (1 - LOGLINEAR_EPS) * t)


def mask_probability(t: torch.Tensor) -> torch.Tensor:
    """P(a token is masked at time t) = 1 - exp(-sigma_bar(t)) = (1 - eps) t."""
    return (1 - LOGLINEAR_EPS) * t


def time_grid(num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The samplers' grid linspace(1, SAMPLING_EPS, num_steps + 1), float64 for stable deltas."""
    return torch.linspace(1.0, SAMPLING_EPS, num_steps + 1, dtype=torch.float64, device=device)


def log_expm1(x: torch.Tensor) -> torch.Tensor:
    """log(exp(x) - 1), stable for small x (expm1) and large x (x + log1p(-exp(-x)))."""
    small = torch.log(torch.expm1(torch.clamp(x, max=0.5)))
    large = x + torch.log1p(-torch.exp(-torch.clamp(x, min=0.5)))
    return torch.where(x < 0.5, small, large)


def scale_by_sigma(raw: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
    """SEDD's output offset: raw - log(expm1(sigma_bar)) - log(V - 1).

    raw: [batch, length, vocab_with_mask]; sigma_bar: [batch].
    """
    vocab_with_mask = raw.shape[-1]
    offset = log_expm1(sigma_bar.float()).to(raw.dtype)[:, None, None]
    return raw - offset - math.log(vocab_with_mask - 1)


def unmask_probability(log_score: torch.Tensor, sigma_bar_t: torch.Tensor,
                       sigma_bar_s: torch.Tensor) -> torch.Tensor:
    """P(a masked position leaves the mask state between t and s > 0), analytic sampler.

    With delta = sigma_bar(t) - sigma_bar(s) and s_y = exp(log_score_y), the reverse step gives
    P(y) = (e^delta - 1) s_y for y != mask, so P(unmask) = (e^delta - 1) sum_y s_y (clamped to [0, 1]).
    log_score: [..., vocab_with_mask] (scale_by_sigma applied); sigma_bar_*: broadcastable to [...].
    """
    # At least float32 (bf16 scores), float64 kept (exact enumeration in the tests).
    dtype = torch.promote_types(log_score.dtype, torch.float32)
    delta = (sigma_bar_t - sigma_bar_s).to(dtype)
    token_mass = torch.logsumexp(log_score[..., :-1].to(dtype), dim=-1)  # [...]
    return torch.clamp(torch.expm1(delta) * torch.exp(token_mass), 0.0, 1.0)


def sample_exponential_race(probs: torch.Tensor, exponential: torch.Tensor) -> torch.Tensor:
    """Categorical sample argmax(probs / E), E ~ Exp(1) i.i.d.: exact and free of host syncs.

    probs: [..., vocab] (unnormalised is fine); exponential: same shape. Returns int64 [...].
    """
    return torch.argmax(probs / exponential, dim=-1)
