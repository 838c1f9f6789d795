"""Batched, on-device augmentation: the two-view and multi-crop pipelines of METHOD.md section 4.

Images arrive as ``uint8`` tensors ``(B, C, H, W)`` on the training device (CPU or GPU) and leave
as a list of normalised ``float32`` views ``[global_1, global_2, local_1, ...]``. Every operation
works on many images at once; there is no Python loop over images. The only Python loops are
over the two crop resolutions (global, local), on CPU over chunks of a few MB of rows for the
colour steps (speed notes below) and, in the rare case that images are much larger than the
crops, over the levels of an anti-aliasing pyramid.

Randomness. Every random number is drawn on the CPU from the ``torch.Generator`` passed to
:meth:`MultiCropAugment.__call__` (the global CPU generator when none is given), in a fixed
order and amount that does not depend on the configuration (apart from two more uniforms per
(view, sample) when rotation or shear is on, see step 1, and five when erasing is, step 6). The
small per-sample parameter tensors are then moved to the device in one transfer per crop
resolution, so a fixed seed gives the same crops, flips and colour factors on every run and on
every device, and no GPU->CPU synchronisation happens.

The pipeline of one view (BYOL / DINO order, torchvision's definition of each operation):

1. Random resized crop + horizontal flip in ONE resampling pass. The crop box is drawn exactly as
   torchvision's ``RandomResizedCrop.get_params`` does (area fraction uniform in ``scale``, aspect
   ratio log-uniform in ``ratio``, 10 attempts, then a centre crop with the ratio clamped), with
   integer box corners. The box and the flip become a per-sample axis-aligned affine map of
   normalised coordinates (the ``F.affine_grid`` grid with ``align_corners=False``), and the
   batch is resampled with ``cfg.interpolation`` and border padding, so a crop of the whole
   image equals ``F.interpolate(..., antialias=False)``. Bicubic output is clamped to [0, 1].
   Two implementations of that same resampling (equal up to float rounding, tested):
   ``resample="grid"``, one ``F.grid_sample`` call for all views of a resolution (the views are
   stacked along the grid's height, so the input is never copied per view); and
   ``resample="separable"``: along y an ``index_select`` of whole image rows and a weighted sum
   of the 2 (bilinear) or 4 (bicubic) taps, along x one batched matrix product with
   per-(view, sample) interpolation matrices holding the same taps. ``resample="auto"`` (the
   default) uses grid_sample on GPUs and the separable passes on CPU, where they are faster
   (grid_sample's bicubic is several times slower) and reuse their buffers between calls.
   Anti-aliasing: both sample points, which aliases when the crop is more than twice the output
   side. When that happens for some sample, the batch is reduced into a mip-map pyramid (each
   level an anti-aliased bilinear half-size resize of the previous one, built once per call and
   shared by all views), and each sample reads from level ``floor(log2(f))`` where
   ``f = max(crop_h, crop_w) / S`` is its downscale factor, so the residual factor is below 2.
   Normalised coordinates do not depend on the resolution, so the same map serves every level.
   With the presets (256 px images for 224/96 crops, 32 px for 32/16) ``f < 2`` always and the
   pyramid is never built.
   Rotation and shear (``cfg.rotation``, ``cfg.shear``; 0 in every preset, as in the paper).
   Digits keep their identity under small rotations and slants, and without these invariances
   a clustering head can split a class by writing style (4/9, 3/5/8 on MNIST). Each view is
   then ``affine(flip(crop(image)))``, with the affine part about the view's centre and in its
   square output coordinates, as torchvision's ``affine(view, angle=-rotation, translate=[0, 0],
   scale=1, shear=[shear, 0])``: the view is sheared horizontally, then rotated
   counter-clockwise by ``rotation`` degrees (torchvision's ``rotate`` convention); both
   angles are uniform in [-max, max] per (view, sample). The whole map is one general 2x3
   affine map, resampled in the same single pass, always with grid_sample (the separable
   passes only handle axis-aligned maps) and border padding: a rotated view's corners read
   the image around the crop box, and outside the image the edge pixels (black on digits).
   Its uniforms are drawn after all the others of their crop resolution, and only when
   rotation or shear is non-zero, so with both at 0 the random stream and the output are
   those of the pipeline without them.
2. Colour jitter with probability ``jitter_p``: brightness, contrast, saturation and hue with
   factors drawn like torchvision's ``ColorJitter`` (factor uniform in [max(0, 1 - x), 1 + x];
   hue shift uniform in [-hue, hue]). torchvision shuffles the order of the four operations per
   image; here the order is shuffled once per call and crop resolution (the same order for the
   whole batch). Brightness, contrast and saturation are linear maps that commute with each
   other apart from the clamping to [0, 1], so only hue's position really varies. Samples that
   are not jittered get identity factors. One-channel data gets brightness and contrast only.
3. Grayscale with probability ``grayscale_p`` (RGB only; ITU-R 601 weights 0.2989, 0.587, 0.114).
4. Gaussian blur with per-view probability ``blur_p = (global_1, global_2, locals)``. ``sigma``
   is uniform in ``blur_sigma``, which is given in pixels of a 224 px global crop; it is
   multiplied by ``global_size / 224`` for EVERY view, so the paper's 224/96 recipe keeps
   DINO/BYOL's sigma in [0.1, 2] px on global and local crops alike, and a 32/16 recipe gets
   sigma in [0.014, 0.29] px. Kernel: each blurred view its own ``2 * ceil(3 * sigma) + 1``
   taps (capped by the image; torchvision's size rule), separable, reflect padding, zero-padded
   to the longest kernel of its chunk (below), so a view's blur does not depend on the others'.
   On CPU (and for radius <= 3 anywhere) as shifted multiply-adds in place, on a GPU larger
   kernels as a grouped convolution. Only the selected views are filtered (gathered when not
   all of their chunk are); nothing is done when none is.
5. Solarize with per-view probability ``solarize_p``: pixels >= 0.5 become 1 - x (what
   PIL's ``ImageOps.solarize`` does at threshold 128 on the original 8-bit values).
6. Random erasing with probability ``erase_p`` (0 in the paper and the photo recipes):
   torchvision's ``RandomErasing`` on each view, with one attempt instead of ten: the area
   fraction is uniform in ``erase_scale`` and the aspect ratio (height / width) log-uniform in
   ``erase_ratio``; the sides are rounded and clipped to the view, the corner is uniform over the
   positions where the box fits, and the box is filled with the normalisation mean (0 after step
   7, as RandomErasing's ``value=0`` after Normalize). Its five uniforms per (view, sample) are
   drawn after everything else of their crop resolution, and only when ``erase_p > 0``.
7. Normalise ``(x - mean) / std``. Each view is a contiguous ``float32`` (B, C, S, S) slice of
   one new (V, B, C, S, S) tensor per resolution.

Speed notes. All views of one resolution are processed as one view-major (V * B, C, S, S)
batch with per-(view, sample) parameters of shape (V * B, 1, 1, 1), so the number of tensor
operations per call does not grow with the batch or the number of views. Per-sample choices
(apply or not) are 0/1 float factors used in arithmetic or ``lerp``, never boolean masks: on
CPU, operations on bool tensors (``torch.where``, ``&``) are several times slower than float
arithmetic. Large temporaries are avoided (in-place operations, one-channel temporaries) and,
on CPU, the intermediates are reused from call to call: on some machines touching freshly
allocated memory costs more than the arithmetic on it. On a CPU, steps 2-7 run by default
as one compiled pass per image (:mod:`twist.fused_colour`, numba; ``colour="fused"``): the same
formulas per pixel over tiles that stay in the L1 cache, 4-5x faster on one core than the tensor
operations, which GPUs always use and CPUs use without numba (``colour="tensor"``); the two agree
to about 1e-6, not bit for bit. The tensor path on a CPU runs steps 2-7 on chunks of rows of about
2 MiB (3 images of 224 px, 18 of 96 px; see ``_colour``), so that their ~30 passes read memory
still in the cache (1.5-1.9x faster than whole-batch passes at 224 px), and every step being per
image, the chunks give exactly the one-pass result. ``benchmarks/augment_speed.py`` measures a call.

The small ``adjust_*`` / ``rgb_to_grayscale`` / ``gaussian_blur`` / ``solarize`` functions take
explicit per-sample factors and are what the tensor path uses (and the definition the compiled
path is tested against); they are public so that they can be tested against torchvision one by
one.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from twist import fused_colour
from twist.config import AugmentConfig
from twist.data.crops import fallback_box

__all__ = [
    "MultiCropAugment",
    "EvalTransform",
    "dataset_stats",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "rgb_to_grayscale",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "gaussian_blur",
    "solarize",
    "DEFAULT_MEAN",
    "DEFAULT_STD",
]

DEFAULT_MEAN = 0.5
"""Per-channel mean used when none is given: maps [0, 1] to [-1, 1] together with DEFAULT_STD."""
DEFAULT_STD = 0.5

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision
_BLUR_REFERENCE_SIZE = 224  # blur sigmas are given in pixels of a 224 px crop

# Columns of the per-(sample, view) uniform random numbers drawn for each crop resolution, drawn
# as (B, V, _N_RANDOM) and used view-major.
_N_ATTEMPTS = 10
_C_AREA = 0
_C_RATIO = _C_AREA + _N_ATTEMPTS
_C_TOP = _C_RATIO + _N_ATTEMPTS
_C_LEFT = _C_TOP + 1
_C_FLIP = _C_LEFT + 1
_C_JITTER = _C_FLIP + 1
_C_FACTORS = _C_JITTER + 1  # brightness, contrast, saturation, hue
_C_GRAY = _C_FACTORS + 4
_C_BLUR = _C_GRAY + 1
_C_SIGMA = _C_BLUR + 1
_C_SOLAR = _C_SIGMA + 1
_N_RANDOM = _C_SOLAR + 1

# Rows of the packed per-(view, sample) parameter array (_N_PARAMS, V, B) moved to the device.
# crop + flip as x_in = ax * x_out + tx, y_in = ay * y_out + ty (normalised coordinates); with
# rotation/shear also x_in += bx * y_out, y_in += by * x_out (rows _P_BX, _P_BY)
_P_AX, _P_TX, _P_AY, _P_TY = 0, 1, 2, 3
_P_BRIGHTNESS, _P_CONTRAST, _P_SATURATION, _P_HUE = 4, 5, 6, 7
_P_GRAY = 8
_P_SIGMA = 9
_P_SOLAR = 10
_P_BX, _P_BY = 11, 12
_P_ERASE_TOP, _P_ERASE_LEFT, _P_ERASE_H, _P_ERASE_W = 13, 14, 15, 16  # height 0 = nothing erased
_N_PARAMS = 17
# On CPU, steps 2-7 run on chunks of about this many float32 values (2 MiB: 3 images of 224 px, 18 of
# 96 px), so that each of their ~30 passes reads memory still in the cache (see _colour)
_CHUNK_FLOATS = 1 << 19


# ---------------------------------------------------------------------------- small operations
def _per_sample(factor: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """A python number as is; a (N,) tensor as (N, 1, 1, ...); other tensors must broadcast."""
    if not torch.is_tensor(factor):
        return float(factor)
    factor = factor.to(device=x.device, dtype=x.dtype)
    if factor.dim() == 1:
        factor = factor.view(-1, *([1] * (x.dim() - 1)))
    return factor


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of RGB images ``x`` (channels on dim 1, 3 of them) as a one-channel tensor."""
    r, g, b = x.unbind(1)
    return r.mul(_GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: float | torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``clamp(x * factor, 0, 1)``; ``factor`` per sample (N,) or broadcastable."""
    f = _per_sample(factor, x)
    out = x.mul_(f) if inplace else x.mul(f)
    return out.clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: float | torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Blend with the mean grey level of each image (the last two dims are one image's pixels)."""
    f = _per_sample(factor, x)
    gray = rgb_to_grayscale(x) if x.shape[1] == 3 else x
    mean = gray.mean(dim=(-2, -1), keepdim=True)
    if x.shape[1] != 3:
        mean = mean.mean(dim=1, keepdim=True)
    out = x.mul_(f) if inplace else x.mul(f)
    return out.add_(mean * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: float | torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Blend RGB images with their grayscale version (identity for one-channel images)."""
    if x.shape[1] != 3:
        return x if inplace else x.clone()
    f = _per_sample(factor, x)
    gray = rgb_to_grayscale(x).mul_(1.0 - f)
    out = x.mul_(f) if inplace else x.mul(f)
    return out.add_(gray).clamp_(0.0, 1.0)


# HSV -> RGB: channel n of (R, G, B) sits at position clamp(|(6 h + n) mod 6 - 3| - 1, 0, 1) between
# the pixel's minimum (0) and maximum (1), with n = 6, 4, 2 (torchvision's table in closed form).
# For 6 h in [0, 6), |(6 h + n) mod 6 - 3| = ||6 h + n - 6| - 3|, so no modulo is needed per channel.
def adjust_hue(x: torch.Tensor, shift: float | torch.Tensor, inplace: bool = False,
               ws: "_Workspace | None" = None, per_channel: bool | None = None) -> torch.Tensor:
    """Rotate the hue of RGB images by ``shift`` turns (torchvision's ``adjust_hue``: RGB -> HSV,
    ``h = (h + shift) mod 1``, HSV -> RGB), all in batched tensor operations. Identity for
    one-channel images. Temporaries are one channel in size (taken from ``ws`` when given);
    ``per_channel`` (default: on CPU) writes the output channel by channel, otherwise with fewer,
    three-channel operations (fewer kernel launches on a GPU)."""
    if x.shape[1] != 3:
        return x if inplace else x.clone()
    shape1 = (x.shape[0], 1, *x.shape[2:])

    def tmp(name: str) -> torch.Tensor:
        if ws is not None:
            return ws.get("hue_" + name, shape1, x.device, x.dtype)
        return torch.empty(shape1, device=x.device, dtype=x.dtype)

    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]  # keep the channel dim so per-sample shifts broadcast
    maxc = torch.maximum(r, g, out=tmp("max"))
    maxc = torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g, out=tmp("min"))
    minc = torch.minimum(minc, b, out=minc)
    delta = torch.sub(maxc, minc, out=tmp("delta"))
    is_r = torch.ge(r, maxc, out=tmp("is_r"))  # 1.0 where r is the maximum, else 0.0
    is_g = torch.ge(g, maxc, out=tmp("is_g"))
    # hue in sextants, delta times: (r - g) + 4 delta if b is the max, (b - r) + 2 delta if g,
    # (g - b) if r; r wins ties, then g (as torchvision; tied branches give the same hue anyway).
    # lerp with a 0/1 weight picks exactly one of its ends.
    h = torch.sub(r, g, out=tmp("h")).add_(delta, alpha=4.0)
    t = torch.sub(b, r, out=tmp("t")).add_(delta, alpha=2.0)
    h.lerp_(t, is_g)
    h.lerp_(torch.sub(g, b, out=t), is_r)
    h.div_(torch.clamp_min(delta, 1e-12, out=t))  # in [-1, 5); the numerators are 0 where delta is 0
    s = _per_sample(shift, x)
    h.add_(s * 6.0)
    h.sub_(torch.mul(h, 1.0 / 6.0, out=t).floor_(), alpha=6.0)  # wrap into [0, 6)
    # HSV -> RGB: channel n of (R, G, B) is min + delta * clamp(||6h + n - 6| - 3| - 1, 0, 1), n = 6, 4, 2,
    # computed as (min - delta) + delta * clamp(||6h + n - 6| - 3|, 1, 2)
    base = torch.sub(minc, delta, out=tmp("base"))
    out = x if inplace else torch.empty_like(x)  # x is not read after this point
    if per_channel if per_channel is not None else x.device.type == "cpu":
        torch.addcmul(base, torch.sub(h, 3.0, out=t).abs_().clamp_(1.0, 2.0), delta, out=out[:, 0:1])
        for ch in (1, 2):
            k = torch.sub(h, 2.0 * ch, out=t).abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
            torch.addcmul(base, k, delta, out=out[:, ch:ch + 1])
        return out
    offsets = torch.arange(3, device=x.device, dtype=x.dtype).mul_(-2.0).view(1, 3, *([1] * (x.dim() - 2)))
    k = torch.add(h.expand(x.shape), offsets).abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
    return torch.addcmul(base, k, delta, out=out)


def _gaussian_kernels(sigma: torch.Tensor, size: int, radius: torch.Tensor | None = None) -> torch.Tensor:
    """(..., size) normalised Gaussian weights, one row per sigma (torchvision's definition:
    ``exp(-d^2 / (2 sigma^2))`` at integer offsets d from the centre, normalised to sum 1).
    With ``radius`` (one per sigma) a row is the kernel of ``2 * radius + 1`` taps, zero beyond."""
    d = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - (size - 1) / 2
    logits = d.square() / (-2.0 * sigma.square()).unsqueeze(-1)
    if radius is not None:
        logits = logits.masked_fill(d.abs() > radius.to(sigma.device).unsqueeze(-1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def _kernel_size(sigma: float | np.ndarray, height: int, width: int) -> int | np.ndarray:
    """``2 * ceil(3 sigma) + 1`` taps, odd, capped so that reflect padding is possible; for an
    array of sigmas an int64 array of sizes."""
    size = 2 * np.ceil(3.0 * np.asarray(sigma, dtype=np.float64)) + 1
    size = np.clip(size, 1, 2 * min(height, width) - 1).astype(np.int64)
    return int(size) if size.ndim == 0 else size


def _blur_kernels(sigma: np.ndarray, blur: np.ndarray, height: int, width: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The indices of the images where ``blur`` (N,) is true, and for all N images their kernel
    radius (from :func:`_kernel_size` of their ``sigma``; 0 where not blurred) and kernel as
    float32 (N, 2 max(radius) + 1), each zero beyond its own radius (all zero where not blurred)."""
    selected = np.flatnonzero(blur)
    sig = np.asarray(sigma, dtype=np.float32)[selected]
    radius = np.zeros(len(blur), np.int64)
    radius[selected] = _kernel_size(sig, height, width) // 2
    weights = np.zeros((len(blur), 2 * int(radius.max(initial=0)) + 1), np.float32)
    if len(selected):
        weights[selected] = _gaussian_kernels(torch.from_numpy(sig), weights.shape[1],
                                              torch.from_numpy(radius[selected])).numpy()
    return selected, radius, weights


def _blur_planes(planes: torch.Tensor, weights: torch.Tensor, ws: "_Workspace | None" = None,
                 taps: bool | None = None) -> torch.Tensor:
    """Separable blur of (P, H, W) planes with one odd, symmetric 1-D kernel (P, k) per plane;
    reflect padding. On CPU, and for small kernels (radius <= 3) anywhere, shifted multiply-adds
    write the result into ``planes``, with temporaries from ``ws`` when given: on CPU they are
    1.5-3x faster than the depthwise convolution (measured at 13 taps on 224 px planes, Zen 4),
    which larger kernels on a GPU use, returning a new tensor. ``taps`` forces one or the other."""
    p, h, w = planes.shape
    size = weights.shape[-1]
    r = size // 2
    if r == 0:
        return planes
    if not (taps if taps is not None else r <= 3 or planes.device.type == "cpu"):
        x = F.pad(planes, (r, r, r, r), mode="reflect").unsqueeze(0)  # (1, P, H+2r, W+2r)
        x = F.conv2d(x, weights.view(p, 1, 1, size), groups=p)  # (1, P, H+2r, W)
        x = F.conv2d(x, weights.view(p, 1, size, 1), groups=p)  # (1, P, H, W)
        return x.view(p, h, w)

    def tmp(name: str, shape) -> torch.Tensor:
        if ws is not None:
            return ws.get("blur_" + name, shape, planes.device, planes.dtype)
        return torch.empty(shape, device=planes.device, dtype=planes.dtype)

    wt = weights.view(p, 1, 1, size)
    # reflect padding: one call, 2-3x faster than copying the 4 r edge columns and rows one by one
    xp = F.pad(planes.unsqueeze(0), (r, r, r, r), mode="reflect")[0]
    # along x, on the padded rows too (reflecting rows commutes with filtering along them)
    rows = torch.mul(xp[:, :, r:r + w], wt[..., r], out=tmp("rows", (p, h + 2 * r, w)))
    pair = tmp("pair", (p, h + 2 * r, w))
    for k in range(1, r + 1):
        rows.addcmul_(torch.add(xp[:, :, r - k:r - k + w], xp[:, :, r + k:r + k + w], out=pair), wt[..., r + k])
    # along y, into planes
    torch.mul(rows[:, r:r + h], wt[..., r], out=planes)
    pair = tmp("pair_y", (p, h, w))
    for k in range(1, r + 1):
        planes.addcmul_(torch.add(rows[:, r - k:r - k + h], rows[:, r + k:r + k + h], out=pair), wt[..., r + k])
    return planes


def gaussian_blur(x: torch.Tensor, sigma: float | torch.Tensor, kernel_size: int | None = None) -> torch.Tensor:
    """Gaussian blur of images ``x`` (N, C, H, W) with one ``sigma`` per sample (N,) or one for
    all; ``kernel_size`` defaults to ``2 * ceil(3 * max(sigma)) + 1`` (capped by the image);
    reflect padding. Returns a new tensor."""
    n, c, h, w = x.shape
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(n)
    size = kernel_size or _kernel_size(float(sigma.max()), h, w)
    weights = _gaussian_kernels(sigma, size).repeat_interleave(c, dim=0)  # (N*C, k)
    return _blur_planes(x.reshape(n * c, h, w).clone(), weights).view(n, c, h, w)


def solarize(x: torch.Tensor, apply: float | torch.Tensor = 1.0, inplace: bool = False,
             per_channel: bool | None = None) -> torch.Tensor:
    """Invert the pixels >= 0.5 (``1 - x``) of the samples where ``apply`` (per sample (N,), or
    broadcastable; 0/1 floats or bools) is 1. Computed as ``x - max(2x - 1, 0)``, which equals
    ``min(x, 1 - x)`` exactly in float32 for x in [0, 1]. ``per_channel`` (default: on CPU) works
    a channel at a time, with smaller temporaries."""
    if torch.is_tensor(apply) and apply.dtype == torch.bool:
        apply = apply.to(x.dtype)
    a = _per_sample(apply, x)
    out = x if inplace else x.clone()
    parts = [out[:, ch:ch + 1] for ch in range(out.shape[1])] \
        if (per_channel if per_channel is not None else x.device.type == "cpu") else [out]
    for part in parts:
        part.sub_(torch.mul(part, 2.0).sub_(1.0).clamp_min_(0.0).mul_(a))
    return out


# ---------------------------------------------------------------------------- helpers
def _check_images(images: torch.Tensor, channels: int, ws: "_Workspace | None" = None) -> torch.Tensor:
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {type(images).__name__} "
                         f"of shape {tuple(getattr(images, 'shape', ()))}")
    if images.shape[1] != channels:
        raise ValueError(f"images have {images.shape[1]} channel(s) but the transform was built for {channels}")
    if images.dtype == torch.uint8:
        out = ws.get("input", images.shape, images.device) if ws is not None else None
        return torch.div(images, 255.0, out=out)  # one pass, float32
    if images.is_floating_point():
        return images.to(torch.float32)  # taken to be in [0, 1] already
    raise ValueError(f"images must be uint8 (or float in [0, 1]), got {images.dtype}")


class _Workspace:
    """Intermediate buffers kept from one call to the next, on CPU only.

    Touching freshly allocated memory costs page faults, which on some machines (containers,
    sandboxes) cost more than the arithmetic on it; reusing the few large intermediates avoids
    that. On CUDA, PyTorch's caching allocator already reuses memory, so fresh tensors are
    returned. Not thread-safe: one augmenter must not be called from two threads at once."""

    _MAX_BUFFERS = 96  # chunk-sized buffers, two shapes each per resolution (a full and the last chunk)

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = tuple(int(v) for v in shape)
        if device.type != "cpu":
            return torch.empty(shape, device=device, dtype=dtype)
        key = (name, shape, dtype)
        buf = self._bufs.get(key)
        if buf is None:
            if len(self._bufs) >= self._MAX_BUFFERS:  # e.g. many different batch sizes
                self._bufs.clear()
            buf = self._bufs[key] = torch.empty(shape, dtype=dtype)
        return buf


def _norm_stats(values: Sequence[float] | None, default: float, channels: int, name: str) -> list[float]:
    if values is None:
        return [default] * channels
    vals = [float(v) for v in values]
    if len(vals) == 1 and channels > 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ValueError(f"{name} has {len(vals)} values for {channels} channel(s)")
    if name == "std" and any(not v > 0 for v in vals):
        raise ValueError(f"std must be positive, got {vals}")
    return vals


class _Normalizer:
    """(x - mean) / std, with the constants cached per (device, shape)."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean, self.std = mean, std
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def constants(self, device: torch.device, ndim: int, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / std) shaped to broadcast along ``channel_dim`` of an ``ndim`` tensor."""
        key = (device, ndim, channel_dim)
        if key not in self._cache:
            shape = [1] * ndim
            shape[channel_dim] = len(self.mean)
            mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
            inv_std = torch.tensor([1.0 / s for s in self.std], dtype=torch.float32).view(shape)
            self._cache[key] = (mean.to(device), inv_std.to(device))
        return self._cache[key]


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small CPU array as a tensor on ``device``, without a host synchronisation on CUDA."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _chunks(n: int, per_view: int, values_per_row: int, device: torch.device):
    """(lo, hi) row ranges of a view-major batch of ``n`` rows (``per_view`` per view) for
    :meth:`MultiCropAugment._colour`: on CPU about ``_CHUNK_FLOATS`` values each, never across
    two views; elsewhere one range."""
    if device.type != "cpu":
        yield 0, n
        return
    rows = max(1, _CHUNK_FLOATS // values_per_row)
    for start in range(0, n, per_view):
        for lo in range(start, start + per_view, rows):
            yield lo, min(lo + rows, start + per_view)


# ---------------------------------------------------------------------------- crop parameters
def _crop_boxes(u: np.ndarray, height: int, width: int, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """torchvision's ``RandomResizedCrop.get_params`` for every (sample, view) at once.

    ``u``: (..., _N_RANDOM) uniforms. Returns float arrays of integer values (top, left, h, w)."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., _C_AREA:_C_AREA + _N_ATTEMPTS])
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lr0 + (lr1 - lr0) * u[..., _C_RATIO:_C_RATIO + _N_ATTEMPTS])
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(valid, axis=-1)[..., None]  # the first valid attempt
    found = valid.any(axis=-1)
    w = np.take_along_axis(w, first, axis=-1)[..., 0]
    h = np.take_along_axis(h, first, axis=-1)[..., 0]
    # no valid attempt: a centre crop with the aspect ratio clamped to the range
    ctop, cleft, ch, cw = fallback_box(height, width, ratio)
    w = np.where(found, w, cw)
    h = np.where(found, h, ch)
    top = np.minimum(np.floor(u[..., _C_TOP] * (height - h + 1)), height - h)
    left = np.minimum(np.floor(u[..., _C_LEFT] * (width - w + 1)), width - w)
    top = np.where(found, top, ctop)
    left = np.where(found, left, cleft)
    return top, left, h, w


def _erase_boxes(u: np.ndarray, size: int, prob: float, scale: tuple[float, float],
                 ratio: tuple[float, float]) -> np.ndarray:
    """Random-erasing boxes (step 6) from ``u`` (..., 5) uniforms: (4, ...) float arrays of integer
    (top, left, height, width) in a square view of side ``size``; height and width are 0 where the
    view is not erased (probability ``1 - prob``)."""
    area = size * size * (scale[0] + (scale[1] - scale[0]) * u[..., 1])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 2])
    h = np.clip(np.round(np.sqrt(area * aspect)), 1, size)
    w = np.clip(np.round(np.sqrt(area / aspect)), 1, size)
    top = np.floor(u[..., 3] * (size - h + 1))
    left = np.floor(u[..., 4] * (size - w + 1))
    on = u[..., 0] < prob
    return np.stack([top, left, np.where(on, h, 0.0), np.where(on, w, 0.0)])


def _box_mask(p: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """(n, 1, S, S) float mask, 1 inside each view's erasing box of ``p`` (rows _P_ERASE_*), from
    integer-valued arithmetic: ``clamp(r - top + 1, 0, 1) * clamp(top + h - r, 0, 1)`` is 1 exactly
    for ``top <= r < top + h``."""
    r = torch.arange(size, device=p.device, dtype=p.dtype)

    def band(start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        start, length = start.reshape(n, 1), length.reshape(n, 1)
        return (r - start + 1).clamp_(0, 1) * (start + length - r).clamp_(0, 1)

    rows = band(p[_P_ERASE_TOP], p[_P_ERASE_H])
    cols = band(p[_P_ERASE_LEFT], p[_P_ERASE_W])
    return (rows.view(n, 1, size, 1) * cols.view(n, 1, 1, size))


def _sampling_grid(p: torch.Tensor, b: int, nviews: int, size: int, affine: bool = False) -> torch.Tensor:
    """The ``F.affine_grid(theta, align_corners=False)`` grids of axis-aligned maps
    ``x_in = ax * x_out + tx``, ``y_in = ay * y_out + ty`` (flips have ax < 0; parameters
    ``p[row]`` shaped (V, B)), built separably (a fraction of affine_grid's cost), all views of a
    sample stacked along the output height: (B, V * size, size, 2). ``affine``: general maps,
    with the cross terms ``x_in += bx * y_out``, ``y_in += by * x_out`` (rotation, shear)."""
    base = (torch.arange(size, device=p.device, dtype=p.dtype) * 2.0 + 1.0) / size - 1.0  # pixel centres

    def per_sample(row: int) -> torch.Tensor:
        return p[row].t().reshape(b, nviews, 1, 1)

    gx = torch.addcmul(per_sample(_P_TX), per_sample(_P_AX), base.view(1, 1, 1, size))
    gy = torch.addcmul(per_sample(_P_TY), per_sample(_P_AY), base.view(1, 1, size, 1))
    if affine:
        gx = torch.addcmul(gx, per_sample(_P_BX), base.view(1, 1, size, 1))
        gy = torch.addcmul(gy, per_sample(_P_BY), base.view(1, 1, 1, size))
    grid = torch.empty((b, nviews, size, size, 2), device=p.device, dtype=p.dtype)
    grid[..., 0] = gx
    grid[..., 1] = gy
    return grid.view(b, nviews * size, size, 2)


def _resample_grid(src: torch.Tensor, p: torch.Tensor, nviews: int, size: int, mode: str,
                   ws: _Workspace | None = None, affine: bool = False) -> torch.Tensor:
    """Crop + flip (+ rotation and shear when ``affine``) of every view with one ``F.grid_sample``
    (views stacked along the grid's height, so the input is not copied per view):
    (B, C, H, W) -> (V, B, C, S, S), a new tensor."""
    b, c = src.shape[:2]
    grid = _sampling_grid(p, b, nviews, size, affine)
    out = F.grid_sample(src, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.view(b, c, nviews, size, size).permute(2, 0, 1, 3, 4).contiguous()


_CUBIC_A = -0.75  # Keys' cubic convolution, as torch's bicubic grid_sample / interpolate


def _axis_taps(scale: torch.Tensor, shift: torch.Tensor, size_in: int, size_out: int,
               mode: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Source indices (clamped to the image: border padding) and weights along one axis for the map
    ``coord_in = scale * coord_out + shift`` in normalised coordinates (align_corners=False), the
    way grid_sample computes them. scale, shift: (V, B). Returns [(index, weight)], each (V, B, S)."""
    base = (torch.arange(size_out, device=scale.device, dtype=scale.dtype) * 2.0 + 1.0) / size_out - 1.0
    coord = torch.addcmul(shift.unsqueeze(-1), scale.unsqueeze(-1), base)
    pix = ((coord + 1.0) * size_in - 1.0) / 2.0  # grid_sample's unnormalisation
    i0 = torch.floor(pix)
    t = pix - i0
    i0 = i0.to(torch.int64)
    if mode == "bilinear":
        weights, offsets = [1.0 - t, t], (0, 1)
    else:
        a = _CUBIC_A

        def near(d):  # |d| <= 1
            return ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0

        def far(d):  # 1 < |d| < 2
            return ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a

        weights, offsets = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], (-1, 0, 1, 2)
    return [((i0 + o).clamp_(0, size_in - 1), w) for o, w in zip(offsets, weights)]


def _resample_separable(src: torch.Tensor, p: torch.Tensor, nviews: int, size: int, mode: str,
                        ws: _Workspace | None = None) -> torch.Tensor:
    """The same resampling as :func:`_resample_grid` (same taps, weights and border handling; equal
    up to float rounding) as two 1-D passes: along y, ``index_select`` of whole image rows and a
    weighted sum of the 2 (bilinear) or 4 (bicubic) taps; along x, one batched matrix product
    with a per-(view, sample) interpolation matrix that holds the same taps. Several times
    faster than grid_sample on CPU for bicubic. (B, C, H, W) -> (V, B, C, S, S), a new tensor
    (the intermediates live in ``ws``)."""
    b, c, height, width = src.shape
    dev = src.device
    ws = ws or _Workspace()
    n = nviews * b
    # pass 1, along y: output rows (v, b, c, y) are weighted sums of input rows (b, c, iy)
    rows = src.reshape(b * c * height, width)
    first = ((torch.arange(b, device=dev).view(1, b, 1, 1) * c + torch.arange(c, device=dev).view(1, 1, c, 1))
             * height)
    buf = ws.get("gather", (n * c * size, width), dev, src.dtype)
    acc = ws.get("rows", (nviews, b, c, size, width), dev, src.dtype)
    for k, (idx, w) in enumerate(_axis_taps(p[_P_AY], p[_P_TY], height, size, mode)):
        torch.index_select(rows, 0, (idx.unsqueeze(2) + first).view(-1), out=buf)
        g = buf.view(nviews, b, c, size, width)
        wt = w.view(nviews, b, 1, size, 1)
        if k == 0:
            torch.mul(g, wt, out=acc)
        else:
            acc.addcmul_(g, wt)
    # pass 2, along x: (C*S, W) @ (W, S) per (view, sample), the matrix built from the x taps
    mat = ws.get("matrix", (n, width, size), dev, src.dtype).zero_()
    for idx, w in _axis_taps(p[_P_AX], p[_P_TX], width, size, mode):
        mat.scatter_add_(1, idx.view(n, 1, size), w.view(n, 1, size))
    out = torch.bmm(acc.view(n, c * size, width), mat)
    return out.view(nviews, b, c, size, size)


_RESAMPLERS = {"grid": _resample_grid, "separable": _resample_separable}


class MultiCropAugment:
    """2 global + ``cfg.num_local`` local views of a uint8 batch, on the batch's device.

    Args:
        cfg: the augmentation settings (sizes, probabilities, ranges).
        channels: 1 (grayscale data) or 3 (RGB).
        mean, std: per-channel normalisation of the output in [0, 1] units (one value is
            repeated for every channel); default 0.5 / 0.5, i.e. outputs in [-1, 1]. The trainer
            passes the dataset's statistics (:func:`dataset_stats`).
        global_scale, local_scale: override ``cfg.global_scale`` / ``cfg.local_scale`` (the
            self-labeling stage uses harder crops).
        resample: ``"grid"`` (``F.grid_sample``), ``"separable"`` (two 1-D passes, the same
            result) or ``"auto"``: grid on GPUs, separable on CPU. With rotation or shear the
            maps are not axis-aligned and grid is used whatever this says.
        colour: how steps 2-7 run on a CPU: ``"fused"``, one compiled pass per image
            (:mod:`twist.fused_colour`, numba; 4-5x faster there), ``"tensor"``, the batched
            tensor operations GPUs always use, or ``"auto"``: fused on CPU when numba imports.
            The two agree to about 1e-6, not bit for bit.

    Calling it with uint8 images (B, C, H, W) (any device) and a CPU ``torch.Generator`` returns
    ``num_views`` float32 tensors ``[global_1, global_2, local_1, ...]`` of shape (B, C, S, S),
    new on every call (the views of one resolution are slices of one tensor). An instance keeps
    CPU buffers between calls: do not call one instance from two threads at once.
    """

    def __init__(self, cfg: AugmentConfig, channels: int, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, global_scale: tuple[float, float] | None = None,
                 local_scale: tuple[float, float] | None = None, resample: str = "auto",
                 colour: str = "auto"):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if resample not in ("auto", "grid", "separable"):
            raise ValueError(f"resample must be auto, grid or separable, got {resample!r}")
        self.resample = resample
        if colour not in ("auto", "fused", "tensor"):
            raise ValueError(f"colour must be auto, fused or tensor, got {colour!r}")
        if colour == "fused" and not fused_colour.available():
            raise ValueError("colour='fused' needs numba (pip install numba); 'auto' falls back to tensor operations")
        self.colour = colour
        if cfg.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be bicubic or bilinear, got {cfg.interpolation!r}")
        if not (0 <= cfg.rotation <= 180 and 0 <= cfg.shear < 45):
            raise ValueError(f"rotation must be in [0, 180] and shear in [0, 45) degrees, "
                             f"got rotation={cfg.rotation}, shear={cfg.shear}")
        # the ranges the rotation and shear angles are drawn from, in degrees (tests pin them to one angle)
        self.rotation_range = (-float(cfg.rotation), float(cfg.rotation))
        self.shear_range = (-float(cfg.shear), float(cfg.shear))
        self.cfg = cfg
        self.channels = channels
        self.mean = _norm_stats(mean, DEFAULT_MEAN, channels, "mean")
        self.std = _norm_stats(std, DEFAULT_STD, channels, "std")
        self.global_scale = tuple(float(v) for v in (global_scale if global_scale is not None else cfg.global_scale))
        self.local_scale = tuple(float(v) for v in (local_scale if local_scale is not None else cfg.local_scale))
        for name, sc in (("global_scale", self.global_scale), ("local_scale", self.local_scale)):
            if not (len(sc) == 2 and 0 < sc[0] <= sc[1] <= 1):
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {sc}")
        self.num_views = 2 + cfg.num_local
        self.sigma_scale = cfg.global_size / _BLUR_REFERENCE_SIZE
        self._normalizer = _Normalizer(self.mean, self.std)
        self._ws = _Workspace()
        # the colour operations that can change anything for this data, in torchvision's order
        self._jitter_ops = [k for k, on in enumerate((cfg.brightness > 0, cfg.contrast > 0,
                                                      cfg.saturation > 0 and channels == 3,
                                                      cfg.hue > 0 and channels == 3)) if on]

    def __repr__(self) -> str:
        c = self.cfg
        geo = f", rotation={c.rotation}, shear={c.shear}" if c.rotation or c.shear else ""
        return (f"MultiCropAugment(2 x {c.global_size}px + {c.num_local} x {c.local_size}px, channels={self.channels}, "
                f"global_scale={self.global_scale}, local_scale={self.local_scale}, "
                f"interpolation={c.interpolation}{geo})")

    def _resample_method(self, device: torch.device) -> str:
        """auto: grid_sample on GPUs, the separable passes on CPU (faster there, bicubic above all,
        and their intermediates are reused between calls)."""
        if self.resample != "auto":
            return self.resample
        return "separable" if device.type == "cpu" else "grid"

    # ------------------------------------------------------------------ public call
    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor],
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
        if isinstance(images, (list, tuple)):  # views already cut at decode time (streamed photos)
            return self.photometric(images, generator)
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("the augmentation generator must be a CPU torch.Generator")
        cfg = self.cfg
        with torch.no_grad():
            x = _check_images(images, self.channels, self._ws)
            pyramid = [x]
            views = self._views(pyramid, 2, cfg.global_size, self.global_scale,
                                (cfg.blur_p[0], cfg.blur_p[1]), (cfg.solarize_p[0], cfg.solarize_p[1]), generator)
            if cfg.num_local > 0:
                views += self._views(pyramid, cfg.num_local, cfg.local_size, self.local_scale,
                                     (cfg.blur_p[2],) * cfg.num_local, (cfg.solarize_p[2],) * cfg.num_local,
                                     generator)
        return views

    def photometric(self, views: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The output of :meth:`__call__` for views already cropped and resized at decode time
        (:mod:`twist.data.views`): ``views`` are uint8 (B, C, S, S) tensors ``[global_1,
        global_2, local_1, ...]`` at ``global_size`` / ``local_size``, on the training device.
        Applies the flip and steps 2-6 with the same draws, code and order as :meth:`__call__`
        (the crop columns of the draws are drawn and ignored, so the random stream advances as
        there). Rotation and shear need the original image and are refused."""
        cfg = self.cfg
        if cfg.rotation or cfg.shear:
            raise ValueError("views cut at decode time cannot be rotated or sheared; set augment.rotation "
                             "and augment.shear to 0 or keep the images in memory")
        if len(views) != self.num_views:
            raise ValueError(f"expected {self.num_views} views (2 global + {cfg.num_local} local), got {len(views)}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("the augmentation generator must be a CPU torch.Generator")
        with torch.no_grad():
            out = self._cut_views(views[:2], cfg.global_size, self.global_scale, (cfg.blur_p[0], cfg.blur_p[1]),
                                  (cfg.solarize_p[0], cfg.solarize_p[1]), generator)
            if cfg.num_local > 0:
                out += self._cut_views(views[2:], cfg.local_size, self.local_scale, (cfg.blur_p[2],) * cfg.num_local,
                                       (cfg.solarize_p[2],) * cfg.num_local, generator)
        return out

    def _cut_views(self, views: Sequence[torch.Tensor], size: int, scale: tuple[float, float],
                   blur_p: Sequence[float], solar_p: Sequence[float],
                   generator: torch.Generator | None) -> list[torch.Tensor]:
        nviews = len(views)
        for v in views:
            if v.dim() != 4 or tuple(v.shape[1:]) != (self.channels, size, size) or v.dtype != torch.uint8:
                raise ValueError(f"views must be uint8 (B, {self.channels}, {size}, {size}), got "
                                 f"{v.dtype} {tuple(v.shape)}")
        b, c = views[0].shape[:2]
        xv = torch.empty((nviews * b, c, size, size), device=views[0].device)  # filled chunk by chunk
        d = self._draw(b, nviews, size, size, size, scale, blur_p, solar_p, generator)
        return self._colour(xv, d, _to_device(d["params"], xv.device), nviews, b, c, size, source=views)

    # ------------------------------------------------------------------ parameters, on the CPU
    def _draw(self, b: int, nviews: int, size: int, height: int, width: int, scale: tuple[float, float],
              blur_p: Sequence[float], solar_p: Sequence[float], generator: torch.Generator | None) -> dict:
        """Every random choice for ``nviews`` views of ``b`` images, in a fixed amount and order."""
        cfg = self.cfg
        u = torch.rand((b, nviews, _N_RANDOM), generator=generator, dtype=torch.float64).numpy()
        u = u.transpose(1, 0, 2)  # everything below is view-major: (V, B)
        order = torch.randperm(4, generator=generator).tolist()
        affine = any(self.rotation_range) or any(self.shear_range)
        rotation = shear = None  # degrees, (V, B)
        if affine:  # drawn last and only when on: without rotation/shear the stream is unchanged
            ua = torch.rand((b, nviews, 2), generator=generator, dtype=torch.float64).numpy().transpose(1, 0, 2)
            (r0, r1), (s0, s1) = self.rotation_range, self.shear_range
            rotation, shear = r0 + (r1 - r0) * ua[..., 0], s0 + (s1 - s0) * ua[..., 1]
        erase = cfg.erase_p > 0  # drawn after the affine angles and only when on, for the same reason
        if erase:
            ue = torch.rand((b, nviews, 5), generator=generator, dtype=torch.float64).numpy().transpose(1, 0, 2)

        params = np.zeros((_N_PARAMS, nviews, b), dtype=np.float32)
        top, left, h, w = _crop_boxes(u, height, width, scale, cfg.ratio)
        flip = u[..., _C_FLIP] < cfg.flip_p
        ax, ay = np.where(flip, -w / width, w / width), h / height
        params[_P_TX] = (2 * left + w) / width - 1
        params[_P_TY] = (2 * top + h) / height - 1
        footprint = np.maximum(h, w)  # input pixels per output side
        if affine:
            # view coordinates (square, y down) -> flipped crop coordinates: the inverse of a
            # horizontal shear followed by a counter-clockwise rotation: [[1, tan], [0, 1]] @ [[cos, -sin], [sin, cos]]
            cos, sin, tan = np.cos(np.radians(rotation)), np.sin(np.radians(rotation)), np.tan(np.radians(shear))
            m00, m01, m10, m11 = cos + tan * sin, tan * cos - sin, sin, cos
            params[_P_AX], params[_P_BX], params[_P_BY], params[_P_AY] = ax * m00, ax * m01, ay * m10, ay * m11
            footprint = np.maximum(np.hypot(w * m00, h * m10), np.hypot(w * m01, h * m11))
        else:
            params[_P_AX], params[_P_AY] = ax, ay
        # anti-aliasing level: the residual downscale factor at level L is footprint / size / 2^L < 2
        max_level = max(0, int(math.floor(math.log2(max(1, min(height, width))))))
        levels = np.clip(np.floor(np.log2(footprint / size)), 0, max_level).astype(np.int64)

        jitter = u[..., _C_JITTER] < cfg.jitter_p
        for col, amount in enumerate((cfg.brightness, cfg.contrast, cfg.saturation)):
            lo, hi = max(0.0, 1.0 - amount), 1.0 + amount
            params[_P_BRIGHTNESS + col] = np.where(jitter, lo + (hi - lo) * u[..., _C_FACTORS + col], 1.0)
        params[_P_HUE] = np.where(jitter, cfg.hue * (2.0 * u[..., _C_FACTORS + 3] - 1.0), 0.0)

        gray = (u[..., _C_GRAY] < cfg.grayscale_p) & (self.channels == 3)
        params[_P_GRAY] = gray
        blur = u[..., _C_BLUR] < np.asarray(blur_p, dtype=np.float64)[:, None]
        lo_s, hi_s = cfg.blur_sigma
        sigma = (lo_s + (hi_s - lo_s) * u[..., _C_SIGMA]) * self.sigma_scale
        params[_P_SIGMA] = sigma  # read only where ``blur`` is drawn
        solar = u[..., _C_SOLAR] < np.asarray(solar_p, dtype=np.float64)[:, None]
        params[_P_SOLAR] = solar
        if erase:
            boxes = _erase_boxes(ue, size, cfg.erase_p, cfg.erase_scale, cfg.erase_ratio)
            params[_P_ERASE_TOP:_P_ERASE_W + 1] = boxes
            erase = bool(boxes[2].any())
        return dict(params=params, order=order, levels=levels, jitter=bool(jitter.any()), gray=bool(gray.any()),
                    blur=blur, solar=bool(solar.any()), affine=affine, rotation=rotation, shear=shear,
                    erase=erase)

    # ------------------------------------------------------------------ one crop resolution
    def _views(self, pyramid: list[torch.Tensor], nviews: int, size: int, scale: tuple[float, float],
               blur_p: Sequence[float], solar_p: Sequence[float],
               generator: torch.Generator | None) -> list[torch.Tensor]:
        cfg = self.cfg
        x = pyramid[0]
        b, c, height, width = x.shape
        device = x.device
        d = self._draw(b, nviews, size, height, width, scale, blur_p, solar_p, generator)
        p = _to_device(d["params"], device)  # (_N_PARAMS, V, B) float32: one transfer
        n = nviews * b

        # ---- crop + flip (+ rotation, shear): one resampling of all views of this resolution (per
        # pyramid level used); general affine maps need grid_sample
        if d["affine"]:
            resample = functools.partial(_resample_grid, affine=True)
        else:
            resample = _RESAMPLERS[self._resample_method(device)]
        levels = d["levels"]
        xv = None
        for level in np.unique(levels).tolist():
            ws = self._ws if xv is None else None  # a second level must not overwrite the first's buffer
            res = resample(self._pyramid_level(pyramid, level), p, nviews, size, cfg.interpolation, ws)
            if xv is None:
                xv = res.view(n, c, size, size)  # all views as one batch, view-major: (V*B, C, S, S)
            else:
                weight = _to_device((levels == level).astype(np.float32), device).view(n, 1, 1, 1)
                xv.lerp_(res.view(n, c, size, size), weight)
        if cfg.interpolation == "bicubic":
            xv.clamp_(0.0, 1.0)
        return self._colour(xv, d, p, nviews, b, c, size)

    def _colour(self, xv: torch.Tensor, d: dict, p: torch.Tensor, nviews: int, b: int, c: int,
                size: int, source: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Steps 2-7 (jitter, grey, blur, solarize, erase, normalise) in place on the cropped views
        ``xv`` (V*B, C, S, S) float32 in [0, 1], view-major, with the draws ``d`` / ``p`` of
        :meth:`_draw`. With ``source`` (the uint8 views of :meth:`photometric`) ``xv`` is
        uninitialised and each chunk is first filled from it (scaled to [0, 1], flipped).

        Where :meth:`colour_path` says "fused" (a CPU with numba) the views go to
        :meth:`_colour_fused` instead. The tensor path on a CPU takes the rows through the steps
        in chunks of about ``_CHUNK_FLOATS`` values: the ~30 passes of the steps then read and
        write memory that is still in the cache instead of the whole batch's (77 MB for 64
        images of two 224 px views), 1.5-1.9x as fast on one core.
        Every step is per image (the contrast mean included), so the chunks give the result of
        one pass over the batch (tested); the flags that skip a step are the batch's. On a GPU
        the batch is one chunk."""
        n = nviews * b
        pf = p.reshape(_N_PARAMS, n)
        if self.colour_path(xv.device) == "fused":
            self._colour_fused(xv, d, pf, nviews, b, source)
            return list(xv.view(nviews, b, c, size, size).unbind(0))
        for lo, hi in _chunks(n, b, c * size * size, xv.device):
            x = xv[lo:hi]
            if source is not None:
                self._fill(x, source, lo, hi, b, d["params"][_P_AX].reshape(n)[lo:hi] < 0)
            self._colour_chunk(x, d, pf[:, lo:hi], slice(lo, hi))
        return list(xv.view(nviews, b, c, size, size).unbind(0))

    def colour_path(self, device: torch.device) -> str:
        """How steps 2-7 run for views on ``device``: ``"fused"`` (compiled, on a CPU) or ``"tensor"``."""
        fused = device.type == "cpu" and self.colour != "tensor" and fused_colour.available()
        return "fused" if fused else "tensor"

    def _colour_fused(self, xv: torch.Tensor, d: dict, p: torch.Tensor, nviews: int, b: int,
                      source: Sequence[torch.Tensor] | None) -> None:
        """:meth:`_colour` on a CPU through :func:`twist.fused_colour.colour_views`, one view's
        rows (and uint8 source) at a time; random erasing, when drawn, and the normalising after
        it stay tensor operations (the kernel then leaves [0, 1] values)."""
        n, c, size, _ = xv.shape
        params = d["params"].reshape(_N_PARAMS, n)
        jitter = self.cfg.jitter_p > 0 and d["jitter"]
        order = np.array([k for k in d["order"] if k in self._jitter_ops] if jitter else [], dtype=np.int64)
        _, radius, weights = _blur_kernels(params[_P_SIGMA], d["blur"].reshape(n), size, size)
        mean, inv_std = (t.reshape(-1).numpy() for t in self._normalizer.constants(xv.device, 4, 1))
        x = xv.numpy()
        for v in range(nviews):
            rows = slice(v * b, (v + 1) * b)
            fused_colour.colour_views(
                x[rows], None if source is None else source[v].contiguous().numpy(), params[_P_AX, rows] < 0,
                params[_P_BRIGHTNESS:_P_HUE + 1, rows], order, params[_P_GRAY, rows] > 0, weights[rows],
                radius[rows], params[_P_SOLAR, rows] > 0, mean, inv_std, not d["erase"], _GRAY_WEIGHTS)
        if d["erase"]:  # the kernel left [0, 1] values
            self._erase_and_normalise(xv, True, p)

    def _colour_chunk(self, x: torch.Tensor, d: dict, p: torch.Tensor, rows: slice) -> None:
        """Steps 2-7 in place on ``x``, the rows ``rows`` of the view-major batch, whose parameters
        are ``p`` (_N_PARAMS, len(x)) on the device."""
        cfg = self.cfg
        m = x.shape[0]

        def col(i: int) -> torch.Tensor:  # a per-(view, sample) parameter, broadcast over (m, C, S, S)
            return p[i].view(m, 1, 1, 1)

        # ---- colour jitter, in one shuffled order for the batch (identity factors where not jittered)
        if cfg.jitter_p > 0 and d["jitter"]:
            for k in d["order"]:
                if k not in self._jitter_ops:
                    continue
                f = col(_P_BRIGHTNESS + k)
                if k == 0:
                    adjust_brightness(x, f, inplace=True)
                elif k == 1:
                    adjust_contrast(x, f, inplace=True)
                elif k == 2:
                    adjust_saturation(x, f, inplace=True)
                else:
                    adjust_hue(x, f, inplace=True, ws=self._ws)
        # ---- grayscale (lerp with a 0/1 weight is exact at both ends)
        if d["gray"]:
            x.lerp_(rgb_to_grayscale(x).expand_as(x), col(_P_GRAY))
        # ---- gaussian blur
        blur = d["blur"].reshape(-1)[rows]
        if blur.any():
            blurred = self._blur(x, d["params"][_P_SIGMA].reshape(-1)[rows], blur, self._ws)
            if blurred is not x:  # a GPU's convolution for large kernels returns a new tensor
                x.copy_(blurred)
        # ---- solarize
        if d["solar"]:
            solarize(x, col(_P_SOLAR), inplace=True)
        self._erase_and_normalise(x, d["erase"], p)

    def _erase_and_normalise(self, x: torch.Tensor, erase: bool, p: torch.Tensor) -> None:
        """Steps 6-7 in place on ``x`` (M, C, S, S) in [0, 1], whose parameters are ``p``
        (_N_PARAMS, M): random erasing (a 0/1 float mask, the product of a row band and a column
        band, filled with the mean) where drawn, then ``(x - mean) / std``."""
        mean, inv_std = self._normalizer.constants(x.device, 4, 1)
        if erase:
            x.lerp_(mean.expand_as(x), _box_mask(p, x.shape[0], x.shape[-1]))
        x.sub_(mean).mul_(inv_std)

    @staticmethod
    def _fill(x: torch.Tensor, views: Sequence[torch.Tensor], lo: int, hi: int, b: int, flip: np.ndarray) -> None:
        """Rows ``lo:hi`` of the view-major batch of the uint8 ``views`` (``b`` images each) into
        ``x``, scaled to [0, 1] and flipped horizontally where ``flip`` (bool, hi - lo) is true."""
        for v in range(lo // b, (hi - 1) // b + 1):
            a, z = max(lo, v * b), min(hi, (v + 1) * b)
            x[a - lo:z - lo].copy_(views[v][a - v * b:z - v * b]).div_(255.0)  # = torch.div(u8, 255), faster
        flipped = np.flatnonzero(flip)
        if len(flipped):
            idx = _to_device(flipped, x.device)
            x.index_copy_(0, idx, x.index_select(0, idx).flip(-1))

    @staticmethod
    def _blur(x: torch.Tensor, sigma: np.ndarray, blur: np.ndarray, ws: _Workspace | None = None) -> torch.Tensor:
        """Blur the images of ``x`` (N, C, S, S) where ``blur`` (N,) is true, each with its sigma
        (``sigma``, (N,)) and its own kernel of ``2 * ceil(3 sigma) + 1`` taps (capped by the
        image), zero-padded to the longest: an image's blur does not depend on which others are
        blurred with it. In place when every image is blurred and the filter works in place
        (always on CPU), else on the gathered images; returns the result."""
        n, c, h, w = x.shape
        selected, _, weights = _blur_kernels(sigma, blur, h, w)
        if not len(selected) or weights.shape[1] == 1:
            return x
        weights = _to_device(np.repeat(weights[selected], c, axis=0), x.device)  # (planes, size)
        planes = x.view(n * c, h, w)
        if len(selected) == n:
            return _blur_planes(planes, weights, ws).view_as(x)
        idx = _to_device((selected[:, None] * c + np.arange(c)).reshape(-1), x.device)
        # no workspace here: the gathered count varies from chunk to chunk, and a buffer per count
        # would crowd out the reused ones
        planes.index_copy_(0, idx, _blur_planes(planes.index_select(0, idx), weights))
        return x

    @staticmethod
    def _pyramid_level(pyramid: list[torch.Tensor], level: int) -> torch.Tensor:
        """Level ``level`` of the anti-aliasing mip-map (level 0 = the images), built on demand."""
        while len(pyramid) <= level:
            prev = pyramid[-1]
            hh, ww = max(1, prev.shape[-2] // 2), max(1, prev.shape[-1] // 2)
            pyramid.append(F.interpolate(prev, size=(hh, ww), mode="bilinear", align_corners=False, antialias=True))
        return pyramid[level]


class EvalTransform:
    """uint8 (B, C, H, W) -> normalised float32 (B, C, size, size), on the input's device.

    Resizes only when the images are not already ``size`` x ``size`` (bilinear, anti-aliased when
    shrinking; non-square images are stretched to the square). mean/std as in
    :class:`MultiCropAugment` (default 0.5 / 0.5)."""

    def __init__(self, size: int, channels: int, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.size = int(size)
        self.channels = channels
        self.mean = _norm_stats(mean, DEFAULT_MEAN, channels, "mean")
        self.std = _norm_stats(std, DEFAULT_STD, channels, "std")
        self._normalizer = _Normalizer(self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, channels={self.channels})"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = _check_images(images, self.channels)
            h, w = x.shape[-2:]
            if (h, w) != (self.size, self.size):
                shrink = h > self.size or w > self.size
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                  antialias=shrink)
            mean, inv_std = self._normalizer.constants(x.device, 4, 1)
            if x.data_ptr() == images.data_ptr():  # a float32 input used as is: do not modify it
                x = x - mean
            else:
                x = x.sub_(mean)
            return x.mul_(inv_std)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet's per-channel statistics, the normalisation of the release's recipes and weights
(train.normalize=imagenet; imported release checkpoints)."""


def dataset_stats(images_uint8, chunk_elements: int = 1 << 24) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (population) in [0, 1] units of a uint8 image
    array (N, C, H, W) (torch tensor or numpy array), computed exactly in integer arithmetic,
    a chunk of images at a time (about ``chunk_elements`` values per chunk). A channel with no
    variation gets std 1.0 so that normalising by it is harmless."""
    x = images_uint8 if torch.is_tensor(images_uint8) else torch.as_tensor(images_uint8)
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    n, c, h, w = x.shape
    if n == 0:
        raise ValueError("no images to compute statistics from")
    step = max(1, chunk_elements // max(1, c * h * w))
    total = torch.zeros(c, dtype=torch.int64)
    total_sq = torch.zeros(c, dtype=torch.int64)
    for start in range(0, n, step):
        chunk = x[start:start + step].to("cpu")
        total += chunk.sum(dim=(0, 2, 3), dtype=torch.int64)
        wide = chunk.to(torch.int32)
        total_sq += (wide * wide).sum(dim=(0, 2, 3), dtype=torch.int64)
    count = n * h * w
    mean = total.double() / count
    var = (total_sq.double() / count - mean.square()).clamp_min(0.0)
    mean01 = (mean / 255.0).tolist()
    std01 = (var.sqrt() / 255.0).tolist()
    std01 = [s if s > 1e-8 else 1.0 for s in std01]
    return mean01, std01
