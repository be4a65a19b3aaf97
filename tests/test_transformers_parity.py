"""Check against code no one here wrote: Hugging Face ``Qwen3MoeForCausalLM`` on the same weights."""

import json

import pytest
import torch

from conftest import hf_forward_with_routes, tiny_model
from reference_impl import load_hf_checkpoint, save_hf_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("router_std", [0.5, 0.02])  # well-separated and near-tie router logits
def test_same_weights_give_the_same_logits_and_routes_in_transformers(tmp_path, router_std):
    model = tiny_model(seed=1, router_initializer_range=router_std, initializer_range=0.1).eval()
    save_hf_checkpoint(model, tmp_path)
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids)
    hf_logits, hf_routes = hf_forward_with_routes(hf, input_ids)
    assert (hf_logits - ours.logits).abs().max().item() <= 1e-5
    assert torch.equal(hf_routes, ours.routes), "top-k ids differ for some token and layer"


def test_export_writes_a_qwen3_moe_checkpoint_with_per_expert_names(tmp_path):
    model = tiny_model()
    save_hf_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["architectures"] == ["Qwen3MoeForCausalLM"]
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.0.mlp.gate.weight" in names


def test_import_of_a_checkpoint_saved_by_transformers(tmp_path):
    model = tiny_model(seed=2, router_initializer_range=0.5, initializer_range=0.1).eval()
    save_hf_checkpoint(model, tmp_path / "ours")
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "hf")
    back = load_hf_checkpoint(tmp_path / "hf").eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16))
    hf_logits, hf_routes = hf_forward_with_routes(hf, input_ids)
    with torch.no_grad():
        out = back(input_ids)
    assert (out.logits - hf_logits).abs().max().item() <= 1e-5
    assert torch.equal(out.routes, hf_routes)
    for name, p in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name


def test_import_refuses_features_the_tiny_model_lacks(tmp_path):
    model = tiny_model()
    save_hf_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mlp_only_layers"] = [0]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dense \\(mlp_only\\) layers are not supported"):
        load_hf_checkpoint(tmp_path)
