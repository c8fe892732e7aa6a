"""The toolkit's cache and data directories, the identity of files that key the cache, and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_dir(configured: str | None = None) -> Path:
    """Toolkit cache: the recipe's ``cache_dir``, else $PRUNE_CACHE_DIR, else ~/.cache/prune."""
    return Path(configured or os.environ.get("PRUNE_CACHE_DIR") or Path.home() / ".cache" / "prune").expanduser()


def data_dir() -> Path | None:
    """The data directory $PRUNE_DATA_DIR (files laid out as docs/data.md says)."""
    value = os.environ.get("PRUNE_DATA_DIR")
    return Path(value).expanduser() if value else None


def file_identity(path: Path) -> str:
    """Absolute path, size and modification time of a file, or of the weight files of a directory."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return f"{path.resolve()}:{stats}"


class DamagedCacheError(ValueError):
    """A cache file that fails its own check (truncated, corrupted, or of another format version)."""


def recomputing(path: Path, error: Exception) -> None:
    """Say on stderr, in one line, that a damaged cache file is set aside and its content computed again."""
    reason = str(error) if isinstance(error, DamagedCacheError) else f"unreadable ({type(error).__name__})"
    print(f"warning: {path}: {reason}; computing it again", file=sys.stderr)


def sha256_bytes(chunks) -> str:
    """Hex SHA-256 of a sequence of bytes-like chunks."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's content."""
    with path.open("rb") as file:
        return sha256_bytes(iter(lambda: file.read(chunk_bytes), b""))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary file name beside ``path``; write it, and on success it replaces ``path``.

    The rename is atomic on one file system, so a reader sees the old file or the whole new one, never a
    part; on any error (or interruption) the temporary file is removed and ``path`` is left as it was.
    Unique temporary names let several processes write the same ``path`` at once: the last rename wins.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def write_checked_json(path: Path, value: Any, version: int) -> None:
    """Write ``value`` as JSON with the format ``version`` and its checksum, atomically."""
    atomic_write_text(path, json.dumps({"version": version, "sha256": _digest(value), "value": value}))


def read_checked_json(path: Path, version: int) -> Any:
    """The value :func:`write_checked_json` wrote; DamagedCacheError when the file is damaged or of another
    format version."""
    try:
        stored = json.loads(path.read_text())
        value, stored_version, digest = stored["value"], stored["version"], stored["sha256"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise DamagedCacheError(f"not a readable cache file ({type(error).__name__})") from None
    if stored_version != version or digest != _digest(value):
        raise DamagedCacheError("its content does not match its checksum or version")
    return value


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it is renamed to ``path``.

    For caches: when another process created ``path`` meanwhile, its copy is kept and ours is dropped.
    On any error the temporary directory is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield temporary
        try:
            temporary.rename(path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def link_or_copy(source: Path, destination: Path) -> None:
    """``destination`` made the same file as ``source``: a hard link, so that no byte is written twice, or a copy
    where links cannot be made (another file system); for a directory, every file under it."""
    if source.is_dir():
        for file in sorted(source.rglob("*")):
            if file.is_file():
                link_or_copy(file, destination / file.relative_to(source))
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
