"""The CPU memory baseline counts live memory only, not heap memory freed earlier and kept by the allocator."""

import platform

import pytest
import torch

from prune.memory import current_bytes, reset_peak

CPU = torch.device("cpu")


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or platform.system() != "Linux", reason="glibc malloc_trim and /proc"
)
def test_reset_peak_returns_freed_heap_memory_before_the_baseline():
    reset_peak(CPU)
    start = current_bytes(CPU)
    tensors = [torch.ones(1000) for _ in range(60_000)]  # 4 KB each: about 240 MB from the C heap
    kept = tensors[::50]  # every 50th stays alive, so the freed memory is fragmented and not trimmed on free
    del tensors
    held = current_bytes(CPU) - start
    assert held > 150 * 2**20  # the heap still holds the freed memory
    reset_peak(CPU)
    live = current_bytes(CPU) - start
    assert live < 0.25 * held, f"baseline still holds {live / 2**20:.0f} MiB of {held / 2**20:.0f} MiB"
    del kept  # alive until the baseline is read
