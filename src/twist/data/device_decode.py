"""Training views decoded on the training device (``train.decode=gpu``).

Split in two halves so that the heavy part runs where it is cheapest:

- in a loader worker, :func:`plan_image` opens each file's header with PIL (the same format
  allow-list and pixel limit as every other decode, :func:`twist.data.decode.open_image`),
  reads its EXIF orientation and draws every view's crop box from the ORIGINAL oriented size
  with the image's own generator (:func:`twist.data.crops.image_generator`), exactly as the CPU
  path (:func:`twist.data.views.decode_views`) does, so the same seed gives the same boxes. It
  returns the file's bytes and the boxes; :class:`PlannedBatch` packs a batch of them into one
  byte tensor (shared memory between worker and trainer, not a pickled list of byte strings).
  Files that are not baseline 8-bit RGB or grey JPEGs (PNG, CMYK JPEG, ...) are decoded and cut
  in the worker as on the CPU path: their views travel ready.
- on the training device, :func:`decode_planned` decodes the batch's JPEGs in one call of
  ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on a GPU; libjpeg-turbo on the CPU,
  which decodes exactly as PIL does), applies the EXIF orientation on the tensor, and cuts each
  box and resizes it to its view with ``F.interpolate(antialias=True)`` in float32 (CUDA has no
  uint8 antialiased kernel), rounded back to uint8: the views then equal the CPU path's to
  within one grey level of rounding (tested). Like the CPU path's reduced JPEG decode, an image
  whose boxes are all at least 2x their views is first shrunk by the same factor
  (:func:`twist.data.crops.draft_factor`; here by area averaging, the CPU path by libjpeg's DCT
  scaling) and each box rounded to whole shrunk pixels: this bounds the antialiasing filter's
  width (CUDA's kernel is not separable and refuses very wide filters) and its cost.

Any image the device decoder rejects (a truncated file, a JPEG feature nvJPEG lacks, a size
that disagrees with the header) is decoded again by the CPU path from the same bytes and the
same generator, so it gets the same boxes; a file that fails there too is a bad file, replaced
in its batch by :meth:`twist.data.ImageDataset.finish_view_batch` as on the CPU path.

Why it exists: on a GPU machine the CPU cores can be the bottleneck of a ResNet-50 step fed by
photos; moving the JPEG decode and the resize to the GPU leaves the workers only the header and
the file read. On a CPU device it runs the same code (``device='cpu'``): what the tests run, no
speed gain. Not yet run on a GPU in this project (benchmarks/gpu_check.py times it when one is
lent).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from twist.data.crops import ViewPlan, draft_factor, image_generator, plan_boxes, scaled_box
from twist.data.decode import exif_orientation, failure_reason, open_image, oriented_size
from twist.data.views import decode_views

JPEG_FORMATS = ("JPEG", "MPO")
"""PIL formats sent to the device decoder (MPO: a camera JPEG with extra frames; the first is read)."""
_DEVICE_MODES = ("RGB", "L")
"""JPEG colour modes sent to the device decoder; CMYK/YCCK JPEGs are converted by PIL, whose
conversion the device decoder does not reproduce."""

Box = tuple[int, int, int, int]


@dataclass
class PlannedImage:
    """One batch slot as a loader worker leaves it: a JPEG's bytes and boxes, or ready views."""

    index: int
    """The dataset index of the image in the slot (a replaced slot holds its substitute's)."""
    data: bytes = b""
    size: tuple[int, int] = (0, 0)
    """(height, width) after EXIF orientation, from the header: what the boxes were drawn in."""
    boxes: tuple[Box, ...] = ()
    orientation: int = 1
    views: list[np.ndarray] | None = None
    """uint8 (C, S, S) per view when the worker decoded the image itself (not a device JPEG)."""


def plan_image(source: str | bytes, index: int, plan: ViewPlan, epoch: int, channels: int,
               max_pixels: int) -> PlannedImage:
    """Worker half of one image (see the module docstring); raises on a bad header."""
    generator = image_generator(plan.seed, epoch, index)
    with open_image(source, max_pixels) as im:
        on_device = im.format in JPEG_FORMATS and im.mode in _DEVICE_MODES
        if on_device:
            width, height = oriented_size(im)
            orientation = exif_orientation(im)
            boxes = tuple(plan_boxes(plan, height, width, generator))
    if not on_device:
        return PlannedImage(index, views=decode_views(source, plan, generator, channels, max_pixels))
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        with open(source, "rb") as f:
            data = f.read()
    return PlannedImage(index, data=data, size=(height, width), boxes=boxes, orientation=orientation)


