"""SEDD's diffusion transformer (DiT with adaLN and rotary attention), published-checkpoint compatible.

The module only computes log-scores; sampling lives in `drafting/diffusion.py`, loading in
`models/sedd_checkpoint.py` (which imports this module, never the reverse at import time).
Parameter names equal the published `louaaron/sedd-*` state dicts. Reference: Lou et al. 2024, App. C.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import scale_by_sigma as _scale_by_sigma

TIMESTEP_EMBED_DIM = 256


@dataclass(frozen=True)
class SEDDConfig:
    """Architecture of a SEDD checkpoint. `tokens` real tokens; the mask token id is `tokens`."""

    tokens: int = 50257
    hidden_size: int = 768
    cond_dim: int = 128
    length: int = 1024
    n_blocks: int = 12
    n_heads: int = 12
    scale_by_sigma: bool = True
    # Residual-branch dropout (config model.dropout; the published checkpoints trained with 0.1).
    # Active in train mode only: drafting runs in eval mode and is deterministic given its noise.
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("tokens", "hidden_size", "cond_dim", "length", "n_blocks", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"SEDDConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SEDDConfig.dropout must be in [0, 1), got {self.dropout} "
                             "(config model.dropout)")
        if self.hidden_size % self.n_heads or (self.hidden_size // self.n_heads) % 2:
            raise ValueError(
                f"SEDDConfig: hidden_size {self.hidden_size} must split into n_heads {self.n_heads} "
                "heads of even size (rotary embeddings rotate half of each head)")

    @property
    def vocab_size(self) -> int:
        """Embedding rows: the real tokens plus the absorbing mask token."""
        return self.tokens + 1

    @property
    def mask_token_id(self) -> int:
        return self.tokens

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


class LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in fp32 (as the reference does under autocast).

    The result keeps the input's dtype: under autocast the residual stream is fp32 (fp32 weights),
    so the output is fp32 like the reference's; in an all-bf16 model it is bf16.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.float(), [x.shape[-1]])
        return (normed * self.weight.float()).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the total noise sigma_bar (cos first, then sin) and a 2-layer MLP.

    Runs outside any autocast region, in the weights' dtype: the reference computes the condition
    before entering its bf16 autocast block, so with fp32 weights the condition is fp32.
    """

    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_EMBED_DIM, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma_bar: torch.Tensor) -> torch.Tensor:
        half = TIMESTEP_EMBED_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma_bar.device,
                                                            dtype=torch.float32) / half)
        args = sigma_bar.float()[:, None] * freqs[None]  # [batch, half]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        with _autocast_off(sigma_bar.device.type):
            return self.mlp(embedding.to(self.mlp[0].weight.dtype))


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Leave any autocast region of this device (a no-op where autocast does not exist, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


ROTARY_BASE = 10000


def standard_inv_freq(head_dim: int) -> torch.Tensor:
    """The reference's rotary frequencies 1 / 10000^(2i / head_dim), i < head_dim / 2, float32 on CPU
    (the same expression as the reference's Rotary, so the published buffers match bit for bit)."""
    return 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2).float() / head_dim))


