"""Image folders: the recursive scan (hidden files, extensions, symlink loops), labels from the
first-level sub-folders, the header check of every file, the bad-file policy, and the decision
between decoding everything now and streaming per batch (``max_memory_gb``)."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from twist.data.dataset import DataError, ImageDataset
from twist.data.decode import decode_image, display_path, failure_reason, probe_image
from twist.data.threads import PROGRESS_DELAY_S, num_threads, ordered_map

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm"}
)
"""File extensions (lower-case) that make a file in a folder a candidate image."""

_GIB = 1024**3


class _Skips:
    """Collects skipped entries. Under 'stop' the bad ones are gathered while the folder is
    checked and :meth:`check` raises naming the first in sorted path order (so the file named
    does not depend on which check found it) with the count of the others."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.items: list[tuple[str, str]] = []
        self.bad_items: list[tuple[str, str]] = []

    def bad(self, path: str, reason: str) -> None:
        self.items.append((path, reason))
        self.bad_items.append((path, reason))

    def note(self, path: str, reason: str) -> None:
        self.items.append((path, reason))

    def check(self) -> None:
        if self.policy != "stop" or not self.bad_items:
            return
        path, reason = min(self.bad_items, key=lambda item: item[0].split(os.sep))
        more = len(self.bad_items) - 1
        others = f"; {more} other bad file(s) too" if more else ""
        raise DataError(f"bad image file {display_path(path)}: {reason} "
                        f"(bad_files='stop'{others}; use bad_files='skip' to leave such files out)")


def _scan_tree(root: str, skips: _Skips, progress: bool) -> list[tuple[tuple[str, ...], str]]:
    """Candidate image files under root as (relative parts, path), sorted by parts."""
    found: list[tuple[tuple[str, ...], str]] = []
    root_real = os.path.realpath(root)
    seen = {root_real}

    def onerror(exc: OSError) -> None:
        skips.bad(exc.filename if exc.filename is not None else root, f"cannot list directory: {failure_reason(exc)}")

    from tqdm.auto import tqdm

    bar = tqdm(desc=f"scanning {display_path(os.path.basename(root) or root)}", unit=" files",
               disable=None if progress else True, delay=PROGRESS_DELAY_S, leave=False)
    try:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=onerror):
            here = os.path.realpath(dirpath)
            keep = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue
                full = os.path.join(dirpath, d)
                real = os.path.realpath(full)
                if here == real or here.startswith(real.rstrip(os.sep) + os.sep):
                    skips.bad(full, "symlink loop (links to a folder that contains it); not followed")
                elif real in seen:
                    skips.note(full, "folder already included through another path; not followed")
                else:
                    seen.add(real)
                    keep.append(d)
            dirnames[:] = keep
            rel = os.path.relpath(dirpath, root)
            rel_parts = () if rel == os.curdir else tuple(rel.split(os.sep))
            for f in filenames:
                if f.startswith(".") or os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                found.append((rel_parts + (f,), os.path.join(dirpath, f)))
            bar.update(len(filenames))
    finally:
        bar.close()
    found.sort(key=lambda t: t[0])
    return found


