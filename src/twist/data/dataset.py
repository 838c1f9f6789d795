"""The dataset type every source returns (:class:`ImageDataset`) and the error type of the data
package (:class:`DataError`). Streamed datasets decode their files here, batch by batch."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from twist.data.decode import decode_image, display_path, failure_reason
from twist.data.threads import num_threads, ordered_map
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
        images, failures = self.decode_batch(idx.numpy(), threads=None)
        self.record_failures(failures)
        return images

    def decode_batch(self, idx: np.ndarray, threads: int | None) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        """Decode files ``idx`` (streamed mode); failed slots get a substitute image."""
        assert self.paths is not None
        h, w = self.size
        out = np.empty((len(idx), self.channels, h, w), dtype=np.uint8)
        paths = self.paths

        def work(j: int) -> str | None:
            try:
                out[j] = decode_image(paths[idx[j]], self.size, self.channels, self.max_pixels)
                return None
            except Exception as exc:  # noqa: BLE001 - any decode failure is a bad file
                return failure_reason(exc)

        Image.init()
        if threads is None:
            threads = 1 if torch.utils.data.get_worker_info() is not None else num_threads()
        results = list(ordered_map(work, range(len(idx)), threads))
        failures = [(paths[idx[j]], r) for j, r in enumerate(results) if r is not None]
        if failures:
            ok = np.array([r is None for r in results])
            if not ok.any():
                for k in range(1, _REPLACEMENT_TRIES + 1):
                    try:
                        out[0] = decode_image(paths[(int(idx[0]) + k) % len(paths)], self.size, self.channels, self.max_pixels)
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
