"""Crop boxes for photos, drawn at decode time from each image's ORIGINAL size.

A :class:`ViewPlan` says what views one image gives (2 global + N local: side, area range,
aspect-ratio range, resampling). :func:`crop_box` draws one box with the semantics of
torchvision's ``RandomResizedCrop.get_params``: up to 10 attempts, each drawing an area fraction
uniform in ``scale`` and a log-uniform aspect ratio (in that order, one float32 uniform each),
keeping the first box that fits and placing it with two ``randint`` draws (top, then left);
when no attempt fits, a centre crop with the aspect ratio clamped into ``ratio``. It consumes a
``torch.Generator`` exactly as torchvision consumes the global generator, so the same seed gives
the same box (tested against torchvision itself).

Why per image and not per worker: :func:`image_generator` seeds each image's generator from
``(seed, epoch, image index)``, so an image's boxes do not depend on which worker (or thread)
decodes it, nor on the worker count, nor on where a resumed epoch restarts.

:func:`draft_factor` picks the reduced-size JPEG decoding (libjpeg's DCT scaling, PIL's
``Image.draft``) for one image: the largest factor in 1, 2, 4, 8 that keeps every box at least
as large as its view along both axes, so each view is still only ever shrunk.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

_ATTEMPTS = 10
_DRAFT_FACTORS = (8, 4, 2, 1)


@dataclass(frozen=True)
class ViewPlan:
    """The views every image gives, in order ``[global_1, global_2, local_1, ...]``."""

    sizes: tuple[int, ...]
    """Output side of each view, in pixels."""
    scales: tuple[tuple[float, float], ...]
    """Area range (fractions of the image) of each view's crop."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect-ratio (width / height) range of every crop."""
    interpolation: str = "bicubic"
    """Resampling of a crop to its view: bicubic or bilinear (antialiased when shrinking)."""
    seed: int = 0

    @classmethod
    def multicrop(cls, global_size: int, local_size: int, num_local: int, global_scale: tuple[float, float],
                  local_scale: tuple[float, float], ratio: tuple[float, float], interpolation: str,
                  seed: int) -> "ViewPlan":
        """2 global views of ``global_size`` then ``num_local`` local ones of ``local_size``."""
        sizes = (global_size,) * 2 + (local_size,) * num_local
        scales = (tuple(global_scale),) * 2 + (tuple(local_scale),) * num_local
        return cls(sizes=sizes, scales=scales, ratio=tuple(ratio), interpolation=interpolation, seed=seed)

    @classmethod
    def from_augment(cls, cfg, seed: int) -> "ViewPlan":
        """The views of an ``AugmentConfig`` (read by attribute: sizes, scales, ratio, interpolation)."""
        return cls.multicrop(cfg.global_size, cfg.local_size, cfg.num_local, cfg.global_scale, cfg.local_scale,
                             cfg.ratio, cfg.interpolation, seed)

    @property
    def num_views(self) -> int:
        return len(self.sizes)


def image_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one image's crop boxes in one epoch (independent of workers)."""
    key = ((int(seed) * 1_000_003 + int(epoch)) * 2_654_435_761 + int(index) * 40_503 + 1) % (2**63)
    return torch.Generator().manual_seed(key)


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of one random resized crop of a ``height`` x ``width`` image."""
    area = height * width
    log_lo, log_hi = _log_ratio(tuple(ratio))
    for _ in range(_ATTEMPTS):
        frac = torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator)).item()
        w = int(round(math.sqrt(area * frac * aspect)))
        h = int(round(math.sqrt(area * frac / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    return fallback_box(height, width, ratio)


def fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of RandomResizedCrop's box when no attempt fits: the centre crop
    with the image's aspect ratio clamped into ``ratio`` (the batched crops of
    :mod:`twist.augment` use it too)."""
    shape = width / height
    if shape < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif shape > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@functools.lru_cache(maxsize=64)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    """torchvision's float32 ``log`` of the ratio range (a third of a box's cost when redone per box)."""
    lo, hi = (float(v) for v in torch.log(torch.tensor(ratio)))
    return lo, hi


def plan_boxes(plan: ViewPlan, height: int, width: int, generator: torch.Generator) -> list[tuple[int, int, int, int]]:
    """One box per view of ``plan`` for an image of ``height`` x ``width``, in view order."""
    return [crop_box(height, width, scale, plan.ratio, generator) for scale in plan.scales]


def scaled_box(box: tuple[int, int, int, int], fy: float, fx: float) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of ``box`` in an image shrunk by ``fy`` / ``fx`` (a reduced JPEG
    decode, or its area-averaged equivalent on the device), each edge rounded to a whole shrunk
    pixel (at most half a shrunk pixel off), at least one pixel wide."""
    top, left, h, w = box
    if fy == 1.0 and fx == 1.0:
        return box
    t, b = round(top * fy), round((top + h) * fy)
    l, r = round(left * fx), round((left + w) * fx)
    return t, l, max(1, b - t), max(1, r - l)


def draft_factor(boxes: list[tuple[int, int, int, int]], sizes: tuple[int, ...]) -> int:
    """The largest of 8, 4, 2, 1 that keeps every box >= its view's side along both axes."""
    room = min(min(h, w) / size for (_, _, h, w), size in zip(boxes, sizes))
    return next(f for f in _DRAFT_FACTORS if f <= room or f == 1)
