"""The colour steps of the augmentation as one compiled pass per image, for CPUs (numba).

:class:`twist.augment.MultiCropAugment` runs its steps 2-7 (colour jitter in a shuffled order,
grey, Gaussian blur, solarize, normalise) as batched tensor operations: right for a GPU, where
each is one kernel launch over the batch, but on a CPU they make about 30 passes over every
image (the hue rotation alone a dozen), and even in cache-sized chunks those passes were most
of a photo loader's CPU time (docs/benchmarks.md, "Session 15"). Here the same formulas run
per pixel in compiled loops over tiles of about a thousand pixels that stay in the L1 cache:
one pass fills the tile (uint8 -> [0, 1], flipped), applies the jitter operations before the
contrast and sums the grey level the contrast needs; a second applies the contrast, the rest of
the jitter and grey; the blur makes its two separable passes; a last pass solarizes and
normalises (folded into the second when an image is not blurred). Measured 4-5x faster than
the tensor path on one core (``benchmarks/augment_speed.py --photometric``).

The arithmetic is that of the tensor functions in :mod:`twist.augment` (``adjust_brightness``,
``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``, ``rgb_to_grayscale``, ``solarize``,
the shifted-tap blur with reflect padding), in float32 and in the same order; only the
contrast's mean is summed differently (float32 partial sums of 256 pixels added in float64,
where torch sums its own way), so the two paths agree to about 1e-6 (tests/test_fused_colour.py
compares them on every preset's recipe), not bit for bit. Images are independent: a batch's
result does not depend on how it is split.

numba compiles the kernels on first use (5-9 s here, then cached on disk, ``cache=True``; where no
cache folder can be written, in every process).
Without numba (:func:`available` is false: not installed, or a Python it does not support yet)
the tensor path runs instead. The kernel is single-threaded: at 224 px it costs about 0.5 ms
per image for two views, small next to a CPU training step, and with two threads on two cores it
still beats the tensor path's two threads (docs/benchmarks.md). Splitting a batch over Python
threads (the kernel releasing the GIL) was tried and was slower there: torch's OpenMP threads
keep spinning after each operation and take the cores the kernel's threads need.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # the tensor path of twist.augment is used instead
    numba = None

__all__ = ["available", "colour_views"]

_F32 = np.float32
_ZERO, _ONE, _TWO, _THREE, _FOUR, _SIX = _F32(0), _F32(1), _F32(2), _F32(3), _F32(4), _F32(6)
_SIXTH = _F32(1.0 / 6.0)
_TINY = _F32(1e-12)  # adjust_hue's floor under the chroma
_TILE = 1024  # pixels per tile: three channels of float32 in 12 KiB
_SUM_BLOCK = 256  # pixels per float32 partial sum of the contrast's mean


def available() -> bool:
    """Whether the compiled path can run (numba imports)."""
    return numba is not None


def _jit(**options):
    """numba's ``njit`` with its on-disk cache where one can be written (beside this file or in
    the user's cache folder); without one (a read-only install and no writable home) numba
    refuses ``cache=True`` when decorating, and the kernels are compiled in every process instead."""
    if numba is None:
        return lambda fn: fn

    def decorate(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(**options)(fn)

    return decorate


@_jit(inline="always")
def _clamp01(v):
    return min(max(v, _ZERO), _ONE)


@_jit()
def _jitter_op(kind, f, r, g, b, c, gw):
    """Jitter operation ``kind`` (0 brightness, 2 saturation, 3 hue; contrast is :func:`_contrast`)
    with factor ``f`` on one tile's channels ``r, g, b`` (all three the same plane when c == 1)."""
    n = r.shape[0]
    if kind == 0:  # clamp(x * f, 0, 1)
        for i in range(n):
            r[i] = _clamp01(r[i] * f)
        if c == 3:
            for i in range(n):
                g[i] = _clamp01(g[i] * f)
                b[i] = _clamp01(b[i] * f)
    elif kind == 2 and c == 3:  # blend with the grey level
        keep = _ONE - f
        for i in range(n):
            grey = (r[i] * gw[0] + g[i] * gw[1] + b[i] * gw[2]) * keep
            r[i] = _clamp01(r[i] * f + grey)
            g[i] = _clamp01(g[i] * f + grey)
            b[i] = _clamp01(b[i] * f + grey)
    elif kind == 3 and c == 3:  # hue rotation through HSV, adjust_hue's closed form
        shift = f * _SIX
        for i in range(n):
            rr, gg, bb = r[i], g[i], b[i]
            top = max(max(rr, gg), bb)
            low = min(min(rr, gg), bb)
            delta = top - low
            h = (rr - gg) + delta * _FOUR
            if gg >= top:
                h = (bb - rr) + delta * _TWO
            if rr >= top:
                h = gg - bb
            h = h / max(delta, _TINY) + shift
            h = h - np.floor(h * _SIXTH) * _SIX
            base = low - delta
            r[i] = base + min(max(abs(h - _THREE), _ONE), _TWO) * delta
            g[i] = base + min(max(abs(abs(h - _TWO) - _THREE), _ONE), _TWO) * delta
            b[i] = base + min(max(abs(abs(h - _FOUR) - _THREE), _ONE), _TWO) * delta


