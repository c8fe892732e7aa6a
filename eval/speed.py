"""Inference speed of several models measured side by side (docs/METHOD.md §4).

Each repeat runs every model once, in turn (interleaved, so drift in machine speed hits all of them
alike): a prefill of ``prompt_tokens`` random tokens for ``batch_size`` sequences, then
``new_tokens`` greedy decode steps that reuse the KV cache. Warm-up repeats are discarded; the
report gives the median and the spread (min, max) of the timed repeats. On CUDA every clock read
is preceded by a synchronisation.

Shape-only mode (``python -m eval.speed``): speed depends on shapes, not on weights, so a
random-weight model built from a configuration (a named shape such as ``llama-2-7b``, or any model
source a recipe accepts) is timed dense and with the per-layer widths of a finished run transferred
onto it. This measures 7B-class speedups without their weights. See README, "Speed".
"""

from __future__ import annotations

import contextlib
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, StaticCache

from prune.blocks import BlockShape, LayerWidths, block_shape
from prune.memory import current_bytes, peak_bytes, reset_peak

if TYPE_CHECKING:
    from eval.report import LayerReport, Report


@dataclass
class SpeedResult:
    """Timings of one model, from ``eval.speed.measure_speed``."""

    prefill_ms_median: float
    prefill_ms_min: float
    prefill_ms_max: float
    decode_tokens_per_s_median: float
    """New tokens per second summed over the batch, decode steps only (prefill excluded)."""
    decode_tokens_per_s_min: float
    decode_tokens_per_s_max: float
    weight_bytes: int
    linear_macs_per_token: int
    """Multiply-adds of every linear layer (decoder linears and lm_head) for one token: its weight count."""
    peak_memory_bytes: int
    """Weight bytes plus the largest working memory (activations, KV cache) of one prefill + decode run."""
    compile_seconds: float | None = None
    """Seconds of the first generation with a compiled decode step (compiling it, capturing its CUDA graphs),
    before and apart from the warm-up and the timed repeats; None when the step runs eagerly."""


def synchronized_clock(device: torch.device) -> float:
    """Seconds from a monotonic clock, read after all queued work on ``device`` has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cache_keyword(model: PreTrainedModel) -> str:
    """Name of the KV-cache argument and output field: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


DECODE_LOOPS = ("auto", "dynamic", "static")
"""``dynamic``: a KV cache that grows by one entry per step, each step run eagerly (launch-bound on a GPU);
``static``: a KV cache allocated once for the whole generation, each decode step compiled as
:data:`STATIC_STEP_COMPILE` says for the device (on CUDA: kernels replayed from CUDA graphs), else run eagerly;
``auto``: static on CUDA, dynamic on the CPU."""

STATIC_STEP_COMPILE: dict[str, dict[str, Any]] = {
    "cuda": {"backend": "inductor", "mode": "reduce-overhead", "fullgraph": True},
}
"""``torch.compile`` arguments of the static loop's decode step, by device type. On CUDA inductor's fused kernels,
replayed from one captured CUDA graph per batch size (``reduce-overhead``), so that a step costs no kernel
launches. A device type not listed runs the step eagerly: on the CPU the compilation costs more than the
measurement it would speed up."""


def resolve_decode_loop(loop: str, device: torch.device) -> str:
    """``dynamic`` or ``static`` for a requested loop of :data:`DECODE_LOOPS` on ``device``."""
    if loop == "auto":
        return "static" if device.type == "cuda" else "dynamic"
    return loop


def decode_step(model: PreTrainedModel, loop: str) -> Callable[..., Any]:
    """The callable one decode step runs: the model itself, or, in the static loop on a device type of
    :data:`STATIC_STEP_COMPILE`, the model compiled as it says. Make it once per model: its first generation at
    batch size 1 compiles it, and its first at a larger batch size compiles it once more for every larger size
    (:func:`greedy_decode` marks the batch dimension dynamic there). A graph dynamic at size 1 too would need an
    unbacked size, which CUDA graphs refuse."""
    device = next(model.parameters()).device
    arguments = STATIC_STEP_COMPILE.get(device.type)
    if loop == "static" and arguments is not None:
        return torch.compile(model, **arguments)
    return model


