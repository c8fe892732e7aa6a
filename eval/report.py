"""``report.json`` (every measured number, keys documented in README) and ``report.md`` (the same, for people)."""

from __future__ import annotations

import json
from pathlib import Path

from eval.figures import write_figures


def _ratio(pruned: float | None, dense: float | None) -> str:
    return f"{pruned / dense:.3f}x" if pruned is not None and dense else "n/a"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _limit(zeroshot: dict) -> str:
    return f", first {zeroshot['limit']} items each" if zeroshot["limit"] else ""


def _zeroshot_section(zeroshot: dict) -> list[str]:
    source = (
        f"the toolkit's local task definitions over `{zeroshot['data_dir']}/zeroshot`"
        if zeroshot["source"] == "local"
        else "lm-eval's registered tasks (Hugging Face Hub data)"
    )
    lines = [
        "## Zero-shot accuracy (%)",
        "",
        f"lm-eval-harness, {source}{_limit(zeroshot)}, seed {zeroshot['seed']}. The mean is over "
        f"{', '.join(zeroshot['mean_tasks'])} and uses `{zeroshot['mean_metric']}`.",
        "",
        "| task | items | dense acc | pruned acc | dense acc_norm | pruned acc_norm |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for task, dense in zeroshot["dense"]["tasks"].items():
        pruned = zeroshot["pruned"]["tasks"][task]
        norm = f"{100 * dense['acc_norm']:.1f} | {100 * pruned['acc_norm']:.1f}" if "acc_norm" in dense else "- | -"
        lines.append(f"| {task} | {dense['items']} | {100 * dense['acc']:.1f} | {100 * pruned['acc']:.1f} | {norm} |")
    return lines + [""]


def _recovery_section(recovery: dict, ppl: dict) -> list[str]:
    settings = recovery["settings"]
    trained = (
        "LoRA adapters (merged into the weights)" if recovery["method"] == "lora" else f"weights: {settings['train']}"
    )
    terms = []
    if settings["kl_weight"]:
        terms.append(f"{settings['kl_weight']} x T^2 KL(dense || pruned) at T = {settings['temperature']}")
    if settings["nll_weight"]:
        terms.append(f"{settings['nll_weight']} x NLL of the text")
    loss = " + ".join(terms)
    lines = [
        "## Recovery",
        "",
        f"`{recovery['method']}` on {recovery['tokens_seen']:,} tokens of {recovery['source']} "
        f"({recovery['steps']} steps of {settings['batch_size']} x {settings['seqlen']} tokens, "
        f"{recovery['epochs']:.2f} passes over its {recovery['training_windows']:,} windows); trained {trained}; "
        f"loss {loss}; AdamW, learning rate {settings['learning_rate']}, {settings['schedule']} schedule, "
        f"{settings['warmup_steps']} warm-up steps. {recovery['tokens_per_second']:,.0f} training tokens/s on "
        f"{recovery['device']}"
        + (f" (resumed at step {recovery['resumed_from_step']})" if recovery["resumed_from_step"] else "")
        + f". Per-step log: `{recovery['log']}`.",
        "",
    ]
    if ppl:
        lines += [
            f"| {ppl['dataset']} perplexity ({ppl['seqlen']} x {ppl['windows']}) | dense | pruned | recovered |",
            "|---|---:|---:|---:|",
            f"| | {ppl['dense']:.2f} | {ppl['before_recovery']:.2f} | {ppl['pruned']:.2f} |",
            "",
        ]
    return lines + [f"![held-out perplexity during recovery](recovery.png) (held-out: {recovery['heldout']})", ""]


def render_markdown(report: dict) -> str:
    """The human-readable report: headline dense vs pruned, per-layer widths, stage times, provenance."""
    params, ppl, speed, recipe = report["parameters"], report.get("perplexity"), report.get("speed"), report["recipe"]
    if recipe["scoring"]["method"] == "shortgpt":
        how = "shortgpt: whole layers, lowest Block Influence first"
    else:
        how = (
            f"{recipe['scoring']['method']} scores, {recipe['allocation']['strategy']} allocation, "
            f"{recipe['pruning']['attention_unit']} attention units, {recipe['pruning']['reconstruct']} reconstruction"
        )
    recovery = report.get("recovery")
    pruned_label = "pruned + recovered" if recovery else "pruned"
    lines = [
        f"# Pruning report: {report['model']['source']}",
        "",
        f"Target: remove {recipe['pruning']['target']:.1%} of total parameters ({how}). "
        f"Removed: **{params['removed_fraction']:.2%}** of total parameters.",
        "",
        f"| metric | dense | {pruned_label} | {pruned_label} / dense |",
        "|---|---:|---:|---:|",
        f"| total parameters | {params['dense']['total']:,} | {params['pruned']['total']:,} | {_ratio(params['pruned']['total'], params['dense']['total'])} |",
        f"| decoder-block parameters | {params['dense']['decoder_blocks']:,} | {params['pruned']['decoder_blocks']:,} | {_ratio(params['pruned']['decoder_blocks'], params['dense']['decoder_blocks'])} |",
    ]
    if ppl:
        lines.append(
            f"| {ppl['dataset']} perplexity ({ppl['seqlen']}-token windows x {ppl['windows']}) | "
            f"{ppl['dense']:.2f} | {ppl['pruned']:.2f} | {_ratio(ppl['pruned'], ppl['dense'])} |"
        )
        if recovery:
            lines.append(
                f"| {ppl['dataset']} perplexity before recovery | {ppl['dense']:.2f} | {ppl['before_recovery']:.2f} | "
                f"{_ratio(ppl['before_recovery'], ppl['dense'])} |"
            )
    zeroshot = report.get("zeroshot")
    if zeroshot and zeroshot["dense"]["mean"] is not None:
        lines.append(
            f"| zero-shot mean {zeroshot['mean_metric']} ({len(zeroshot['mean_tasks'])} tasks{_limit(zeroshot)}) | "
            f"{100 * zeroshot['dense']['mean']:.2f} | {100 * zeroshot['pruned']['mean']:.2f} | "
            f"{_ratio(zeroshot['pruned']['mean'], zeroshot['dense']['mean'])} |"
        )
    if speed:
        d, p = speed["dense"], speed["pruned"]
        lines += [
            f"| prefill latency, median ms ({speed['batch_size']} x {speed['prompt_tokens']} tokens) | "
            f"{d['prefill_ms_median']:.1f} | {p['prefill_ms_median']:.1f} | {_ratio(p['prefill_ms_median'], d['prefill_ms_median'])} |",
            f"| decode tokens/s, median ({speed['new_tokens']} new tokens) | "
            f"{d['decode_tokens_per_s_median']:.1f} | {p['decode_tokens_per_s_median']:.1f} | "
            f"{_ratio(p['decode_tokens_per_s_median'], d['decode_tokens_per_s_median'])} |",
            f"| linear multiply-adds per token (lm_head included) | {d['linear_macs_per_token']:,} | "
            f"{p['linear_macs_per_token']:,} | {_ratio(p['linear_macs_per_token'], d['linear_macs_per_token'])} "
            f"(speedup limit {d['linear_macs_per_token'] / p['linear_macs_per_token']:.2f}x) |",
            f"| peak memory (weights + working) | {_mib(d['peak_memory_bytes'])} | {_mib(p['peak_memory_bytes'])} | "
            f"{_ratio(p['peak_memory_bytes'], d['peak_memory_bytes'])} |",
        ]
    lines += [""]
    if speed:
        lines += [
            f"Speed: {speed['device']}, {speed['dtype']}, dense and pruned interleaved in one process, "
            f"{speed['warmup']} warm-up and {speed['repeats']} timed repeats (median; spread in report.json).",
            "",
        ]
    lines += ["![headline metrics, dense and pruned](headline.png)", ""]
    if recovery:
        lines += _recovery_section(recovery, ppl)
    if zeroshot:
        lines += _zeroshot_section(zeroshot)
    lines += [
        "## Per-layer widths",
        "",
        "![kept width per layer](widths.png)",
        "",
        "![allocation per layer](allocation.png)",
        "",
        "| layer | query heads | KV groups | FFN channels | requested sparsity | activated weights |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in report["layers"]:
        d, p = layer["dense"], layer["pruned"]
        activated = f"{layer['activated_weights']:,.0f}" if layer.get("activated_weights") is not None else "-"
        if p is None:
            lines.append(f"| {layer['index']} | removed | removed | removed | 1.000 | {activated} |")
            continue
        lines.append(
            f"| {layer['index']} | {d['query_heads']} → {p['query_heads']} | {d['kv_groups']} → {p['kv_groups']} | "
            f"{d['ffn_channels']} → {p['ffn_channels']} | {layer['requested_sparsity']:.3f} | {activated} |"
        )
    stats = report.get("statistics")
    lines += ["", "## Provenance", ""]
    if stats:
        lines.append(
            f"- Activation statistics: {stats['samples']} samples x {stats['seqlen']} tokens of {stats['source']} "
            f"(seed {stats['seed']}, D = {stats['objective']}), "
            + ("**reused** from " if stats["reused"] else "computed and cached at ")
            + f"`{stats['cache_path']}`."
            + (
                f" Peak memory of the pass: weights + {_mib(stats['pass_added_bytes'])} = "
                f"{stats['peak_over_weights']:.2f}x the weight bytes."
                if stats.get("pass_added_bytes") is not None
                else ""
            )
        )
    for name in ("perplexity", "zeroshot"):
        section = report.get(name)
        if section and section.get("dense_reused_from"):
            lines.append(
                f"- Dense {name} reused from `{section['dense_reused_from']}` (same model file, dtype, device and settings)."
            )
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    lines.append(
        f"- Checkpoint: `{report['checkpoint']['path']}` "
        + (
            "(per-layer widths: loads with `trust_remote_code=True`)."
            if report["checkpoint"]["remote_code"]
            else "(stock configuration, no remote code)."
        )
    )
    lines += ["", "## Stage wall times", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in report["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, directory: Path) -> None:
    """``report.json``, the figures (PNG) and ``report.md``, which embeds them, into ``directory``."""
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_figures(report, directory)
    (directory / "report.md").write_text(render_markdown(report))
