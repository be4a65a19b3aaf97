"""Configuration checks of the vLLM rollout engine and the trainer's engine/backend choice (no engine starts)."""

import pytest

from reference_impl.errors import ConfigError
from reference_impl.integrations.vllm_rollout import VllmRolloutEngine, check_no_chunking
from reference_impl.trainer import TrainConfig


def test_a_config_that_could_chunk_a_seeded_prompt_is_refused():
    check_no_chunking(100, max_model_len=256, max_num_batched_tokens=256, enable_chunked_prefill=False)
    with pytest.raises(ConfigError, match="enable_chunked_prefill=False"):
        check_no_chunking(100, max_model_len=256, max_num_batched_tokens=4096, enable_chunked_prefill=True)
    with pytest.raises(ConfigError, match="would be chunked"):
        check_no_chunking(300, max_model_len=256, max_num_batched_tokens=200, enable_chunked_prefill=False)
    with pytest.raises(ConfigError, match="no room"):
        check_no_chunking(256, max_model_len=256, max_num_batched_tokens=256, enable_chunked_prefill=False)
    with pytest.raises(ConfigError, match="would be chunked"):
        VllmRolloutEngine(max_model_len=256, max_num_batched_tokens=128)
    with pytest.raises(ConfigError, match="enable_chunked_prefill"):
        VllmRolloutEngine(enable_chunked_prefill=True)


def test_vllm_engine_takes_real_numerics_only():
    with pytest.raises(ConfigError, match="real vLLM dtypes"):
        VllmRolloutEngine(numerics="fp8_e4m3")
    with pytest.raises(ValueError, match="simulated dial"):
        TrainConfig(rollout_engine="vllm", router_noise_std=0.1)
    with pytest.raises(ValueError, match="real numerics"):
        TrainConfig(rollout_engine="vllm", numerics="fp8_e5m2")
    with pytest.raises(ValueError, match="rollout_engine"):
        TrainConfig(rollout_engine="sglang")
    with pytest.raises(ValueError, match="trainer_backend"):
        TrainConfig(trainer_backend="fsdp")


def test_generate_before_the_first_sync_is_refused():
    import torch

    with pytest.raises(RuntimeError, match="sync_weights"):
        VllmRolloutEngine().generate(torch.ones(2, 3, dtype=torch.long), group_size=2, max_new_tokens=2, eos_id=3)


def test_cli_has_the_engine_and_trainer_flags():
    import argparse

    from reference_impl import __main__ as cli

    parser = argparse.ArgumentParser()
    cli._add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--rollout-engine", "vllm", "--trainer", "megatron", "--no-vllm-prefix-caching"])
    assert (args.rollout_engine, args.trainer_backend, args.vllm_prefix_caching) == ("vllm", "megatron", False)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--trainer", "fsdp"])