def static_cache(model: PreTrainedModel, tokens: int) -> StaticCache:
    """A KV cache of ``tokens`` positions for the static loop; its tensors are allocated by the first prefill and
    keep their addresses when :func:`greedy_decode` reuses it (a CUDA graph reads them where it captured them)."""
    return StaticCache(config=model.config, max_cache_len=tokens)


@torch.inference_mode()
def greedy_decode(
    model: PreTrainedModel,
    prompt: torch.Tensor,
    new_tokens: int,
    loop: str = "dynamic",
    step: Any = None,
    cache: StaticCache | None = None,
) -> tuple[float, float, torch.Tensor]:
    """One greedy generation with the KV cache: the prompt [B, T] in one forward pass (prefill, which also gives
    the first new token), then ``new_tokens`` decode steps of one token each. ``loop``: ``dynamic`` or
    ``static`` (:data:`DECODE_LOOPS`); ``step``: the decode step of :func:`decode_step` (default: the model);
    ``cache``: the static loop's KV cache of :func:`static_cache` for this batch size, emptied here and reused
    (default: a new one of T + ``new_tokens`` + 1 positions).

    Returns (prefill seconds, decode seconds, the generated tokens [B, new_tokens + 1]).
    """
    device = prompt.device
    keyword = cache_keyword(model)
    step = model if step is None else step
    compiled = step is not model
    cache_argument = {}
    if loop == "static":
        if cache is None:
            cache = static_cache(model, prompt.shape[1] + new_tokens + 1)
        cache.reset()
        cache_argument = {keyword: cache}
    start = synchronized_clock(device)
    out = model(input_ids=prompt, use_cache=True, **cache_argument)
    next_token = out.logits[:, -1].argmax(-1, keepdim=True)
    prefilled = synchronized_clock(device)
    if compiled and len(prompt) > 1:  # one compilation for every batch size above 1
        for tensor in (next_token, *static_cache_tensors(cache)):
            torch._dynamo.mark_dynamic(tensor, 0)
    tokens = [next_token]
    for _ in range(new_tokens):
        if loop == "dynamic":
            cache_argument = {keyword: getattr(out, keyword)}
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's outputs, read, may be overwritten
        out = step(input_ids=next_token, use_cache=True, **cache_argument)
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(next_token)
    done = synchronized_clock(device)
    return prefilled - start, done - prefilled, torch.cat(tokens, dim=1)


def static_cache_tensors(cache: StaticCache | None) -> list[torch.Tensor]:
    """The key and value tensors [B, KV heads, positions, head_dim] of every layer of a prefilled static cache."""
    if cache is None:
        return []
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]


