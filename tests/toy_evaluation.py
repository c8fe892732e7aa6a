"""A toy evaluation stage, for the test that a new evaluation is one module and one registry entry: the p-norm of
all the models' weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eval.stages.base import DenseInputs, EvaluationInputs, EvaluationStage, ratio_text
from prune.schema import above, ruled


@dataclass
class WeightNormSettings:
    enabled: bool = True
    power: int = ruled(above(0), 2)
    """p of the p-norm."""


@dataclass
class WeightNormReport:
    power: int
    dense: float
    pruned: float


def weight_norm(model: torch.nn.Module, power: int) -> float:
    return float(sum(p.detach().double().abs().pow(power).sum() for p in model.parameters()) ** (1 / power))


def dense_norm(inputs: DenseInputs) -> tuple[dict, str | None]:
    power = inputs.context.recipe.evaluation.weight_norm.power
    return inputs.context.cached_dense(
        inputs.dense, "weight_norm", {"power": power}, lambda: {"norm": weight_norm(inputs.dense, power)}
    )


def evaluate(inputs: EvaluationInputs) -> WeightNormReport:
    power = inputs.settings.weight_norm.power
    dense, _ = inputs.dense_part(STAGE)
    return WeightNormReport(power, dense["norm"], weight_norm(inputs.pruned, power))


def headline(section: WeightNormReport, report) -> list[str]:
    return [
        f"| weight {section.power}-norm | {section.dense:.3f} | {section.pruned:.3f} | "
        f"{ratio_text(section.pruned, section.dense)} |"
    ]


def markdown(section: WeightNormReport, report) -> list[str]:
    return ["## Weight norm", "", f"The {section.power}-norm of every weight, dense and pruned.", ""]


STAGE = EvaluationStage(
    name="weight_norm",
    label="weight norm",
    settings=WeightNormSettings,
    section=WeightNormReport,
    run=evaluate,
    enabled=lambda recipe: recipe.evaluation.weight_norm.enabled,
    dense=dense_norm,
    headline=headline,
    markdown=markdown,
)
