"""``--trainer megatron`` against the reference trainer on the same batches: ``python megatron_trainer_run.py OUT.json``.

Two trainers start from the same weights (same seed and cold start); each step the reference
trainer samples one batch and both recompute π_θold and update on it (the same mini-batch order:
same shuffle seed). Written per step (two steps: over more the two drift apart,
near-sign steps on near-zero gradients let fp32 rounding differences grow): max |Δ old_logp| over response tokens, the per-mini-batch
losses of both, and after the last step the reference model's log-probs against the exported
Megatron weights' (the weight export that feeds the rollout engine).
"""

import json
import sys


def run(replay: str, steps: int) -> dict:
    import torch

    from reference_impl.advantages import group_advantages
    from reference_impl.trainer import TrainConfig, Trainer

    common = dict(num_prompts=8, group_size=4, num_minibatches=2, replay=replay, numerics="bf16", lr=1e-3, progress=False, seed=0)
    ref = Trainer(TrainConfig(**common))
    meg = Trainer(TrainConfig(**common, trainer_backend="megatron"))
    assert type(meg).__name__ == "MegatronTrainer"
    out = {"old_logp_diff": [], "loss_ref": [], "loss_meg": [], "old_routes_disagreement": []}
    for _ in range(steps):
        batch, rewards = ref.rollout()
        adv = group_advantages(rewards, batch.group_ids)
        mask = batch.mask > 0
        results = []
        for trainer in (ref, meg):
            old_logp, old_trace, _ = trainer.recompute_old(batch)
            stats = trainer.update(batch, old_logp, old_trace, adv)
            results.append((old_logp, old_trace, [s["loss"] for s in stats]))
        out["old_logp_diff"].append(float((results[0][0] - results[1][0])[mask].abs().max()))
        out["old_routes_disagreement"].append(results[0][1].agreement(results[1][1]).router_disagreement)
        out["loss_ref"].append(results[0][2])
        out["loss_meg"].append(results[1][2])
    # the export: the reference model holding the exported weights forwards as Megatron does
    from reference_impl.integrations.megatron import megatron_logprobs
    from reference_impl.logprobs import next_token_logprobs

    meg.export_weights()
    with torch.no_grad():
        ours = next_token_logprobs(meg.model(batch.tokens).logits, batch.tokens)
        theirs = megatron_logprobs(meg.mcore, batch.tokens, batch.seq_lengths.tolist(), mode="native").logprobs
    out["exported_logp_diff"] = float((ours - theirs)[mask].abs().max())
    return out


if __name__ == "__main__":
    import os

    result = {"r3": run("r3", 2), "r2": run("r2", 2)}
    with open(sys.argv[1], "w") as fh:
        json.dump(result, fh, indent=1)
    sys.stdout.flush()
    os._exit(0)
