"""The GPU check: what a short GPU lease runs end to end (about 8 minutes on one H200), each step capped in time and
writing its JSON as its parts finish, so that a step cut short still leaves what it measured.

1. ``environment.json``: torch, transformers and CUDA versions, the device, which optional packages import;
2. ``run/``: a tiny random-weight Llama checkpoint (with a word-level tokenizer, calibration and evaluation
   text, and generated two-choice items for zero-shot) through ``python -m prune.run`` on the device: every stage
   the machine can run (zero-shot when lm-eval imports, the GGUF export when gguf does, the engine stage when
   llama.cpp's binding does), the speed stage with the static decode loop; its report.json and log;
3. ``speed.json``: shape-only speed (``eval.speed``) at Llama-3-8B shapes, dense against the widths of the default
   30% recipe's run on SmolLM2-135M (``benchmarks/results/smollm2_30pct_report.json``), FFN widths rounded as a
   run on the device rounds them: the static loop at batch 1 and 16, then transformers' own static-cache
   ``generate`` at batch 1 as a reference, then the dynamic loop at batch 1 and 16;
4. ``scale.json``: the scale rehearsal (``benchmarks/scale.py``) at Llama-3-8B shapes on the device (statistics,
   scoring, allocation, pruning with the sequential refit, checkpoint), with its memory per stage.

Then it prints the tables and the goals (decode at batch 1 >= 1.40x dense, at batch 16 >= 1.35x, prefill at
batch 16 >= 1.45x, dense batch-1 decode at >= 60% of the device's memory bandwidth, scoring and pruning each
within 3x the statistics pass).

    python benchmarks/gpu_check.py --out gpu_check                    # on a GPU (make gpu-check)
    python benchmarks/gpu_check.py --out gpu_check --device cpu       # the same steps on the CPU, at tiny shapes
    python benchmarks/gpu_check.py --table gpu_check                  # the tables of a check that ran

On the CPU (``--device cpu``) the shapes are the tiny checkpoint's, so that the script runs in the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eval.report import read_report  # noqa: E402
from eval.speed import (  # noqa: E402
    decode_step,
    measure_speed,
    shape_only_models,
    shaped_config,
    speed_table,
    synchronized_clock,
    weight_bytes,
)
from prune.models import default_round_to, resolve_device, resolve_dtype  # noqa: E402
from prune.paths import atomic_write_text, cache_dir  # noqa: E402

WIDTHS = REPO / "benchmarks" / "results" / "smollm2_30pct_report.json"
"""The run whose per-layer kept fractions the speed step transfers: the default 30% recipe on SmolLM2-135M."""
PEAK_BANDWIDTH_GBS = {"H200": 4800, "H100 80GB HBM3": 3350}
"""Memory bandwidth the vendors rate these devices at (GB/s), by a part of the name torch reports; assumed, not
measured."""
GOALS = {"decode batch 1": 1.40, "decode batch 16": 1.35, "prefill batch 16": 1.45}
WORDS = ["the", "cat", "dog", "runs", "over", "a", "small", "green", "field", "while", "birds", "sing", "in", "trees"]


def write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def environment(device: torch.device) -> dict:
    """Versions, the device and which optional packages import."""
    import transformers

    optional = ["lm_eval", "peft", "gguf", "llama_cpp", "accelerate", "matplotlib", "scipy"]
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "imports": {name: importlib.util.find_spec(name) is not None for name in optional},
    }


def tiny_checkpoint(directory: Path) -> None:
    """A random-weight Llama (4 layers, hidden 256, grouped-query attention) with a byte-level BPE tokenizer (the
    kind the GGUF export writes) trained on :func:`text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text(3000, seed=0)], trainer)
    end = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=end, bos_token=end, pad_token=end)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(fast),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    fast.save_pretrained(directory)


def text(words: int, seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (words,), generator=generator).tolist()
    return " ".join(WORDS[i] + ("." if i % 7 == 0 else "") for i in picks)


def run_step(device: str, work: Path, out: Path, seconds: float) -> None:
    """Step 2: the tiny checkpoint through ``python -m prune.run`` on ``device``."""
    tiny_checkpoint(work / "model")
    (work / "calibration.txt").write_text(text(6000, seed=1))
    (work / "evaluation.txt").write_text(text(3000, seed=2))
    data = work / "data"
    (data / "zeroshot").mkdir(parents=True)
    items = [{"query": text(12, seed=100 + i), "choices": ["yes", "no"], "gold": i % 2} for i in range(40)]
    (data / "zeroshot" / "boolq.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    has = environment(resolve_device(device))["imports"]
    recipe = {
        "output": str(out / "run" / "output"),
        "cache_dir": str(work / "cache"),
        "model": {"source": str(work / "model"), "dtype": "auto", "device": device},
        "calibration": {"source": str(work / "calibration.txt"), "samples": 16, "seqlen": 64},
        "pruning": {"target": 0.3, "min_ffn_channels": 64, "reconstruct": "lstsq-sequential"},
        "export": {"formats": ["hf", "gguf"] if has["gguf"] else ["hf"], "gguf_type": "f16"},
        "evaluation": {
            "perplexity": {"dataset": str(work / "evaluation.txt"), "seqlen": 128, "windows": 4},
            "zeroshot": {"enabled": has["lm_eval"], "tasks": ["boolq"], "source": "local", "limit": 40},
            "speed": {"prompt_tokens": 32, "new_tokens": 32, "warmup": 1, "repeats": 3, "decode_loop": "static"},
            "engine": {"prompt_tokens": 32, "new_tokens": 16, "warmup": 0, "repeats": 2},
        },
    }
    (out / "run").mkdir(parents=True, exist_ok=True)
    write_json(out / "run" / "recipe.json", recipe)
    run = [sys.executable, "-m", "prune.run", str(out / "run" / "recipe.json")]
    capped(run, seconds, out / "run" / "log.txt", {"PRUNE_DATA_DIR": str(data)})


def capped(command: list[str], seconds: float, log: Path, environ: dict | None = None) -> int | None:
    """Run ``command`` from the repository for at most ``seconds``, its output into ``log``; the exit code, or None
    when it was stopped at the cap."""
    with log.open("w") as file:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=file, stderr=subprocess.STDOUT, env={**os.environ, **(environ or {})}
        )
        try:
            return process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            file.write(f"\n[gpu check] stopped at its cap of {seconds:.0f} s\n")
            return None


def reference_generate(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """transformers' own ``generate`` with a static KV cache (which it compiles on CUDA), greedy, ``new_tokens``
    tokens: end-to-end tokens per second (prefill included) of the timed repeats, after one untimed first call."""
    settings = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "cache_implementation": "static",
        "pad_token_id": 0,
    }
    device = prompt.device
    with torch.inference_mode():
        start = synchronized_clock(device)
        model.generate(prompt, **settings)
        first = synchronized_clock(device) - start
        rates = []
        for _ in range(repeats):
            start = synchronized_clock(device)
            model.generate(prompt, **settings)
            rates.append(prompt.shape[0] * new_tokens / (synchronized_clock(device) - start))
    rates.sort()
    return {"first_call_seconds": first, "tokens_per_s_median": rates[len(rates) // 2], "tokens_per_s": rates}


def speed_step(shape: str, device_name: str, out: Path, batch_sizes: list[int], prompt: int, new: int) -> None:
    """Step 3 (in its own process): shape-only speed, each part written to ``speed.json`` as it finishes."""
    device = resolve_device(device_name)
    dtype = resolve_dtype("auto", device)
    round_to = default_round_to(device)
    models, _ = shape_only_models(shaped_config(shape, cache_dir(None)), read_report(WIDTHS), dtype, device, round_to)
    parameters = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    summary = {
        "shape": shape,
        "widths_from": str(WIDTHS.relative_to(REPO)),
        "round_to": round_to,
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": prompt,
        "new_tokens": new,
        "warmup": 1,
        "repeats": 3,
        "removed_fraction": 1 - parameters["pruned"] / parameters["dense"],
        "weight_bytes": {name: weight_bytes(model) for name, model in models.items()},
        "rows": [],
        "reference": {},
    }
    steps = {"static": {name: decode_step(model, "static") for name, model in models.items()}, "dynamic": None}
    parts = [("static", b) for b in batch_sizes] + [("reference", 1)] + [("dynamic", b) for b in batch_sizes]
    for loop, batch in parts:
        if loop == "reference":
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, models["dense"].config.vocab_size, (1, prompt), generator=generator).to(device)
            summary["reference"] = {name: reference_generate(model, ids, new, 3) for name, model in models.items()}
        else:
            results = measure_speed(models, prompt, batch, new, 1, 3, loop, progress=False, steps=steps[loop])
            summary["rows"].append(
                {
                    "loop": loop,
                    "batch_size": batch,
                    "parameters": parameters,
                    "results": {name: asdict(result) for name, result in results.items()},
                }
            )
        write_json(out / "speed.json", summary)
        print(f"[gpu check] speed: {loop} batch {batch} done", flush=True)


def check(args: argparse.Namespace) -> None:
    out, device = args.out, resolve_device(args.device)
    on_gpu = device.type == "cuda"
    if out.exists():
        shutil.rmtree(out)
    work = out / "work"
    work.mkdir(parents=True)
    write_json(out / "environment.json", environment(device))
    steps = []
    start = time.perf_counter()
    run_step(args.device, work, out, args.run_seconds)
    steps.append(("run", time.perf_counter() - start))
    shape = "llama-3-8b" if on_gpu else str(work / "model")
    batch_sizes = ["1", "16"] if on_gpu else ["1", "2"]
    tokens = (
        ["--prompt-tokens", "512", "--new-tokens", "64"] if on_gpu else ["--prompt-tokens", "16", "--new-tokens", "8"]
    )
    start = time.perf_counter()
    speed = [sys.executable, __file__, "--speed-step", shape, "--device", args.device, "--out", str(out)]
    capped([*speed, "--batch-sizes", *batch_sizes, *tokens], args.speed_seconds, out / "speed.log")
    steps.append(("speed", time.perf_counter() - start))
    start = time.perf_counter()
    samples = ["--samples", "4", "--seqlen", "64"] if on_gpu else ["--samples", "4", "--seqlen", "16"]
    scale = [sys.executable, "benchmarks/scale.py", "--shapes", shape, "--device", args.device, *samples]
    capped([*scale, "--work", str(work), "--json", str(out / "scale.json")], args.scale_seconds, out / "scale.log")
    steps.append(("scale", time.perf_counter() - start))
    write_json(out / "steps.json", dict(steps))
    shutil.rmtree(work, ignore_errors=True)
    print_tables(out)


def print_tables(out: Path) -> None:
    """The check's tables: the tiny run's stages, the speed table with the goals, the scale rehearsal."""
    environment_ = json.loads((out / "environment.json").read_text())
    print(f"environment: {json.dumps(environment_)}")
    report_path = out / "run" / "output" / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        print("\nrun: done; stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["stage_seconds"].items()))
        print(
            f"run: speed {report['speed']['decode_loop'] if report['speed'] else None} loop; notes: {report['notes']}"
        )
    else:
        log = (out / "run" / "log.txt").read_text().strip().splitlines() if (out / "run" / "log.txt").is_file() else []
        print(f"\nrun: no report; last line of its log: {log[-1] if log else '(none)'}")
    if (out / "speed.json").is_file():
        print_speed(json.loads((out / "speed.json").read_text()), environment_["device"])
    if (out / "scale.json").is_file():
        table = [
            sys.executable,
            "benchmarks/scale.py",
            "--table",
            str(out / "scale.json"),
            "--device",
            environment_["device"],
        ]
        subprocess.run(table, cwd=REPO, check=True)
        print_scale_goals(json.loads((out / "scale.json").read_text()))


def print_speed(summary: dict, device: str) -> None:
    print(
        f"\n{summary['shape']} shapes, {summary['dtype']}, widths from {summary['widths_from']} (FFN rounded to "
        f"{summary['round_to']}), {summary['removed_fraction']:.1%} of parameters removed; prompt "
        f"{summary['prompt_tokens']} tokens, {summary['new_tokens']} new tokens, 1 warm-up + 3 repeats"
    )
    for loop in ("static", "dynamic"):
        rows = [row for row in summary["rows"] if row["loop"] == loop]
        if rows:
            print(f"\n{loop} decode loop\n")
            print(speed_table(rows))
    if summary["reference"]:
        print("\ntransformers generate(cache_implementation='static'), batch 1, end to end (prefill included):\n")
        print("| model | first call s | tokens/s (median of 3) |\n|---|---:|---:|")
        for name, r in summary["reference"].items():
            print(f"| {name} | {r['first_call_seconds']:.1f} | {r['tokens_per_s_median']:.1f} |")
    static = {row["batch_size"]: row["results"] for row in summary["rows"] if row["loop"] == "static"}
    measured = {}
    if 1 in static:
        measured["decode batch 1"] = ratio(static[1], "decode")
    if 16 in static:
        measured["decode batch 16"] = ratio(static[16], "decode")
        measured["prefill batch 16"] = ratio(static[16], "prefill")
    print("\n| goal (static loop) | measured | goal |\n|---|---:|---:|")
    for name, goal in GOALS.items():
        if name in measured:
            print(f"| {name}, pruned / dense | {measured[name]:.2f}x | >= {goal:.2f}x |")
    if 1 in static:
        dense = static[1]["dense"]
        bandwidth = dense["weight_bytes"] * dense["decode_tokens_per_s_median"] / 1e9
        peak = next((gbs for part, gbs in PEAK_BANDWIDTH_GBS.items() if part in device), None)
        share = f", {bandwidth / peak:.0%} of the {peak} GB/s the device is rated for (goal >= 60%)" if peak else ""
        print(f"\ndense batch-1 decode reads its weights at {bandwidth:.0f} GB/s{share}")


def ratio(results: dict, measure: str) -> float:
    dense, pruned = results["dense"], results["pruned"]
    if measure == "decode":
        return pruned["decode_tokens_per_s_median"] / dense["decode_tokens_per_s_median"]
    return dense["prefill_ms_median"] / pruned["prefill_ms_median"]


def print_scale_goals(results: list[dict]) -> None:
    for result in results:
        seconds = {row["stage"]: row["seconds"] for row in result["stages"]}
        statistics = seconds.get("activation statistics")
        for stage in ("scoring", "pruning"):
            if statistics and stage in seconds:
                print(f"{result['shape']}: {stage} {seconds[stage] / statistics:.2f}x the statistics pass (goal <= 3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for the results (replaced)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (the reduced form)")
    parser.add_argument("--run-seconds", type=float, default=100, help="cap of the tiny run")
    parser.add_argument("--speed-seconds", type=float, default=300, help="cap of the speed step")
    parser.add_argument("--scale-seconds", type=float, default=100, help="cap of the scale rehearsal")
    parser.add_argument("--table", type=Path, help="only print the tables of a check's --out directory")
    parser.add_argument("--speed-step", help=argparse.SUPPRESS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print_tables(args.table)
    elif args.speed_step:
        speed_step(args.speed_step, args.device, args.out, args.batch_sizes, args.prompt_tokens, args.new_tokens)
    elif args.out:
        check(args)
    else:
        parser.error("give --out (run the check) or --table")


if __name__ == "__main__":
    main()
