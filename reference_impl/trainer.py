"""The synchronous RL loop of arXiv 2512.01374, with native, R2 or R3 routing.

One global step:

1. sample ``num_prompts`` prompts; the rollout engine (μ_θold: an engine copy of the current
   weights in its own numerics) samples ``group_size`` responses each and returns
   ``rollout_logp`` and the engine's routes ``rollout_trace`` (e^μ_old);
2. rewards, advantages ``R - mean over the group``;
3. the trainer recomputes ``old_logp`` (π_θold) in fp32:
   native routing; **R2** records its own routes ``old_trace`` (e^π_old) here;
   **R3** replays ``rollout_trace`` here;
4. the ``n = num_prompts * group_size`` responses are split into ``num_minibatches`` mini-batches;
   each gets one optimizer step on the objective (MiniRL by default), with π_θ's routing
   native, replaying ``old_trace`` (R2) or replaying ``rollout_trace`` (R3).

Target policies (Table 1 of arXiv 2512.01374): R2 optimizes π(y_t | e^π_old,t), which equals the
native π_θ on the first mini-batch (θ = θ_old) and differs from it on later ones; R3 optimizes
π(y_t | e^μ_old,t) on every mini-batch.

Metrics per step: reward, KL(μ_old‖π_old) (k1, k3), extreme-token fraction F(2), routing
disagreement engine vs trainer (as used, and with native trainer routing), entropy, objective
statistics, routing flip rate between π_θold's and π_θ's routes in each update.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
import torch
from tqdm.auto import tqdm

from . import metrics as M
from .checkpoint import save_hf_checkpoint
from .model import MoEConfig, MoEForCausalLM
from .advantages import group_advantages
from .batch import RolloutBatch
from .logprobs import next_token_logprobs, next_token_logprobs_and_entropy
from .objectives import OBJECTIVES
from .replay import record_routing, replay_routing
from .rollout import RolloutEngine
from .routing import RoutingTrace
from .tasks import EOS, PAD, VOCAB_SIZE, cold_start, make_task

__all__ = ["TrainConfig", "Trainer", "REPLAY_MODES", "plot_history"]

REPLAY_MODES = ("none", "r2", "r3")
#: objectives this trainer cannot feed, and why (call them directly instead)
NEEDS_EXTRA_INPUTS = {
    "rspo": "needs per-token router shifts (objectives.router_shift over per-layer router log-probs), "
    "which this trainer does not compute; call objectives.rspo_loss directly",
}


# --8<-- [start:train-config]
@dataclass
class TrainConfig:
    """Everything an experiment needs; every field is a command-line flag of ``python -m reference_impl train``."""

    task: str = "sort"
    num_digits: int = 5
    steps: int = 100
    num_prompts: int = 32  # B
    group_size: int = 8  # G
    num_minibatches: int = 1  # N
    replay: str = "none"  # none | r2 | r3
    objective: str = "minirl"
    objective_kwargs: dict = field(default_factory=dict)
    advantage_std_norm: bool = False  # GRPO divides by the group std; MiniRL does not
    lr: float = 3e-4
    grad_clip: float = 1.0
    numerics: str = "fp32"  # engine numerics: fp32 | bf16 | fp8_e4m3 | fp8_e5m2 (simulated)
    router_noise_std: float = 0.0  # SIMULATED mismatch on the engine's router logits
    temperature: float = 1.0
    cold_start_steps: int = 60
    cold_start_lr: float = 3e-3
    router_init_std: float = 0.02  # small router weights: near-tie routes that can flip
    seed: int = 0
    out_dir: str | None = None
    checkpoint_every: int = 0  # 0 = only at the end (when out_dir is set)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.replay not in REPLAY_MODES:
            raise ValueError(f"TrainConfig: replay must be one of {REPLAY_MODES}, got {self.replay!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig: unknown objective {self.objective!r}; choose from {sorted(OBJECTIVES)}")
        if self.objective in NEEDS_EXTRA_INPUTS:
            raise ValueError(f"TrainConfig: objective {self.objective!r} {NEEDS_EXTRA_INPUTS[self.objective]}")
        n = self.num_prompts * self.group_size
        if self.num_minibatches < 1 or n % self.num_minibatches:
            raise ValueError(
                f"TrainConfig: num_minibatches={self.num_minibatches} must divide the "
                f"{n} responses (num_prompts={self.num_prompts} x group_size={self.group_size})"
            )
# --8<-- [end:train-config]


class Trainer:
    """Runs :class:`TrainConfig`; ``history`` holds one metrics dict per global step."""

    def __init__(self, config: TrainConfig, model: MoEForCausalLM | None = None) -> None:
        self.config = cfg = config
        torch.manual_seed(cfg.seed)
        self.task = make_task(cfg.task, cfg.num_digits)
        if model is None:
            model = MoEForCausalLM(MoEConfig(vocab_size=VOCAB_SIZE, router_initializer_range=cfg.router_init_std))
            if cfg.cold_start_steps:
                cold_start(model, self.task, steps=cfg.cold_start_steps, lr=cfg.cold_start_lr, seed=cfg.seed)
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.engine = RolloutEngine(
            numerics=cfg.numerics, router_noise_std=cfg.router_noise_std, temperature=cfg.temperature, seed=cfg.seed
        )
        self.prompt_generator = torch.Generator().manual_seed(cfg.seed + 1000)
        self.shuffle_generator = torch.Generator().manual_seed(cfg.seed + 2000)
        self.objective = OBJECTIVES[cfg.objective]
        self.history: list[dict] = []
        self.step = 0

    # ------------------------------------------------------------------ phases
    def rollout(self) -> tuple[RolloutBatch, torch.Tensor]:
        cfg = self.config
        prompts = self.task.sample_prompts(cfg.num_prompts, self.prompt_generator)
        self.engine.sync_weights(self.model)
        batch = self.engine.generate(
            prompts, group_size=cfg.group_size, max_new_tokens=self.task.max_new_tokens, eos_id=EOS, pad_id=PAD
        )
        rewards = self.task.rewards(prompts[batch.group_ids], batch.responses(self.task.max_new_tokens), batch.response_lengths)
        return batch, rewards

    # --8<-- [start:recompute-old]
    @torch.no_grad()
    def recompute_old(self, batch: RolloutBatch) -> tuple[torch.Tensor, RoutingTrace, torch.Tensor]:
        """π_θold log-probs, the routes the recompute used (R2's ``old_trace``) and the entropy.

        R3 replays ``rollout_trace`` here; native and R2 route natively (R2 records).
        """
        lengths = batch.seq_lengths.tolist()
        self.model.eval()
        with record_routing(self.model) as rec, self._routing(batch.rollout_trace if self.config.replay == "r3" else None, lengths):
            logits = self.model(batch.tokens).logits
        old_logp, entropy = next_token_logprobs_and_entropy(logits, batch.tokens, self.config.temperature)
        return old_logp, rec.trace(lengths), entropy
    # --8<-- [end:recompute-old]

    @torch.no_grad()
    def native_routes(self, batch: RolloutBatch) -> RoutingTrace:
        with record_routing(self.model) as rec:
            self.model(batch.tokens)
        return rec.trace(batch.seq_lengths.tolist())

    # --8<-- [start:routing-context]
    def _routing(self, trace: RoutingTrace | None, seq_lengths):
        """Replay ``trace`` if given, else leave routing native."""
        if trace is None:
            return nullcontext()
        return replay_routing(self.model, trace, seq_lengths=seq_lengths)
    # --8<-- [end:routing-context]

    def minibatches(self, n: int) -> list[torch.Tensor]:
        perm = torch.randperm(n, generator=self.shuffle_generator)
        return list(perm.chunk(self.config.num_minibatches))

    def update(self, batch: RolloutBatch, old_logp, old_trace: RoutingTrace, advantages) -> list[dict]:
        """One optimizer step per mini-batch; returns per-mini-batch statistics."""
        cfg = self.config
        self.model.train()
        stats_per_mb = []
        # --8<-- [start:update-replay]
        old_parts = old_trace.split()
        for idx in self.minibatches(batch.num_sequences):
            sub = batch.select(idx)
            sub_old_trace = RoutingTrace.concatenate(old_parts[i] for i in idx.tolist())
            replayed = {"none": None, "r2": sub_old_trace, "r3": sub.rollout_trace}[cfg.replay]
            lengths = sub.seq_lengths.tolist()
            with record_routing(self.model) as rec, self._routing(replayed, lengths):
                logits = self.model(sub.tokens).logits
            logp = next_token_logprobs(logits, sub.tokens, cfg.temperature)
            loss, stats = self.objective(
                logp, old_logp[idx, : logp.shape[1]], sub.rollout_logp, advantages[idx], sub.mask, **cfg.objective_kwargs
            )
            # --8<-- [end:update-replay]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            current = rec.trace(lengths)
            stats = dict(stats)
            stats["loss"] = float(loss.detach())
            stats["grad_norm"] = float(grad_norm)
            stats["routing_flip_rate"] = M.routing_flip_rate(sub_old_trace.expert_ids.long(), current.expert_ids.long())
            stats["routing_vs_rollout"] = current.agreement(sub.rollout_trace).router_disagreement
            stats_per_mb.append(stats)
        return stats_per_mb

    # -------------------------------------------------------------------- loop
    def train_step(self) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        batch, rewards = self.rollout()
        t_rollout = time.perf_counter() - t0
        advantages = group_advantages(rewards, batch.group_ids, normalize_std=cfg.advantage_std_norm)
        old_logp, old_trace, entropy = self.recompute_old(batch)
        native_trace = old_trace if cfg.replay != "r3" else self.native_routes(batch)
        mb_stats = self.update(batch, old_logp, old_trace, advantages)
        mask = batch.mask
        record = {
            "step": self.step,
            "reward": float(rewards.mean()),
            "response_length": float(batch.response_lengths.float().mean()),
            "kl_k1": M.kl_k1(batch.rollout_logp, old_logp, mask),
            "kl_k3": M.kl_k3(batch.rollout_logp, old_logp, mask),
            "extreme_token_fraction": M.extreme_token_fraction(batch.rollout_logp, old_logp, mask, tau=2.0),
            "routing_disagreement": batch.rollout_trace.agreement(old_trace).router_disagreement,
            "native_routing_disagreement": batch.rollout_trace.agreement(native_trace).router_disagreement,
            "native_token_disagreement": batch.rollout_trace.agreement(native_trace).token_disagreement,
            "entropy": float((entropy * mask).sum() / mask.sum()),
            "seconds_rollout": t_rollout,
            "seconds_step": time.perf_counter() - t0,
        }
        for key in mb_stats[0]:
            values = [s[key] for s in mb_stats if isinstance(s.get(key), (int, float))]
            if values:
                record[f"update/{key}"] = sum(values) / len(values)
        # later mini-batches are where R2/R3 and staleness differ
        record["update/routing_flip_rate_last"] = mb_stats[-1]["routing_flip_rate"]
        self.history.append(record)
        self.step += 1
        return record

    def train(self) -> list[dict]:
        cfg = self.config
        bar = tqdm(range(cfg.steps), desc=f"{cfg.objective}/{cfg.replay}", disable=not cfg.progress)
        for _ in bar:
            rec = self.train_step()
            bar.set_postfix(reward=f"{rec['reward']:.2f}", kl=f"{rec['kl_k3']:.1e}")
            if cfg.out_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        if cfg.out_dir:
            self.save()
        return self.history

    # --------------------------------------------------------------- artifacts
    def save_checkpoint(self) -> Path:
        path = Path(self.config.out_dir) / "checkpoints" / f"step_{self.step:05d}"
        save_hf_checkpoint(self.model, path)
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        return path

    def save(self) -> Path:
        out = Path(self.config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        (out / "metrics.json").write_text(json.dumps(self.history, indent=1))
        plot_history({"run": self.history}, out / "metrics.png")
        self.save_checkpoint()
        return out


def plot_history(histories: dict[str, list[dict]], path, keys: tuple[str, ...] = ("reward", "kl_k3", "extreme_token_fraction", "entropy")) -> None:
    """One panel per metric, one line per run; saved to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        for label, hist in histories.items():
            ax.plot([h["step"] for h in hist], [h.get(key, float("nan")) for h in hist], label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key.startswith("kl"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
