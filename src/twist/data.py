"""Datasets as ``uint8`` tensors: image folders, npz files, npz split folders, built-in ``digits``.

``load_dataset(spec, split, ...)`` returns an :class:`ImageDataset`; ``batch_loader(...)`` turns
it into batches of ``(uint8 images (b, C, H, W), int64 indices)``. Every image of a dataset has
the same number of channels (1 or 3) and the same size.

Sources (chosen from ``spec``)
------------------------------
- ``"digits"``: scikit-learn's 8x8 digits (1797 images, 10 classes); values 0..16 become
  ``round(v * 255 / 16)``. The literal string always means the built-in set (write ``./digits``
  for a folder of that name). It has one split: every ``split`` returns the same 1797 images.
- a ``.npz`` file: ``x`` (N, H, W, C) or (N, H, W) ``uint8`` with C in {1, 3}; optional ``y``
  (N,) integer labels; ``classes.txt`` beside the file names the classes. One split: every
  ``split`` returns the whole file.
- a directory holding ``*.npz`` files (e.g. ``cifar10/``): split ``s`` is the concatenation of
  the files whose stem is ``s`` or starts with ``s`` followed by a non-letter (``train_0``,
  ``train1``; not ``trainval``), in natural order (``train_2`` before ``train_10``). So
  ``train`` = ``train_0.npz + train_1.npz`` and ``test`` = ``test.npz``. ``classes.txt`` in the
  directory gives class names.
- any other directory: an image folder, searched recursively (symlinks followed). Files and
  folders whose name starts with ``.`` are ignored, as are files without an image extension
  (:data:`IMAGE_EXTENSIONS`). When some first-level sub-folder holds images, the labels are the
  index of that sub-folder in the sorted list of such sub-folders (``class_names``); images lying
  directly in the top folder then have no class: they are left out and listed in ``skipped``
  (reason "outside the class sub-folders"), without stopping under ``bad_files='stop'``.
  Without such sub-folders ``labels`` and ``class_names`` are ``None``. One split: every
  ``split`` returns the whole folder (point the spec at the split's folder instead).

Arrays (npz, digits) are always held in memory; ``max_memory_gb`` concerns folders only.

Folder images
-------------
Decoded with PIL (formats: JPEG, PNG, BMP, GIF, TIFF, WebP, PPM/PGM/PBM; first frame), with the
EXIF orientation applied. Alpha is composited on white (also palette/grey transparency);
palette, CMYK, YCbCr, ... become RGB; 1-bit becomes 0/255; 16-bit grey is scaled to 8 bits
(``v * 255 / 65535``, rounded; never clipped at 255). The dataset has 1 channel when every
usable image is grey (modes 1, L, LA, I, I;16*, F), else 3 (grey images are replicated).
Size: with ``image_size > 0`` each image's shorter side is resized (bicubic, antialiased) to
``image_size`` and the centre ``image_size`` square is cropped. With ``image_size == 0`` images
keep their size when all have the same one; otherwise they are brought to a square whose side is
the median shorter side (rounded) in the same way. ``image_size > 0`` also resizes npz/digits
arrays whose size differs (same resize + crop).

Bad files (``bad_files``)
-------------------------
A bad file is one that cannot become an image: zero bytes, not an image (e.g. text named
``.jpg``), corrupt or truncated data, permission denied, a broken link or a symlink loop, a
directory that cannot be listed, or more pixels than ``max_pixels`` (decompression-bomb guard,
default PIL's ``Image.MAX_IMAGE_PIXELS``, ~0.9e8; PIL's own ``DecompressionBombError`` counts
too). A directory symlink pointing to one of its own ancestors is a bad entry ("symlink loop")
and is not followed; a directory reached a second time through another link is not followed
either and is listed as a note. ``'skip'`` lists ``(path, reason)`` in ``dataset.skipped`` and
goes on; ``'stop'`` raises :class:`DataError` once the folder has been checked (and, for
in-memory folders, decoded), naming the first bad file in sorted path order and how many others
there are.
A dataset with no usable image raises :class:`DataError` whatever the policy. File names that
are not valid UTF-8 are kept as ``str`` with surrogate escapes (they open fine); use
:func:`display_path` to print or write them (``write_skipped`` does).

Memory and streaming
--------------------
A folder whose decoded size ``N*C*H*W`` bytes exceeds ``max_memory_gb`` GiB is streamed: the
scan opens every file's header (size, mode, orientation, pixel limit, ``Image.verify`` which
checks PNG chunk CRCs) and decoding happens per batch, in ``DataLoader`` workers when
``num_workers > 0``. Smaller folders are decoded completely at load time (the same header scan
first, then a full decode, in threads), so nothing can fail during training. A streamed file that
passes the scan but fails to decode later (e.g. a truncated JPEG, or a file removed since) never
stops an epoch, under either policy: its slot in the batch gets a copy of the previous good image
of the same batch (the next one when it is first); the file is added to ``skipped`` once, the
count ``replaced`` grows, and a warning is logged. If no image of a batch decodes, up to 64 other
images of the dataset are tried before a :class:`DataError`.

Batches
-------
``batch_loader`` draws one permutation per ``(seed, epoch)`` from a ``torch.Generator`` (seed
``seed * 1000003 + epoch``); rank ``r`` of ``world_size`` takes ``perm[r::world_size]``
(``DistributedSampler`` semantics). With ``drop_last`` the permutation is first cut to a multiple
of ``world_size`` and each rank's incomplete last batch is dropped, so every rank gets the same
number of full batches. Without ``drop_last`` the permutation is padded by wrapping around to a
multiple of ``world_size``; a padded entry is yielded with the index ``-1 - i`` (``i`` the real
image index) so that evaluation can drop duplicates: see :func:`padding_mask` and
:func:`real_indices`. With one process nothing is ever padded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat as stat_module
import warnings
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "DataError",
    "ImageDataset",
    "BatchLoader",
    "load_dataset",
    "batch_loader",
    "padding_mask",
    "real_indices",
    "display_path",
    "IMAGE_EXTENSIONS",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm"}
)
"""File extensions (lower-case) that make a file in a folder a candidate image."""

# Only these PIL plugins may open a file, whatever its extension (no EPS/ghostscript etc.).
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "GIF", "TIFF", "WEBP", "PPM")
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_GIB = 1024**3
_PROGRESS_DELAY_S = 1.0  # progress bars appear only for loads that take longer than this
_REPLACEMENT_TRIES = 64


class DataError(ValueError):
    """The data cannot be used as asked: missing path, empty dataset, bad file under 'stop'..."""


def display_path(path: str | os.PathLike | bytes) -> str:
    """``path`` as printable, UTF-8-safe text: undecodable bytes become ``\\xNN``, control
    characters (tab, newline, ...) are escaped. For messages, logs and TSV/JSON/CSV files."""
    if isinstance(path, bytes):
        raw = path
    else:
        path = os.fspath(path)
        try:
            raw = path if isinstance(path, bytes) else os.fsencode(path)
        except UnicodeError:  # lone surrogates that are not escaped bytes
            raw = path.encode("utf-8", errors="backslashreplace")
    text = raw.decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# ====================================================================== the dataset
@dataclass(eq=False, repr=False)
class ImageDataset:
    """Images of one split as ``uint8`` ``(N, C, H, W)``, in memory or streamed from files."""

    name: str
    channels: int
    size: tuple[int, int]
    """(H, W) of every image."""
    images: torch.Tensor | None = None
    """(N, C, H, W) uint8 when in memory; None when streamed."""
    labels: np.ndarray | None = None
    """(N,) int64, or None when the source has no labels."""
    class_names: list[str] | None = None
    paths: list[str] | None = None
    """File of each image (folders only), in the same order as the images."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of every file or directory left out (see the module docstring)."""
    kind: str = "array"
    """'digits', 'npz', 'npz-splits' or 'folder'."""
    replaced: int = 0
    """Streamed only: how many batch slots got a substitute image because a file failed."""
    max_pixels: int | None = None
    """Pixel limit used when decoding streamed files."""
    _failed: set = field(default_factory=set)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        if self.images is not None:
            return int(self.images.shape[0])
        return len(self.paths or ())

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, kind={self.kind!r}, n={len(self)}, channels={self.channels}, "
                f"size={self.size}, labels={'yes' if self.labels is not None else 'no'}, "
                f"classes={len(self.class_names) if self.class_names else 0}, in_memory={self.in_memory}, "
                f"skipped={len(self.skipped)})")

    def describe(self) -> str:
        """One line for logs: count, shape, labels, memory mode, skipped files."""
        h, w = self.size
        text = f"{self.name}: {len(self)} images {self.channels}x{h}x{w}"
        if self.class_names:
            text += f", {len(self.class_names)} classes"
        elif self.labels is not None:
            text += ", labelled"
        text += ", in memory" if self.in_memory else ", streamed from disk"
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        return text

    # ------------------------------------------------------------------ batches
    def get_batch(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """Images ``indices`` (real indices in ``[0, N)``) as uint8 ``(b, C, H, W)``."""
        if isinstance(indices, torch.Tensor):
            idx = indices.detach().to("cpu", torch.long).reshape(-1)
        else:
            idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(f"image index out of range [0, {n}) (padded loader indices: use real_indices)")
        if self.images is not None:
            return self.images.index_select(0, idx)
        images, failures = self._decode_batch(idx.numpy(), threads=None)
        self._record_failures(failures)
        return images

    def _decode_batch(self, idx: np.ndarray, threads: int | None) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        """Decode files ``idx`` (streamed mode); failed slots get a substitute image."""
        assert self.paths is not None
        h, w = self.size
        out = np.empty((len(idx), self.channels, h, w), dtype=np.uint8)
        paths = self.paths

        def work(j: int) -> str | None:
            try:
                out[j] = _decode(paths[idx[j]], self.size, self.channels, self.max_pixels)
                return None
            except Exception as exc:  # noqa: BLE001 - any decode failure is a bad file
                return _reason(exc)

        Image.init()
        if threads is None:
            threads = 1 if torch.utils.data.get_worker_info() is not None else _num_threads()
        results = list(_ordered_map(work, range(len(idx)), threads))
        failures = [(paths[idx[j]], r) for j, r in enumerate(results) if r is not None]
        if failures:
            ok = np.array([r is None for r in results])
            if not ok.any():
                for k in range(1, _REPLACEMENT_TRIES + 1):
                    try:
                        out[0] = _decode(paths[(int(idx[0]) + k) % len(paths)], self.size, self.channels, self.max_pixels)
                    except Exception:  # noqa: BLE001
                        continue
                    ok[0] = True
                    break
                else:
                    path, reason = failures[0]
                    raise DataError(f"no image of a batch could be decoded (e.g. {display_path(path)}: {reason}); "
                                    f"the data may have become unreadable")
            good = np.flatnonzero(ok)
            for j in np.flatnonzero(~ok):
                before = good[good < j]
                out[j] = out[before[-1] if len(before) else good[0]]
        return torch.from_numpy(out), failures

    def _record_failures(self, failures: Iterable[tuple[str, str]]) -> None:
        for path, reason in failures:
            self.replaced += 1
            if path not in self._failed:
                self._failed.add(path)
                self.skipped.append((path, f"failed to decode during training, replaced in its batch: {reason}"))
                logger.warning("could not decode %s (%s); replaced by another image of its batch",
                               display_path(path), reason)

    # ------------------------------------------------------------------ reporting
    def write_skipped(self, path: str | os.PathLike) -> Path:
        """Write ``skipped`` to ``path``: JSON (list of {path, reason}) when it ends in ``.json``,
        else TSV with a ``path<TAB>reason`` header. Paths go through :func:`display_path`, so the
        file is valid UTF-8 even for undecodable file names."""
        out = Path(path)
        rows = [(display_path(p), display_path(r)) for p, r in self.skipped]
        if out.suffix.lower() == ".json":
            text = json.dumps([{"path": p, "reason": r} for p, r in rows], ensure_ascii=False, indent=1) + "\n"
        else:
            text = "path\treason\n" + "".join(f"{p}\t{r}\n" for p, r in rows)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
        return out


# ====================================================================== loading
def load_dataset(
    spec: str,
    split: str = "train",
    image_size: int = 0,
    bad_files: str = "skip",
    max_memory_gb: float = 4.0,
    progress: bool = True,
    *,
    max_pixels: int | None = None,
) -> ImageDataset:
    """Load ``spec`` ('digits', a .npz file, a folder of .npz splits or an image folder).

    See the module docstring for the sources, conversions and policies. ``max_pixels`` is the
    decompression-bomb limit for folder images (None = PIL's ``Image.MAX_IMAGE_PIXELS``).
    """
    if bad_files not in ("skip", "stop"):
        raise DataError(f"bad_files must be 'skip' or 'stop', got {bad_files!r}")
    if image_size < 0:
        raise DataError(f"image_size must be >= 0, got {image_size}")
    if not max_memory_gb > 0:
        raise DataError(f"max_memory_gb must be positive, got {max_memory_gb}")
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS or 100_000_000
    Image.init()  # register PIL's plugins once, before any decoding thread starts
    spec = str(spec)
    if not spec:
        raise DataError("empty dataset spec: give 'digits', a .npz file or a directory")
    if spec == "digits":
        ds = _load_digits()
    else:
        path = os.path.expanduser(spec)
        if not os.path.exists(path):
            raise DataError(f"dataset path does not exist: {display_path(path)}")
        if os.path.isdir(path):
            npz = [e for e in _listdir(path) if e.lower().endswith(".npz") and os.path.isfile(os.path.join(path, e))]
            if npz:
                ds = _load_npz_split_dir(path, npz, split)
            else:
                ds = _load_folder(path, image_size, bad_files, max_memory_gb, progress, max_pixels)
        elif path.lower().endswith(".npz"):
            ds = _load_npz_files([path], _stem(path), os.path.dirname(os.path.abspath(path)), "npz")
        else:
            raise DataError(f"not a dataset: {display_path(path)} (expected 'digits', a .npz file or a directory)")
    if len(ds) == 0:
        raise DataError(f"dataset {display_path(spec)} has no images")
    if ds.kind != "folder" and image_size > 0 and ds.size != (image_size, image_size):
        _resize_arrays(ds, image_size, progress)
    logger.info("%s", ds.describe())
    return ds


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        raise DataError(f"cannot list directory {display_path(path)}: {_reason(exc)}") from None


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def _natural_key(name: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _load_digits() -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = torch.from_numpy(np.ascontiguousarray(x[:, None]))
    return ImageDataset(name="digits", channels=1, size=(8, 8), images=images,
                        labels=np.asarray(d.target, dtype=np.int64),
                        class_names=[str(c) for c in range(10)], kind="digits")


def _load_npz_split_dir(path: str, npz_names: list[str], split: str) -> ImageDataset:
    def belongs(name: str) -> bool:
        stem = name[:-4]
        return stem == split or (stem.startswith(split) and not stem[len(split)].isalpha())

    chosen = sorted((n for n in npz_names if split and belongs(n)), key=_natural_key)
    if not chosen:
        raise DataError(f"no '{split}' split in {display_path(path)}: expected {split}.npz or {split}_*.npz; "
                        f"found {', '.join(npz_names)}")
    base = os.path.basename(os.path.normpath(os.path.abspath(path)))
    return _load_npz_files([os.path.join(path, n) for n in chosen], f"{base}/{split}", path, "npz-splits")


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise DataError(f"{display_path(path)} has no array 'x' (found: {', '.join(z.files) or 'nothing'})")
            x = z["x"]
            y = z["y"] if "y" in z.files else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {display_path(path)}: {exc}") from None
    if x.dtype != np.uint8:
        raise DataError(f"{display_path(path)}: 'x' must be uint8 (0..255), got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{display_path(path)}: 'x' must be (N, H, W, C) with C = 1 or 3, or (N, H, W); "
                        f"got shape {tuple(x.shape)}")
    if y is not None:
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{display_path(path)}: 'y' must be ({len(x)},) labels, got shape {tuple(y.shape)}")
        if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            raise DataError(f"{display_path(path)}: 'y' must hold integers, got {y.dtype}")
        y = y.astype(np.int64, copy=False)
    return x, y


def _load_npz_files(files: list[str], name: str, class_dir: str, kind: str) -> ImageDataset:
    parts = [(f, *_read_npz(f)) for f in files]
    _, x0, _ = parts[0]
    hwc = x0.shape[1:]
    for f, x, _ in parts[1:]:
        if x.shape[1:] != hwc:
            raise DataError(f"{display_path(f)}: images are {x.shape[1:]} (H, W, C) but "
                            f"{display_path(files[0])} has {hwc}")
    with_y = [y is not None for _, _, y in parts]
    if any(with_y) and not all(with_y):
        raise DataError(f"some npz files of {name} have labels 'y' and some do not")
    h, w, c = hwc
    n = sum(len(x) for _, x, _ in parts)
    if len(parts) == 1 and c == 1:
        images = torch.from_numpy(np.ascontiguousarray(x0.reshape(len(x0), 1, h, w)))
    else:
        images = torch.empty((n, c, h, w), dtype=torch.uint8)
        start = 0
        for _, x, _ in parts:
            images[start:start + len(x)].copy_(torch.from_numpy(x).permute(0, 3, 1, 2))
            start += len(x)
    labels = np.concatenate([y for _, _, y in parts]) if all(with_y) else None
    class_names = _read_class_names(os.path.join(class_dir, "classes.txt"), labels)
    return ImageDataset(name=name, channels=c, size=(h, w), images=images, labels=labels,
                        class_names=class_names, kind=kind)


def _read_class_names(path: str, labels: np.ndarray | None) -> list[str] | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            names = [line.rstrip("\r\n") for line in fh]
    except OSError as exc:
        warnings.warn(f"cannot read {display_path(path)}: {exc}; class names not used", stacklevel=3)
        return None
    while names and not names[-1].strip():
        names.pop()
    if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        warnings.warn(f"{display_path(path)} names {len(names)} classes but labels range over "
                      f"{labels.min()}..{labels.max()}; class names not used", stacklevel=3)
        return None
    return names


def _resize_arrays(ds: ImageDataset, side: int, progress: bool) -> None:
    """Bring an in-memory array dataset to side x side (shorter side resize + centre crop)."""
    assert ds.images is not None
    src = ds.images
    out = np.empty((len(src), ds.channels, side, side), dtype=np.uint8)
    mode = "L" if ds.channels == 1 else "RGB"

    def work(i: int) -> None:
        a = src[i].numpy()
        im = Image.fromarray(a[0] if ds.channels == 1 else np.ascontiguousarray(a.transpose(1, 2, 0)), mode)
        out[i] = _to_chw(_resize_crop(im, (side, side)))

    for _ in _ordered_map(work, range(len(src)), _num_threads(), progress=progress, desc=f"resizing {ds.name}"):
        pass
    ds.images = torch.from_numpy(out)
    ds.size = (side, side)


# ---------------------------------------------------------------------- image folders
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
        skips.bad(exc.filename if exc.filename is not None else root, f"cannot list directory: {_reason(exc)}")

    from tqdm.auto import tqdm

    bar = tqdm(desc=f"scanning {display_path(os.path.basename(root) or root)}", unit=" files",
               disable=None if progress else True, delay=_PROGRESS_DELAY_S, leave=False)
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


def _load_folder(root: str, image_size: int, bad_files: str, max_memory_gb: float, progress: bool,
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
            return _probe(path, max_pixels)
        except Exception as exc:  # noqa: BLE001
            return _reason(exc)

    good: list[tuple[str, int]] = []
    infos: list[tuple[int, int, bool]] = []
    for (path, label), info in zip(kept, _ordered_map(probe, [p for p, _ in kept], _num_threads(),
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
            arr[i] = _decode(paths[i], size, channels, max_pixels)
            return None
        except Exception as exc:  # noqa: BLE001
            return _reason(exc)

    ok = np.ones(len(paths), dtype=bool)
    for i, r in enumerate(_ordered_map(work, range(len(paths)), _num_threads(), progress=progress,
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


# ---------------------------------------------------------------------- decoding
class _BadImage(Exception):
    """A file that opens but must not be used (e.g. too many pixels)."""


def _open(path: str, max_pixels: int) -> Image.Image:
    st = os.stat(path)
    if not stat_module.S_ISREG(st.st_mode):
        raise _BadImage("not a regular file")
    if st.st_size == 0:
        raise _BadImage("empty file (0 bytes)")
    im = Image.open(path, formats=_PIL_FORMATS)
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise _BadImage(f"too many pixels ({w}x{h} > {max_pixels}; decompression-bomb guard)")
    if w < 1 or h < 1:
        im.close()
        raise _BadImage(f"image has no pixels ({w}x{h})")
    return im


def _orientation(im: Image.Image) -> int:
    try:
        if im.format in ("JPEG", "MPO", "TIFF", "WEBP"):
            return int(im.getexif().get(0x0112, 1) or 1)
        raw = im.info.get("exif")  # PNG: only what the header already holds (no full load)
        if raw:
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
        pass
    return 1


def _probe(path: str, max_pixels: int) -> tuple[int, int, bool]:
    """(width, height) after EXIF orientation and whether the image is grey; raises when bad."""
    with _open(path, max_pixels) as im:
        w, h = im.size
        gray = im.mode in _GRAY_MODES
        if _orientation(im) in (5, 6, 7, 8):
            w, h = h, w
        im.verify()
    return w, h, gray


def _decode(path: str, size: tuple[int, int], channels: int, max_pixels: int | None) -> np.ndarray:
    """One file as uint8 (channels, H, W) (see the module docstring for the conversions)."""
    with _open(path, max_pixels or Image.MAX_IMAGE_PIXELS or 100_000_000) as im:
        if im.format in ("JPEG", "MPO"):
            side = max(size)
            im.draft(None, (side, side))  # decode at a reduced scale that is still >= side
        im.load()
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - keep the stored orientation if the EXIF is broken
            pass
        im = _to_8bit(im)
    if channels == 1 and im.mode != "L":
        im = im.convert("L")
    elif channels == 3 and im.mode != "RGB":
        im = im.convert("RGB")
    return _to_chw(_resize_crop(im, size))


def _to_8bit(im: Image.Image) -> Image.Image:
    """An 'L' (grey sources) or 'RGB' image: alpha on white, 16-bit scaled, palettes expanded."""
    mode = im.mode
    if mode == "1":
        return im.convert("L")
    if mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        im = Image.fromarray(a.astype(np.uint8), "L")
    elif mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        if a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif "transparency" in im.info and mode in ("P", "L", "RGB"):
        im = im.convert("RGBA" if mode != "L" else "LA")
    elif mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa", "LA", "La"):
        gray = im.mode in ("LA", "La")
        a = np.asarray(im.convert("LA" if gray else "RGBA")).astype(np.uint32)
        alpha = a[..., -1:]
        blended = (a[..., :-1] * alpha + 255 * (255 - alpha) + 127) // 255
        blended = blended.astype(np.uint8)
        return Image.fromarray(blended[..., 0] if gray else blended, "L" if gray else "RGB")
    if im.mode in ("L", "RGB"):
        return im
    return im.convert("RGB")


def _resize_crop(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so that the image covers (H, W) keeping its aspect ratio, then centre-crop."""
    H, W = size
    w, h = im.size
    if (w, h) == (W, H):
        return im
    scale = max(W / w, H / h)
    nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - W) // 2, (nh - H) // 2
    return im.crop((left, top, left + W, top + H))


def _to_chw(im: Image.Image) -> np.ndarray:
    a = np.asarray(im)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _reason(exc: BaseException) -> str:
    """A short, printable reason for a failed file."""
    import errno

    if isinstance(exc, _BadImage):
        return str(exc)
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels (decompression-bomb guard): {exc}"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not a recognised image (unknown format or corrupt header)"
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        if exc.errno == errno.ENOENT:
            return "missing file or broken symlink"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        return display_path(os.strerror(exc.errno))
    text = display_path(str(exc)) or type(exc).__name__
    if "truncated" in text.lower():
        return f"truncated image ({text})"
    return f"corrupt or unreadable image ({type(exc).__name__}: {text})"


def _num_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def _ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], threads: int, *, progress: bool = False,
                 desc: str = "") -> Iterator[Any]:
    """``map(fn, items)`` in order, on ``threads`` threads (PIL decodes without the GIL), with a
    bounded window of pending work and an optional progress bar. ``fn`` must not raise."""
    from tqdm.auto import tqdm

    n = len(items)
    bar = tqdm(total=n, desc=desc, unit="img", disable=None if progress else True,
               delay=_PROGRESS_DELAY_S, leave=False)
    try:
        if threads <= 1 or n < 8:
            for item in items:
                yield fn(item)
                bar.update()
            return
        with ThreadPoolExecutor(max_workers=threads) as pool:
            it = iter(items)
            window = deque(pool.submit(fn, x) for _, x in zip(range(threads * 4), it))
            try:
                while window:
                    result = window.popleft().result()
                    nxt = next(it, _END)
                    if nxt is not _END:
                        window.append(pool.submit(fn, nxt))
                    yield result
                    bar.update()
            finally:
                for fut in window:
                    fut.cancel()
    finally:
        bar.close()


_END = object()


# ====================================================================== batches
def padding_mask(indices: torch.Tensor) -> torch.Tensor:
    """True where a loader index marks a padded (duplicate) entry (see :func:`batch_loader`)."""
    return indices < 0


def real_indices(indices: torch.Tensor) -> torch.Tensor:
    """The image index of every loader entry, padded ones included (``-1 - i`` -> ``i``)."""
    return torch.where(indices < 0, -1 - indices, indices)


class _BatchSet(torch.utils.data.Dataset):
    """One item = one whole batch, decoded in a DataLoader worker (streamed datasets)."""

    def __init__(self, dataset: ImageDataset, batches: list[torch.Tensor], threads: int) -> None:
        self.dataset = dataset
        self.batches = batches
        self.threads = threads

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
        idx = self.batches[i]
        images, failures = self.dataset._decode_batch(real_indices(idx).numpy(), self.threads)
        return images, idx, failures


class BatchLoader:
    """Batches of one epoch for one rank; ``len()`` is the number of batches of the whole
    epoch, also when ``start_batch`` skips the first ones (a resumed epoch). See
    :func:`batch_loader`."""

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                 epoch: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 pin_memory: bool = False, start_batch: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.start_batch = max(int(start_batch), 0)
        n = len(dataset)
        if drop_last:
            self.per_rank = n // world_size
            self._num_batches = self.per_rank // batch_size
        else:
            self.per_rank = -(-n // world_size)
            self._num_batches = -(-self.per_rank // batch_size)

    def __len__(self) -> int:
        return self._num_batches

    def indices(self) -> torch.Tensor:
        """This rank's entries for the epoch, in order (padded ones as ``-1 - i``)."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        total = self.per_rank * self.world_size
        if total <= n:
            full = perm[:total]
        else:
            reps = -(-(total - n) // n)
            pad = perm.repeat(reps)[: total - n]
            full = torch.cat([perm, -1 - pad])
        mine = full[self.rank::self.world_size]
        if self.drop_last:
            mine = mine[: self._num_batches * self.batch_size]
        return mine

    def _batches(self) -> list[torch.Tensor]:
        # a resumed epoch starts after the batches it already trained on (not decoded again)
        return list(torch.split(self.indices(), self.batch_size))[self.start_batch:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = self.dataset
        batches = self._batches()
        if ds.images is not None:
            images = ds.images
            for idx in batches:
                out = images.index_select(0, real_indices(idx))
                yield (out.pin_memory() if self.pin_memory else out), idx
            return
        threads = 1 if self.num_workers > 0 else _num_threads()
        loader = torch.utils.data.DataLoader(
            _BatchSet(ds, batches, threads), batch_size=None, shuffle=False, num_workers=self.num_workers,
            pin_memory=self.pin_memory, prefetch_factor=4 if self.num_workers > 0 else None)
        for images, idx, failures in loader:
            if failures:
                ds._record_failures((str(p), str(r)) for p, r in failures)
            yield images, idx


def batch_loader(dataset: ImageDataset, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 pin_memory: bool = False, start_batch: int = 0) -> BatchLoader:
    """Batches ``(uint8 images (b, C, H, W), int64 indices)`` of one epoch for one rank.

    Deterministic in ``(seed, epoch)``; ranks take disjoint strided slices of one permutation;
    without ``drop_last`` padded entries carry index ``-1 - i`` (see the module docstring).
    In-memory datasets are indexed with one tensor operation per batch; streamed ones are
    decoded by a ``DataLoader`` with ``num_workers`` worker processes (threads when 0).
    """
    return BatchLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, epoch=epoch,
                       rank=rank, world_size=world_size, num_workers=num_workers, pin_memory=pin_memory,
                       start_batch=start_batch)
