"""Print the headline of one or more run reports as a markdown table (for BENCHMARKS.md).

    python benchmarks/report_table.py runs/smollm2_30pct/report.json [more reports ...]

Every number comes from the report.json files given; nothing is typed in by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(report: dict) -> str:
    recipe, params, ppl, speed = report["recipe"], report["parameters"], report["perplexity"], report["speed"]
    pruning = recipe["pruning"]
    method = (
        f"{recipe['scoring']['method']} / {recipe['allocation']['strategy']} / {pruning['attention_unit']}"
        f" / {pruning.get('reconstruct', 'none')}"
    )
    prefill = decode = "not measured"
    if speed:
        d, p = speed["dense"], speed["pruned"]
        prefill = (
            f"{d['prefill_ms_median']:.0f} → {p['prefill_ms_median']:.0f} "
            f"({d['prefill_ms_median'] / p['prefill_ms_median']:.2f}x)"
        )
        decode = (
            f"{d['decode_tokens_per_s_median']:.2f} → {p['decode_tokens_per_s_median']:.2f} "
            f"({p['decode_tokens_per_s_median'] / d['decode_tokens_per_s_median']:.2f}x)"
        )
    return " | ".join(
        [
            "",
            report["model"]["source"],
            method,
            f"{pruning['target']:.0%}",
            f"{params['pruned']['total']:,} ({1 - params['removed_fraction']:.2%})",
            f"{ppl['dense']:.2f} → {ppl['pruned']:.2f}",
            prefill,
            decode,
            f"{sum(report['stage_seconds'].values()) / 60:.1f}",
            "",
        ]
    ).strip()


def main(paths: list[str]) -> None:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    ppl = first["perplexity"]
    speed = next((r["speed"] for r in reports if r["speed"]), None)
    line = f"Perplexity: {ppl['dataset']}, {ppl['seqlen']}-token windows x {ppl['windows']}."
    if speed:
        line += (
            f" Speed: {speed['device']}, {speed['dtype']}, batch {speed['batch_size']}, prompt "
            f"{speed['prompt_tokens']} tokens, {speed['new_tokens']} new tokens, median of {speed['repeats']} "
            f"after {speed['warmup']} warm-up."
        )
    print(line + "\n")
    print(
        "| model | scores / allocation / attention unit / reconstruction | target | params kept | perplexity dense → pruned "
        "| prefill ms dense → pruned | decode tok/s dense → pruned | run minutes |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for report in reports:
        print(row(report))


if __name__ == "__main__":
    main(sys.argv[1:])
