"""Recipe validation: one clear error naming the key or path, exit code 2, nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_files, tiny_model, tiny_recipe  # noqa: F401 (fixture)

from prune.recipe import Recipe, RecipeError, load_recipe, recipe_to_dict


def _write(tmp_path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "prune.run", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "data, key",
    [
        ({"pruning": {"taget": 0.3}}, "pruning.taget"),
        ({"pruning": {"target": 1.0}}, "pruning.target"),
        ({"pruning": {"target": "lots"}}, "pruning.target"),
        ({"calibration": {"samples": 0}}, "calibration.samples"),
        ({"calibration": {"samples": 2.5}}, "calibration.samples"),
        ({"scoring": {"method": "magic"}}, "scoring.method"),
        ({"evaluation": {"speed": {"enabled": "yes"}}}, "evaluation.speed.enabled"),
        ({"modle": {}}, "modle"),
        ({"allocation": {"strategy": "shortgpt"}, "pruning": {"reconstruct": "lstsq"}}, "pruning.reconstruct"),
        ({"pruning": {"reconstruct": "magic"}}, "pruning.reconstruct"),
        ({"allocation": {"strategy": "magic"}}, "allocation.strategy"),
        ({"export": {"formats": ["onnx"]}}, "export.formats"),
        ({"scoring": {"method": "taylor", "objective": "max_logit"}}, "scoring.objective"),
        ({"allocation": {"layer_range": [4]}}, "allocation.layer_range"),
        ({"allocation": {"layer_range": [4, "x"]}}, "allocation.layer_range"),
    ],
)
def test_bad_values_name_the_key(tmp_path, data, key):
    with pytest.raises(RecipeError) as error:
        load_recipe(_write(tmp_path, data))
    assert str(error.value).startswith(key + ":")


def test_typo_suggests_the_right_key(tmp_path):
    with pytest.raises(RecipeError, match="did you mean 'pruning.target'"):
        load_recipe(_write(tmp_path, {"pruning": {"taget": 0.3}}))


def test_overrides_are_applied_and_validated(tmp_path):
    recipe = load_recipe(
        _write(tmp_path, {"pruning": {"target": 0.3}}),
        ["pruning.target=0.2", "output=somewhere", "evaluation.perplexity.windows=null"],
    )
    assert recipe.pruning.target == 0.2 and recipe.output == "somewhere"
    assert recipe.evaluation.perplexity.windows is None
    with pytest.raises(RecipeError, match="^pruning.target"):
        load_recipe(None, ["pruning.target=2"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(None, ["pruning.target"])


def test_cli_bad_recipe_exits_nonzero_and_writes_nothing(tmp_path):
    output = tmp_path / "out"
    recipe = _write(tmp_path, {"output": str(output), "calibration": {"sampels": 3}})
    result = _cli(str(recipe))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: calibration.sampels: unknown key; did you mean 'calibration.samples'?"
    ]
    assert not output.exists() and not output.with_name("out.partial").exists()


def test_cli_missing_files_are_named(tmp_path):
    output = tmp_path / "out"
    tiny_model().save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("some text " * 100)
    local = {
        "output": str(output),
        "model": {"source": str(tmp_path / "tiny")},
        "evaluation": {"perplexity": {"dataset": str(text)}},
    }
    result = _cli(str(_write(tmp_path, local | {"calibration": {"source": str(tmp_path / "nope.jsonl")}})))
    assert result.returncode == 2 and "calibration.source: file not found" in result.stderr
    result = _cli(str(_write(tmp_path, local | {"model": {"source": str(tmp_path / "m.gguf")}})))
    assert result.returncode == 2 and "model.source: GGUF file not found" in result.stderr
    result = _cli(str(_write(tmp_path, local | {"model": {"source": str(tmp_path / "no_such_dir")}})))
    assert result.returncode == 2 and "model.source: no such file or directory" in result.stderr
    result = _cli(str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "missing.yaml: recipe file not found" in result.stderr
    assert not output.exists()


def test_cli_dry_run_prints_the_budget(tmp_path):
    tiny_model().save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("some text " * 100)
    recipe = {
        "output": str(tmp_path / "out"),
        "model": {"source": str(tmp_path / "tiny")},
        "calibration": {"source": str(text)},
        "evaluation": {"perplexity": {"dataset": str(text)}},
        "pruning": {"min_ffn_channels": 8},
    }
    result = _cli(str(_write(tmp_path, recipe)), "--dry-run", "--set", "pruning.target=0.25")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    total = sum(p.numel() for p in tiny_model().parameters())
    assert printed["recipe"]["pruning"]["target"] == 0.25
    assert printed["budget"]["dense_total_parameters"] == total
    assert printed["budget"]["parameters_to_remove"] == round(0.25 * total)
    assert not (tmp_path / "out").exists()
    ceiling = ["--set", "pruning.max_decoder_sparsity=1"]  # past the decoder-share ceiling: the per-layer minimums
    result = _cli(str(_write(tmp_path, recipe)), "--dry-run", "--set", "pruning.target=0.9", *ceiling)
    assert result.returncode == 2 and result.stderr.startswith("error: pruning.target: 0.9 asks to remove")


def test_cli_refuses_existing_output(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    result = _cli(str(_write(tmp_path, {"output": str(output)})))
    assert result.returncode == 2 and "exists and is not a run's output" in result.stderr
    assert (output / "keep.txt").read_text() == "mine"


def test_llama_recipe_validates_and_offline_dry_run_is_one_line(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "llama_30pct.yaml")
    assert recipe.model.source == "meta-llama/Llama-2-7b-hf" and recipe.model.dtype == "bfloat16"
    assert recipe.model.device == "cuda" and recipe.pruning.target == 0.3
    result = _cli(
        "recipes/llama_30pct.yaml",
        "--dry-run",
        "--set",
        f"output={tmp_path / 'o'}",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: model.source: cannot load") and "Hugging Face Hub" in lines[0]
    )


def test_every_pruning_recipe_in_the_repository_validates():
    paths = sorted(p for p in (REPO / "recipes").glob("*.yaml") if not p.name.startswith("analysis_"))
    recipes = {path.name: load_recipe(path) for path in paths}
    assert len(recipes) >= 5 and all(r.pruning.reconstruct == "lstsq-sequential" for r in recipes.values())


def test_a_null_round_to_is_128_on_cuda_and_8_on_the_cpu_and_an_explicit_one_stays():
    import torch

    from prune.allocation import removable_units
    from prune.blocks import block_shape
    from prune.prepare import for_device

    recipe = load_recipe(None, [])
    assert recipe.pruning.round_to is None
    assert for_device(recipe, torch.device("cuda")).pruning.round_to == 128
    assert for_device(recipe, torch.device("cpu")).pruning.round_to == 8
    assert for_device(load_recipe(None, ["pruning.round_to=64"]), torch.device("cuda")).pruning.round_to == 64
    shape = block_shape(tiny_model(ffn=640).config)
    with pytest.raises(ValueError, match="resolved for the device"):
        removable_units(shape, recipe.pruning, frozenset())  # nothing prunes with an unresolved multiple
    coarse, fine = (
        removable_units(shape, for_device(recipe, torch.device(d)).pruning, frozenset()) for d in ("cuda", "cpu")
    )
    assert coarse < fine  # 64 minimum channels kept: 128 when rounded to 128, 64 when rounded to 8


FIELD_FAULTS = [
    {"pruning": {"taget": 0.3}},
    {"modle": {}},
    {"pruning": {"target": 1.0}},
    {"pruning": {"target": "lots"}},
    {"calibration": {"samples": 0}},
    {"calibration": {"samples": 2.5}},
    {"scoring": {"method": "magic"}},
    {"evaluation": {"speed": {"enabled": "yes"}}},
    {"evaluation": {"zeroshot": {"limit": 0}}},
    {"export": {"formats": ["onnx"]}},
    {"export": {"formats": ["hf", "hf"]}},
    {"allocation": {"layer_range": [4]}},
    {"model": {"device": "gpu"}},
]


def test_the_schema_accepts_every_recipe_and_refuses_what_a_field_rule_refuses(tmp_path):
    from jsonschema import Draft202012Validator

    def validator(module: str) -> Draft202012Validator:
        printed = subprocess.run([sys.executable, "-m", module, "--schema"], capture_output=True, text=True, cwd=REPO)
        assert printed.returncode == 0, printed.stderr
        schema = json.loads(printed.stdout)
        Draft202012Validator.check_schema(schema)
        return Draft202012Validator(schema)

    run, analysis = validator("prune.run"), validator("prune.analysis")
    paths = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(paths) >= 7
    for path in paths:
        checker = analysis if path.name.startswith("analysis_") else run
        assert not list(checker.iter_errors(yaml.safe_load(path.read_text()))), path.name
    assert not list(run.iter_errors(recipe_to_dict(Recipe())))
    for data in FIELD_FAULTS:
        assert list(run.iter_errors(data)), data  # the editor marks it
        with pytest.raises(RecipeError):  # and the run refuses it
            load_recipe(_write(tmp_path, data))
    assert run.schema["properties"]["pruning"]["properties"]["target"]["description"].startswith("Fraction")


def test_a_target_of_the_decoder_blocks_and_the_ceiling_on_their_share(tmp_path, tiny_files):  # noqa: F811
    from prune.allocation import ImpossibleTargetError
    from prune.prepare import dry_run_text, prepare
    from prune.run import execute

    path = _write(tmp_path, tiny_recipe(tiny_files, tmp_path / "out", tmp_path / "cache"))
    all_share = prepare(load_recipe(path, ["pruning.target=0.3"]))
    dense = all_share.dense_parameters
    assert all_share.params_to_remove == round(0.3 * dense["total"])
    decoder_share = all_share.params_to_remove / dense["decoder_blocks"]
    assert 0.3 < decoder_share < 0.5  # the embeddings are part of "all"
    with pytest.raises(ImpossibleTargetError) as refused:
        prepare(load_recipe(path, ["pruning.target=0.3", "pruning.max_decoder_sparsity=0.3"]))
    line = str(refused.value)
    assert f"{all_share.params_to_remove:,} parameters, {decoder_share:.1%} of the decoder blocks'" in line
    assert "pruning.target_of: decoder" in line and "pruning.max_decoder_sparsity 0.3" in line
    prepared = prepare(load_recipe(path, ["pruning.target=0.3", "pruning.target_of=decoder"]))
    assert prepared.params_to_remove == round(0.3 * dense["decoder_blocks"])
    budget = yaml.safe_load(dry_run_text(prepared))["budget"]
    assert budget["removed_share_of_decoder_block_parameters"] == pytest.approx(0.3, abs=1e-5)
    assert budget["removed_share_of_all_parameters"] == pytest.approx(prepared.params_to_remove / dense["total"])
    report = execute(prepared)
    counts = report.parameters
    assert 1 - counts.pruned.decoder_blocks / counts.dense.decoder_blocks == pytest.approx(0.3, abs=0.02)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Target: remove 30.0% of decoder-block parameters" in text and "of the decoder blocks' parameters" in text


def test_fewer_calibration_tokens_than_an_inverted_input_is_refused_in_one_line(tmp_path, tiny_files):  # noqa: F811
    from prune.prepare import dry_run_text, prepare

    path = _write(tmp_path, tiny_recipe(tiny_files, tmp_path / "out", tmp_path / "cache"))
    small = [
        "calibration.samples=2",
        "calibration.seqlen=32",
        "allocation.search_samples=2",
    ]  # 64 tokens; o_proj's input is 6 x 16 = 96 wide
    with pytest.raises(RecipeError) as refused:
        prepare(load_recipe(path, [*small, "pruning.reconstruct=lstsq-sequential"]))
    line = str(refused.value)
    assert line.startswith("calibration: 2 x 32 = 64 tokens for inputs 96 wide") and "\n" not in line
    assert "the activation-obs scores and the lstsq-sequential refit invert (0.67 tokens per input" in line
    assert "at least 96 tokens" in line and "pruning.reconstruct: none" in line
    assert "calibration.min_tokens_per_input 1.0" in line
    free = prepare(load_recipe(path, [*small, "pruning.reconstruct=none", "scoring.method=activation"]))
    budget = yaml.safe_load(dry_run_text(free))["budget"]
    assert budget["calibration_tokens"] == 64 and budget["widest_inverted_input"] is None
    enough = prepare(
        load_recipe(path, ["calibration.samples=3", "calibration.seqlen=32", "allocation.search_samples=2"])
    )
    assert yaml.safe_load(dry_run_text(enough))["budget"]["widest_inverted_input"] == 96
