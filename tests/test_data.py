"""Tests of twist.data: sources, conversions, bad-file policies, streaming and batch loading.

Every dataset is made here under tmp_path (PIL / numpy); nothing reads /work/shared.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from twist.data import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageDataset,
    batch_loader,
    display_path,
    load_dataset,
    padding_mask,
    real_indices,
)

# ---------------------------------------------------------------------- helpers


def save(path, im: Image.Image, fmt: str | None = None, **kw) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path, fmt, **kw)
    return path


def solid(color, size=(8, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def noise(size=(32, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that only claims to be width x height (IHDR + empty IDAT + IEND): cheap to write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def corrupt_png_bytes() -> bytes:
    """A PNG whose header is fine but whose image data is damaged (CRC / zlib errors)."""
    data = bytearray(png_bytes(noise((32, 32), seed=3)))
    start = data.index(b"IDAT") + 8
    for i in range(start, start + 40):
        data[i] ^= 0xFF
    return bytes(data)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def write(path, data: bytes) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def skipped_names(ds: ImageDataset) -> dict[str, str]:
    return {os.path.basename(p): r for p, r in ds.skipped}


def good_folder(root, n=3) -> None:
    for i in range(n):
        save(root / f"good{i}.png", solid((10 * i, 100, 200)))


# ---------------------------------------------------------------------- sources


def test_folder_labels_from_subfolders_and_nested_recursion(tmp_path):
    save(tmp_path / "dog" / "b.png", solid((0, 255, 0)))
    save(tmp_path / "cat" / "a.png", solid((255, 0, 0)))
    save(tmp_path / "cat" / "c.jpg", solid((250, 0, 0)))
    save(tmp_path / "dog" / "deep" / "deeper" / "d.png", solid((0, 0, 255)))
    write(tmp_path / "dog" / "notes.txt", b"not an image, ignored")
    save(tmp_path / ".hidden" / "x.png", solid((1, 2, 3)))
    os.makedirs(tmp_path / "empty_dir")
    ds = load_dataset(str(tmp_path), progress=False)
    assert ds.kind == "folder" and ds.in_memory
    assert ds.class_names == ["cat", "dog"]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 1, 1]
    assert [os.path.relpath(p, tmp_path) for p in ds.paths] == [
        os.path.join("cat", "a.png"), os.path.join("cat", "c.jpg"),
        os.path.join("dog", "b.png"), os.path.join("dog", "deep", "deeper", "d.png")]
    assert ds.images.shape == (4, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.channels == 3 and ds.size == (8, 8) and len(ds) == 4
    assert ds.images[0, :, 0, 0].tolist() == [255, 0, 0]
    assert ds.images[3, :, 0, 0].tolist() == [0, 0, 255]
    assert ds.skipped == []


def test_folder_without_subfolders_has_no_labels(tmp_path):
    good_folder(tmp_path, 3)
    ds = load_dataset(str(tmp_path), progress=False)
    assert ds.labels is None and ds.class_names is None and len(ds) == 3


def test_top_level_images_beside_class_folders_are_left_out(tmp_path):
    save(tmp_path / "a" / "1.png", solid((1, 1, 1)))
    save(tmp_path / "b" / "2.png", solid((2, 2, 2)))
    save(tmp_path / "stray.png", solid((3, 3, 3)))
    ds = load_dataset(str(tmp_path), bad_files="stop", progress=False)  # not a bad file: no stop
    assert len(ds) == 2 and ds.class_names == ["a", "b"]
    assert "outside the class sub-folders" in skipped_names(ds)["stray.png"]


def test_npz_file_with_and_without_labels(tmp_path):
    x = np.arange(5 * 4 * 6 * 3, dtype=np.uint8).reshape(5, 4, 6, 3)
    np.savez(tmp_path / "with.npz", x=x, y=np.array([3, 1, 0, 2, 1]))
    np.savez(tmp_path / "without.npz", x=x[..., 0])  # (N, H, W) grey
    a = load_dataset(str(tmp_path / "with.npz"))
    assert a.images.shape == (5, 3, 4, 6) and a.images.is_contiguous()
    assert torch.equal(a.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert a.labels.dtype == np.int64 and a.labels.tolist() == [3, 1, 0, 2, 1]
    assert a.kind == "npz" and a.class_names is None
    b = load_dataset(str(tmp_path / "without.npz"), split="test")
    assert b.images.shape == (5, 1, 4, 6) and b.labels is None and b.channels == 1
    assert torch.equal(b.images[:, 0], torch.from_numpy(x[..., 0]))


def test_npz_bad_arrays_raise(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(str(tmp_path / "f.npz"))
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(DataError, match="C = 1 or 3"):
        load_dataset(str(tmp_path / "c.npz"))
    write(tmp_path / "broken.npz", b"this is not a zip")
    with pytest.raises(DataError, match="broken.npz"):
        load_dataset(str(tmp_path / "broken.npz"))


def test_npz_split_dir(tmp_path):
    rng = np.random.default_rng(0)
    parts = {name: rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
             for name, n in [("train_0", 3), ("train_2", 2), ("train_10", 4), ("test", 5), ("trainval", 1)]}
    for name, x in parts.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=np.arange(len(x)) % 3)
    (tmp_path / "classes.txt").write_text("zero\none\ntwo\n")
    train = load_dataset(str(tmp_path), "train")
    expected = np.concatenate([parts["train_0"], parts["train_2"], parts["train_10"]])  # natural order
    assert torch.equal(train.images, torch.from_numpy(expected).permute(0, 3, 1, 2))
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 0]
    assert train.class_names == ["zero", "one", "two"] and train.kind == "npz-splits"
    test = load_dataset(str(tmp_path), "test")
    assert len(test) == 5 and torch.equal(test.images, torch.from_numpy(parts["test"]).permute(0, 3, 1, 2))
    with pytest.raises(DataError, match="no 'val' split"):
        load_dataset(str(tmp_path), "val")


def test_digits():
    ds = load_dataset("digits")
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.uint8
    assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255
    assert ds.labels.shape == (1797,) and set(ds.labels.tolist()) == set(range(10))
    from sklearn.datasets import load_digits

    raw = load_digits().images
    assert torch.equal(ds.images[:, 0], torch.from_numpy(np.rint(raw * 255 / 16).astype(np.uint8)))
    test = load_dataset("digits", split="test")
    assert torch.equal(test.images, ds.images)  # one split: 'test' is the same images
    up = load_dataset("digits", image_size=16)
    assert up.images.shape == (1797, 1, 16, 16) and up.size == (16, 16)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist: .*nowhere"):
        load_dataset(str(tmp_path / "nowhere"))
    assert issubclass(DataError, ValueError)
    os.makedirs(tmp_path / "empty" / "sub")
    with pytest.raises(DataError, match="no images found"):
        load_dataset(str(tmp_path / "empty"), progress=False)
    write(tmp_path / "allbad" / "a.png", b"")
    write(tmp_path / "allbad" / "b.jpg", b"text")
    with pytest.raises(DataError, match="no usable images"):
        load_dataset(str(tmp_path / "allbad"), progress=False)
    write(tmp_path / "file.txt", b"hello")
    with pytest.raises(DataError, match="not a dataset"):
        load_dataset(str(tmp_path / "file.txt"))
    with pytest.raises(DataError, match="bad_files"):
        load_dataset("digits", bad_files="ignore")


# ---------------------------------------------------------------------- sizes and conversions


def test_image_size_resizes_shorter_side_and_centre_crops(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 tall: left half red, right half blue
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    save(tmp_path / "wide.png", Image.fromarray(a))
    save(tmp_path / "tiny.png", solid((9, 99, 199), size=(1, 1)))  # 1x1 is a valid image
    ds = load_dataset(str(tmp_path), image_size=8, progress=False)
    assert ds.size == (8, 8) and ds.images.shape == (2, 3, 8, 8)
    tiny, wide = ds.images[0], ds.images[1]  # sorted: tiny.png, wide.png
    assert (tiny == torch.tensor([9, 99, 199], dtype=torch.uint8)[:, None, None]).all()
    # 40x20 -> 16x8, centre crop columns 4..12: red on the left, blue on the right
    assert wide[:, :, :3].float().sub(torch.tensor([255.0, 0, 0])[:, None, None]).abs().max() <= 2
    assert wide[:, :, 5:].float().sub(torch.tensor([0.0, 0, 255])[:, None, None]).abs().max() <= 2


def test_image_size_zero_keeps_common_size_else_median_shorter_side(tmp_path):
    save(tmp_path / "same" / "a.png", solid((1, 2, 3), size=(6, 4)))
    save(tmp_path / "same" / "b.png", solid((4, 5, 6), size=(6, 4)))
    assert load_dataset(str(tmp_path / "same"), progress=False).size == (4, 6)  # (H, W) kept
    for i, size in enumerate([(10, 10), (30, 20), (40, 50)]):
        save(tmp_path / "mixed" / f"{i}.png", solid((i, i, i), size=size))
    ds = load_dataset(str(tmp_path / "mixed"), progress=False)
    assert ds.size == (20, 20) and ds.images.shape == (3, 3, 20, 20)


def test_mode_conversions(tmp_path):
    save(tmp_path / "cmyk.jpg", solid((0, 255, 255, 0), mode="CMYK"), quality=95)  # red in CMYK
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    save(tmp_path / "palette.png", pal, transparency=1)  # green entry transparent -> white
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    save(tmp_path / "rgba.png", rgba)
    save(tmp_path / "sixteen.png", Image.fromarray(np.array([[0, 1000, 32768, 65535]], np.uint16)))
    save(tmp_path / "grey.png", solid(77, mode="L", size=(2, 2)))
    ds = load_dataset(str(tmp_path), image_size=0, progress=False)
    assert ds.channels == 3 and ds.skipped == []
    by_name = {os.path.basename(p): ds.images[i] for i, p in enumerate(ds.paths)}
    # mixed sizes (median shorter side 1 px): check each file through a folder of its own
    assert set(by_name) == {"cmyk.jpg", "palette.png", "rgba.png", "sixteen.png", "grey.png"}

    def one(name) -> torch.Tensor:
        sub = tmp_path / ("only_" + name.replace(".", "_"))
        os.makedirs(sub)
        os.link(tmp_path / name, sub / name)
        return load_dataset(str(sub), progress=False).images[0]

    cmyk = one("cmyk.jpg")
    assert cmyk.shape[0] == 3 and (cmyk.float() - torch.tensor([255.0, 0, 0])[:, None, None]).abs().max() < 12
    assert one("palette.png")[:, 0].T.tolist() == [[255, 0, 0], [255, 255, 255]]
    assert one("rgba.png")[:, 0].T.tolist() == [[255, 255, 255], [127, 127, 127]]
    sixteen = one("sixteen.png")
    assert sixteen.shape == (1, 1, 4) and sixteen[0, 0].tolist() == [0, 4, 128, 255]  # scaled, not clipped
    grey = one("grey.png")
    assert grey.shape == (1, 2, 2) and (grey == 77).all()
    # grey mixed with colour: 3 channels, grey replicated
    save(tmp_path / "mix" / "g.png", solid(77, mode="L"))
    save(tmp_path / "mix" / "c.png", solid((1, 2, 3)))
    mix = load_dataset(str(tmp_path / "mix"), progress=False)
    assert mix.channels == 3 and (mix.images[1] == 77).all()
    # all grey (L, 1-bit, 16-bit): 1 channel
    save(tmp_path / "allgrey" / "a.png", solid(77, mode="L"))
    save(tmp_path / "allgrey" / "b.png", Image.new("1", (8, 8), 1))
    save(tmp_path / "allgrey" / "c.png", Image.fromarray(np.full((8, 8), 65535, np.uint16)))
    g = load_dataset(str(tmp_path / "allgrey"), progress=False)
    assert g.channels == 1 and g.images[:, 0, 0, 0].tolist() == [77, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (2, 1))
    im.putpixel((0, 0), (255, 0, 0))
    im.putpixel((1, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display: left column becomes the top row
    save(tmp_path / "o.png", im, exif=exif.tobytes())
    ds = load_dataset(str(tmp_path), progress=False)
    assert ds.size == (2, 1)
    assert ds.images[0, :, :, 0].T.tolist() == [[255, 0, 0], [0, 0, 255]]


# ---------------------------------------------------------------------- bad files

BAD_KINDS = {
    "zero.png": lambda d: write(d / "zero.png", b""),
    "text.jpg": lambda d: write(d / "text.jpg", b"just some text, not a JPEG\n"),
    "garbage.png": lambda d: write(d / "garbage.png", bytes(range(256))),
    "corrupt.png": lambda d: write(d / "corrupt.png", corrupt_png_bytes()),
    "trunc.jpg": lambda d: write(d / "trunc.jpg", half(jpeg_bytes(noise((64, 64))))),
    "trunc.png": lambda d: write(d / "trunc.png", half(png_bytes(noise((64, 64))))),
    "huge.png": lambda d: write(d / "huge.png", huge_png_header(100_000, 100_000)),
    "broken.png": lambda d: os.symlink("does-not-exist.png", d / "broken.png"),
    "selfloop.jpg": lambda d: os.symlink("selfloop.jpg", d / "selfloop.jpg"),
    "loop": lambda d: os.symlink("..", d / "loop"),  # links to the dataset root
    "bad\udcff.jpg": lambda d: write(os.fsdecode(os.path.join(os.fsencode(d), b"bad\xff.jpg")), b"\x00" * 64),
}

EXPECTED_REASON = {
    "zero.png": "empty file",
    "text.jpg": "not a recognised image",
    "garbage.png": "not a recognised image",
    "corrupt.png": "corrupt",
    "trunc.jpg": "truncated",
    "trunc.png": "corrupt|truncated",
    "huge.png": "too many pixels",
    "broken.png": "broken symlink",
    "selfloop.jpg": "symlink loop",
    "loop": "symlink loop",
    "bad\udcff.jpg": "not a recognised image",
}


def make_bad_folder(root, kinds) -> None:
    """Class 'a' holds two good images and the bad ones; class 'b' two good ones, one nested."""
    good_folder(root / "a", 2)
    save(root / "b" / "sub" / "good_sub.png", solid((5, 5, 5)))
    save(root / "b" / "caf\udce9.png", solid((6, 6, 6)))  # valid image, non-UTF-8 name: kept
    for kind in kinds:
        BAD_KINDS[kind](root / "a")


def test_bad_files_skip_lists_every_kind_and_keeps_good_images(tmp_path):
    root = tmp_path / "data"
    try:
        make_bad_folder(root, BAD_KINDS)
    except (OSError, UnicodeError) as exc:  # pragma: no cover - filesystems refusing such names
        pytest.skip(f"filesystem refuses a test file: {exc}")
    ds = load_dataset(str(root), bad_files="skip", progress=False)
    assert len(ds) == 4 and ds.class_names == ["a", "b"] and ds.labels.tolist() == [0, 0, 1, 1] and ds.in_memory
    assert sorted(os.path.basename(p) for p in ds.paths) == sorted(["caf\udce9.png", "good0.png", "good1.png",
                                                                    "good_sub.png"])
    names = skipped_names(ds)
    assert set(names) == set(BAD_KINDS), names
    for kind, pattern in EXPECTED_REASON.items():
        assert re.search(pattern, names[kind]), (kind, names[kind])
    # the skipped list is written as valid UTF-8 even with undecodable names
    tsv = ds.write_skipped(tmp_path / "skipped.tsv").read_text(encoding="utf-8")
    assert tsv.startswith("path\treason\n") and len(tsv.splitlines()) == 1 + len(BAD_KINDS)
    assert "bad\\xff.jpg" in tsv
    rows = json.loads(ds.write_skipped(tmp_path / "skipped.json").read_text(encoding="utf-8"))
    assert {os.path.basename(r["path"]) for r in rows} >= {"bad\\xff.jpg", "zero.png"}


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_bad_files_stop_names_the_file(tmp_path, kind):
    root = tmp_path / "data"
    try:
        make_bad_folder(root, [kind])
    except (OSError, UnicodeError) as exc:  # pragma: no cover
        pytest.skip(f"filesystem refuses a test file: {exc}")
    with pytest.raises(DataError) as info:
        load_dataset(str(root), bad_files="stop", progress=False)
    message = str(info.value)
    assert display_path(kind) in message
    message.encode("utf-8")  # printable whatever the file name


def test_pixel_limit_parameter(tmp_path):
    save(tmp_path / "small.png", solid((1, 2, 3), size=(10, 10)))
    save(tmp_path / "big.png", solid((1, 2, 3), size=(40, 40)))
    ds = load_dataset(str(tmp_path), max_pixels=1000, progress=False)
    assert [os.path.basename(p) for p in ds.paths] == ["small.png"]
    assert "too many pixels" in skipped_names(ds)["big.png"]
    with pytest.raises(DataError, match="big.png"):
        load_dataset(str(tmp_path), max_pixels=1000, bad_files="stop", progress=False)


def test_unreadable_file(tmp_path):
    good_folder(tmp_path, 2)
    locked = save(tmp_path / "locked.png", solid((1, 1, 1)))
    os.chmod(locked, 0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running with privileges that ignore file permissions (root)")
        ds = load_dataset(str(tmp_path), progress=False)
        assert len(ds) == 2 and "permission denied" in skipped_names(ds)["locked.png"]
        with pytest.raises(DataError, match="locked.png"):
            load_dataset(str(tmp_path), bad_files="stop", progress=False)
    finally:
        os.chmod(locked, 0o644)


def test_duplicate_directory_link_is_not_followed_twice(tmp_path):
    save(tmp_path / "a" / "x.png", solid((1, 1, 1)))
    os.symlink("a", tmp_path / "b")  # the same folder again: not a second class
    ds = load_dataset(str(tmp_path), bad_files="stop", progress=False)
    assert len(ds) == 1 and ds.class_names == ["a"]
    assert "already included" in skipped_names(ds)["b"]


def test_split_folders_are_classes_with_a_warning_naming_the_train_folder(tmp_path, caplog):
    for split in ("train", "test"):
        save(tmp_path / split / "x.png", solid((1, 1, 1)))
    with caplog.at_level("WARNING"):
        ds = load_dataset(str(tmp_path), progress=False)
    assert ds.class_names == ["test", "train"]
    assert "look like splits" in caplog.text and display_path(str(tmp_path / "train")) in caplog.text


def test_a_listing_made_already_is_used_and_keeps_what_it_left_out(tmp_path, monkeypatch):
    """``load_dataset(listing=...)`` (the auto preset's look at the folder) gives the dataset a
    fresh listing gives, its notes included, without walking the folder again; a listing of
    another folder is not used."""
    from twist.data import folder
    from twist.data.listing import list_tree

    for name in ("a", "c"):
        save(tmp_path / "data" / name / "x.png", solid((1, 1, 1)))
    os.symlink("a", tmp_path / "data" / "b")
    root = str(tmp_path / "data")
    fresh = load_dataset(root, progress=False)
    made = list_tree(root, IMAGE_EXTENSIONS, str)
    save(tmp_path / "other" / "y.png", solid((2, 2, 2)))
    other = list_tree(str(tmp_path / "other"), IMAGE_EXTENSIONS, str)
    walks = []
    real = folder.list_tree
    monkeypatch.setattr(folder, "list_tree", lambda *a: walks.append(a[0]) or real(*a))
    given = load_dataset(root, progress=False, listing=made)
    assert walks == [] and given.class_names == fresh.class_names == ["a", "c"]
    assert np.array_equal(given.labels, fresh.labels) and given.skipped == fresh.skipped
    assert "already included" in skipped_names(given)["b"]
    assert load_dataset(root, progress=False, listing=other).class_names == ["a", "c"] and walks == [root]


# ---------------------------------------------------------------------- streaming


def make_stream_folder(root, n=7) -> None:
    for i in range(n):
        cls = "p" if i % 2 else "q"
        save(root / cls / f"{i}.jpg", noise((24 + i, 20), seed=i), quality=90)
    save(root / "q" / "grey.png", solid(50, mode="L", size=(30, 30)))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_streamed_matches_in_memory(tmp_path, num_workers):
    make_stream_folder(tmp_path)
    mem = load_dataset(str(tmp_path), image_size=16, progress=False)
    stream = load_dataset(str(tmp_path), image_size=16, max_memory_gb=1e-9, progress=False)
    assert mem.in_memory and not stream.in_memory and stream.images is None
    assert stream.paths == mem.paths and np.array_equal(stream.labels, mem.labels)
    assert (stream.channels, stream.size) == (mem.channels, mem.size) == (3, (16, 16))
    got = {}
    loader = batch_loader(stream, 3, shuffle=True, drop_last=False, seed=1, epoch=0, num_workers=num_workers)
    for images, idx in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
        for im, i in zip(images, idx.tolist()):
            got[i] = im
    assert sorted(got) == list(range(len(mem)))
    for i, im in got.items():
        assert torch.equal(im, mem.images[i])
    assert torch.equal(stream.get_batch(np.array([4, 0])), mem.images[[4, 0]])


def test_streamed_decode_failure_replaces_with_batch_neighbour(tmp_path, caplog):
    make_stream_folder(tmp_path, 4)
    ds = load_dataset(str(tmp_path), image_size=8, max_memory_gb=1e-9, progress=False)
    victim = ds.paths.index(str(tmp_path / "p" / "3.jpg"))
    assert victim > 0
    data = open(ds.paths[victim], "rb").read()
    write(ds.paths[victim], data[: len(data) // 2])  # truncated after the scan
    before = ds.get_batch([victim - 1])
    with caplog.at_level("WARNING", logger="twist.data"):
        batch = ds.get_batch([victim - 1, victim])
    assert torch.equal(batch[1], before[0]) and ds.replaced == 1
    assert "truncated" in skipped_names(ds)["3.jpg"]
    os.remove(ds.paths[victim])  # gone entirely; first in its batch: the next image stands in
    batch = ds.get_batch([victim, victim - 1])
    assert torch.equal(batch[0], before[0]) and ds.replaced == 2 and len(ds.skipped) == 1


# ---------------------------------------------------------------------- batch loading


@pytest.fixture()
def indexed(tmp_path) -> ImageDataset:
    """11 images whose every pixel equals their index."""
    x = np.repeat(np.arange(11, dtype=np.uint8), 4).reshape(11, 2, 2, 1)
    np.savez(tmp_path / "idx.npz", x=x)
    return load_dataset(str(tmp_path / "idx.npz"))


def run(loader):
    out = [(images, idx) for images, idx in loader]
    assert len(out) == len(loader)
    for images, idx in out:
        assert idx.dtype == torch.int64
        assert torch.equal(images[:, 0, 0, 0].long(), real_indices(idx))
    return [idx for _, idx in out]


def test_batch_loader_deterministic_per_seed_and_epoch(indexed):
    a = run(batch_loader(indexed, 4, shuffle=True, drop_last=False, seed=3, epoch=1))
    b = run(batch_loader(indexed, 4, shuffle=True, drop_last=False, seed=3, epoch=1))
    c = run(batch_loader(indexed, 4, shuffle=True, drop_last=False, seed=3, epoch=2))
    assert [t.tolist() for t in a] == [t.tolist() for t in b]
    assert torch.cat(a).tolist() != torch.cat(c).tolist()
    assert sorted(torch.cat(a).tolist()) == list(range(11))
    assert [len(t) for t in a] == [4, 4, 3]
    plain = run(batch_loader(indexed, 4, shuffle=False, drop_last=False, seed=0, epoch=0))
    assert torch.cat(plain).tolist() == list(range(11))


def test_batch_loader_two_ranks_disjoint_with_identifiable_padding(indexed):
    per_rank = [torch.cat(run(batch_loader(indexed, 4, shuffle=True, drop_last=False, seed=0, epoch=5,
                                           rank=r, world_size=2))) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 6  # ceil(11 / 2), equal on every rank
    both = torch.cat(per_rank)
    real = both[~padding_mask(both)]
    assert sorted(real.tolist()) == list(range(11))  # every image exactly once
    padded = both[padding_mask(both)]
    assert len(padded) == 1 and 0 <= int(real_indices(padded)) < 11


def test_batch_loader_drop_last(indexed):
    loaders = [batch_loader(indexed, 2, shuffle=True, drop_last=True, seed=0, epoch=0, rank=r, world_size=2)
               for r in range(2)]
    got = [torch.cat(run(lo)) for lo in loaders]
    assert [len(lo) for lo in loaders] == [2, 2]  # 11 -> 10 -> 5 per rank -> 2 full batches of 2
    assert len(got[0]) == len(got[1]) == 4
    assert not set(got[0].tolist()) & set(got[1].tolist()) and (torch.cat(got) >= 0).all()
    single = run(batch_loader(indexed, 4, shuffle=False, drop_last=True, seed=0, epoch=0))
    assert [t.tolist() for t in single] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_get_batch_in_memory_and_range_check(indexed):
    assert torch.equal(indexed.get_batch(torch.tensor([3, 1])), indexed.images[[3, 1]])
    with pytest.raises(IndexError):
        indexed.get_batch([11])
    with pytest.raises(IndexError):
        indexed.get_batch([-1])
