"""WebDataset-style tar shards: ``.tar`` files whose members are ``KEY.jpg`` (or another image
extension) with an optional ``KEY.cls`` holding the integer label, the layout large runs use
to avoid millions of small files.

Why an index and not a stream: TWIST's batches are a permutation of the whole data per epoch
and each image's crop boxes come from a (seed, epoch, index) generator, so the reader must
fetch any image at any time. :func:`index_shards` reads every shard's member headers once
with python's ``tarfile`` (it seeks over the data) and keeps (shard, data offset, size) per
image; :meth:`TarMembers.read` then seeks to an image's bytes and reads just them, in whatever
process asks (DataLoader workers included). WebDataset's own reader streams shards in order,
which does not fit this access pattern, so no extra library is used.

Keys are the member path up to the first dot of its file name (``a/b.c.jpg`` -> ``a/b``), as
WebDataset does; the first image member of a key is its image; members that are neither an
image nor ``.cls`` are ignored. Images come in shard order, then member order. Labels exist
when every image has a ``.cls``; otherwise none do (a warning names how many lacked one).
"""

from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass

import numpy as np

from twist.data.dataset import DataError, ImageDataset
from twist.data.decode import display_path, probe_image
from twist.data.folder import EVAL_CROP_FRACTION, IMAGE_EXTENSIONS, SAMPLE_HEADERS
from twist.data.paths import PathTable

logger = logging.getLogger(__name__)


@dataclass
class TarMembers:
    """Where each image's bytes lie: ``shards[shard[i]]`` at ``offset[i]``, ``size[i]`` bytes."""

    shards: list[str]
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray

    def take(self, indices: np.ndarray) -> TarMembers:
        """The members of images ``indices``, in that order (a subset of the dataset)."""
        return TarMembers(self.shards, self.shard[indices], self.offset[indices], self.size[indices])

    def read(self, i: int) -> bytes:
        with open(self.shards[int(self.shard[i])], "rb") as f:
            f.seek(int(self.offset[i]))
            data = f.read(int(self.size[i]))
        if len(data) != int(self.size[i]):
            raise OSError(f"truncated shard: {len(data)} of {int(self.size[i])} bytes")
        return data


def shard_files(spec: str | list[str] | tuple[str, ...]) -> list[str] | None:
    """The shards a spec names, or None when it does not name shards: a list of ``.tar`` paths
    (or one string of them separated by commas), one ``.tar`` file, or a folder holding
    ``.tar`` files (sorted by name)."""
    parts = list(spec) if isinstance(spec, (list, tuple)) else str(spec).split(",")
    parts = [os.path.expanduser(str(p).strip()) for p in parts if str(p).strip()]
    if parts and all(p.lower().endswith(".tar") for p in parts):
        return parts
    if len(parts) == 1 and os.path.isdir(parts[0]):
        names = sorted(n for n in os.listdir(parts[0]) if n.lower().endswith(".tar") and not n.startswith("."))
        if names:
            return [os.path.join(parts[0], n) for n in names]
    return None


def index_shards(shards: list[str], extensions: frozenset[str]) -> tuple[TarMembers, list[str], np.ndarray | None]:
    """(member index, display name of each image as ``SHARD/MEMBER``, labels or None)."""
    shard_ids, offsets, sizes, names, labels = [], [], [], [], []
    for sid, path in enumerate(shards):
        images: dict[str, tarfile.TarInfo] = {}
        classes: dict[str, int] = {}
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                head, base = os.path.split(member.name)
                if base.startswith(".") or "." not in base:
                    continue
                key = os.path.join(head, base.split(".", 1)[0])
                ext = "." + base.rsplit(".", 1)[1].lower()
                if ext == ".cls":
                    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                    try:
                        classes[key] = int(text)
                    except ValueError:
                        raise ValueError(f"{path}: {member.name} does not hold an integer label: {text[:40]!r}") from None
                elif ext in extensions and key not in images:
                    images[key] = member
        for key, member in images.items():
            shard_ids.append(sid)
            offsets.append(member.offset_data)
            sizes.append(member.size)
            names.append(f"{path}/{member.name}")
            labels.append(classes.get(key))
    members = TarMembers(list(shards), np.asarray(shard_ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64),
                         np.asarray(sizes, dtype=np.int64))
    missing = sum(lab is None for lab in labels)
    if missing and missing < len(labels):
        logger.warning("%d of %d shard images have no .cls label; the data is used without labels",
                       missing, len(labels))
    return members, names, (np.asarray(labels, dtype=np.int64) if labels and not missing else None)


def load_shards(shards: list[str], image_size: int, max_pixels: int, crop_size: int) -> ImageDataset:
    """Tar shards as a streamed dataset (always streamed: shards are for data too large to hold),
    decoded and cropped by the same code as folders. Channels (and, without ``image_size`` or
    ``crop_size``, the size) come from a seeded sample of member headers; bad members are found,
    replaced and listed when decoded."""
    for path in shards:
        if not os.path.isfile(path):
            raise DataError(f"tar shard does not exist: {display_path(path)}")
    try:
        members, names, labels = index_shards(shards, IMAGE_EXTENSIONS)
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise DataError(f"cannot index tar shards: {exc}") from None
    if not names:
        raise DataError(f"no images in the tar shards {display_path(shards[0])}"
                        f"{f' and {len(shards) - 1} more' if len(shards) > 1 else ''}")
    pick = np.random.default_rng(0).choice(len(names), size=min(SAMPLE_HEADERS, len(names)), replace=False)
    infos = []
    for i in sorted(pick):
        try:
            infos.append(probe_image(members.read(int(i)), max_pixels))
        except Exception:  # noqa: BLE001 - a bad member is replaced when decoded
            continue
    channels = 1 if infos and all(g for _, _, g in infos) else 3
    side = crop_size or image_size or int(np.median([min(w, h) for w, h, _ in infos] or [1]))
    name = os.path.basename(os.path.dirname(os.path.abspath(shards[0]))) if len(shards) > 1 else \
        os.path.basename(shards[0])
    ds = ImageDataset(name=name, channels=channels, size=(side, side), labels=labels, paths=PathTable.of(names), kind="shards",
                      max_pixels=max_pixels, members=members)
    if crop_size > 0:
        ds.resize_side = int(round(crop_size / EVAL_CROP_FRACTION))
    logger.info("%s: %d images in %d tar shard(s), decoded per batch", name, len(ds), len(shards))
    return ds
