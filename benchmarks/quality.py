"""Quality at equal size: every scorer / allocation / reconstruction in one harness on one model.

    python benchmarks/quality.py [--recipe recipes/smollm2_30pct.yaml] [--targets 0.2 0.3 0.5]
                                 [--only NAME ...] [--variant "NAME: key=value ..."] [--zeroshot]
                                 [--jsonl runs/quality.jsonl]
    python benchmarks/quality.py --table runs/quality.jsonl [more.jsonl ...]

Each row is the base recipe with the overrides in ``CONFIGURATIONS`` and ``pruning.target`` set; the
model, the calibration data (the base recipe's), the statistics cache and the perplexity protocol are
shared, and the dense perplexity is measured once (``--set pruning.rounds=3``: every row pruned in three
rounds). Each ``--variant`` is a row of its own, the base recipe with its overrides (with ``--variant`` and no
``--only``, only the variants run): settings are compared so on held-in text (``--set
evaluation.perplexity.dataset=runs/heldin.txt``, from ``benchmarks/heldin_text.py``). ``--zeroshot`` adds the
mean ``acc`` of the seven tasks (the base recipe's zero-shot settings: source, limit, batch size, seed).
Appends one JSON line per row to ``--jsonl`` as soon as the row is done, and prints the markdown table (for
BENCHMARKS.md) at the end; ``--table`` prints that table from JSON-lines files without running anything.
Under the table: the memory of the first statistics pass of the process (a later pass reuses memory freed
before it, so the RSS peak of a later pass on CPU says nothing about what that pass needs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from eval.perplexity import perplexity
from eval.zeroshot import MEAN_TASKS, resolve_source, zeroshot_accuracy
from prune.blocks import count_parameters
from prune.calibration import evaluation_tokens
from prune.models import load_model
from prune.prepare import prepare
from prune.recipe import load_recipe
from prune.run import obtain_statistics, prune_as_recipe_says, recipe_calibration

GRADIENT_METHODS = ("activation", "activation-obs", "taylor")
LLM_PRUNER_ROW = "taylor (LLM-Pruner)"
CONFIGURATIONS = {
    # baselines (docs/METHOD.md §3)
    "magnitude": {"scoring.method": "magnitude", "allocation.strategy": "uniform", "pruning.reconstruct": "none"},
    "wanda-sp": {"scoring.method": "wanda-sp", "allocation.strategy": "uniform", "pruning.reconstruct": "none"},
    "flap": {
        "scoring.method": "flap",
        "scoring.aggregate": "mean",
        "allocation.strategy": "global",
        "pruning.reconstruct": "bias",
        "pruning.round_to": 1,
    },
    LLM_PRUNER_ROW: {  # and allocation.layer_range from llm_pruner_layers
        "scoring.method": "taylor",
        "scoring.objective": "nll",
        "allocation.strategy": "uniform",
        "pruning.reconstruct": "none",
    },
    "shortgpt": {"allocation.strategy": "shortgpt", "pruning.reconstruct": "none"},
    # the paper's metric and allocation, without and with this toolkit's reconstruction and unit choice
    "activation": {
        "scoring.method": "activation",
        "allocation.strategy": "activation-density",
        "pruning.reconstruct": "none",
    },
    "activation + lstsq": {
        "scoring.method": "activation",
        "allocation.strategy": "activation-density",
        "pruning.reconstruct": "lstsq",
    },
    "default recipe": {},
    "default, one-shot lstsq": {"pruning.reconstruct": "lstsq"},
    "default, sequential lstsq": {"pruning.reconstruct": "lstsq-sequential"},
    "default, searched allocation": {"allocation.strategy": "searched"},
}


def parse_variant(text: str) -> tuple[str, dict]:
    """``"NAME: key=value key=value"`` -> (NAME, {key: value}), each value read as YAML."""
    name, _, settings = text.partition(":")
    pairs = [item.partition("=") for item in settings.split()]
    return name.strip(), {key: yaml.safe_load(value) for key, _, value in pairs}


def llm_pruner_layers(num_layers: int) -> list[int]:
    """LLM-Pruner's ``allocation.layer_range``: the first 4 and the last 2 layers stay whole (its Llama-7B
    setting prunes layers 4-29 of 32)."""
    return [4, num_layers - 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/smollm2_30pct.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override the base recipe"
    )
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    parser.add_argument("--only", nargs="+", help=f"run only these rows: {', '.join(CONFIGURATIONS)}")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar='"NAME: key=value ..."',
        help="a row: the base recipe, these keys",
    )
    parser.add_argument(
        "--zeroshot", action="store_true", help="also the seven-task zero-shot mean (minutes a row on a CPU)"
    )
    parser.add_argument("--jsonl", type=Path, default=Path("runs/quality.jsonl"))
    parser.add_argument("--table", type=Path, nargs="+", help="only print the table of these JSON-lines files")
    args = parser.parse_args()
    if args.table:
        print_table([json.loads(line) for path in args.table for line in path.read_text().splitlines() if line.strip()])
        return
    variants = dict(parse_variant(text) for text in args.variant)
    configurations = CONFIGURATIONS | variants
    names = args.only or list(variants or CONFIGURATIONS)
    unknown = [name for name in names if name not in configurations]
    if unknown:
        parser.error(f"--only: no row named {', '.join(unknown)}")
    base = load_recipe(args.recipe, args.overrides)
    base_prepared = prepare(base, overwrite=True)
    model, tokenizer = load_model(base_prepared.model_source, base.model.dtype, base.model.device, base_prepared.cache)
    ppl_recipe = base.evaluation.perplexity
    tokens = evaluation_tokens(tokenizer, base_prepared.evaluation_source)
    dense = perplexity(model, tokens, ppl_recipe.seqlen, ppl_recipe.windows, "dense")
    dense_total = base_prepared.dense_parameters["total"]
    zs = base.evaluation.zeroshot

    def zeroshot_mean(m) -> float:
        tasks = list(MEAN_TASKS)
        return zeroshot_accuracy(
            m, tokenizer, tasks, resolve_source(tasks, zs.source), zs.limit, zs.batch_size, zs.seed
        )["mean"]

    dense_zeroshot = zeroshot_mean(model) if args.zeroshot else None
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for target in args.targets:
        for name in names:
            overrides = {**configurations[name], "pruning.target": target}
            if name == LLM_PRUNER_ROW:
                overrides["allocation.layer_range"] = llm_pruner_layers(model.config.num_hidden_layers)
            recipe = load_recipe(
                args.recipe, [*args.overrides, *(f"{k}={json.dumps(v)}" for k, v in overrides.items())]
            )
            prepared, calibration = prepare(recipe, overwrite=True), recipe.calibration
            statistics, info = obtain_statistics(prepared, model, tokenizer) if prepared.needs else (None, None)
            stage_seconds: dict[str, float] = {}
            samples = recipe_calibration(prepared, tokenizer)
            start = time.perf_counter()
            pruned, allocation = prune_as_recipe_says(
                recipe, model, prepared.params_to_remove, statistics, stage_seconds, samples=samples
            )
            seconds = time.perf_counter() - start
            result = perplexity(pruned, tokens, ppl_recipe.seqlen, ppl_recipe.windows, f"{name} {target:.0%}")
            kept = count_parameters(pruned)["total"]
            row = {
                "name": name if recipe.pruning.rounds == 1 else f"{name}, {recipe.pruning.rounds} rounds",
                "overrides": configurations[name],
                "rounds": recipe.pruning.rounds,
                "target": target,
                "method": recipe.scoring.method,
                "objective": recipe.scoring.objective,
                "allocation": recipe.allocation.strategy,
                "layer_range": recipe.allocation.layer_range,
                "reconstruct": recipe.pruning.reconstruct,
                "parameters": kept,
                "removed_fraction": 1 - kept / dense_total,
                "perplexity": result["perplexity"],
                "dense_perplexity": dense["perplexity"],
                "seqlen": ppl_recipe.seqlen,
                "dataset": ppl_recipe.dataset,
                "windows": result["windows"],
                "prune_seconds": seconds,
                "statistics_reused": info.reused if info else None,
                "statistics_peak_bytes": info.peak_memory_bytes if info else None,
                "model_weight_bytes": info.model_weight_bytes if info else None,
                "statistics_peak_over_weights": info.peak_over_weights if info else None,
                "calibration": f"{calibration.source} {calibration.samples} x {calibration.seqlen}",
                "zeroshot_mean": zeroshot_mean(pruned) if args.zeroshot else None,
                "dense_zeroshot_mean": dense_zeroshot,
                "zeroshot_limit": zs.limit if args.zeroshot else None,
                "search": None
                if allocation.search is None
                else {
                    "generations": recipe.allocation.search_generations,
                    "offspring": recipe.allocation.search_offspring,
                    "samples": recipe.allocation.search_samples,
                    "evaluations": allocation.search.evaluations,
                    "seconds": allocation.search.seconds,
                    "start_kl": allocation.search.start_kl,
                    "best_kl": allocation.search.best_kl,
                },
            }
            rows.append(row)
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print(
        f"\nCalibration: {base.calibration.source}, {base.calibration.samples} x {base.calibration.seqlen} tokens, "
        f"seed {base.calibration.seed}."
    )
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """The benchmark rows as a markdown table, dense perplexity first."""
    first = rows[0]
    dense_zeroshot = next((r["dense_zeroshot_mean"] for r in rows if r.get("dense_zeroshot_mean") is not None), None)
    print(
        f"\n{first.get('dataset', 'wikitext2')} perplexity, {first['seqlen']}-token windows x {first['windows']}; "
        f"dense {first['dense_perplexity']:.2f}."
        + (
            f" Zero-shot: mean acc of {len(MEAN_TASKS)} tasks; dense {100 * dense_zeroshot:.2f}."
            if dense_zeroshot
            else ""
        )
        + "\n"
    )
    print(
        "| target | method | scoring | allocation | reconstruction | calibration | parameters after (removed) "
        "| perplexity | 0-shot mean | prune s |"
    )
    print("|---:|---|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        allocation = r["allocation"] + (
            f" layers {r['layer_range'][0]}-{r['layer_range'][1] - 1}" if r["layer_range"] else ""
        )
        scoring = f"{r['method']} (D = {r['objective']})" if r["method"] in GRADIENT_METHODS else r["method"]
        if r["allocation"] == "shortgpt":
            allocation, scoring = "whole layers", "shortgpt (Block Influence)"
        zeroshot = f"{100 * r['zeroshot_mean']:.2f}" if r.get("zeroshot_mean") is not None else "-"
        print(
            f"| {r['target']:.0%} | {r['name']} | {scoring} | {allocation} | {r['reconstruct']} | "
            f"{r['calibration']} | {r['parameters']:,} ({r['removed_fraction']:.1%}) | "
            f"{r['perplexity']:,.2f} | {zeroshot} | {r['prune_seconds']:.0f} |"
        )
    for r in rows:
        if r.get("search"):
            search = r["search"]
            print(
                f"\nSearch of the {r['target']:.0%} {r['name']} row: {search['evaluations']} candidates "
                f"({search['generations']} generations x {search['offspring']} offspring, KL on {search['samples']} "
                f"calibration samples) in {search['seconds']:.0f} s; KL to the dense model "
                f"{search['start_kl']:.4f} (activation-density start) -> {search['best_kl']:.4f} nats per token."
            )
    measured = next((r for r in rows if r.get("statistics_peak_over_weights") is not None), None)
    if measured:  # later passes in the same process reuse memory freed before them: their RSS peak measures nothing
        weights, ratio = measured["model_weight_bytes"], measured["statistics_peak_over_weights"]
        print(
            f"\nFirst statistics pass of the process (for the {measured['target']:.0%} {measured['name']} row, "
            f"{measured['calibration']}, float32): weights {weights / 2**20:,.1f} MiB + "
            f"{(ratio - 1) * weights / 2**20:,.1f} MiB added by the pass = {ratio:.2f}x the weight bytes "
            f"(process peak {measured['statistics_peak_bytes'] / 2**20:,.1f} MiB)."
        )


if __name__ == "__main__":
    main()
