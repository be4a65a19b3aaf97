"""Command line: ``python -m reference_impl <command> ...``.

``train``: run an RL experiment from flags or a JSON config file and write metrics and plots::

    python -m reference_impl train --task sort --replay r3 --numerics bf16 --steps 50 --out-dir runs/r3
    python -m reference_impl train --config my_experiment.json --seed 1
    python -m reference_impl train --rollout-engine vllm --numerics bf16 --replay r3 --steps 20
    python -m reference_impl train --resume runs/r3            # continue a killed run exactly

An ``--out-dir`` that already holds a run is refused unless ``--resume`` or ``--overwrite`` is given.

``rollout``: sample with the reference engine from a checkpoint and save a RolloutBatch file::

    python -m reference_impl rollout --checkpoint ckpt/ --numerics bf16 --out rollout.safetensors

A user mistake (unknown task, bad config file, bad value, missing file) prints one line and exits
with status 2; a bug still shows its traceback.

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

from .errors import ConfigError, ReferenceImplError

__all__ = ["main"]


def _add_train_parser(sub) -> None:
    from .trainer import TrainConfig

    p = sub.add_parser("train", help="run a synchronous RL experiment (MiniRL by default)")
    p.add_argument("--config", type=str, default=None, help="JSON file with TrainConfig fields; flags override it")
    p.add_argument("--resume", type=str, default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out-dir (its checkpoints are removed)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if f.name == "trainer_backend":
            p.add_argument("--trainer", "--trainer-backend", dest=f.name, choices=["reference", "megatron"], default=None)
        elif f.name == "rollout_engine":
            p.add_argument(flag, choices=["reference", "vllm"], default=None, help="vllm: a live vLLM engine, weights synced every step")
        elif f.name == "objective_kwargs":
            p.add_argument(flag, type=json.loads, default=None, help='JSON object, e.g. \'{"tis_cap": 2}\'')
        elif kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            base = {int: int, float: float}.get(kind, str)
            p.add_argument(flag, type=base, default=None, help=f"default: {f.default!r}")


def _read_config_file(path: str) -> dict:
    try:
        with open(path) as fh:
            values = json.load(fh)
    except OSError as err:
        raise ConfigError(f"train: cannot read config file {path!r}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"train: config file {path!r} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"train: config file {path!r} must hold a JSON object, got {type(values).__name__}")
    return values


def _run_train(args) -> int:
    from .trainer import TrainConfig, Trainer

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.resume:
        extra = sorted(set(given) - {"steps", "progress"}) + (["config"] if args.config else []) + (["overwrite"] if args.overwrite else [])
        if extra:
            raise ConfigError(f"train --resume: the run's own config is used; only --steps and --progress may be given, not {extra}")
        trainer = Trainer.resume(args.resume, steps=given.get("steps"), progress=given.get("progress"))
    else:
        values = _read_config_file(args.config) if args.config else {}
        values.update(given)
        unknown = set(values) - set(names)
        if unknown:
            raise ConfigError(f"train: unknown config keys {sorted(unknown)}")
        try:
            config = TrainConfig(**values)
        except TypeError as err:
            raise ConfigError(f"train: {err}") from None
        if config.out_dir:
            from .run_dir import prepare_run_dir

            prepare_run_dir(config.out_dir, dataclasses.asdict(config), overwrite=args.overwrite)
        trainer = Trainer(config)
        trainer._run_prepared = bool(config.out_dir)
    config = trainer.config
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, status 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m reference_impl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train_parser(sub)
    _add_rollout_parser(sub)
    _add_compare_parser(sub)
    args = parser.parse_args(argv)
    try:
        return {"train": _run_train, "rollout": _run_rollout, "compare": _run_compare}[args.command](args)
    except (ReferenceImplError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        # a user mistake: one line, status 2; anything else is a bug and keeps its traceback
        print(f"python -m reference_impl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
