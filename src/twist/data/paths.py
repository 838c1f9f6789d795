"""A streamed dataset's file paths packed into one buffer (:class:`PathTable`).

Why not a list of ``str``: a list holds one Python object per path (about 57 bytes plus the
name), and every read of an item writes that object's reference count. ``DataLoader`` workers
are forked from the training process and share its memory copy-on-write, so a worker that
reads paths all over a shuffled epoch writes to (and so copies) nearly every page of them: a
child forked from a process holding 100,000 paths grew by 113 bytes per path reading each once,
the whole list once per worker (``python benchmarks/photo_loader.py --part memory``; the
well-known PyTorch "copy-on-read" growth: for ImageNet's 1.28M paths and 10 workers per GPU,
about 1.4 GB per GPU). Reading a table copies nothing (0.2 bytes per path in the same probe).
A :class:`PathTable` keeps the paths as one ``bytes`` buffer (NUL-separated, UTF-8 with
``surrogatepass``, so any ``str`` path, undecodable names included, comes back exactly) and a
numpy array of offsets: reading path ``i`` slices the buffer and decodes a new string, writing
nothing shared, and the table costs the path's bytes plus 9 per path.

It is a read-only :class:`collections.abc.Sequence` of ``str``: indexing, slicing (a new table),
iteration, ``len``, ``index``, ``in``, and ``==`` against any sequence of the same strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import overload

import numpy as np

_ENCODING, _ERRORS = "utf-8", "surrogatepass"


class PathTable(Sequence):
    """Paths in one NUL-separated buffer with an offset per path (see the module docstring)."""

    __slots__ = ("_blob", "_starts")
    __hash__ = None  # equal to lists of the same paths, which are unhashable

    def __init__(self, joined: str = "", count: int | None = None) -> None:
        """The table of the paths in ``joined``, the paths joined by NUL characters (``count``,
        when given, is checked: ``""`` holds no path, unless ``count`` is 1: one empty path)."""
        empty = count == 0 or (not joined and count is None)
        self._blob, self._starts = _pack([] if empty else [joined])
        if count is not None and len(self) != count:
            raise ValueError(f"{len(self)} NUL-separated paths, expected {count} (a path holds a NUL character)")

    @classmethod
    def from_chunks(cls, chunks: Iterable[str]) -> PathTable:
        """The table of the paths in ``chunks``, each a run of paths joined by NUL characters (a
        folder's files, say), without joining the chunks' text first: the peak memory is the
        chunks' text, their bytes and the table, not also one string of everything."""
        return _restore(*_pack(chunks))

    @classmethod
    def of(cls, paths: Iterable[str]) -> PathTable:
        """The table of ``paths`` (any iterable of ``str``; a table is returned as it is)."""
        if isinstance(paths, PathTable):
            return paths
        items = list(paths)
        if any("\0" in p for p in items):
            raise ValueError("a path holds a NUL character")
        return cls("\0".join(items), len(items))

    def __len__(self) -> int:
        return len(self._starts) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> PathTable: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"path index {i} out of range for {n} paths")
        starts = self._starts
        return self._blob[starts[i]:starts[i + 1] - 1].decode(_ENCODING, _ERRORS)

    def __iter__(self) -> Iterator[str]:
        if len(self):  # one decode and one split for the whole table
            yield from self._blob[:-1].decode(_ENCODING, _ERRORS).split("\0")

    def take(self, indices: Iterable[int]) -> PathTable:
        """A new table of the paths at ``indices``, in that order."""
        return PathTable.of(self[int(i)] for i in indices)

    def nbytes(self) -> int:
        """Bytes held: the buffer and the offsets."""
        return len(self._blob) + self._starts.nbytes

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PathTable):
            return self._blob == other._blob
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and list(self) == list(other)
        return NotImplemented

    def __reduce__(self):  # pickled as the buffer (spawned workers, copies), not path by path
        return (_restore, (self._blob, self._starts))

    def __repr__(self) -> str:
        return f"PathTable({len(self)} paths, {self.nbytes()} bytes)"


def _pack(chunks: Iterable[str]) -> tuple[bytes, np.ndarray]:
    """The buffer (every path NUL-terminated) and the start offsets (one more than the paths) of
    the paths in ``chunks``, each chunk a run of paths joined by NULs; one copy into the buffer."""
    parts: list[bytes] = []
    ends: list[np.ndarray] = []
    at = 0
    for chunk in chunks:
        data = chunk.encode(_ENCODING, _ERRORS)
        ends += [np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0) + at, np.array([at + len(data)])]
        parts.append(data)
        at += len(data) + 1
    starts = np.concatenate([np.full(1, -1, dtype=np.int64), *ends], dtype=np.int64) + 1
    return b"\0".join([*parts, b""]) if parts else b"", starts


def _restore(blob: bytes, starts: np.ndarray) -> PathTable:
    table = PathTable.__new__(PathTable)
    table._blob, table._starts = blob, starts
    return table
