"""A training run's directory: durable metrics, atomic checkpoints, exact resume.

Layout of ``RUN_DIR`` (the trainer's ``out_dir``)::

    config.json               the TrainConfig, written before the first step
    metrics.jsonl             one JSON line per finished step, appended and fsync'ed as the run goes
    checkpoints/step_NNNNN/   config.json + model.safetensors (Hugging Face layout: load_hf_checkpoint
                              and transformers read it as it is), and trainer_state/ with
                              optimizer.safetensors + optimizer.json (AdamW state, no pickle),
                              rng.safetensors (every random-generator state) + state.json (step)
    metrics.json, metrics.png written at the end of the run

A checkpoint is written into ``checkpoints/.tmp-step_NNNNN`` and renamed to ``step_NNNNN`` as a
whole only when every file is on disk, so a kill at any moment leaves every earlier checkpoint
loadable and no half-written one that looks complete. :func:`resume` continues from the last
complete checkpoint: the model, optimizer, step and every random generator (torch's global one,
Python's ``random``, NumPy's, and every ``torch.Generator`` the trainer or its engine owns) are
restored, and the metrics lines of steps after that checkpoint are dropped, so the resumed run
produces exactly the weights and metrics of an uninterrupted one (wall-clock times aside).

Test-only hooks (environment variables, read at the moment they apply):
``REFERENCE_IMPL_TEST_KILL_AFTER_STEP=N`` SIGKILLs the process after step ``N`` is logged (and
checkpointed, if due); ``REFERENCE_IMPL_TEST_KILL_IN_SAVE=N`` SIGKILLs it inside the save of the
step-``N`` checkpoint, between two of its files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError, TraceFormatError

__all__ = ["prepare_run_dir", "append_metrics", "read_metrics", "save_checkpoint", "latest_checkpoint", "restore", "resume_point"]

KILL_AFTER_STEP = "REFERENCE_IMPL_TEST_KILL_AFTER_STEP"
KILL_IN_SAVE = "REFERENCE_IMPL_TEST_KILL_IN_SAVE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_STATE = "trainer_state"
_RUN_FILES = ("config.json", "metrics.jsonl", "metrics.json", "metrics.png")


# ------------------------------------------------------------------ test hooks
def _kill_if(var: str, step: int) -> None:
    value = os.environ.get(var)
    if value is not None and int(value) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def kill_point_after_step(step: int) -> None:
    """Test hook: SIGKILL here if ``REFERENCE_IMPL_TEST_KILL_AFTER_STEP`` equals ``step``."""
    _kill_if(KILL_AFTER_STEP, step)


# ------------------------------------------------------------------ durability
def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name (atomic replace)."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------ the run dir
def _holds_run(path: Path) -> bool:
    return any((path / f).exists() for f in _RUN_FILES) or (path / "checkpoints").exists()


def prepare_run_dir(out_dir: str | os.PathLike, config: dict, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check ``out_dir`` before the first step and write ``config.json``.

    Refuses (:class:`ConfigError`) a directory that already holds a run unless ``resume`` (the
    caller continues it) or ``overwrite`` (its run files and checkpoints are removed first), and a
    path that cannot be written (a file, no permission): found before training, not after it.
    """
    path = Path(out_dir)
    if resume and overwrite:
        raise ConfigError("train: --resume and --overwrite exclude each other")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"train: out_dir {os.fspath(path)!r} exists and is not a directory")
    if path.is_dir() and _holds_run(path):
        if overwrite:
            shutil.rmtree(path / "checkpoints", ignore_errors=True)
            for f in _RUN_FILES:
                (path / f).unlink(missing_ok=True)
        elif not resume:
            raise ConfigError(
                f"train: out_dir {os.fspath(path)!r} already holds a run; pass --resume to continue it "
                "or --overwrite to replace it"
            )
    try:
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"train: out_dir {os.fspath(path)!r} is not writable: {err.strerror or err}") from None
    if not resume:
        _write_text(path / "config.json", json.dumps(config, indent=2))
    return path