def weight_bytes(model: PreTrainedModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def linear_macs_per_token(model: PreTrainedModel) -> int:
    """Multiply-adds per token of all ``nn.Linear`` layers, lm_head included (a tied lm_head still computes), and
    of a mixture-of-experts model's routers and of the ``num_experts_per_tok`` experts each token runs (experts'
    weights are [experts, out, in] parameters).

    Prefill compute and the weight bytes a decode step reads both scale with it, so dense / pruned of
    this number is the speedup the removed units allow (attention over the context excluded).
    """
    per_token = getattr(model.config, "num_experts_per_tok", 0)
    macs = 0
    for module in model.modules():
        router = hasattr(module, "top_k") and isinstance(getattr(module, "weight", None), torch.Tensor)
        if isinstance(module, torch.nn.Linear) or router:  # a router's weight: [experts, in]
            macs += module.weight.numel()
        macs += sum(per_token * p[0].numel() for p in module.parameters(recurse=False) if p.dim() == 3)
    return macs


def measure_speed(
    models: dict,
    prompt_tokens: int,
    batch_size: int,
    new_tokens: int,
    warmup: int,
    repeats: int,
    decode_loop: str = "auto",
    seed: int = 0,
    progress: bool = True,
    steps: dict[str, Callable[..., Any]] | None = None,
) -> dict[str, SpeedResult]:
    """Time every model of ``models`` (name -> model, all on one device) interleaved; results by name.

    ``decode_loop``: one of :data:`DECODE_LOOPS`; ``steps``: each model's decode step (:func:`decode_step`; default:
    made here), to be passed again for another batch size so that a compiled step is compiled once. A compiled
    step's first generation at this batch size (compiling, capturing CUDA graphs) runs before the warm-up, timed
    apart. Decode throughput: ``new_tokens`` decode steps over their time (the prefill's token aside).
    """
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    loop = resolve_decode_loop(decode_loop, device)
    steps = steps or {name: decode_step(model, loop) for name, model in models.items()}
    positions = prompt_tokens + new_tokens + 1
    caches = {name: static_cache(model, positions) if loop == "static" else None for name, model in models.items()}
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, first.config.vocab_size, (batch_size, prompt_tokens), generator=generator).to(device)
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    working = dict.fromkeys(models, 0)
    compile_seconds: dict[str, float | None] = dict.fromkeys(models)

    def generate(name: str) -> tuple[float, float]:
        """One generation; its working memory (the first allocates the static cache) counts towards the peak."""
        reset_peak(device)
        before = current_bytes(device)
        prefill, decode, _ = greedy_decode(models[name], prompt, new_tokens, loop, steps[name], caches[name])
        working[name] = max(working[name], peak_bytes(device) - before)
        return prefill, decode

    for name in models:
        if steps[name] is not models[name]:
            start = synchronized_clock(device)
            generate(name)
            compile_seconds[name] = synchronized_clock(device) - start
    runs = [(r, name) for r in range(warmup + repeats) for name in models]
    for r, name in tqdm(runs, desc="speed (prefill + decode)", unit="run", disable=not progress):
        prefill, decode = generate(name)
        if r >= warmup:
            timings[name].append((prefill, decode))
    results = {}
    for name, runs_of_model in timings.items():
        prefill_ms = [1000 * p for p, _ in runs_of_model]
        rates = [batch_size * new_tokens / d for _, d in runs_of_model]
        results[name] = SpeedResult(
            prefill_ms_median=statistics.median(prefill_ms),
            prefill_ms_min=min(prefill_ms),
            prefill_ms_max=max(prefill_ms),
            decode_tokens_per_s_median=statistics.median(rates),
            decode_tokens_per_s_min=min(rates),
            decode_tokens_per_s_max=max(rates),
            weight_bytes=weight_bytes(models[name]),
            linear_macs_per_token=linear_macs_per_token(models[name]),
            peak_memory_bytes=weight_bytes(models[name]) + working[name],
            compile_seconds=compile_seconds[name],
        )
    return results


