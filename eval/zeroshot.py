"""Zero-shot accuracy through lm-eval-harness (docs/METHOD.md §4).

The in-memory model is wrapped in lm-eval's ``HFLM`` and evaluated with ``lm_eval.simple_evaluate``
(no reloading from disk). Task names are lm-eval's. Two sources of task definitions:

- ``local``: the definitions shipped in ``eval/tasks/*.yaml`` (lm-eval YAML, ``dataset_path: json``),
  reading ``zeroshot/*.jsonl`` from the data directory ($PRUNE_DATA_DIR). Each choice is scored as
  the continuation of the query, joined by a space unless it starts with punctuation; ``acc_norm``
  divides a choice's log-likelihood by its length in characters, the joining space included.
- ``harness``: lm-eval's own registered tasks (their datasets come from the Hugging Face Hub).

``auto`` takes ``local`` when the data directory holds the task's file, else ``harness``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
from pathlib import Path

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prune.calibration import DataSourceError
from prune.paths import data_dir
from prune.placement import input_device

TASK_DIR = Path(__file__).parent / "tasks"
MEAN_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
"""The seven tasks pruning papers report; the mean of their ``acc`` is the headline."""
LOCAL_TASKS = (*MEAN_TASKS, "social_iqa")
"""lm-eval task names with a shipped local definition (``eval/tasks``): the seven above and SIQA, reported beside."""
MEAN_METRIC = "acc"
Z95 = 1.959963984540054
"""The normal distribution's two-sided 95% quantile: a 95% interval is the estimate ± Z95 standard errors."""


def _function_loader(module) -> type[yaml.SafeLoader]:
    """A YAML loader that resolves ``!function local_tasks.NAME`` to ``module.NAME``."""

    class Loader(yaml.SafeLoader):
        pass

    def function(loader, node):
        name = loader.construct_scalar(node)
        prefix = "local_tasks."
        if not name.startswith(prefix):
            raise ValueError(f"unexpected !function {name!r} in a local task definition")
        return getattr(module, name.removeprefix(prefix))

    Loader.add_constructor("!function", function)
    return Loader


def local_data_file(task: str, data: Path) -> Path:
    """The data file a shipped local task reads."""
    text = (TASK_DIR / f"{task}.yaml").read_text().replace("!function", "")
    return data / yaml.safe_load(text)["dataset_kwargs"]["data_files"]["test"]


def local_task_config(task: str, data: Path) -> dict:
    """The lm-eval configuration of a shipped local task, its data file made absolute.

    Raises DataSourceError when the data directory lacks the task's file.
    """
    from eval.tasks import local_tasks

    path = TASK_DIR / f"{task}.yaml"
    config = yaml.load(path.read_text(), Loader=_function_loader(local_tasks))
    path = local_data_file(task, data)
    if not path.is_file():
        raise DataSourceError(f"evaluation.zeroshot.tasks: {task}: data file not found: {path}")
    config["dataset_kwargs"]["data_files"]["test"] = str(path)
    return config


def local_task_configs(tasks: list[str]) -> list[dict]:
    """:func:`local_task_config` of every task over $PRUNE_DATA_DIR; DataSourceError if it or a file is missing."""
    data = data_dir()
    if data is None:
        raise DataSourceError("evaluation.zeroshot.source: local needs the data directory ($PRUNE_DATA_DIR)")
    return [local_task_config(task, data) for task in tasks]


def resolve_source(tasks: list[str], source: str) -> str:
    """``local`` or ``harness`` for the requested ``source`` (``auto``, ``local`` or ``harness``)."""
    if source != "auto":
        return source
    data = data_dir()
    if data is None:
        return "harness"
    return "local" if all(local_data_file(t, data).is_file() for t in tasks) else "harness"


