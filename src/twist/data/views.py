"""One photo -> its training views, cut at decode time from the ORIGINAL image.

:func:`decode_views` opens a file (or a tar member's bytes), draws every view's box from the
image's size after EXIF orientation (:func:`twist.data.crops.plan_boxes`), decodes the JPEG once
at the largest DCT scale that keeps every box at least as large as its view
(:func:`twist.data.crops.draft_factor`), and resizes each box to its view with PIL (bicubic or
bilinear, antialiased when shrinking, as torchvision's PIL ``resized_crop``; the box is given to
``Image.resize`` in the decoded image's coordinates, so a reduced decode keeps sub-pixel box
positions). Why here and not on the batch: crops from the original size are what the paper's
pipeline takes (a crop may reach every edge of the photo), and cutting a view from a decoded
photo is cheaper than resizing the whole photo first. Flips and colour operations are left to
:meth:`twist.augment.MultiCropAugment.photometric`, batched on the training device.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from twist.data.crops import ViewPlan, draft_factor, plan_boxes
from twist.data.decode import load_oriented, open_image, oriented_size, to_chw

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def decode_views(source: str | bytes, plan: ViewPlan, generator: torch.Generator, channels: int,
                 max_pixels: int) -> list[np.ndarray]:
    """The views of one image as uint8 (channels, S, S) arrays, in ``plan`` order; raises on a
    bad file (the caller replaces it, see :meth:`twist.data.ImageDataset.decode_views`)."""
    with open_image(source, max_pixels) as im:
        width, height = oriented_size(im)
        boxes = plan_boxes(plan, height, width, generator)
        factor = draft_factor(boxes, plan.sizes)
        stored_w, stored_h = im.size
        draft = (max(1, stored_w // factor), max(1, stored_h // factor)) if factor > 1 else None
        im = load_oriented(im, channels, draft)
    fx, fy = im.size[0] / width, im.size[1] / height
    resample = _RESAMPLE[plan.interpolation]
    return [to_chw(im.resize((size, size), resample, box=(left * fx, top * fy, (left + w) * fx, (top + h) * fy)))
            for (top, left, h, w), size in zip(boxes, plan.sizes)]
