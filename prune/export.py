"""Export: the pruned model written in the formats the recipe's ``export.formats`` names, and the command
that exports a finished run or any model source afterwards.

Each format is one entry of :data:`EXPORTERS`: a function that writes the model into the run
directory and returns its report entry.

- ``hf``: a Hugging Face checkpoint in ``model/`` (``prune/checkpoint.py``);
- ``gguf``: one GGUF file for llama.cpp, ``model-<type>.gguf`` (``prune/gguf_export.py``).

Command line::

    python -m prune.export RUN_DIR [--type q8_0] [--output FILE] [--overwrite]
    python -m prune.export MODEL_SOURCE --output FILE [--type f16]     # e.g. the dense model, like for like
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from eval.report import ExportReport, read_report
from prune.checkpoint import save_checkpoint
from prune.cli import ArgumentParser, run_command
from prune.families import UnsupportedFamilyError, family_of
from prune.gguf_export import TENSOR_TYPES, GgufExportError, gguf_coverage, write_gguf
from prune.models import (
    ModelSource,
    ModelSourceError,
    check_checkpoint,
    load_config,
    load_model,
    resolve_model_source,
)
from prune.outputs import OutputRefused, check_output, output_lock
from prune.paths import cache_dir, link_or_copy
from prune.pruner import has_layer_widths

if TYPE_CHECKING:
    from prune.recipe import ExportSection


@dataclass(frozen=True)
class ExportInputs:
    """What an exporter reads: the model to write, its tokenizer, where it came from, the run directory and the
    recipe's ``export`` section."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    directory: Path
    """The run directory (being staged); an exporter writes inside it."""
    settings: ExportSection
    checkpoint: Path | None = None
    """The model already saved as a Hugging Face checkpoint (the run's resume point), which ``hf`` links."""


def directory_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file ``path``)."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_hf(inputs: ExportInputs) -> ExportReport:
    """The Hugging Face checkpoint: ``model/`` with safetensors, config, tokenizer (and modeling code if needed);
    links to the files of ``inputs.checkpoint`` when the model is saved there already."""
    directory = inputs.directory / "model"
    if inputs.checkpoint is not None:
        link_or_copy(inputs.checkpoint, directory)
    else:
        save_checkpoint(inputs.model, inputs.tokenizer, directory)
    return ExportReport(
        format="hf",
        path=directory.name,
        bytes=directory_bytes(directory),
        remote_code=has_layer_widths(inputs.model.config),
    )


def gguf_tokenizer_source(source: ModelSource) -> Path | None:
    """The GGUF file whose tokenizer keys an export copies: the model's own source file, when it is one."""
    path = Path(source.location)
    return path if source.kind == "gguf" and path.is_file() else None


def export_gguf(inputs: ExportInputs) -> ExportReport:
    """One GGUF file for llama.cpp, ``model-<type>.gguf``, in the tensor type ``export.gguf_type``."""
    tensor_type = inputs.settings.gguf_type
    path = inputs.directory / f"model-{tensor_type}.gguf"
    written = write_gguf(
        inputs.model,
        inputs.tokenizer,
        path,
        tensor_type,
        gguf_tokenizer_source(inputs.source),
        name=f"{Path(inputs.source.location).stem} (pruned)",
    )
    return ExportReport("gguf", path.name, path.stat().st_size, tensor_type=tensor_type, notes=written.notes)


EXPORTERS: dict[str, Callable[[ExportInputs], ExportReport]] = {"hf": export_hf, "gguf": export_gguf}
"""Exporters by recipe name (``export.formats``)."""


class ExportError(ValueError):
    """A bad argument of the export command; the message names it."""


