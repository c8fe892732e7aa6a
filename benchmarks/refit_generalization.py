"""How well the least-squares refit of one layer's ``down_proj``, fitted on the calibration tokens, matches the dense
layer on text it was not fitted on, as the calibration grows.

    python benchmarks/refit_generalization.py MODEL_DIR --data C4.jsonl [--layer 3] [--samples 64 128 256]
        [--heldout 32] [--kept 0.72] [--dampings 0.0001 0.01 0.1 1 10 100] [--json out.json]

MODEL_DIR: a checkpoint directory (float32, its first ``--layer`` + 1 layers run). The calibration windows are the
recipe's draw (``prune.calibration.calibration_samples``, 256 tokens, seed 0), so the first 64 of a larger draw
are the 64 a default run uses; the held-out windows are the first 256 tokens of documents that no calibration window
came from. The kept FFN channels are fixed for every row (the largest ``‖W[:, j]‖² E[x_j²]`` over the largest
draw, Wanda-sp's score) so that only the refit's data changes. Per row: the relative squared error
``‖Y − Ŷ‖² / ‖Y‖²`` of ``down_proj``'s output on the tokens it was fitted on and on the held-out tokens, for the kept
columns as they are (no refit) and for the refit with N samples and each damping (``pruning.damping``'s meaning).
The errors leave out each window's first token: its output is orders of magnitude larger than the others' (a
massive activation) and would make the sums its own; the refit is fitted on every token, as a run's is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from heldin_text import RecordingTokenizer  # the script beside this one
from transformers import AutoModelForCausalLM, AutoTokenizer

from prune.calibration import calibration_samples, read_documents, resolve_text_source
from prune.reconstruct import least_squares_refit
from prune.statistics import add_gram, filled_gram

SEQLEN = 256


def down_proj_inputs(model, layer: int, windows: torch.Tensor) -> torch.Tensor:
    """``down_proj``'s input at decoder layer ``layer`` for each window: [windows, SEQLEN, F] float32."""
    captured: list[torch.Tensor] = []
    module = model.model.layers[layer].mlp.down_proj

    def hook(_, args):
        captured.append(args[0][0].detach().clone())
        raise StopIteration  # nothing after this layer is needed

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for window in windows:
                with contextlib.suppress(StopIteration):
                    model(window[None])
    finally:
        handle.remove()
    return torch.stack(captured)


def relative_error(inputs: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, refit, chunk: int = 4096) -> float:
    """‖Y − Ŷ‖² / ‖Y‖² over the tokens of ``inputs`` [n, F] for Y = inputs Wᵀ and Ŷ the kept columns' output
    (``refit`` (weights, bias) or, when None, W[:, kept] as it is), ``chunk`` tokens at a time."""
    error = total = 0.0
    for first in range(0, len(inputs), chunk):
        block = inputs[first : first + chunk]
        dense = (block @ weight.T).double()
        if refit is None:
            approx = (block[:, kept] @ weight[:, kept].T).double()
        else:
            approx = block[:, kept].double() @ refit[0].T + refit[1]
        error += float(((dense - approx) ** 2).sum())
        total += float((dense**2).sum())
    return error / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--kept", type=float, default=0.72)
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.0001, 0.01, 0.1, 1, 10, 100])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = RecordingTokenizer(AutoTokenizer.from_pretrained(args.model))
    source = resolve_text_source(str(args.data), "calibration.source")
    calibration = calibration_samples(tokenizer, source, max(args.samples), SEQLEN, 0)
    unseen = [d for d in read_documents(source) if d not in tokenizer.seen]
    heldout_ids = [ids[:SEQLEN] for ids in (tokenizer.tokenizer(d).input_ids for d in unseen) if len(ids) >= SEQLEN]
    heldout = torch.tensor(heldout_ids[: args.heldout], dtype=torch.long)
    print(f"{len(calibration)} calibration windows; {len(heldout)} held-out ones, from {len(unseen)} unused documents")

    start = time.perf_counter()
    fitted_inputs = down_proj_inputs(model, args.layer, calibration)
    heldout_inputs = down_proj_inputs(model, args.layer, heldout)[:, 1:].flatten(0, 1)
    print(f"inputs of layer {args.layer}'s down_proj: {time.perf_counter() - start:.1f} s")
    weight = model.model.layers[args.layer].mlp.down_proj.weight.detach()
    features = weight.shape[1]
    all_tokens = fitted_inputs.flatten(0, 1)
    score = (weight**2).sum(0) * sum((block**2).sum(0) for block in all_tokens.split(4096))
    kept = score.argsort(descending=True)[: round(args.kept * features)].sort().values

    after_first = fitted_inputs[:, 1:]  # the errors leave out each window's first token (its massive activation)
    rows = [{"samples": max(args.samples), "damping": None,
             "fitted": relative_error(after_first.flatten(0, 1), weight, kept, None),
             "heldout": relative_error(heldout_inputs, weight, kept, None)}]  # fmt: skip
    print(f"no refit: fitted {rows[0]['fitted']:.4f}, held-out {rows[0]['heldout']:.4f}")
    gram, sums, counted = torch.zeros(features, features), torch.zeros(features, dtype=torch.float64), 0
    for samples in sorted(args.samples):
        for window in fitted_inputs[counted:samples]:
            add_gram(gram, window.contiguous())
            sums += window.double().sum(0)
        counted = samples
        whole = filled_gram(gram)  # whole; later windows add to its lower triangle again
        fitted = after_first[:samples].flatten(0, 1)
        for damping in args.dampings:
            refit = least_squares_refit(weight, None, kept, whole, sums, samples * SEQLEN, damping)
            row = {"samples": samples, "damping": damping, "fitted": relative_error(fitted, weight, kept, refit),
                   "heldout": relative_error(heldout_inputs, weight, kept, refit)}  # fmt: skip
            rows.append(row)
            print(f"refit on {samples} x {SEQLEN} tokens ({samples * SEQLEN / features:.2f} per input), damping "
                  f"{damping:g}: fitted {row['fitted']:.4f}, held-out {row['heldout']:.4f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"layer": args.layer, "kept": len(kept), "features": features,
                                         "heldout_tokens": len(heldout_inputs), "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
