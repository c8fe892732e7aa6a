"""Memory that scales with one layer (statistics layer by layer, pruning in place) and models spread over devices
(accelerate device maps, offloaded layers): the same results."""

import hashlib
import json

import pytest
import torch
import yaml
from conftest import tiny_files, tiny_recipe  # noqa: F401 (fixture)
from safetensors.torch import load_file

from prune.prepare import prepare
from prune.recipe import RecipeError, load_recipe
from prune.run import execute


def _run(tmp_path, files, name: str, **evaluation):
    data = tiny_recipe(files, tmp_path / name, tmp_path / f"cache-{name}")
    for key, value in evaluation.items():
        data["evaluation"][key] = data["evaluation"][key] | value
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return execute(prepare(load_recipe(tmp_path / f"{name}.yaml")))


def test_a_run_that_prunes_in_place_gives_the_same_model_and_numbers(tmp_path, tiny_files):  # noqa: F811
    kept = _run(tmp_path, tiny_files, "kept")  # the speed stage needs both models: pruned beside the dense one
    in_place = _run(tmp_path, tiny_files, "in_place", speed={"enabled": False})
    assert "perplexity (dense)" in in_place.stage_seconds and "perplexity (dense)" not in kept.stage_seconds
    weights = [
        hashlib.sha256((tmp_path / n / "model" / "model.safetensors").read_bytes()).digest()
        for n in ("kept", "in_place")
    ]
    assert weights[0] == weights[1]
    assert in_place.layers == kept.layers
    assert in_place.perplexity and kept.perplexity
    assert (in_place.perplexity.dense, in_place.perplexity.pruned) == (kept.perplexity.dense, kept.perplexity.pruned)
    assert in_place.perplexity.dense_reused_from is None  # computed in this run, before the pruning
    saved = json.loads((tmp_path / "in_place" / "report.json").read_text())
    assert saved["speed"] is None


def test_a_model_split_by_a_device_map_with_offloaded_layers_gives_the_same_run(tmp_path, tiny_files):  # noqa: F811
    split = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",  # weights on disk, loaded by accelerate's hooks for each forward call
        "model.layers.2": "disk",
        "model.norm": "disk",
        "lm_head": "cpu",
    }
    reports = {}
    for name, device_map in (("whole", None), ("split", split)):
        data = tiny_recipe(tiny_files, tmp_path / name, tmp_path / f"cache-{name}")
        data["evaluation"]["speed"] = {"enabled": False}
        data["export"] = {"formats": ["hf", "gguf"], "gguf_type": "f32"}
        data["model"] |= {"device": "auto", "device_map": device_map}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
        reports[name] = execute(prepare(load_recipe(tmp_path / f"{name}.yaml")))
    assert list((tmp_path / "cache-split" / "offload").iterdir())  # the disk offload was used
    whole, split_report = reports["whole"], reports["split"]
    assert split_report.layers == whole.layers
    assert split_report.perplexity and whole.perplexity
    assert split_report.perplexity.pruned == pytest.approx(whole.perplexity.pruned, rel=1e-6)
    assert split_report.perplexity.dense == pytest.approx(whole.perplexity.dense, rel=1e-6)
    statistics = [load_file(str(tmp_path / n / "activation_stats.safetensors")) for n in ("whole", "split")]
    assert statistics[0].keys() == statistics[1].keys()
    for key, tensor in statistics[0].items():
        torch.testing.assert_close(statistics[1][key], tensor, rtol=1e-5, atol=1e-7, msg=key)
    weights = [load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("whole", "split")]
    assert weights[0].keys() == weights[1].keys()
    for key, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    assert (tmp_path / "split" / "model-f32.gguf").stat().st_size == (
        tmp_path / "whole" / "model-f32.gguf"
    ).stat().st_size


def test_sequential_reconstruction_of_a_model_split_by_a_device_map_gives_the_same_weights(tmp_path, tiny_files):  # noqa: F811
    split = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu"}
    split |= {"model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "disk", "lm_head": "cpu"}
    for name, device_map in (("whole", None), ("split", split)):
        data = tiny_recipe(tiny_files, tmp_path / name, tmp_path / f"cache-{name}")
        data["evaluation"] |= {"speed": {"enabled": False}, "zeroshot": {"enabled": False}}
        data["pruning"]["reconstruct"] = "lstsq-sequential"
        data["model"] |= {"device": "auto", "device_map": device_map}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
        report = execute(prepare(load_recipe(tmp_path / f"{name}.yaml")))
        assert "pruning + reconstruction (lstsq-sequential)" in report.stage_seconds
    weights = [load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("whole", "split")]
    assert weights[0].keys() == weights[1].keys()
    assert any(key.endswith("o_proj.bias") for key in weights[0])
    for key, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][key], tensor, rtol=1e-5, atol=1e-5, msg=key)


def test_device_map_is_refused_with_the_stages_that_need_one_device(tmp_path):
    with pytest.raises(RecipeError, match="evaluation.speed.enabled: must be false with model.device_map"):
        load_recipe(None, ["model.device_map=auto"])
    with pytest.raises(RecipeError, match="recovery.method: must be none with model.device_map"):
        load_recipe(None, ["model.device_map=auto", "evaluation.speed.enabled=false", "recovery.method=lora"])
    with pytest.raises(RecipeError, match="model.max_memory: needs model.device_map"):
        load_recipe(None, ["model.max_memory={cpu: 1GiB}"])
    with pytest.raises(RecipeError, match="model.device_map: must be null, one of auto"):
        load_recipe(None, ["model.device_map=everywhere", "evaluation.speed.enabled=false"])
    recipe = load_recipe(
        None,
        ["model.device_map=balanced", "model.max_memory={cuda:0: 20GiB, cpu: 60GiB}", "evaluation.speed.enabled=false"],
    )
    assert recipe.model.max_memory == {"cuda:0": "20GiB", "cpu": "60GiB"}
