"""Failure behaviour: bad input gets one line and exit 2, bad data is refused before anything is written,
caches check themselves, and interrupted runs leave nothing half-done (a rerun gives the same bytes)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from conftest import (  # noqa: F401 (fixture)
    REPO,
    assert_refused,
    byte_level_tokenizer,
    run_cli,
    run_outputs,
    tiny_files,
    tiny_model,
    tiny_recipe,
    word_text,
    write_recipe,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prune.analysis.run as analysis_run
import prune.resume as resume_module
import prune.run as run_module
from eval import speed as speed_module
from eval import zeroshot as zeroshot_module
from prune import export as export_module
from prune.recipe import Recipe, recipe_to_dict

# ---------------------------------------------------------------------------------------------------------------
# Bad input, generated


def _keys(mapping: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a nested mapping, sections included."""
    keys = []
    for key, value in mapping.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _keys(value, prefix + key + ".")
    return keys


RECIPE_KEYS = _keys(recipe_to_dict(Recipe()))
ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(min_value=-3, max_value=300), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=6), st.integers(), max_size=2),
    st.sampled_from(["/no/such/file.jsonl", "/tmp", "model.gguf", "c4", "wikitext2", "cpu", "cuda:7", "nll"]),
)


def _set(mapping: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(mapping.get(part), dict):
            mapping[part] = {}
        mapping = mapping[part]
    mapping[leaf] = value


@st.composite
def bad_recipes(draw):
    """A non-mapping document (text), or one to three faults (dotted key, value) to apply to a valid recipe;
    a fault's key may be unknown at its level."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(["", "[]", "- a\n- b\n", "42\n", "just text\n", "{{{\n", "a: [\n", "\x00"]))
    faults = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(RECIPE_KEYS))
        if draw(st.integers(0, 3)) == 0:
            key = key.rsplit(".", 1)[0] + "." + draw(st.sampled_from(["taget", "sampels", "x", "enabeld"]))
        faults.append((key, draw(ODD_VALUES)))
    return faults


def _check_one_error_line(code: int, stderr: str, output: Path) -> None:
    assert "Traceback" not in stderr
    assert code in (0, 2), (code, stderr)
    if code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not output.exists() and not output.with_name(output.name + ".partial").exists()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(recipe=bad_recipes())
def test_generated_bad_recipes_get_one_line_and_leave_nothing(tmp_path_factory, tiny_files, monkeypatch, recipe):  # noqa: F811
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a generated hub id fails at once
    root = tmp_path_factory.mktemp("fuzz")
    path = root / "recipe.yaml"
    if isinstance(recipe, str):
        path.write_text(recipe)
    else:
        data = tiny_recipe(tiny_files, root / "out", root / "cache")
        for key, value in recipe:
            _set(data, key, value)
        path.write_text(yaml.safe_dump(data))
    ran = []
    monkeypatch.setattr(run_module, "execute", lambda prepared, processes: ran.append(prepared))
    with _captured_stderr() as stderr:
        code = run_module.main([str(path), "--set", f"output={root / 'out'}"])
    _check_one_error_line(code, stderr.getvalue(), root / "out")
    assert (code == 0) == bool(ran)


class _captured_stderr:
    """stderr of an in-process command, as text."""

    def __enter__(self):
        import io

        self.buffer, self.previous = io.StringIO(), sys.stderr
        sys.stderr = self.buffer
        return self.buffer

    def __exit__(self, *exc):
        sys.stderr = self.previous


ANALYSIS_KEYS = [
    "domains.enabled",
    "domains.names",
    "domains.samples",
    "domains.sketch_size",
    "similarity.pairs",
    "similarity.enabled",
    "similarity.dataset",
    "deep_layers",
    "objective",
    "model.source",
    "output",
]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(ANALYSIS_KEYS), value=ODD_VALUES, unknown=st.booleans())
def test_generated_bad_analysis_recipes_get_one_line(tmp_path_factory, monkeypatch, key, value, unknown):
    root = tmp_path_factory.mktemp("fuzz_analysis")
    data = {"output": str(root / "out"), "similarity": {"enabled": True}}
    _set(data, key + ("_x" if unknown else ""), value)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(analysis_run, "execute", lambda recipe, overwrite: root / "out")
    with _captured_stderr() as stderr:
        code = analysis_run.main([str(path)])
    _check_one_error_line(code, stderr.getvalue(), root / "out")


FLAG_VALUES = st.sampled_from(["0", "-3", "1", "x", "", "99999999999", "/no/such", "nan", "cpu", "--bogus"])


@st.composite
def arguments(draw, flags: list[str], positional: list[str]):
    args = [draw(st.sampled_from(positional))] if positional and draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 4))):
        args += [draw(st.sampled_from([*flags, "--unknown-flag"])), draw(FLAG_VALUES)]
    return args


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    command=st.sampled_from(["zeroshot", "speed", "export"]),
    data=st.data(),
)
def test_generated_bad_arguments_get_one_line(tmp_path_factory, monkeypatch, command, data):
    root = tmp_path_factory.mktemp("fuzz_args")
    if command == "zeroshot":
        main = zeroshot_module.main
        args = data.draw(
            arguments(
                ["--tasks", "--source", "--limit", "--batch-size", "--dtype", "--json"], ["/no/such/model", str(root)]
            )
        )
    elif command == "speed":
        main = speed_module.main
        args = data.draw(
            arguments(
                [
                    "--config",
                    "--allocation",
                    "--round-to",
                    "--batch-sizes",
                    "--prompt-tokens",
                    "--new-tokens",
                    "--repeats",
                    "--warmup",
                    "--decode-loop",
                    "--json",
                ],
                [],
            )
        )
    else:
        main = export_module.main
        args = data.draw(arguments(["--type", "--output", "--format"], ["/no/such/run", str(root)]))
    with _captured_stderr() as stderr:
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse ends a bad command line with SystemExit
            code = exit_.code
    lines = stderr.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, lines)


# ---------------------------------------------------------------------------------------------------------------
# Bad data


def test_bad_data_is_refused_in_one_line_before_anything_is_written(tmp_path, tiny_files):  # noqa: F811
    output = tmp_path / "out"
    base = tiny_recipe(tiny_files, output, tmp_path / "cache")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"txt": 3}\n')
    short = tmp_path / "short.txt"
    short.write_text("the cat")
    cases = [
        ({"calibration": {"source": str(empty)}}, ["calibration.source", "holds no text"]),
        ({"calibration": {"source": str(broken)}}, ["calibration.source", "broken.jsonl:2"]),
        ({"evaluation": {"perplexity": {"dataset": str(short)}}}, ["evaluation.perplexity.dataset", "fewer than one"]),
    ]
    for change, fragments in cases:
        data = json.loads(json.dumps(base))
        for section, values in change.items():
            data[section] = data[section] | values
        assert_refused(run_cli(write_recipe(tmp_path / "r.yaml", data)), output, *fragments)
    garbage = tmp_path / "x.gguf"
    garbage.write_bytes(b"garbage")
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(b"GGUF" + bytes(40))
    for gguf_file, fragment in ((garbage, "is not a GGUF file"), (truncated, "damaged GGUF file")):
        data = base | {"model": {"source": str(gguf_file)}}
        assert_refused(run_cli(write_recipe(tmp_path / "r.yaml", data)), output, "model.source", fragment)
    for document in ("", "[]\n"):
        (tmp_path / "doc.yaml").write_text(document)
        assert_refused(run_cli(tmp_path / "doc.yaml", "--set", f"output={output}"), output, "doc.yaml")


def _broken_model(tmp_path: Path, name: str, change) -> Path:
    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer), layers=3, ffn=64)
    with torch.no_grad():
        change(model, tokenizer)
    model.save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_a_model_that_cannot_be_pruned_is_refused_in_one_line(tmp_path, tiny_files):  # noqa: F811
    output = tmp_path / "out"
    base = tiny_recipe(tiny_files, output, tmp_path / "cache")

    def nan_weights(model, tokenizer):
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")

    def zero_embeddings(model, tokenizer):  # every hidden state zero: D does not depend on any weight
        model.model.embed_tokens.weight.zero_()

    def no_end_token(model, tokenizer):
        tokenizer.eos_token = None

    cases = [
        (nan_weights, {}, ["model.source", "model.layers.1.mlp.up_proj.weight", "NaN"]),
        (zero_embeddings, {}, ["activation statistics", "zero"]),
        (
            no_end_token,
            {"recovery": {"method": "distill", "source": str(tiny_files["calibration"])}},
            ["model.source", "end-of-text"],
        ),
    ]
    for change, extra, fragments in cases:
        source = _broken_model(tmp_path, change.__name__, change)
        data = base | {"model": base["model"] | {"source": str(source)}} | extra
        assert_refused(run_cli(write_recipe(tmp_path / "r.yaml", data)), output, *fragments)


# ---------------------------------------------------------------------------------------------------------------
# Caches that check themselves


def test_damaged_caches_are_detected_reported_and_recomputed(tmp_path, tiny_files):  # noqa: F811
    cache = tmp_path / "cache"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_files, tmp_path / "first", cache))
    first = run_cli(recipe)
    assert first.returncode == 0, first.stderr[-2000:]
    expected = run_outputs(tmp_path / "first")
    (statistics_directory,) = (cache / "stats").iterdir()
    statistics = statistics_directory / "summary.safetensors"
    damaged = bytearray(statistics.read_bytes())
    damaged[-100] ^= 0xFF  # one flipped byte in the tensor data
    statistics.write_bytes(bytes(damaged))
    (dense,) = (cache / "dense_evaluation").iterdir()
    dense.write_text(dense.read_text()[:-10])  # a truncated file
    second = run_cli(recipe, "--set", f"output={tmp_path / 'second'}")
    assert second.returncode == 0, second.stderr[-2000:]
    warnings = [line for line in second.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and "checksum" in warnings[0] and "not a readable cache file" in warnings[1]
    assert run_outputs(tmp_path / "second") == expected
    third = run_cli(recipe, "--set", f"output={tmp_path / 'third'}")  # the recomputed caches are whole again
    assert third.returncode == 0 and "warning: " not in third.stderr
    report = json.loads((tmp_path / "third" / "report.json").read_text())
    assert report["statistics"]["reused"] and report["perplexity"]["dense_reused_from"]


# ---------------------------------------------------------------------------------------------------------------
# Interrupted runs


def _start(recipe: Path, output: Path, *overrides: str) -> subprocess.Popen:
    """The run as a terminal's foreground process starts it: with SIGINT's default action. A shell script's
    background job (``pytest ... &``) has SIGINT ignored, children inherit that, and Python then keeps it ignored:
    the SIGINT test would see the run finish."""
    sets = [arg for override in overrides for arg in ("--set", override)]
    return subprocess.Popen(
        [sys.executable, "-m", "prune.run", str(recipe), "--set", f"output={output}", *sets],
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _interrupt_at(process: subprocess.Popen, marker: str, delay: float, sig: int) -> str:
    """Send ``sig`` ``delay`` seconds after the stage ``marker`` starts; returns what the process printed."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            time.sleep(delay)
            process.send_signal(sig)
            break
    seen += process.stderr.readlines()
    process.wait(timeout=120)
    return "".join(seen)


@pytest.fixture(scope="module")
def slow_recipe(tmp_path_factory, tiny_files):  # noqa: F811
    """A tiny run whose statistics and recovery take seconds, so that a signal lands inside them."""
    root = tmp_path_factory.mktemp("interrupt")
    data = tiny_recipe(tiny_files, root / "unused", root / "cache")
    data["calibration"] |= {"samples": 96, "seqlen": 64}
    data["recovery"] = {
        "method": "distill",
        "source": str(tiny_files["calibration"]),
        "tokens": 64 * 4 * 1000,  # 1,000 steps: seconds, so that the signal lands inside the recovery
        "seqlen": 64,
        "batch_size": 4,
        "save_every": 20,
        "eval_every": 50,
        "heldout_windows": 1,
    }
    data["evaluation"]["speed"] = {"enabled": False}
    recipe = write_recipe(root / "recipe.yaml", data)
    reference = subprocess.run(
        [sys.executable, "-m", "prune.run", str(recipe), "--set", f"output={root / 'reference'}",
         "--set", f"cache_dir={root / 'reference_cache'}"], cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-2000:]
    return recipe, run_outputs(root / "reference")


@pytest.mark.parametrize(
    "marker, delay",
    [("[activation statistics]", 0.5), ("[export (hf)]", 0.0), ("[recovery (distill)]", 1.0), ("[perplexity]", 0.1)],
)
def test_a_killed_run_rerun_gives_the_uninterrupted_bytes(tmp_path, slow_recipe, marker, delay):
    recipe, expected = slow_recipe
    output = tmp_path / "out"
    printed = _interrupt_at(_start(recipe, output), marker, delay, signal.SIGKILL)
    assert marker in printed
    assert not output.exists()  # killed before the rename: no output that looks finished
    rerun = _start(recipe, output)
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-2000:]
    assert run_outputs(output) == expected and not output.with_name("out.partial").exists()


