"""Layer sparsities, the budget solver and unit choice."""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from prune.allocation import (
    ImpossibleTargetError,
    activated_count,
    allocate,
    density_sparsities,
    layer_plan,
    removable_parameters,
    solve_budget,
)
from prune.blocks import block_shape
from prune.recipe import AllocationSection, PruningSection
from prune.scoring import LayerScores
from prune.statistics import HIST_MIN, HIST_WIDTH, log10_histogram

SMOLLM2 = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)
SMOLLM2_TOTAL = 134_515_008  # embeddings (tied) + 30 blocks + norms


def _allocate(
    shape, scores, to_remove, strategy, unit, round_to, min_ffn, statistics=None, protected=frozenset(), **kw
):
    """allocate() with the recipe sections built from plain arguments."""
    settings = AllocationSection(strategy=strategy, **kw)
    pruning = PruningSection(attention_unit=unit, round_to=round_to, min_ffn_channels=min_ffn)
    return allocate(shape, scores, to_remove, settings, pruning, statistics, protected)


def _random_scores(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        LayerScores(
            torch.rand(w.query_heads, generator=g, dtype=torch.float64),
            torch.rand(w.kv_heads, generator=g, dtype=torch.float64),
            torch.rand(w.ffn_channels, generator=g, dtype=torch.float64),
        )
        for w in shape.layers
    ]


@pytest.mark.parametrize("unit", ["query_head", "kv_group"])
@pytest.mark.parametrize("target", [0.05, 0.2, 0.3, 0.5])
@pytest.mark.parametrize("strategy", ["uniform", "density"])
def test_budget_lands_just_above_target(unit, target, strategy):
    shape = block_shape(SMOLLM2)
    to_remove = round(target * SMOLLM2_TOTAL)
    sparsity = to_remove / sum(shape.linear_weight_count(w) for w in shape.layers)
    rng = np.random.default_rng(1)
    layer_sparsity = (
        [sparsity] * 30
        if strategy == "uniform"
        else density_sparsities(list(rng.uniform(1e5, 3e6, 30)), sparsity, 2.0, 0.2)
    )
    steps, kept = solve_budget(shape, layer_sparsity, to_remove, unit, 8, 64)
    plans = [layer_plan(shape, i, s, steps[i], unit, kept[i]) for i, s in enumerate(_random_scores(shape))]
    removed = sum(
        shape.layer_params(w) - shape.layer_params(p.widths) for w, p in zip(shape.layers, plans, strict=True)
    )
    assert to_remove <= removed < to_remove + 8 * shape.ffn_channel_params()
    assert abs(removed - to_remove) / SMOLLM2_TOTAL < 0.005
    for plan in plans:
        assert len(plan.kept_ffn_channels) % 8 == 0 and len(plan.kept_ffn_channels) >= 64
        assert len(plan.kept_kv_heads) >= 1 and len(plan.kept_query_heads) % len(plan.kept_kv_heads) == 0


def test_impossible_target_is_refused():
    shape = block_shape(SMOLLM2)
    most = removable_parameters(shape, "query_head", 8, 64)
    with pytest.raises(ImpossibleTargetError, match="pruning.target"):
        solve_budget(shape, [0.9] * 30, most + 1, "query_head", 8, 64)
    steps, kept = solve_budget(shape, [0.9] * 30, most, "query_head", 8, 64)
    assert steps == [2] * 30 and kept == [64] * 30


def test_density_sparsities_follow_the_paper_formula():
    n = [5e5, 2e6, 1.8e6, 1.2e6, 9e5, 7e5]
    s, alpha, beta = 0.4, 2.0, 0.2
    z = (np.array(n) - np.mean(n)) / np.std(n)
    n_prime = 1 / (1 + np.exp(-(z + alpha / np.arange(1, 7))))
    expected = s + beta * s * (1 - n_prime * 6 / n_prime.sum())
    got = density_sparsities(n, s, alpha, beta)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert abs(np.mean(got) - s) < 1e-12
    assert all(abs(x - s) <= beta * s + 1e-12 for x in got)
    # denser layers are pruned less
    assert got[1] < got[4]


def test_activated_count_matches_brute_force_at_bin_edges():
    values = torch.from_numpy(np.random.default_rng(0).lognormal(-12, 2, size=100_000)).float()
    histogram = log10_histogram(values)
    assert histogram.sum() == len(values)
    for k in (1300, 1450, 1500):
        threshold = 10 ** (HIST_MIN + k * HIST_WIDTH)
        logs = values.double().log10()
        brute = int(((logs - HIST_MIN) / HIST_WIDTH >= k).sum())  # same bin edges, no rounding of the threshold
        assert activated_count(histogram, threshold) == brute
    assert activated_count(histogram, 1e-30) == len(values)
    assert activated_count(histogram, 1e6) == 0


