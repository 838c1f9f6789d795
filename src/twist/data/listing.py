"""The list of a folder's candidate images, made without opening any file, and its index file.

:func:`list_tree` walks the tree with ``os.scandir`` (the directory entry's type answers "is it a
folder?" without a ``stat`` for plain files; only symlinks and folders are stat'ed), applies
the folder rules of the package docstring (hidden names and non-image extensions left out,
symlinked folders followed once, a link to an ancestor reported as a loop) and returns the
entries sorted by their path parts, the order the rest of the package relies on. Why not
``os.walk``: it is scandir underneath too, but the folder scan used to open every file's header
after it (137x the walk on 9,469 JPEGs); listing is now the whole start-up of a streamed folder.

:func:`write_index` / :func:`read_index` keep a run's list in its run folder (JSON: the root's
absolute path, the modification time of every folder walked, the listing settings, the relative
paths, labels and the entries left out), so a resumed run lists nothing. The index is reused
only when every folder it recorded still has its recorded time (one ``stat`` per folder, about
1,000 for ImageNet): adding, removing or renaming a file or a folder anywhere in the tree changes
its parent folder's time, so the folder is listed again. Rewriting a file in place is not seen
(it changes no folder), and needs no new list either.
"""

from __future__ import annotations

import json
import operator
import os
from typing import Any, Callable, NamedTuple

from twist.checkpoint import atomic_write
from twist.data.paths import PathTable

INDEX_VERSION = 2


class Listing(NamedTuple):
    """What :func:`list_tree` found: everything the folder loader needs, so a listing made once
    (e.g. by ``twist.autopreset.summarize_data`` to choose the recipe) is not made again when
    the same folder is loaded (``load_folder(listing=...)``)."""

    root: str
    """The folder listed, as given (the paths start with it)."""
    paths: PathTable
    """The candidate image files, packed (twist.data.paths: no Python object per path)."""
    runs: list[tuple[str, int]]
    """(first-level folder, number of consecutive paths in it), in path order."""
    folder_times: dict[str, int]
    """Modification time (ns) of every folder walked, by path relative to the root ('.' = root)."""
    left_out: list[tuple[str, str, bool]]
    """(path, reason, bad) of the entries left out: ``bad`` for ones the bad-file policy counts
    (unlistable folders, symlink loops), else a note (a folder reached twice)."""


def list_tree(root: str, extensions: frozenset[str], reason: Callable[[OSError], str]) -> Listing:
    """Candidate image files under ``root`` in the order of their path parts (a depth-first walk,
    each folder's entries in name order), runs ``(first-level folder, count)`` saying which
    first-level folder each lies in, in the same order ('' for files directly in ``root``), and
    the modification time of every folder walked, taken before it was listed (for the index),
    and the entries left out with their reasons; ``reason`` words an OSError.
    Per plain file: no system call beyond the folder's listing, and, for the usual folder of
    files with one extension, no Python statement either (see :func:`_all_images`)."""
    chunks: list[str] = []  # per folder: its files' full paths joined by NULs
    runs: list[tuple[str, int]] = []
    times: dict[str, int] = {}
    left_out: list[tuple[str, str, bool]] = []

    def bad(path: str, why: str) -> None:
        left_out.append((path, why, True))

    try:
        st = os.stat(root)
    except OSError as exc:
        bad(root, f"cannot list directory: {reason(exc)}")
        return Listing(root, PathTable(), runs, times, left_out)
    seen = {(st.st_dev, st.st_ino)}
    times["."] = st.st_mtime_ns
    skip = len(os.path.join(root, ""))

    def add(files: list[str], prefix: str, label: str) -> None:
        if files:  # the full paths made by one join, not a Python loop (nor a str per path)
            chunks.append(prefix + ("\0" + prefix).join(files))
            runs.append((label, len(files)))

    def walk(path: str, top: str | None, ancestors: tuple[tuple[int, int], ...]) -> None:
        try:
            with os.scandir(path) as it:
                entries = list(it)
            files, dirs = _split(entries, extensions)
        except OSError as exc:
            bad(path, f"cannot list directory: {reason(exc)}")
            return
        files.sort()
        prefix = os.path.join(path, "")
        label = top if top is not None else ""
        if not dirs:  # the common case: a folder of files
            add(files, prefix, label)
            return
        # every sub-folder of this folder is claimed before any is entered (as os.walk top-down),
        # so a link elsewhere to one of them is the duplicate, not the folder itself
        folders: dict[str, tuple[int, int]] = {}
        for entry in sorted(dirs, key=_NAME):
            try:
                st = entry.stat()
            except OSError as exc:
                bad(entry.path, f"cannot list directory: {reason(exc)}")
                continue
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                bad(entry.path, "symlink loop (links to a folder that contains it); not followed")
            elif key in seen:
                left_out.append((entry.path, "folder already included through another path; not followed", False))
            else:
                seen.add(key)
                folders[entry.name] = key
                times[entry.path[skip:]] = st.st_mtime_ns
        for name in sorted(files + list(folders)):
            if name in folders:
                walk(prefix + name, name if top is None else top, ancestors + (folders[name],))
            else:
                add([name], prefix, label)

    walk(root, None, ((st.st_dev, st.st_ino),))
    return Listing(root, PathTable.from_chunks(chunks), runs, times, left_out)


