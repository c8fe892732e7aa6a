"""The toolkit's cache and data directories, the identity of files that key the cache, and staged outputs."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def cache_dir(configured: str | None = None) -> Path:
    """Toolkit cache: the recipe's ``cache_dir``, else $PRUNE_CACHE_DIR, else ~/.cache/prune."""
    return Path(configured or os.environ.get("PRUNE_CACHE_DIR") or Path.home() / ".cache" / "prune").expanduser()


def data_dir() -> Path | None:
    """The data directory $PRUNE_DATA_DIR (laid out like ``../shared/data``), or None when unset."""
    value = os.environ.get("PRUNE_DATA_DIR")
    return Path(value).expanduser() if value else None


def file_identity(path: Path) -> str:
    """Absolute path, size and modification time of a file, or of the weight files of a directory."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return f"{path.resolve()}:{stats}"


@contextmanager
def staged_directory(output: Path):
    """Yield ``<output>.partial`` to write into; it replaces ``output`` on success and is removed on any error."""
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    partial.rename(output)
