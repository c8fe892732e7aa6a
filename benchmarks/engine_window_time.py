"""Seconds per perplexity window of a GGUF file in llama.cpp: what each window of the engine stage's check costs.

    python benchmarks/engine_window_time.py FILE.gguf TOKENIZER_DIR [--windows 2] [--threads 2]

The first ``--windows`` 2048-token windows of WikiText-2 (``$PRUNE_DATA_DIR``), tokenized by the tokenizer of
``TOKENIZER_DIR`` (a checkpoint directory), through :func:`eval.engine.engine_perplexity` as the run's engine
stage calls it (float16 KV cache); prints the seconds, the seconds a window and the perplexity.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transformers import AutoTokenizer

from eval.engine import engine_perplexity, open_gguf
from prune.calibration import evaluation_tokens, resolve_text_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokens = evaluation_tokens(tokenizer, resolve_text_source("wikitext2", "perplexity"))
    with open_gguf(args.gguf, 2048, args.threads, all_logits=False, exact_cache=False) as llm:
        start = time.perf_counter()
        result = engine_perplexity(llm, tokens, 2048, args.windows, progress=False)
        seconds = time.perf_counter() - start
    print(
        f"{args.gguf.name}: {args.windows} windows in {seconds:.1f} s ({seconds / args.windows:.1f} s a window), "
        f"perplexity {result['perplexity']:.2f}"
    )


if __name__ == "__main__":
    main()
