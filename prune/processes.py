"""Several processes on one machine: ``accelerate launch --multi_gpu --num_processes N -m prune.run RECIPE``.

The launcher (``torchrun`` underneath; ``--multi_gpu`` is accelerate's name for it, on CPUs too) starts N copies
of the command with ``RANK`` / ``WORLD_SIZE`` set; :func:`launched_processes` joins them into one process group
through accelerate (gloo on CPU, NCCL on CUDA, one GPU per process). What the processes share:

- the statistics pass: each process takes every N-th calibration sample and the per-layer sums are added
  across processes (:meth:`Processes.sum`) before they are reduced, so every process ends with the statistics of
  all samples (equal to one process's up to the order of summation);
- recovery: data-parallel, each process trains on its share of every batch (``prune/recovery.py``).

Only the first process (index 0) writes: the statistics cache, the output directory, the report, progress bars
and messages. The others stop once their share of the work is done; the first goes on alone. A process that fails
leaves its reason in a folder of the launch (:func:`record_failure`), and the first process, whose next collective
operation then fails, stops with one line naming it (:class:`ProcessFailure`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

WAIT_LIMIT = timedelta(hours=3)
"""How long a process waits for the others at a collective operation: the first process evaluates the dense
model (zero-shot on a 7B model takes an hour) while the others wait to start recovery."""


def launched_index() -> int:
    """This process's index among those a launcher started (0 when started alone), read from ``RANK``."""
    return int(os.environ.get("RANK", "0"))


def launched_count() -> int:
    """How many processes a launcher started (1 when started alone), read from ``WORLD_SIZE``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class ProcessFailure(Exception):
    """Another process of the run failed or left while this one waited for it; the message names it and why."""


def failure_directory() -> Path:
    """The folder where the processes of this launch leave why they stopped: in the temporary directory, named by
    the launch's rendezvous address, port and run id (what the launcher sets alike in its processes)."""
    launch = "-".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
    return Path(tempfile.gettempdir()) / f"prune-launch-{hashlib.sha256(launch.encode()).hexdigest()[:16]}"


def record_failure(index: int, reason: str) -> None:
    """Leave ``reason`` (one line) for the first process: process ``index`` is stopping on it."""
    directory = failure_directory()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"process-{index}.txt").write_text(reason.strip().splitlines()[0] if reason.strip() else "?")


def recorded_failures(index: int) -> str | None:
    """What the processes other than ``index`` recorded before stopping ("process 1 failed: RuntimeError: ...");
    None when none did."""
    directory = failure_directory()
    paths = sorted(directory.glob("process-*.txt")) if directory.is_dir() else []
    failures = {int(path.stem.removeprefix("process-")): path.read_text() for path in paths}
    named = [f"process {other} failed: {why}" for other, why in failures.items() if other != index]
    return "; ".join(named) or None


def silent_processes(index: int, count: int) -> str:
    """The other processes, when none of them said why it stopped: "process 1 left without a word (...)"."""
    others = ", ".join(str(i) for i in range(count) if i != index)
    return f"process {others} left without a word (killed, or out of memory?)"


def _collective_error(error: BaseException) -> bool:
    """Whether ``error`` is a collective operation failing because a peer went (gloo's or NCCL's errors)."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(s in text for s in ("gloo", "Gloo", "NCCL", "closed by peer"))


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of one run: ``index`` in 0 .. ``count`` - 1."""

    index: int = 0
    count: int = 1

    @property
    def main(self) -> bool:
        """The process that writes outputs, caches and messages."""
        return self.index == 0

    def share(self, items: list[T]) -> list[T]:
        """This process's share of ``items``: every ``count``-th one, starting at ``index``."""
        return items[self.index :: self.count]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` replaced, in place, by its sum over the processes (CPU tensors under gloo, CUDA under NCCL)."""
        if self.count > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def from_main(self, value: T) -> T:
        """The main process's ``value`` (any picklable object), in every process."""
        if self.count == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wait(self) -> None:
        """Return when every process has reached this call."""
        if self.count > 1:
            dist.barrier()

    @contextmanager
    def watched(self) -> Iterator[None]:
        """Within: a collective operation that fails because another process failed or left raises
        :class:`ProcessFailure` naming that process and its reason (what it recorded; "left without a word" when it
        recorded none: killed, or out of memory)."""
        try:
            yield
        except Exception as error:
            if self.count == 1 or not _collective_error(error):
                raise
            named = recorded_failures(self.index) or silent_processes(self.index, self.count)
            raise ProcessFailure(f"{named}; nothing was written") from None

    def device(self, device: str) -> str:
        """The device this process works on for a recipe's ``model.device``: its own GPU when several share CUDA."""
        if self.count > 1 and device.startswith("cuda"):
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return device


ALONE = Processes()
"""One process: the command was not started by a launcher."""


def launched_processes(cpu: bool) -> Processes:
    """The processes a launcher started, joined into one process group (gloo when ``cpu``, else NCCL); ``ALONE``
    when ``WORLD_SIZE`` is unset or 1."""
    if launched_count() == 1:
        return ALONE
    from accelerate import PartialState

    state = PartialState(cpu=cpu, timeout=WAIT_LIMIT)
    if state.process_index == 0:  # an earlier launch on the same address and port may have left reasons
        shutil.rmtree(failure_directory(), ignore_errors=True)
    dist.barrier()
    return Processes(state.process_index, state.num_processes)
