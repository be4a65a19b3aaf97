"""The synchronous R2/R3 trainer: Table 1 of arXiv 2512.01374 and the loop's plumbing."""

import json

import pytest
import torch

from reference_impl import replay_routing
from reference_impl.__main__ import main as cli
from reference_impl.logprobs import next_token_logprobs
from reference_impl.trainer import TrainConfig, Trainer

FAST = dict(num_prompts=4, group_size=4, steps=2, cold_start_steps=5, progress=False)


def make(**kw):
    return Trainer(TrainConfig(**{**FAST, **kw}))


def test_r2_on_the_first_minibatch_changes_nothing():
    trainer = make(replay="r2", numerics="bf16")
    batch, _ = trainer.rollout()
    old_logp, old_trace, _ = trainer.recompute_old(batch)
    with torch.no_grad():
        native = next_token_logprobs(trainer.model(batch.tokens).logits, batch.tokens)
        with replay_routing(trainer.model, old_trace, seq_lengths=batch.seq_lengths.tolist()):
            replayed = next_token_logprobs(trainer.model(batch.tokens).logits, batch.tokens)
    # θ = θ_old: replaying the trainer's own old routes is the native policy, bit for bit
    assert torch.equal(native, replayed)
    assert torch.equal(native, old_logp)


def test_r3_replays_the_rollout_routes_on_every_minibatch():
    trainer = make(replay="r3", numerics="fp8_e5m2", num_minibatches=4, router_noise_std=0.5)
    batch, rewards = trainer.rollout()
    old_logp, old_trace, _ = trainer.recompute_old(batch)
    assert batch.rollout_trace.agreement(old_trace).router_disagreement == 0.0  # recompute replayed e^mu
    advantages = rewards - rewards.mean()
    stats = trainer.update(batch, old_logp, old_trace, advantages)
    assert len(stats) == 4
    assert all(s["routing_vs_rollout"] == 0.0 for s in stats)


def test_native_routing_drifts_from_the_engine_under_mismatch():
    trainer = make(replay="none", router_noise_std=1.0, num_minibatches=2)
    record = trainer.train_step()
    assert record["routing_disagreement"] > 0.1
    assert record["update/routing_vs_rollout"] > 0.1


def test_r2_replays_the_recorded_old_routes_in_later_minibatches():
    trainer = make(replay="r2", num_minibatches=4, lr=3e-2)  # big steps: native routes would drift
    batch, rewards = trainer.rollout()
    old_logp, old_trace, _ = trainer.recompute_old(batch)
    stats = trainer.update(batch, old_logp, old_trace, rewards - rewards.mean())
    assert all(s["routing_flip_rate"] == 0.0 for s in stats)


def test_minibatch_count_must_divide_the_batch():
    with pytest.raises(ValueError, match="num_minibatches=3 must divide the 16 responses"):
        TrainConfig(**{**FAST, "num_minibatches": 3})


def test_unknown_replay_mode_and_objective_are_refused():
    with pytest.raises(ValueError, match="replay must be one of"):
        TrainConfig(replay="r4")
    with pytest.raises(ValueError, match="unknown objective 'ppo2'"):
        TrainConfig(objective="ppo2")
    with pytest.raises(ValueError, match="'rspo' needs per-token router shifts"):
        TrainConfig(objective="rspo")


def test_train_records_metrics_for_every_step():
    trainer = make(replay="r3", numerics="bf16")
    history = trainer.train()
    assert [h["step"] for h in history] == [0, 1]
    for key in ("reward", "kl_k1", "kl_k3", "extreme_token_fraction", "routing_disagreement", "entropy", "update/clip_fraction"):
        assert all(key in h for h in history), key
    assert history[0]["routing_disagreement"] == 0.0


def test_cli_train_writes_metrics_plot_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"steps": 2, "num_prompts": 4, "group_size": 4, "cold_start_steps": 5}))
    assert cli(["train", "--config", str(config), "--replay", "r2", "--num-minibatches", "2", "--out-dir", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics) == 2
    assert json.loads((out / "config.json").read_text())["replay"] == "r2"
    assert (out / "metrics.png").stat().st_size > 1000
    assert (out / "checkpoints" / "step_00002" / "model.safetensors").exists()


@pytest.mark.slow
def test_minirl_raises_the_reward_on_the_sort_task_in_a_short_cpu_run():
    trainer = Trainer(TrainConfig(steps=60, num_prompts=32, group_size=8, lr=3e-4, seed=0, progress=False))
    history = trainer.train()
    first = sum(h["reward"] for h in history[:10]) / 10
    last = sum(h["reward"] for h in history[-10:]) / 10
    assert last > first + 0.1, (first, last)
