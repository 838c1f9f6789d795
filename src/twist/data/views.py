"""One photo -> its training views, cut at decode time from the ORIGINAL image.

:func:`decode_views` opens a file (or a tar member's bytes), draws every view's box from the
image's size after EXIF orientation (:func:`twist.data.crops.plan_boxes`), decodes the JPEG once
at the largest DCT scale that keeps every box at least as large as its view
(:func:`twist.data.crops.draft_factor`), and resizes each box to its view (bicubic or bilinear,
antialiased when shrinking). Why here and not on the batch: crops from the original size are
what the paper's pipeline takes (a crop may reach every edge of the photo), and cutting a view
from a decoded photo is cheaper than resizing the whole photo first. Flips and colour
operations are left to :meth:`twist.augment.MultiCropAugment.photometric`, batched on the
training device.

The resize is torch's uint8 antialiased ``interpolate`` on the decoded pixels, not PIL's
``Image.resize``: it is the same separable filter as PIL's (Keys cubic, a = -0.5, support
widened by the downscale factor), so views agree with torchvision's PIL ``resized_crop`` to
within rounding (mean absolute difference well under one grey level; where an upsampled
box overshoots, PIL clamps its intermediate pass to 8 bits and a few pixels differ by more),
and it runs 2-5x faster on one CPU core (measured in benchmarks/photo_loader.py; the resize was
over half of the loader's CPU time). When the JPEG was decoded at a reduced scale, a box is
rounded to whole decoded pixels (an error of at most half a decoded pixel at each edge).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from twist.data.crops import ViewPlan, draft_factor, plan_boxes, scaled_box
from twist.data.decode import load_oriented, open_image, oriented_size


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
        pixels = torch.from_numpy(np.array(im))  # (H, W) or (H, W, C); a writable copy
    pixels = pixels[None, None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)[None]  # (1, C, H, W), no copy
    fy, fx = pixels.shape[2] / height, pixels.shape[3] / width
    views = []
    for box, size in zip(boxes, plan.sizes):
        top, left, h, w = scaled_box(box, fy, fx)  # a reduced decode: the box in decoded pixels
        box = pixels[:, :, top:top + h, left:left + w]
        view = F.interpolate(box, size=(size, size), mode=plan.interpolation, antialias=True)
        views.append(view[0].numpy())
    return views
