"""Calibration domain (the paper's validation 2): does calibrating on task X keep more of X?

    python benchmarks/calibration_domain.py [--recipe recipes/smollm2_20pct.yaml] [--tasks piqa arc_easy]
        [--samples 64] [--limit 300] [--out runs/calibration_domain]

Prunes the base recipe's model to its target three times, with calibration text from each task and
from C4 (the recipe's source), and evaluates the dense and the pruned models on both tasks (zero-shot
``acc``, the first ``--limit`` items) and on WikiText-2 perplexity (the recipe's protocol). A task's
calibration text is its items after the first ``--limit`` (so no evaluated item is seen), each as its
prompt followed by the gold answer, joined into one running text (``<out>/<task>.txt``) from which the
usual random windows of ``calibration.seqlen`` tokens are drawn. Prints a markdown table and writes
``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.perplexity import perplexity
from eval.zeroshot import local_data_file, zeroshot_accuracy
from prune.calibration import evaluation_tokens
from prune.models import load_model
from prune.paths import data_dir
from prune.prepare import prepare
from prune.recipe import load_recipe
from prune.run import obtain_statistics, prune_as_recipe_says


def item_text(task: str, item: dict) -> str:
    """A task item as running text: its prompt and the gold answer."""
    if task == "winogrande":
        return f"{item['context_options'][item['gold']]} {item['continuation']}"
    return f"{item['query']} {item['choices'][item['gold']]}"


def write_calibration_text(task: str, skip: int, path: Path) -> int:
    """Write the task's items after the first ``skip`` as one text; returns the number of items used."""
    lines = local_data_file(task, data_dir()).read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()][skip:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(item_text(task, item) for item in items), encoding="utf-8")
    return len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/smollm2_20pct.yaml")
    parser.add_argument(
        "--tasks",
        nargs=2,
        default=["piqa", "arc_easy"],
        help="two local zero-shot tasks (short prompts keep the evaluation to minutes on a CPU)",
    )
    parser.add_argument("--samples", type=int, default=64, help="calibration samples per run")
    parser.add_argument("--limit", type=int, default=300, help="evaluated items per task")
    parser.add_argument("--out", type=Path, default=Path("runs/calibration_domain"))
    args = parser.parse_args()
    base = load_recipe(args.recipe, [f"calibration.samples={args.samples}"])
    base_prepared = prepare(base, overwrite=True)
    model, tokenizer = load_model(base_prepared.model_source, base.model.dtype, base.model.device, base_prepared.cache)
    ppl = base.evaluation.perplexity
    tokens = evaluation_tokens(tokenizer, base_prepared.evaluation_source)
    zs = base.evaluation.zeroshot

    def evaluate(m, name: str) -> dict:
        accuracy = zeroshot_accuracy(m, tokenizer, args.tasks, "local", args.limit, zs.batch_size, zs.seed)
        return {
            "perplexity": perplexity(m, tokens, ppl.seqlen, ppl.windows, name)["perplexity"],
            **{task: accuracy["tasks"][task]["acc"] for task in args.tasks},
        }

    results = {
        "recipe": args.recipe,
        "target": base.pruning.target,
        "samples": args.samples,
        "seqlen": base.calibration.seqlen,
        "limit": args.limit,
        "tasks": args.tasks,
        "rows": [{"calibration": "dense (not pruned)", **evaluate(model, "dense")}],
    }
    sources = {task: args.out / f"{task}.txt" for task in args.tasks}
    used = {task: write_calibration_text(task, args.limit, path) for task, path in sources.items()}
    for name, source in [
        (base.calibration.source, base.calibration.source),
        *((t, str(p)) for t, p in sources.items()),
    ]:
        recipe = load_recipe(args.recipe, [f"calibration.samples={args.samples}", f"calibration.source={source}"])
        prepared = prepare(recipe, overwrite=True)
        statistics, _ = obtain_statistics(prepared, model, tokenizer)
        pruned, _ = prune_as_recipe_says(recipe, model, prepared.params_to_remove, statistics, {})
        row = {"calibration": name, "items": used.get(name), **evaluate(pruned, name)}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    a, b = args.tasks
    print(
        f"\n{base.model.source}, {base.pruning.target:.0%} of parameters removed ({args.recipe}); calibration "
        f"{args.samples} x {base.calibration.seqlen} tokens; zero-shot acc on the first {args.limit} items; "
        f"WikiText-2 perplexity {ppl.seqlen} x {ppl.windows}.\n"
    )
    print(f"| calibration | {a} acc | {b} acc | WikiText-2 ppl |")
    print("|---|---:|---:|---:|")
    for row in results["rows"]:
        print(f"| {row['calibration']} | {100 * row[a]:.2f} | {100 * row[b]:.2f} | {row['perplexity']:.2f} |")


if __name__ == "__main__":
    main()
