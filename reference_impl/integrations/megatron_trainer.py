"""The RL update in a megatron-core ``GPTModel``: ``TrainConfig(trainer_backend="megatron")`` / ``--trainer megatron``.

:class:`MegatronTrainer` is the :class:`~reference_impl.trainer.Trainer` loop with its three
model phases moved into megatron-core (single process, world size 1, the CPU shims of
:mod:`reference_impl.integrations.megatron_cpu`):

* recompute π_θold: R3 replays ``rollout_trace`` with Megatron's ``RouterReplay``
  (REPLAY_FORWARD); native and R2 route natively and RECORD the routes (R2's ``old_trace``);
* update: one AdamW step per mini-batch on the objective, π_θ routed natively, replaying
  ``old_trace`` (R2) or ``rollout_trace`` (R3);
* export: before every rollout the Megatron weights go back to Qwen3-MoE names
  (:func:`hf_state_dict_from_megatron`, the inverse of ``megatron_state_dict``) into the reference
  model, which the rollout engine syncs from (a live vLLM engine with ``rollout_engine="vllm"``).

The parallel layouts of the model-parallelism work plug in at :func:`build_megatron_model`
(TP/PP/EP > 1 need a multi-rank launch); here TP = PP = EP = 1. vLLM and megatron-core share one
process (one world-size-1 gloo group); never delete the vLLM engine in it (that destroys the group).
"""

from __future__ import annotations

import torch

from .. import metrics as M
from ..batch import RolloutBatch
from ..logprobs import next_token_logprobs_and_entropy
from ..model import MoEConfig
from ..routing import RoutingTrace
from ..trainer import Trainer, TrainConfig

__all__ = ["MegatronTrainer", "hf_state_dict_from_megatron"]


def hf_state_dict_from_megatron(state: dict[str, torch.Tensor], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """Megatron ``GPTModel`` tensors → Qwen3-MoE (Hugging Face) names: the inverse of ``megatron_state_dict``.

    ``linear_qkv`` is split per query group into ``q, k, v``; ``linear_fc1`` into ``gate_proj``
    and ``up_proj``; the rest is renamed.
    """
    groups, heads, hd, hidden = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    per_group = heads // groups
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"]}
    for i in range(cfg.num_hidden_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attention.linear_qkv.weight"].view(groups, (per_group + 2) * hd, hidden)
        q, k, v = qkv.split([per_group * hd, hd, hd], dim=1)
        out[dst + "self_attn.q_proj.weight"] = q.reshape(-1, hidden)
        out[dst + "self_attn.k_proj.weight"] = k.reshape(-1, hidden)
        out[dst + "self_attn.v_proj.weight"] = v.reshape(-1, hidden)
        out[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.linear_proj.weight"]
        out[dst + "self_attn.q_norm.weight"] = state[src + "self_attention.q_layernorm.weight"]
        out[dst + "self_attn.k_norm.weight"] = state[src + "self_attention.k_layernorm.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "pre_mlp_layernorm.weight"]
        out[dst + "mlp.gate.weight"] = state[src + "mlp.router.weight"]
        for e in range(cfg.num_experts):
            me, ex = f"{src}mlp.experts.local_experts.{e}.", f"{dst}mlp.experts.{e}."
            gate, up = state[me + "linear_fc1.weight"].chunk(2, dim=0)
            out[ex + "gate_proj.weight"], out[ex + "up_proj.weight"] = gate, up
            out[ex + "down_proj.weight"] = state[me + "linear_fc2.weight"]
    out["model.norm.weight"] = state["decoder.final_layernorm.weight"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


class MegatronTrainer(Trainer):
    """:class:`Trainer` whose recompute and update run in megatron-core (``Trainer(config)`` picks it)."""

    def __init__(self, config: TrainConfig, model=None) -> None:
        super().__init__(config, model)
        from .megatron_cpu import build_megatron_model

        self.mcore = build_megatron_model(self.model)
        self.optimizer = torch.optim.AdamW(self.mcore.parameters(), lr=config.lr, weight_decay=0.0)
        self.num_experts = self.model.config.num_experts

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def export_weights(self) -> None:
        """Copy the Megatron weights into the reference model (the rollout engine syncs from it)."""
        state = {k: v for k, v in self.mcore.state_dict().items() if not k.endswith("_extra_state")}
        self.model.load_state_dict(hf_state_dict_from_megatron(state, self.model.config))

    def rollout(self) -> tuple[RolloutBatch, torch.Tensor]:
        self.export_weights()
        return super().rollout()

    def save_checkpoint(self):
        self.export_weights()
        return super().save_checkpoint()

    # ------------------------------------------------------------------ phases
    def _forward(self, batch: RolloutBatch, trace: RoutingTrace | None):
        """Megatron log-probs of ``batch`` replaying ``trace`` (or routing natively and recording) and the routes used."""
        from .megatron import megatron_logprobs

        lengths = batch.seq_lengths.tolist()
        out = megatron_logprobs(self.mcore, batch.tokens, lengths, trace, "replay" if trace is not None else "record", temperature=self.config.temperature)
        used = out.trace if trace is None else RoutingTrace.from_padded(out.routes, lengths, self.num_experts)
        return out, used

    @torch.no_grad()
    def recompute_old(self, batch: RolloutBatch) -> tuple[torch.Tensor, RoutingTrace, torch.Tensor]:
        out, used = self._forward(batch, batch.rollout_trace if self.config.replay == "r3" else None)
        old_logp, entropy = next_token_logprobs_and_entropy(out.logits, batch.tokens, self.config.temperature)
        return old_logp, used, entropy

    @torch.no_grad()
    def native_routes(self, batch: RolloutBatch) -> RoutingTrace:
        return self._forward(batch, None)[1]

    def update(self, batch: RolloutBatch, old_logp, old_trace: RoutingTrace, advantages) -> list[dict]:
        """One optimizer step per mini-batch on the Megatron model (the reference loop's :meth:`Trainer.update`)."""
        cfg = self.config
        self.mcore.train()
        stats_per_mb = []
        old_parts = old_trace.split()
        for idx in self.minibatches(batch.num_sequences):
            sub = batch.select(idx)
            sub_old_trace = RoutingTrace.concatenate(old_parts[i] for i in idx.tolist())
            # --8<-- [start:megatron-update]
            replayed = {"none": None, "r2": sub_old_trace, "r3": sub.rollout_trace}[cfg.replay]
            out, current = self._forward(sub, replayed)  # RouterReplay: REPLAY_FORWARD, or RECORD when native
            logp = out.logprobs
            loss, stats = self.objective(
                logp, old_logp[idx, : logp.shape[1]], sub.rollout_logp, advantages[idx], sub.mask, **cfg.objective_kwargs
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.mcore.parameters(), cfg.grad_clip)
            self.optimizer.step()
            # --8<-- [end:megatron-update]
            stats = dict(stats)
            stats["loss"] = float(loss.detach())
            stats["grad_norm"] = float(grad_norm)
            stats["routing_flip_rate"] = M.routing_flip_rate(sub_old_trace.expert_ids.long(), current.expert_ids.long())
            stats["routing_vs_rollout"] = current.agreement(sub.rollout_trace).router_disagreement
            stats_per_mb.append(stats)
        return stats_per_mb
