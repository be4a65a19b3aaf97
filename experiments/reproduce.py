"""Reproduce the papers' findings at toy scale: one command, several seeds, results committed next to it.

Findings tested (each is a group of runs; see ``FINDINGS``):

* ``r3_mismatch`` (arXiv 2510.11370): R3 lowers KL(μ_old‖π_old) and the extreme-token fraction
  F(2), and routing disagreement drops to zero under replay. No training: rollouts from a
  cold-started model in each engine numerics, recomputed natively and with R3.
* ``on_policy`` (arXiv 2512.01374, Fig. 1): N = 1; MiniRL vs with length normalization vs without
  the training–inference IS weight vs MiniRL + R3.
* ``off_policy`` (Figs. 2–4): N = 2, 4, 8 mini-batches × {no replay, R2, R3} × {clipping, none}.

Mismatch source: at toy scale real precision effects are too small to move training, so the RL
findings use the SIMULATED mismatch of :mod:`reference_impl.numerics` (Gaussian noise on the
engine's router logits), and say so in every table.

    python experiments/reproduce.py                    # full: 3 seeds, ~45-60 min on 2 cores
    python experiments/reproduce.py --profile ci --out /tmp/repro   # reduced: a few minutes

Writes ``runs.json`` (every history), ``summary.json``, ``summary.md`` (and its Chinese twin
``summary.zh.md``; ``--tables`` re-renders both from ``summary.json``) and plots into ``--out``
(default ``experiments/results``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

PROFILES = {
    # steps per RL run, prompts × group, seeds, off-policy N values, rollouts for the mismatch study
    "full": dict(steps=150, num_prompts=32, group_size=8, seeds=(0, 1, 2), minibatches=(2, 4, 8), mismatch_prompts=128),
    "ci": dict(steps=6, num_prompts=8, group_size=4, seeds=(0,), minibatches=(2,), mismatch_prompts=16),
}
NOISE = 1.0  # SIMULATED router-logit noise for the RL findings (FACTS-toy: makes the effects visible)
NO_CLIP = {"eps_low": 1.0, "eps_high": 1e9}  # r_t >= 0 always, so no token is ever clipped


def run_config(args: tuple[str, dict]) -> dict:
    """One RL run in a worker process (1 thread: two runs share the 2 cores)."""
    import torch

    torch.set_num_threads(1)
    from reference_impl.trainer import TrainConfig, Trainer

    name, cfg = args
    t0 = time.perf_counter()
    history = Trainer(TrainConfig(**cfg)).train()
    return {"name": name, "config": cfg, "history": history, "seconds": time.perf_counter() - t0}


def rl_runs(profile: dict) -> list[tuple[str, dict]]:
    base = dict(
        steps=profile["steps"], num_prompts=profile["num_prompts"], group_size=profile["group_size"],
        router_noise_std=NOISE, lr=1e-3, progress=False,
    )
    runs = []
    for seed in profile["seeds"]:
        on = {
            "minirl": {},
            "minirl_length_norm": {"objective_kwargs": {"length_norm": True}},
            "minirl_no_train_infer_is": {"objective_kwargs": {"train_infer_is": False}},
            "minirl_r3": {"replay": "r3"},
        }
        for variant, extra in on.items():
            runs.append((f"on_policy/{variant}/seed{seed}", {**base, **extra, "seed": seed}))
        for n in profile["minibatches"]:
            for replay in ("none", "r2", "r3"):
                for clip in (True, False):
                    kw = {} if clip else {"objective_kwargs": dict(NO_CLIP)}
                    name = f"off_policy/N{n}/{replay}/{'clip' if clip else 'noclip'}/seed{seed}"
                    runs.append((name, {**base, **kw, "num_minibatches": n, "replay": replay, "seed": seed}))
    return runs


def _mismatch_rows(profile: dict) -> list[dict]:
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from mismatch_table import measure  # the same measurement as the committed mismatch table

    from reference_impl import MoEConfig, MoEForCausalLM
    from reference_impl.tasks import VOCAB_SIZE, cold_start, make_task

    rows = []
    task = make_task("sort")
    for seed in profile["seeds"]:
        torch.manual_seed(seed)
        model = MoEForCausalLM(MoEConfig(vocab_size=VOCAB_SIZE, router_initializer_range=0.02))
        cold_start(model, task, steps=80, seed=seed)
        model.eval()
        prompts = task.sample_prompts(profile["mismatch_prompts"], torch.Generator().manual_seed(seed + 1))
        for numerics in ("bf16", "fp8_e4m3", "fp8_e5m2"):
            rows.append({"seed": seed, **measure(model, task, numerics, 0.0, prompts, 8, seed)})
    return rows


# ------------------------------------------------------------------------------ statistics
def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of a 95% Student-t interval (0 for a single value)."""
    t95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, t95.get(len(values), 2.0) * statistics.stdev(values) / math.sqrt(len(values))


