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

A KV group's weights are its k/v rows plus all weights of its query heads. In a mixture-of-experts layer an
expert's FFN channels are scored like a dense MLP's (its rows of gate/up, its column of down); scorers that
read the inputs of gate/up/down (``wanda-sp``, ``flap``, ``obs``, ``activation-obs``) do not score experts,
whose inputs are the tokens routed to them (:func:`scores_experts`).

Every scorer is one entry of :data:`SCORERS`: a function that scores one layer's units and the
statistics it needs (:class:`prune.statistics.Statistic`). Adding a scorer is one function and one
entry; the recipe's allowed names and the statistics pass follow from the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from prune.blocks import LINEAR_NAMES, BlockShape, decoder_layers, layer_linears, split_fused_projections
from prune.placement import resident
from prune.reconstruct import removal_errors, second_moment
from prune.statistics import (
    INPUT_SITE_OF_LINEAR,
    INPUT_SITES,
    ActivationStatistics,
    Statistic,
    StatisticsError,
    row_col_reductions,
)


@dataclass
class LayerScores:
    """Unit scores of one layer (float64, CPU): higher = more important."""

    query_heads: torch.Tensor  # [n_query_heads]
    kv_groups: torch.Tensor  # [n_kv_heads]: k/v rows plus the group's query heads
    ffn_channels: torch.Tensor  # [ffn_channels], or [experts * channels] (expert-major) in a mixture-of-experts layer


@dataclass(frozen=True)
class ScoringInputs:
    """What a scorer may read: the dense model, its shape, the statistics and the recipe's settings."""

    model: nn.Module
    shape: BlockShape
    statistics: ActivationStatistics | None
    aggregate: str
    """``sum``, ``mean`` or ``max``: how per-weight scores combine into a unit's score."""
    damping: float
    """Relative ridge term of the least-squares refit (``pruning.damping``)."""


@dataclass(frozen=True)
class Scorer:
    """A scoring method: scores the units of one layer, from what it declares it needs."""

    score_layer: Callable[[ScoringInputs, int], LayerScores]
    needs: frozenset[Statistic]
    """What the statistics pass must collect for it."""
    objective: str | None = None
    """The objective D it requires (``scoring.objective``), or None when any will do."""


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
    ffn_sum, ffn_max = ffn_sum.flatten(), ffn_max.flatten()  # experts' [experts, channels]: channel e * channels + c
    return LayerScores(
        query_heads=_aggregate(q_sum, q_max, 2 * d * h, aggregate),
        kv_groups=_aggregate(group_sum, group_max, (2 + 2 * g) * d * h, aggregate),
        ffn_channels=_aggregate(ffn_sum, ffn_max, 3 * h, aggregate),
    )


def reconstruction_error_scores(
    model: PreTrainedModel, shape: BlockShape, statistics: ActivationStatistics, layer: int, damping: float
) -> LayerScores:
    """``obs`` scores of one layer: output error of o_proj (query heads, KV groups) and down_proj (FFN channels)."""
    widths, d = shape.layers[layer], shape.head_dim
    g = widths.heads_per_group
    layer_module = decoder_layers(model)[layer]

    def errors(linear, site: str, groups: torch.Tensor) -> torch.Tensor:
        x_sum = statistics.get(layer, f"{site}.x_sum")
        # on the weights' device (a model on a GPU solves there, not on the host's cores); passed without
        # a name, so that removal_errors holds the only reference and frees it once factorised
        try:
            return removal_errors(
                linear.weight,
                second_moment(statistics.get(layer, f"{site}.xxt"), x_sum, statistics.tokens, linear.weight.device),
                groups,
                damping,
            )
        except torch.linalg.LinAlgError:  # fewer calibration tokens than features, and too little damping
            raise StatisticsError(
                f"scoring: the second moment of layer {layer}'s {INPUT_SITES[site]} input ({len(x_sum):,} features, "
                f"from {statistics.tokens:,} calibration tokens) is not positive definite with pruning.damping "
                f"{damping:g}: raise pruning.damping or calibration.samples"
            ) from None

    linears = layer_linears(layer_module)
    o_proj, down_proj = linears["o_proj"], linears["down_proj"]
    head_columns = torch.arange(widths.query_heads * d).view(widths.query_heads, d)
    return LayerScores(
        query_heads=errors(o_proj, "o_in", head_columns),
        kv_groups=errors(o_proj, "o_in", head_columns.view(widths.kv_heads, g * d)),
        ffn_channels=errors(down_proj, "down_in", torch.arange(widths.ffn_channels)[:, None]),
    )


