"""Python API, installed commands and the model card every checkpoint carries."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_report, random_tokens, tiny_files, tiny_model, tiny_recipe  # noqa: F401 (fixture)

import prune
from eval.model_card import model_card
from eval.stages.perplexity import PerplexityReport
from eval.stages.zeroshot import TaskAccuracy, ZeroshotReport, ZeroshotScores


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_run_recipe_is_the_command_line_run_and_writes_a_model_card(tmp_path, tiny_files):  # noqa: F811
    data = tiny_recipe(tiny_files, tmp_path / "out", tmp_path / "cache")
    recipe = prune.load_recipe(None, [f"{key}={json.dumps(value)}" for key, value in data.items()])
    report = prune.run_recipe(recipe, overrides=["pruning.target=0.25"])
    assert report == prune.read_report(tmp_path / "out")
    assert report.method.target == 0.25 and 0.245 < report.parameters.removed_fraction < 0.26
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    matter = _front_matter(card)
    assert matter["base_model"] == "model" and matter["library_name"] == "transformers"
    assert matter["pipeline_tag"] == "text-generation" and matter["tags"][:3] == [
        "pruned",
        "structured-pruning",
        "llama",
    ]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert matter["pruning"]["perplexity"]["pruned"] == saved["perplexity"]["pruned"]
    assert matter["pruning"]["perplexity"]["dense"] == saved["perplexity"]["dense"]
    assert matter["pruning"]["parameters"] == {k: saved["parameters"][k]["total"] for k in ("dense", "pruned")}
    speed = saved["speed"]
    decode = speed["pruned"]["decode_tokens_per_s_median"] / speed["dense"]["decode_tokens_per_s_median"]
    assert matter["pruning"]["speed"]["decode_speedup"] == pytest.approx(decode)
    assert "trust_remote_code=True" in card and "| 0 | 6 → " in card
    with pytest.raises(prune.RecipeError, match="^output: .* already exists"):
        prune.run_recipe(recipe)  # the same validation as the command line


def test_dir_of_the_package_lists_the_public_api_and_every_name_resolves():
    listed = dir(prune)
    assert {"run_recipe", "prune_loaded_model", "load_recipe", "read_report", "similarity"} <= set(listed)
    assert set(prune.__all__) <= set(listed)
    for name in prune.__all__:  # each listed name is importable from the package
        assert getattr(prune, name).__name__ == name


def test_model_index_holds_only_full_task_sets_with_items_and_standard_errors():
    dense = ZeroshotScores({"piqa": TaskAccuracy(0.70, 1838, 0.68), "boolq": TaskAccuracy(0.60, 3270)}, 0.65)
    pruned_tasks = {"piqa": TaskAccuracy(0.612, 1838, 0.60, 0.0114), "boolq": TaskAccuracy(0.55, 3270)}
    pruned = ZeroshotScores(pruned_tasks, 0.581)
    section = ZeroshotReport("local", "/data", None, 0, "acc", ["boolq", "piqa"], dense, pruned, None)
    report = make_report(
        perplexity=PerplexityReport("wikitext2", 2048, 16, 32752, 20.7, 45.4, None, None, []), zeroshot=section
    )
    matter = _front_matter(model_card(report, "tiny-pruned"))
    assert matter["license"] == "apache-2.0"
    (entry,) = matter["model-index"]
    assert entry["name"] == "tiny-pruned"
    (piqa,) = entry["results"]  # boolq has no standard error, PIQA's acc_norm neither: not published
    assert piqa["dataset"]["name"] == "PIQA"
    assert piqa["metrics"] == [
        {"type": "acc", "value": 61.2, "name": "accuracy (zero-shot, 1,838 items, standard error 1.14)"}
    ]
    assert matter["pruning"]["zeroshot_mean_acc"]["pruned"] == 0.581
    first_items = make_report(zeroshot=dataclasses.replace(section, limit=100))  # the first 100 items: noise
    assert "model-index" not in _front_matter(model_card(first_items, "tiny-pruned"))


@pytest.mark.parametrize("reconstruct", ["lstsq", "lstsq-sequential"])
def test_prune_loaded_model_applies_a_recipes_method_in_memory(reconstruct):
    model = tiny_model("mistral", layers=3, ffn=64)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    result = prune.prune_loaded_model(
        model,
        tokenizer=None,
        overrides=[
            "pruning.target=0.2",
            "pruning.round_to=8",
            "pruning.min_ffn_channels=8",
            f"pruning.reconstruct={reconstruct}",
        ],
        calibration=random_tokens(4, 16),
    )
    assert 0.2 <= result.removed_fraction < 0.23
    assert len(result.layers) == 3 and all(row.pruned.ffn_channels < 64 for row in result.layers)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())  # left untouched
    x = random_tokens(1, 8)
    assert result.model(x).logits.shape == model(x).logits.shape == (1, 8, 128)


def test_installed_commands_behave_like_the_module_forms(tmp_path):
    bin_dir = Path(sys.executable).parent
    for command in ("prune-run", "prune-export", "prune-analyze"):
        assert (bin_dir / command).exists() or shutil.which(command), command
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("pruning: {taget: 0.3}\n")
    installed = subprocess.run([bin_dir / "prune-run", str(recipe)], capture_output=True, text=True, cwd=REPO)
    module = subprocess.run([sys.executable, "-m", "prune.run", str(recipe)], capture_output=True, text=True, cwd=REPO)
    assert installed.returncode == module.returncode == 2
    assert installed.stderr == module.stderr == "error: pruning.taget: unknown key; did you mean 'pruning.target'?\n"
    exported = subprocess.run([bin_dir / "prune-export", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert exported.returncode == 2 and exported.stderr.startswith("error: ")
