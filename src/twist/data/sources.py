"""Which source a dataset spec names ('digits', a .npz file, a folder of .npz splits, an image
folder) and the loaders of the array sources. :func:`load_dataset` is the one entry point."""

from __future__ import annotations

import logging
import os
import re
import warnings
import zipfile
from typing import Any

import numpy as np
import torch
from PIL import Image

from twist.data.dataset import DataError, ImageDataset
from twist.data.decode import display_path, failure_reason, resize_crop, to_chw
from twist.data.folder import load_folder
from twist.data.listing import Listing
from twist.data.shards import load_shards, shard_files
from twist.data.threads import num_threads, ordered_map

logger = logging.getLogger(__name__)


def load_dataset(
    spec: str | list[str],
    split: str = "train",
    image_size: int = 0,
    bad_files: str = "skip",
    max_memory_gb: float = 4.0,
    progress: bool = True,
    *,
    max_pixels: int | None = None,
    scan: str = "list",
    index_path: str | os.PathLike | None = None,
    crop_size: int = 0,
    listing: Listing | None = None,
) -> ImageDataset:
    """Load ``spec`` ('digits', a .npz file, a folder of .npz splits or an image folder).

    See the module docstring for the sources, conversions and policies. ``max_pixels`` is the
    decompression-bomb limit for folder images (None = PIL's ``Image.MAX_IMAGE_PIXELS``).
    Streamed folders only: ``scan`` 'list' (names only; bad files found when decoded) or 'full'
    (every header checked first); ``index_path`` keeps the list there for the next load;
    ``crop_size`` > 0 makes their batches the evaluation crops of photos (shorter side resized
    to round(crop_size / 0.875), centre crop_size square). ``listing``: an image folder's listing
    made already (``twist.autopreset.summarize_data``), so the folder is not walked twice.
    """
    if scan not in ("list", "full"):
        raise DataError(f"scan must be 'list' or 'full', got {scan!r}")
    if bad_files not in ("skip", "stop"):
        raise DataError(f"bad_files must be 'skip' or 'stop', got {bad_files!r}")
    if image_size < 0:
        raise DataError(f"image_size must be >= 0, got {image_size}")
    if not max_memory_gb > 0:
        raise DataError(f"max_memory_gb must be positive, got {max_memory_gb}")
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS or 100_000_000
    Image.init()  # register PIL's plugins once, before any decoding thread starts
    shards = shard_files(spec)
    if shards is not None:
        ds = load_shards(shards, image_size, max_pixels, crop_size)
        logger.info("%s", ds.describe())
        return ds
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
                ds = load_folder(path, image_size, bad_files, max_memory_gb, progress, max_pixels, scan=scan,
                                 index_path=os.fspath(index_path) if index_path else None, crop_size=crop_size,
                                 listing=listing)
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
        raise DataError(f"cannot list directory {display_path(path)}: {failure_reason(exc)}") from None


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
        out[i] = to_chw(resize_crop(im, (side, side)))

    for _ in ordered_map(work, range(len(src)), num_threads(), progress=progress, desc=f"resizing {ds.name}"):
        pass
    ds.images = torch.from_numpy(out)
    ds.size = (side, side)
