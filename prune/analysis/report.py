"""``analysis.json``, ``analysis.md`` and the PNG figures of an activation-pattern analysis."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def density_figure(domains: dict, path: Path) -> None:
    """Finding 1: fraction of each layer's weights activated (absolute and relative threshold), one line per domain."""
    weights = domains["weights_per_layer"]
    layers = list(range(len(weights)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    panels = (
        (axes[0], "activated", f"A > gamma = {domains['gamma']:g}"),
        (axes[1], "activated_relative", f"A > {domains['gamma_relative']:g} x mean A of the domain"),
    )
    for ax, key, title in panels:
        for name in domains["names"]:
            ax.plot(layers, [n / w for n, w in zip(domains[key][name], weights, strict=True)], marker=".", label=name)
        ax.set_title(title)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("activated fraction of the layer's weights")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle("Activation density per layer and domain")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def similarity_by_layer_figure(domains: dict, deep: list[int], path: Path) -> None:
    """Finding 2: mean LLMDcos per layer, same-domain and cross-domain pairs, deep range shaded."""
    layers = list(range(len(domains["weights_per_layer"])))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.axvspan(deep[0] - 0.5, deep[1] - 0.5, color="#e9ecef", label="deep layers")
    ax.plot(layers, domains["same_domain_mean_per_layer"], marker=".", label="same domain (mean over domains)")
    ax.plot(layers, domains["cross_domain_mean_per_layer"], marker=".", label="cross domain (mean over pairs)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("LLMDcos")
    ax.set_title("Activation-pattern similarity per layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def boxplot_figure(domains: dict, path: Path) -> None:
    """Finding 2: per-layer distributions of LLMDcos over the sample pairs of chosen domain pairs."""
    pairs = list(domains["boxplots"])
    fig, axes = plt.subplots(len(pairs), 1, figsize=(11, 2.6 * len(pairs)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], pairs, strict=True):
        per_layer = domains["boxplots"][key]
        ax.boxplot(per_layer, positions=list(range(len(per_layer))), widths=0.6, showfliers=False)
        a, b = key.split("|")
        ax.set_title(f"{a} vs {b}" if a != b else f"{a} vs {a} (two halves)", fontsize=10)
        ax.set_ylabel("LLMDcos")
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("decoder layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heatmap_figure(domains: dict, deep: list[int], path: Path) -> None:
    """Finding 2: domain x domain mean LLMDcos over the deep layers."""
    names = domains["names"]
    values = [
        [domains["deep_similarity"].get(f"{a}|{b}", domains["deep_similarity"].get(f"{b}|{a}")) for b in names]
        for a in names
    ]
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2.5, 0.9 * len(names) + 1.5))
    image = ax.imshow(values, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if image.norm(value) < 0.5 else "black",
            )
    fig.colorbar(image, ax=ax, label="mean LLMDcos")
    ax.set_title(f"Pattern similarity, layers {deep[0]}-{deep[1] - 1}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spearman_figure(similarity: dict, deep: list[int], path: Path) -> None:
    """Finding 3: Spearman correlation with gold scores per layer, and the deep-layer score against gold."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    rhos = similarity["spearman_per_layer"]
    axes[0].axvspan(deep[0] - 0.5, deep[1] - 0.5, color="#e9ecef", label="deep layers")
    axes[0].plot(range(len(rhos)), rhos, marker=".", label="LLMDcos of one layer")
    axes[0].axhline(similarity["spearman_deep"], color="#d9480f", linestyle="--", label="mean over deep layers")
    axes[0].set_xlabel("decoder layer")
    axes[0].set_ylabel("Spearman rho with gold score")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    axes[1].scatter(similarity["gold"], similarity["deep_similarity"], s=8, alpha=0.6)
    axes[1].set_xlabel("gold relatedness")
    axes[1].set_ylabel(f"mean LLMDcos, layers {deep[0]}-{deep[1] - 1}")
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"{similarity['dataset']}: {similarity['pairs']} pairs, rho = {similarity['spearman_deep']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def analysis_markdown(result: dict) -> str:
    deep = result["deep_layers"]
    lines = [
        f"# Activation-pattern analysis: {result['model']['source']}",
        "",
        f"Objective D = {result['objective']}; deep layers {deep[0]}-{deep[1] - 1} (0-based).",
        "",
    ]
    domains = result.get("domains")
    if domains:
        names, weights = domains["names"], domains["weights_per_layer"]
        lines += [
            "## Finding 1: activation density per layer",
            "",
            f"{domains['samples']} inputs per domain (at most {domains['max_tokens']} tokens; mean tokens: "
            + ", ".join(f"{n} {domains['mean_tokens'][n]:.0f}" for n in names)
            + ").",
            f"Fraction of the layer's weights whose mean A exceeds {domains['gamma_relative']:g} x the domain's mean A "
            f"(absolute-threshold counts at gamma = {domains['gamma']:g} are in analysis.json).",
            "",
            "![density](activation_density.png)",
            "",
            _row(["layer"] + names),
            _row(["---"] * (len(names) + 1)),
        ]
        for layer, w in enumerate(weights):
            lines.append(_row([layer] + [f"{domains['activated_relative'][n][layer] / w:.3f}" for n in names]))
        lines += [
            "",
            "## Finding 2: cross-domain similarity per layer",
            "",
            f"LLMDcos between input i of one domain and input i of another ({domains['samples']} pairs; same domain: "
            f"first half against second half), estimated from count sketches of {domains['sketch_size']} buckets "
            "per layer.",
            "",
            "![by layer](similarity_by_layer.png)",
            "",
            "![heatmap](similarity_heatmap.png)",
            "",
            *(["![boxplots](similarity_boxplots.png)", ""] if domains["boxplots"] else []),
            _row(["layer", "same domain", "cross domain"]),
            _row(["---"] * 3),
        ]
        for layer, (same, cross) in enumerate(
            zip(domains["same_domain_mean_per_layer"], domains["cross_domain_mean_per_layer"], strict=True)
        ):
            lines.append(_row([layer, f"{same:.3f}", f"{cross:.3f}"]))
        lines.append("")
    similarity = result.get("similarity")
    if similarity:
        lines += [
            "## Finding 3: pattern similarity against sentence relatedness",
            "",
            f"{similarity['dataset']} ({similarity['file']}), {similarity['pairs']} pairs (seed {similarity['seed']}): "
            f"Spearman rho between the mean LLMDcos over layers {deep[0]}-{deep[1] - 1} and the gold score = "
            f"**{similarity['spearman_deep']:.3f}** (p = {similarity['p_value_deep']:.2g}, n = {similarity['pairs']}).",
            "",
            "![spearman](sts_spearman.png)",
            "",
            _row(["layer", "Spearman rho", "p", "mean LLMDcos"]),
            _row(["---"] * 4),
        ]
        for layer, (rho, p, mean) in enumerate(
            zip(
                similarity["spearman_per_layer"],
                similarity["p_value_per_layer"],
                similarity["mean_similarity_per_layer"],
                strict=True,
            )
        ):
            lines.append(_row([layer, f"{rho:.3f}", f"{p:.2g}", f"{mean:.3f}"]))
        lines.append("")
    lines += ["Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()), ""]
    return "\n".join(lines)


def write_analysis(result: dict, directory: Path) -> None:
    """analysis.json, analysis.md and the figures of the parts that ran."""
    deep = result["deep_layers"]
    if "domains" in result:
        density_figure(result["domains"], directory / "activation_density.png")
        similarity_by_layer_figure(result["domains"], deep, directory / "similarity_by_layer.png")
        heatmap_figure(result["domains"], deep, directory / "similarity_heatmap.png")
        if result["domains"]["boxplots"]:
            boxplot_figure(result["domains"], directory / "similarity_boxplots.png")
    if "similarity" in result:
        spearman_figure(result["similarity"], deep, directory / "sts_spearman.png")
    (directory / "analysis.json").write_text(json.dumps(result, indent=1))
    (directory / "analysis.md").write_text(analysis_markdown(result))