def _source_of(target: Path | str) -> tuple[ModelSource, Path | None, str]:
    """The model to export: a run directory's checkpoint (and its source GGUF, if it still exists), or a model
    source as a recipe names one. Returns (source, GGUF file to copy the tokenizer from, a name)."""
    run = Path(target).expanduser()
    if (run / "report.json").is_file():
        try:
            report = read_report(run)
        except ValueError as error:
            raise ExportError(str(error)) from None
        checkpoint = run / "model"
        if not (checkpoint / "config.json").is_file():
            raise ExportError(f"{run}: the run has no Hugging Face checkpoint (model/) to export")
        check_checkpoint(checkpoint)
        origin = ModelSource(report.model.kind, report.model.location)
        name = f"{Path(report.model.source).stem} (pruned {report.parameters.removed_fraction:.0%})"
        return ModelSource("directory", str(checkpoint)), gguf_tokenizer_source(origin), name
    source = resolve_model_source(str(target), cache_dir(None))
    return source, gguf_tokenizer_source(source), Path(source.location).stem


def stored_dtype(config: PretrainedConfig) -> str:
    """The dtype to load a model in for an export: its checkpoint's own (a Hub model's or a directory's
    ``dtype``: the file's values exactly, in half a float32 copy's memory for bfloat16 and float16), else float32
    (a GGUF file's dequantized weights)."""
    dtype = str(config.dtype).removeprefix("torch.")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` is a file that starts as a GGUF file does (one an export may replace)."""
    try:
        with path.open("rb") as file:
            return path.is_file() and file.read(4) == b"GGUF"
    except OSError:
        return False


def export_command(target: str, tensor_type: str, output: Path | None, overwrite: bool) -> Path:
    """``python -m prune.export``: write a GGUF file of a run or of a model source; returns its path."""
    if tensor_type not in TENSOR_TYPES:
        raise ExportError(f"--type: {tensor_type!r} is not one of {', '.join(TENSOR_TYPES)}")
    source, tokenizer_source, name = _source_of(target)
    run = Path(target).expanduser()
    if output is None:
        if not (run / "report.json").is_file():
            raise ExportError(f"--output: required when {target!r} is not a run directory")
        output = run / f"model-{tensor_type}.gguf"
    if not output.parent.is_dir():
        raise ExportError(f"--output: the directory {output.parent} does not exist")
    inputs = [("the model", Path(source.location)), ("cache_dir", cache_dir(None))]
    if tokenizer_source is not None:
        inputs.append(("the GGUF file the tokenizer comes from", tokenizer_source))
    check_output(output, inputs, overwrite, is_gguf_file, "--output", "a GGUF file")
    try:
        config = load_config(source)
        family = family_of(config)
    except UnsupportedFamilyError as error:
        raise ExportError(f"{target}: {error}") from None
    if not family.gguf:
        raise ExportError(f"{target}: {gguf_coverage(family)}")
    with output_lock(output, "--output"):
        check_output(output, inputs, overwrite, is_gguf_file, "--output", "a GGUF file")  # no export since the first
        model, tokenizer = load_model(source, stored_dtype(config), "cpu", cache_dir(None))
        written = write_gguf(model, tokenizer, output, tensor_type, tokenizer_source, name)
    for note in written.notes:
        print(f"note: {note}", file=sys.stderr)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m prune.export",
        description="Write a pruned run (or any model source) as a GGUF file that llama.cpp runs.",
    )
    parser.add_argument("source", help="a run directory, or a model source as in a recipe (to export a dense model)")
    parser.add_argument("--format", default="gguf", help="gguf (the only format this command writes)")
    parser.add_argument("--type", default="f16", help=f"tensor type of the weight matrices: {', '.join(TENSOR_TYPES)}")
    parser.add_argument("--output", type=Path, help="the file to write (default for a run: RUN_DIR/model-TYPE.gguf)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)

    def export() -> str:
        if args.format != "gguf":
            raise ExportError(f"--format: {args.format!r} is not one this command writes (gguf)")
        return f"done: {export_command(args.source, args.type, args.output, args.overwrite)}"

    return run_command(export, (ExportError, GgufExportError, ModelSourceError, OutputRefused))


if __name__ == "__main__":
    sys.exit(main())
