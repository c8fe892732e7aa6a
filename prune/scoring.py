"""Importance of every structural unit (query head, KV group, FFN channel) of every layer.

A scorer assigns a score to each weight of the 7 linears of a block; a unit's score aggregates the
scores of its weights (``sum``, ``mean`` or ``max``). Scorers:

- ``activation``: mean over calibration samples of A = |w * dD/dw| (the paper's metric; statistics pass);
- ``taylor``: LLM-Pruner's first-order Taylor score |w * sum_s dNLL(s)/dw| (statistics pass with
  ``taylor``; objective ``nll``);
- ``wanda-sp``: |W_ij| * ||X_j||_2, X the input of that linear over the calibration tokens (FLAP's structured Wanda);
- ``magnitude``: w^2, and the unit's score is the L2 norm of its weights (sqrt of the sum; ``aggregate`` ignored);
- ``flap``: FLAP's fluctuation Var_tokens(X_j) * ||W[:, j]||^2 of each input column j of o_proj /
  down_proj (X from the statistics pass), aggregated over the unit's columns; FLAP itself pairs it with
  ``allocation.strategy: global`` and ``pruning.reconstruct: bias``.

Scorers of whole units (``aggregate`` ignored):

- ``obs``: the mean squared output error of o_proj / down_proj when the unit's input columns are removed
  and the other columns are refit by least squares (what ``pruning.reconstruct: lstsq`` does), from the
  input second moment of the statistics pass (Optimal Brain Surgeon for a group of columns;
  :func:`prune.reconstruct.removal_errors`);
- ``activation-obs``: the product of ``activation`` and ``obs``, each divided by its mean over the
  layer's units of the same kind: a unit goes first when it is both little activated and cheap to
  reconstruct without.

A KV group's weights are its k/v rows plus all weights of its query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prune.blocks import LINEAR_NAMES, BlockShape, decoder_layers, layer_linears
from prune.reconstruct import removal_errors, second_moment
from prune.statistics import INPUT_SITE_OF_LINEAR, ActivationStatistics, row_col_reductions

NEEDS_COVARIANCES = ("obs", "activation-obs")


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


def units_from_reductions(
    reductions: dict[str, dict[str, torch.Tensor]], shape: BlockShape, layer: int, aggregate: str
) -> LayerScores:
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
    ffn_max = torch.maximum(
        torch.maximum(r["gate_proj"]["row_max"], r["up_proj"]["row_max"]), r["down_proj"]["col_max"]
    ).double()
    return LayerScores(
        query_heads=_aggregate(q_sum, q_max, 2 * d * h, aggregate),
        kv_groups=_aggregate(group_sum, group_max, (2 + 2 * g) * d * h, aggregate),
        ffn_channels=_aggregate(ffn_sum, ffn_max, 3 * h, aggregate),
    )


def weight_scores(
    model, method: str, statistics: ActivationStatistics | None, layer: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Row/column reductions of the per-weight score of ``method`` for each linear of one layer."""
    if method in ("activation", "taylor"):
        prefix = "taylor_" if method == "taylor" else ""
        return {
            name: {
                k: statistics.get(layer, f"{name}.{prefix}{k}") for k in ("row_sum", "row_max", "col_sum", "col_max")
            }
            for name in LINEAR_NAMES
        }
    linears = layer_linears(decoder_layers(model)[layer])
    if method == "magnitude":
        return {name: row_col_reductions(linear.weight.detach().double().square()) for name, linear in linears.items()}
    if method == "flap":
        reductions = {}
        for name, linear in linears.items():
            if name in ("o_proj", "down_proj"):
                site = INPUT_SITE_OF_LINEAR[name]
                mean = statistics.get(layer, f"{site}.x_sum").double() / statistics.tokens
                variance = (
                    statistics.get(layer, f"{site}.x_sumsq").double() / statistics.tokens - mean.square()
                ).clamp_min(0)
                fluctuation = variance * linear.weight.detach().double().square().sum(0).cpu()
                reductions[name] = {"col_sum": fluctuation, "col_max": fluctuation}
            else:
                zeros_in, zeros_out = (
                    torch.zeros(linear.in_features, dtype=torch.float64),
                    torch.zeros(linear.out_features, dtype=torch.float64),
                )
                reductions[name] = {
                    "row_sum": zeros_out,
                    "row_max": zeros_out,
                    "col_sum": zeros_in,
                    "col_max": zeros_in,
                }
        return reductions
    if method == "wanda-sp":
        result = {}
        for name, linear in linears.items():
            input_norm = statistics.get(layer, f"{INPUT_SITE_OF_LINEAR[name]}.x_sumsq").sqrt().to(linear.weight.device)
            result[name] = row_col_reductions(linear.weight.detach().double().abs() * input_norm.double())
        return result
    raise ValueError(f"unknown scoring method {method!r}")


