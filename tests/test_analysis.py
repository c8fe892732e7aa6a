"""Activation-pattern analysis: LLMDcos, activated counts against brute force, data readers, the command line."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, CharTokenizer, random_tokens, shared_dir, tiny_model

from prune import similarity
from prune.analysis.data import domain_samples, read_sentence_pairs, task_prompt
from prune.analysis.patterns import CountSketch, domain_patterns, pattern_similarities, sketch_cosines
from prune.analysis.recipe import load_analysis_recipe
from prune.analysis.run import deep_layer_range, domain_similarity_pairs
from prune.blocks import decoder_layers, layer_linears
from prune.calibration import DataSourceError
from prune.recipe import RecipeError
from prune.statistics import HIST_MIN, HIST_WIDTH, objective_value

DATA = shared_dir("PRUNE_DATA_DIR")
needs_data = pytest.mark.skipif(DATA is None, reason="PRUNE_DATA_DIR not set")


def brute_force_patterns(model, samples, objective="max_logit") -> list[list[torch.Tensor]]:
    """Per sample, per layer: |w * dD/dw| of the 7 linears, flattened and concatenated (plain autograd)."""
    patterns = []
    for sample in samples:
        weights = [[linear.weight for linear in layer_linears(layer).values()] for layer in decoder_layers(model)]
        flat = [w for layer in weights for w in layer]
        grads = torch.autograd.grad(objective_value(model, sample.unsqueeze(0), objective), flat)
        it = iter(grads)
        patterns.append([torch.cat([(w * next(it)).abs().flatten() for w in layer]).detach() for layer in weights])
    return patterns


def test_pattern_of_an_input_with_itself_has_cosine_one_and_matches_brute_force():
    model = tiny_model()
    a, b = random_tokens(2, 9)
    cosines = pattern_similarities(model, [(a, a), (a, b)], progress=False)
    assert cosines.shape == (2, 3)
    assert torch.allclose(cosines[0], torch.ones(3, dtype=torch.float64), atol=1e-6)
    pa, pb = brute_force_patterns(model, [a, b])
    expected = torch.stack(
        [torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=0) for x, y in zip(pa, pb, strict=True)]
    )
    assert torch.allclose(cosines[1], expected, atol=1e-6)
    assert (cosines[1] < 0.999).all()  # two random inputs do not share a pattern


def test_similarity_api_is_symmetric_and_layer_selection_averages():
    model, tokenizer = tiny_model(), CharTokenizer()
    ab = similarity(model, tokenizer, "the cat sat on the mat", "a dog ran in the park")
    ba = similarity(model, tokenizer, "a dog ran in the park", "the cat sat on the mat")
    assert ab == pytest.approx(ba, abs=1e-12) and 0 < ab < 1
    per_layer = [
        similarity(model, tokenizer, "the cat sat on the mat", "a dog ran in the park", layers=[i]) for i in range(3)
    ]
    assert ab == pytest.approx(sum(per_layer) / 3, abs=1e-12)
    assert similarity(model, tokenizer, "same text", "same text") == pytest.approx(1.0, abs=1e-6)


def test_activated_counts_match_brute_force():
    model = tiny_model(seed=3)
    samples = list(random_tokens(4, 7, seed=5))
    patterns = brute_force_patterns(model, samples)
    mean = [torch.stack([p[layer] for p in patterns]).mean(0) for layer in range(3)]
    overall = torch.cat(mean).mean().item()
    # a histogram bin edge near the mean A, so the count read from the histogram is exact
    gamma = 10 ** (HIST_MIN + round((math.log10(overall) - HIST_MIN) / HIST_WIDTH) * HIST_WIDTH)
    result = domain_patterns(model, samples, "max_logit", gamma, 1.5, CountSketch(64, 0), progress=False)
    assert result.weights_per_layer == [m.numel() for m in mean]
    assert result.relative_threshold == pytest.approx(1.5 * overall, rel=1e-5)
    for layer in range(3):
        assert result.activated[layer] == pytest.approx(int((mean[layer] >= gamma).sum()), abs=0.5)
        exact = int((mean[layer] > result.relative_threshold).sum())
        # the relative threshold falls inside a 0.01-decade bin: the count interpolates within that bin only
        in_bin = int(((mean[layer].log10() - math.log10(result.relative_threshold)).abs() < HIST_WIDTH).sum())
        assert abs(result.activated_relative[layer] - exact) <= in_bin
    assert 0 < result.activated_relative[0] < result.weights_per_layer[0]
    assert result.sketches.shape == (4, 3, 64)


def test_sketch_cosines_estimate_the_exact_cosines():
    model = tiny_model(seed=1)
    a, b = random_tokens(2, 9, seed=7)
    exact = pattern_similarities(model, [(a, b)], progress=False)[0]
    sketches = domain_patterns(model, [a, b], "max_logit", 1e-6, 1.0, CountSketch(4096, 0), progress=False).sketches
    estimate = sketch_cosines(sketches[0], sketches[1])
    assert (estimate - exact).abs().max() < 0.08
    same_domain = domain_similarity_pairs(sketches, None)  # first half against second half
    assert same_domain.shape == (1, 3) and torch.allclose(same_domain[0], estimate)


def test_count_sketch_preserves_inner_products_on_average():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(5000, generator=generator), torch.rand(5000, generator=generator)
    # standard error of a sketched inner product: about |x| |y| / sqrt(size) = 1667 / 64 = 26 here (2%)
    sketch = CountSketch(4096, 0)

    def sketched(name, values):
        buffer = torch.zeros(2 * 4096)
        sketch.add(buffer, name, values)
        return sketch.fold(buffer)

    sx, sy = sketched("q_proj", x), sketched("q_proj", y)
    assert float(sx @ sy) == pytest.approx(float(x @ y), rel=0.1)
    buffer = torch.zeros(2 * 4096)
    CountSketch(4096, 0).add(buffer, "q_proj", x)
    assert torch.equal(sketch.fold(buffer), sx)  # the map depends on the seed and the name only
    other = sketched("o_proj", x)
    assert not torch.equal(other, sx)


def test_deep_layer_range_scales_the_papers_layers():
    assert deep_layer_range(None, 32) == (19, 30)
    assert deep_layer_range(None, 30) == (18, 28)
    assert deep_layer_range([2, 5], 30) == (2, 5)
    with pytest.raises(RecipeError, match="deep_layers: end 40"):
        deep_layer_range([2, 40], 30)


@needs_data
def test_sts_readers_parse_the_real_files():
    for name, rows in (("sts-test.csv", 1379), ("sts-dev.csv", 1500)):
        pairs = read_sentence_pairs(DATA / "stsb" / name)
        assert len(pairs) == rows
        assert min(p.score for p in pairs) == 0.0 and max(p.score for p in pairs) == 5.0
        assert all(p.text_a.strip() and p.text_b.strip() for p in pairs)
    first = read_sentence_pairs(DATA / "stsb" / "sts-test.csv")[0]
    assert (first.text_a, first.text_b, first.score) == (
        "A girl is styling her hair.",
        "A girl is brushing her hair.",
        2.5,
    )


def test_sick_reader(tmp_path):
    path = tmp_path / "SICK_trial.txt"
    path.write_text(
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
        "1\tA boy is playing.\tA child is playing.\t4.5\tENTAILMENT\n"
        "2\tA man cooks.\tThe sky is blue.\t1.1\tNEUTRAL\n"
    )
    pairs = read_sentence_pairs(path)
    assert [(p.text_a, p.score) for p in pairs] == [("A boy is playing.", 4.5), ("A man cooks.", 1.1)]
    bad = tmp_path / "bad.csv"
    bad.write_text("only\tthree\tfields\n")
    with pytest.raises(DataSourceError, match="bad.csv:1: expected at least 7"):
        read_sentence_pairs(bad)


def test_winogrande_prompt_puts_a_blank_where_the_options_go():
    item = {
        "context_options": [
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        ],
        "continuation": "always got the easier cases.",
        "gold": 1,
    }
    assert (
        task_prompt("winogrande", item)
        == "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    )
    assert task_prompt("piqa", {"query": "Question: dresser\n"}) == "Question: dresser\n"


@needs_data
def test_domain_samples_are_seeded_distinct_and_cut(monkeypatch):
    tokenizer = CharTokenizer()
    boolq = domain_samples(tokenizer, "boolq", 8, 40, seed=0)
    assert len(boolq) == 8 and all(len(s) <= 40 for s in boolq)
    assert all(torch.equal(x, y) for x, y in zip(boolq, domain_samples(tokenizer, "boolq", 8, 40, seed=0), strict=True))
    assert not all(
        torch.equal(x, y) for x, y in zip(boolq, domain_samples(tokenizer, "boolq", 8, 40, seed=1), strict=True)
    )
    c4 = domain_samples(tokenizer, "c4", 3, 50, seed=0)
    assert [len(s) for s in c4] == [50, 50, 50]
    with pytest.raises(DataSourceError, match="openbookqa has only 500 items"):
        domain_samples(tokenizer, "openbookqa", 501, 40, seed=0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("domains.names=[boolq, mmlu]", "domains.names: must be two or more distinct names"),
        ("domains.boxplot_pairs=[[c4, openbookqa]]", "domains.boxplot_pairs: must be pairs"),
        ("domains.enabled=false", "domains.enabled: nothing to do"),
        ("domains.sampels=3", "did you mean 'domains.samples'"),
        ("deep_layers=[5, 2]", "deep_layers: must be null or"),
    ],
)
def test_analysis_recipe_errors_name_the_key(override, message):
    with pytest.raises(RecipeError, match=message):
        load_analysis_recipe(REPO / "recipes" / "analysis_domains.yaml", [override])


def test_both_shipped_analysis_recipes_load():
    assert load_analysis_recipe(REPO / "recipes" / "analysis_domains.yaml").domains.enabled
    sts = load_analysis_recipe(REPO / "recipes" / "analysis_sts.yaml")
    assert sts.similarity.enabled and not sts.domains.enabled and sts.similarity.pairs == 256


@pytest.mark.smollm2
@pytest.mark.skipif(
    shared_dir("PRUNE_MODELS_DIR") is None or DATA is None, reason="PRUNE_MODELS_DIR / PRUNE_DATA_DIR not set"
)
def test_analyze_command_on_smollm2(tmp_path):
    output = tmp_path / "analysis"
    overrides = [
        f"output={output}",
        f"cache_dir={tmp_path / 'cache'}",
        "domains.enabled=true",
        "similarity.enabled=true",
        "domains.names=[piqa, winogrande, c4]",
        "domains.samples=4",
        "domains.max_tokens=32",
        "domains.sketch_size=1024",
        "domains.boxplot_pairs=[[piqa, c4], [c4, c4]]",
        "similarity.pairs=6",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prune.analysis",
            "recipes/analysis_domains.yaml",
            *[arg for o in overrides for arg in ("--set", o)],
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(output)) == [
        "activation_density.png",
        "analysis.json",
        "analysis.md",
        "similarity_boxplots.png",
        "similarity_by_layer.png",
        "similarity_heatmap.png",
        "sts_spearman.png",
    ]
    analysis = json.loads((output / "analysis.json").read_text())
    assert analysis["deep_layers"] == [18, 28]
    domains = analysis["domains"]
    assert len(domains["weights_per_layer"]) == 30 and set(domains["activated_relative"]) == {
        "piqa",
        "winogrande",
        "c4",
    }
    assert set(domains["similarity_per_layer"]) == {
        "piqa|piqa",
        "piqa|winogrande",
        "piqa|c4",
        "winogrande|winogrande",
        "winogrande|c4",
        "c4|c4",
    }
    assert [len(v) for v in domains["boxplots"]["piqa|c4"]] == [4] * 30  # 4 sample pairs per layer
    assert [len(v) for v in domains["boxplots"]["c4|c4"]] == [2] * 30  # halves of 4 samples
    sts = analysis["similarity"]
    assert sts["pairs"] == 6 and -1 <= sts["spearman_deep"] <= 1 and 0 <= sts["p_value_deep"] <= 1
    assert all(0 < v <= 1 for v in sts["deep_similarity"])
    markdown = (output / "analysis.md").read_text()
    assert "![density](activation_density.png)" in markdown and "Spearman rho" in markdown
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "prune.analysis",
            "recipes/analysis_domains.yaml",
            *[arg for o in overrides for arg in ("--set", o)],
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert again.returncode == 2 and "already exists" in again.stderr
