"""Anonymous memory and time of the statistics pass, scoring and the sequential refit of a model cut to its first
layers, with the heap settings every command makes (:func:`prune.memory.give_large_frees_back`) or with glibc's own.

    python benchmarks/heap_growth.py MODEL_DIR [--layers 4] [--samples 8] [--glibc-default] [--refit-only]
        [--json out.json]

MODEL_DIR: a checkpoint directory (loaded in float32, only its first ``--layers`` layers); ``--samples`` x 256
random token ids; the statistics the default recipe's scorer needs (``activation-obs``, objective ``max_logit``),
then its scoring at damping 0.01, then pruning with the sequential refit (``lstsq-sequential``, damping 0.01) to
every query and KV head and the first ``FFN_KEPT`` of each layer's FFN channels (``--refit-only``: that alone).
A thread reads the process's anonymous resident memory (``RssAnon``: what the
heap and anonymous mappings hold; the weights loaded from safetensors are file-backed and not in it) every 10 ms.
Per phase: wall seconds, anonymous memory at its end and its peak during it (GiB). Freed tensors that the heap
keeps show as anonymous memory at the statistics' end that scoring starts from.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging

from prune.blocks import block_shape
from prune.memory import give_large_frees_back, make_resident
from prune.pruner import LayerPlan, prune_model
from prune.scoring import SCORERS, score_units
from prune.sequential import sequential_refit
from prune.statistics import collect_statistics

FFN_KEPT = 0.7
"""Share of each layer's FFN channels the refit phase keeps (the 1.5B's default recipe keeps ~73% of its decoder)."""


def anonymous_bytes() -> int:
    """This process's anonymous resident memory (``RssAnon`` of /proc/self/status), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise OSError("no RssAnon in /proc/self/status (Linux only)")


class AnonymousPeak:
    """The highest :func:`anonymous_bytes` read every 10 ms since the last :meth:`restart`."""

    def __init__(self) -> None:
        self.peak = anonymous_bytes()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, anonymous_bytes())
            time.sleep(0.01)

    def restart(self) -> None:
        self.peak = anonymous_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's heap thresholds as they are")
    parser.add_argument("--refit-only", action="store_true", help="only the sequential refit phase")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.glibc_default:
        give_large_frees_back()
    sampler = AnonymousPeak()
    rows = []
    start = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal start
        rows.append(
            {
                "phase": name,
                "seconds": time.perf_counter() - start,
                "anonymous_end_bytes": anonymous_bytes(),
                "anonymous_peak_bytes": sampler.peak,
            }
        )
        print(f"{name}: {rows[-1]['seconds']:.1f} s", flush=True)
        sampler.restart()
        start = time.perf_counter()

    logging.set_verbosity_error()  # not the load report of the layers left out
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, num_hidden_layers=args.layers)
    make_resident(model.eval())
    phase("load")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.samples, 256), generator=generator)
    needs, shape = SCORERS["activation-obs"].needs, block_shape(model.config)
    if not args.refit_only:
        with tempfile.TemporaryDirectory() as store, tempfile.TemporaryDirectory() as scratch:
            statistics = collect_statistics(
                model, ids, "max_logit", needs, progress=False, store=Path(store), scratch=Path(scratch)
            )
            phase("statistics")
            score_units(model, shape, "activation-obs", "sum", statistics, 0.01)
            phase("scoring")
    plans = [
        LayerPlan(tuple(range(w.query_heads)), tuple(range(w.kv_heads)), tuple(range(round(FFN_KEPT * w.ffn_channels))))
        for w in shape.layers
    ]
    with tempfile.TemporaryDirectory() as scratch:  # as a run keeps what the refit carries within a layer
        refit = sequential_refit(model, list(ids), shape.head_dim, 0.01, progress=False, scratch=Path(scratch))
        prune_model(model, plans, output_bias=True, refit=refit, in_place=True)
    phase("sequential refit")
    heap = "glibc's own thresholds" if args.glibc_default else "give_large_frees_back"
    print(f"\n{args.layers} layers of {args.model.name}, {args.samples} x 256 tokens, float32; heap: {heap}\n")
    print("| phase | seconds | anonymous at its end, GiB | anonymous peak, GiB |\n|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['phase']} | {row['seconds']:.1f} | {row['anonymous_end_bytes'] / 2**30:.2f} "
            f"| {row['anonymous_peak_bytes'] / 2**30:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"heap": heap, "layers": args.layers, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
