"""PNG figures of a pruning report (matplotlib, Agg backend: no display needed).

Each function takes the run's :class:`eval.report.Report` and writes one figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from eval.report import Report, WidthsReport

DENSE_COLOR, PRUNED_COLOR = "#9aa5b1", "#d9480f"


def _width(widths: WidthsReport | None, key: str) -> int:
    """A width of a layer (0 when removed); ``ffn_channels`` counts every expert's."""
    if widths is None:
        return 0
    return widths.ffn_channels * max(1, widths.experts) if key == "ffn_channels" else getattr(widths, key)


def layer_widths_figure(report: Report, path: Path) -> None:
    """Per layer: query heads and FFN channels (over all experts of a mixture-of-experts layer), dense (grey)
    and kept (orange); removed layers keep 0."""
    layers = report.layers
    index = [layer.index for layer in layers]
    experts = any(layer.dense.experts for layer in layers)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ffn_label = "FFN channels (all experts)" if experts else "FFN channels"
    for ax, key, label in ((axes[0], "query_heads", "query heads"), (axes[1], "ffn_channels", ffn_label)):
        ax.bar(index, [_width(layer.dense, key) for layer in layers], color=DENSE_COLOR, label="dense")
        ax.bar(index, [_width(layer.pruned, key) for layer in layers], color=PRUNED_COLOR, width=0.6, label="pruned")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper right")
    axes[1].set_xlabel("decoder layer")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Kept width per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def allocation_figure(report: Report, path: Path) -> None:
    """Per layer: activated weights (bars, when the allocation measured them) and the sparsity it asked for (line)."""
    layers = report.layers
    index = [layer.index for layer in layers]
    fig, ax = plt.subplots(figsize=(10, 4))
    sparsity_ax = ax
    activated = [layer.activated_weights for layer in layers]
    if all(value is not None for value in activated):
        ax.bar(index, activated, color=DENSE_COLOR, label="activated weights")
        ax.set_ylabel("activated weights (A above threshold)")
        sparsity_ax = ax.twinx()
    sparsity_ax.plot(
        index,
        [layer.requested_sparsity for layer in layers],
        color=PRUNED_COLOR,
        marker="o",
        label="requested sparsity",
    )
    sparsity_ax.set_ylabel("requested sparsity of the layer")
    sparsity_ax.set_ylim(0, 1)
    ax.set_xlabel("decoder layer")
    handles = [h for a in {ax, sparsity_ax} for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper left")
    ax.set_title(f"Allocation ({report.allocation.strategy})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline_metrics(report: Report) -> list[tuple[str, float, float]]:
    """(label, dense, pruned) of every headline metric the report holds."""
    params = report.parameters
    metrics = [("parameters (millions)", params.dense.total / 1e6, params.pruned.total / 1e6)]
    if report.perplexity:
        ppl = report.perplexity
        metrics.append((f"{ppl.dataset} perplexity", ppl.dense, ppl.pruned))
    zs = report.zeroshot
    if zs and zs.dense.mean is not None and zs.pruned.mean is not None:
        metrics.append((f"zero-shot mean {zs.mean_metric} (%)", 100 * zs.dense.mean, 100 * zs.pruned.mean))
    if report.speed:
        d, p = report.speed.dense, report.speed.pruned
        metrics.append(("decode tokens/s", d.decode_tokens_per_s_median, p.decode_tokens_per_s_median))
        metrics.append(("prefill ms", d.prefill_ms_median, p.prefill_ms_median))
    return metrics


def headline_figure(report: Report, path: Path) -> None:
    """One small panel per headline metric: dense and pruned bars with their values."""
    metrics = headline_metrics(report)
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.2), squeeze=False)
    for ax, (label, dense, pruned) in zip(axes[0], metrics, strict=True):
        bars = ax.bar(["dense", "pruned"], [dense, pruned], color=[DENSE_COLOR, PRUNED_COLOR])
        ax.bar_label(bars, labels=[f"{dense:,.4g}", f"{pruned:,.4g}"], fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recovery_figure(report: Report, path: Path) -> None:
    """Held-out perplexity against training tokens seen (line), and the perplexity on the evaluated windows
    before and after recovery (squares) and of the dense model (dashed): the two texts differ, so compare
    each with its own kind."""
    recovery, ppl = report.recovery, report.perplexity
    assert recovery is not None and ppl is not None and ppl.before_recovery is not None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        [point.tokens for point in recovery.curve],
        [point.perplexity for point in recovery.curve],
        color=PRUNED_COLOR,
        marker="o",
        label=f"held-out ({recovery.heldout})",
    )
    ax.plot(
        [0, recovery.tokens_seen],
        [ppl.before_recovery, ppl.pruned],
        color="#1c7ed6",
        marker="s",
        linestyle=":",
        label=f"evaluated windows: pruned {ppl.before_recovery:.2f}, recovered {ppl.pruned:.2f}",
    )
    ax.axhline(ppl.dense, color=DENSE_COLOR, linestyle="--", label=f"dense, evaluated windows ({ppl.dense:.2f})")
    ax.set_xlabel(f"training tokens seen ({recovery.source})")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Recovery ({recovery.method})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES = {
    "headline.png": headline_figure,
    "widths.png": layer_widths_figure,
    "allocation.png": allocation_figure,
    "recovery.png": recovery_figure,
}
"""File name -> drawing function; ``recovery.png`` only for a run with a recovery stage."""


def write_figures(report: Report, directory: Path) -> list[str]:
    """Write every figure the report has data for into ``directory``; returns their file names."""
    names = [name for name in FIGURES if name != "recovery.png" or report.recovery]
    for name in names:
        FIGURES[name](report, directory / name)
    return names
