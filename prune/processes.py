"""Several processes on one machine: ``accelerate launch --multi_gpu --num_processes N -m prune.run RECIPE``.

The launcher (``torchrun`` underneath; ``--multi_gpu`` is accelerate's name for it, on CPUs too) starts N copies
of the command with ``RANK`` / ``WORLD_SIZE`` set; :func:`launched_processes` joins them into one process group
through accelerate (gloo on CPU, NCCL on CUDA, one GPU per process). What the processes share:

- the statistics pass: each process takes every N-th calibration sample and the per-layer sums are added
  across processes (:meth:`Processes.sum`) before they are reduced, so every process ends with the statistics of
  all samples (equal to one process's up to the order of summation);
- recovery: data-parallel, each process trains on its share of every batch (``prune/recovery.py``).

Only the first process (index 0) writes: the statistics cache, the output directory, the report, progress bars
and messages. The others stop once their share of the work is done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
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
    return Processes(state.process_index, state.num_processes)
