"""Recovery settings compared on held-in text: one pruned model, trained from the same start by each setting.

    python benchmarks/recovery_sweep.py runs/rec_base/model [--recipe recipes/smollm2_30pct_recover.yaml]
        [--heldin runs/heldin.txt] [--windows 8] --variant "NAME: key=value key=value" ... [--jsonl FILE]
    python benchmarks/recovery_sweep.py --table runs/recovery_sweep.jsonl [more.jsonl ...]

``MODEL_DIR`` is a pruned checkpoint (a run of the recipe with ``recovery.method=none``); the teacher is the
recipe's dense model. Each ``--variant`` is the recipe's ``recovery`` section with its ``key=value`` overrides
(``learning_rate=0.0005 train=all``); its perplexity is measured on the first ``--windows`` windows of
``--heldin`` (calibration-corpus documents the calibration never reads: ``benchmarks/heldin_text.py``), and
training reads the recipe's recovery source without the documents that begin inside those windows, so no
setting is chosen on text it trained on. Appends one JSON line per variant to ``--jsonl`` as soon as it is
done and prints the markdown table (for BENCHMARKS.md) at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from eval.perplexity import perplexity
from prune.calibration import read_documents, resolve_text_source
from prune.models import load_model
from prune.prepare import prepare
from prune.recipe import load_recipe
from prune.recovery import document_windows, recover


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"NAME: key=value key=value"`` -> (NAME, ["recovery.key=value", ...])."""
    name, _, settings = text.partition(":")
    return name.strip(), [f"recovery.{item}" for item in settings.split()]


def heldin_split(heldin: Path, documents: list[str], tokenizer, seqlen: int, windows: int):
    """(evaluation tokens [windows * seqlen], training documents): the held-in text's first windows, and the
    ``documents`` that do not begin inside them (found by their first 200 characters in the held-in text)."""
    text = heldin.read_text()
    tokens = torch.tensor(tokenizer(text).input_ids[: windows * seqlen], dtype=torch.long)
    if len(tokens) < windows * seqlen:
        raise SystemExit(f"error: {heldin} has fewer than {windows} windows of {seqlen} tokens")
    evaluated_characters = len(tokenizer.decode(tokens))
    training = [d for d in documents if not 0 <= text.find(d[:200]) < evaluated_characters]
    return tokens, training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, nargs="?", help="the pruned checkpoint every variant starts from")
    parser.add_argument("--recipe", default="recipes/smollm2_30pct_recover.yaml")
    parser.add_argument("--heldin", type=Path, default=Path("runs/heldin.txt"))
    parser.add_argument("--windows", type=int, default=8, help="held-in windows of the recipe's perplexity seqlen")
    parser.add_argument("--variant", action="append", default=[], help='"NAME: key=value ..." (recovery keys)')
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--jsonl", type=Path, default=Path("runs/recovery_sweep.jsonl"))
    parser.add_argument("--table", type=Path, nargs="+", help="only print the table of these JSON-lines files")
    args = parser.parse_args()
    if args.table:
        print_table([json.loads(line) for path in args.table for line in path.read_text().splitlines() if line.strip()])
        return
    if args.model_dir is None or not args.variant:
        parser.error("give the pruned checkpoint and at least one --variant")
    base = load_recipe(args.recipe, args.overrides)
    prepared = prepare(base, overwrite=True)
    teacher, tokenizer = load_model(prepared.model_source, "float32", "cpu", prepared.cache)
    seqlen = base.evaluation.perplexity.seqlen
    source = resolve_text_source(base.recovery.source, "recovery.source")
    documents = read_documents(source)
    tokens, training = heldin_split(args.heldin, documents, tokenizer, seqlen, args.windows)
    dense = perplexity(teacher, tokens, seqlen, None, "dense")["perplexity"]
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    windows_by_seqlen: dict[int, torch.Tensor] = {}  # training windows [n, seqlen], tokenized once per seqlen
    with tempfile.TemporaryDirectory() as scratch:
        for variant in args.variant:
            name, overrides = parse_variant(variant)
            settings = load_recipe(args.recipe, [*args.overrides, *overrides]).recovery
            if settings.seqlen not in windows_by_seqlen:
                windows_by_seqlen[settings.seqlen] = document_windows(
                    tokenizer, training, settings.seqlen, f"{source.name} without the held-in windows' documents"
                )
            windows = windows_by_seqlen[settings.seqlen]
            student = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True, dtype=torch.float32)
            _, outcome = recover(
                student.eval(),
                teacher,
                windows,
                lambda model: perplexity(model, tokens, seqlen, None, progress=False)["perplexity"],
                settings,
                Path(scratch) / name.replace(" ", "_"),
            )
            row = {
                "name": name,
                "overrides": overrides,
                "method": settings.method,
                "train": settings.train,
                "learning_rate": settings.learning_rate,
                "tokens": outcome.tokens_seen,
                "steps": outcome.steps,
                "training_documents": len(training),
                "corpus_documents": len(documents),
                "heldin_windows": f"{args.windows} x {seqlen}",
                "dense_perplexity": dense,
                "pruned_perplexity": outcome.curve[0]["perplexity"],
                "recovered_perplexity": outcome.curve[-1]["perplexity"],
                "curve": outcome.curve,
                "training_seconds": outcome.tokens_seen / outcome.tokens_per_second,
                "tokens_per_second": outcome.tokens_per_second,
            }
            rows.append(row)
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """One row per variant: its overrides, held-in perplexity before and after, training speed."""
    first = rows[0]
    print(
        f"Held-in perplexity ({first['heldin_windows']} tokens), dense {first['dense_perplexity']:.2f}; "
        f"training on {first['training_documents']} of {first['corpus_documents']} documents.\n"
    )
    print("| variant | overrides | tokens | pruned | recovered | training tokens/s | training s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        overrides = " ".join(o.removeprefix("recovery.") for o in row["overrides"]) or "(the recipe's)"
        print(
            f"| {row['name']} | `{overrides}` | {row['tokens']:,} | {row['pruned_perplexity']:.2f} | "
            f"{row['recovered_perplexity']:.2f} | {row['tokens_per_second']:,.1f} | {row['training_seconds']:,.0f} |"
        )


if __name__ == "__main__":
    main()