def _relative(values: torch.Tensor) -> torch.Tensor:
    return values / values.mean()


def gradient_reductions(statistics: ActivationStatistics, layer: int, prefix: str = "") -> dict:
    """The statistics pass's row/column reductions of one layer's linears (``taylor_`` prefix: Taylor term)."""
    names = ("row_sum", "row_max", "col_sum", "col_max")
    return {name: {k: statistics.get(layer, f"{name}.{prefix}{k}") for k in names} for name in LINEAR_NAMES}


def activation_scores(inputs: ScoringInputs, layer: int) -> LayerScores:
    """The paper's metric: mean over samples of |w * dD/dw|, aggregated over the unit's weights."""
    assert inputs.statistics is not None
    return units_from_reductions(gradient_reductions(inputs.statistics, layer), inputs.shape, layer, inputs.aggregate)


def taylor_scores(inputs: ScoringInputs, layer: int) -> LayerScores:
    """LLM-Pruner's first-order Taylor score |w * sum_s dNLL(s)/dw|, aggregated over the unit's weights."""
    assert inputs.statistics is not None
    reductions = gradient_reductions(inputs.statistics, layer, prefix="taylor_")
    return units_from_reductions(reductions, inputs.shape, layer, inputs.aggregate)


def magnitude_scores(inputs: ScoringInputs, layer: int) -> LayerScores:
    """L2 norm of the unit's weights (``aggregate`` ignored)."""
    linears = layer_linears(decoder_layers(inputs.model)[layer])
    reductions = {
        name: row_col_reductions(linear.weight.detach().double().square()) for name, linear in linears.items()
    }
    squares = units_from_reductions(reductions, inputs.shape, layer, "sum")
    return LayerScores(squares.query_heads.sqrt(), squares.kv_groups.sqrt(), squares.ffn_channels.sqrt())


def wanda_scores(inputs: ScoringInputs, layer: int) -> LayerScores:
    """Structured Wanda: |W_ij| * ||X_j||_2 over the unit's weights, X the input of that linear."""
    assert inputs.statistics is not None
    reductions = {}
    for name, linear in layer_linears(decoder_layers(inputs.model)[layer]).items():
        input_norm = inputs.statistics.get(layer, f"{INPUT_SITE_OF_LINEAR[name]}.x_sumsq").sqrt()
        weighted = linear.weight.detach().double().abs() * input_norm.to(linear.weight.device).double()
        reductions[name] = row_col_reductions(weighted)
    return units_from_reductions(reductions, inputs.shape, layer, inputs.aggregate)


def flap_scores(inputs: ScoringInputs, layer: int) -> LayerScores:
    """FLAP's fluctuation Var_tokens(X_j) * ||W[:, j]||^2 of the o_proj / down_proj input columns j."""
    statistics = inputs.statistics
    assert statistics is not None
    reductions = {}
    for name, linear in layer_linears(decoder_layers(inputs.model)[layer]).items():
        if name in ("o_proj", "down_proj"):
            site = INPUT_SITE_OF_LINEAR[name]
            mean = statistics.get(layer, f"{site}.x_sum").double() / statistics.tokens
            mean_square = statistics.get(layer, f"{site}.x_sumsq").double() / statistics.tokens
            variance = (mean_square - mean.square()).clamp_min(0)
            fluctuation = variance * linear.weight.detach().double().square().sum(0).cpu()
            reductions[name] = {"col_sum": fluctuation, "col_max": fluctuation}
        else:
            zeros_in = torch.zeros(linear.in_features, dtype=torch.float64)
            zeros_out = torch.zeros(linear.out_features, dtype=torch.float64)
            reductions[name] = {"row_sum": zeros_out, "row_max": zeros_out, "col_sum": zeros_in, "col_max": zeros_in}
    return units_from_reductions(reductions, inputs.shape, layer, inputs.aggregate)