class Rotary(nn.Module):
    """Non-interleaved rotary embedding ("rotate_half") applied to queries and keys only.

    The angles come from the `inv_freq` buffer, which the loader fills from the checkpoint (as the
    reference's load_state_dict does; `sedd_checkpoint.checkpoint_inv_freq` reports a non-standard one).
    The buffer stays float32 whatever the model's dtype: the reference computes the angles in fp32
    even under bf16 autocast, and bf16-rounded frequencies would shift the angles of far positions
    by up to ~length * 2^-9 radians.
    """

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", standard_inv_freq(head_dim), persistent=True)

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype) / .half() cast floating buffers: let them move the buffer between
        # devices but not round it.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        moved = self.inv_freq
        if moved.dtype != inv_freq.dtype and not inv_freq.is_meta:
            moved = inv_freq.to(device=moved.device)
        self.inv_freq = moved.float()
        return self

    def cos_sin(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the rotation angles, float32 [length, head_dim]."""
        positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.float())  # [length, head_dim / 2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [length, head_dim]
        return angles.cos(), angles.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, cos / sin rounded to x's dtype, the arithmetic in (at least)
    fp32 and the result rounded once to x's dtype: what the reference's flash-attn rotary kernel
    computes on its bf16 q, k under autocast. x: [batch, heads, length, head_dim]; cos, sin:
    float32 [length, head_dim]."""
    compute = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos.to(x.dtype).to(compute), sin.to(x.dtype).to(compute)
    wide = x.to(compute)
    return (wide * cos + _rotate_half(wide) * sin).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DDiTBlock(nn.Module):
    def __init__(self, config: SEDDConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.norm1 = LayerNorm(hidden)
        self.attn_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * hidden, hidden))
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * hidden)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, hidden = x.shape
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
         gate_mlp) = self.adaLN_modulation(cond)[:, None].chunk(6, dim=2)

        h = _modulate(self.norm1(x), shift_msa, scale_msa)
        # layout (q|k|v) x heads x head_dim
        qkv = self.attn_qkv(h).view(batch, length, 3, self.n_heads, hidden // self.n_heads)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [batch, heads, length, head_dim]
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
        attn = attn.transpose(1, 2).reshape(batch, length, hidden)
        # The reference's bias_dropout_add_scale: x + gate * dropout(branch), dropout in training only.
        x = x + gate_msa * F.dropout(self.attn_out(attn), self.dropout, self.training)
        mlp_out = self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(mlp_out, self.dropout, self.training)


class EmbeddingLayer(nn.Module):
    """A raw [vocab, hidden] table: plain lookup, no positions (rotary handles those)."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, hidden))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding[indices]


class DDitFinalLayer(nn.Module):
    def __init__(self, config: SEDDConfig) -> None:
        super().__init__()
        self.norm_final = LayerNorm(config.hidden_size)
        self.linear = nn.Linear(config.hidden_size, config.vocab_size)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden_size)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond)[:, None].chunk(2, dim=2)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SEDD(nn.Module):
    """Score network s_theta(x, sigma_bar) -> log-ratios [batch, length, tokens + 1]."""

    def __init__(self, config: SEDDConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab_embed = EmbeddingLayer(config.vocab_size, config.hidden_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(config.head_dim)
        self.blocks = nn.ModuleList(DDiTBlock(config) for _ in range(config.n_blocks))
        self.output_layer = DDitFinalLayer(config)
        # Set by from_pretrained so save_pretrained writes the checkpoint's own config back.
        self.raw_config: dict[str, Any] | None = None

    def forward(self, indices: torch.Tensor, sigma_bar: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                output_positions: torch.Tensor | None = None) -> torch.Tensor:
        """indices: [batch, length] int64; sigma_bar: [batch] total noise (NOT the time t).

        attention_mask: [batch, length] bool, False = padding key (ragged batches).
        output_positions: [batch, num_out] int64; when given the output head runs only there
        (exact: the head is position-wise). Returns [batch, length or num_out, tokens + 1] log-scores
        with scale_by_sigma applied and each position's current-token entry set to 0.
        """
        hidden, cond = self.trunk(indices, sigma_bar, attention_mask)
        current = indices
        if output_positions is not None:
            hidden = torch.gather(hidden, 1, output_positions[..., None].expand(-1, -1, hidden.shape[-1]))
            current = torch.gather(indices, 1, output_positions)
        return self.head(hidden, cond, sigma_bar, current)

    def trunk(self, indices: torch.Tensor, sigma_bar: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer body: hidden states [batch, length, hidden] and the condition [batch, cond_dim]."""
        x = self.vocab_embed(indices)
        cond = F.silu(self.sigma_map(sigma_bar))  # [batch, cond_dim]
        cos, sin = self.rotary_emb.cos_sin(indices.shape[1])  # float32 [length, head_dim]
        attn_mask = None if attention_mask is None else attention_mask[:, None, None, :]
        for block in self.blocks:
            x = block(x, cond, cos, sin, attn_mask)
        return x, cond

    def head(self, hidden: torch.Tensor, cond: torch.Tensor, sigma_bar: torch.Tensor,
             current: torch.Tensor) -> torch.Tensor:
        """The position-wise output head on any subset of positions.

        hidden: [rows, positions, hidden]; cond: [rows, cond_dim]; sigma_bar: [rows];
        current: [rows, positions] the tokens at those positions (their entries are set to 0).
        """
        log_score = self.output_layer(hidden, cond)
        if self.config.scale_by_sigma:
            log_score = _scale_by_sigma(log_score, sigma_bar)
        return torch.scatter(log_score, -1, current[..., None], torch.zeros_like(log_score[..., :1]))

    # Loading and saving live in sedd_checkpoint.py, which imports this module at its top. These
    # public entry points import it when called, so the import graph stays one-way
    # (sedd_checkpoint -> sedd): importing the model never loads the checkpoint format.
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "SEDD":
        from .sedd_checkpoint import load_sedd

        return load_sedd(path_or_hub_id, device=device, dtype=dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        from .sedd_checkpoint import save_sedd

        save_sedd(self, directory)
