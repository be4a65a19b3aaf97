"""Issue 14: durable runs (out-dir refusal, per-step metrics, atomic checkpoints, exact resume),
TrainConfig validation and one-line CLI errors. Fast tier; the kill-and-resume tests with real
processes are in tests/test_resume.py."""

import json
import math

import pytest
import torch

from reference_impl import run_dir as RD
from reference_impl.__main__ import main as cli
from reference_impl.checkpoint import load_hf_checkpoint
from reference_impl.errors import ConfigError
from reference_impl.trainer import TrainConfig, Trainer

TINY = dict(steps=2, num_prompts=2, group_size=2, cold_start_steps=1, progress=False)
TINY_FLAGS = ["--steps", "2", "--num-prompts", "2", "--group-size", "2", "--cold-start-steps", "1", "--no-progress"]


def without_times(history):
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in history]


# ---------------------------------------------------------------- TrainConfig
@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"grad_clip": -1.0},
        {"grad_clip": float("nan")},
        {"grad_clip": float("inf")},
        {"numerics": "fp16"},
        {"objective": "ppo2"},
        {"task": "add"},
        {"temperature": 0.0},
        {"num_prompts": 0},
        {"group_size": 0},
        {"num_minibatches": 0},
        {"checkpoint_every": -1},
        {"lr": float("nan")},
        {"objective_kwargs": {"tis_capp": 2.0}},
    ],
)
def test_train_config_refuses_bad_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad)) if "objective_kwargs" not in bad else "tis_capp"):
        TrainConfig(**bad)


def test_train_config_accepts_the_objectives_own_arguments():
    TrainConfig(objective="minirl", objective_kwargs={"tis_cap": 2.0, "eps_low": 0.1})


# ---------------------------------------------------------------- run directory
def test_metrics_are_appended_per_step_and_checkpoints_hold_every_rng(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(TrainConfig(**TINY, checkpoint_every=1, out_dir=str(out)))
    trainer.train()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00001", "step_00002"]  # the end-of-run save did not rewrite step 2
    from safetensors.torch import load_file

    rng = load_file(out / "checkpoints" / "step_00002" / "trainer_state" / "rng.safetensors")
    assert {"torch", "python", "numpy", "generator.prompt_generator", "generator.shuffle_generator",
            "generator.engine.generator", "generator.engine.noise_generator"} <= set(rng)
    load_hf_checkpoint(out / "checkpoints" / "step_00001")  # each checkpoint is a loadable HF checkpoint
    weights = out / "checkpoints" / "step_00002" / "model.safetensors"
    before = weights.stat()
    trainer.save()  # the end-of-run save again: a complete checkpoint is never rewritten in place
    after = weights.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_an_out_dir_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", *TINY_FLAGS, "--out-dir", str(out)]) == 0
    capsys.readouterr()
    assert cli(["train", *TINY_FLAGS, "--out-dir", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(TrainConfig(**TINY, out_dir=str(out))).train()
    (out / "checkpoints" / "step_00077").mkdir()  # a stale checkpoint of the old run
    assert cli(["train", *TINY_FLAGS, "--steps", "1", "--out-dir", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00001"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_an_unusable_out_dir_is_found_before_the_first_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    trainer = Trainer(TrainConfig(**TINY, out_dir=str(blocker / "run")))
    with pytest.raises(ConfigError, match="not writable"):
        trainer.train()
    assert trainer.step == 0 and trainer.history == []
    with pytest.raises(ConfigError, match="not a directory"):
        Trainer(TrainConfig(**TINY, out_dir=str(blocker))).train()


def test_resume_in_process_gives_exactly_the_uninterrupted_run(tmp_path):
    kw = dict(TINY, steps=3, num_minibatches=2, replay="r3", numerics="bf16", router_noise_std=0.1, checkpoint_every=1)
    full = Trainer(TrainConfig(**kw, out_dir=str(tmp_path / "full")))
    full.train()
    part = Trainer(TrainConfig(**{**kw, "steps": 2}, out_dir=str(tmp_path / "part")))
    part.train()
    resumed = Trainer.resume(tmp_path / "part", steps=3)
    assert resumed.step == 2
    resumed.train()
    assert without_times(resumed.history) == without_times(full.history)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "part" / "metrics.json").read_text())[-1]["step"] == 2


def test_resume_drops_metrics_of_steps_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    Trainer(TrainConfig(**TINY, checkpoint_every=1, out_dir=str(out))).train()
    RD.append_metrics(out, {"step": 2, "reward": math.pi})  # a step the killed attempt logged past its checkpoint
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "rew')  # torn last line
    resumed = Trainer.resume(out)
    assert [r["step"] for r in resumed.history] == [0, 1]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ConfigError, match="before the checkpoint's step 2"):
        Trainer.resume(out, steps=1)


def test_resume_without_a_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no run"):
        Trainer.resume(tmp_path)
    RD.prepare_run_dir(tmp_path / "r", {"steps": 1})
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        Trainer.resume(tmp_path / "r")


# ---------------------------------------------------------------- command line
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--task", "add"], "unknown task 'add'"),
        (["train", "--config", "/nonexistent/cfg.json"], "cannot read config file"),
        (["train", "--steps", "0"], "steps must be an int >= 1"),
        (["train", "--grad-clip", "nan"], "grad_clip must be a finite number > 0"),
        (["train", "--resume", "/nonexistent/run"], "holds no run"),
        (["train", "--resume", "/nonexistent/run", "--lr", "1"], "only --steps and --progress"),
        (["rollout", "--checkpoint", "/nonexistent/ckpt", "--out", "x.safetensors"], "No such file"),
        (["compare", "--rollout", "/nonexistent/r.safetensors", "--checkpoint", "."], "does not exist"),
    ],
)
def test_a_user_mistake_prints_one_line_and_exits_2(argv, needle, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_json_config_and_bad_flag_types_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text("{steps: 3")
    assert cli(["train", "--config", str(cfg)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli(["train", "--steps", "three"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "invalid int value" in err


def test_a_bug_still_shows_its_traceback(monkeypatch):
    def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Trainer, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli(["train", *TINY_FLAGS])
