"""One image file -> ``uint8`` ``(C, H, W)``: safe opening (format allow-list, pixel limit), the
header probe of the folder scan, EXIF orientation, 8-bit conversion, resize + centre crop, and
the short printable reason for a file that fails. See the package docstring for the rules."""

from __future__ import annotations

import io
import os
import stat as stat_module

import numpy as np
from PIL import Image, ImageOps

# Only these PIL plugins may open a file, whatever its extension (no EPS/ghostscript etc.).
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "GIF", "TIFF", "WEBP", "PPM")
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def display_path(path: str | os.PathLike | bytes) -> str:
    """``path`` as printable, UTF-8-safe text: undecodable bytes become ``\\xNN``, control
    characters (tab, newline, ...) are escaped. For messages, logs and TSV/JSON/CSV files."""
    if isinstance(path, bytes):
        raw = path
    else:
        path = os.fspath(path)
        try:
            raw = path if isinstance(path, bytes) else os.fsencode(path)
        except UnicodeError:  # lone surrogates that are not escaped bytes
            raw = path.encode("utf-8", errors="backslashreplace")
    text = raw.decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class _BadImage(Exception):
    """A file that opens but must not be used (e.g. too many pixels)."""


def open_image(source: str | bytes, max_pixels: int) -> Image.Image:
    """Open a file (a path) or the bytes of one (a tar member) with the allowed PIL formats only,
    refusing empty files, non-regular files and more than ``max_pixels`` pixels. Reads the header
    only; the caller closes the image."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise _BadImage("empty file (0 bytes)")
        im = Image.open(io.BytesIO(source), formats=_PIL_FORMATS)
    else:
        st = os.stat(source)
        if not stat_module.S_ISREG(st.st_mode):
            raise _BadImage("not a regular file")
        if st.st_size == 0:
            raise _BadImage("empty file (0 bytes)")
        im = Image.open(source, formats=_PIL_FORMATS)
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise _BadImage(f"too many pixels ({w}x{h} > {max_pixels}; decompression-bomb guard)")
    if w < 1 or h < 1:
        im.close()
        raise _BadImage(f"image has no pixels ({w}x{h})")
    return im


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1-8) of an opened image, read from its header; 1 when absent
    or unreadable (what :func:`load_oriented` applies; the device decoder applies it itself)."""
    try:
        if im.format in ("JPEG", "MPO", "TIFF", "WEBP"):
            return int(im.getexif().get(0x0112, 1) or 1)
        raw = im.info.get("exif")  # PNG: only what the header already holds (no full load)
        if raw:
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
        pass
    return 1


def probe_image(path: str | bytes, max_pixels: int) -> tuple[int, int, bool]:
    """(width, height) after EXIF orientation and whether the image is grey; raises when bad."""
    with open_image(path, max_pixels) as im:
        w, h = im.size
        gray = im.mode in _GRAY_MODES
        if exif_orientation(im) in (5, 6, 7, 8):
            w, h = h, w
        im.verify()
    return w, h, gray


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied."""
    w, h = im.size
    return (h, w) if exif_orientation(im) in (5, 6, 7, 8) else (w, h)


def load_oriented(im: Image.Image, channels: int, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode an opened image as 'L' (``channels`` 1) or 'RGB' with its EXIF orientation applied
    (see the package docstring for the conversions). ``draft`` (stored orientation): for JPEGs,
    decode at the smallest DCT scale (1/2, 1/4, 1/8) whose size is still >= it."""
    if draft is not None and im.format in ("JPEG", "MPO"):
        im.draft(None, draft)
    im.load()
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - keep the stored orientation if the EXIF is broken
        pass
    im = _to_8bit(im)
    if channels == 1 and im.mode != "L":
        im = im.convert("L")
    elif channels == 3 and im.mode != "RGB":
        im = im.convert("RGB")
    return im


def decode_image(path: str | bytes, size: tuple[int, int], channels: int, max_pixels: int | None,
                 resize_side: int = 0) -> np.ndarray:
    """One file (or its bytes) as uint8 (channels, H, W): the shorter side resized to cover
    (H, W) (or to ``resize_side`` when larger, the evaluation geometry of photos), then the
    centre (H, W) cropped (see the package docstring for the conversions)."""
    with open_image(path, max_pixels or Image.MAX_IMAGE_PIXELS or 100_000_000) as im:
        side = max(max(size), resize_side)
        im = load_oriented(im, channels, (side, side))  # decode at a reduced scale that is still >= side
    if resize_side > max(size):
        w, h = im.size
        scale = resize_side / min(w, h)
        im = im.resize((max(resize_side, round(w * scale)), max(resize_side, round(h * scale))),
                       Image.Resampling.BICUBIC)
        (H, W), (w, h) = size, im.size
        left, top = (w - W) // 2, (h - H) // 2
        return to_chw(im.crop((left, top, left + W, top + H)))
    return to_chw(resize_crop(im, size))


def _to_8bit(im: Image.Image) -> Image.Image:
    """An 'L' (grey sources) or 'RGB' image: alpha on white, 16-bit scaled, palettes expanded."""
    mode = im.mode
    if mode == "1":
        return im.convert("L")
    if mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        im = Image.fromarray(a.astype(np.uint8), "L")
    elif mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        if a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif "transparency" in im.info and mode in ("P", "L", "RGB"):
        im = im.convert("RGBA" if mode != "L" else "LA")
    elif mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa", "LA", "La"):
        gray = im.mode in ("LA", "La")
        a = np.asarray(im.convert("LA" if gray else "RGBA")).astype(np.uint32)
        alpha = a[..., -1:]
        blended = (a[..., :-1] * alpha + 255 * (255 - alpha) + 127) // 255
        blended = blended.astype(np.uint8)
        return Image.fromarray(blended[..., 0] if gray else blended, "L" if gray else "RGB")
    if im.mode in ("L", "RGB"):
        return im
    return im.convert("RGB")


def resize_crop(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so that the image covers (H, W) keeping its aspect ratio, then centre-crop."""
    H, W = size
    w, h = im.size
    if (w, h) == (W, H):
        return im
    scale = max(W / w, H / h)
    nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - W) // 2, (nh - H) // 2
    return im.crop((left, top, left + W, top + H))


def to_chw(im: Image.Image) -> np.ndarray:
    a = np.asarray(im)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def failure_reason(exc: BaseException) -> str:
    """A short, printable reason for a failed file."""
    import errno

    if isinstance(exc, _BadImage):
        return str(exc)
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels (decompression-bomb guard): {exc}"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not a recognised image (unknown format or corrupt header)"
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        if exc.errno == errno.ENOENT:
            return "missing file or broken symlink"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        return display_path(os.strerror(exc.errno))
    text = display_path(str(exc)) or type(exc).__name__
    if "truncated" in text.lower():
        return f"truncated image ({text})"
    return f"corrupt or unreadable image ({type(exc).__name__}: {text})"
