"""benchmarks/quality.py: the rows a command line asks for."""

from conftest import benchmark_script


def test_a_variant_is_a_name_and_recipe_keys_read_as_yaml():
    quality = benchmark_script("quality")
    name, overrides = quality.parse_variant("damped, flat: pruning.damping=0.01 allocation.layer_range=[1,27] x=none")
    assert name == "damped, flat"
    assert overrides == {"pruning.damping": 0.01, "allocation.layer_range": [1, 27], "x": "none"}
    assert quality.llm_pruner_layers(28) == [4, 26]
