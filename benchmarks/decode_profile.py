"""Where a decode step's time goes, dense vs pruned: linear layers (matrix products) vs everything else.

    python benchmarks/decode_profile.py RUN_DIR [--steps 32] [--prompt-tokens 128]

Builds the dense shape and the run's pruned widths with random weights (``eval.speed``'s shape-only
models, on CPU, float32), decodes ``--steps`` greedy tokens after a prompt under torch.profiler, and
prints per model: wall ms per step, CPU ms per step inside linear layers (aten::linear and what it
calls) and outside them. If only the linear part shrinks with pruning, the outside part bounds the
decode speedup: dense step / (outside + linear dense / MAC ratio).
"""

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from eval.report import read_report
from eval.speed import cache_keyword, linear_macs_per_token, shape_only_models, shaped_config
from prune.paths import cache_dir


@torch.inference_mode()
def profiled_decode(model, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """(wall seconds per step, CPU seconds per step inside aten::linear) over ``steps`` decode steps."""
    keyword = cache_keyword(model)
    out = model(input_ids=prompt, use_cache=True)
    cache, token = getattr(out, keyword), out.logits[:, -1].argmax(-1, keepdim=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{keyword: cache})
            cache, token = getattr(out, keyword), out.logits[:, -1].argmax(-1, keepdim=True)
        wall = time.perf_counter() - start
    linear = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "aten::linear") / 1e6
    return wall / steps, linear / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path, help="a finished run's output directory")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    args = parser.parse_args()
    report = read_report(args.run)
    config = shaped_config(report.model.source, cache_dir(None))
    models, _ = shape_only_models(config, report, torch.float32, torch.device("cpu"))
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    rows = {name: profiled_decode(model, prompt, args.steps) for name, model in models.items()}
    macs = {name: linear_macs_per_token(model) for name, model in models.items()}
    print(
        f"{report.model.source} shapes, float32, cpu ({torch.get_num_threads()} threads), "
        f"{args.steps} decode steps after {args.prompt_tokens} prompt tokens"
    )
    print("| model | ms / step | linear ms / step | other ms / step | linear MACs / token |\n|---|---:|---:|---:|---:|")
    for name, (wall, linear) in rows.items():
        print(f"| {name} | {1000 * wall:.1f} | {1000 * linear:.1f} | {1000 * (wall - linear):.1f} | {macs[name]:,} |")
    (dense_wall, dense_linear), (pruned_wall, _) = rows["dense"], rows["pruned"]
    ratio = macs["dense"] / macs["pruned"]
    bound = dense_wall / (dense_wall - dense_linear + dense_linear / ratio)
    print(
        f"MAC ratio {ratio:.2f}x; measured {dense_wall / pruned_wall:.2f}x; "
        f"bound if only linear time shrinks: {bound:.2f}x"
    )


if __name__ == "__main__":
    main()
