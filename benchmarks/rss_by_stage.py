"""Resident memory of a command, stage by stage: which stage sets the peak of a run.

    python benchmarks/rss_by_stage.py [--interval 0.25] [--weights-bytes N] [--plot rss.png] [--json rss.json] \
        -- python -m prune.run RECIPE [--set ...]

Runs the command, passes its output through, and samples the resident set of the command and all its
descendants (summed, bytes; psutil) every ``--interval`` seconds. Each sample belongs to the stage the command
last announced on stderr: ``prune.run`` and ``benchmarks/quality.py`` print ``[stage name]`` on a line of its
own when a stage starts. Printed at the end, as a markdown table: per stage its wall seconds, the peak of the
sampled resident set, of it the anonymous part (heap: tensors, arrays) and the file-backed part (memory-mapped
files: safetensors weights, GGUF files in llama.cpp; the kernel can drop these pages), and the peak over the
dense weight bytes (``--weights-bytes``). A peak shorter than the interval can be missed; the line under the
table gives the exact high-water mark of the largest single process (``getrusage`` of the children).
``--plot`` draws the resident set over time with the stages as bands.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

STAGE_LINE = re.compile(r"^\[([^\]]+)\]$")


@dataclass
class Sample:
    seconds: float
    """Since the command started."""
    stage: str
    anon_bytes: int
    file_bytes: int


def tree_rss(root: psutil.Process) -> tuple[int, int]:
    """Anonymous and file-backed resident bytes of ``root`` and its descendants (/proc/PID/status RssAnon,
    RssFile + RssShmem); a process that just left counts 0."""
    anon = file = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for process in processes:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        kib = {key: int(fields.get(key, "0 kB").split()[0]) for key in ("RssAnon", "RssFile", "RssShmem")}
        anon += kib["RssAnon"] * 1024
        file += (kib["RssFile"] + kib["RssShmem"]) * 1024
    return anon, file


def run_sampled(command: list[str], interval: float) -> tuple[int, list[Sample], list[tuple[float, str]]]:
    """Run ``command``; its exit code, the samples and the stage starts (seconds, name)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, bufsize=0)
    stages: list[tuple[float, str]] = [(0.0, "(start)")]

    def pass_stderr() -> None:
        assert process.stderr is not None
        pending = b""
        for chunk in iter(lambda: os.read(process.stderr.fileno(), 65536), b""):  # type: ignore[union-attr]
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            for line in lines:
                match = STAGE_LINE.match(line.decode(errors="replace").strip())
                if match:
                    stages.append((time.perf_counter() - start, match.group(1)))

    reader = threading.Thread(target=pass_stderr, daemon=True)
    reader.start()
    root = psutil.Process(process.pid)
    samples: list[Sample] = []
    while process.poll() is None:
        anon, file = tree_rss(root)
        samples.append(Sample(time.perf_counter() - start, stages[-1][1], anon, file))
        time.sleep(interval)
    reader.join()
    return process.returncode, samples, stages


def stage_table(samples: list[Sample], stages: list[tuple[float, str]], end: float, weights: int | None) -> str:
    """Markdown: per stage (in order of first start) seconds, peak resident set and its parts, peak / weights."""
    seconds: dict[str, float] = {}
    for (begin, name), (finish, _) in zip(stages, [*stages[1:], (end, "")], strict=True):
        seconds[name] = seconds.get(name, 0.0) + finish - begin
    lines = [
        "| stage | seconds | peak resident GiB | of it anonymous | of it file-backed | peak / dense weights |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, stage_seconds in seconds.items():
        mine = [s for s in samples if s.stage == name]
        if not mine:
            continue
        top = max(mine, key=lambda s: s.anon_bytes + s.file_bytes)
        total = top.anon_bytes + top.file_bytes
        ratio = f"{total / weights:.2f}x" if weights else "-"
        lines.append(
            f"| {name} | {stage_seconds:.1f} | {total / 2**30:.2f} | {top.anon_bytes / 2**30:.2f} | "
            f"{top.file_bytes / 2**30:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def plot(samples: list[Sample], stages: list[tuple[float, str]], end: float, path: Path) -> None:
    """Resident GiB over minutes, anonymous and file-backed stacked, each stage a labelled band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.seconds / 60 for s in samples]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.stackplot(
        minutes,
        [s.anon_bytes / 2**30 for s in samples],
        [s.file_bytes / 2**30 for s in samples],
        labels=["anonymous", "file-backed"],
        colors=["#d9480f", "#9aa5b1"],
    )
    top = max((s.anon_bytes + s.file_bytes) / 2**30 for s in samples) if samples else 1.0
    key = []
    for i, ((begin, name), (finish, _)) in enumerate(zip(stages, [*stages[1:], (end, "")], strict=True)):
        ax.axvspan(begin / 60, finish / 60, color="#000000", alpha=0.04 * (i % 2))
        ax.text(begin / 60, top * (1.03 + 0.07 * (i % 2)), str(i + 1), fontsize=7)  # short stages: two rows
        key.append(f"{i + 1} {name}")
    ax.set_xlabel("minutes")
    ax.set_ylabel("resident GiB (process tree)")
    ax.set_ylim(0, top * 1.2)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.text(1.01, 0.0, "\n".join(key), transform=ax.transAxes, fontsize=7, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    parser.add_argument("--weights-bytes", type=int, help="the dense model's weight bytes, for the ratio column")
    parser.add_argument("--plot", type=Path, help="PNG of the resident set over time")
    parser.add_argument("--json", type=Path, help="the samples and stage starts")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    code, samples, stages = run_sampled(command, args.interval)
    end = samples[-1].seconds if samples else 0.0
    high_water = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"\n{' '.join(command)}\nexit code {code}, {end / 60:.1f} minutes, {len(samples)} samples\n")
    print(stage_table(samples, stages, end, args.weights_bytes))
    ratio = f" = {high_water / args.weights_bytes:.2f}x the dense weights" if args.weights_bytes else ""
    print(f"\nHigh-water mark of the largest single process (getrusage): {high_water / 2**30:.2f} GiB{ratio}.")
    if args.json:
        args.json.write_text(json.dumps({"stages": stages, "samples": [asdict(s) for s in samples]}))
    if args.plot and samples:
        plot(samples, stages, end, args.plot)
    sys.exit(code)


if __name__ == "__main__":
    main()