@_jit(fastmath={"reassoc", "nsz"})
def _grey_sum32(r, g, b, c, gw):
    """Sum of a block's grey levels in float32 (reassociated, so that it vectorises)."""
    s = _F32(0)
    if c == 3:
        for i in range(r.shape[0]):
            s += r[i] * gw[0] + g[i] * gw[1] + b[i] * gw[2]
    else:
        for i in range(r.shape[0]):
            s += r[i]
    return s


@_jit()
def _grey_sum(r, g, b, c, gw):
    total = 0.0
    for lo in range(0, r.shape[0], _SUM_BLOCK):
        hi = min(r.shape[0], lo + _SUM_BLOCK)
        total += _grey_sum32(r[lo:hi], g[lo:hi], b[lo:hi], c, gw)
    return total


@_jit()
def _contrast(f, mean, r, g, b, c):
    """Blend with the image's mean grey level ``mean``: clamp(x * f + mean * (1 - f), 0, 1)."""
    m = mean * (_ONE - f)
    for i in range(r.shape[0]):
        r[i] = _clamp01(r[i] * f + m)
    if c == 3:
        for i in range(r.shape[0]):
            g[i] = _clamp01(g[i] * f + m)
            b[i] = _clamp01(b[i] * f + m)


@_jit()
def _fill(src, x, y0, y1, flip):
    """Rows y0:y1 of the uint8 image ``src`` into ``x`` as x / 255, mirrored when ``flip``."""
    for ch in range(x.shape[0]):
        for y in range(y0, y1):
            out = x[ch, y]
            inp = src[ch, y, ::-1] if flip else src[ch, y]
            for i in range(out.shape[0]):
                out[i] = _F32(inp[i]) / _F32(255)


@_jit()
def _tail(xf, lo, hi, c, solar, mean, inv_std, normalise):
    """Solarize (x - max(2x - 1, 0)) and normalise ((x - mean) * inv_std) pixels lo:hi."""
    for ch in range(c):
        p = xf[ch, lo:hi]
        if solar:
            for i in range(p.shape[0]):
                p[i] = p[i] - max(p[i] * _TWO - _ONE, _ZERO)
        if normalise:
            mu, s = mean[ch], inv_std[ch]
            for i in range(p.shape[0]):
                p[i] = (p[i] - mu) * s


@_jit()
def _blur(x, w, r, pad, rows):
    """Separable blur of the (C, H, W) image ``x`` in place with the symmetric kernel ``w``
    (centre at len(w) // 2, taps to radius ``r``), reflect padding: along x into ``rows``, then
    along y back into ``x``; the sums pair the taps as the tensor path does,
    ``centre * w0 + sum_k (left_k + right_k) * w_k``."""
    c, h, wd = x.shape
    k0 = w.shape[0] // 2
    for ch in range(c):
        plane = x[ch]
        for y in range(h):
            row = plane[y]
            for i in range(wd):
                pad[r + i] = row[i]
            for i in range(1, r + 1):
                pad[r - i] = row[i]
            for i in range(1, r + 1):
                pad[r + wd - 1 + i] = row[wd - 1 - i]
            out, centre, wc = rows[y], pad[r:r + wd], w[k0]
            for i in range(wd):
                out[i] = centre[i] * wc
            for k in range(1, r + 1):
                left, right, wk = pad[r - k:r - k + wd], pad[r + k:r + k + wd], w[k0 + k]
                for i in range(wd):
                    out[i] += (left[i] + right[i]) * wk
        for y in range(h):
            out, centre, wc = plane[y], rows[y], w[k0]
            for i in range(wd):
                out[i] = centre[i] * wc
            for k in range(1, r + 1):
                above, below = y - k, y + k
                above = -above if above < 0 else above
                below = 2 * (h - 1) - below if below >= h else below
                up, down, wk = rows[above], rows[below], w[k0 + k]
                for i in range(wd):
                    out[i] += (up[i] + down[i]) * wk