def obs_scores(inputs: ScoringInputs, layer: int) -> LayerScores:
    """Output error of o_proj / down_proj when the unit's columns go and the rest is refit (``aggregate`` ignored)."""
    assert inputs.statistics is not None
    return reconstruction_error_scores(inputs.model, inputs.shape, inputs.statistics, layer, inputs.damping)


def activation_obs_scores(inputs: ScoringInputs, layer: int) -> LayerScores:
    """``activation`` / its layer mean times ``obs`` / its layer mean, per unit kind."""
    activation, errors = activation_scores(inputs, layer), obs_scores(inputs, layer)
    return LayerScores(
        *(
            _relative(getattr(activation, name)) * _relative(getattr(errors, name))
            for name in ("query_heads", "kv_groups", "ffn_channels")
        )
    )


def scores_experts(scorer: Scorer) -> bool:
    """Whether the scorer scores the FFN channels of experts: it does not read the inputs of the projections."""
    return not scorer.needs & {Statistic.INPUT_SUMS, Statistic.SECOND_MOMENTS}


GRADIENT_PRODUCTS, SUMMED_GRADIENTS = Statistic.GRADIENT_PRODUCTS, Statistic.SUMMED_GRADIENTS
INPUT_SUMS, SECOND_MOMENTS = Statistic.INPUT_SUMS, Statistic.SECOND_MOMENTS
SCORERS: dict[str, Scorer] = {
    "activation": Scorer(activation_scores, frozenset({GRADIENT_PRODUCTS})),
    "activation-obs": Scorer(activation_obs_scores, frozenset({GRADIENT_PRODUCTS, INPUT_SUMS, SECOND_MOMENTS})),
    "obs": Scorer(obs_scores, frozenset({INPUT_SUMS, SECOND_MOMENTS})),
    "magnitude": Scorer(magnitude_scores, frozenset()),
    "wanda-sp": Scorer(wanda_scores, frozenset({INPUT_SUMS})),
    "flap": Scorer(flap_scores, frozenset({INPUT_SUMS})),
    "taylor": Scorer(taylor_scores, frozenset({SUMMED_GRADIENTS}), objective="nll"),
}
"""Scoring methods by recipe name (``scoring.method``)."""


def score_units(
    model: nn.Module,
    shape: BlockShape,
    method: str,
    aggregate: str,
    statistics: ActivationStatistics | None,
    damping: float = 0.0,
) -> list[LayerScores]:
    """Unit scores of every layer by the scorer ``method`` of :data:`SCORERS`.

    ``statistics`` must provide what the scorer needs (None for scorers that need nothing).
    """
    scorer = SCORERS[method]
    missing = scorer.needs - (statistics.provides if statistics is not None else frozenset())
    if missing:
        raise ValueError(f"scorer {method!r} needs {', '.join(sorted(m.value for m in missing))} from the statistics")
    split_fused_projections(model)  # Phi-3's fused projections as their linears: the same outputs
    inputs = ScoringInputs(model, shape, statistics, aggregate, damping)
    scores = []
    for index, layer in enumerate(tqdm(decoder_layers(model), desc=f"scoring ({method})", unit="layer")):
        with resident(layer.modules()):  # its offloaded weights loaded once (device_map)
            scores.append(scorer.score_layer(inputs, index))
    return scores
