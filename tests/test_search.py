"""The searched allocation: the budget invariant of every candidate, fitness = the KL divergence of the model
actually pruned, and a search that never ends worse than its start."""

import random

import pytest
import torch
import yaml
from conftest import random_tokens, tiny_model, tiny_recipe

from prune.allocation import allocate, layer_plan
from prune.blocks import block_shape, count_parameters
from prune.estimate import estimate_memory
from prune.prepare import prepare, statistics_needs
from prune.pruner import prune_model
from prune.recipe import AllocationSection, PruningSection, load_recipe
from prune.reconstruct import reconstructed_layer
from prune.run import execute
from prune.scoring import score_units
from prune.search import Candidate, Fitness, SearchSpace, kl_divergence
from prune.statistics import Statistic, collect_statistics

NEEDS = frozenset({Statistic.GRADIENT_PRODUCTS, Statistic.INPUT_SUMS, Statistic.SECOND_MOMENTS})


def _space(budget: int) -> SearchSpace:
    return SearchSpace(
        attention_cost=(300, 300, 300, 450),
        max_attention_steps=(2, 2, 2, 0),
        ffn_cost=7,
        round_to=8,
        full_ffn=(64, 64, 60, 64),
        min_ffn=(16, 16, 16, 64),
        budget=budget,
    )


def _valid(space: SearchSpace, candidate: Candidate) -> bool:
    """Within bounds, removes >= the budget, and no FFN can widen one step without falling short."""
    in_bounds = all(
        0 <= s <= m and lo <= k <= full and (k == full or k % space.round_to == 0)
        for s, m, k, lo, full in zip(
            candidate.attention_steps,
            space.max_attention_steps,
            candidate.ffn_kept,
            space.min_ffn,
            space.full_ffn,
            strict=True,
        )
    )
    surplus = space.removed(candidate) - space.budget
    tight = all(
        k == full or (space.wider(i, k) - k) * space.ffn_cost > surplus
        for i, (k, full) in enumerate(zip(candidate.ffn_kept, space.full_ffn, strict=True))
    )
    return in_bounds and surplus >= 0 and tight


@pytest.mark.parametrize("budget", [0, 500, 1500, 2700])
def test_repaired_and_mutated_candidates_meet_the_budget_exactly(budget):
    space, rng = _space(budget), random.Random(3)
    for _ in range(200):
        steps = tuple(rng.randint(0, m) for m in space.max_attention_steps)
        kept = tuple(rng.choice([k for k in range(lo, full + 1) if k == full or k % 8 == 0])
                     for lo, full in zip(space.min_ffn, space.full_ffn, strict=True))  # fmt: skip
        candidate = space.repaired(Candidate(steps, kept), rng)
        assert _valid(space, candidate), candidate
        for _ in range(5):
            candidate = space.mutated(candidate, rng)
            assert _valid(space, candidate), candidate


def _problem(model, samples):
    shape = block_shape(model.config)
    statistics = collect_statistics(model, samples, "max_logit", NEEDS, progress=False)
    scores = score_units(model, shape, "activation-obs", "sum", statistics, 0.01)
    return shape, statistics, scores


def test_fitness_is_the_kl_divergence_of_the_pruned_model():
    """Hooks that replace o_proj / down_proj outputs by their refit on the kept columns = the model physically
    pruned with the one-shot lstsq refit."""
    model, samples = tiny_model(layers=3), random_tokens(6, 20)
    shape, statistics, scores = _problem(model, samples)
    candidate = Candidate((1, 0, 2), (32, 64, 8))

    def plan_for(layer, steps, kept):
        return layer_plan(shape, layer, scores[layer], steps, "query_head", kept)

    fitness = Fitness(model, list(samples[:3]), plan_for, statistics, shape.head_dim, 0.01)
    plans = [
        plan_for(i, s, k) for i, (s, k) in enumerate(zip(candidate.attention_steps, candidate.ffn_kept, strict=True))
    ]

    def refit(index, layer, plan):
        return reconstructed_layer(index, layer, plan, shape.head_dim, statistics, "lstsq", 0.01)

    pruned = prune_model(model, plans, output_bias=True, refit=refit)
    expected, tokens = 0.0, 0
    with torch.no_grad():
        for ids in samples[:3]:
            dense = torch.log_softmax(model(ids[None]).logits[0], -1)
            expected += float(kl_divergence(dense, torch.log_softmax(pruned(ids[None]).logits[0], -1)))
            tokens += len(ids)
    assert expected / tokens > 0.01  # the candidate visibly changes the model
    assert fitness(candidate) == pytest.approx(expected / tokens, rel=1e-4)
    assert fitness(Candidate((0, 0, 0), (64, 64, 64))) < 1e-6  # every column kept: the damped refit is the dense layer


def test_the_search_ends_no_worse_than_its_start_at_the_budget():
    model, samples = tiny_model(layers=3), random_tokens(6, 20)
    shape, statistics, scores = _problem(model, samples)
    budget = round(0.3 * count_parameters(model)["total"])
    pruning = PruningSection(target=0.3, round_to=8, min_ffn_channels=8, damping=0.01)
    start = allocate(shape, scores, budget, AllocationSection(), pruning, statistics)
    settings = AllocationSection(strategy="searched", search_generations=6, search_offspring=4, search_samples=3)
    found = allocate(shape, scores, budget, settings, pruning, statistics, model=model, samples=samples)
    assert found.search is not None and found.search.evaluations > 6
    assert found.search.best_kl <= found.search.start_kl
    assert budget <= found.removed_parameters < budget + shape.ffn_channel_params() * 8
    assert budget <= start.removed_parameters < budget + shape.ffn_channel_params() * 8
    start_kept = [(len(p.kept_query_heads), len(p.kept_ffn_channels)) for p in start.plans]
    found_kept = [(len(p.kept_query_heads), len(p.kept_ffn_channels)) for p in found.plans]
    assert (found.search.best_kl < found.search.start_kl) == (found_kept != start_kept)


def test_a_searched_run_reports_its_search(tmp_path, tiny_files):
    data = tiny_recipe(tiny_files, tmp_path / "out", tmp_path / "cache")
    data["allocation"] = {"strategy": "searched", "search_generations": 3, "search_offspring": 2, "search_samples": 2}
    data["evaluation"]["speed"]["enabled"] = False
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    report = execute(prepare(load_recipe(tmp_path / "recipe.yaml")))
    search = report.allocation.search
    assert search is not None and search.generations == 3 and search.best_kl <= search.start_kl
    assert "The widths were searched" in (tmp_path / "out" / "report.md").read_text()
    assert report.parameters.removed >= report.parameters.target_removed


def test_the_memory_plan_counts_the_search():
    model = tiny_model(layers=3)
    shape, total = block_shape(model.config), count_parameters(model)["total"]

    def allocation_peak(*overrides: str) -> int:
        recipe = load_recipe(None, ["allocation.strategy=searched", "calibration.seqlen=64", *overrides])
        stages = estimate_memory(recipe, shape, 128, total, statistics_needs(recipe), in_place=True)
        return next(stage.peak_bytes for stage in stages if stage.stage == "allocation")

    assert allocation_peak("allocation.search_samples=6") - allocation_peak() == 4 * 2 * 64 * 128  # 2 samples more
    assert load_recipe(None, []).allocation.strategy != "searched"
    recipe = load_recipe(None, [])
    stages = estimate_memory(recipe, shape, 128, total, statistics_needs(recipe), in_place=True)
    assert "allocation" not in [stage.stage for stage in stages]
