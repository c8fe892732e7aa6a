"""Every family of prune.families through the whole run, its dry run, and the refusals that name the families.

The per-family equivalences (target 0, zeroed units, removed layers, cached generation, fresh-process reload)
are parametrized over every dense family in test_pruner.py and test_checkpoint.py, the statistics against brute
force in test_statistics.py; Llama 3's rope scaling in llama.cpp in test_engine.py; the mixture-of-experts
families in test_experts.py.
"""

import json

import pytest
import yaml
from conftest import FAMILY_TYPES, byte_level_tokenizer, tiny_model, tiny_recipe, word_text
from transformers import AutoModelForCausalLM, GPT2Config

from prune.families import FAMILIES
from prune.prepare import prepare
from prune.recipe import load_recipe
from prune.run import execute, main


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    """Per family: a tiny checkpoint with a byte-level tokenizer; and calibration and evaluation texts."""
    root = tmp_path_factory.mktemp("families")
    tokenizer = byte_level_tokenizer()
    files = {}
    for family in FAMILY_TYPES:
        tiny_model(family, vocab=len(tokenizer), layers=3, ffn=64).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    (root / "calibration.txt").write_text(word_text(4000, seed=1))
    (root / "evaluation.txt").write_text(word_text(2000, seed=2))
    for family in FAMILY_TYPES:
        files[family] = {
            "model": root / family,
            "calibration": root / "calibration.txt",
            "evaluation": root / "evaluation.txt",
        }
    return files


def _recipe(tmp_path, files, name: str, **sections) -> object:
    data = tiny_recipe(files, tmp_path / name, tmp_path / "cache")
    data["evaluation"]["speed"] = {"enabled": False}
    for key, value in sections.items():
        data[key] = data.get(key, {}) | value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3_text", "phi3"])
def test_a_family_runs_through_the_default_method(tmp_path, family_files, family):
    recipe = _recipe(tmp_path, family_files[family], family)
    report = execute(prepare(load_recipe(recipe)))
    assert report.model.model_type == family
    assert report.parameters.removed_fraction == pytest.approx(0.2, abs=0.02)
    assert report.perplexity and report.perplexity.pruned != report.perplexity.dense
    assert any(layer.pruned != layer.dense for layer in report.layers)
    config = json.loads((tmp_path / family / "model" / "config.json").read_text())
    assert config["model_type"] == family and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_pruned.")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / family / "model", trust_remote_code=True)
    assert sum(p.numel() for p in reloaded.parameters()) == report.parameters.pruned.total


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_the_dry_run_names_the_family_its_units_and_the_budget(tmp_path, family_files, family, capsys):
    assert main([str(_recipe(tmp_path, family_files[family], "dry")), "--dry-run"]) == 0
    budget = yaml.safe_load(capsys.readouterr().out)["budget"]
    assert budget["family"] == f"{family} ({FAMILIES[family].name})"
    assert budget["units"] == "query heads (of 6; 2 KV heads stay) and FFN channels (of 64) per layer, 3 layers"
    assert budget["parameters_to_remove"] == round(0.2 * budget["dense_total_parameters"])


def test_an_unsupported_family_and_an_uncovered_export_are_one_line(tmp_path, family_files, capsys):
    GPT2Config(n_layer=2, n_embd=64, n_head=4).save_pretrained(tmp_path / "gpt2-model")
    files = family_files["llama"] | {"model": tmp_path / "gpt2-model"}
    assert main([str(_recipe(tmp_path, files, "gpt2"))]) == 2
    line = capsys.readouterr().err.strip()
    assert line == (
        "error: model.source: model type 'gpt2' is not one the toolkit prunes; "
        "supported: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral, qwen3_moe"
    )
    recipe = _recipe(tmp_path, family_files["qwen3"], "gguf", export={"formats": ["hf", "gguf"]})
    assert main([str(recipe)]) == 2
    line = capsys.readouterr().err.strip()
    assert line == (
        "error: export.formats: the GGUF export does not write Qwen3 models (qwen3); it covers llama, mistral, qwen2"
    )
    assert not (tmp_path / "gpt2").exists() and not (tmp_path / "gguf").exists()
