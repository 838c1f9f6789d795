"""Image folders: the recursive scan (hidden files, extensions, symlink loops), labels from the
first-level sub-folders, the header check of every file, the bad-file policy, and the decision
between decoding everything now and streaming per batch (``max_memory_gb``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from twist.data.dataset import DataError, ImageDataset
from twist.data.decode import decode_image, display_path, failure_reason, probe_image
from twist.data.listing import Listing, list_tree, read_index, write_index
from twist.data.paths import PathTable
from twist.data.threads import num_threads, ordered_map

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm"}
)
"""File extensions (lower-case) that make a file in a folder a candidate image."""

SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation"})
"""First-level folder names that say "split", not "class" (a warning names the train folder)."""
_GIB = 1024**3
SAMPLE_HEADERS = 64
"""Headers read (a seeded sample) to decide between memory and streaming without a full scan."""
EVAL_CROP_FRACTION = 0.875
"""Evaluation of streamed photos: centre crop_size of the shorter side resized to crop_size / this."""


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


def _labelled(root: str, skips: _Skips, name: str, listing: Listing | None) -> tuple[Listing, np.ndarray, list[str]]:
    """The listing of the images to use (``listing`` when it is one of ``root``, else made now),
    their labels and the class names: labels are the first-level sub-folders holding at least
    one candidate image (labels -1 and no classes without any; files beside class folders are
    left out)."""
    if listing is None or listing.root != root:
        listing = list_tree(root, IMAGE_EXTENSIONS, failure_reason)
    for path, reason, bad in listing.left_out:
        (skips.bad if bad else skips.note)(path, reason)
    paths, runs = listing.paths, listing.runs
    class_names = sorted({top for top, _ in runs} - {""})
    if not class_names:
        return listing, np.full(len(paths), -1, dtype=np.int64), []
    if "train" in class_names and set(class_names) <= SPLIT_NAMES:
        logger.warning("%s: its sub-folders %s look like splits, not classes; they are used as classes here. "
                       "To train on the training split give %s", name, ", ".join(class_names),
                       display_path(os.path.join(root, "train")))
    class_index = {c: i for i, c in enumerate(class_names)}
    class_index[""] = -1
    labels = np.repeat(np.array([class_index[top] for top, _ in runs], dtype=np.int64),
                       np.array([n for _, n in runs], dtype=np.int64))
    outside = np.flatnonzero(labels < 0)
    if len(outside):
        for i in outside:
            skips.note(paths[i], "outside the class sub-folders (labels come from first-level sub-folders)")
        logger.warning("%s: %d image(s) directly in the top folder are left out: with class sub-folders, "
                       "labels come from the sub-folders", name, len(outside))
        keep = np.flatnonzero(labels >= 0)
        listing = listing._replace(paths=paths.take(keep))
        labels = labels[keep]
    return listing, labels, class_names


def _probe_all(paths: Sequence[str], max_pixels: int, progress: bool, desc: str) -> list[tuple[int, int, bool] | str]:
    """Header of every file (size, grey or colour, pixel limit, PNG CRCs), or the reason it is bad."""
    def probe(path: str) -> tuple[int, int, bool] | str:
        try:
            return probe_image(path, max_pixels)
        except Exception as exc:  # noqa: BLE001
            return failure_reason(exc)

    return list(ordered_map(probe, paths, num_threads(), progress=progress, desc=desc))


def _geometry(infos: list[tuple[int, int, bool]], image_size: int, name: str) -> tuple[int, tuple[int, int]]:
    """Channels (1 when every image is grey) and the common (H, W) of the decoded images."""
    channels = 1 if all(g for _, _, g in infos) else 3
    if image_size > 0:
        return channels, (image_size, image_size)
    if len({(w, h) for w, h, _ in infos}) == 1:
        return channels, (infos[0][1], infos[0][0])
    side = max(1, int(round(float(np.median([min(w, h) for w, h, _ in infos])))))
    logger.info("%s: images differ in size; all are resized to %dx%d (median shorter side)", name, side, side)
    return channels, (side, side)


def _sample_infos(paths: Sequence[str], max_pixels: int) -> list[tuple[int, int, bool]]:
    """Headers of a seeded sample of up to SAMPLE_HEADERS files (bad ones left out)."""
    rng = np.random.default_rng(0)
    pick = rng.choice(len(paths), size=min(SAMPLE_HEADERS, len(paths)), replace=False)
    infos = _probe_all([paths[i] for i in sorted(pick)], max_pixels, False, "")
    return [i for i in infos if not isinstance(i, str)]


def load_folder(root: str, image_size: int, bad_files: str, max_memory_gb: float, progress: bool,
                max_pixels: int, *, scan: str = "list", index_path: str | None = None,
                crop_size: int = 0, listing: Listing | None = None) -> ImageDataset:
    """An image folder as a dataset (see the package docstring); ``scan``, ``index_path`` and
    ``crop_size`` concern streamed folders only. ``listing``: a :func:`list_tree` of the folder's
    absolute path made already (the recipe choice lists it), used instead of listing again."""
    root = os.path.abspath(root)
    name = os.path.basename(os.path.normpath(root)) or root
    skips = _Skips(bad_files)
    settings = {"image_size": image_size, "max_memory_gb": max_memory_gb, "crop_size": crop_size,
                "max_pixels": max_pixels, "bad_files": bad_files}
    use_index = bool(index_path) and scan == "list"
    index = read_index(index_path, root, settings) if use_index else None
    if index is not None:
        return _from_index(index, root, name, max_pixels)
    listing, labels, class_names = _labelled(root, skips, name, listing)
    paths = listing.paths
    if not paths:
        _raise_empty(root, skips)

    # streamed or in memory, decided from the count and a sample of headers (no full scan)
    infos = _sample_infos(paths, max_pixels)
    channels, size = _geometry(infos or [(1, 1, False)], image_size, name)
    if len(paths) * channels * size[0] * size[1] <= max_memory_gb * _GIB or scan == "full":
        return _checked(root, name, paths, labels, class_names, skips, image_size, max_memory_gb, progress, max_pixels,
                        crop_size)
    logger.info("%s: about %.2f GiB decoded exceeds max_memory_gb=%g; images are decoded per batch "
                "(listed, not opened: bad files are found when decoded)", name,
                len(paths) * channels * size[0] * size[1] / _GIB, max_memory_gb)
    ds = _streamed(name, paths, labels, class_names, channels, size, max_pixels, crop_size)
    skips.check()
    ds.skipped = skips.items
    if use_index:
        prefix = os.path.join(root, "")  # every listed path starts with it (relpath is 20x slower)
        write_index(index_path, root, listing, settings, {
            "paths": [p[len(prefix):] for p in paths], "labels": labels.tolist(),
            "class_names": class_names, "channels": channels, "size": list(size),
            "skipped": [list(item) for item in skips.items]})
    return ds


def _streamed(name: str, paths: Sequence[str], labels: np.ndarray, class_names: list[str], channels: int, size: tuple[int, int],
              max_pixels: int, crop_size: int) -> ImageDataset:
    """A streamed folder dataset; with ``crop_size`` its batches (evaluation) are photos' centre
    crops: the shorter side resized to round(crop_size / 0.875), then the centre crop_size square."""
    ds = ImageDataset(name=name, channels=channels, size=size, labels=labels if class_names else None,
                      class_names=class_names or None, paths=PathTable.of(paths), kind="folder", max_pixels=max_pixels)
    if crop_size > 0:
        ds.size = (crop_size, crop_size)
        ds.resize_side = int(round(crop_size / EVAL_CROP_FRACTION))
    return ds


def _from_index(index: dict, root: str, name: str, max_pixels: int) -> ImageDataset:
    """The streamed dataset a run's index file describes (a resumed run lists nothing)."""
    rels = index["paths"]
    prefix = os.path.join(root, "")
    paths = PathTable(prefix + ("\0" + prefix).join(rels), len(rels))  # one join, not one per file
    labels = np.asarray(index["labels"], dtype=np.int64)
    settings = index["settings"]
    ds = _streamed(name, paths, labels, list(index["class_names"]), int(index["channels"]), tuple(index["size"]),
                   max_pixels, int(settings["crop_size"]))
    ds.skipped = [(str(p), str(r)) for p, r in index["skipped"]]
    logger.info("%s: %d images from the run's index (not listed again)", name, len(ds))
    return ds


