"""Print the headline of one or more run reports as a markdown table (for BENCHMARKS.md).

    python benchmarks/report_table.py runs/smollm2_30pct/report.json [more reports ...]

Every number comes from the report.json files given; nothing is typed in by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

from eval.report import Report, read_report


def row(report: Report) -> str:
    method, params, ppl, speed = report.method, report.parameters, report.perplexity, report.speed
    described = f"{method.scoring} / {method.allocation} / {method.attention_unit} / {method.reconstruction}"
    prefill = decode = "not measured"
    if speed:
        d, p = speed.dense, speed.pruned
        prefill = (
            f"{d.prefill_ms_median:.0f} → {p.prefill_ms_median:.0f} ({d.prefill_ms_median / p.prefill_ms_median:.2f}x)"
        )
        decode = (
            f"{d.decode_tokens_per_s_median:.2f} → {p.decode_tokens_per_s_median:.2f} "
            f"({p.decode_tokens_per_s_median / d.decode_tokens_per_s_median:.2f}x)"
        )
    perplexity = f"{ppl.dense:.2f} → {ppl.pruned:.2f}" if ppl else "not measured"
    cells = [
        report.model.source,
        described,
        f"{method.target:.0%}",
        f"{params.pruned.total:,} ({1 - params.removed_fraction:.2%})",
        perplexity,
        prefill,
        decode,
        f"{sum(report.stage_seconds.values()) / 60:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(paths: list[str]) -> None:
    reports = [read_report(Path(p)) for p in paths]
    ppl = next((r.perplexity for r in reports if r.perplexity), None)
    speed = next((r.speed for r in reports if r.speed), None)
    line = f"Perplexity: {ppl.dataset}, {ppl.seqlen}-token windows x {ppl.windows}." if ppl else ""
    if speed:
        line += (
            f" Speed: {speed.device}, {speed.dtype}, batch {speed.batch_size}, prompt "
            f"{speed.prompt_tokens} tokens, {speed.new_tokens} new tokens, median of {speed.repeats} "
            f"after {speed.warmup} warm-up."
        )
    print(line.strip() + "\n")
    print(
        "| model | scores / allocation / attention unit / reconstruction | target | params kept "
        "| perplexity dense → pruned | prefill ms dense → pruned | decode tok/s dense → pruned | run minutes |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for report in reports:
        print(row(report))


if __name__ == "__main__":
    main(sys.argv[1:])
