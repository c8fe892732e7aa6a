"""The model card (``README.md``) written into every pruned checkpoint, from the run's report.

Hugging Face model-card format: YAML front matter (``base_model``, ``library_name``, ``pipeline_tag``,
``license`` when known, ``tags``, ``model-index`` with what lm-eval measured on every item of a task, and the
toolkit's own measurements under ``pruning``), then a short body: what was removed, the per-layer widths, how to load
the checkpoint and run its GGUF file, and where the base model comes from. Every number is the
report's; nothing is written by hand.
"""

from __future__ import annotations

from typing import Any

import yaml

from eval.report import Report, method_description, widths_cells, widths_columns
from eval.stages.zeroshot import change_text, margin_text
from eval.zeroshot import percent

ZEROSHOT_DATASETS = {
    "boolq": ("BoolQ", "boolq"),
    "piqa": ("PIQA", "piqa"),
    "hellaswag": ("HellaSwag", "hellaswag"),
    "winogrande": ("WinoGrande", "winogrande"),
    "arc_easy": ("ARC-Easy", "ai2_arc"),
    "arc_challenge": ("ARC-Challenge", "ai2_arc"),
    "openbookqa": ("OpenBookQA", "openbookqa"),
    "social_iqa": ("Social IQa", "social_i_qa"),
}
"""lm-eval task -> (dataset name, dataset type) for ``model-index``."""


def _model_index(report: Report, name: str) -> list[dict[str, Any]]:
    """``model-index``: the pruned model's zero-shot accuracies as lm-eval measured them, only when every item of
    the tasks was scored (a first-N-items accuracy is too noisy to publish as a result), each metric named with
    its item count and standard error."""
    zeroshot = report.zeroshot
    if zeroshot is None or zeroshot.limit is not None:
        return []
    results = []
    for task, accuracy in zeroshot.pruned.tasks.items():
        dataset_name, dataset_type = ZEROSHOT_DATASETS.get(task, (task, task))
        measured = [("acc", "accuracy", accuracy.acc, accuracy.acc_stderr)]
        if accuracy.acc_norm is not None:
            measured.append(("acc_norm", "length-normalised accuracy", accuracy.acc_norm, accuracy.acc_norm_stderr))
        metrics = [
            {
                "type": kind,
                "value": round(100 * value, 2),
                "name": f"{label} (zero-shot, {accuracy.items:,} items, standard error {100 * stderr:.2f})",
            }
            for kind, label, value, stderr in measured
            if stderr is not None
        ]
        if metrics:
            results.append(
                {
                    "task": {"type": "multiple-choice", "name": "zero-shot multiple choice (lm-eval-harness)"},
                    "dataset": {"name": dataset_name, "type": dataset_type},
                    "metrics": metrics,
                }
            )
    return [{"name": name, "results": results}] if results else []


def front_matter(report: Report, name: str) -> dict[str, Any]:
    """The card's YAML front matter as a mapping."""
    method, params = report.method, report.parameters
    measured: dict[str, Any] = {
        "target": method.target,
        "target_of": method.target_of,
        "removed_fraction": round(params.removed_fraction, 6),
        "parameters": {"dense": params.dense.total, "pruned": params.pruned.total},
        "method": {
            "scoring": method.scoring,
            "allocation": method.allocation,
            "attention_unit": method.attention_unit,
            "reconstruction": method.reconstruction,
            "recovery": report.recovery.method if report.recovery else None,
        },
    }
    if report.perplexity:
        ppl = report.perplexity
        measured["perplexity"] = {
            "dataset": ppl.dataset,
            "seqlen": ppl.seqlen,
            "windows": ppl.windows,
            "dense": ppl.dense,
            "pruned": ppl.pruned,
        }
    if report.zeroshot and report.zeroshot.pruned.mean is not None:
        measured["zeroshot_mean_acc"] = {
            "tasks": report.zeroshot.mean_tasks,
            "limit": report.zeroshot.limit,
            "dense": report.zeroshot.dense.mean,
            "pruned": report.zeroshot.pruned.mean,
        }
        change = report.zeroshot.mean_change
        if change is not None:
            measured["zeroshot_mean_acc"] |= {
                "paired_difference": change.difference,
                "difference_interval95": change.interval95,
                "chance": change.chance,
                "margin_kept": report.zeroshot.margin_kept,
            }
    if report.speed:
        d, p = report.speed.dense, report.speed.pruned
        measured["speed"] = {
            "device": report.speed.device,
            "decode_speedup": p.decode_tokens_per_s_median / d.decode_tokens_per_s_median,
            "prefill_speedup": d.prefill_ms_median / p.prefill_ms_median,
            "limit": d.linear_macs_per_token / p.linear_macs_per_token,
        }
    if report.engine:
        e = report.engine
        measured["llama_cpp"] = {
            "tensor_type": e.tensor_type,
            "decode_speedup": e.pruned.decode_tokens_per_s_median / e.dense.decode_tokens_per_s_median,
            "prompt_speedup": e.pruned.prompt_tokens_per_s_median / e.dense.prompt_tokens_per_s_median,
            "limit": e.linear_macs_ratio,
        }
    matter: dict[str, Any] = {
        "base_model": report.model.base_model,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
    }
    if report.model.license:
        matter["license"] = report.model.license
    matter["tags"] = ["pruned", "structured-pruning", report.model.model_type]
    if report.export("gguf"):
        matter["tags"].append("gguf")
    index = _model_index(report, name)
    if index:
        matter["model-index"] = index
    matter["pruning"] = measured
    return matter


