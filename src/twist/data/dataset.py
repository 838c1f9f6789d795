"""The dataset type every source returns (:class:`ImageDataset`) and the error type of the data
package (:class:`DataError`). Streamed datasets decode their files here, batch by batch."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from twist.data.crops import ViewPlan, image_generator
from twist.data.decode import decode_image, display_path, failure_reason
from twist.data.device_decode import PlannedBatch, decode_planned, plan_image
from twist.data.threads import num_threads, ordered_map
from twist.data.views import decode_views as cut_views
from twist.io import write_text_atomic

logger = logging.getLogger(__name__)

_REPLACEMENT_TRIES = 64


class DataError(ValueError):
    """The data cannot be used as asked: missing path, empty dataset, bad file under 'stop'..."""


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
    paths: Sequence[str] | None = None
    """File of each image (folders; member names for tar shards), in the same order as the
    images: a :class:`twist.data.paths.PathTable` (no Python object per path, so DataLoader
    workers do not copy it page by page as they read it)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of every file or directory left out (see the module docstring)."""
    kind: str = "array"
    """'digits', 'npz', 'npz-splits', 'folder' or 'shards' (tar)."""
    replaced: int = 0
    """Streamed only: how many batch slots got a substitute image because a file failed."""
    max_pixels: int | None = None
    """Pixel limit used when decoding streamed files."""
    resize_side: int = 0
    """Streamed photos: the shorter side is resized to this before the centre ``size`` crop
    (``round(size / 0.875)``, the release's Resize 256 + CenterCrop 224); 0 = to ``size``."""
    members: Any = None
    """Tar-shard datasets: the member index whose ``read(i)`` returns image ``i``'s bytes."""
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
        images, failures = self.decode_batch(idx.numpy(), threads=None)
        self.record_failures(failures)
        return images

    def source(self, i: int) -> str | bytes:
        """What the decoder opens for image ``i``: its path, or its bytes for a tar shard member."""
        assert self.paths is not None
        return self.paths[i] if self.members is None else self.members.read(i)

    def sample_images(self, count: int, seed: int = 0) -> torch.Tensor:
        """A seeded sample of up to ``count`` images as uint8 (b, C, H, W) (streamed: decoded now,
        e.g. to estimate the data's mean and std without reading every file)."""
        g = torch.Generator().manual_seed(int(seed))
        pick = torch.randperm(len(self), generator=g)[:count].sort().values
        return self.get_batch(pick)

    def decode_batch(self, idx: np.ndarray, threads: int | None) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        """Decode files ``idx`` (streamed mode) at ``size`` (shorter side to ``resize_side``
        first when set); failed slots get a substitute image."""
        out = np.empty((len(idx), self.channels, *self.size), dtype=np.uint8)

        def one(j: int, i: int) -> None:
            out[j] = decode_image(self.source(i), self.size, self.channels, self.max_pixels, self.resize_side)

        def copy(dst: int, src: int) -> None:
            out[dst] = out[src]

        failures = self._decode_slots(idx, one, copy, threads)
        return torch.from_numpy(out), failures

    def decode_view_batch(self, idx: np.ndarray, plan: ViewPlan, epoch: int,
                          threads: int | None) -> tuple[list[torch.Tensor], list[tuple[str, str]]]:
        """Views of ``plan`` cut from files ``idx`` (streamed mode): one uint8 (b, C, S, S) tensor
        per view. Image ``i``'s boxes come from a generator seeded by (plan.seed, epoch, i), so
        they do not depend on workers. A failed slot gets the views of a substitute image."""
        outs = [np.empty((len(idx), self.channels, s, s), dtype=np.uint8) for s in plan.sizes]
        limit = self.max_pixels or Image.MAX_IMAGE_PIXELS or 100_000_000

        def one(j: int, i: int) -> None:
            views = cut_views(self.source(i), plan, image_generator(plan.seed, epoch, i), self.channels, limit)
            for out, view in zip(outs, views):
                out[j] = view

        def copy(dst: int, src: int) -> None:
            for out in outs:
                out[dst] = out[src]

        failures = self._decode_slots(idx, one, copy, threads)
        return [torch.from_numpy(o) for o in outs], failures

    def plan_view_batch(self, idx: np.ndarray, plan: ViewPlan, epoch: int,
                        threads: int | None) -> tuple[PlannedBatch, list[tuple[str, str]]]:
        """The worker half of ``train.decode=gpu`` for files ``idx`` (streamed mode): JPEG bytes
        and the same crop boxes as :meth:`decode_view_batch`, other files' views cut here (see
        :mod:`twist.data.device_decode`). A file whose header fails gets a substitute slot."""
        slots: list = [None] * len(idx)
        limit = self.max_pixels or Image.MAX_IMAGE_PIXELS or 100_000_000

        def one(j: int, i: int) -> None:
            slots[j] = plan_image(self.source(i), i, plan, epoch, self.channels, limit)

        def copy(dst: int, src: int) -> None:
            slots[dst] = slots[src]

        failures = self._decode_slots(idx, one, copy, threads)
        return PlannedBatch.pack(slots, epoch, plan, self.channels), failures

    def finish_view_batch(self, batch: PlannedBatch, plan: ViewPlan,
                          device: torch.device) -> tuple[list[torch.Tensor], list[tuple[str, str]]]:
        """The device half of ``train.decode=gpu``: the uint8 (b, C, S, S) views of a planned
        batch on ``device``. A file no decoder reads is replaced as in :meth:`decode_view_batch`
        (a batch none of whose files decodes goes through that CPU path whole)."""
        limit = self.max_pixels or Image.MAX_IMAGE_PIXELS or 100_000_000
        outs, failed = decode_planned(batch, plan, self.channels, limit, device)
        if not failed:
            return outs, []
        assert self.paths is not None
        if len(failed) == len(batch):
            views, failures = self.decode_view_batch(np.asarray(batch.indices), plan, batch.epoch, None)
            return [v.to(device) for v in views], failures
        ok = np.ones(len(batch), dtype=bool)
        ok[[j for j, _ in failed]] = False

        def copy(dst: int, src: int) -> None:
            for out in outs:
                out[dst] = out[src]

        _fill_from_good(ok, copy)
        return outs, [(self.paths[batch.indices[j]], reason) for j, reason in failed]

    def _decode_slots(self, idx: np.ndarray, one: Callable[[int, int], None], copy: Callable[[int, int], None],
                      threads: int | None) -> list[tuple[str, str]]:
        """Run ``one(slot, image)`` for every slot (in threads); a failed slot is filled by
        ``copy`` from the previous good slot (the next one when it is first); when none
        decodes, up to 64 other images are tried for slot 0. Returns (path, reason) failures."""
        assert self.paths is not None
        paths = self.paths

        def work(j: int) -> str | None:
            try:
                one(j, int(idx[j]))
                return None
            except Exception as exc:  # noqa: BLE001 - any decode failure is a bad file
                return failure_reason(exc)

        Image.init()
        if threads is None:
            threads = 1 if torch.utils.data.get_worker_info() is not None else num_threads()
        results = list(ordered_map(work, range(len(idx)), threads))
        failures = [(paths[idx[j]], r) for j, r in enumerate(results) if r is not None]
        if not failures:
            return failures
        ok = np.array([r is None for r in results])
        if not ok.any():
            for k in range(1, _REPLACEMENT_TRIES + 1):
                try:
                    one(0, (int(idx[0]) + k) % len(paths))
                except Exception:  # noqa: BLE001
                    continue
                ok[0] = True
                break
            else:
                path, reason = failures[0]
                raise DataError(f"no image of a batch could be decoded (e.g. {display_path(path)}: {reason}); "
                                f"the data may have become unreadable")
        _fill_from_good(ok, copy)
        return failures

    def record_failures(self, failures: Iterable[tuple[str, str]]) -> None:
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
        write_text_atomic(out, text)
        return out


def _fill_from_good(ok: np.ndarray, copy: Callable[[int, int], None]) -> None:
    """Fill every failed slot (``ok`` False) by ``copy(slot, source)`` from the previous good
    slot, or the first good one when none comes before it."""
    good = np.flatnonzero(ok)
    for j in np.flatnonzero(~ok):
        before = good[good < j]
        copy(int(j), int(before[-1] if len(before) else good[0]))
