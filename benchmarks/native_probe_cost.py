"""Cost of the trainer's native probe (``TrainConfig.native_probe``): one extra no-grad forward per mini-batch.

Trains the same seeded run with the probe off and on (sort-5, B×G responses, N mini-batches, R2 and
R3) and reports the median wall time of a global step and of its trainer part (step minus rollout)
over ``--steps`` steps after one warm-up step (the two runs stepped alternately), one OpenMP thread. The probe changes no training
number: the script checks that both runs log the same rewards.

    python benchmarks/native_probe_cost.py [--steps 4 --num-prompts 32 --group-size 8 --num-minibatches 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summary(steps: list[dict]) -> dict:
    return {
        "seconds_step": statistics.median(s["seconds_step"] for s in steps),
        "seconds_trainer": statistics.median(s["seconds_step"] - s["seconds_rollout"] for s in steps),
        "reward": [s["reward"] for s in steps],
    }


def timed(replay: str, args) -> tuple[dict, dict]:
    """The same seeded run with the probe off and on, stepped alternately (load drift hits both alike)."""
    from reference_impl.trainer import TrainConfig, Trainer

    trainers = [
        Trainer(TrainConfig(
            num_prompts=args.num_prompts, group_size=args.group_size, num_minibatches=args.num_minibatches,
            replay=replay, numerics="bf16", native_probe=probe, seed=0, progress=False,
        ))
        for probe in (False, True)
    ]
    for t in trainers:
        t.train_step()  # warm-up
    steps: list[list[dict]] = [[], []]
    for _ in range(args.steps):
        for j, t in enumerate(trainers):
            steps[j].append(t.train_step())
    return summary(steps[0]), summary(steps[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--num-minibatches", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "native_probe_cost.json")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": {}}
    for replay in ("r2", "r3"):
        off, on = timed(replay, args)
        if off["reward"] != on["reward"]:
            raise SystemExit(f"{replay}: the probe changed the training ({off['reward']} vs {on['reward']})")
        result["runs"][replay] = {
            "off": off, "on": on,
            "step_on_over_off": on["seconds_step"] / off["seconds_step"],
            "trainer_on_over_off": on["seconds_trainer"] / off["seconds_trainer"],
        }
        r = result["runs"][replay]
        print(f"{replay}: step {off['seconds_step']:.2f} s -> {on['seconds_step']:.2f} s ({r['step_on_over_off']:.3f}x), "
              f"trainer part {off['seconds_trainer']:.2f} s -> {on['seconds_trainer']:.2f} s ({r['trainer_on_over_off']:.3f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
