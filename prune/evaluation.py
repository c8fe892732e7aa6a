"""The run's side of the evaluation stages (``eval/stages/``): what it lends them (:func:`run_context`), the cache
of the dense model's results (``<cache>/dense_evaluation/``, keyed by model file, dtype, device and the stage's
settings, so that only the first run of a model pays for them) and of its GGUF files (``<cache>/gguf/``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from eval.stages.base import RunContext
from prune.export import gguf_tokenizer_source
from prune.gguf_export import GGUF_EXPORT_VERSION, write_gguf
from prune.models import ModelSourceError, check_gguf
from prune.paths import DamagedCacheError, read_checked_json, recomputing, write_checked_json
from prune.placement import input_device

if TYPE_CHECKING:
    from prune.prepare import Prepared

DENSE_EVALUATION_VERSION = 2
"""Part of the key of cached dense-model evaluations; bump when evaluation code changes its numbers."""


def cached_dense_evaluation(
    prepared: Prepared, model: nn.Module, name: str, settings: dict, compute: Callable[[], dict]
) -> tuple[dict, str | None]:
    """The dense model's result of one evaluation: from the cache when this model file, dtype, device and
    ``settings`` were evaluated before, else ``compute()`` (then cached). Returns it and the cache path
    it was reused from (None when computed).
    """
    parameter = next(model.parameters())
    key = json.dumps(
        {
            "version": DENSE_EVALUATION_VERSION,
            "model": prepared.model_source.fingerprint(),
            "dtype": str(parameter.dtype),
            "device": input_device(model).type,
            "name": name,
            "settings": settings,
        },
        sort_keys=True,
    )
    path = prepared.cache / "dense_evaluation" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        try:
            return read_checked_json(path, DENSE_EVALUATION_VERSION), str(path)
        except DamagedCacheError as error:
            recomputing(path, error)
    result = compute()
    write_checked_json(path, result, DENSE_EVALUATION_VERSION)
    return result, None


def dense_gguf(prepared: Prepared, dense: nn.Module, tokenizer: Any, tensor_type: str) -> Path:
    """The dense model as a GGUF file of ``tensor_type``, exported once into ``<cache>/gguf/`` (keyed by the model
    file, its dtype and the export's version) for like-for-like comparisons in the engine."""
    key = json.dumps(
        {
            "version": GGUF_EXPORT_VERSION,
            "model": prepared.model_source.fingerprint(),
            "dtype": str(next(dense.parameters()).dtype),
        },
        sort_keys=True,
    )
    path = prepared.cache / "gguf" / f"dense-{hashlib.sha256(key.encode()).hexdigest()[:16]}-{tensor_type}.gguf"
    if path.is_file():
        try:
            check_gguf(path)
            return path
        except ModelSourceError as error:
            recomputing(path, DamagedCacheError(str(error).removeprefix("model.source: ")))
    source = prepared.model_source
    write_gguf(dense, tokenizer, path, tensor_type, gguf_tokenizer_source(source), Path(source.location).stem)
    return path


def run_context(prepared: Prepared, tokenizer: Any, text: torch.Tensor) -> RunContext:
    """What the run lends its evaluation stages: the recipe, the tokenizer, the perplexity text [n_tokens] and the
    caches of the dense model's results and GGUF files."""
    return RunContext(
        recipe=prepared.recipe,
        tokenizer=tokenizer,
        text=text,
        text_identity=prepared.evaluation_source.fingerprint(),
        cached_dense=lambda model, name, settings, compute: cached_dense_evaluation(
            prepared, model, name, settings, compute
        ),
        dense_gguf=lambda model, tensor_type: dense_gguf(prepared, model, tokenizer, tensor_type),
    )