@dataclass
class PlannedBatch:
    """A batch of :class:`PlannedImage` slots packed for the trip from worker to trainer."""

    epoch: int
    indices: list[int]
    data: torch.Tensor
    """uint8 (total,): the device slots' JPEG bytes, one after the other."""
    spans: list[tuple[int, int]]
    """(start, end) of each slot's bytes in ``data``; (0, 0) for a slot whose views are ready."""
    sizes: list[tuple[int, int]]
    boxes: list[tuple[Box, ...]]
    orientations: list[int]
    ready_slots: list[int]
    ready_views: list[torch.Tensor]
    """uint8 (len(ready_slots), C, S, S) per view: the views of the slots decoded in the worker."""

    @classmethod
    def pack(cls, slots: list[PlannedImage], epoch: int, plan: ViewPlan, channels: int) -> "PlannedBatch":
        spans, start = [], 0
        for s in slots:
            spans.append((start, start + len(s.data)) if s.views is None else (0, 0))
            start += len(s.data) if s.views is None else 0
        data = torch.frombuffer(bytearray(b"".join(s.data for s in slots if s.views is None)) or bytearray(1),
                                dtype=torch.uint8)
        ready = [j for j, s in enumerate(slots) if s.views is not None]
        ready_views = [torch.from_numpy(np.stack([slots[j].views[v] for j in ready])) if ready
                       else torch.empty((0, channels, size, size), dtype=torch.uint8)
                       for v, size in enumerate(plan.sizes)]
        return cls(epoch, [s.index for s in slots], data, spans, [s.size for s in slots], [s.boxes for s in slots],
                   [s.orientation for s in slots], ready, ready_views)

    def __len__(self) -> int:
        return len(self.indices)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``(C, H, W)`` as PIL's ``ImageOps.exif_transpose`` turns an image of EXIF ``orientation``."""
    if orientation in (5, 6, 7, 8):
        image = {5: lambda x: x.transpose(-1, -2), 6: lambda x: torch.rot90(x, -1, (-2, -1)),
                 7: lambda x: x.transpose(-1, -2).flip(-1, -2), 8: lambda x: torch.rot90(x, 1, (-2, -1))}[orientation](image)
    elif orientation in (2, 3, 4):
        image = image.flip({2: (-1,), 3: (-1, -2), 4: (-2,)}[orientation])
    return image


def cut_views(image: torch.Tensor, boxes: tuple[Box, ...], plan: ViewPlan) -> list[torch.Tensor]:
    """The float32 (C, S, S) views of ``boxes`` (oriented pixels) cut from a decoded, oriented
    uint8 (C, H, W) image on any device, values in [0, 255] before rounding."""
    height, width = image.shape[1:]
    pixels = image[None].float()
    factor = draft_factor(list(boxes), plan.sizes)
    if factor > 1:  # shrink first, as the CPU path's reduced JPEG decode does (module docstring)
        pixels = F.avg_pool2d(pixels, factor, ceil_mode=True)
    fy, fx = pixels.shape[2] / height, pixels.shape[3] / width
    views = []
    for box, size in zip(boxes, plan.sizes):
        top, left, h, w = scaled_box(box, fy, fx)  # the box in shrunk pixels (itself when not shrunk)
        box = pixels[:, :, top:top + h, left:left + w]
        views.append(F.interpolate(box, size=(size, size), mode=plan.interpolation, antialias=True)[0])
    return views


def decode_jpegs(data: list[torch.Tensor], channels: int, device: torch.device) -> list[torch.Tensor | None]:
    """uint8 (C, H, W) images on ``device`` from JPEG byte tensors, in one batched call; when it
    fails (one bad file fails the whole call) one by one, None for each file that fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    if device.type == "cuda":
        # torchvision's nvJPEG decode does not wait for the caller's stream: a block freed while
        # kernels queued there still read it can be handed to the decoder and overwritten
        # (pytorch/vision#9606, reproduced on H100s). Draining the stream first avoids it; the
        # training step has already waited for its loss, so little is queued here.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(data, mode=mode, device=device))
        except Exception:  # noqa: BLE001 - retried one by one below
            out: list[torch.Tensor | None] = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=mode, device=device))
                except Exception:  # noqa: BLE001 - the CPU path decides whether the file is bad
                    out.append(None)
            return out


def decode_planned(batch: PlannedBatch, plan: ViewPlan, channels: int, max_pixels: int,
                   device: torch.device) -> tuple[list[torch.Tensor], list[tuple[int, str]]]:
    """The uint8 (b, C, S, S) views of ``batch`` on ``device``, one tensor per view of ``plan``,
    and ``(slot, reason)`` of every slot no decoder could read (its views are left zero; the
    caller replaces them)."""
    b = len(batch)
    outs = [torch.zeros((b, channels, s, s), dtype=torch.float32, device=device) for s in plan.sizes]
    if batch.ready_slots:
        slots = torch.tensor(batch.ready_slots, device=device)
        for out, ready in zip(outs, batch.ready_views):
            out[slots] = ready.to(device, non_blocking=True).float()
    ready = set(batch.ready_slots)
    jpeg_slots = [j for j in range(b) if j not in ready]
    images = decode_jpegs([batch.data[s:e] for s, e in (batch.spans[j] for j in jpeg_slots)], channels, device) \
        if jpeg_slots else []
    failed: list[tuple[int, str]] = []
    for j, image in zip(jpeg_slots, images):
        views = _device_views(image, batch, j, plan, channels)
        if views is None:  # the device decoder refused it: the CPU path, same bytes, same boxes
            try:
                start, end = batch.spans[j]
                cpu = decode_views(batch.data[start:end].numpy().tobytes(), plan,
                                   image_generator(plan.seed, batch.epoch, batch.indices[j]), channels, max_pixels)
            except Exception as exc:  # noqa: BLE001 - any decode failure is a bad file
                failed.append((j, failure_reason(exc)))
                continue
            views = [torch.from_numpy(v).to(device) for v in cpu]
        for out, view in zip(outs, views):
            out[j] = view
    return [o.round_().clamp_(0, 255).to(torch.uint8) for o in outs], failed


def _device_views(image: torch.Tensor | None, batch: PlannedBatch, j: int, plan: ViewPlan,
                  channels: int) -> list[torch.Tensor] | None:
    """Slot ``j``'s views cut on the device, or None when its decode failed or disagrees with
    the header the boxes were drawn from."""
    if image is None or image.shape[0] != channels:
        return None
    image = orient(image, batch.orientations[j])
    if tuple(image.shape[1:]) != batch.sizes[j]:
        return None
    return cut_views(image, batch.boxes[j], plan)
