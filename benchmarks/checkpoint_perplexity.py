"""Perplexity of a saved checkpoint as a run measures it, with each window's NLL, for comparing two checkpoints
window by window.

    python benchmarks/checkpoint_perplexity.py MODEL_DIR TEXT WINDOWS [--seqlen 2048] --json OUT.json

TEXT is what ``evaluation.perplexity.dataset`` takes (``wikitext2``, ``c4`` or a text file, e.g. the held-in text of
``benchmarks/heldin_text.py``); the text is read and tokenized as a run does (``prune.calibration.evaluation_tokens``)
and scored by the run's function (``eval.perplexity.perplexity``) on its first WINDOWS windows of SEQLEN tokens,
in float32. Prints one JSON line (perplexity, windows, seconds); ``--json`` also writes each window's summed NLL (nats).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.perplexity import perplexity
from prune.calibration import evaluation_tokens, resolve_text_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="a checkpoint a run saved (its model/ directory)")
    parser.add_argument("text", help="evaluation.perplexity.dataset: wikitext2, c4 or a text file")
    parser.add_argument("windows", type=int)
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    parser.add_argument("--json", type=Path, help="also write the result, with each window's NLL, here")
    args = parser.parse_args()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokens = evaluation_tokens(tokenizer, resolve_text_source(args.text, "TEXT"))
    with torch.no_grad():
        result = perplexity(model, tokens, args.seqlen, args.windows, "checkpoint")
    result |= {"model": args.model_dir, "text": args.text, "seconds": round(time.perf_counter() - start, 1)}
    if args.json is not None:
        args.json.write_text(json.dumps(result) + "\n")
    print(json.dumps({key: result[key] for key in ("perplexity", "windows", "seconds")}))


if __name__ == "__main__":
    main()