def test_lowest_scoring_units_are_removed():
    shape = block_shape(SMOLLM2)
    scores = LayerScores(
        query_heads=torch.tensor([5, 1, 9, 2, 8, 7, 3, 6, 4], dtype=torch.float64),
        kv_groups=torch.tensor([3, 1, 2], dtype=torch.float64),
        ffn_channels=torch.arange(1536, 0, -1, dtype=torch.float64),
    )
    plan = layer_plan(shape, 0, scores, 1, "query_head", 1024)
    assert plan.kept_query_heads == (0, 2, 4, 5, 7, 8)  # per group of 3, the lowest goes: heads 1, 3, 6
    assert plan.kept_ffn_channels == tuple(range(1024))  # the last channels have the lowest scores
    plan = layer_plan(shape, 0, scores, 2, "kv_group", 1536)
    assert plan.kept_kv_heads == (0,) and plan.kept_query_heads == (0, 1, 2)


def test_allocate_uniform_total_matches_plans():
    shape = block_shape(SMOLLM2)
    to_remove = round(0.3 * SMOLLM2_TOTAL)
    allocation = _allocate(shape, _random_scores(shape), to_remove, "uniform", "query_head", 8, 64)
    kept_total = SMOLLM2_TOTAL - allocation.removed_parameters
    assert kept_total <= 0.70 * SMOLLM2_TOTAL
    assert math.isclose(kept_total / SMOLLM2_TOTAL, 0.70, abs_tol=0.005)
    assert allocation.layer_sparsity == [allocation.layer_sparsity[0]] * 30


def test_widths_that_are_not_multiples_of_round_to():
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=102,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    shape = block_shape(config)
    for to_remove in (1, 3 * 64, 20 * 3 * 64, 60 * 3 * 64):
        steps, kept = solve_budget(
            shape, [to_remove / 4 / shape.linear_weight_count(shape.layers[0])] * 4, to_remove, "query_head", 8, 16
        )
        assert all(k == 102 or (k % 8 == 0 and 16 <= k < 102) for k in kept)
        removed = sum(
            steps[i] * 2 * shape.query_head_params() + (102 - kept[i]) * shape.ffn_channel_params() for i in range(4)
        )
        assert to_remove <= removed < to_remove + 8 * shape.ffn_channel_params() + 2 * shape.query_head_params()


@pytest.mark.parametrize("unit", ["query_head", "kv_group"])
@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_global_ranking_meets_the_budget_and_respects_minimums(unit, target):
    shape = block_shape(SMOLLM2)
    to_remove = round(target * SMOLLM2_TOTAL)
    allocation = _allocate(shape, _random_scores(shape, seed=3), to_remove, "global", unit, 8, 64)
    largest_step = max(shape.kv_group_params(0), 3 * shape.query_head_params())
    assert to_remove <= allocation.removed_parameters < to_remove + largest_step
    for plan in allocation.plans:
        assert len(plan.kept_ffn_channels) % 8 == 0 and len(plan.kept_ffn_channels) >= 64
        assert len(plan.kept_query_heads) % len(plan.kept_kv_heads) == 0


def test_global_ranking_takes_the_units_furthest_below_their_layer_first():
    shape = block_shape(SMOLLM2)
    scores = _random_scores(shape, seed=4)
    outliers = scores[7].ffn_channels.clone()
    outliers[torch.arange(0, 1536, 9)[:160]] = -100.0  # 160 channels far below the rest of their layer
    scores[7] = LayerScores(scores[7].query_heads, scores[7].kv_groups, outliers)
    to_remove = 20 * 8 * shape.ffn_channel_params()
    allocation = _allocate(shape, scores, to_remove, "global", "query_head", 8, 64)
    assert len(allocation.plans[7].kept_ffn_channels) == 1536 - 160
    assert not set(torch.arange(0, 1536, 9)[:160].tolist()) & set(allocation.plans[7].kept_ffn_channels)
    assert all(
        len(p.kept_ffn_channels) == 1536 and len(p.kept_query_heads) == 9
        for i, p in enumerate(allocation.plans)
        if i != 7
    )


@pytest.mark.parametrize("strategy", ["uniform", "global", "activation-density"])
def test_protected_layers_stay_whole(strategy):
    shape = block_shape(SMOLLM2)
    protected = frozenset({0, 1, 2, 3, 28, 29})
    to_remove = round(0.2 * SMOLLM2_TOTAL)
    hist = torch.stack(
        [log10_histogram(torch.rand(1000, generator=torch.Generator().manual_seed(i)) * (i + 1)) for i in range(30)]
    )
    stats = type(
        "Stats", (), {"get": lambda self, i, name: hist[i] if name == "log10_hist" else torch.ones(1), "tokens": 1}
    )()
    allocation = _allocate(
        shape,
        _random_scores(shape),
        to_remove,
        strategy,
        "query_head",
        8,
        64,
        stats,
        protected,
        gamma=0.1,
        gamma_mode="absolute",
    )
    assert allocation.removed_parameters >= to_remove
    for i, plan in enumerate(allocation.plans):
        whole = plan.widths == shape.layers[i]
        assert whole if i in protected else not whole
    with pytest.raises(ImpossibleTargetError, match="6 layers are protected"):
        _allocate(
            shape,
            _random_scores(shape),
            removable_parameters(shape, "query_head", 8, 64, protected) + 1,
            strategy,
            "query_head",
            8,
            64,
            stats,
            protected,
            gamma=0.1,
            gamma_mode="absolute",
        )
