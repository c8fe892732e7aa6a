"""Print zero-shot results of several models side by side as a markdown table (for BENCHMARKS.md).

    python -m eval.zeroshot smollm2-135m --json dense.json
    python -m eval.zeroshot runs/smollm2_30pct/model --json pruned.json
    python benchmarks/zeroshot_table.py "dense=dense.json" "default 30%=pruned.json"

Each argument is LABEL=FILE, FILE a ``--json`` output of ``python -m eval.zeroshot``. One row per task
(acc ± its standard error, in percent), then the mean acc over the seven tasks pruning papers report and
each model's mean as a percentage of the first model's. Every number comes from the files; nothing is
typed in by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from eval.zeroshot import percent


def _items(result: dict) -> dict[str, int]:
    """{task: items scored} of one eval.zeroshot result."""
    return {task: metrics["items"] for task, metrics in result["tasks"].items()}


def zeroshot_table(results: dict[str, dict]) -> str:
    """The markdown table of ``results`` ({label: eval.zeroshot result}), the first label the reference.

    Raises ValueError when the results differ in their tasks or item counts (they would not compare).
    """
    labels = list(results)
    first = results[labels[0]]
    for label in labels[1:]:
        if _items(results[label]) != _items(first):
            raise ValueError(f"{label}: other tasks or item counts than {labels[0]}")
    lines = [
        "| task | items | " + " | ".join(f"{label} acc" for label in labels) + " |",
        "|---|---:|" + "---:|" * len(labels),
    ]
    for task, metrics in first["tasks"].items():
        cells = [
            percent(results[label]["tasks"][task]["acc"], results[label]["tasks"][task]["acc_stderr"])
            for label in labels
        ]
        lines.append(f"| {task} | {metrics['items']} | " + " | ".join(cells) + " |")
    if first["mean"] is not None:
        cells = [percent(results[label]["mean"], results[label]["mean_stderr"]) for label in labels]
        lines.append(f"| mean acc ({len(first['mean_tasks'])} tasks) | | " + " | ".join(cells) + " |")
        cells = [f"{100 * results[label]['mean'] / first['mean']:.1f}%" for label in labels]
        lines.append(f"| mean, % of {labels[0]} | | " + " | ".join(cells) + " |")
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
    print(zeroshot_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
