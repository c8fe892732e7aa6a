"""Pruning in rounds (``pruning.rounds``): plans compose, and a run in rounds reports the widths its checkpoint has."""

import json

import pytest
import torch
import yaml
from conftest import tiny_files, tiny_model, tiny_recipe  # noqa: F401 (fixture)

from prune.blocks import block_shape
from prune.prepare import prepare
from prune.pruner import LayerPlan, compose_plans, prune_model
from prune.recipe import RecipeError, load_recipe
from prune.run import execute


def _state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_pruning_twice_equals_pruning_once_by_the_composed_plans(family):
    model = tiny_model(family, layers=3)  # 6 query heads over 2 KV heads, 64 FFN channels
    first = [
        LayerPlan((0, 1, 2, 3, 4, 5), (0, 1), tuple(range(0, 64, 2))),
        None,
        LayerPlan((0, 2, 3, 5), (0, 1), tuple(range(40))),
    ]
    later = [LayerPlan((0, 1, 2), (0,), (1, 5, 9, 30)), LayerPlan((1, 3), (0, 1), tuple(range(8, 40)))]
    twice = prune_model(prune_model(model, first), later)
    composed = compose_plans(block_shape(model.config), first, later)
    assert composed == [
        LayerPlan((0, 1, 2), (0,), (2, 10, 18, 60)),
        None,
        LayerPlan((2, 5), (0, 1), tuple(range(8, 40))),
    ]
    once = prune_model(model, composed)
    assert _state(once).keys() == _state(twice).keys()
    for name, tensor in _state(once).items():
        assert torch.equal(tensor, _state(twice)[name]), name


def test_composed_expert_plans_keep_the_experts_and_channels_of_both_rounds():
    model = tiny_model("mixtral", layers=1)  # 4 experts of 64 channels
    first = [
        LayerPlan(tuple(range(6)), (0, 1), tuple(e * 64 + c for e in (0, 2, 3) for c in range(1, 64, 2)), (0, 2, 3))
    ]
    # over the first round's model: its experts 0 and 2 (dense 0 and 3), channels 0..7 of each (dense 1, 3, .., 15)
    later = [LayerPlan(tuple(range(6)), (0, 1), tuple(e * 32 + c for e in (0, 2) for c in range(8)), (0, 2))]
    composed = compose_plans(block_shape(model.config), first, later)
    assert composed[0] is not None and composed[0].kept_experts == (0, 3)
    assert composed[0].kept_ffn_channels == tuple(e * 64 + c for e in (0, 3) for c in range(1, 16, 2))
    once, twice = prune_model(model, composed), prune_model(prune_model(model, first), later)
    for name, tensor in _state(once).items():
        assert torch.equal(tensor, _state(twice)[name]), name


def test_a_run_in_rounds_reports_the_widths_its_checkpoint_has(tmp_path, tiny_files):  # noqa: F811
    data = tiny_recipe(tiny_files, tmp_path / "out", tmp_path / "cache")
    data["pruning"] |= {"target": 0.3, "rounds": 2, "reconstruct": "lstsq-sequential"}
    data["evaluation"]["speed"] = {"enabled": False}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    report = execute(prepare(load_recipe(tmp_path / "r.yaml")))
    assert report.allocation.rounds == 2
    assert report.parameters.removed_fraction == pytest.approx(0.3, abs=0.01)
    assert {"activation statistics (round 2)", "scoring (round 2)", "allocation (round 2)"} <= set(report.stage_seconds)
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    kept = [layer.pruned for layer in report.layers if layer.pruned is not None]
    assert [w.query_heads for w in kept] == config["layer_num_attention_heads"]
    assert [w.kv_groups for w in kept] == config["layer_num_key_value_heads"]
    assert [w.ffn_channels for w in kept] == config["layer_intermediate_size"]
    assert "Pruned in 2 rounds" in (tmp_path / "out" / "report.md").read_text()


def test_rounds_are_refused_where_they_do_not_apply():
    with pytest.raises(RecipeError, match=r"pruning.rounds: must be >= 1"):
        load_recipe(None, ["pruning.rounds=0"])
    for strategy in ("shortgpt", "searched"):
        with pytest.raises(RecipeError, match=rf"pruning.rounds: must be 1 with allocation.strategy {strategy}"):
            load_recipe(None, ["pruning.rounds=2", f"allocation.strategy={strategy}", "pruning.reconstruct=none"])
