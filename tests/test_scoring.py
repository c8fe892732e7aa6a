"""Unit scores against loops over the units' weights."""

import copy

import pytest
import torch
from conftest import ALL_STATISTICS, BASIC_STATISTICS, random_tokens, tiny_model

from prune import reconstruct
from prune.blocks import block_shape, decoder_layers
from prune.reconstruct import removal_errors, second_moment
from prune.scoring import score_units
from prune.statistics import StatisticsError, collect_statistics


def _unit_weights(layer, d, g):
    """Per unit, the list of (weight tensor, input-site name) pieces that belong to it. A fused ``qkv_proj`` /
    ``gate_up_proj`` (Phi-3) is cut here by hand: q rows, then k rows, then v rows; gate rows, then up rows."""
    attn, mlp = layer.self_attn, layer.mlp
    heads = attn.o_proj.weight.shape[1] // d
    if hasattr(attn, "qkv_proj"):
        kv_rows = (attn.qkv_proj.weight.shape[0] - heads * d) // 2
        q_weight, k_weight, v_weight = attn.qkv_proj.weight.split([heads * d, kv_rows, kv_rows])
        gate_weight, up_weight = mlp.gate_up_proj.weight.chunk(2)
    else:
        q_weight, k_weight, v_weight = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
        gate_weight, up_weight = mlp.gate_proj.weight, mlp.up_proj.weight
    query = [
        [
            (q_weight[h * d : (h + 1) * d], "attn_in", None),
            (attn.o_proj.weight[:, h * d : (h + 1) * d], "o_in", slice(h * d, (h + 1) * d)),
        ]
        for h in range(heads)
    ]
    groups = []
    for j in range(heads // g):
        pieces = [
            (k_weight[j * d : (j + 1) * d], "attn_in", None),
            (v_weight[j * d : (j + 1) * d], "attn_in", None),
        ]
        for h in range(j * g, (j + 1) * g):
            pieces += query[h]
        groups.append(pieces)
    channels = [
        [
            (gate_weight[c : c + 1], "mlp_in", None),
            (up_weight[c : c + 1], "mlp_in", None),
            (mlp.down_proj.weight[:, c : c + 1], "down_in", slice(c, c + 1)),
        ]
        for c in range(mlp.down_proj.weight.shape[1])
    ]
    return query, groups, channels


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_magnitude_and_wanda_sp_match_loops(family):
    model = tiny_model(family)
    fused = copy.deepcopy(model)  # Phi-3: the reference reads the fused weights (the scorers split a model first)
    shape = block_shape(model.config)
    stats = collect_statistics(model, random_tokens(2, 8), "max_logit", BASIC_STATISTICS, progress=False)
    magnitude = score_units(model, shape, "magnitude", "sum", None)
    wanda = score_units(model, shape, "wanda-sp", "sum", stats)
    for i, layer in enumerate(decoder_layers(fused)):
        query, groups, channels = _unit_weights(layer, shape.head_dim, 3)

        def norm(pieces):
            return sum(float(w.detach().double().square().sum()) for w, _, _ in pieces) ** 0.5

        def wanda_sum(pieces, i=i):
            total = 0.0
            for w, site, cols in pieces:
                x_norm = stats.get(i, f"{site}.x_sumsq").double().sqrt()
                x_norm = x_norm[cols] if cols is not None else x_norm
                total += float((w.detach().double().abs() * x_norm).sum())
            return total

        for unit_scores, units in (
            (magnitude[i].query_heads, query),
            (magnitude[i].kv_groups, groups),
            (magnitude[i].ffn_channels, channels),
        ):
            torch.testing.assert_close(
                unit_scores, torch.tensor([norm(u) for u in units], dtype=torch.float64), rtol=1e-5, atol=0
            )
        for unit_scores, units in (
            (wanda[i].query_heads, query),
            (wanda[i].kv_groups, groups),
            (wanda[i].ffn_channels, channels),
        ):
            torch.testing.assert_close(
                unit_scores, torch.tensor([wanda_sum(u) for u in units], dtype=torch.float64), rtol=1e-5, atol=0
            )


def test_activation_aggregates_are_consistent():
    model = tiny_model()
    shape = block_shape(model.config)
    stats = collect_statistics(model, random_tokens(2, 8), "max_logit", BASIC_STATISTICS, progress=False)
    total = score_units(model, shape, "activation", "sum", stats)
    mean = score_units(model, shape, "activation", "mean", stats)
    peak = score_units(model, shape, "activation", "max", stats)
    d, h = shape.head_dim, shape.hidden_size
    for i in range(3):
        torch.testing.assert_close(mean[i].ffn_channels, total[i].ffn_channels / (3 * h))
        torch.testing.assert_close(mean[i].kv_groups, total[i].kv_groups / ((2 + 2 * 3) * d * h))
        assert (peak[i].ffn_channels <= total[i].ffn_channels).all() and (peak[i].ffn_channels > 0).all()
        # a group's score includes its query heads
        assert torch.allclose(
            total[i].kv_groups - total[i].query_heads.view(2, 3).sum(1),
            (stats.get(i, "k_proj.row_sum").double() + stats.get(i, "v_proj.row_sum").double()).view(2, -1).sum(1),
        )


def _refit_error(weight: torch.Tensor, second: torch.Tensor, removed: list[int], damping: float) -> float:
    """Mean squared output error after refitting every other column and the bias under the damped second moment."""
    features = weight.shape[1]
    damped = second.clone()
    damped[range(features), range(features)] += damping * float(second.diagonal()[:features].mean())
    full = torch.cat([weight.double(), torch.zeros(weight.shape[0], 1, dtype=torch.float64)], 1)
    kept = [c for c in range(features + 1) if c not in removed]
    refit = torch.zeros_like(full)
    refit[:, kept] = full @ damped[:, kept] @ torch.linalg.inv(damped[kept][:, kept])
    difference = full - refit
    return float(torch.trace(difference @ damped @ difference.T))


def test_obs_scores_equal_the_error_of_an_explicit_refit():
    model = tiny_model()
    shape = block_shape(model.config)
    stats = collect_statistics(model, random_tokens(3, 16), "max_logit", ALL_STATISTICS, progress=False)
    damping = 0.01
    obs = score_units(model, shape, "obs", "sum", stats, damping)
    d = shape.head_dim
    for i, layer in enumerate(decoder_layers(model)):

        def second(site, i=i):
            return second_moment(stats.get(i, f"{site}.xxt"), stats.get(i, f"{site}.x_sum"), stats.tokens)

        o_weight, down_weight = layer.self_attn.o_proj.weight.detach(), layer.mlp.down_proj.weight.detach()
        heads = [list(range(h * d, (h + 1) * d)) for h in range(o_weight.shape[1] // d)]
        expected_heads = [_refit_error(o_weight, second("o_in"), cols, damping) for cols in heads]
        expected_groups = [
            _refit_error(o_weight, second("o_in"), heads[3 * j] + heads[3 * j + 1] + heads[3 * j + 2], damping)
            for j in range(len(heads) // 3)
        ]
        expected_channels = [
            _refit_error(down_weight, second("down_in"), [c], damping) for c in range(down_weight.shape[1])
        ]
        torch.testing.assert_close(
            obs[i].query_heads, torch.tensor(expected_heads, dtype=torch.float64), rtol=1e-6, atol=1e-12
        )
        torch.testing.assert_close(
            obs[i].kv_groups, torch.tensor(expected_groups, dtype=torch.float64), rtol=1e-6, atol=1e-12
        )
        torch.testing.assert_close(
            obs[i].ffn_channels, torch.tensor(expected_channels, dtype=torch.float64), rtol=1e-6, atol=1e-12
        )
        assert float(obs[i].ffn_channels.min()) > 0


def test_a_second_moment_that_is_not_positive_definite_stops_scoring_in_one_line():
    model = tiny_model()
    shape = block_shape(model.config)
    stats = collect_statistics(model, random_tokens(3, 16), "max_logit", ALL_STATISTICS, progress=False)
    stats.tensors["layers.1.down_in.xxt"][5, 5] = -1.0  # as float32 rounding can leave a rank-deficient sum
    with pytest.raises(StatisticsError) as error:
        score_units(model, shape, "obs", "sum", stats, 1e-4)
    features = model.config.intermediate_size
    assert str(error.value) == (
        f"scoring: the second moment of layer 1's down_proj input ({features} features, from 48 calibration "
        "tokens) is not positive definite with pruning.damping 0.0001: raise pruning.damping or calibration.samples"
    )


def test_activation_obs_is_the_product_of_relative_scores():
    model = tiny_model()
    shape = block_shape(model.config)
    stats = collect_statistics(model, random_tokens(3, 16), "max_logit", ALL_STATISTICS, progress=False)
    activation = score_units(model, shape, "activation", "mean", stats)
    obs = score_units(model, shape, "obs", "mean", stats, 0.01)
    combined = score_units(model, shape, "activation-obs", "mean", stats, 0.01)
    for a, e, c in zip(activation, obs, combined, strict=True):
        for name in ("query_heads", "kv_groups", "ffn_channels"):
            x, y = getattr(a, name), getattr(e, name)
            torch.testing.assert_close(getattr(c, name), (x / x.mean()) * (y / y.mean()))


def test_flap_scores_match_a_loop_over_columns():
    model = tiny_model()
    shape = block_shape(model.config)
    stats = collect_statistics(model, random_tokens(2, 8), "max_logit", BASIC_STATISTICS, progress=False)
    flap = score_units(model, shape, "flap", "sum", stats)
    d, n = shape.head_dim, stats.tokens
    for i, layer in enumerate(decoder_layers(model)):

        def fluctuation(site, weight, column, i=i):
            mean = float(stats.get(i, f"{site}.x_sum")[column]) / n
            variance = float(stats.get(i, f"{site}.x_sumsq")[column]) / n - mean * mean
            return variance * float(weight[:, column].double().square().sum())

        o_weight, down_weight = layer.self_attn.o_proj.weight.detach(), layer.mlp.down_proj.weight.detach()
        heads = [sum(fluctuation("o_in", o_weight, c) for c in range(h * d, (h + 1) * d)) for h in range(6)]
        channels = [fluctuation("down_in", down_weight, c) for c in range(down_weight.shape[1])]
        torch.testing.assert_close(flap[i].query_heads, torch.tensor(heads, dtype=torch.float64), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(
            flap[i].kv_groups,
            torch.tensor([sum(heads[3 * j : 3 * j + 3]) for j in range(2)], dtype=torch.float64),
            rtol=1e-4,
            atol=1e-9,
        )
        torch.testing.assert_close(
            flap[i].ffn_channels, torch.tensor(channels, dtype=torch.float64), rtol=1e-4, atol=1e-9
        )


def test_removal_errors_in_chunks_of_unordered_columns_equal_an_explicit_refit(monkeypatch):
    monkeypatch.setattr(reconstruct, "GROUP_COLUMNS", 4)  # several chunks, each solved from its first column on
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 8, generator=generator, dtype=torch.float64) + 0.3
    augmented = torch.cat([inputs, torch.ones(64, 1, dtype=torch.float64)], 1)
    weight = torch.randn(5, 8, generator=generator)
    damping = 0.01
    for groups in ([[5, 2], [0, 7], [3, 4], [6, 1]], [[c] for c in (7, 0, 3, 5, 1, 6, 2, 4)]):
        second = augmented.T @ augmented / 64
        errors = removal_errors(weight, second.clone(), torch.tensor(groups), damping)
        expected = [_refit_error(weight, second, group, damping) for group in groups]
        torch.testing.assert_close(errors, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)
