"""Print zero-shot results of several models side by side as a markdown table (for BENCHMARKS.md).

    python -m eval.zeroshot smollm2-135m --json dense.json
    python -m eval.zeroshot runs/smollm2_30pct/model --json pruned.json
    python benchmarks/zeroshot_table.py "dense=dense.json" "default 30%=pruned.json"

Each argument is LABEL=FILE, FILE a ``--json`` output of ``python -m eval.zeroshot``. One row per task
(acc ± its standard error, in percent), then the mean acc over the seven tasks pruning papers report and
each model's mean as a percentage of the first model's. Results over the local task files (``source:
local``) also get a ``chance`` column, the expected acc of a uniform guess among each item's choices
(read from the files the results name, ``$PRUNE_DATA_DIR`` expanded), and a last row with each model's
mean margin over chance as a percentage of the first model's: for a small model near chance, the share
of the mean says little. Every number comes from the files; nothing is typed in by hand.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

from eval.zeroshot import local_data_file, percent


def _items(result: dict) -> dict[str, int]:
    """{task: items scored} of one eval.zeroshot result."""
    return {task: metrics["items"] for task, metrics in result["tasks"].items()}


def chance_accuracy(task: str, items: int, data: Path) -> float:
    """Expected acc in [0, 1] of a uniform guess over the first ``items`` items of a local task's file in
    ``data``: the mean of 1 / choices (WinoGrande: 1 / context options)."""
    with local_data_file(task, data).open() as lines:
        choices = [
            len(item.get("choices") or item["context_options"])
            for item in map(json.loads, itertools.islice(lines, items))
        ]
    return sum(1 / count for count in choices) / len(choices)


def _row(cells: list[str]) -> str:
    """One markdown table row; an empty cell is written ``| |``."""
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def zeroshot_table(results: dict[str, dict]) -> str:
    """The markdown table of ``results`` ({label: eval.zeroshot result}), the first label the reference.

    Raises ValueError when the results differ in their tasks or item counts (they would not compare), and
    FileNotFoundError when local results' task files are not where they say.
    """
    labels = list(results)
    first = results[labels[0]]
    for label in labels[1:]:
        if _items(results[label]) != _items(first):
            raise ValueError(f"{label}: other tasks or item counts than {labels[0]}")
    chance: dict[str, float] = {}  # {task: acc of a uniform guess}, empty when not over local task files
    if first["source"] == "local":
        data = Path(os.path.expandvars(first["data_dir"]))
        chance = {task: chance_accuracy(task, items, data) for task, items in _items(first).items()}

    def row(name: str, items: str, chance_cell: str, cells: list[str]) -> str:
        return _row([name, items, *([chance_cell] if chance else []), *cells])

    lines = [
        row("task", "items", "chance", [f"{label} acc" for label in labels]),
        "|---|---:|" + "---:|" * (len(labels) + bool(chance)),
    ]
    for task, metrics in first["tasks"].items():
        cells = [
            percent(results[label]["tasks"][task]["acc"], results[label]["tasks"][task]["acc_stderr"])
            for label in labels
        ]
        lines.append(row(task, str(metrics["items"]), percent(chance[task], None) if chance else "", cells))
    if first["mean"] is None:
        return "\n".join(lines)
    mean_tasks = first["mean_tasks"]
    chance_mean = sum(chance[task] for task in mean_tasks) / len(mean_tasks) if chance else 0.0
    cells = [percent(results[label]["mean"], results[label]["mean_stderr"]) for label in labels]
    lines.append(row(f"mean acc ({len(mean_tasks)} tasks)", "", percent(chance_mean, None), cells))
    cells = [f"{100 * results[label]['mean'] / first['mean']:.1f}%" for label in labels]
    lines.append(row(f"mean, % of {labels[0]}", "", "", cells))
    if chance:
        margin = first["mean"] - chance_mean
        cells = [f"{100 * (results[label]['mean'] - chance_mean) / margin:.1f}%" for label in labels]
        lines.append(row(f"mean above chance, % of {labels[0]}'s", "", "", cells))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    results = {}
    for argument in argv:
        label, separator, path = argument.partition("=")
        if not separator or not label or not path:
            print(f"error: {argument!r}: expected LABEL=FILE", file=sys.stderr)
            return 2
        results[label] = json.loads(Path(path).read_text())
    if not results:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(zeroshot_table(results))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
