"""Importance of every structural unit (query head, KV group, FFN channel) of every layer.

A scorer assigns a score to each weight of the 7 linears of a block; a unit's score aggregates the
scores of its weights (``sum``, ``mean`` or ``max``). Scorers:

- ``activation``: mean over calibration samples of A = |w * dD/dw| (the paper's metric; statistics pass);
- ``wanda-sp``: |W_ij| * ||X_j||_2, X the input of that linear over the calibration tokens (FLAP's structured Wanda);
- ``magnitude``: w^2, and the unit's score is the L2 norm of its weights (sqrt of the sum; ``aggregate`` ignored).

A KV group's weights are its k/v rows plus all weights of its query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prune.blocks import LINEAR_NAMES, BlockShape, decoder_layers, layer_linears
from prune.statistics import INPUT_SITE_OF_LINEAR, ActivationStatistics, row_col_reductions


@dataclass
class LayerScores:
    """Unit scores of one layer (float64, CPU): higher = more important."""

    query_heads: torch.Tensor  # [n_query_heads]
    kv_groups: torch.Tensor  # [n_kv_heads]: k/v rows plus the group's query heads
    ffn_channels: torch.Tensor  # [ffn_channels]


def _aggregate(sums: torch.Tensor, maxima: torch.Tensor, count: int, aggregate: str) -> torch.Tensor:
    if aggregate == "sum":
        return sums
    if aggregate == "mean":
        return sums / count
    return maxima


def units_from_reductions(reductions: dict[str, dict[str, torch.Tensor]], shape: BlockShape, layer: int,
                          aggregate: str) -> LayerScores:
    """Aggregate per-linear row/column reductions of a weight score into unit scores.

    ``reductions[linear]`` holds ``row_sum``, ``row_max`` [out] and ``col_sum``, ``col_max`` [in].
    """
    widths, d, h = shape.layers[layer], shape.head_dim, shape.hidden_size
    g = widths.heads_per_group

    def heads(values: torch.Tensor) -> torch.Tensor:
        return values.double().view(-1, d)  # [n_heads, head_dim]

    r = reductions
    q_sum = heads(r["q_proj"]["row_sum"]).sum(1) + heads(r["o_proj"]["col_sum"]).sum(1)
    q_max = torch.maximum(heads(r["q_proj"]["row_max"]).amax(1), heads(r["o_proj"]["col_max"]).amax(1))
    kv_sum = heads(r["k_proj"]["row_sum"]).sum(1) + heads(r["v_proj"]["row_sum"]).sum(1)
    kv_max = torch.maximum(heads(r["k_proj"]["row_max"]).amax(1), heads(r["v_proj"]["row_max"]).amax(1))
    group_sum = kv_sum + q_sum.view(-1, g).sum(1)
    group_max = torch.maximum(kv_max, q_max.view(-1, g).amax(1))
    ffn_sum = r["gate_proj"]["row_sum"].double() + r["up_proj"]["row_sum"].double() + r["down_proj"]["col_sum"].double()
    ffn_max = torch.maximum(torch.maximum(r["gate_proj"]["row_max"], r["up_proj"]["row_max"]), r["down_proj"]["col_max"]).double()
    return LayerScores(
        query_heads=_aggregate(q_sum, q_max, 2 * d * h, aggregate),
        kv_groups=_aggregate(group_sum, group_max, (2 + 2 * g) * d * h, aggregate),
        ffn_channels=_aggregate(ffn_sum, ffn_max, 3 * h, aggregate),
    )


def weight_scores(model, method: str, statistics: ActivationStatistics | None, layer: int) -> dict[str, dict[str, torch.Tensor]]:
    """Row/column reductions of the per-weight score of ``method`` for each linear of one layer."""
    if method == "activation":
        return {name: {k: statistics.get(layer, f"{name}.{k}") for k in ("row_sum", "row_max", "col_sum", "col_max")}
                for name in LINEAR_NAMES}
    linears = layer_linears(decoder_layers(model)[layer])
    if method == "magnitude":
        return {name: row_col_reductions(linear.weight.detach().double().square()) for name, linear in linears.items()}
    if method == "wanda-sp":
        result = {}
        for name, linear in linears.items():
            input_norm = statistics.get(layer, f"{INPUT_SITE_OF_LINEAR[name]}.x_sumsq").sqrt().to(linear.weight.device)
            result[name] = row_col_reductions(linear.weight.detach().double().abs() * input_norm.double())
        return result
    raise ValueError(f"unknown scoring method {method!r}")


def score_units(model, shape: BlockShape, method: str, aggregate: str,
                statistics: ActivationStatistics | None) -> list[LayerScores]:
    """Unit scores of every layer for a scoring method (``activation`` and ``wanda-sp`` need statistics)."""
    scores = []
    for layer in range(shape.num_layers):
        layer_scores = units_from_reductions(weight_scores(model, method, statistics, layer), shape, layer,
                                             "sum" if method == "magnitude" else aggregate)
        if method == "magnitude":
            layer_scores = LayerScores(*(t.sqrt() for t in (layer_scores.query_heads, layer_scores.kv_groups,
                                                            layer_scores.ffn_channels)))
        scores.append(layer_scores)
    return scores
