"""A tiny decoder-only MoE language model that follows the Qwen3-MoE architecture.

Same blocks and the same checkpoint names as Hugging Face's ``Qwen3MoeForCausalLM``, so one
checkpoint loads here, in ``transformers`` and in vLLM:

    model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight                 RMSNorm
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight        GQA attention, no bias
    model.layers.{i}.self_attn.{q,k}_norm.weight            per-head RMSNorm on q and k
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.gate.weight                        router [num_experts, hidden]
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight   SwiGLU experts
    model.norm.weight, lm_head.weight

Routing (Qwen3-MoE): ``p = softmax(W_r h)`` over all experts, the top-k experts are selected, and
their gate weights are ``p[e]`` (renormalized over the k selected when ``norm_topk_prob``). The
*selection* is delegated to the model's routing policy (:mod:`reference_impl.replay`): native
top-k, or replayed ids. The gate weights are always recomputed from the live router logits over
the selected ids, so the router keeps its gradient under replay.

Every forward returns the routes it used, ``routes[b, t, layer, :]`` (expert ids sorted
ascending), including incremental forwards with a :class:`KVCache`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .replay import NativeRouting, RoutingPolicy, RoutingShape

__all__ = ["MoEConfig", "MoEForCausalLM", "MoEOutput", "KVCache"]


@dataclass
class MoEConfig:
    """Hyper-parameters, named as in ``transformers.Qwen3MoeConfig``.

    The defaults build a ~0.4 M-parameter model that runs on a laptop CPU; ``head_dim`` 32 is one of
    the head sizes vLLM's CPU attention supports.
    """

    vocab_size: int = 64
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    moe_intermediate_size: int = 64
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    router_initializer_range: float | None = None  # std of router weights; None = initializer_range

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"MoEConfig: num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"MoEConfig: num_experts_per_tok={self.num_experts_per_tok} must lie in [1, num_experts={self.num_experts}]"
            )
        if self.head_dim % 2:
            raise ValueError(f"MoEConfig: head_dim={self.head_dim} must be even for rotary embeddings")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MoEOutput:
    """logits ``[batch, seq, vocab]``; routes ``[batch, seq, num_layers, top_k]`` (int64, sorted ids)."""

    logits: torch.Tensor
    routes: torch.Tensor
    router_logits: tuple[torch.Tensor, ...] | None = None  # per layer ``[batch*seq, num_experts]``


class KVCache:
    """Per-layer key/value cache for incremental decoding (keys/values ``[batch, kv_heads, t, head_dim]``)."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def select(self, batch_index: torch.Tensor) -> None:
        """Keep only the given rows of the batch (e.g. to drop finished sequences)."""
        for i in range(len(self.keys)):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][batch_index]
                self.values[i] = self.values[i][batch_index]


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 (as Qwen3)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[batch, seq, head_dim]`` for integer positions ``[batch, seq]`` (RoPE, half-split layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k, then RoPE (Qwen3)."""

    def __init__(self, cfg: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Expert(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --8<-- [start:gate-weights]
def gate_weights(router_logits: torch.Tensor, expert_ids: torch.Tensor, norm_topk_prob: bool) -> torch.Tensor:
    """Gate weights of the selected experts, recomputed from live logits.

    ``w[n, j] = p[n, ids[n, j]]`` with ``p = softmax(router_logits)`` over *all* experts (fp32),
    renormalized over the k selected when ``norm_topk_prob``. Gathering from the full softmax (never
    from a zero-filled post-top-k tensor) keeps a gradient to the router for replayed ids.
    """
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights = probs.gather(1, expert_ids)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights
# --8<-- [end:gate-weights]


class SparseMoeBlock(nn.Module):
    """Router + experts. The routing policy picks the expert ids; gate weights come from live logits."""

    def __init__(self, cfg: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))

    # --8<-- [start:moe-block]
    def forward(self, x: torch.Tensor, select: Callable[[torch.Tensor], torch.Tensor]):
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        router_logits = self.gate(flat)  # [N, E]
        # Selection never carries gradient (and must save nothing for backward, so a recompute
        # that reuses the forward's ids saves the same tensors).
        ids = select(router_logits.detach()).sort(dim=-1).values  # [N, k]; order never matters
        weights = gate_weights(router_logits, ids, self.norm_topk_prob).to(x.dtype)
        out = torch.zeros_like(flat)
        token_idx_all = torch.arange(flat.shape[0], device=x.device)
        for e in ids.unique().tolist():
            hit = ids == e  # [N, k]; at most one slot per token
            tok = token_idx_all[hit.any(dim=-1)]
            w = (weights * hit).sum(dim=-1)[tok]
            out.index_add_(0, tok, self.experts[e](flat[tok]) * w[:, None])
        return out.view(b, t, h), ids, router_logits
    # --8<-- [end:moe-block]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoeBlock(cfg, layer_idx)

    def forward(self, x, cos, sin, attn_mask, cache, select):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
        moe_out, ids, router_logits = self.mlp(self.post_attention_layernorm(x), select)
        return x + moe_out, ids, router_logits


# --8<-- [start:route-once]
class _RouteOnce:
    """Chooses a layer's routes on the first call and returns the same ids on every later call.

    Activation recompute (``torch.utils.checkpoint``) calls a layer a second time during backward;
    this makes the recompute see exactly the routes of the forward, whatever the policy and even if
    near-tie router logits would flip on recomputation.
    """

    def __init__(self, choose: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.choose, self.ids = choose, None

    def __call__(self, router_logits: torch.Tensor) -> torch.Tensor:
        if self.ids is None:
            self.ids = self.choose(router_logits)
        return self.ids
# --8<-- [end:route-once]


class MoEModel(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MoEForCausalLM(nn.Module):
    """Tiny Qwen3-MoE causal LM whose routers ask a routing policy for their top-k.

    ``forward(input_ids)`` returns :class:`MoEOutput` with logits and the routes used. Pass a
    :class:`KVCache` for incremental decoding, ``attention_mask`` ``[batch, past + seq]`` (1 = real
    token) for left-padded batches. Set ``gradient_checkpointing = True`` to recompute each decoder
    layer in backward; recompute reuses the forward's routes.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = MoEModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.routing: RoutingPolicy = NativeRouting()
        self.route_recorders: list = []
        self.gradient_checkpointing = False
        self.reset_parameters()

    @property
    def routing_shape(self) -> RoutingShape:
        """The routed layers as a trace stores them (:class:`reference_impl.replay.ReplayHost`)."""
        cfg = self.config
        return RoutingShape(num_layers=cfg.num_hidden_layers, top_k=cfg.num_experts_per_tok, num_experts=cfg.num_experts)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        router_std = self.config.router_initializer_range or std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, router_std)
            else:
                p.normal_(0.0, std)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_router_logits: bool = False,
    ) -> MoEOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"MoEForCausalLM: input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        past = 0 if cache is None else cache.seq_len
        x = self.model.embed_tokens(input_ids)
        attn_mask = _causal_mask(b, t, past, attention_mask, x.device)
        if position_ids is None:
            position_ids = _default_positions(b, t, past, attention_mask, x.device)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)

        step = self.routing.start_forward(batch=b, seq_len=t, offset=past, top_k=self.config.num_experts_per_tok)
        all_ids, all_router_logits = [], []
        for i, layer in enumerate(self.model.layers):
            select = _RouteOnce(lambda logits, i=i: step.select(i, logits))
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, ids, router_logits = checkpoint(layer, x, cos, sin, attn_mask, cache, select, use_reentrant=False)
            else:
                x, ids, router_logits = layer(x, cos, sin, attn_mask, cache, select)
            all_ids.append(ids.view(b, t, -1))
            all_router_logits.append(router_logits)
        logits = self.lm_head(self.model.norm(x))
        routes = torch.stack(all_ids, dim=2)  # [b, t, L, k]
        for recorder in self.route_recorders:
            recorder.add(routes, offset=past)
        return MoEOutput(logits, routes, tuple(all_router_logits) if output_router_logits else None)


def _causal_mask(b: int, t: int, past: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
    """Bool mask ``[b, 1, t, past + t]``: query i sees key j iff j <= past + i and key j is a real token."""
    total = past + t
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(b, 1, t, total)
    if attention_mask is not None:
        if attention_mask.shape != (b, total):
            raise ValueError(
                f"MoEForCausalLM: attention_mask must be [batch, past + seq] = {(b, total)}, got {tuple(attention_mask.shape)}"
            )
        mask = mask & attention_mask.bool()[:, None, None, :]
        # A fully masked row (a padding query) would give NaN; let it see itself.
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


def _default_positions(b: int, t: int, past: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift RoPE."""
    if attention_mask is None:
        return torch.arange(past, past + t, device=device).expand(b, t)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, past:]
