"""Saved checkpoints reload without the toolkit and give the same logits."""

import json

import pytest
import torch
from conftest import FAMILY_TYPES, random_tokens, reload_in_fresh_process, tiny_model

from prune.checkpoint import save_checkpoint
from prune.pruner import LayerPlan, prune_model


class NoTokenizer:
    def save_pretrained(self, directory):
        pass


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_per_layer_checkpoint_reloads_in_fresh_process(tmp_path, family):
    model = tiny_model(family)
    pruned = prune_model(
        model,
        [
            LayerPlan((0, 1, 2), (0,), tuple(range(0, 64, 2))),
            LayerPlan((0, 2, 3, 5), (0, 1), tuple(range(48))),
            LayerPlan((0, 1, 2, 3, 4, 5), (0, 1), tuple(range(16))),
        ],
    )
    save_checkpoint(pruned, NoTokenizer(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["layer_num_attention_heads"] == [3, 4, 6]
    assert config["layer_num_key_value_heads"] == [1, 2, 2]
    assert config["layer_intermediate_size"] == [32, 48, 16]
    assert config["model_type"] == family
    assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_pruned.{type(pruned).__name__}"}
    x = random_tokens(2, 9)
    torch.save(x, tmp_path / "x.pt")
    reloaded = reload_in_fresh_process(tmp_path, remote=True)
    assert reloaded["class"] == type(pruned).__name__ and reloaded["class"].startswith("Pruned")
    torch.testing.assert_close(reloaded["logits"], pruned(x).logits, atol=1e-5, rtol=0)
    assert torch.equal(reloaded["generated"], pruned.generate(x, max_new_tokens=8, do_sample=False))


def test_uniform_checkpoint_needs_no_remote_code(tmp_path):
    model = tiny_model("qwen2")
    plan = LayerPlan((0, 2, 3, 5), (0, 1), tuple(range(32)))
    pruned = prune_model(model, [plan] * 3)
    save_checkpoint(pruned, NoTokenizer(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "auto_map" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 2, 32)
    assert not (tmp_path / "modeling_pruned.py").exists()
    x = random_tokens(1, 6)
    torch.save(x, tmp_path / "x.pt")
    reloaded = reload_in_fresh_process(tmp_path, remote=False)
    assert reloaded["class"] == "Qwen2ForCausalLM"
    torch.testing.assert_close(reloaded["logits"], pruned(x).logits, atol=1e-5, rtol=0)


def test_output_biases_survive_the_round_trip(tmp_path):
    model = tiny_model("mistral")
    plan = LayerPlan((0, 1, 2, 3, 4, 5), (0, 1), tuple(range(64)))
    pruned = prune_model(model, [plan] * 3, output_bias=True)
    with torch.no_grad():
        for layer in pruned.model.layers:
            layer.self_attn.o_proj.bias.normal_()
            layer.mlp.down_proj.bias.normal_()
    save_checkpoint(pruned, NoTokenizer(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["output_projection_bias"] is True and config["layer_intermediate_size"] == [64] * 3
    x = random_tokens(1, 6)
    torch.save(x, tmp_path / "x.pt")
    reloaded = reload_in_fresh_process(tmp_path, remote=True)
    torch.testing.assert_close(reloaded["logits"], pruned(x).logits, atol=1e-5, rtol=0)
    assert (reloaded["logits"] - model(x).logits).abs().max() > 1e-2  # the biases mattered


def test_checkpoint_with_removed_layers_reloads_as_the_stock_class(tmp_path):
    model = tiny_model("llama")
    full = LayerPlan(tuple(range(6)), (0, 1), tuple(range(64)))
    pruned = prune_model(model, [full, None, full])
    save_checkpoint(pruned, NoTokenizer(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "auto_map" not in config
    x = random_tokens(1, 6)
    torch.save(x, tmp_path / "x.pt")
    reloaded = reload_in_fresh_process(tmp_path, remote=False)
    assert reloaded["class"] == "LlamaForCausalLM"
    torch.testing.assert_close(reloaded["logits"], pruned(x).logits, atol=1e-5, rtol=0)