KNOWN_SHAPES = {
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama-3.2-3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama-2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-2-13b": {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}
"""Published LLaMA shapes (from the models' config.json files), usable without their weights."""


def shaped_config(name: str, cache: Path):
    """A configuration by shape name (:data:`KNOWN_SHAPES`) or from any model source a recipe accepts."""
    if name in KNOWN_SHAPES:
        return AutoConfig.for_model("llama", **KNOWN_SHAPES[name])
    from prune.models import load_config, resolve_model_source

    return load_config(resolve_model_source(name, cache))


def _round_to_multiple(value: float, multiple: int, smallest: int) -> int:
    return max(smallest, multiple * round(value / multiple))


def transferred_widths(layers: list[LayerReport], target: BlockShape, round_to: int) -> list[LayerWidths | None]:
    """The per-layer kept fractions of a finished run, applied to another model's shape.

    ``layers``: the ``layers`` table of a run's report (per layer ``dense`` and ``pruned`` widths;
    ``pruned`` None for a removed layer). Target layer ``i`` takes the fractions of the source layer at
    the same relative depth. KV groups keep the source's fraction; query heads per group keep the
    source's per-group fraction, except that a model with one query head per KV head (multi-head
    attention) keeps the source's fraction of query heads as whole heads. FFN widths are rounded to a
    multiple of ``round_to`` (at least ``round_to``); every layer keeps at least one head.
    """
    rows = len(layers)
    widths: list[LayerWidths | None] = []
    for i, dense in enumerate(target.layers):
        source = layers[round(i * (rows - 1) / max(target.num_layers - 1, 1))]
        kept, full = source.pruned, source.dense
        if kept is None:
            widths.append(None)
            continue
        ffn = _round_to_multiple(kept.ffn_channels / full.ffn_channels * dense.ffn_channels, round_to, round_to)
        ffn = min(ffn, dense.ffn_channels)
        if dense.heads_per_group == 1:
            heads = max(1, round(kept.query_heads / full.query_heads * dense.query_heads))
            widths.append(LayerWidths(heads, heads, ffn))
            continue
        groups = max(1, round(kept.kv_groups / full.kv_groups * dense.kv_heads))
        per_group_fraction = (kept.query_heads / kept.kv_groups) / (full.query_heads / full.kv_groups)
        per_group = max(1, round(per_group_fraction * dense.heads_per_group))
        widths.append(LayerWidths(per_group * groups, groups, ffn))
    return widths


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_model(
    config: PretrainedConfig,
    widths: list[LayerWidths | None],
    dtype: torch.dtype,
    device: torch.device,
    output_bias: bool = False,
    seed: int = 0,
):
    """A random-weight model of ``config``'s family with the given per-layer widths (None: layer removed).

    Built directly on ``device`` in ``dtype`` by the same classes that load pruned checkpoints, so its
    linear layers have exactly the shapes a pruned checkpoint with these widths has.
    """
    from prune.pruner import model_class_for, pruned_config

    config = pruned_config(config, widths, output_bias)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = model_class_for(config)(config)
    return model.eval()


def shape_only_models(
    config: PretrainedConfig, report: Report, dtype: torch.dtype, device: torch.device, round_to: int | None = None
) -> tuple[dict, list[LayerWidths | None]]:
    """Random-weight ``{"dense", "pruned"}`` models of ``config``: dense, and with the per-layer widths of the
    run whose report is ``report`` transferred onto it (FFN rounded to ``round_to``, default the run's
    ``pruning.round_to``; output biases when the run reconstructed). Also returns the pruned widths.
    """
    shape = block_shape(config)
    widths = transferred_widths(report.layers, shape, round_to or report.method.round_to)
    models = {
        "dense": random_model(config, list(shape.layers), dtype, device),
        "pruned": random_model(config, widths, dtype, device, report.method.reconstruction != "none"),
    }
    return models, widths


def speed_table(rows: list[dict]) -> str:
    """Markdown table of :func:`main`'s results: one line per (batch size, model). ``weights GB/s``: the weight
    bytes one decode step reads over the step's median time (the memory bandwidth the weights alone take)."""
    lines = [
        "| batch | model | parameters | linear MACs / token | compile s | prefill ms (median, min-max) | "
        "decode tokens/s (median, min-max) | weights GB/s | peak memory GiB | speedup prefill / decode | limit |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        dense = row["results"]["dense"]
        for name, r in row["results"].items():
            ratios = limit = "-"
            if name != "dense":
                ratios = (
                    f"{dense['prefill_ms_median'] / r['prefill_ms_median']:.2f}x / "
                    f"{r['decode_tokens_per_s_median'] / dense['decode_tokens_per_s_median']:.2f}x"
                )
                limit = f"{dense['linear_macs_per_token'] / r['linear_macs_per_token']:.2f}x"
            compiled = "-" if r.get("compile_seconds") is None else f"{r['compile_seconds']:.1f}"
            steps_per_s = r["decode_tokens_per_s_median"] / row["batch_size"]
            lines.append(
                f"| {row['batch_size']} | {name} | {row['parameters'][name]:,} | {r['linear_macs_per_token']:,} | "
                f"{compiled} | {r['prefill_ms_median']:.1f} ({r['prefill_ms_min']:.1f}-{r['prefill_ms_max']:.1f}) | "
                f"{r['decode_tokens_per_s_median']:.1f} "
                f"({r['decode_tokens_per_s_min']:.1f}-{r['decode_tokens_per_s_max']:.1f}) | "
                f"{r['weight_bytes'] * steps_per_s / 1e9:.1f} | "
                f"{r['peak_memory_bytes'] / 2**30:.2f} | {ratios} | {limit} |"
            )
    return "\n".join(lines)


class SpeedArgumentError(ValueError):
    """A bad argument of ``python -m eval.speed``; the message names it."""


def main(argv: list[str] | None = None) -> int:
    from prune.cli import ArgumentParser, non_negative_int, positive_int, run_command
    from prune.models import ModelSourceError, default_round_to, resolve_device, resolve_dtype
    from prune.paths import atomic_write_text, cache_dir

    parser = ArgumentParser(
        prog="python -m eval.speed",
        description="Shape-only speed benchmark: a random-weight dense model vs the same with a run's layer widths.",
    )
    parser.add_argument(
        "--config",
        required=True,
        help=f"shape name ({', '.join(KNOWN_SHAPES)}) or a model source (local directory, .gguf, smollm2-135m, hub id)",
    )
    parser.add_argument(
        "--allocation",
        required=True,
        type=Path,
        help="a finished run's output directory (or its report.json): its per-layer kept fractions are applied",
    )
    parser.add_argument(
        "--round-to",
        type=positive_int,
        default=None,
        help="FFN widths rounded to this multiple (default: what a run's null pruning.round_to is on the device: "
        "128 on CUDA, 8 on the CPU)",
    )
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1])
    parser.add_argument("--prompt-tokens", type=positive_int, default=128)
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--decode-loop",
        default="auto",
        choices=DECODE_LOOPS,
        help="dynamic (growing KV cache, eager), static (preallocated KV cache; CUDA graphs on a GPU); "
        "auto: static on CUDA, dynamic on the CPU",
    )
    parser.add_argument("--json", type=Path, help="also write the results (JSON) here")
    args = parser.parse_args(argv)

    def benchmark() -> str:
        report_path = args.allocation / "report.json" if args.allocation.is_dir() else args.allocation
        if not report_path.is_file():
            raise SpeedArgumentError(f"--allocation: no report.json at {report_path}")
        if args.json and not args.json.parent.is_dir():
            raise SpeedArgumentError(f"--json: the directory {args.json.parent} does not exist")
        from eval.report import read_report  # here: the report reads this module's results

        try:
            report = read_report(report_path)
        except ValueError as error:
            raise SpeedArgumentError(f"--allocation: {error}") from None
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        round_to = args.round_to or default_round_to(device)
        models, widths = shape_only_models(shaped_config(args.config, cache_dir(None)), report, dtype, device, round_to)
        parameters = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
        device_name = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        )
        loop = resolve_decode_loop(args.decode_loop, device)
        summary = {
            "config": args.config,
            "allocation": str(report_path),
            "round_to": round_to,
            "device": device_name,
            "dtype": str(dtype).removeprefix("torch."),
            "decode_loop": loop,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "pruned_widths": [None if w is None else asdict(w) for w in widths],
            "removed_fraction": 1 - parameters["pruned"] / parameters["dense"],
            "rows": [],
        }
        print(
            f"{args.config} shapes, {summary['dtype']} on {device_name}, {loop} decode loop; "
            f"widths from {report_path} "
            f"(FFN rounded to {round_to}); {summary['removed_fraction']:.1%} of parameters removed; "
            f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
            f"{args.warmup} warm-up + {args.repeats} repeats"
        )
        steps = {name: decode_step(model, loop) for name, model in models.items()}
        rows = summary["rows"]
        for batch_size in args.batch_sizes:
            results = measure_speed(
                models, args.prompt_tokens, batch_size, args.new_tokens, args.warmup, args.repeats, loop, steps=steps
            )
            rows.append(
                {
                    "batch_size": batch_size,
                    "parameters": parameters,
                    "results": {name: asdict(result) for name, result in results.items()},
                }
            )
            if args.json:  # each batch size's results as soon as they exist
                atomic_write_text(args.json, json.dumps(summary, indent=2) + "\n")
        print(speed_table(rows))
        return "done"

    return run_command(benchmark, (SpeedArgumentError, ModelSourceError))


if __name__ == "__main__":
    sys.exit(main())