def zeroshot_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    source: str = "auto",
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    log_samples: bool = False,
) -> dict:
    """Accuracy of ``model`` on lm-eval tasks.

    Returns ``{"source", "data_dir", "limit", "seed", "tasks": {task: {"acc", "acc_stderr", "acc_norm"?,
    "acc_norm_stderr"?, "items"}}, "mean_metric", "mean_tasks", "mean", "mean_stderr", "per_item"}``
    (accuracies as fractions in [0, 1]; a standard error is lm-eval's, sqrt(p (1 - p) / (n - 1)) over the n
    items; ``mean`` is the mean of ``acc`` over the MEAN_TASKS that were evaluated, None if none were, and its
    standard error that of a mean of independent estimates, sqrt(sum of squared standard errors) / tasks;
    ``per_item``: {task: :func:`item_results`}, which :func:`accuracy_changes` pairs with another model's) and,
    with ``log_samples``, ``"samples"``: lm-eval's per-item records by task.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    used = resolve_source(tasks, source)
    specs = local_task_configs(tasks) if used == "local" else list(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=specs,
        limit=limit,
        log_samples=True,
        bootstrap_iters=1000,  # acc and acc_norm are means: lm-eval takes their closed-form standard error
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    per_task = {}
    for task in tasks:
        metrics = output["results"][task]
        per_task[task] = {
            name: metrics[f"{name},none"]
            for name in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
            if f"{name},none" in metrics
        }
        per_task[task]["items"] = output["n-samples"][task]["effective"]
    in_mean = [t for t in MEAN_TASKS if t in per_task]
    result = {
        "source": used,
        "data_dir": str(data_dir()) if used == "local" else None,
        "limit": limit,
        "seed": seed,
        "tasks": per_task,
        "mean_metric": MEAN_METRIC,
        "mean_tasks": in_mean,
        "mean": statistics.mean(per_task[t][MEAN_METRIC] for t in in_mean) if in_mean else None,
        "mean_stderr": math.sqrt(sum(per_task[t][f"{MEAN_METRIC}_stderr"] ** 2 for t in in_mean)) / len(in_mean)
        if in_mean
        else None,
        "per_item": {task: item_results(output["samples"][task]) for task in tasks},
    }
    if log_samples:
        result["samples"] = output["samples"]
    return result


def item_results(samples: list[dict]) -> dict[str, list[int]]:
    """One task's items from lm-eval's logged samples, in item order: ``{"doc_id", "acc", "choices"}``, lists
    of the item's index in the task, 1 if ``acc`` scored it right else 0, and its number of choices (the
    requests lm-eval scored for it: one per answer, or per context option for WinoGrande)."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    return {
        "doc_id": [sample["doc_id"] for sample in ordered],
        "acc": [int(sample[MEAN_METRIC]) for sample in ordered],
        "choices": [len(sample["arguments"]) for sample in ordered],
    }


def paired_change(dense: dict[str, list[int]], pruned: dict[str, list[int]], task: str) -> dict:
    """Pruned minus dense ``acc`` of one task over the same items (:func:`item_results` of each):
    ``{"difference", "stderr", "interval95", "chance"}``, fractions of 1. The standard error is that of a mean
    of paired differences, sd(pruned_i - dense_i) / sqrt(n) (None for one item); ``chance`` is the expected acc
    of a uniform guess, the mean of 1 / choices. ValueError when the two did not score the same items."""
    if dense["doc_id"] != pruned["doc_id"]:
        raise ValueError(f"zero-shot {task}: the dense and the pruned model were scored on different items")
    differences = [p - d for d, p in zip(dense["acc"], pruned["acc"], strict=True)]
    n = len(differences)
    stderr = statistics.stdev(differences) / math.sqrt(n) if n > 1 else None
    return {
        "difference": statistics.mean(differences),
        "stderr": stderr,
        "interval95": None if stderr is None else Z95 * stderr,
        "chance": statistics.mean(1 / count for count in dense["choices"]),
    }


