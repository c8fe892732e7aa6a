"""Scale rehearsal: the pipeline (everything but the evaluation) on random-weight models at real shapes, with the
peak memory of every stage against the weight bytes.

    python benchmarks/scale.py [--shapes llama-3.2-1b llama-3.2-3b llama-2-7b llama-3-8b] [--samples 4]
                               [--seqlen 64] [--dtype bfloat16] [--json scale.json]
    python benchmarks/scale.py --table scale.json       # the table of the shapes a --json file holds

Each shape is built with random weights (``eval.speed``'s shape-only builder) in ``--dtype`` on the CPU (or
``--device``) and run through the default recipe's stages in this process: activation statistics (gradient
products, input sums and second moments; second moments in per-layer files, layer boundaries in scratch
files), scoring (activation-obs), allocation (activation-density, 30%), pruning with the recipe's reconstruction
(lstsq-sequential) (in place: no evaluation follows), and the Hugging Face checkpoint. Per stage: wall seconds,
and the memory it added at its peak (CPU: resident set high-water mark after freed heap memory is returned
to the OS, less the resident set before the stage; CUDA: allocator peak less allocated before), printed as
(weight bytes + added) / weight bytes, beside the memory plan's estimate of the same ratio (``prune/estimate.py``).
The weights count once: they are resident before the first stage.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from eval.speed import random_model, shaped_config
from prune.allocation import allocate
from prune.blocks import block_shape, count_parameters
from prune.checkpoint import save_checkpoint
from prune.estimate import estimate_memory
from prune.memory import current_bytes, make_resident, peak_bytes, reset_peak
from prune.models import resolve_device
from prune.paths import cache_dir
from prune.prepare import added_bias_parameters, for_device, statistics_needs
from prune.pruner import prune_model
from prune.recipe import load_recipe
from prune.run import recipe_refit
from prune.scoring import score_units
from prune.statistics import collect_statistics


class NoTokenizer:
    def save_pretrained(self, directory: Path) -> None:
        pass


@contextmanager
def measured(rows: list[dict], stage: str, device: torch.device, weight_bytes: int):
    reset_peak(device)
    before = current_bytes(device)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    added = max(0, peak_bytes(device) - before)
    rows.append(
        {"stage": stage, "seconds": seconds, "added_bytes": added, "ratio": (weight_bytes + added) / weight_bytes}
    )
    print(
        f"  {stage}: {seconds:.1f} s, +{added / 2**30:.2f} GiB, {(weight_bytes + added) / weight_bytes:.2f}x",
        flush=True,
    )


def rehearse(shape_name: str, samples: int, seqlen: int, dtype: torch.dtype, device: torch.device, work: Path) -> dict:
    overrides = [f"calibration.samples={samples}", f"calibration.seqlen={seqlen}", "evaluation.speed.enabled=false"]
    overrides.append(f"model.dtype={str(dtype).removeprefix('torch.')}")
    recipe = for_device(load_recipe("recipes/smollm2_30pct.yaml", overrides), device)
    config = shaped_config(shape_name, cache_dir(None))
    shape = block_shape(config)
    model = random_model(config, list(shape.layers), dtype, device)
    make_resident(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    total = count_parameters(model)["total"]
    plan = {
        stage.stage: stage.peak_bytes / weight_bytes
        for stage in estimate_memory(recipe, shape, config.vocab_size, total, statistics_needs(recipe), in_place=True)
    }
    print(f"{shape_name}: {total:,} parameters, {weight_bytes / 2**30:.2f} GiB of weights ({dtype})", flush=True)
    ids = torch.randint(0, config.vocab_size, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    rows: list[dict] = []
    store, scratch = work / "stats", work / "scratch"
    store.mkdir()
    scratch.mkdir()
    with measured(rows, "activation statistics", device, weight_bytes):
        statistics = collect_statistics(
            model, ids, recipe.scoring.objective, statistics_needs(recipe), store=store, scratch=scratch
        )
    with measured(rows, "scoring", device, weight_bytes):
        scoring = recipe.scoring
        scores = score_units(model, shape, scoring.method, scoring.aggregate, statistics, recipe.pruning.damping)
    with measured(rows, "allocation", device, weight_bytes):
        budget = round(recipe.pruning.target * total) + added_bias_parameters(recipe, shape)
        allocation = allocate(shape, scores, budget, recipe.allocation, recipe.pruning, statistics)
    with measured(rows, "pruning", device, weight_bytes):
        refit = recipe_refit(recipe, model, shape, statistics, ids, scratch / "refit")  # as a run keeps its files
        pruned = prune_model(model, allocation.plans, output_bias=refit is not None, refit=refit, in_place=True)
    del model
    with measured(rows, "checkpoint (hf)", device, weight_bytes):
        save_checkpoint(pruned, NoTokenizer(), work / "model")
    for row in rows:
        row["estimated_ratio"] = plan.get(row["stage"])
    return {
        "shape": shape_name,
        "parameters": total,
        "pruned_parameters": count_parameters(pruned)["total"],
        "weight_bytes": weight_bytes,
        "dtype": str(dtype).removeprefix("torch."),
        "samples": samples,
        "seqlen": seqlen,
        "reconstruction": recipe.pruning.reconstruct,
        "stages": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["llama-3.2-1b", "llama-3.2-3b", "llama-2-7b", "llama-3-8b"],
        help="shape names of eval.speed.KNOWN_SHAPES, or model sources whose configuration gives the shape",
    )
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="directory for statistics and scratch files")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", type=Path, help="only print the table of a --json file written before")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads(args.table.read_text()), args.device)
        return
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    results = []
    for name in args.shapes:
        with tempfile.TemporaryDirectory(dir=args.work) as work:
            results.append(rehearse(name, args.samples, args.seqlen, dtype, device, Path(work)))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, args.device)


def print_table(results: list[dict], device: str) -> None:
    """The rehearsal's markdown table (for BENCHMARKS.md): one row per shape, one column per stage."""
    stages = [row["stage"] for row in results[0]["stages"]]
    first = results[0]
    print(
        f"\n{first['samples']} calibration samples x {first['seqlen']} tokens, {first['dtype']} on {device}; "
        "(weights + memory the stage added at its peak) / weights, [the memory plan's estimate], and wall seconds.\n"
    )
    print("| shape | parameters | weights GiB | reconstruction | " + " | ".join(stages) + " |")
    print("|---|---:|---:|---|" + "---:|" * len(stages))
    for r in results:
        cells = [
            f"{row['ratio']:.2f}x"
            + (f" [{row['estimated_ratio']:.2f}x]" if row["estimated_ratio"] is not None else "")
            + f" ({row['seconds']:,.0f} s)"
            for row in r["stages"]
        ]
        print(
            f"| {r['shape']} | {r['parameters']:,} | {r['weight_bytes'] / 2**30:.2f} | {r['reconstruction']} | "
            + " | ".join(cells)
            + " |"
        )


if __name__ == "__main__":
    main()
