"""Where a command may write, and how: an output is never an input, one run writes an output at a time, outputs are
staged, and what a killed run leaves in the cache is removed by the next.

- :func:`check_output`: before anything is written, an output that equals, contains or lies inside an input (the
  model, the data, the cache) is refused, and ``--overwrite`` replaces only what a run of this toolkit wrote.
- :func:`exclusive_lock`: an OS file lock (``flock``) beside the output or a cache entry. The kernel releases it
  when its process dies, however it dies, so a killed run never blocks the next; a second run of the same output
  stops at once with a line naming the first, and runs that need the same cache entry wait for each other.
- :func:`staged_directory`: a run writes into ``<output>.partial``, which replaces ``<output>`` only at the end;
  no failure leaves the ``.partial`` behind.
- :func:`scratch_directory`: scratch files under the cache, each directory locked while in use; directories no
  live process holds (a killed run's) are removed when the next one is made.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputRefused(ValueError):
    """An output that would overwrite an input or something this toolkit did not write; the message says which."""


def _within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_output(
    output: Path,
    inputs: list[tuple[str, Path]],
    overwrite: bool,
    recognized: Callable[[Path], bool],
    key: str = "output",
    what: str = "a run's output",
) -> None:
    """OutputRefused (its message starting with ``key``) unless ``output`` may be written: it must not equal,
    contain or lie inside any of ``inputs`` ((name, path) pairs; symbolic links resolved); an existing ``output``
    is replaced only with ``overwrite`` and only when ``recognized(output)`` says this toolkit wrote it (``what``
    names that kind of output); the directory it goes into must be writable.
    """
    target = output.expanduser().resolve()
    for name, path in inputs:
        source = path.expanduser().resolve()
        if target == source:
            raise OutputRefused(f"{key}: {output} is {name}; choose another {key}")
        if _within(source, target):
            raise OutputRefused(f"{key}: {output} contains {name} ({path}); choose another {key}")
        if source.is_dir() and _within(target, source):
            raise OutputRefused(f"{key}: {output} lies inside {name} ({path}); choose another {key}")
    if output.exists() or output.is_symlink():
        if not recognized(output):
            raise OutputRefused(f"{key}: {output} exists and is not {what}; remove it yourself or choose another {key}")
        if not overwrite:
            raise OutputRefused(f"{key}: {output} already exists; choose another (--set {key}=...) or pass --overwrite")
    parent = next(p for p in [target.parent, *target.parent.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputRefused(f"{key}: cannot write into {parent} (not a writable directory)")


def is_run_output(path: Path) -> bool:
    """Whether ``path`` is an empty directory or one a run of this toolkit wrote (it holds a report.json)."""
    return _is_output_directory(path, "report.json")


def is_analysis_output(path: Path) -> bool:
    """Whether ``path`` is an empty directory or one ``prune.analysis`` wrote (it holds an analysis.json)."""
    return _is_output_directory(path, "analysis.json")


def _is_output_directory(path: Path, marker: str) -> bool:
    if not path.is_dir() or path.is_symlink():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return isinstance(json.loads((path / marker).read_text()).get("recipe"), dict)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def holder() -> str:
    """Who holds a lock: this process, its host and since when, in words."""
    return f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"


@contextmanager
def exclusive_lock(path: Path, wait: bool) -> Iterator[bool]:
    """Hold an exclusive OS lock on the file ``path`` (made if missing, removed when released) for the block.
    Yields True once it is held; with ``wait`` False, yields False at once when another process holds it (whose
    :func:`holder` line is then in the file). The kernel releases the lock when this process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(descriptor)
            yield False
            return
        try:  # the holder before may have removed the file between our open and our lock: lock the new one then
            same = os.path.samestat(os.fstat(descriptor), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, holder().encode())
        yield True
    finally:
        path.unlink(missing_ok=True)  # while still held: no one can lock this file after it is gone
        os.close(descriptor)


def lock_holder(path: Path) -> str:
    """What the holder of the lock file ``path`` wrote into it (who and since when)."""
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextmanager
def output_lock(output: Path, key: str = "output") -> Iterator[None]:
    """Hold ``<output>.lock`` for the block; OutputRefused (naming ``key`` and the holder) when another run is
    writing ``output``."""
    path = output.with_name(output.name + ".lock")
    with exclusive_lock(path, wait=False) as held:
        if not held:
            raise OutputRefused(
                f"{key}: {output} is being written by another run ({lock_holder(path)}); wait for it to end or "
                f"choose another {key}"
            )
        yield


@contextmanager
def cache_lock(entry: Path) -> Iterator[None]:
    """Hold ``<entry>.lock`` for the block, waiting (with a line on stderr) while another run computes the same
    cache entry, so that it is computed once and read whole."""
    path = entry.with_name(entry.name + ".lock")
    with exclusive_lock(path, wait=False) as held:
        if held:
            yield
            return
    print(f"waiting for another run computing {entry} ({lock_holder(path)})", file=sys.stderr)
    with exclusive_lock(path, wait=True):
        yield


@contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """Yield ``<output>.partial`` to write into; on success it replaces ``output`` (which is moved aside first and
    put back should the swap fail); on any error, the swap's included, it is removed. Call it holding
    :func:`output_lock`: another run's ``.partial`` is never touched."""
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        previous = None
        if output.exists() or output.is_symlink():
            previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".previous", dir=output.parent))
            os.replace(output, previous / output.name)
        try:
            partial.rename(output)
        except BaseException:
            if previous is not None:
                os.replace(previous / output.name, output)
            raise
        finally:
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def remove_stale_scratch(parent: Path) -> None:
    """Remove the directories under ``parent`` that no live process holds (a killed run's scratch files)."""
    parent.mkdir(parents=True, exist_ok=True)
    for stale in sorted(parent.iterdir()):
        if stale.suffix == ".lock" or not stale.is_dir():
            continue
        with exclusive_lock(stale.with_name(stale.name + ".lock"), wait=False) as free:
            if free:
                shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def scratch_directory(parent: Path | None) -> Iterator[Path | None]:
    """A fresh directory under ``parent`` (None without a parent), locked while in use and removed after the block.
    The directories under ``parent`` that no live process holds (left by a killed run) are removed first."""
    if parent is None:
        yield None
        return
    remove_stale_scratch(parent)
    handle, name = tempfile.mkstemp(dir=parent, suffix=".lock")
    os.close(handle)
    lock = Path(name)
    directory = lock.with_suffix("")
    with exclusive_lock(lock, wait=False) as held:
        assert held  # a name mkstemp just made is ours
        directory.mkdir()
        try:
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)
