"""Peak memory of a stretch of work: CUDA allocator peak, or the process's resident-set high-water mark on CPU."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    """Start a new peak measurement; read :func:`current_bytes` after it for the baseline.

    CPU: first hands memory freed earlier back to the OS (glibc ``malloc_trim``; the heap otherwise
    keeps it resident, and a later stage reusing it would look as if it needed nothing), then resets
    VmHWM through /proc/self/clear_refs (Linux only).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the baseline may include freed heap memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak then covers the process lifetime
        Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: torch.device) -> int:
    """Peak since :func:`reset_peak`: CUDA ``max_memory_allocated``, CPU process RSS high-water mark (bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_bytes(device: torch.device) -> int:
    """Memory in use now: CUDA ``memory_allocated``, CPU process RSS (bytes)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@torch.no_grad()
def make_resident(model: torch.nn.Module) -> None:
    """Read every parameter once, so that memory-mapped weights are in the RSS before a measurement starts.

    Weights loaded from safetensors may stay file-backed until first touched; without this, pages of
    the weights first read during a measured stage would count as memory that stage added.
    """
    for p in model.parameters():
        if p.device.type == "cpu":
            p.view(-1)[:: max(1, 1024 // p.element_size())].sum()  # one element per 1 KiB reaches every 4 KiB page
