"""The list of a folder's candidate images, made without opening any file, and its index file.

:func:`list_tree` walks the tree with ``os.scandir`` (the directory entry's type answers "is it a
folder?" without a ``stat`` for plain files; only symlinks and folders are stat'ed), applies
the folder rules of the package docstring (hidden names and non-image extensions left out,
symlinked folders followed once, a link to an ancestor reported as a loop) and returns the
entries sorted by their path parts, the order the rest of the package relies on. Why not
``os.walk``: it is scandir underneath too, but the folder scan used to open every file's header
after it (137x the walk on 9,469 JPEGs); listing is now the whole start-up of a streamed folder.

:func:`write_index` / :func:`read_index` keep a run's list in its run folder (JSON: the root's
absolute path and modification times, the listing settings, the relative paths, labels and the
entries left out), so a resumed run lists nothing. The index is reused only when the root
folder and its first-level sub-folders have the modification times recorded (adding or removing
a file or a class folder there changes them); changes deeper down are not seen: delete the
index file to list again.
"""

from __future__ import annotations

import json
import operator
import os
from typing import Any, Callable

from twist.checkpoint import atomic_write

INDEX_VERSION = 1


def list_tree(root: str, extensions: frozenset[str], bad: Callable[[str, str], None],
              note: Callable[[str, str], None], reason: Callable[[OSError], str]) -> tuple[list[str], list[str]]:
    """Candidate image files under ``root`` in the order of their path parts (a depth-first walk,
    each folder's entries in name order), with the first-level folder each lies in ('' for files
    directly in ``root``). ``bad`` / ``note`` receive (path, reason) of entries left out;
    ``reason`` words an OSError. Per plain file: no system call beyond the folder's listing."""
    paths: list[str] = []
    tops: list[str] = []
    try:
        st = os.stat(root)
    except OSError as exc:
        bad(root, f"cannot list directory: {reason(exc)}")
        return paths, tops
    seen = {(st.st_dev, st.st_ino)}

    def walk(path: str, top: str | None, ancestors: tuple[tuple[int, int], ...]) -> None:
        files: list[str] = []
        dirs: list[os.DirEntry] = []
        add_file, add_dir = files.append, dirs.append  # the loop below runs once per file: kept lean
        try:
            with os.scandir(path) as it:
                for entry in it:
                    name = entry.name
                    if name[0] == ".":
                        continue
                    try:
                        is_dir = entry.is_dir()  # follows symlinks; a plain file needs no stat (its d_type)
                    except OSError:
                        is_dir = False
                    if is_dir:
                        add_dir(entry)
                    elif name[name.rfind("."):].lower() in extensions:  # no dot: the last character, never one
                        add_file(name)
        except OSError as exc:
            bad(path, f"cannot list directory: {reason(exc)}")
            return
        files.sort()
        prefix = os.path.join(path, "")
        label = top if top is not None else ""
        if not dirs:  # the common case: a folder of files
            paths.extend([prefix + name for name in files])
            tops.extend([label] * len(files))
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
                note(entry.path, "folder already included through another path; not followed")
            else:
                seen.add(key)
                folders[entry.name] = key
        for name in sorted(files + list(folders)):
            if name in folders:
                walk(prefix + name, name if top is None else top, ancestors + (folders[name],))
            else:
                paths.append(prefix + name)
                tops.append(label)

    walk(root, None, ((st.st_dev, st.st_ino),))
    return paths, tops


_NAME = operator.attrgetter("name")


def tree_identity(root: str) -> dict[str, Any]:
    """What an index is valid for: the root's absolute path and the modification times (ns) of
    the root and of its first-level sub-folders (one ``stat`` each, no file opened)."""
    root = os.path.abspath(root)
    times = {".": os.stat(root).st_mtime_ns}
    with os.scandir(root) as it:
        for entry in it:
            try:
                if not entry.name.startswith(".") and entry.is_dir():
                    times[entry.name] = entry.stat().st_mtime_ns
            except OSError:  # a broken link or a loop: the listing reports it, the identity skips it
                continue
    return {"root": root, "mtimes": times}


def write_index(path: str, identity: dict[str, Any], settings: dict[str, Any], payload: dict[str, Any]) -> None:
    """Write the index atomically: ``payload`` holds paths relative to the root, labels, etc."""
    record = {"version": INDEX_VERSION, "identity": identity, "settings": settings, **payload}
    data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogateescape")
    atomic_write(path, lambda f: f.write(data))


def read_index(path: str, identity: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any] | None:
    """The index at ``path`` when it exists and matches ``identity`` and ``settings``, else None
    (a damaged or stale index is ignored and the folder listed again)."""
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read().decode("utf-8", "surrogateescape"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("version") != INDEX_VERSION:
        return None
    if record.get("identity") != identity or record.get("settings") != settings:
        return None
    return record