@pytest.mark.parametrize("failing, speed", [("speed", True), ("report", False)])
def test_a_failed_last_stage_keeps_the_pruned_model_and_the_rerun_finishes_from_it(
    tmp_path,
    tiny_files,  # noqa: F811
    monkeypatch,
    failing,
    speed,
):
    import eval.stages.perplexity as perplexity_stage
    import eval.stages.speed as speed_stage

    data = tiny_recipe(tiny_files, tmp_path / "reference", tmp_path / "reference_cache")
    data["evaluation"]["speed"]["enabled"] = speed  # without the speed stage the run prunes in place
    recipe = write_recipe(tmp_path / "r.yaml", data)
    assert run_module.main([str(recipe)]) == 0
    expected = run_outputs(tmp_path / "reference")
    output, cache = tmp_path / "out", tmp_path / "cache"
    sets = ["--set", f"output={output}", "--set", f"cache_dir={cache}"]

    def failure(*args, **kwargs):
        raise RuntimeError("the device fell over")

    with monkeypatch.context() as patch:
        patch.setattr(speed_stage if failing == "speed" else run_module, {"speed": "measure_speed"}.get(
            failing, "write_report"), failure)  # fmt: skip
        with _captured_stderr() as stderr:
            code = run_module.main([str(recipe), *sets])
    line = stderr.getvalue().strip().splitlines()[-1]
    assert code == 1 and line.startswith(f"error: {failing} failed (RuntimeError: the device fell over); "), line
    assert "run the same command again" in line
    assert not output.exists() and not output.with_name("out.partial").exists()
    (resume,) = (cache / "resume").iterdir()
    assert "the device fell over" in (resume / "failure.txt").read_text()

    rerun_calls = []
    for module, name in [(run_module, "obtain_statistics"), (run_module, "prune_as_recipe_says"),
                         (perplexity_stage, "perplexity")]:  # fmt: skip
        monkeypatch.setattr(module, name, lambda *args, name=name, **kwargs: rerun_calls.append(name))
    with _captured_stderr() as stderr:
        code = run_module.main([str(recipe), *sets])
    log = stderr.getvalue()
    assert code == 0, log[-2000:]
    assert rerun_calls == []  # no statistics, scoring or pruning, and the perplexities kept from the failed attempt
    assert "[pruned model] kept from an earlier attempt" in log and "[perplexity] kept from an earlier attempt" in log
    assert run_outputs(output) == expected and not resume.exists()
    report = json.loads((output / "report.json").read_text())
    assert any(note.startswith("Continued from the resume point") for note in report["notes"])


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_sigint_remove_the_staged_output(tmp_path, slow_recipe, sig, code, line):
    recipe, expected = slow_recipe
    output, cache = tmp_path / "out", f"cache_dir={tmp_path / 'cache'}"
    process = _start(recipe, output, cache)
    printed = _interrupt_at(process, "[activation statistics]", 0.5, sig)
    assert process.returncode == code and printed.strip().splitlines()[-1] == f"{line}: nothing was written"
    assert not output.exists() and not output.with_name("out.partial").exists()
    rerun = _start(recipe, output, cache)  # the caches it left are whole: the same command just runs
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "warning: " not in stderr and run_outputs(output) == expected


def test_a_full_disk_while_writing_the_checkpoint_leaves_nothing(tmp_path, tiny_files, monkeypatch):  # noqa: F811
    output = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_files, output, tmp_path / "cache"))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors")

    monkeypatch.setattr(resume_module, "save_checkpoint", disk_full)  # the pruned checkpoint at the resume point
    with _captured_stderr() as stderr:
        code = run_module.main([str(recipe)])
    lines = stderr.getvalue().strip().splitlines()
    assert code == 1 and lines[-1].startswith("error: No space left on device") and "nothing was written" in lines[-1]
    assert not output.exists() and not output.with_name("out.partial").exists()
    assert not any((tmp_path / "cache" / "resume").iterdir())