def _checked(root: str, name: str, paths: Sequence[str], labels: np.ndarray, class_names: list[str], skips: _Skips,
             image_size: int, max_memory_gb: float, progress: bool, max_pixels: int, crop_size: int) -> ImageDataset:
    """Every header checked first (train.scan=full, and folders small enough for memory), then
    either streamed or decoded completely."""
    good: list[int] = []
    infos: list[tuple[int, int, bool]] = []
    for i, info in enumerate(_probe_all(paths, max_pixels, progress, f"checking {name}")):
        if isinstance(info, str):
            skips.bad(paths[i], info)
        else:
            good.append(i)
            infos.append(info)
    paths, labels = [paths[i] for i in good], labels[good]
    if not good:
        _raise_empty(root, skips)
    channels, size = _geometry(infos, image_size, name)
    nbytes = len(good) * channels * size[0] * size[1]
    if nbytes > max_memory_gb * _GIB:
        logger.info("%s: %.2f GiB decoded exceeds max_memory_gb=%g; images are decoded per batch",
                    name, nbytes / _GIB, max_memory_gb)
        skips.check()
        ds = _streamed(name, paths, labels, class_names, channels, size, max_pixels, crop_size)
        ds.skipped = skips.items
        return ds
    return _decode_all(root, name, paths, labels, class_names, channels, size, skips, progress, max_pixels)


def _decode_all(root: str, name: str, paths: Sequence[str], labels: np.ndarray, class_names: list[str], channels: int,
                size: tuple[int, int], skips: _Skips, progress: bool, max_pixels: int) -> ImageDataset:
    """Decode every image into one preallocated (N, C, H, W) array (threads)."""
    labels = labels if class_names else None
    ds = ImageDataset(name=name, channels=channels, size=size, labels=labels,
                      class_names=class_names or None, paths=PathTable.of(paths), kind="folder", max_pixels=max_pixels)
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
        ds.paths = ds.paths.take(keep_idx)
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
