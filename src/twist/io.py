"""The one way twist writes a file: atomically.

Every file a run or a command leaves behind (checkpoints, config.json, metrics rewrites,
predictions, embeddings, evaluation JSON, the report page, exported weights) is written to a
temporary file with a unique name in the destination folder, flushed and fsynced, then renamed
over the destination with ``os.replace``. A crash, a kill or a full disk therefore leaves the
old file or the new one, never half of one, and two processes writing the same name never
share a temporary file. The temporary names start with ``.<name>.`` and end in ``.tmp`` so that
a run folder can sweep the ones a killed process left (see :func:`stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable, Iterator

__all__ = ["atomic_path", "atomic_open", "atomic_write", "write_text_atomic", "stale_temporaries"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary file beside ``path`` (unique name, same folder, so same file system) to
    be filled by the block, for writers that need a file name (``numpy.lib.format.open_memmap``).
    When the block ends without an exception the file is fsynced and renamed over ``path``, and
    the folder is fsynced so that the rename itself survives a power cut; on an exception the
    temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some file systems cannot fsync a folder; the data itself is on disk
        pass


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` for writing, made atomic through :func:`atomic_path`. ``mode`` is
    ``"wb"`` or ``"w"`` (text, with ``open_kwargs`` such as ``encoding``, ``errors``, ``newline``)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Create ``path`` through ``write(binary_file)`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        write(f)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def stale_temporaries(folder: str | os.PathLike, name: str) -> list[Path]:
    """Temporary files of ``folder/name`` left by a process killed while writing it."""
    return sorted(Path(folder).glob(f".{name}.*.tmp"))
