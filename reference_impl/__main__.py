"""Command line: ``python -m reference_impl <command> ...``.

``train``: run an RL experiment from flags or a JSON config file and write metrics and plots::

    python -m reference_impl train --task sort --replay r3 --numerics bf16 --steps 50 --out-dir runs/r3
    python -m reference_impl train --config my_experiment.json --seed 1

``rollout``: sample with the reference engine from a checkpoint and save a RolloutBatch file::

    python -m reference_impl rollout --checkpoint ckpt/ --numerics bf16 --out rollout.safetensors

``compare``: recompute a RolloutBatch file (from any engine) with another engine and report the
routing disagreement (three levels, per layer), KL(μ_old‖π_old), F(2) and the worst tokens,
natively and with the engine's routes replayed::

    python -m reference_impl compare --rollout rollout.safetensors --checkpoint ckpt/ --engine transformers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

__all__ = ["main"]


def _add_train_parser(sub) -> None:
    from .trainer import TrainConfig

    p = sub.add_parser("train", help="run a synchronous RL experiment (MiniRL by default)")
    p.add_argument("--config", type=str, default=None, help="JSON file with TrainConfig fields; flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if f.name == "objective_kwargs":
            p.add_argument(flag, type=json.loads, default=None, help='JSON object, e.g. \'{"tis_cap": 2}\'')
        elif kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            base = {int: int, float: float}.get(kind, str)
            p.add_argument(flag, type=base, default=None, help=f"default: {f.default!r}")


def _run_train(args) -> int:
    from .trainer import TrainConfig, Trainer

    values = {}
    if args.config:
        with open(args.config) as fh:
            values.update(json.load(fh))
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise SystemExit(f"train: unknown config keys {sorted(unknown)}")
    config = TrainConfig(**values)
    trainer = Trainer(config)
    history = trainer.train()
    last = history[-1]
    print(json.dumps({k: last[k] for k in ("step", "reward", "kl_k3", "extreme_token_fraction", "routing_disagreement")}))
    if config.out_dir:
        print(f"metrics, plot and checkpoint written to {config.out_dir}")
    return 0


def _add_rollout_parser(sub) -> None:
    p = sub.add_parser("rollout", help="sample with the reference engine and save a RolloutBatch file")
    p.add_argument("--checkpoint", required=True, help="Qwen3-MoE checkpoint directory")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--task", default="sort")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--numerics", default="fp32")
    p.add_argument("--router-noise-std", type=float, default=0.0, help="SIMULATED mismatch")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def _run_rollout(args) -> int:
    import torch

    from .checkpoint import load_hf_checkpoint
    from .rollout import RolloutEngine
    from .tasks import EOS, PAD, make_task

    task = make_task(args.task)
    model = load_hf_checkpoint(args.checkpoint)
    engine = RolloutEngine(numerics=args.numerics, router_noise_std=args.router_noise_std, temperature=args.temperature, seed=args.seed)
    engine.sync_weights(model)
    prompts = task.sample_prompts(args.num_prompts, torch.Generator().manual_seed(args.seed))
    batch = engine.generate(prompts, group_size=args.group_size, max_new_tokens=task.max_new_tokens, eos_id=EOS, pad_id=PAD)
    batch.save(args.out)
    print(f"{batch.num_sequences} sequences, {int(batch.mask.sum())} response tokens -> {args.out}")
    return 0


def _add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="validate an engine's routes and log-probs against another forward")
    p.add_argument("--rollout", required=True, help="RolloutBatch .safetensors file (RolloutBatch.save)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory of the same weights")
    p.add_argument("--engine", default="reference", choices=["reference", "transformers", "megatron"])
    p.add_argument("--no-replay", action="store_true", help="skip the recompute with the engine's routes replayed")
    p.add_argument("--top", type=int, default=10, help="how many worst tokens to list")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--json", default=None, help="also write the report as JSON here")


def _run_compare(args) -> int:
    from .compare import compare_batch, load_forward
    from .batch import RolloutBatch

    batch = RolloutBatch.load(args.rollout)
    report = compare_batch(batch, load_forward(args.checkpoint, args.engine), replay=not args.no_replay, top=args.top, temperature=args.temperature)
    print(report.summary())
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(report.to_json())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_impl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_rollout_parser(sub)
    _add_compare_parser(sub)
    args = parser.parse_args(argv)
    return {"train": _run_train, "rollout": _run_rollout, "compare": _run_compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
