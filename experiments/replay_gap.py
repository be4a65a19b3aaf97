"""What replay hides, per mini-batch: the replay gap of R2 and R3 and the stale flip (issue 19).

Runs the trainer with ``native_probe=True`` (one extra no-grad native forward of π_θ per
mini-batch) under R2 and R3 on the same seed, and averages each probe metric over the steps,
mini-batch by mini-batch:

* stale flip: native π_θ routes vs native π_θold routes (share of (token, layer) top-k sets that differ);
* replay gap: the routes the update replays vs π_θ's native routes;
* both also in mean |Δ log π| per response token.

    python experiments/replay_gap.py            # ~2 min on one core; writes the JSON and the figure

Outputs: ``experiments/results/replay_gap.json`` and ``assets/figures/replay_gap.png`` in
``docs_en`` and ``docs_zh`` (the same image).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("stale_route_flip", "stale_logp_gap", "replay_route_gap", "replay_logp_gap")


def run(replay: str, args) -> dict:
    from reference_impl.trainer import TrainConfig, Trainer

    cfg = TrainConfig(
        task="sort", num_prompts=args.num_prompts, group_size=args.group_size, num_minibatches=args.num_minibatches,
        steps=args.steps, replay=replay, numerics=args.numerics, lr=args.lr, seed=args.seed, native_probe=True,
        progress=False,
    )
    history = Trainer(cfg).train()
    per_mb = {key: [statistics.fmean(h["by_minibatch"][key][j] for h in history) for j in range(args.num_minibatches)]
              for key in PROBE}
    return {"by_minibatch": per_mb, "reward": [h["reward"] for h in history],
            "native_routing_disagreement": [h["native_routing_disagreement"] for h in history]}


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    n = result["settings"]["num_minibatches"]
    x = list(range(1, n + 1))
    for ax, (gap, stale, title) in zip(axes, (("replay_route_gap", "stale_route_flip", "routes: share of (token, layer) sets that differ"),
                                              ("replay_logp_gap", "stale_logp_gap", "log-probs: mean |Δ log π| per response token"))):
        for replay, color in (("r2", "tab:blue"), ("r3", "tab:orange")):
            mb = result["runs"][replay]["by_minibatch"]
            ax.plot(x, mb[gap], "o-", color=color, label=f"replay gap, {replay.upper()}")
            ax.plot(x, mb[stale], "s--", color=color, alpha=0.6, label=f"stale flip, {replay.upper()}")
        ax.set_xlabel("mini-batch")
        ax.set_xticks(x)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--num-minibatches", type=int, default=8)
    p.add_argument("--numerics", default="fp8_e4m3")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "replay_gap.json")
    p.add_argument("--figure", type=Path, default=ROOT / "docs_en" / "assets" / "figures" / "replay_gap.png")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "figure")},
              "runs": {replay: run(replay, args) for replay in ("r2", "r3")}}
    result["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.figure)
    zh = ROOT / "docs_zh" / "assets" / "figures" / args.figure.name
    if args.figure.resolve().is_relative_to((ROOT / "docs_en").resolve()):
        shutil.copyfile(args.figure, zh)
    for replay, r in result["runs"].items():
        mb = r["by_minibatch"]
        print(f"{replay}: replay gap {mb['replay_route_gap'][0]:.4f} -> {mb['replay_route_gap'][-1]:.4f}, "
              f"stale flip {mb['stale_route_flip'][0]:.4f} -> {mb['stale_route_flip'][-1]:.4f}")
    print(f"{result['seconds']:.0f} s -> {args.out}, {args.figure}")


if __name__ == "__main__":
    main()
