"""The resume point of a run: the pruned model and every stage finished after it, kept until the run is done.

A run stages its output (``prune/paths.py``), so a stage that fails must not throw away the work before it.
Once the pruned (and recovered) model exists, it is saved with what the report needs of the stages that made it
(statistics, scoring, allocation, pruning, recovery) into ``<cache>/resume/<key>/``; every export and evaluation
after it is kept there as it finishes. A stage that fails then ends the run with one line naming it
(:class:`prune.cli.StageFailure`, its traceback in ``failure.txt``), and a rerun of the same recipe with the
same output continues from the resume point: it loads the pruned model instead of pruning again and reuses
every evaluation whose settings are unchanged. The output links the kept files (hard links: no byte is
written twice), and the resume point is removed once the output is complete.

Layout of a resume point::

    model/                          the pruned checkpoint (prune/checkpoint.py)
    activation_stats.safetensors    the statistics the output carries (when the recipe collects any)
    recovery_log.jsonl              the recovery's log (with recovery)
    resume.json                     PrunedState and the files' sizes, checksummed
    evaluations/<section>.json      a finished evaluation: its settings, report section, notes and seconds
    failure.txt                     the traceback of the last failed stage
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from eval.report import AllocationReport, LayerReport, MethodReport, RecoveryReport, StatisticsReport
from eval.stages.base import EvaluationStage
from prune.checkpoint import save_checkpoint
from prune.cli import StageFailure, timed
from prune.models import resolve_device, resolve_dtype
from prune.paths import DamagedCacheError, read_checked_json, recomputing, write_checked_json
from prune.prepare import Prepared
from prune.recipe import recipe_to_dict
from prune.schema import SchemaError, convert, from_mapping, to_mapping

RESUME_VERSION = 1
"""Format of ``resume.json`` and of the kept evaluations; bump when either changes meaning."""
STATE_FILE = "resume.json"
OUTPUT_FILES = ("activation_stats.safetensors", "recovery_log.jsonl")
"""Files of a resume point that the output carries as they are (the checkpoint goes through the hf exporter)."""


@dataclass
class PrunedState:
    """What the report needs of the stages up to the pruned model."""

    method: MethodReport
    layers: list[LayerReport]
    allocation: AllocationReport
    statistics: StatisticsReport | None
    recovery: RecoveryReport | None
    before_recovery: float | None
    """Perplexity of the pruned model before recovery (None without recovery)."""
    notes: list[str]
    stage_seconds: dict[str, float]
    """Seconds of the stages up to the pruned model, as the attempt that ran them measured them."""


def resume_directory(prepared: Prepared) -> Path:
    """``<cache>/resume/<key>``: the resume point of this recipe and output, keyed by everything the pruned model
    depends on (the recipe but its exports and evaluations, the files it reads, the resolved device and dtype)."""
    recipe = recipe_to_dict(prepared.recipe)
    for section in ("cache_dir", "export", "evaluation"):
        recipe.pop(section)
    recovers = prepared.recovery_source is not None
    device = resolve_device(prepared.recipe.model.device)
    key = {
        "version": RESUME_VERSION,
        "recipe": recipe,
        "output": str(prepared.output.resolve()),
        "device": device.type,
        "dtype": str(resolve_dtype(prepared.recipe.model.dtype, device)),
        "model": prepared.model_source.fingerprint(),
        "calibration": prepared.calibration_source.fingerprint(),
        # recovery measures its curve on the perplexity text
        "recovery": prepared.recovery_source.fingerprint() if prepared.recovery_source else None,
        "perplexity": recipe_to_dict(prepared.recipe)["evaluation"]["perplexity"] if recovers else None,
        "evaluation": prepared.evaluation_source.fingerprint() if recovers else None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return prepared.cache / "resume" / digest


def _kept_files(directory: Path) -> dict[str, int]:
    """Bytes of every file of a resume point that the state vouches for (not the state, evaluations, failure)."""
    skipped = {STATE_FILE, "failure.txt"}
    return {
        str(f.relative_to(directory)): f.stat().st_size
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.name not in skipped and f.relative_to(directory).parts[0] != "evaluations"
    }


def save_resume_point(directory: Path, pruned: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, state: PrunedState):
    """Save the pruned checkpoint and ``state`` into ``directory`` (being staged), the state last."""
    save_checkpoint(pruned, tokenizer, directory / "model")
    write_checked_json(
        directory / STATE_FILE, {"state": to_mapping(state), "files": _kept_files(directory)}, RESUME_VERSION
    )


def read_resume_point(directory: Path) -> PrunedState | None:
    """The state of the resume point in ``directory`` when it is whole (its state readable, its files of the sizes
    it recorded); None when there is none. A damaged one is removed, with a warning."""
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    try:
        stored = read_checked_json(path, RESUME_VERSION)
        state = from_mapping(PrunedState, stored["state"], "resume")
        if _kept_files(directory) != stored["files"]:
            raise DamagedCacheError("its files are not those it recorded")
    except (DamagedCacheError, SchemaError, KeyError, TypeError) as error:
        recomputing(directory, error if isinstance(error, DamagedCacheError) else DamagedCacheError(str(error)))
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return state


@contextmanager
def kept_on_failure(stage: str, directory: Path) -> Iterator[None]:
    """Turn a failure of ``stage``, run after the resume point in ``directory`` was saved, into one line
    (:class:`StageFailure`) that names the stage and where the finished work is; the traceback goes to
    ``failure.txt`` there."""
    try:
        yield
    except Exception as error:
        (directory / "failure.txt").write_text("".join(traceback.format_exception(error)))
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise StageFailure(
            f"{stage} failed ({type(error).__name__}: {reason}); the pruned model and the stages before are kept in "
            f"{directory} (traceback in failure.txt there): run the same command again to continue from them"
        ) from error


def kept_evaluation(
    directory: Path,
    stage: EvaluationStage,
    settings: Any,
    notes: list[str],
    stage_seconds: dict[str, float],
    run: Callable[[], Any],
) -> Any:
    """The report section of the evaluation ``stage``: kept from an earlier attempt when it ran with the same
    ``settings`` (its notes and seconds restored), else ``run()``, timed into ``stage_seconds`` and kept. ``run``
    may append to ``notes``."""
    name, section = stage.label, stage.name
    path = directory / "evaluations" / f"{section}.json"
    hint = stage.section | None
    if path.is_file():
        try:
            stored = read_checked_json(path, RESUME_VERSION)
            if stored["settings"] == settings:
                print(f"[{name}] kept from an earlier attempt", file=sys.stderr)
                notes.extend(stored["notes"])
                stage_seconds[name] = stored["seconds"]
                return convert(stored["section"], hint, section)
        except (DamagedCacheError, SchemaError, KeyError, TypeError) as error:
            recomputing(path, error if isinstance(error, DamagedCacheError) else DamagedCacheError(str(error)))
    before = len(notes)
    with kept_on_failure(name, directory), timed(stage_seconds, name):
        result = run()
    kept = {
        "settings": settings,
        "section": None if result is None else to_mapping(result),
        "notes": notes[before:],
        "seconds": stage_seconds[name],
    }
    write_checked_json(path, kept, RESUME_VERSION)
    return result
