"""Peak memory of the largest single steps of a run at a model's widths, each in isolation on the CPU.

    python benchmarks/largest_steps.py [--ffn 8960] [--hidden 1536] [--vocab 151936] [--kept 0.72] [--tokens 16384]
                                       [--seqlen 2048] [--json steps.json]

The steps whose working memory, beyond the weights, sets a stage's peak on wide-FFN models (defaults: the widths of
Qwen2.5-Coder-1.5B), on random data of those shapes:

- ``obs scoring of down_proj``: :func:`prune.reconstruct.removal_errors` of every FFN channel of one down_proj
  [hidden, F] from its float32 Σ x xᵀ [F, F] (what the scoring stage does per layer);
- ``lstsq refit of down_proj``: :func:`prune.reconstruct.least_squares_refit` keeping ``--kept`` of the F columns
  (what the refit does per layer, one-shot or sequential);
- ``perplexity window``: :func:`eval.perplexity.perplexity` of one ``--seqlen``-token window of a one-layer float32
  model with the given hidden size and vocabulary (the output head and the loss dominate it).

Per step: the resident set's high-water mark above the resident set before the step (GiB; the inputs, made before,
do not count), and wall seconds. Σ x xᵀ comes from ``--tokens`` tokens of correlated random inputs, so the second
moment is well conditioned as a real one with enough tokens is.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from eval.perplexity import perplexity
from prune.memory import current_bytes, peak_bytes, reset_peak
from prune.reconstruct import least_squares_refit, removal_errors, second_moment

CPU = torch.device("cpu")


def moments(features: int, tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ x xᵀ [F, F] (float32) and Σ x [F] of ``tokens`` random inputs x = z B + noise (B of rank F/4)."""
    basis = torch.randn(features // 4, features, generator=generator) / features**0.25
    xxt, x_sum = torch.zeros(features, features), torch.zeros(features)
    for _ in range(0, tokens, 2048):
        x = torch.randn(2048, features // 4, generator=generator) @ basis
        x += 0.1 * torch.randn(2048, features, generator=generator)
        xxt += x.T @ x
        x_sum += x.sum(0)
    return xxt, x_sum


def measure(name: str, step) -> dict:
    reset_peak(CPU)
    before = current_bytes(CPU)
    start = time.perf_counter()
    step()
    row = {"step": name, "seconds": time.perf_counter() - start, "added_bytes": peak_bytes(CPU) - before}
    print(f"  {name}: +{row['added_bytes'] / 2**30:.2f} GiB, {row['seconds']:.1f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ffn", type=int, default=8960)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--kept", type=float, default=0.72, help="share of down_proj's input columns the refit keeps")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens behind Σ x xᵀ")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    xxt, x_sum = moments(args.ffn, args.tokens, generator)
    weight = torch.randn(args.hidden, args.ffn, generator=generator).to(torch.bfloat16)
    kept = torch.randperm(args.ffn, generator=generator)[: round(args.kept * args.ffn)].sort().values
    print(
        f"F = {args.ffn}, hidden {args.hidden}, vocabulary {args.vocab}; float64 [F+1, F+1]: "
        f"{8 * (args.ffn + 1) ** 2 / 2**30:.2f} GiB",
        flush=True,
    )
    rows = [
        measure(
            "obs scoring of down_proj",
            lambda: removal_errors(
                weight, second_moment(xxt, x_sum, args.tokens), torch.arange(args.ffn)[:, None], 1e-4
            ),
        ),
        measure(
            "lstsq refit of down_proj", lambda: least_squares_refit(weight, None, kept, xxt, x_sum, args.tokens, 1e-4)
        ),
    ]
    config = AutoConfig.for_model(
        "llama",
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=1,
        vocab_size=args.vocab,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=2,
        head_dim=128,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    text = torch.randint(0, args.vocab, (args.seqlen,), generator=generator)
    rows.append(measure("perplexity window", lambda: perplexity(model, text, args.seqlen, 1, progress=False)))
    print("\n| step | peak added GiB | seconds |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['step']} | {row['added_bytes'] / 2**30:.2f} | {row['seconds']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"arguments": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