def run_summary(history: list[dict]) -> dict:
    tail = history[-max(1, len(history) // 5) :]
    return {
        "final_reward": statistics.fmean(h["reward"] for h in tail),
        "final_kl_k3": statistics.fmean(h["kl_k3"] for h in tail),
        "peak_kl_k3": max(h["kl_k3"] for h in history),
        "final_entropy": statistics.fmean(h["entropy"] for h in tail),
        "final_extreme_token_fraction": statistics.fmean(h["extreme_token_fraction"] for h in tail),
    }


def group_key(name: str) -> str:
    return name.rsplit("/seed", 1)[0]


def summarize(results: list[dict], mismatch: list[dict]) -> dict:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(group_key(r["name"]), []).append(run_summary(r["history"]))
    out = {"rl": {}, "mismatch": {}}
    for key, runs in groups.items():
        out["rl"][key] = {metric: mean_ci([r[metric] for r in runs]) for metric in runs[0]} | {"seeds": len(runs)}
    for numerics in sorted({r["numerics"] for r in mismatch}):
        rows = [r for r in mismatch if r["numerics"] == numerics]
        out["mismatch"][numerics] = {
            m: mean_ci([r[m] for r in rows]) for m in ("kl_k3", "kl_k3_r3", "f2", "f2_r3", "router_disagreement", "token_disagreement")
        } | {"seeds": len(rows)}
    return out


def _fmt(mc, pct=False, sci=False) -> str:
    m, h = mc
    if sci:
        return f"{m:.2e}" + ("" if math.isnan(h) else f" ± {h:.1e}")
    if pct:
        return f"{m:.2%}" + ("" if math.isnan(h) else f" ± {h:.2%}")
    return f"{m:.3f}" + ("" if math.isnan(h) else f" ± {h:.3f}")


TEXT = {
    "en": {
        "note": "mean ± 95% t-interval over seeds",
        "mismatch": "R3 vs native recompute, no training (arXiv 2510.11370)",
        "mismatch_head": "| engine (trainer fp32) | KL k3 native | KL k3 R3 | F(2) native | F(2) R3 | routers differing | seeds |",
        "rl": "RL runs, simulated router-noise mismatch σ = {}",
        "rl_head": "| runs | final reward | final KL k3 | peak KL k3 | final entropy | seeds |",
    },
    "zh": {
        "note": "各种子的均值 ± 95% t 区间",
        "mismatch": "R3 与原生重新计算对比，不训练（arXiv 2510.11370）",
        "mismatch_head": "| 引擎（训练器 fp32） | KL k3 原生 | KL k3 R3 | F(2) 原生 | F(2) R3 | 不一致的路由器 | 种子数 |",
        "rl": "RL 运行，模拟的路由器噪声不一致 σ = {}",
        "rl_head": "| 运行 | 最终奖励 | 最终 KL k3 | KL k3 峰值 | 最终熵 | 种子数 |",
    },
}


def to_markdown(summary: dict, profile_name: str, lang: str = "en") -> str:
    """``summary.md`` (``lang="en"``) or its Chinese twin ``summary.zh.md``: same rows, same numbers."""
    t = TEXT[lang]
    lines = [f"<!-- generated by experiments/reproduce.py --profile {profile_name}; {t['note']} -->", ""]
    lines += [f"#### {t['mismatch']} {{ #table-r3-mismatch }}", ""]
    lines += [t["mismatch_head"], "|---|---|---|---|---|---|---|"]
    for numerics, s in summary["mismatch"].items():
        lines.append(
            f"| {numerics} | {_fmt(s['kl_k3'], sci=True)} | {_fmt(s['kl_k3_r3'], sci=True)} | {_fmt(s['f2'], pct=True)} "
            f"| {_fmt(s['f2_r3'], pct=True)} | {_fmt(s['router_disagreement'], pct=True)} | {s['seeds']} |"
        )
    lines += ["", f"#### {t['rl'].format(NOISE)} {{ #table-rl }}", ""]
    lines += [t["rl_head"], "|---|---|---|---|---|---|"]
    for key, s in sorted(summary["rl"].items()):
        lines.append(
            f"| {key} | {_fmt(s['final_reward'])} | {_fmt(s['final_kl_k3'], sci=True)} | {_fmt(s['peak_kl_k3'], sci=True)} "
            f"| {_fmt(s['final_entropy'])} | {s['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def write_tables(summary: dict, profile_name: str, out: Path) -> None:
    (out / "summary.md").write_text(to_markdown(summary, profile_name))
    (out / "summary.zh.md").write_text(to_markdown(summary, profile_name, "zh"))


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curves(prefix: str):
        groups: dict[str, list[list[float]]] = {}
        for r in results:
            if r["name"].startswith(prefix):
                groups.setdefault(group_key(r["name"])[len(prefix) :], []).append([h["reward"] for h in r["history"]])
        return groups

    panels = [("on_policy/", "on-policy (N=1)")] + sorted(
        {(f"off_policy/{r['name'].split('/')[1]}/", f"off-policy {r['name'].split('/')[1]}") for r in results if r["name"].startswith("off_policy")}
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (prefix, title) in zip(axes[0], panels):
        for label, runs in sorted(curves(prefix).items()):
            steps = min(len(r) for r in runs)
            mean = [statistics.fmean(r[i] for r in runs) for i in range(steps)]
            ax.plot(range(steps), mean, label=label, linestyle="--" if "noclip" in label else "-")
        ax.set_title(f"{title}, simulated mismatch σ={NOISE}")
        ax.set_xlabel("global step")
        ax.set_ylabel("rollout reward (mean over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="full")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tables", action="store_true", help="only re-render summary.md and summary.zh.md from summary.json")
    args = p.parse_args()
    if args.tables:
        summary = json.loads((args.out / "summary.json").read_text())
        write_tables(summary, summary["profile"], args.out)
        return
    profile = PROFILES[args.profile]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mismatch = _mismatch_rows(profile)
    runs = rl_runs(profile)
    ctx = mp.get_context("spawn")
    results = []
    with ctx.Pool(args.workers) as pool:
        for i, res in enumerate(pool.imap_unordered(run_config, runs), 1):
            results.append(res)
            print(f"[{i}/{len(runs)}] {res['name']}: reward {run_summary(res['history'])['final_reward']:.3f} ({res['seconds']:.0f} s)", flush=True)
    results.sort(key=lambda r: r["name"])
    summary = summarize(results, mismatch)
    (args.out / "runs.json").write_text(json.dumps({"profile": args.profile, "mismatch": mismatch, "runs": results}))
    (args.out / "summary.json").write_text(json.dumps({"profile": args.profile, "seconds": time.perf_counter() - t0, **summary}, indent=1))
    write_tables(summary, args.profile, args.out)
    plot(results, args.out)
    print(to_markdown(summary, args.profile))
    print(f"total {time.perf_counter() - t0:.0f} s -> {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
