"""Command line: ``python -m reference_impl <command> ...``.

``train``: run an RL experiment from flags or a JSON config file and write metrics and plots::

    python -m reference_impl train --task sort --replay r3 --numerics bf16 --steps 50 --out-dir runs/r3
    python -m reference_impl train --config my_experiment.json --seed 1
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_impl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    args = parser.parse_args(argv)
    return {"train": _run_train}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