def append_metrics(run_dir: str | os.PathLike, record: dict) -> None:
    """Append one step's metrics as a JSON line and fsync it (a killed run keeps every finished step)."""
    with open(Path(run_dir) / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every complete line of ``metrics.jsonl`` (a torn last line, from a kill mid-write, is dropped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().split("\n"):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


# ------------------------------------------------------------------ state
def _generators(trainer: Any) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` held by the trainer or by an object it holds (its engine), by name."""
    found: dict[str, torch.Generator] = {}
    for name, value in sorted(vars(trainer).items()):
        if isinstance(value, torch.Generator):
            found[name] = value
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, torch.optim.Optimizer, type)):
            for sub, inner in sorted(vars(value).items()):
                if isinstance(inner, torch.Generator):
                    found[f"{name}.{sub}"] = inner
    return found


def _rng_tensors(trainer: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"torch": torch.get_rng_state()}
    tensors.update({f"generator.{k}": g.get_state() for k, g in _generators(trainer).items()})
    version, internal, gauss = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    meta = {"python": json.dumps([version, gauss]), "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)])}
    return tensors, meta


def _set_rng(trainer: Any, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch"])
    for k, g in _generators(trainer).items():
        if f"generator.{k}" not in tensors:
            raise ConfigError(f"resume: the checkpoint has no state for generator {k!r}")
        g.set_state(tensors[f"generator.{k}"])
    version, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state dict as safetensors tensors + JSON (tensors by ``state.<param>.<key>``)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], extra: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in extra["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": extra["param_groups"]}


def save_checkpoint(run_dir: str | os.PathLike, trainer: Any) -> Path:
    """Write the trainer's state to ``checkpoints/step_NNNNN`` atomically; returns its path.

    A complete checkpoint of the same step is kept as it is (the end-of-run save after a periodic
    one at the last step has nothing new to write).
    """
    from .checkpoint import save_hf_checkpoint

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{trainer.step:05d}"
    if final.is_dir():
        return final
    tmp = root / f".tmp-step_{trainer.step:05d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_checkpoint(trainer.model, tmp)
    _kill_if(KILL_IN_SAVE, trainer.step)  # test hook: between two files of a save
    state = tmp / _STATE
    state.mkdir()
    opt_tensors, opt_extra = _optimizer_files(trainer.optimizer)
    save_file(opt_tensors, state / "optimizer.safetensors")
    (state / "optimizer.json").write_text(json.dumps(opt_extra))
    rng_tensors, rng_meta = _rng_tensors(trainer)
    save_file(rng_tensors, state / "rng.safetensors", metadata=rng_meta)
    (state / "state.json").write_text(json.dumps({"step": trainer.step}))
    for d in (state, tmp):
        for f in d.iterdir():
            if f.is_file():
                _fsync_file(f)
        _fsync_dir(d)
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


def _complete_checkpoints(run_dir: Path) -> Iterator[tuple[int, Path]]:
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / _STATE / "state.json").exists():
                yield int(m.group(1)), p


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or ``None``."""
    found = sorted(_complete_checkpoints(Path(run_dir)))
    return found[-1][1] if found else None


def resume_point(run_dir: str | os.PathLike) -> tuple[dict, Path]:
    """The saved config dict and the last complete checkpoint of ``run_dir`` (:class:`ConfigError` if none)."""
    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"train --resume: {os.fspath(path)!r} holds no run (no config.json)")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise ConfigError(
            f"train --resume: {os.fspath(path)!r} has no complete checkpoint to resume from "
            "(set checkpoint_every to save them during the run)"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"train --resume: {os.fspath(path / 'config.json')!r} is not valid JSON: {err}") from None
    return config, ckpt


def restore(trainer: Any, run_dir: str | os.PathLike, ckpt: Path) -> None:
    """Load ``ckpt`` into ``trainer`` (whose model was built from the checkpoint's weights).

    Restores optimizer, step, every RNG state and the history (metrics lines of the steps before
    the checkpoint; later lines, from the killed attempt, are dropped from ``metrics.jsonl``).
    """
    state = ckpt / _STATE
    try:
        step = json.loads((state / "state.json").read_text())["step"]
        opt_extra = json.loads((state / "optimizer.json").read_text())
        opt_tensors = load_file(state / "optimizer.safetensors")
        from safetensors import safe_open

        with safe_open(os.fspath(state / "rng.safetensors"), framework="pt") as f:
            rng_meta = dict(f.metadata() or {})
            rng_tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - any unreadable file is a damaged checkpoint
        raise TraceFormatError(f"resume: checkpoint {os.fspath(ckpt)!r} is unreadable: {err}") from None
    trainer.optimizer.load_state_dict(_optimizer_state(opt_tensors, opt_extra))
    _set_rng(trainer, rng_tensors, rng_meta)
    trainer.step = step
    history = [r for r in read_metrics(run_dir) if r["step"] < step]
    if len(history) != step:
        raise ConfigError(f"resume: metrics.jsonl holds {len(history)} of the {step} steps before {os.fspath(ckpt)!r}")
    trainer.history = history
    _write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    for stale in (Path(run_dir) / "checkpoints").glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
