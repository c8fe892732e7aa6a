"""Methods declare what they need: a new scorer is one function and one registry entry, end to end."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_files, tiny_recipe  # noqa: F401 (fixture)
from safetensors.torch import load_file

from prune.prepare import prepare, statistics_needs
from prune.recipe import RecipeError, load_recipe
from prune.run import execute
from prune.scoring import SCORERS, LayerScores, Scorer, ScoringInputs
from prune.statistics import Statistic


def _recipe(tmp_path, files, **sections):
    data = tiny_recipe(files, tmp_path / "out", tmp_path / "cache")
    for key, value in sections.items():
        data[key] = data.get(key, {}) | value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def by_index(inputs: ScoringInputs, layer: int) -> LayerScores:
    """A toy scorer: later units are more important (so the first ones go)."""
    widths = inputs.shape.layers[layer]
    return LayerScores(
        torch.arange(widths.query_heads, dtype=torch.float64),
        torch.arange(widths.kv_heads, dtype=torch.float64),
        torch.arange(widths.ffn_channels, dtype=torch.float64),
    )


def test_a_registered_scorer_runs_end_to_end(tmp_path, tiny_files, monkeypatch):  # noqa: F811
    monkeypatch.setitem(SCORERS, "by-index", Scorer(by_index, frozenset()))
    recipe = load_recipe(
        _recipe(tmp_path, tiny_files),
        ["scoring.method=by-index", "allocation.strategy=uniform", "pruning.reconstruct=none"],
    )
    prepared = prepare(recipe)
    assert prepared.needs == frozenset()  # nothing to collect: no statistics pass at all
    report = execute(prepared)
    assert report.method.scoring == "by-index" and report.statistics is None
    assert not (tmp_path / "out" / "activation_stats.safetensors").exists()
    dense = load_file(tiny_files["model"] / "model.safetensors")
    pruned = load_file(tmp_path / "out" / "model" / "model.safetensors")
    for row in report.layers:
        kept = row.pruned.ffn_channels
        assert kept < row.dense.ffn_channels  # something went, and it was the first channels
        gone = row.dense.ffn_channels - kept
        down = f"model.layers.{row.index}.mlp.down_proj.weight"
        assert torch.equal(pruned[down], dense[down][:, gone:])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["method"]["scoring"] == "by-index"


def test_an_unregistered_name_lists_the_registered_ones(tmp_path, tiny_files):  # noqa: F811
    with pytest.raises(RecipeError, match="^scoring.method: must be one of activation, activation-obs"):
        load_recipe(_recipe(tmp_path, tiny_files), ["scoring.method=by-index"])


@pytest.mark.parametrize(
    "overrides, needs",
    [
        (["scoring.method=magnitude", "allocation.strategy=uniform", "pruning.reconstruct=none"], set()),
        (["scoring.method=wanda-sp", "allocation.strategy=uniform", "pruning.reconstruct=none"], {"input sums"}),
        (["allocation.strategy=shortgpt", "pruning.reconstruct=none"], {"layer cosines"}),
        (
            ["scoring.method=taylor", "scoring.objective=nll", "allocation.strategy=uniform"],
            {"summed gradients", "input sums", "second moments"},
        ),
        ([], {"gradient products", "input sums", "second moments"}),
    ],
)
def test_the_statistics_pass_collects_what_the_methods_declare(tmp_path, tiny_files, overrides, needs):  # noqa: F811
    recipe = load_recipe(_recipe(tmp_path, tiny_files), overrides)
    assert {need.value for need in statistics_needs(recipe)} == needs


def test_a_cache_missing_a_statistic_is_completed_not_recomputed(tmp_path, tiny_files):  # noqa: F811
    first = execute(
        prepare(load_recipe(_recipe(tmp_path, tiny_files), ["scoring.method=activation", "pruning.reconstruct=bias"]))
    )
    assert first.statistics and not first.statistics.reused
    assert set(first.statistics.collected) == {"gradient products", "input sums"}
    second = execute(prepare(load_recipe(_recipe(tmp_path, tiny_files), []), overwrite=True))
    assert (
        second.statistics
        and not second.statistics.reused
        and second.statistics.cache_path == first.statistics.cache_path
    )
    assert set(second.statistics.collected) == {"gradient products", "input sums", "second moments"}
    third = execute(
        prepare(
            load_recipe(_recipe(tmp_path, tiny_files), ["allocation.strategy=shortgpt", "pruning.reconstruct=none"]),
            overwrite=True,
        )
    )
    assert third.statistics and Statistic.LAYER_COSINES.value in third.statistics.collected
    again = execute(prepare(load_recipe(_recipe(tmp_path, tiny_files), []), overwrite=True))
    assert again.statistics and again.statistics.reused
    assert again.layers == second.layers and again.perplexity.pruned == second.perplexity.pruned


def test_a_registered_evaluation_runs_end_to_end_with_its_settings_section_and_markdown(
    tmp_path,
    tiny_files,  # noqa: F811
    monkeypatch,
):
    import toy_evaluation
    from transformers import AutoModelForCausalLM

    from eval.report import read_report
    from eval.stages import EVALUATIONS
    from prune.recipe import recipe_schema

    monkeypatch.setitem(EVALUATIONS, "weight_norm", toy_evaluation.STAGE)
    path = _recipe(tmp_path, tiny_files)
    with pytest.raises(RecipeError, match=r"^evaluation.weight_norm.power: must be > 0, got 0$"):
        load_recipe(path, ["evaluation.weight_norm.power=0"])
    assert "weight_norm" in recipe_schema()["properties"]["evaluation"]["properties"]
    report = execute(prepare(load_recipe(path, ["evaluation.weight_norm.power=1", "evaluation.speed.enabled=false"])))
    dense = AutoModelForCausalLM.from_pretrained(tiny_files["model"])
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model", trust_remote_code=True)
    expected = {
        "power": 1,
        "dense": toy_evaluation.weight_norm(dense, 1),
        "pruned": toy_evaluation.weight_norm(pruned, 1),
    }
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["weight_norm"] == pytest.approx(expected) and expected["pruned"] < expected["dense"]
    assert read_report(tmp_path / "out").evaluations["weight_norm"] == report.evaluations["weight_norm"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| weight 1-norm |" in markdown and "## Weight norm" in markdown
    assert "weight norm (dense)" in report.stage_seconds  # computed before pruning in place


@pytest.mark.parametrize(("probe_last", "speed"), [(True, True), (True, False), (False, True)])
def test_the_weights_are_freed_before_the_stages_that_read_only_shapes(
    tmp_path,
    tiny_files,  # noqa: F811
    monkeypatch,
    probe_last,
    speed,
):
    """A stage that reads only the models' shapes (``reads_weights=False``) runs after both models' weights are
    freed when no later stage computes with them, the dense model's checkpoint (memory-mapped by the load) no longer
    mapped; the dense part it still lacks is computed before that. With the speed stage the dense model is kept
    beside the pruned one, without it the run prunes in place."""
    import dataclasses

    import toy_evaluation
    from transformers import AutoModelForCausalLM

    from eval.stages import EVALUATIONS
    from prune.blocks import count_parameters

    seen = []
    checkpoint = str((tiny_files["model"] / "model.safetensors").resolve())

    def probe(inputs):
        mapped = checkpoint in Path("/proc/self/maps").read_text()
        seen.append(({p.device.type for p in inputs.pruned.parameters()}, mapped))
        dense = inputs.dense_part(probe_stage)
        return toy_evaluation.WeightNormReport(1, dense, float(count_parameters(inputs.pruned)["total"]))

    probe_stage = dataclasses.replace(
        toy_evaluation.STAGE,
        name="probe",
        label="probe",
        run=probe,
        enabled=lambda recipe: True,
        dense=lambda d: toy_evaluation.weight_norm(d.dense, 1),  # float() of a freed weight fails
        headline=None,
        markdown=None,
        reads_weights=False,
    )
    for stage in [toy_evaluation.STAGE, probe_stage] if probe_last else [probe_stage, toy_evaluation.STAGE]:
        monkeypatch.setitem(EVALUATIONS, stage.name, stage)
    report = execute(prepare(load_recipe(_recipe(tmp_path, tiny_files), [f"evaluation.speed.enabled={speed}"])))
    assert ("speed" in report.evaluations) == speed
    assert seen == [({"meta"}, False) if probe_last else ({"cpu"}, True)]
    dense = AutoModelForCausalLM.from_pretrained(tiny_files["model"])
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model", trust_remote_code=True)
    section = report.evaluations["probe"]
    assert section.dense == pytest.approx(toy_evaluation.weight_norm(dense, 1))
    assert section.pruned == count_parameters(pruned)["total"] == report.parameters.pruned.total
    norm = report.evaluations["weight_norm"]
    assert norm.pruned == pytest.approx(toy_evaluation.weight_norm(pruned, norm.power))
