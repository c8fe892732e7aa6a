"""Peak memory of a stretch of work: CUDA allocator peak, or the process's resident-set high-water mark on CPU."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
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
    return_freed_memory()  # not glibc: the baseline may include freed heap memory
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


def release_weights(model: torch.nn.Module) -> None:
    """Free the memory of every parameter and buffer of ``model``: each becomes a tensor of its shape on the meta
    device (a tied parameter stays one parameter), so that what reads only shapes (parameter counts, multiply-adds
    per token) still works, and anything that computes with it fails. Freed heap memory goes back to the OS."""
    released: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if id(parameter) not in released:
                released[id(parameter)] = torch.nn.Parameter(parameter.to("meta"), parameter.requires_grad)
            setattr(module, name, released[id(parameter)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, buffer.to("meta"))
    return_freed_memory()


def return_freed_memory() -> None:
    """Collect garbage and hand the C heap's freed memory back to the OS (glibc ``malloc_trim``; elsewhere the
    heap keeps it)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


M_TRIM_THRESHOLD = -1
"""glibc mallopt parameter: free memory at the heap's top beyond this many bytes goes back to the OS."""
M_MMAP_THRESHOLD = -3
"""glibc mallopt parameter: allocations of at least this many bytes get a mapping of their own."""
HEAP_MMAP_THRESHOLD = 4 * 2**20
HEAP_TRIM_THRESHOLD = 64 * 2**20


def give_large_frees_back() -> None:
    """Make every heap allocation of ``HEAP_MMAP_THRESHOLD`` bytes or more (a tensor of a million float32 values)
    a mapping of its own, handed back to the OS when freed (glibc ``mallopt``; elsewhere nothing changes).

    glibc's own threshold starts at 128 KiB but rises to the size of any mapped block freed, up to 32 MiB, after
    which freed tensors below that size stay in the heap, which returns only its top: a Qwen2.5-1.5B run in
    float32 ended its statistics pass with 1.2 GiB more of them than it began with, and kept them through scoring
    and pruning. A fixed threshold stops that rise; it also fixes the top's trim threshold at its 128 KiB start
    unless set too, and the heap's top then shrinks and grows again at every step (the statistics pass of four
    1.5B layers took 18% longer), hence ``HEAP_TRIM_THRESHOLD``: what glibc's own rule, twice the mmap threshold,
    gives at its 32 MiB."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)


MADV_DONTNEED = 4
"""Linux madvise advice: the pages are not needed; a private file mapping's pages are read from the file again."""


def _private_file_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's private mappings of files (Linux /proc/self/maps; else none)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    mappings = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p") and fields[5].startswith("/"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            mappings.append((start, end))
    return mappings


def drop_mapped_pages(tensors: list[torch.Tensor]) -> None:
    """Hand back to the kernel the pages of those ``tensors`` that lie in a memory-mapped file (the checkpoint
    ``from_pretrained`` maps when the file's dtype is the one loaded), for tensors never read again: a dense layer's
    weights once its pruned copy is built. The whole pages inside each tensor leave the resident set (madvise
    MADV_DONTNEED); without this they stay resident as long as any tensor of the file lives (the embeddings, which
    the pruned model shares). Memory torch allocated is freed with its tensor and left alone here; Linux only."""
    mappings = _private_file_mappings()
    page = mmap.PAGESIZE
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        first, last = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
        if not any(start <= first and last <= end for start, end in mappings):
            continue
        start, end = -(-first // page) * page, last // page * page
        if end > start:
            with contextlib.suppress(OSError, AttributeError):  # not glibc
                ctypes.CDLL("libc.so.6").madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
