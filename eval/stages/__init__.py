"""The evaluation stages of a run, in the order they run (:data:`EVALUATIONS`), and the recipe's ``evaluation:``
mapping built from them (:class:`EvaluationSettings`).

A new evaluation is one module (its settings, its report section, how it measures, its part of report.md: see
``eval/stages/base.py``) and one entry here.
"""

from __future__ import annotations

from typing import Any

from eval.stages import engine, perplexity, speed, zeroshot
from eval.stages.base import DenseInputs, EvaluationStage
from prune.cli import timed
from prune.schema import SchemaError, check_known_keys, from_mapping, json_schema

EVALUATIONS: dict[str, EvaluationStage] = {
    stage.name: stage for stage in (perplexity.STAGE, zeroshot.STAGE, speed.STAGE, engine.STAGE)
}
"""Evaluation stages by name, in the order they run."""


class EvaluationSettings(dict[str, Any]):
    """The recipe's ``evaluation:`` mapping: each stage's settings (its ``settings`` dataclass) by the stage's name,
    read as ``recipe.evaluation.zeroshot`` too; a stage the recipe leaves out has its defaults."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def defaults(cls) -> EvaluationSettings:
        return cls({name: stage.settings() for name, stage in EVALUATIONS.items()})

    @classmethod
    def from_mapping(cls, data: Any, key: str) -> EvaluationSettings:
        """From a recipe's ``evaluation:`` mapping (``key`` its dotted path); SchemaError names a key at fault."""
        if not isinstance(data, dict):
            raise SchemaError(f"{key}: expected a mapping of keys, got {data!r}"[:200])
        check_known_keys(data, list(EVALUATIONS), key)
        return cls(
            {
                name: from_mapping(stage.settings, data.get(name, {}), f"{key}.{name}")
                for name, stage in EVALUATIONS.items()
            }
        )

    @classmethod
    def json_schema(cls) -> dict:
        properties = {name: json_schema(stage.settings, top=False) for name, stage in EVALUATIONS.items()}
        return {"type": "object", "properties": properties, "additionalProperties": False}


def dense_first(inputs: DenseInputs, stage_seconds: dict[str, float]) -> dict[str, Any]:
    """The dense part of every enabled stage, computed now (before pruning in place), by stage name; each announced
    on stderr and its time added to ``stage_seconds`` under ``<label> (dense)``."""
    parts = {}
    for stage in EVALUATIONS.values():
        if stage.dense is not None and stage.enabled(inputs.context.recipe):
            with timed(stage_seconds, f"{stage.label} (dense)"):
                parts[stage.name] = stage.dense(inputs)
    return parts
