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
statistics, routing flip rate between π_θold's and π_θ's routes in each update. With
``TrainConfig.native_probe`` also, per mini-batch, what replay hides (one extra no-grad forward of
π_θ with native routing): the stale flip (native π_θ vs native π_θold routes) and the replay gap
(replayed routes vs native π_θ routes), in routes and in log-probs.

The step's data (tokens, log-probs, mask, route grids) is laid out once on padded grids
(:class:`StepGrid`); each mini-batch indexes it.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import metrics as M
from . import run_dir as RD
from .checkpoint import load_hf_checkpoint
from .errors import ConfigError
from .numerics import NUMERICS
from .model import MoEConfig, MoEForCausalLM
from .advantages import group_advantages
from .batch import RolloutBatch
from .logprobs import next_token_logprobs, next_token_logprobs_and_entropy
from .objectives import OBJECTIVE_SPECS, OBJECTIVES, router_shift
from .replay import record_routing, replay_routing
from .rollout import RolloutEngine
from .routing import RoutingTrace
from .tasks import EOS, PAD, TASKS, VOCAB_SIZE, cold_start, make_task
from .validation import masked_mean, masked_sum

__all__ = ["TrainConfig", "Trainer", "StepGrid", "REPLAY_MODES", "TRAINER_INPUTS", "plot_history"]

