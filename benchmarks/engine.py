"""A finished run's pruned model in llama.cpp against the same model in PyTorch, and against the dense model.

    python benchmarks/engine.py RUN_DIR [--types f32 f16 q8_0] [--speed-types f16 q8_0] [--threads 2]
                                [--prompts 8] [--new-tokens 32] [--repeats 5] [--json engine.json]

For each tensor type the run's checkpoint is exported to GGUF (``prune.gguf_export``), and so is the
dense model it came from (the run's ``model.source``), like for like. Printed, as markdown tables:

1. greedy generation: ``--prompts`` prompts (the first tokens of the last documents of the C4 source)
   x ``--new-tokens`` tokens, the engine (float32 KV cache, so that only the file's weights differ)
   against the PyTorch checkpoint in float32: prompts whose tokens are identical, and the first
   differing position of the others;
2. WikiText-2 perplexity from the engine's logits (its default float16 KV cache, as deployed) on the
   run's perplexity windows, against the run's report.json;
3. speed: dense and pruned files of each ``--speed-types`` interleaved, prompt processing and
   generation tokens/s (median and min-max of ``--repeats`` after one warm-up), beside the limit the
   removed units allow (dense / pruned linear multiply-adds per token).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from eval.engine import engine_perplexity, engine_speed, greedy_tokens, open_gguf
from eval.report import read_report
from eval.speed import linear_macs_per_token
from prune.calibration import evaluation_tokens, read_documents, resolve_text_source
from prune.export import gguf_tokenizer_source
from prune.gguf_export import write_gguf
from prune.models import ModelSource, load_model
from prune.paths import cache_dir


def prompts_from_c4(tokenizer, count: int, tokens: int) -> list[list[int]]:
    """The first ``tokens`` tokens of the last ``count`` documents of the C4 source."""
    documents = read_documents(resolve_text_source("c4", "prompts"))[-count:]
    return [tokenizer(text).input_ids[:tokens] for text in documents]


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--types", nargs="*", default=["f32", "f16", "q8_0"])
    parser.add_argument("--speed-types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--speed-prompt-tokens", type=int, default=128)
    parser.add_argument("--speed-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    report = read_report(args.run)
    ppl = report.perplexity
    assert ppl is not None, "the run measured no perplexity"
    cache = cache_dir(report.recipe["cache_dir"])
    origin = ModelSource(report.model.kind, report.model.location)
    pruned, tokenizer = load_model(ModelSource("directory", str(args.run / "model")), "float32", "cpu", cache)
    dense, _ = load_model(origin, "float32", "cpu", cache)
    pruned.generation_config.eos_token_id = None  # the engine's greedy loop does not stop at an end token either
    prompts = prompts_from_c4(tokenizer, args.prompts, args.prompt_tokens)
    expected = [
        pruned.generate(torch.tensor([p]), max_new_tokens=args.new_tokens, do_sample=False)[0, len(p) :].tolist()
        for p in (prompts if args.types else [])
    ]
    text = evaluation_tokens(tokenizer, resolve_text_source(ppl.dataset, "perplexity"))
    limit = linear_macs_per_token(dense) / linear_macs_per_token(pruned)
    results: dict = {"run": str(args.run), "threads": args.threads, "limit": limit, "types": {}}
    with tempfile.TemporaryDirectory() as directory:
        files = {}
        for tensor_type in sorted(set(args.types) | set(args.speed_types), key=(args.types + args.speed_types).index):
            files[tensor_type] = {
                "pruned": Path(directory) / f"pruned-{tensor_type}.gguf",
                "dense": Path(directory) / f"dense-{tensor_type}.gguf",
            }
            source = gguf_tokenizer_source(origin)
            write_gguf(pruned, tokenizer, files[tensor_type]["pruned"], tensor_type, source, "pruned")
            write_gguf(dense, tokenizer, files[tensor_type]["dense"], tensor_type, source, "dense")
        for tensor_type in args.types:
            with open_gguf(files[tensor_type]["pruned"], 256, args.threads, all_logits=True, exact_cache=True) as llm:
                generated = [greedy_tokens(llm, p, args.new_tokens) for p in prompts]
            with open_gguf(files[tensor_type]["pruned"], ppl.seqlen, args.threads, True, exact_cache=False) as llm:
                measured = engine_perplexity(llm, text, ppl.seqlen, ppl.windows)
            results["types"][tensor_type] = {
                "identical_prompts": sum(g == e for g, e in zip(generated, expected, strict=True)),
                "first_differences": [first_difference(g, e) for g, e in zip(generated, expected, strict=True)],
                "perplexity": measured["perplexity"],
                "file_bytes": files[tensor_type]["pruned"].stat().st_size,
            }
        for tensor_type in args.speed_types:
            speed = engine_speed(
                {name: files[tensor_type][name] for name in ("dense", "pruned")},
                args.speed_prompt_tokens,
                args.speed_new_tokens,
                1,
                args.repeats,
                args.threads,
            )
            results["types"].setdefault(tensor_type, {})["speed"] = {name: asdict(s) for name, s in speed.items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results, report.perplexity.pruned, ppl, args)


def print_tables(results: dict, reported: float, ppl, args) -> None:
    if args.types:
        print_agreement(results, reported, ppl, args)
    print_speed(results, args)


def print_agreement(results: dict, reported: float, ppl, args) -> None:
    print(
        f"Greedy generation: {args.prompts} prompts of {args.prompt_tokens} tokens (C4), {args.new_tokens} new "
        "tokens, engine (float32 KV cache) against the PyTorch checkpoint in float32. Perplexity: "
        f"{ppl.dataset}, {ppl.seqlen}-token windows x {ppl.windows}, engine logits (default float16 KV cache); "
        f"report.json: {reported:.2f}.\n"
    )
    print("| type | file MiB | identical prompts | first differing position (others) | perplexity | vs report.json |")
    print("|---|---:|---:|---|---:|---:|")
    for tensor_type, r in results["types"].items():
        if "perplexity" not in r:
            continue
        differing = [d for d in r["first_differences"] if d is not None]
        print(
            f"| {tensor_type} | {r['file_bytes'] / 2**20:,.1f} | "
            f"{r['identical_prompts']} / {len(r['first_differences'])} | {', '.join(map(str, differing)) or '-'} | "
            f"{r['perplexity']:.2f} | "
            f"{100 * (r['perplexity'] / reported - 1):+.2f}% |"
        )


def print_speed(results: dict, args) -> None:
    print(
        f"\nSpeed: {args.threads} threads, dense and pruned interleaved, 1 warm-up + {args.repeats} repeats, "
        f"median (min-max); prompt processing {args.speed_prompt_tokens} tokens, generation "
        f"{args.speed_new_tokens} tokens. Limit (dense / pruned linear multiply-adds per token): "
        f"{results['limit']:.2f}x.\n"
    )
    print("| type | model | prompt tokens/s | generation tokens/s | prompt speedup | generation speedup |")
    print("|---|---|---:|---:|---:|---:|")
    for tensor_type, r in results["types"].items():
        if "speed" not in r:
            continue
        dense = r["speed"]["dense"]
        for name, s in r["speed"].items():
            ratios = "- | -"
            if name == "pruned":
                prompt = s["prompt_tokens_per_s_median"] / dense["prompt_tokens_per_s_median"]
                decode = s["decode_tokens_per_s_median"] / dense["decode_tokens_per_s_median"]
                ratios = (
                    f"{prompt:.2f}x ({prompt / results['limit']:.0%} of limit) | "
                    f"{decode:.2f}x ({decode / results['limit']:.0%} of limit)"
                )
            print(
                f"| {tensor_type} | {name} | {s['prompt_tokens_per_s_median']:,.1f} "
                f"({s['prompt_tokens_per_s_min']:,.1f}-{s['prompt_tokens_per_s_max']:,.1f}) | "
                f"{s['decode_tokens_per_s_median']:,.1f} "
                f"({s['decode_tokens_per_s_min']:,.1f}-{s['decode_tokens_per_s_max']:,.1f}) | {ratios} |"
            )


if __name__ == "__main__":
    main()
