"""Unit scores against loops over the units' weights."""

import torch

from conftest import random_tokens, tiny_model
from prune.blocks import block_shape, decoder_layers
from prune.scoring import score_units
from prune.statistics import collect_statistics


def _unit_weights(layer, d, g):
    """Per unit, the list of (weight tensor, input-site name) pieces that belong to it."""
    attn, mlp = layer.self_attn, layer.mlp
    heads = attn.q_proj.weight.shape[0] // d
    query = [[(attn.q_proj.weight[h * d:(h + 1) * d], "attn_in", None),
              (attn.o_proj.weight[:, h * d:(h + 1) * d], "o_in", slice(h * d, (h + 1) * d))] for h in range(heads)]
    groups = []
    for j in range(heads // g):
        pieces = [(attn.k_proj.weight[j * d:(j + 1) * d], "attn_in", None), (attn.v_proj.weight[j * d:(j + 1) * d], "attn_in", None)]
        for h in range(j * g, (j + 1) * g):
            pieces += query[h]
        groups.append(pieces)
    channels = [[(mlp.gate_proj.weight[c:c + 1], "mlp_in", None), (mlp.up_proj.weight[c:c + 1], "mlp_in", None),
                 (mlp.down_proj.weight[:, c:c + 1], "down_in", slice(c, c + 1))] for c in range(mlp.down_proj.weight.shape[1])]
    return query, groups, channels


def test_magnitude_and_wanda_sp_match_loops():
    model = tiny_model()
    shape = block_shape(model.config)
    stats = collect_statistics(model, random_tokens(2, 8), "max_logit", progress=False)
    magnitude = score_units(model, shape, "magnitude", "sum", None)
    wanda = score_units(model, shape, "wanda-sp", "sum", stats)
    for i, layer in enumerate(decoder_layers(model)):
        query, groups, channels = _unit_weights(layer, shape.head_dim, 3)

        def norm(pieces):
            return sum(float(w.detach().double().square().sum()) for w, _, _ in pieces) ** 0.5

        def wanda_sum(pieces):
            total = 0.0
            for w, site, cols in pieces:
                x_norm = stats.get(i, f"{site}.x_sumsq").double().sqrt()
                x_norm = x_norm[cols] if cols is not None else x_norm
                total += float((w.detach().double().abs() * x_norm).sum())
            return total

        for unit_scores, units in ((magnitude[i].query_heads, query), (magnitude[i].kv_groups, groups),
                                   (magnitude[i].ffn_channels, channels)):
            torch.testing.assert_close(unit_scores, torch.tensor([norm(u) for u in units], dtype=torch.float64), rtol=1e-5, atol=0)
        for unit_scores, units in ((wanda[i].query_heads, query), (wanda[i].kv_groups, groups),
                                   (wanda[i].ffn_channels, channels)):
            torch.testing.assert_close(unit_scores, torch.tensor([wanda_sum(u) for u in units], dtype=torch.float64), rtol=1e-5, atol=0)


def test_activation_aggregates_are_consistent():
    model = tiny_model()
    shape = block_shape(model.config)
    stats = collect_statistics(model, random_tokens(2, 8), "max_logit", progress=False)
    total = score_units(model, shape, "activation", "sum", stats)
    mean = score_units(model, shape, "activation", "mean", stats)
    peak = score_units(model, shape, "activation", "max", stats)
    d, h = shape.head_dim, shape.hidden_size
    for i in range(3):
        torch.testing.assert_close(mean[i].ffn_channels, total[i].ffn_channels / (3 * h))
        torch.testing.assert_close(mean[i].kv_groups, total[i].kv_groups / ((2 + 2 * 3) * d * h))
        assert (peak[i].ffn_channels <= total[i].ffn_channels).all() and (peak[i].ffn_channels > 0).all()
        # a group's score includes its query heads
        assert torch.allclose(total[i].kv_groups - total[i].query_heads.view(2, 3).sum(1),
                              (stats.get(i, "k_proj.row_sum").double() + stats.get(i, "v_proj.row_sum").double()).view(2, -1).sum(1))
