"""Target-conditioned SEDD block denoiser (DFlash-style context injection, SpecDiff sampling).

The drafter fills a block [anchor, MASK x k] after the last accepted token. It reads the TARGET:
the outputs of a few target layers at every context position are fused (per-layer RMS scaling ->
linear `fc` -> RMSNorm) and injected into EVERY draft layer as extra keys/values (the layer's own
k_proj / v_proj applied to the fused features); queries come from the block only, attention is
bidirectional inside the block, RoPE runs over absolute positions (context and block). The token
embedding and the LM head are the target's own, attached at load time and frozen (never stored in
the drafter checkpoint). A trainable mask embedding stands for the absorbing MASK state of SEDD's
absorbing graph: a block position is either revealed (its token embedding) or masked.

Masked-diffusion view: with the absorbing graph, the denoiser's output at a masked position is the
conditional law of that token given the revealed ones (SEDD's concrete score ratio at the mask state,
Lou et al. 2024 Eq. 6); SpecDiff's left-to-right multi-step sampling reveals the block in num_steps
chunks. This module only computes logits; sampling lives in vllm_specdiff.drafting.conditioned.

Optional reduced draft vocabulary: the head projects onto `draft_vocab` (target token ids, the most
frequent tokens of the target's own outputs); every other token has draft probability 0, which the
verifier handles exactly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ConditionedConfig:
    vocab_size: int  # the target's vocabulary (output ids live there)
    hidden_size: int  # = the target's hidden size (its embedding and head are reused)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    block_size: int  # max num_draft_tokens + 1 (the anchor)
    target_layer_ids: tuple[int, ...]  # feature of layer i = HF hidden_states[i + 1]
    target_num_layers: int
    target_hidden_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    draft_vocab_size: int | None = None  # None: the full target vocabulary
    # Add a projection of the fused state of the last context position (the one right before the
    # anchor) to every block slot's input: a direct path to the target's freshest state (as EAGLE
    # feeds it), on top of the context keys/values (as DFlash does).
    anchor_feature: bool = True
    # Add a projection of the token embedding of the last revealed position before each masked slot
    # (the anchor, or the last token unmasked by an earlier step): a one-layer drafter then knows, in
    # its queries, which token it continues, which copying from the context needs.
    last_token_feature: bool = False
    # Scale each target layer's slice to unit RMS before `fc` (False: fc on the raw concatenation,
    # as vLLM's DFlash model does).
    fuse_scaling: bool = True
    # Per-head RMSNorm of queries and keys before RoPE (Qwen3 attention, as vLLM's DFlash model has).
    qk_norm: bool = False
    tokenizer_fingerprint: str = ""
    target_name: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "target_num_layers", "target_hidden_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size < 2:
            problems.append(f"block_size must be >= 2 (anchor + >= 1 draft), got {self.block_size}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} must be a multiple of num_kv_heads "
                            f"{self.num_kv_heads}")
        if not self.target_layer_ids:
            problems.append("target_layer_ids is empty: the drafter needs at least one target layer")
        if len(set(self.target_layer_ids)) != len(self.target_layer_ids):
            problems.append(f"target_layer_ids {list(self.target_layer_ids)} repeat a layer")
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.target_num_layers]
        if bad:
            problems.append(f"target_layer_ids {bad} outside [0, {self.target_num_layers})")
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= self.vocab_size:
            problems.append(f"draft_vocab_size {self.draft_vocab_size} must be in [1, {self.vocab_size}]")
        if problems:
            raise ValueError("invalid conditioned drafter config: " + "; ".join(problems))

    @property
    def num_draft_tokens(self) -> int:
        return self.block_size - 1

    @property
    def feature_size(self) -> int:
        return len(self.target_layer_ids) * self.target_hidden_size

    def to_dict(self) -> dict:
        out = asdict(self)
        out["target_layer_ids"] = list(self.target_layer_ids)
        return out


def target_layer_features(hidden_states, layer_ids) -> torch.Tensor:
    """[..., len(layer_ids) * hidden]: the outputs of the drafter's target layers, concatenated.
    Layer i is HF `hidden_states[i + 1]` (the residual stream after decoder layer i; index 0 is the
    embedding output, and the last index is after the final norm)."""
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)


def build_target_layer_ids(num_target_layers: int, num_ids: int) -> list[int]:
    """DFlash's choice: one id -> the middle layer; else spread from layer 1 to L - 3."""
    if num_ids == 1:
        return [num_target_layers // 2]
    if num_ids > num_target_layers - 1:
        raise ValueError(f"{num_ids} target layers requested from a {num_target_layers}-layer target: "
                         f"at most {num_target_layers - 1} (the last layer's output is post-norm)")
    start, end = 1, num_target_layers - 3
    if end - start + 1 < num_ids:  # shallow targets: spread over every layer but the last
        start, end = 0, num_target_layers - 2
    return [round(start + (end - start) * i / (num_ids - 1)) for i in range(num_ids)]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., head_dim] for integer positions [...] (Llama's non-interleaved rotary)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, heads, length, head_dim]; cos/sin [n, length, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config: ConditionedConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def key_value(self, x: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, length, hidden] -> k, v [n, kv_heads, length, head_dim] (k rotated)."""
        n, length, _ = x.shape
        k = self.k_proj(x).view(n, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            k = self.k_norm(k)
        return apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                context_k: torch.Tensor, context_v: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """x [n, block, hidden]; context_k/v [n, kv_heads, ctx, head_dim]; mask [n, 1, block, ctx + block]
        (True = attend)."""
        n, length, _ = x.shape
        q = self.q_proj(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q = self.q_norm(q)
        q = apply_rope(q, cos, sin)
        k, v = self.key_value(x, cos, sin)
        k = torch.cat([context_k.to(k.dtype), k], dim=2)
        v = torch.cat([context_v.to(v.dtype), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(n, length, -1))


class MLP(nn.Module):
    def __init__(self, config: ConditionedConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """A Llama decoder layer (same parameter names, so it can start from a target layer) whose
    attention also sees the fused target context as keys/values."""

    def __init__(self, config: ConditionedConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, context_k, context_v, mask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context_k, context_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class ConditionedDenoiser(nn.Module):
    """Logits of masked block positions given the fused target context (see module docstring).

    Trained tensors: fc, hidden_norm, layers, norm, mask_embedding (+ the draft_vocab buffer).
    Frozen, attached from the target: embed_weight [vocab, hidden], head_weight [vocab, hidden].
    """

    def __init__(self, config: ConditionedConfig) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(config.feature_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        if config.anchor_feature:
            self.anchor_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        if config.last_token_feature:
            self.last_token_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        draft_vocab = torch.arange(config.draft_vocab_size or config.vocab_size, dtype=torch.long)
        self.register_buffer("draft_vocab", draft_vocab)  # [draft_vocab] target token ids
        self.embed_weight: torch.Tensor | None = None
        self.head_weight: torch.Tensor | None = None
        self._draft_head: torch.Tensor | None = None

    # ---------------------------------------------------------------- target attachment
    def attach_target(self, embed_weight: torch.Tensor, head_weight: torch.Tensor) -> None:
        """Share the target's token embedding and LM head (frozen, not copied into the checkpoint)."""
        expected = (self.config.vocab_size, self.config.hidden_size)
        for name, weight in (("embedding", embed_weight), ("LM head", head_weight)):
            if weight.shape[0] < expected[0] or weight.shape[1] != expected[1]:
                raise ValueError(f"the target's {name} has shape {tuple(weight.shape)}; this drafter "
                                 f"needs [{expected[0]}, {expected[1]}] (vocabulary, hidden size): "
                                 "load the drafter with the target it was trained for")
        self.embed_weight = embed_weight.detach()
        self.head_weight = head_weight.detach()
        self._draft_head = None

    @property
    def draft_head(self) -> torch.Tensor:
        """[draft_vocab, hidden]: the target head's rows of the draft vocabulary (cached)."""
        if self.head_weight is None:
            raise RuntimeError("attach_target(embedding, lm_head) before running the drafter")
        weight = self.fc.weight
        if (self._draft_head is None or self._draft_head.device != weight.device
                or self._draft_head.dtype != weight.dtype):
            head = self.head_weight.to(self.fc.weight.device)
            full = self.draft_vocab.numel() == self.config.vocab_size
            self._draft_head = head[: self.config.vocab_size] if full else head[self.draft_vocab]
            self._draft_head = self._draft_head.to(self.fc.weight.dtype)
        return self._draft_head

    def invalidate_head_cache(self) -> None:
        self._draft_head = None

    # ---------------------------------------------------------------- context
    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., num_target_layers * target_hidden] -> fused context [..., hidden].

        Each target layer's slice is RMS-scaled first: middle-layer states reach |x| ~ 3e4 at
        sequence starts, which a plain linear map would let dominate.
        """
        features = features.to(self.fc.weight.dtype)
        if not self.config.fuse_scaling:
            return self.hidden_norm(self.fc(features))
        n_layers = len(self.config.target_layer_ids)
        parts = features.unflatten(-1, (n_layers, -1))
        parts = parts * torch.rsqrt(parts.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(parts.dtype)
        return self.hidden_norm(self.fc(parts.flatten(-2)))

    def context_key_values(self, features: torch.Tensor,
                           positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """features [n, ctx, feature_size], positions [n, ctx] -> per layer (k, v)
        [n, kv_heads, ctx, head_dim]: what the context cache stores."""
        return self.fused_key_values(self.fuse(features), positions)

    def fused_key_values(self, fused: torch.Tensor,
                         positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, fused.dtype)
        return [layer.self_attn.key_value(fused, cos, sin) for layer in self.layers]

    # ---------------------------------------------------------------- block
    def embed_block(self, token_ids: torch.Tensor, revealed: torch.Tensor) -> torch.Tensor:
        """token_ids, revealed [n, block] -> [n, block, hidden]; masked slots get mask_embedding."""
        if self.embed_weight is None:
            raise RuntimeError("attach_target(embedding, lm_head) before running the drafter")
        safe = torch.where(revealed, token_ids, torch.zeros_like(token_ids))
        tokens = F.embedding(safe, self.embed_weight.to(self.fc.weight.device)).to(self.fc.weight.dtype)
        x = torch.where(revealed[..., None], tokens, self.mask_embedding.to(tokens.dtype))
        if self.config.last_token_feature:
            # Index of the last revealed position at or before each slot. Every block starts with
            # its (revealed) anchor, so in rows that concatenate blocks the index stays in the block.
            index = torch.arange(token_ids.shape[-1], device=token_ids.device).expand_as(token_ids)
            last = torch.where(revealed, index, torch.zeros_like(index)).cummax(dim=-1).values
            last_tokens = tokens.gather(-2, last[..., None].expand_as(tokens))
            x = x + torch.where(revealed[..., None], torch.zeros_like(x),
                                self.last_token_proj(last_tokens))
        return x

    def block_hidden(self, token_ids: torch.Tensor, revealed: torch.Tensor, positions: torch.Tensor,
                     context_kv: list[tuple[torch.Tensor, torch.Tensor]],
                     mask: torch.Tensor, anchor_state: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [n, block, hidden] of the block rows.

        positions [n, block] absolute; mask [n, 1, block, ctx + block] (True = attend);
        anchor_state [n, block or 1, hidden]: the fused state of the position before each row's
        anchor (config.anchor_feature; zeros when the context is empty).
        """
        x = self.embed_block(token_ids, revealed)
        if self.config.anchor_feature:
            if anchor_state is None:
                raise ValueError("this drafter adds the last context state to the block: pass "
                                 "anchor_state")
            x = x + self.anchor_proj(anchor_state.to(x.dtype))
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer, (k, v) in zip(self.layers, context_kv):
            x = layer(x, cos, sin, k, v, mask)
        return self.norm(x)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> logits over the draft vocabulary [..., draft_vocab].

        One 2-D GEMM: on a sliced (non-contiguous) [n, s, hidden] input, `hidden @ head.t()` and
        F.linear fall back to a bmm over n broadcast copies of the head (34 ms instead of a few at
        batch 8 on this CPU)."""
        rows = hidden.reshape(-1, hidden.shape[-1])
        return F.linear(rows, self.draft_head).view(*hidden.shape[:-1], -1)


def init_from_target_layer(model: ConditionedDenoiser, target, layer_index: int) -> None:
    """Start every draft layer from one target decoder layer (Llama-family names) and the final
    norm from the target's; a good start when the block sees target-level hidden states."""
    layers = getattr(getattr(target, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(target).__name__} has no model.layers: init_from_target_layer "
                         "needs a Llama-family target; train from random init instead")
    source = layers[layer_index].state_dict()
    for layer in model.layers:
        missing = layer.load_state_dict(source, strict=False)
        # q_norm / k_norm (qk_norm drafters) have no Llama counterpart: they start at ones.
        if [k for k in missing.missing_keys if not k.startswith(("self_attn.q_norm", "self_attn.k_norm"))]:
            raise ValueError(f"target layer {layer_index} lacks {missing.missing_keys}: its shapes or "
                             "names differ from a Llama decoder layer")
    norm = getattr(target.model, "norm", None)
    if norm is not None:
        model.norm.weight.data.copy_(norm.weight.data)


def init_weights(model: ConditionedDenoiser, std: float = 0.02) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
    for layer in model.layers:  # residual branches start small (GPT-2 scaling)
        nn.init.normal_(layer.self_attn.o_proj.weight, std=std / math.sqrt(2 * len(model.layers)))
        nn.init.normal_(layer.mlp.down_proj.weight, std=std / math.sqrt(2 * len(model.layers)))
    nn.init.normal_(model.mask_embedding, std=std)
