"""Router families: how an MoE layer turns router logits into expert ids and gate weights.

Two families cover the MoE models people train with RL (``FACTS-families.md``):

* ``softmax`` (Qwen3-MoE, Mixtral, OLMoE): ``p = softmax(z)`` over all experts; the native ids are
  the top-k of ``p`` (= top-k of ``z``); weights ``p[ids]``, renormalised when ``norm_topk_prob``.
* ``sigmoid_bias`` (GLM-4.5, DeepSeek-V3, Kimi-K2, dots.llm1; DeepSeek-V3 technical report,
  arXiv 2412.19437, Sec. 2.1): ``s = sigmoid(z)``; the native ids are the top-k of ``s + b`` (``b`` the per-expert
  selection bias ``e_score_correction_bias``), inside the ``topk_group`` best of ``n_group``
  groups, a group scored by the sum of its two best ``s + b``; weights use the **unbiased**
  ``s[ids]``, divided by their sum (+1e-20) when ``norm_topk_prob``, then × ``routed_scaling_factor``.

``sigmoid`` without a bias (Llama-4 style) is the second family with ``b = 0``.

Replay semantics, stated once (:func:`gate_weights` and :func:`selection_scores`):

* a replayed row takes its **ids from the trace**; its gate weights are recomputed by
  :func:`gate_weights` from the live, unbiased scores at those ids (renormalised, scaled), so the
  router weight keeps its gradient and the bias (a buffer) gets none;
* a natively routed row (invalid trace rows, the last position of a sequence, R2 recording, no
  replay at all) takes the top-k of :func:`selection_scores`: the full biased, group-limited choice.

Per-expert token counts of the routes actually used (:func:`expert_token_counts`) are the input
of the auxiliary-loss-free bias update (:func:`update_expert_bias`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError

__all__ = [
    "SCORE_FUNCTIONS",
    "RouterSpec",
    "router_family",
    "selection_scores",
    "native_select",
    "gate_weights",
    "expert_token_counts",
    "update_expert_bias",
    "hf_router_family",
]

SCORE_FUNCTIONS = ("softmax", "sigmoid")


def router_family(score_function: str, expert_bias: bool) -> str:
    """The family name a trace records: ``softmax``, ``sigmoid`` or ``sigmoid_bias`` (``softmax_bias`` for ERNIE-style)."""
    if score_function not in SCORE_FUNCTIONS:
        raise ConfigError(f"router: score function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")
    return score_function + ("_bias" if expert_bias else "")


_SIGMOID_BIAS_MODEL_TYPES = ("glm4_moe", "glm4_moe_lite", "deepseek_v3", "kimi_k2", "dots1")
_SIGMOID_MODEL_TYPES = ("llama4", "llama4_text")


def hf_router_family(config) -> str:
    """The router family of a Hugging Face config (dict or ``PretrainedConfig``), from its keys only.

    GLM-4.5 / DeepSeek-V3 / Kimi-K2 / dots.llm1 route ``sigmoid_bias``, Llama-4 ``sigmoid``; otherwise
    DeepSeek's ``scoring_func`` (default softmax) plus a bias when ``topk_method == "noaux_tc"``.
    """
    d = config if isinstance(config, dict) else config.to_dict()
    text = d.get("text_config")
    model_type = d.get("model_type")
    if isinstance(text, dict) and text.get("model_type"):
        model_type, d = text["model_type"], text
    if model_type in _SIGMOID_BIAS_MODEL_TYPES:
        return router_family("sigmoid", True)
    if model_type in _SIGMOID_MODEL_TYPES:
        return router_family("sigmoid", False)
    return router_family(d.get("scoring_func", "softmax"), d.get("topk_method") == "noaux_tc")


@dataclass(frozen=True)
class RouterSpec:
    """Everything that decides a router's ids and weights (names as in the Hugging Face configs)."""

    num_experts: int
    top_k: int
    score_function: str = "softmax"  # DeepSeek-V3's ``scoring_func``
    expert_bias: bool = False  # a selection bias ``e_score_correction_bias`` (``topk_method="noaux_tc"``)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        router_family(self.score_function, self.expert_bias)  # validates the score function
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"router: top_k={self.top_k} must lie in [1, num_experts={self.num_experts}]")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ConfigError(f"router: n_group={self.n_group} must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"router: topk_group={self.topk_group} must lie in [1, n_group={self.n_group}]")
        per_group = self.num_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ConfigError(f"router: groups of {per_group} expert(s) cannot be scored by their top-2")
        if self.topk_group * per_group < self.top_k:
            raise ConfigError(
                f"router: topk_group={self.topk_group} groups of {per_group} experts hold fewer than top_k={self.top_k}"
            )
        if self.routed_scaling_factor <= 0:
            raise ConfigError(f"router: routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")

    @property
    def family(self) -> str:
        return router_family(self.score_function, self.expert_bias)


def _scores(router_logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Unbiased scores over all experts, fp32: softmax or sigmoid of the logits."""
    if spec.score_function == "softmax":
        return F.softmax(router_logits, dim=-1, dtype=torch.float32)
    return torch.sigmoid(router_logits.float())


# --8<-- [start:selection-scores]
def selection_scores(router_logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Scores whose top-k is the native choice: biased, with experts outside the best groups at -inf.

    softmax without bias: the logits themselves (their top-k is the top-k of the softmax).
    Otherwise ``c = s + b`` (``b`` = 0 without a bias); with groups, group ``g`` scores
    ``sum(top2(c[g]))`` and only the ``topk_group`` best groups keep their ``c`` (HF / vLLM rule).
    """
    if spec.score_function == "softmax" and bias is None and spec.n_group == 1:
        return router_logits
    choice = _scores(router_logits, spec)
    if bias is not None:
        choice = choice + bias.float()
    if spec.n_group > 1:
        grouped = choice.view(-1, spec.n_group, spec.num_experts // spec.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, n_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(spec.topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, spec.num_experts)
    return choice
# --8<-- [end:selection-scores]


def native_select(router_logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Native expert ids ``[N, k]``: the top-k of :func:`selection_scores`."""
    return selection_scores(router_logits, spec, bias).topk(spec.top_k, dim=-1).indices


# --8<-- [start:gate-weights]
def gate_weights(router_logits: torch.Tensor, expert_ids: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Gate weights ``[N, k]`` of the selected experts, from live logits (the one gate-weight rule).

    ``w[n, j] = s[n, ids[n, j]]`` with ``s`` the **unbiased** scores over all experts (softmax or
    sigmoid, fp32), divided by ``sum_j w[n, j]`` when ``norm_topk_prob`` (+1e-20 for sigmoid, as
    HF/vLLM), times ``routed_scaling_factor``. The selection bias never enters the weights.
    Gathering from the full score tensor (never from a zero-filled post-top-k tensor) keeps a
    gradient to the router for replayed ids.
    """
    weights = _scores(router_logits, spec).gather(1, expert_ids)
    if spec.norm_topk_prob:
        denom = weights.sum(dim=-1, keepdim=True)
        weights = weights / (denom + 1e-20 if spec.score_function == "sigmoid" else denom)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return weights
# --8<-- [end:gate-weights]


def expert_token_counts(routes: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert per MoE layer, ``[L, E]`` int64, from routes ``[..., L, k]``.

    ``mask`` (same leading shape as ``routes``, 1 = count) leaves padding out. These are the
    routes actually used (replayed where replayed, native elsewhere).
    """
    layers, k = routes.shape[-2:]
    flat = routes.reshape(-1, layers, k)
    if mask is not None:
        flat = flat[mask.reshape(-1).bool()]
    offsets = torch.arange(layers, device=routes.device)[None, :, None] * num_experts
    counts = torch.bincount((flat + offsets).reshape(-1), minlength=layers * num_experts)
    return counts.view(layers, num_experts)


# --8<-- [start:bias-update]
@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """The auxiliary-loss-free balancing step (DeepSeek-V3 technical report, arXiv 2412.19437, Sec. 2.1.2), in place.

    ``b_i ← b_i + rate · sign(mean_j c_j − c_i)``: an overloaded expert's bias goes down by
    ``rate``, an underloaded one's up. ``bias`` ``[E]``, ``counts`` ``[E]`` (one layer's
    :func:`expert_token_counts`). Returns ``bias``.
    """
    if bias.shape != counts.shape:
        raise ConfigError(f"update_expert_bias: bias {tuple(bias.shape)} and counts {tuple(counts.shape)} differ")
    counts = counts.to(torch.float32)
    bias.add_(rate * torch.sign(counts.mean() - counts).to(bias.dtype))
    return bias
# --8<-- [end:bias-update]