def reconstruction_error_scores(
    model, shape: BlockShape, statistics: ActivationStatistics, layer: int, damping: float
) -> LayerScores:
    """``obs`` scores of one layer: output error of o_proj (query heads, KV groups) and down_proj (FFN channels)."""
    widths, d = shape.layers[layer], shape.head_dim
    g = widths.heads_per_group
    layer_module = decoder_layers(model)[layer]

    def errors(linear, site: str, groups: torch.Tensor) -> torch.Tensor:
        second = second_moment(
            statistics.get(layer, f"{site}.xxt"), statistics.get(layer, f"{site}.x_sum"), statistics.tokens
        )
        return removal_errors(linear.weight, second, groups, damping)

    o_proj, down_proj = layer_module.self_attn.o_proj, layer_module.mlp.down_proj
    head_columns = torch.arange(widths.query_heads * d).view(widths.query_heads, d)
    return LayerScores(
        query_heads=errors(o_proj, "o_in", head_columns),
        kv_groups=errors(o_proj, "o_in", head_columns.view(widths.kv_heads, g * d)),
        ffn_channels=errors(down_proj, "down_in", torch.arange(widths.ffn_channels)[:, None]),
    )


def _relative(values: torch.Tensor) -> torch.Tensor:
    return values / values.mean()


def score_units(
    model, shape: BlockShape, method: str, aggregate: str, statistics: ActivationStatistics | None, damping: float = 0.0
) -> list[LayerScores]:
    """Unit scores of every layer for a scoring method.

    ``activation`` and ``wanda-sp`` need statistics; ``obs`` and ``activation-obs`` need statistics with
    covariances and use ``damping`` (relative, as ``pruning.damping``).
    """
    return [
        _layer_scores(model, shape, method, aggregate, statistics, damping, layer) for layer in range(shape.num_layers)
    ]


def _layer_scores(
    model,
    shape: BlockShape,
    method: str,
    aggregate: str,
    statistics: ActivationStatistics | None,
    damping: float,
    layer: int,
) -> LayerScores:
    if method == "obs":
        return reconstruction_error_scores(model, shape, statistics, layer, damping)
    if method == "activation-obs":
        errors = reconstruction_error_scores(model, shape, statistics, layer, damping)
        activation = units_from_reductions(
            weight_scores(model, "activation", statistics, layer), shape, layer, aggregate
        )
        return LayerScores(
            *(
                _relative(getattr(activation, name)) * _relative(getattr(errors, name))
                for name in ("query_heads", "kv_groups", "ffn_channels")
            )
        )
    if method == "magnitude":
        squares = units_from_reductions(weight_scores(model, method, statistics, layer), shape, layer, "sum")
        return LayerScores(squares.query_heads.sqrt(), squares.kv_groups.sqrt(), squares.ffn_channels.sqrt())
    return units_from_reductions(weight_scores(model, method, statistics, layer), shape, layer, aggregate)
