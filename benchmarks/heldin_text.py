"""Held-in text for choosing settings: calibration-corpus documents that the recipe's calibration never reads.

    python benchmarks/heldin_text.py [--recipe recipes/smollm2_30pct.yaml] [--output runs/heldin.txt]

Settings (reconstruction, damping, allocation constants, search budgets) are chosen by perplexity on this
text, never on the WikiText-2 test windows the quality table reports. The recipe's calibration sampling
is replayed with a tokenizer that records every document it is asked for; the documents it never touched
are joined in file order and written as running text (use it as ``evaluation.perplexity.dataset``).
Prints how many documents and tokens the text has.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prune.calibration import calibration_samples, read_documents
from prune.models import load_model
from prune.prepare import prepare
from prune.recipe import load_recipe


class RecordingTokenizer:
    """Wraps a tokenizer and records the texts it tokenizes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, set()

    def __call__(self, text, **kwargs):
        self.seen.add(text)
        return self.tokenizer(text, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/smollm2_30pct.yaml")
    parser.add_argument("--output", type=Path, default=Path("runs/heldin.txt"))
    args = parser.parse_args()
    prepared = prepare(load_recipe(args.recipe), overwrite=True)
    source = prepared.calibration_source
    if source.kind != "jsonl":
        raise SystemExit("error: held-in text needs a calibration source of documents (a .jsonl corpus)")
    recipe = prepared.recipe
    _, loaded = load_model(prepared.model_source, recipe.model.dtype, "cpu", prepared.cache)  # for its tokenizer
    tokenizer = RecordingTokenizer(loaded)
    c = recipe.calibration
    calibration_samples(tokenizer, source, c.samples, c.seqlen, c.seed)
    documents = [d for d in read_documents(source) if d not in tokenizer.seen]
    text = "\n\n".join(documents)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    tokens = len(tokenizer.tokenizer(text).input_ids)
    print(f"{args.output}: {len(documents)} of {len(read_documents(source))} documents, {tokens:,} tokens")


if __name__ == "__main__":
    main()
