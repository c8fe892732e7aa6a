"""Print the recovery results of finished runs as markdown tables (numbers read from each report.json).

    python benchmarks/recovery_curve.py runs/smollm2_30pct_recover runs/smollm2_20pct_recover

First table: one row per run (parameters removed, perplexity dense / pruned / recovered, zero-shot
mean when evaluated, tokens, training tokens/s). Second: the held-out curve of every run, by step.
Third, when the runs evaluated zero-shot accuracy: per task, dense -> pruned + recovered.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.report import Report, read_report


def summary_row(name: str, report: Report) -> str:
    ppl, recovery, zeroshot = report.perplexity, report.recovery, report.zeroshot
    assert ppl is not None and recovery is not None and ppl.before_recovery is not None
    mean = "-"
    if zeroshot and zeroshot.dense.mean is not None and zeroshot.pruned.mean is not None:
        mean = f"{100 * zeroshot.dense.mean:.2f} / {100 * zeroshot.pruned.mean:.2f}"
    return (
        f"| {name} | {report.parameters.removed_fraction:.2%} | {recovery.method} | "
        f"{recovery.tokens_seen:,} | {ppl.dense:.2f} | {ppl.before_recovery:.2f} | {ppl.pruned:.2f} | "
        f"{mean} | {recovery.tokens_per_second:,.1f} | {recovery.seconds:,.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (or their report.json)")
    args = parser.parse_args()
    reports: dict[str, Report] = {}
    for run in args.runs:
        report = read_report(run)
        if report.recovery is None or report.perplexity is None:
            raise SystemExit(f"{run}: this run has no recovery stage")
        reports[run.name if run.is_dir() else run.parent.name] = report
    first = next(iter(reports.values())).perplexity
    assert first is not None
    print(
        f"| run | removed | recovery | tokens | {first.dataset} ppl dense | pruned | recovered | "
        "zero-shot mean acc dense / recovered | training tokens/s | training s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, report in reports.items():
        print(summary_row(name, report))
    print()
    names = list(reports)
    print("| step | tokens | " + " | ".join(f"{name}: held-out ppl" for name in names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    curves = {
        name: {point.step: point for point in report.recovery.curve}
        for name, report in reports.items()
        if report.recovery
    }
    for step in sorted({step for curve in curves.values() for step in curve}):
        tokens = next(curve[step].tokens for curve in curves.values() if step in curve)
        cells = [f"{curves[name][step].perplexity:.2f}" if step in curves[name] else "-" for name in names]
        print(f"| {step} | {tokens:,} | " + " | ".join(cells) + " |")
    zeroshot = {name: report.zeroshot for name, report in reports.items() if report.zeroshot}
    if zeroshot:
        print()
        print("| task (acc %, dense -> recovered) | " + " | ".join(zeroshot) + " |")
        print("|---|" + "---:|" * len(zeroshot))
        for task in next(iter(zeroshot.values())).dense.tasks:
            cells = [
                f"{100 * z.dense.tasks[task].acc:.1f} -> {100 * z.pruned.tasks[task].acc:.1f}"
                if task in z.dense.tasks
                else "-"
                for z in zeroshot.values()
            ]
            print(f"| {task} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