def _split(entries: list[os.DirEntry], extensions: frozenset[str]) -> tuple[list[str], list[os.DirEntry]]:
    """(names of candidate image files, visible sub-folder entries) of one folder's listing:
    hidden names and other extensions are left out; a symlink counts as what it points to."""
    try:  # is_dir follows symlinks; a plain file needs no stat (its d_type). map: a loop in C
        flags = list(map(_IS_DIR, entries))
    except OSError:
        flags = [_is_dir(e) for e in entries]
    dirs = [e for e, is_dir in zip(entries, flags) if is_dir and e.name[0] != "."] if any(flags) else []
    if not dirs:
        names = list(map(_NAME, entries))
        if _all_images(names, extensions):
            return names, dirs
    else:
        names = [e.name for e in entries if not _is_dir(e)]
    files = [name for name in names
             if name[0] != "." and name[name.rfind("."):].lower() in extensions]  # no dot: the last character
    return files, dirs


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # e.g. a permission error on a symlink's target: not a folder to enter
        return False


def _all_images(names: list[str], extensions: frozenset[str]) -> bool:
    """Whether every name in ``names`` is visible and ends with the first one's extension, one of
    ``extensions`` (case-insensitive): two string scans in C instead of a statement per file.
    Each name ends with at most one "extension + NUL" of the joined text, so the count equals
    the number of names only when every name has that extension."""
    if not names:
        return True
    first = names[0]
    ext = first[first.rfind("."):].lower()
    if len(ext) < 2 or ext not in extensions:
        return False
    text = ("\0".join(names) + "\0").lower()
    return not text.startswith(".") and "\0." not in text and text.count(ext + "\0") == len(names)


_NAME = operator.attrgetter("name")
_IS_DIR = os.DirEntry.is_dir


def write_index(path: str, root: str, listing: Listing, settings: dict[str, Any], payload: dict[str, Any]) -> None:
    """Write the index atomically: the root's absolute path and ``listing``'s folder times (what
    the index is valid for), ``settings``, and ``payload`` (paths relative to the root, labels...)."""
    identity = {"root": os.path.abspath(root), "mtimes": listing.folder_times}
    record = {"version": INDEX_VERSION, "identity": identity, "settings": settings, **payload}
    data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogateescape")
    atomic_write(path, lambda f: f.write(data))


def read_index(path: str, root: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The index at ``path`` when it exists, was made for ``root`` with ``settings``, and no folder
    it lists has changed since (one ``stat`` per folder: a file added or removed anywhere changes
    its folder's time), else None: a damaged or stale index is ignored and the folder listed again."""
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read().decode("utf-8", "surrogateescape"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("version") != INDEX_VERSION:
        return None
    identity = record.get("identity")
    if record.get("settings") != settings or not isinstance(identity, dict):
        return None
    root = os.path.abspath(root)
    times = identity.get("mtimes")
    if identity.get("root") != root or not isinstance(times, dict) or "." not in times:
        return None
    prefix = os.path.join(root, "")
    try:
        if any(os.stat(root if rel == "." else prefix + rel).st_mtime_ns != t for rel, t in times.items()):
            return None
    except (OSError, TypeError):
        return None
    return record
