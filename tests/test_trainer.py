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


def test_objectives_needing_inputs_the_trainer_lacks_are_refused_with_the_declared_reason(monkeypatch):
    from reference_impl import objectives as O

    monkeypatch.setattr(O, "OBJECTIVES", dict(O.OBJECTIVES))
    monkeypatch.setattr(O, "OBJECTIVE_SPECS", dict(O.OBJECTIVE_SPECS))
    O.register_objective("kl_only", requires=("logp", "ref_logp", "mask"))(lambda *a, **k: None)
    monkeypatch.setattr("reference_impl.trainer.OBJECTIVES", O.OBJECTIVES)
    monkeypatch.setattr("reference_impl.trainer.OBJECTIVE_SPECS", O.OBJECTIVE_SPECS)
    with pytest.raises(ValueError, match=r"'kl_only' needs inputs this trainer does not compute \(ref_logp: log π_ref"):
        TrainConfig(objective="kl_only")
    TrainConfig(objective="rspo")  # router_shift is computed by the trainer


def test_rspo_gets_the_router_shift_zero_on_minibatch_one_then_positive():
    trainer = make(objective="rspo", num_minibatches=4, lr=3e-2)
    batch, _ = trainer.rollout()
    old_logp, old_trace, _ = trainer.recompute_old(batch)
    advantages = torch.randn(batch.num_sequences, generator=torch.Generator().manual_seed(0))  # a gradient to follow
    stats = trainer.update(batch, old_logp, old_trace, advantages)
    shifts = [s["router_shift_mean"] for s in stats]
    assert shifts[0] == 0.0  # θ = θ_old: the router has not moved yet
    assert all(s > 0 for s in shifts[1:]), shifts


def test_constructing_a_trainer_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make()
    assert torch.equal(torch.rand(3), expected)


def test_plotting_keeps_the_matplotlib_backend(tmp_path):
    import matplotlib

    from reference_impl.trainer import plot_history

    before = matplotlib.get_backend()
    plot_history({"a": [{"step": 0, "reward": 1.0}, {"step": 1, "reward": 2.0}]}, tmp_path / "p.png", keys=("reward",))
    assert matplotlib.get_backend() == before and (tmp_path / "p.png").stat().st_size > 1000


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


# ------------------------------------------------ the native probe: what replay hides (stale flip, replay gap)
def probed_update(replay, lr=1e-3, num_minibatches=4, **kw):
    trainer = make(replay=replay, num_minibatches=num_minibatches, lr=lr, native_probe=True, **kw)
    batch, _ = trainer.rollout()
    old_logp, old_trace, _ = trainer.recompute_old(batch)
    advantages = torch.randn(batch.num_sequences, generator=torch.Generator().manual_seed(0))  # a gradient to follow
    return trainer.update(batch, old_logp, old_trace, advantages)


def test_r2_minibatch_one_has_no_replay_gap_and_no_stale_flip():
    stats = probed_update("r2", numerics="bf16", router_noise_std=0.5)
    first = stats[0]
    assert first["replay_route_gap"] == 0.0 and first["stale_route_flip"] == 0.0
    assert first["replay_logp_gap"] == 0.0 and first["stale_logp_gap"] == 0.0
    # later mini-batches: R2 replays pi_old's native routes, so its gap is exactly the stale flip
    assert all(s["replay_route_gap"] == s["stale_route_flip"] for s in stats)
    assert stats[-1]["replay_route_gap"] > 0 and all(s["routing_flip_rate"] == 0.0 for s in stats)


def test_r3_replay_gap_on_minibatch_one_is_the_engine_trainer_disagreement():
    trainer = make(replay="r3", numerics="bf16", router_noise_std=0.5, native_probe=True)  # one mini-batch
    record = trainer.train_step()
    gap = record["by_minibatch"]["replay_route_gap"][0]
    assert gap == record["native_routing_disagreement"] > 0.1
    assert record["by_minibatch"]["stale_route_flip"][0] == 0.0
    assert record["by_minibatch"]["replay_logp_gap"][0] > 0


def test_stale_flip_is_zero_on_minibatch_one_and_grows_over_the_step():
    for replay in ("none", "r2", "r3"):
        stats = probed_update(replay)
        flips = [s["stale_route_flip"] for s in stats]
        assert flips[0] == 0.0 and 0 < flips[1] < flips[-1], (replay, flips)
        if replay == "none":  # nothing replayed, nothing hidden
            assert all(s["replay_route_gap"] == 0.0 and s["replay_logp_gap"] == 0.0 for s in stats)


@pytest.mark.parametrize("replay", ["r2", "r3"])
def test_the_probe_costs_one_forward_per_minibatch_and_nothing_when_off(replay):
    counts = {}
    for probe in (False, True):
        trainer = make(replay=replay, num_minibatches=2, native_probe=probe)
        calls = []
        model = trainer.model  # the engine's copy carries the hook too: count only the trainer's forwards
        model.register_forward_pre_hook(lambda module, _: calls.append(1) if module is model else None)
        record = trainer.train_step()
        counts[probe] = len(calls)
        assert ("by_minibatch" in record) == probe and ("update/stale_route_flip" in record) == probe
    base = 1 + 2 + (1 if replay == "r3" else 0)  # recompute, one per mini-batch, R3's native routes
    assert counts == {False: base, True: base + 2}