def accuracy_changes(dense: dict, pruned: dict) -> tuple[dict[str, dict], dict | None]:
    """Paired changes (:func:`paired_change`) of two :func:`zeroshot_accuracy` results on the same items: by
    task, and of the mean over their ``mean_tasks`` (the mean of the tasks' differences, its standard error
    sqrt(sum of the tasks' squared standard errors) / tasks, its chance the mean of theirs; None without
    tasks of the mean)."""
    changes = {task: paired_change(dense["per_item"][task], pruned["per_item"][task], task) for task in dense["tasks"]}
    in_mean = [changes[task] for task in dense["mean_tasks"]]
    if not in_mean:
        return changes, None
    errors = [change["stderr"] for change in in_mean]
    stderr = None if None in errors else math.sqrt(sum(e**2 for e in errors)) / len(in_mean)
    mean = {
        "difference": statistics.mean(change["difference"] for change in in_mean),
        "stderr": stderr,
        "interval95": None if stderr is None else Z95 * stderr,
        "chance": statistics.mean(change["chance"] for change in in_mean),
    }
    return changes, mean


def percent(value: float, stderr: float | None, digits: int = 2) -> str:
    """An accuracy in [0, 1] in percent with its standard error when known: "41.57 ± 0.52"."""
    return f"{100 * value:.{digits}f}" + ("" if stderr is None else f" ± {100 * stderr:.{digits}f}")


def main(argv: list[str] | None = None) -> int:
    from prune.cli import ArgumentParser, positive_int, run_command
    from prune.models import ModelSourceError, load_model, resolve_model_source
    from prune.paths import atomic_write_text, cache_dir

    parser = ArgumentParser(
        prog="python -m eval.zeroshot", description="Zero-shot accuracy of one model through lm-eval-harness."
    )
    parser.add_argument(
        "model", help="model source: smollm2-135m, a checkpoint directory (pruned ones too), a .gguf file or a hub id"
    )
    parser.add_argument("--tasks", nargs="+", default=list(LOCAL_TASKS))
    parser.add_argument("--source", default="auto", choices=["auto", "local", "harness"])
    parser.add_argument("--limit", type=positive_int, default=None, help="items per task (default: all)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        help="requests per forward pass (default 16); memory grows with batch x longest request x vocabulary "
        "(log-probabilities over the whole vocabulary at every position): 64 ran out of 24 GiB on SmolLM2's "
        "full task sets in float32",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the result (JSON) here")
    args = parser.parse_args(argv)

    def evaluate() -> str:
        unknown = [t for t in args.tasks if t not in LOCAL_TASKS]
        if unknown and args.source != "harness":
            raise DataSourceError(f"--tasks: {', '.join(unknown)} not among the local tasks; use --source harness")
        if args.json and not args.json.parent.is_dir():
            raise DataSourceError(f"--json: the directory {args.json.parent} does not exist")
        cache = cache_dir(None)
        model, tokenizer = load_model(resolve_model_source(args.model, cache), args.dtype, args.device, cache)
        result = zeroshot_accuracy(model, tokenizer, args.tasks, args.source, args.limit, args.batch_size, args.seed)
        if args.json:
            atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"{args.model}: {result['source']} tasks, limit {args.limit}")
        print("| task | items | acc ± standard error | acc_norm ± standard error |\n|---|---:|---:|---:|")
        for task, metrics in result["tasks"].items():
            norm = percent(metrics["acc_norm"], metrics["acc_norm_stderr"]) if "acc_norm" in metrics else "-"
            print(f"| {task} | {metrics['items']} | {percent(metrics['acc'], metrics['acc_stderr'])} | {norm} |")
        if result["mean"] is not None:
            mean = percent(result["mean"], result["mean_stderr"])
            print(f"| mean {result['mean_metric']} ({len(result['mean_tasks'])} tasks) | | {mean} | |")
        return "done"

    return run_command(evaluate, (ModelSourceError, DataSourceError))


if __name__ == "__main__":
    sys.exit(main())