def _widths_table(report: Report) -> list[str]:
    columns = widths_columns(report)
    lines = [f"| layer | {' | '.join(columns)} |", "|---:|" + "---:|" * len(columns)]
    for layer in report.layers:
        lines.append(f"| {' | '.join([str(layer.index), *widths_cells(layer, columns)])} |")
    return lines


def model_card(report: Report, name: str) -> str:
    """The checkpoint's README.md: front matter and body, from ``report``; ``name`` is the model's name."""
    method, params = report.method, report.parameters
    matter = front_matter(report, name)
    hf = report.export("hf")
    remote = bool(hf and hf.remote_code)
    how = method_description(method)
    lines = [
        "---",
        yaml.safe_dump(matter, sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"`{report.model.base_model}` with {params.removed_fraction:.1%} of its parameters removed by structured "
        f"pruning ({how}): {params.dense.total:,} → {params.pruned.total:,} parameters. Whole attention heads and "
        "FFN channels are gone: the checkpoint is physically smaller and does less work per token, with dense kernels.",
        "",
    ]
    if report.recovery:
        lines += [
            f"After pruning it was trained back toward the dense model: {report.recovery.method}, "
            f"{report.recovery.tokens_seen:,} tokens of {report.recovery.source}.",
            "",
        ]
    lines += ["## Results", ""]
    if report.perplexity:
        ppl = report.perplexity
        lines.append(
            f"- {ppl.dataset} perplexity ({ppl.seqlen}-token windows x {ppl.windows}): dense {ppl.dense:.2f}, "
            f"pruned {ppl.pruned:.2f}."
        )
    zeroshot = report.zeroshot
    if zeroshot and zeroshot.dense.mean is not None and zeroshot.pruned.mean is not None:
        limit = f", first {zeroshot.limit} items each" if zeroshot.limit else ""
        line = (
            f"- Zero-shot mean accuracy ({len(zeroshot.mean_tasks)} tasks{limit}, lm-eval-harness): dense "
            f"{percent(zeroshot.dense.mean, zeroshot.dense.mean_stderr)}, pruned "
            f"{percent(zeroshot.pruned.mean, zeroshot.pruned.mean_stderr)}"
        )
        if zeroshot.mean_change is not None:
            line += f"; pruned - dense, paired by item: {change_text(zeroshot.mean_change)}"
        margin = margin_text(zeroshot)
        lines.append(line + (f"; it keeps {margin}." if margin else "."))
    if report.speed:
        speed = matter["pruning"]["speed"]
        lines.append(
            f"- Speed in PyTorch on {report.speed.device}: decode {speed['decode_speedup']:.2f}x, prefill "
            f"{speed['prefill_speedup']:.2f}x the dense model (limit {speed['limit']:.2f}x)."
        )
    if report.engine:
        engine = matter["pruning"]["llama_cpp"]
        lines.append(
            f"- Speed in llama.cpp ({report.engine.tensor_type}, {report.engine.threads} threads): generation "
            f"{engine['decode_speedup']:.2f}x, prompt processing {engine['prompt_speedup']:.2f}x the dense model "
            f"(limit {engine['limit']:.2f}x)."
        )
    lines += ["", "## Per-layer widths", "", *_widths_table(report), "", "## Use", "", "```python"]
    lines += [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("MODEL_DIR"{", trust_remote_code=True" if remote else ""})',
        'tokenizer = AutoTokenizer.from_pretrained("MODEL_DIR")',
        "```",
        "",
    ]
    if remote:
        lines += [
            "Its layers have different widths, so loading needs `trust_remote_code=True`: `modeling_pruned.py` "
            "beside the weights is the family's stock model class with resized linear layers (it imports only "
            "torch and transformers).",
            "",
        ]
    gguf = report.export("gguf")
    if gguf:
        lines += [
            f"`{gguf.path}` ({gguf.tensor_type}) runs in llama.cpp (its `deci` architecture keeps every layer's "
            "widths), e.g. with `llama-cpp-python`:",
            "",
            "```python",
            "from llama_cpp import Llama",
            "",
            f'llm = Llama("{gguf.path}")',
            "```",
            "",
        ]
    attribution = f"Base model: `{report.model.base_model}`"
    if report.model.author:
        attribution += f" by {report.model.author}"
    attribution += f", license {report.model.license}." if report.model.license else "; see its license."
    lines += ["## License", "", attribution + " This pruned model is a derivative of it.", ""]
    return "\n".join(lines)