@_jit()
def _colour_image(src, x, flip, f, order, grey, w, r, solar, mean, inv_std, normalise, gw, pad, rows):
    """Steps 2-7 of one (C, H, W) image ``x`` (filled from ``src`` first when ``src`` has rows)."""
    c, h, wd = x.shape
    xf = x.reshape(c, h * wd)
    tile = max(1, _TILE // wd)  # whole rows, so that a flipped fill stays within the tile
    split = order.shape[0]  # the contrast needs the mean after the operations before it
    for j in range(order.shape[0]):
        if order[j] == 1:
            split = j
    total = 0.0
    for y0 in range(0, h, tile):
        y1 = min(h, y0 + tile)
        if src.shape[0] > 0:
            _fill(src, x, y0, y1, flip)
        lo, hi = y0 * wd, y1 * wd
        red, green, blue = xf[0, lo:hi], xf[min(1, c - 1), lo:hi], xf[min(2, c - 1), lo:hi]
        for j in range(split):
            _jitter_op(order[j], f[order[j]], red, green, blue, c, gw)
        if split < order.shape[0]:
            total += _grey_sum(red, green, blue, c, gw)
    mean_grey = _F32(total / (h * wd))
    for y0 in range(0, h, tile):
        lo, hi = y0 * wd, min(h, y0 + tile) * wd
        red, green, blue = xf[0, lo:hi], xf[min(1, c - 1), lo:hi], xf[min(2, c - 1), lo:hi]
        if split < order.shape[0]:
            _contrast(f[1], mean_grey, red, green, blue, c)
            for j in range(split + 1, order.shape[0]):
                _jitter_op(order[j], f[order[j]], red, green, blue, c, gw)
        if grey and c == 3:
            for i in range(red.shape[0]):
                v = red[i] * gw[0] + green[i] * gw[1] + blue[i] * gw[2]
                red[i] = v
                green[i] = v
                blue[i] = v
        if r == 0:
            _tail(xf, lo, hi, c, solar, mean, inv_std, normalise)
    if r > 0:
        _blur(x, w, r, pad, rows)
        for y0 in range(0, h, tile):
            _tail(xf, y0 * wd, min(h, y0 + tile) * wd, c, solar, mean, inv_std, normalise)


@_jit()
def _colour_batch(src, x, flip, factors, order, grey, weights, radius, solar, mean, inv_std, normalise, gw):
    m, c, h, wd = x.shape
    f = np.empty(4, np.float32)
    pad = np.empty(wd + 2 * (weights.shape[1] // 2), np.float32)
    rows = np.empty((h, wd), np.float32)
    no_src = np.empty((0, 1, 1), np.uint8)
    for i in range(m):
        for k in range(4):
            f[k] = factors[k, i]
        _colour_image(src[i] if src.shape[0] > 0 else no_src, x[i], flip[i], f, order, grey[i], weights[i],
                      radius[i], solar[i], mean, inv_std, normalise, gw, pad, rows)


def colour_views(x: np.ndarray, source: np.ndarray | None, flip: np.ndarray, factors: np.ndarray,
                 order: np.ndarray, grey: np.ndarray, weights: np.ndarray, radius: np.ndarray,
                 solar: np.ndarray, mean: np.ndarray, inv_std: np.ndarray, normalise: bool,
                 grey_weights: tuple[float, float, float]) -> None:
    """Steps 2-7 in place on ``x``, float32 (M, C, H, W), image by image.

    ``source``: uint8 (M, C, H, W) to fill ``x`` from (scaled to [0, 1], mirrored where ``flip``,
    bool (M,)), or None when ``x`` holds the cropped views already (``flip`` is then ignored).
    ``factors``: (4, M) brightness, contrast, saturation, hue shift per image, applied in
    ``order`` (the jitter operations' indices 0-3 in their drawn order; empty: no jitter).
    ``grey``, ``solar``: bool (M,). ``weights``: (M, K) blur kernels, centred, zero beyond each
    image's ``radius`` (int (M,); 0: not blurred). ``mean``/``inv_std``: per channel;
    ``normalise`` false leaves x in [0, 1] (when random erasing comes before normalising).
    """
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 4 and x.flags.c_contiguous
            and x.flags.writeable):
        raise ValueError("colour_views needs x as a writable C-contiguous float32 (M, C, H, W) array, got "
                         f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
    m, c = x.shape[:2]
    f32 = np.float32
    _colour_batch(np.empty((0, c, 1, 1), np.uint8) if source is None else np.ascontiguousarray(source, np.uint8),
                  x, np.zeros(m, np.bool_) if source is None else np.ascontiguousarray(flip, np.bool_),
                  np.ascontiguousarray(factors, f32), np.ascontiguousarray(order, np.int64),
                  np.ascontiguousarray(grey, np.bool_), np.ascontiguousarray(weights, f32),
                  np.ascontiguousarray(radius, np.int64), np.ascontiguousarray(solar, np.bool_),
                  np.ascontiguousarray(mean, f32), np.ascontiguousarray(inv_std, f32), bool(normalise),
                  np.asarray(grey_weights, f32))