def load_folder(root: str, image_size: int, bad_files: str, max_memory_gb: float, progress: bool,
                 max_pixels: int) -> ImageDataset:
    root = os.path.abspath(root)
    name = os.path.basename(os.path.normpath(root)) or root
    skips = _Skips(bad_files)
    found = _scan_tree(root, skips, progress)

    # labels: first-level sub-folders holding at least one candidate image
    class_names = sorted({parts[0] for parts, _ in found if len(parts) >= 2})
    if class_names:
        class_index = {c: i for i, c in enumerate(class_names)}
        kept = []
        for parts, path in found:
            if len(parts) == 1:
                skips.note(path, "outside the class sub-folders (labels come from first-level sub-folders)")
            else:
                kept.append((path, class_index[parts[0]]))
        outside = len(found) - len(kept)
        if outside:
            logger.warning("%s: %d image(s) directly in the top folder are left out: with class sub-folders, "
                           "labels come from the sub-folders", name, outside)
    else:
        kept = [(path, -1) for _, path in found]
    if not kept:
        _raise_empty(root, skips)

    # header scan: size, grey or colour, pixel limit, PNG CRCs
    def probe(path: str) -> tuple[int, int, bool] | str:
        try:
            return probe_image(path, max_pixels)
        except Exception as exc:  # noqa: BLE001
            return failure_reason(exc)

    good: list[tuple[str, int]] = []
    infos: list[tuple[int, int, bool]] = []
    for (path, label), info in zip(kept, ordered_map(probe, [p for p, _ in kept], num_threads(),
                                                      progress=progress, desc=f"checking {name}")):
        if isinstance(info, str):
            skips.bad(path, info)
        else:
            good.append((path, label))
            infos.append(info)
    if not good:
        _raise_empty(root, skips)

    channels = 1 if all(g for _, _, g in infos) else 3
    if image_size > 0:
        size = (image_size, image_size)
    elif len({(w, h) for w, h, _ in infos}) == 1:
        size = (infos[0][1], infos[0][0])
    else:
        side = max(1, int(round(float(np.median([min(w, h) for w, h, _ in infos])))))
        size = (side, side)
        logger.info("%s: images differ in size; all are resized to %dx%d (median shorter side)", name, side, side)

    paths = [p for p, _ in good]
    labels = np.array([lab for _, lab in good], dtype=np.int64) if class_names else None
    nbytes = len(paths) * channels * size[0] * size[1]
    ds = ImageDataset(name=name, channels=channels, size=size, labels=labels,
                      class_names=class_names or None, paths=paths, kind="folder", max_pixels=max_pixels)
    if nbytes > max_memory_gb * _GIB:
        logger.info("%s: %.2f GiB decoded exceeds max_memory_gb=%g; images are decoded per batch",
                    name, nbytes / _GIB, max_memory_gb)
        skips.check()
        ds.skipped = skips.items
        return ds

    # full decode into one preallocated (N, C, H, W) array
    arr = np.empty((len(paths), channels, size[0], size[1]), dtype=np.uint8)

    def work(i: int) -> str | None:
        try:
            arr[i] = decode_image(paths[i], size, channels, max_pixels)
            return None
        except Exception as exc:  # noqa: BLE001
            return failure_reason(exc)

    ok = np.ones(len(paths), dtype=bool)
    for i, r in enumerate(ordered_map(work, range(len(paths)), num_threads(), progress=progress,
                                       desc=f"decoding {name}")):
        if r is not None:
            skips.bad(paths[i], r)
            ok[i] = False
    if not ok.any():
        _raise_empty(root, skips)
    skips.check()
    if not ok.all():
        keep_idx = np.flatnonzero(ok)
        for dst, src in enumerate(keep_idx):  # in-place forward compaction (dst <= src)
            if dst != src:
                arr[dst] = arr[src]
        arr = arr[: len(keep_idx)]
        ds.paths = [paths[i] for i in keep_idx]
        if labels is not None:
            ds.labels = labels[keep_idx]
    ds.images = torch.from_numpy(arr)
    ds.skipped = skips.items
    if skips.items:
        logger.warning("%s: %d file(s) skipped; see the skipped list", name, len(skips.items))
    return ds


def _raise_empty(root: str, skips: _Skips) -> None:
    skips.check()
    if not skips.items:
        raise DataError(f"no images found in {display_path(root)} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    shown = "; ".join(f"{display_path(p)}: {r}" for p, r in skips.items[:3])
    more = f" (and {len(skips.items) - 3} more)" if len(skips.items) > 3 else ""
    raise DataError(f"no usable images in {display_path(root)}: {len(skips.items)} file(s) left out, e.g. {shown}{more}")