REPLAY_MODES = ("none", "r2", "r3")
#: the objective inputs (names of objectives.INPUTS) this trainer computes; it refuses objectives
#: that require any other, with the reason the objective declares
TRAINER_INPUTS = ("logp", "old_logp", "rollout_logp", "advantages", "mask", "router_shift")
#: what the native probe (``TrainConfig.native_probe``) logs per mini-batch, under ``update/<name>``
PROBE_METRICS = ("stale_route_flip", "stale_logp_gap", "replay_route_gap", "replay_logp_gap")
ROLLOUT_ENGINES = ("reference", "vllm")  # vllm: a live engine, reference_impl.integrations.vllm_rollout
TRAINER_BACKENDS = ("reference", "megatron")  # megatron: reference_impl.integrations.megatron_trainer


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
    native_probe: bool = False  # one extra no-grad native forward per mini-batch: stale flip, replay gap
    rollout_engine: str = "reference"  # reference | vllm (real numerics: numerics fp32 | bf16)
    trainer_backend: str = "reference"  # reference | megatron
    vllm_prefix_caching: bool = True  # GRPO-style groups share the prompt's KV blocks (routes from the route cache)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"TrainConfig: {message}")

        need(self.task in TASKS, f"unknown task {self.task!r}; choose from {sorted(TASKS)}")
        need(self.replay in REPLAY_MODES, f"replay must be one of {REPLAY_MODES}, got {self.replay!r}")
        need(self.numerics in NUMERICS, f"unknown numerics {self.numerics!r}; choose from {NUMERICS}")
        need(self.objective in OBJECTIVES, f"unknown objective {self.objective!r}; choose from {sorted(OBJECTIVES)}")
        missing = OBJECTIVE_SPECS[self.objective].missing(TRAINER_INPUTS)
        need(
            not missing,
            f"objective {self.objective!r} needs inputs this trainer does not compute ("
            + "; ".join(f"{k}: {why}" for k, why in missing.items())
            + "); call the objective directly",
        )
        for name in ("steps", "num_prompts", "group_size", "num_minibatches", "num_digits"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
        for name in ("cold_start_steps", "checkpoint_every"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"{name} must be an int >= 0, got {value!r}")
        for name in ("grad_clip", "lr", "temperature", "cold_start_lr"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{name} must be a finite number > 0, got {value!r}")
        for name in ("router_noise_std", "router_init_std"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0, got {value!r}")
        need(isinstance(self.objective_kwargs, dict), f"objective_kwargs must be a dict, got {type(self.objective_kwargs).__name__}")
        _check_objective_kwargs(self.objective, self.objective_kwargs)
        need(self.rollout_engine in ROLLOUT_ENGINES, f"rollout_engine must be one of {ROLLOUT_ENGINES}, got {self.rollout_engine!r}")
        need(self.trainer_backend in TRAINER_BACKENDS, f"trainer_backend must be one of {TRAINER_BACKENDS}, got {self.trainer_backend!r}")
        need(
            self.rollout_engine != "vllm" or (self.numerics in ("fp32", "bf16") and not self.router_noise_std),
            "rollout_engine='vllm' runs real numerics: numerics must be fp32 or bf16 and "
            f"router_noise_std 0 (the simulated dial is the reference engine's), got {self.numerics!r}, {self.router_noise_std}",
        )
        n = self.num_prompts * self.group_size
        need(
            n % self.num_minibatches == 0,
            f"num_minibatches={self.num_minibatches} must divide the "
            f"{n} responses (num_prompts={self.num_prompts} x group_size={self.group_size})",
        )

# --8<-- [end:train-config]


def _check_objective_kwargs(objective: str, kwargs: dict) -> None:
    """Refuse ``objective_kwargs`` the objective's signature does not take (before any cold start)."""
    params = inspect.signature(OBJECTIVES[objective]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    # the trainer passes the first five arguments (logp, old_logp, rollout_logp, advantages, mask)
    accepted = [name for name, p in list(params.items())[5:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"TrainConfig: objective {objective!r} takes no argument(s) {unknown}; it accepts {accepted}")


@dataclass
class MiniBatch:
    """The rows ``idx`` of a :class:`StepGrid`, trimmed to their longest sequence (``W`` tokens)."""

    idx: torch.Tensor  # [b] rows of the step's batch
    tokens: torch.Tensor  # [b, W]
    lengths: list[int]  # tokens per sequence
    mask: torch.Tensor  # [b, W-1]
    rollout_logp: torch.Tensor  # [b, W-1] log μ_θold
    old_logp: torch.Tensor  # [b, W-1] log π_θold (as recomputed: replaying e^μ_old under R3)
    advantages: torch.Tensor  # [b]
    rollout_trace: RoutingTrace  # e^μ_old, the engine's routes
    old_trace: RoutingTrace  # e^π_old, the recompute's routes
    old_route_ids: torch.Tensor  # [b, W-1, L, k] the same as a grid
    native_old_logp: torch.Tensor | None = None  # [b, W-1] log π_θold with native routing
    native_old_trace: RoutingTrace | None = None  # π_θold's native routes


@dataclass
class StepGrid:
    """One step's batch laid out once on padded grids; :meth:`rows` indexes a mini-batch from it.

    Column ``t`` of the ``[n, S-1]`` tensors scores ``tokens[:, t+1]``; a route grid is
    ``(ids [n, S, L, k], valid [n, S])`` (position ``t`` routes input token ``t``; the last position
    of each sequence and the padding are invalid), as :meth:`RoutingTrace.to_padded` lays it out.
    """

    tokens: torch.Tensor
    seq_lengths: torch.Tensor
    mask: torch.Tensor
    rollout_logp: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    rollout_routes: tuple[torch.Tensor, torch.Tensor]
    old_routes: tuple[torch.Tensor, torch.Tensor]
    num_experts: int
    router_family: str | None = None
    native_old_logp: torch.Tensor | None = None
    native_old_routes: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def build(
        batch: RolloutBatch,
        old_logp: torch.Tensor,
        old_trace: RoutingTrace,
        advantages: torch.Tensor,
        native_old: tuple[torch.Tensor, RoutingTrace] | None = None,
    ) -> "StepGrid":
        width = batch.tokens.shape[1]
        return StepGrid(
            tokens=batch.tokens,
            seq_lengths=batch.seq_lengths,
            mask=batch.mask,
            rollout_logp=batch.rollout_logp,
            old_logp=old_logp,
            advantages=advantages,
            rollout_routes=batch.rollout_trace.to_padded(width),
            old_routes=old_trace.to_padded(width),
            num_experts=old_trace.num_experts,
            router_family=old_trace.router_family or batch.rollout_trace.router_family,
            native_old_logp=None if native_old is None else native_old[0],
            native_old_routes=None if native_old is None else native_old[1].to_padded(width),
        )

    def _trace(self, grid: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, width: int, lengths) -> RoutingTrace:
        ids, valid = grid
        return RoutingTrace.from_padded(ids[idx, :width], lengths, self.num_experts, valid[idx, :width], router_family=self.router_family)

    def rows(self, idx: torch.Tensor) -> MiniBatch:
        width = int(self.seq_lengths[idx].max())
        lengths = self.seq_lengths[idx].tolist()
        native = self.native_old_routes
        return MiniBatch(
            idx=idx,
            tokens=self.tokens[idx, :width],
            lengths=lengths,
            mask=self.mask[idx, : width - 1],
            rollout_logp=self.rollout_logp[idx, : width - 1],
            old_logp=self.old_logp[idx, : width - 1],
            advantages=self.advantages[idx],
            rollout_trace=self._trace(self.rollout_routes, idx, width, lengths),
            old_trace=self._trace(self.old_routes, idx, width, lengths),
            old_route_ids=self.old_routes[0][idx, : width - 1],
            native_old_logp=None if self.native_old_logp is None else self.native_old_logp[idx, : width - 1],
            native_old_trace=None if native is None else self._trace(native, idx, width, lengths),
        )


def _router_logp(out, batch: int, seq_len: int) -> torch.Tensor:
    """Per-layer router log-probabilities ``[batch, seq_len, L, E]`` (fp32, no graph) of a forward."""
    logits = torch.stack([r.detach() for r in out.router_logits], dim=1)  # [batch*seq_len, L, E]
    return torch.log_softmax(logits.float(), dim=-1).view(batch, seq_len, *logits.shape[1:])


class Trainer:
    """Runs :class:`TrainConfig`; ``history`` holds one metrics dict per global step."""

    def __new__(cls, config: TrainConfig, model: MoEForCausalLM | None = None):
        if cls is Trainer and config.trainer_backend == "megatron":  # the update runs in megatron-core
            from .integrations.megatron_trainer import MegatronTrainer

            cls = MegatronTrainer
        return super().__new__(cls)

    def __init__(self, config: TrainConfig, model: MoEForCausalLM | None = None) -> None:
        self.config = cfg = config
        self.task = make_task(cfg.task, cfg.num_digits)
        if model is None:
            with torch.random.fork_rng(devices=[]):  # seeded init without reseeding the caller's RNG
                torch.manual_seed(cfg.seed)
                model = MoEForCausalLM(MoEConfig(vocab_size=VOCAB_SIZE, router_initializer_range=cfg.router_init_std))
            if cfg.cold_start_steps:
                cold_start(model, self.task, steps=cfg.cold_start_steps, lr=cfg.cold_start_lr, seed=cfg.seed)
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.engine = _make_rollout_engine(cfg)
        self.prompt_generator = torch.Generator().manual_seed(cfg.seed + 1000)
        self.shuffle_generator = torch.Generator().manual_seed(cfg.seed + 2000)
        self.objective = OBJECTIVES[cfg.objective]
        spec = OBJECTIVE_SPECS[cfg.objective]
        #: the inputs beyond the five common ones this objective asks for and this trainer computes
        self.extra_inputs = [k for k in (*spec.requires, *spec.optional) if k == "router_shift"]
        self.history: list[dict] = []
        self.step = 0
        self._run_prepared = False

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
    def native_old(self, batch: RolloutBatch) -> tuple[torch.Tensor, RoutingTrace]:
        """π_θold's log-probs and routes with native routing (the recompute's own under none and R2)."""
        out = self.model(batch.tokens)
        logp = next_token_logprobs(out.logits, batch.tokens, self.config.temperature)
        return logp, RoutingTrace.from_padded(out.routes, batch.seq_lengths.tolist(), self.model.config.num_experts)

    def native_routes(self, batch: RolloutBatch) -> RoutingTrace:
        return self.native_old(batch)[1]

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

    @torch.no_grad()
    def _old_router_logp(self, grid: StepGrid, old_trace: RoutingTrace) -> torch.Tensor:
        """π_θold's router log-probs ``[n, S, L, E]``: a forward replaying the recompute's own routes."""
        with self._routing(old_trace, grid.seq_lengths.tolist()):
            out = self.model(grid.tokens, output_router_logits=True)
        return _router_logp(out, *grid.tokens.shape)

    # --8<-- [start:native-probe]
    @torch.no_grad()
    def _native_probe(self, mb: MiniBatch, replayed: RoutingTrace | None, logp: torch.Tensor, probe) -> dict:
        """What replay hides, for one mini-batch (issue: "log what replay hides").

        ``probe`` = (log-probs, routes) of π_θ routed natively, before this mini-batch's step:

        * stale flip: native π_θ routes vs native π_θold routes (share of (token, layer) top-k sets
          that differ), whatever the replay mode; ``stale_logp_gap``: mean |Δ log π| per response token;
        * replay gap: the routes this update replays vs native π_θ routes (0 under no replay);
          ``replay_logp_gap``: mean |log π_θ(replayed) − log π_θ(native)| per response token.
        """
        native_logp, native_trace = probe
        mask = mb.mask.bool()
        out = {
            "stale_route_flip": native_trace.agreement(mb.native_old_trace).router_disagreement,
            "stale_logp_gap": masked_mean((native_logp - mb.native_old_logp).abs(), mask),
            "replay_route_gap": 0.0,
            "replay_logp_gap": 0.0,
        }
        if replayed is not None:
            out["replay_route_gap"] = replayed.agreement(native_trace).router_disagreement
            out["replay_logp_gap"] = masked_mean((logp.detach() - native_logp).abs(), mask)
        return out
    # --8<-- [end:native-probe]

    def update(
        self,
        batch: RolloutBatch,
        old_logp,
        old_trace: RoutingTrace,
        advantages,
        native_old: tuple[torch.Tensor, RoutingTrace] | None = None,
    ) -> list[dict]:
        """One optimizer step per mini-batch; returns per-mini-batch statistics.

        ``native_old`` (π_θold's native log-probs and routes) feeds the native probe; by default the
        recompute's own under none and R2, and one native forward under R3.
        """
        cfg = self.config
        self.model.train()
        if cfg.native_probe and native_old is None:
            native_old = (old_logp, old_trace) if cfg.replay != "r3" else self.native_old(batch)
        grid = StepGrid.build(batch, old_logp, old_trace, advantages, native_old if cfg.native_probe else None)
        old_router_logp = self._old_router_logp(grid, old_trace) if "router_shift" in self.extra_inputs else None
        stats_per_mb = []
        # --8<-- [start:update-replay]
        for idx in self.minibatches(batch.num_sequences):
            mb = grid.rows(idx)
            probe = self._native_forward(mb) if cfg.native_probe else None  # π_θ before this step, native
            replayed = {"none": None, "r2": mb.old_trace, "r3": mb.rollout_trace}[cfg.replay]
            with record_routing(self.model) as rec, self._routing(replayed, mb.lengths):
                out = self.model(mb.tokens, output_router_logits=old_router_logp is not None)
            logp = next_token_logprobs(out.logits, mb.tokens, cfg.temperature)
            extra = {}
            if old_router_logp is not None:  # RSPO's Δ_t at the experts π_θold selected
                width = logp.shape[1]
                new_router_logp = _router_logp(out, *mb.tokens.shape)[:, :width]
                extra["router_shift"] = router_shift(old_router_logp[idx, :width], new_router_logp, mb.old_route_ids)
            loss, stats = self.objective(
                logp, mb.old_logp, mb.rollout_logp, mb.advantages, mb.mask, **extra, **cfg.objective_kwargs
            )
            # --8<-- [end:update-replay]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            current = rec.trace(mb.lengths)
            stats = dict(stats)
            stats["loss"] = float(loss.detach())
            stats["grad_norm"] = float(grad_norm)
            stats["routing_flip_rate"] = M.routing_flip_rate(mb.old_trace.expert_ids.long(), current.expert_ids.long())
            stats["routing_vs_rollout"] = current.agreement(mb.rollout_trace).router_disagreement
            if probe is not None:
                stats.update(self._native_probe(mb, replayed, logp, probe))
            stats_per_mb.append(stats)
        return stats_per_mb

    @torch.no_grad()
    def _native_forward(self, mb: MiniBatch) -> tuple[torch.Tensor, RoutingTrace]:
        """The native probe's forward: π_θ's log-probs and routes with native routing (no grad)."""
        out = self.model(mb.tokens)
        logp = next_token_logprobs(out.logits, mb.tokens, self.config.temperature)
        return logp, RoutingTrace.from_padded(out.routes, mb.lengths, self.model.config.num_experts)

    # -------------------------------------------------------------------- loop
    def train_step(self) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        batch, rewards = self.rollout()
        t_rollout = time.perf_counter() - t0
        advantages = group_advantages(rewards, batch.group_ids, normalize_std=cfg.advantage_std_norm)
        old_logp, old_trace, entropy = self.recompute_old(batch)
        native_old = (old_logp, old_trace) if cfg.replay != "r3" else self.native_old(batch)
        native_trace = native_old[1]
        mb_stats = self.update(batch, old_logp, old_trace, advantages, native_old)
        mask = batch.mask
        as_used, native = batch.rollout_trace.agreement(old_trace), batch.rollout_trace.agreement(native_trace)
        record = {
            "step": self.step,
            "reward": float(rewards.mean()),
            "response_length": float(batch.response_lengths.float().mean()),
            **M.mismatch_metrics(batch.rollout_logp, old_logp, mask, tau=2.0),
            "routing_disagreement": as_used.router_disagreement,
            "native_routing_disagreement": native.router_disagreement,
            "native_token_disagreement": native.token_disagreement,
            # n of N: the disagreements above are over rows valid in both traces (NaN when none is)
            "routing_rows_compared": float(native.num_tokens),
            "routing_rows_total": float(native.num_rows),
            "entropy": float(masked_sum(entropy, mask.bool()) / mask.sum()),  # NaN-safe: padding never enters
            "seconds_rollout": t_rollout,
            "seconds_step": time.perf_counter() - t0,
        }
        record.update({f"engine/{k}": v for k, v in getattr(self.engine, "stats", {}).items()})
        for key in mb_stats[0]:
            values = [s[key] for s in mb_stats if isinstance(s.get(key), (int, float))]
            if values:
                record[f"update/{key}"] = sum(values) / len(values)
        # later mini-batches are where R2/R3 and staleness differ
        record["update/routing_flip_rate_last"] = mb_stats[-1]["routing_flip_rate"]
        if cfg.native_probe:  # one value per mini-batch, in update order
            record["by_minibatch"] = {key: [s[key] for s in mb_stats] for key in PROBE_METRICS}
        self.history.append(record)
        self.step += 1
        return record

    def train(self) -> list[dict]:
        """Run the remaining steps; with ``out_dir``, log each step durably and checkpoint (see :mod:`.run_dir`)."""
        cfg = self.config
        if cfg.out_dir and not self._run_prepared:
            RD.prepare_run_dir(cfg.out_dir, asdict(cfg))  # refuses a dir that holds a run; fails before step 1
            self._run_prepared = True
        bar = tqdm(range(self.step, cfg.steps), desc=f"{cfg.objective}/{cfg.replay}", disable=not cfg.progress)
        for _ in bar:
            rec = self.train_step()
            bar.set_postfix(reward=f"{rec['reward']:.2f}", kl=f"{rec['kl_k3']:.1e}")
            if cfg.out_dir:
                RD.append_metrics(cfg.out_dir, rec)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                RD.kill_point_after_step(self.step)  # test-only hook (no-op unless its env var is set)
        if cfg.out_dir:
            self.save()
        return self.history

    @classmethod
    def resume(cls, run_dir: str | Path, *, steps: int | None = None, progress: bool | None = None) -> "Trainer":
        """Continue the run in ``run_dir`` from its last complete checkpoint (``steps`` may extend it)."""
        saved, ckpt = RD.resume_point(run_dir)
        overrides = {k: v for k, v in {"steps": steps, "progress": progress}.items() if v is not None}
        try:
            config = TrainConfig(**{**saved, **overrides, "out_dir": str(run_dir)})
        except TypeError as err:
            raise ConfigError(f"train --resume: {run_dir}/config.json does not match TrainConfig: {err}") from None
        trainer = cls(config, model=load_hf_checkpoint(ckpt))
        RD.restore(trainer, run_dir, ckpt)
        if config.steps < trainer.step:
            raise ConfigError(f"train --resume: steps={config.steps} is before the checkpoint's step {trainer.step}")
        trainer._run_prepared = True
        return trainer

    # --------------------------------------------------------------- artifacts
    def save_checkpoint(self) -> Path:
        """Atomic checkpoint of model, optimizer, step and every RNG state (:func:`.run_dir.save_checkpoint`)."""
        return RD.save_checkpoint(self.config.out_dir, self)

    def save(self) -> Path:
        out = Path(self.config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        (out / "metrics.json").write_text(json.dumps(self.history, indent=1))
        plot_history({"run": self.history}, out / "metrics.png")
        self.save_checkpoint()
        return out


def _make_rollout_engine(cfg: TrainConfig):
    if cfg.rollout_engine == "vllm":
        from .integrations.vllm_rollout import VllmRolloutEngine

        return VllmRolloutEngine(numerics=cfg.numerics, temperature=cfg.temperature, seed=cfg.seed, enable_prefix_caching=cfg.vllm_prefix_caching)
    return RolloutEngine(numerics=cfg.numerics, router_noise_std=cfg.router_noise_std, temperature=cfg.temperature, seed=cfg.seed)


def plot_history(histories: dict[str, list[dict]], path, keys: tuple[str, ...] = ("reward", "kl_k3", "extreme_token_fraction", "entropy")) -> None:
    """One panel per metric, one line per run; saved to ``path`` (PNG)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch

    fig = Figure(figsize=(4 * len(keys), 3.2))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
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
