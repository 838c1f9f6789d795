"""Photos at full size: crop boxes drawn at decode time, views cut from the original file, the
scandir listing and its run-folder index, evaluation crops, tar shards."""

from __future__ import annotations

import builtins
import dataclasses
import io
import os
import tarfile
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

import twist.data.folder as folder_module
from twist.augment import MultiCropAugment
from twist.config import AugmentConfig
from twist.data import ViewPlan, batch_loader, load_dataset
from twist.data.crops import crop_box, draft_factor, image_generator, plan_boxes
from twist.data.listing import list_tree
from twist.data.views import decode_views

RATIO = (3 / 4, 4 / 3)


def photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = (rng.random((max(2, h // 16), max(2, w // 16), 3)) * 255).astype(np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)


def photo_folder(root, n_per_class=6, classes=2, fmt="JPEG") -> None:
    ext = ".jpg" if fmt == "JPEG" else ".png"
    for c in range(classes):
        os.makedirs(root / f"c{c}", exist_ok=True)
        for i in range(n_per_class):
            photo(120 + 17 * i, 90 + 11 * c, seed=10 * c + i).save(root / f"c{c}" / f"im{i}{ext}", fmt)


def streamed(root, **kw):
    return load_dataset(root if isinstance(root, list) else str(root), "train", image_size=32, max_memory_gb=1e-9, progress=False, **kw)


PLAN = ViewPlan.multicrop(32, 16, 2, (0.4, 1.0), (0.05, 0.4), RATIO, "bicubic", seed=3)


# ---------------------------------------------------------------------- crop boxes
def test_crop_boxes_equal_torchvision_for_the_same_seed():
    from torchvision.transforms import RandomResizedCrop

    cases = [((375, 500), (0.08, 1.0), RATIO), ((96, 64), (0.05, 0.4), RATIO), ((224, 224), (0.4, 1.0), RATIO),
             ((30, 300), (0.9, 1.0), RATIO), ((300, 20), (0.5, 1.0), (0.5, 2.0)), ((50, 50), (1.0, 1.0), (2.0, 3.0))]
    fallbacks = 0
    for seed in range(1200):
        (h, w), scale, ratio = cases[seed % len(cases)]
        torch.manual_seed(seed)
        ref = tuple(int(v) for v in RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), list(ratio)))
        box = crop_box(h, w, scale, ratio, torch.Generator().manual_seed(seed))
        assert box == ref, (seed, h, w, scale, ratio)
        fallbacks += box[2:] == (h, w) or (box[3] == w and box[2] < h * scale[0])
    assert fallbacks > 0  # the centre-crop fallback was exercised too


def test_some_crop_touches_every_edge():
    g = torch.Generator().manual_seed(0)
    boxes = [crop_box(375, 500, (0.08, 1.0), RATIO, g) for _ in range(3000)]
    assert any(left == 0 for _, left, _, _ in boxes)
    assert any(left + w == 500 for _, left, _, w in boxes)
    assert any(top == 0 for top, _, _, _ in boxes)
    assert any(top + h == 375 for top, _, h, _ in boxes)


def test_image_generator_depends_on_seed_epoch_and_index_only():
    def draw(*key):
        return torch.rand(4, generator=image_generator(*key))

    assert torch.equal(draw(0, 1, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 1, 5), draw(0, 2, 5))
    assert not torch.equal(draw(0, 1, 5), draw(0, 1, 6))
    assert not torch.equal(draw(0, 1, 5), draw(1, 1, 5))


def test_draft_factor_keeps_every_box_at_least_its_view():
    assert draft_factor([(0, 0, 900, 1200), (0, 0, 100, 120)], (224, 96)) == 1
    assert draft_factor([(0, 0, 900, 1200), (0, 0, 400, 500)], (224, 96)) == 4
    assert draft_factor([(0, 0, 2000, 2000)], (224,)) == 8
    assert draft_factor([(0, 0, 50, 50)], (224,)) == 1  # upsampled: full resolution


# ---------------------------------------------------------------------- views from a file
def test_views_are_the_boxes_of_the_original_resized(tmp_path):
    im = photo(150, 100, seed=1)
    path = tmp_path / "a.png"
    im.save(path)
    views = decode_views(str(path), PLAN, image_generator(3, 0, 7), 3, 10**8)
    boxes = plan_boxes(PLAN, 100, 150, image_generator(3, 0, 7))
    assert [v.shape for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    for view, (top, left, h, w), size in zip(views, boxes, PLAN.sizes):
        # torchvision's PIL resized_crop of the same box; the resize is torch's port of PIL's
        # antialiased filter, so they agree to rounding (PIL rounds its first pass to 8 bits)
        ref = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)))
        diff = np.abs(view.astype(int) - ref.transpose(2, 0, 1).astype(int))
        assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 2, (diff.mean(), diff.max())
    shifted = decode_views(str(path), PLAN, image_generator(3, 0, 8), 3, 10**8)  # another draw: other pixels
    assert any(np.abs(a.astype(int) - b.astype(int)).mean() > 5 for a, b in zip(views, shifted))


def test_reduced_jpeg_decoding_is_used_and_close_to_full(tmp_path):
    im = photo(1600, 1200, seed=2)
    path = tmp_path / "big.jpg"
    im.save(path, quality=95)
    plan = ViewPlan.multicrop(64, 32, 0, (0.5, 1.0), (0.05, 0.4), RATIO, "bilinear", seed=0)
    boxes = plan_boxes(plan, 1200, 1600, image_generator(0, 0, 0))
    factor = draft_factor(boxes, plan.sizes)
    assert factor > 1
    views = decode_views(str(path), plan, image_generator(0, 0, 0), 3, 10**8)
    full = Image.open(path).convert("RGB")
    f = 1600 // factor / 1600  # the reduced decode's scale (1600 and 1200 divide by 2, 4 and 8)
    for view, (top, left, h, w) in zip(views, boxes):
        # the box in decoded pixels is rounded to whole pixels: map that box back to the original
        t, b, l, r = (round(v * f) / f for v in (top, top + h, left, left + w))
        assert max(abs(t - top), abs(l - left), abs(b - top - h), abs(r - left - w)) <= factor / 2
        ref = np.asarray(full.resize((64, 64), Image.Resampling.BILINEAR, box=(l, t, r, b)))
        assert np.abs(view.transpose(1, 2, 0).astype(float) - ref).mean() < 4.0  # only DCT scaling differs


def test_exif_rotated_photo_boxes_come_from_the_upright_size(tmp_path):
    im = photo(160, 90, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright it is 90 wide, 160 high
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    views = decode_views(str(tmp_path / "r.jpg"), PLAN, image_generator(3, 0, 1), 3, 10**8)
    boxes = plan_boxes(PLAN, 160, 90, image_generator(3, 0, 1))
    assert all(top + h <= 160 and left + w <= 90 for top, left, h, w in boxes)
    assert len(views) == PLAN.num_views


# ---------------------------------------------------------------------- loader
@pytest.mark.parametrize("workers", [2])
def test_same_views_with_0_and_2_workers(tmp_path, workers):
    photo_folder(tmp_path)
    ds = streamed(tmp_path)
    assert not ds.in_memory

    def epoch(nw):
        return [(views, idx) for views, idx in batch_loader(ds, 4, shuffle=True, drop_last=True, seed=0, epoch=1,
                                                           num_workers=nw, views=PLAN)]

    a, b = epoch(0), epoch(workers)
    assert len(a) == len(b) == 3
    for (va, ia), (vb, ib) in zip(a, b):
        assert torch.equal(ia, ib)
        assert all(torch.equal(x, y) for x, y in zip(va, vb))
    # another epoch: other crops of the same images
    c = [views for views, _ in batch_loader(ds, 4, shuffle=False, drop_last=True, seed=0, epoch=2, views=PLAN)]
    d = [views for views, _ in batch_loader(ds, 4, shuffle=False, drop_last=True, seed=0, epoch=3, views=PLAN)]
    assert not torch.equal(c[0][0], d[0][0])


def test_in_memory_data_ignores_views(tmp_path):
    photo_folder(tmp_path, fmt="PNG")
    ds = load_dataset(str(tmp_path), "train", image_size=32, progress=False)
    assert ds.in_memory
    (images, _), = list(batch_loader(ds, 12, shuffle=False, drop_last=True, seed=0, epoch=0, views=PLAN))
    assert torch.equal(images, ds.images)


def test_bad_file_at_decode_time_is_replaced_and_listed(tmp_path):
    photo_folder(tmp_path)
    (tmp_path / "c0" / "im0.jpg").write_bytes(b"not a jpeg at all")
    ds = streamed(tmp_path)
    assert len(ds) == 12  # listed, not opened: the bad file is found when decoded
    batches = list(batch_loader(ds, 12, shuffle=False, drop_last=True, seed=0, epoch=0, views=PLAN))
    views, _ = batches[0]
    assert ds.replaced == 1 and any("im0.jpg" in p for p, _ in ds.skipped)
    assert torch.equal(views[0][0], views[0][1])  # the first slot got its neighbour's views


def test_photometric_equals_the_full_pipeline_on_whole_image_crops():
    # with crops of the whole image at the view size, the batched pipeline's resampling is the
    # identity: then photometric() on the same images must give the same views for the same draws
    cfg = AugmentConfig(global_size=24, local_size=24, num_local=2, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
                        ratio=(1.0, 1.0), interpolation="bilinear", blur_p=(1.0, 0.5, 0.5), solarize_p=(0.0, 0.5, 0.3))
    x = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    aug = MultiCropAugment(cfg, 3, resample="grid")
    full = aug(x, torch.Generator().manual_seed(5))
    cut = aug.photometric([x] * 4, torch.Generator().manual_seed(5))
    for a, b in zip(full, cut):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="rotated"):
        MultiCropAugment(dataclasses.replace(cfg, rotation=10.0), 3).photometric([x] * 4)


def test_streamed_memory_does_not_grow_with_epochs(tmp_path):
    photo_folder(tmp_path)
    ds = streamed(tmp_path)

    def one_epoch(epoch):
        for _ in batch_loader(ds, 4, shuffle=True, drop_last=True, seed=0, epoch=epoch, views=PLAN):
            pass

    one_epoch(0)
    tracemalloc.start()
    try:
        one_epoch(1)
        after_one = tracemalloc.get_traced_memory()[0]
        for e in range(2, 6):
            one_epoch(e)
        after_five = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert ds.images is None
    assert after_five - after_one < 256 * 1024  # nothing kept per epoch


# ---------------------------------------------------------------------- evaluation crops
def test_streamed_evaluation_is_resize_then_centre_crop(tmp_path):
    os.makedirs(tmp_path / "a")
    im = photo(200, 120, seed=4)
    im.save(tmp_path / "a" / "x.png")
    im.save(tmp_path / "a" / "y.png")
    ds = streamed(tmp_path, crop_size=56)
    assert ds.size == (56, 56) and ds.resize_side == 64
    got = ds.get_batch([0])[0].numpy().transpose(1, 2, 0)
    side = im.resize((round(200 * 64 / 120), 64), Image.Resampling.BICUBIC)
    left, top = (side.width - 56) // 2, (64 - 56) // 2
    np.testing.assert_array_equal(got, np.asarray(side.crop((left, top, left + 56, top + 56))))


# ---------------------------------------------------------------------- listing and index
def test_listing_opens_no_file(tmp_path, monkeypatch):
    photo_folder(tmp_path, n_per_class=3)
    (tmp_path / "c1" / "notes.txt").write_text("x")

    def refuse(*a, **k):
        raise AssertionError(f"a file was opened: {a[:1]}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(Image, "open", refuse)
    listing = list_tree(str(tmp_path), folder_module.IMAGE_EXTENSIONS, refuse)
    paths, runs = listing.paths, listing.runs
    monkeypatch.undo()
    assert [os.path.relpath(p, tmp_path) for p in paths] == [f"c{c}/im{i}.jpg" for c in range(2) for i in range(3)]
    assert runs == [("c0", 3), ("c1", 3)]


def test_listing_fast_path_keeps_the_rules(tmp_path):
    """Folders whose names all share one image extension skip the per-name filter; every other
    folder gets it. Both must give what the rules say (hidden names, case, the last extension,
    folders named like images, files beside folders), in path-part order."""
    layout = {
        "a/leaf": ["x1.jpg", "x0.jpg", "X2.JPG"],                      # one extension, mixed case
        "a/mixed": ["p.png", "q.jpeg", "notes.txt", ".hidden.jpg", "r.tar.gz", "s.jpg.txt", "t.txt.jpg", "u."],
        "b": ["z.webp", "y.tif"],
        "c/d.jpg": ["inner.jpg"],                                     # a folder named like an image
        "c": ["c1.jpg"],                                              # a file beside that folder
        "e/.git": ["objects.jpg"],                                    # a hidden folder
        "e": ["only.jpg", "Only.Jpg"],
    }
    for folder, names in layout.items():
        os.makedirs(tmp_path / folder, exist_ok=True)
        for name in names:
            (tmp_path / folder / name).write_bytes(b"x")
    (tmp_path / "top.jpg").write_bytes(b"x")
    listing = list_tree(str(tmp_path), folder_module.IMAGE_EXTENSIONS, str)
    paths, runs = listing.paths, listing.runs
    expected = []
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in folder_module.IMAGE_EXTENSIONS:
                expected.append(os.path.join(dirpath, name))
    expected.sort(key=lambda p: os.path.relpath(p, tmp_path).split(os.sep))
    assert paths == expected
    assert [os.path.relpath(p, tmp_path) for p in paths][:3] == ["a/leaf/X2.JPG", "a/leaf/x0.jpg", "a/leaf/x1.jpg"]
    assert "c/d.jpg/inner.jpg" in [os.path.relpath(p, tmp_path) for p in paths]
    tops = [top for top, n in runs for _ in range(n)]
    assert tops == [os.path.relpath(p, tmp_path).split(os.sep)[0] if os.sep in os.path.relpath(p, tmp_path) else ""
                    for p in paths]


def test_streamed_load_opens_only_a_header_sample(tmp_path, monkeypatch):
    photo_folder(tmp_path, n_per_class=40)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    ds = streamed(tmp_path)
    assert len(ds) == 80 and 0 < len(opened) <= folder_module.SAMPLE_HEADERS < 80


def test_resume_reads_the_index_and_lists_nothing(tmp_path, monkeypatch):
    data = tmp_path / "data"
    photo_folder(data)
    index = tmp_path / "run" / "data_index.json"
    first = streamed(data, index_path=index, crop_size=32)
    assert index.exists()

    def no_listing(*a, **k):
        raise AssertionError("listed again")

    monkeypatch.setattr(folder_module, "list_tree", no_listing)
    again = streamed(data, index_path=index, crop_size=32)
    assert again.paths == first.paths and np.array_equal(again.labels, first.labels)
    assert again.class_names == first.class_names and again.size == first.size
    monkeypatch.undo()
    # a new image in a class folder changes that folder's modification time: listed again
    photo(100, 100, seed=9).save(data / "c1" / "new.jpg")
    assert len(streamed(data, index_path=index, crop_size=32)) == len(first) + 1
    # deeper down too: every folder walked is recorded, not only the first level
    os.makedirs(data / "c0" / "sub" / "deeper")
    photo(100, 100, seed=10).save(data / "c0" / "sub" / "deeper" / "a.jpg")
    assert len(streamed(data, index_path=index, crop_size=32)) == len(first) + 2
    os.utime(data / "c0" / "sub" / "deeper", ns=(1, 1))  # as if the deep folder had changed
    listed = []
    monkeypatch.setattr(folder_module, "list_tree", lambda *a, **k: listed.append(1) or list_tree(*a, **k))
    assert len(streamed(data, index_path=index, crop_size=32)) == len(first) + 2 and listed == [1]
    assert len(streamed(data, index_path=index, crop_size=32)) == len(first) + 2 and listed == [1]  # reused


def test_scan_full_checks_headers_before_training(tmp_path):
    photo_folder(tmp_path)
    (tmp_path / "c0" / "im0.jpg").write_bytes(b"not a jpeg at all")
    ds = streamed(tmp_path, scan="full")
    assert len(ds) == 11 and any("im0.jpg" in p for p, _ in ds.skipped)
    with pytest.raises(Exception, match="scan"):
        streamed(tmp_path, scan="everything")


# ---------------------------------------------------------------------- tar shards
def make_shards(folder, out, per_shard=5):
    """The folder's images as WebDataset-style shards (KEY.jpg + KEY.cls), in the folder's order."""
    ds = streamed(folder)
    os.makedirs(out, exist_ok=True)
    for s in range(0, len(ds), per_shard):
        with tarfile.open(out / f"shard-{s // per_shard:03d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, len(ds))):
                for ext, data in ((".jpg", open(ds.paths[i], "rb").read()), (".cls", str(int(ds.labels[i])).encode())):
                    info = tarfile.TarInfo(f"sample{i:04d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return ds


def test_tar_shards_give_the_folder_images(tmp_path):
    photo_folder(tmp_path / "f")
    folder = make_shards(tmp_path / "f", tmp_path / "shards")
    for spec in (str(tmp_path / "shards"), sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")),
                 ",".join(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")))):
        tar = streamed(spec, crop_size=32)
        assert tar.kind == "shards" and len(tar) == len(folder) and not tar.in_memory
        np.testing.assert_array_equal(tar.labels, folder.labels)
    ref = streamed(tmp_path / "f", crop_size=32)
    assert torch.equal(tar.get_batch(range(len(tar))), ref.get_batch(range(len(ref))))
    for (va, ia), (vb, ib) in zip(
            batch_loader(tar, 4, shuffle=True, drop_last=True, seed=1, epoch=0, views=PLAN, num_workers=2),
            batch_loader(ref, 4, shuffle=True, drop_last=True, seed=1, epoch=0, views=PLAN)):
        assert torch.equal(ia, ib) and all(torch.equal(x, y) for x, y in zip(va, vb))


def test_tar_shard_bad_member_is_replaced(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for i, data in enumerate([b"junk", _jpeg(photo(60, 40, 0))] * 2):
            info = tarfile.TarInfo(f"k{i}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = streamed(str(tmp_path / "a.tar"))
    assert len(ds) == 4 and ds.labels is None
    list(batch_loader(ds, 4, shuffle=False, drop_last=True, seed=0, epoch=0, views=PLAN))
    assert ds.replaced == 2 and all("a.tar/k" in p for p, _ in ds.skipped)


def _jpeg(im):
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    return buf.getvalue()


# ---------------------------------------------------------------------- training on streamed photos
def test_training_on_streamed_photos_cuts_views_and_resumes_from_the_index(tmp_path, monkeypatch):
    from twist.checkpoint import load_checkpoint
    from twist.presets import get_preset
    from twist.train import DATA_INDEX_NAME, train

    photo_folder(tmp_path / "data", n_per_class=8)
    cfg = get_preset("cifar10")
    cfg.augment.num_local = 2
    cfg.train.max_memory_gb = 1e-9
    cfg.train.batch_size = 8
    cfg.train.epochs = 2
    cfg.train.device = "cpu"
    cfg.train.precision = "fp32"
    cfg.train.eval_every = 1
    calls = []
    real = MultiCropAugment.photometric
    monkeypatch.setattr(MultiCropAugment, "photometric", lambda self, v, g=None: calls.append(len(v)) or real(self, v, g))
    out = tmp_path / "run"
    train(cfg, str(tmp_path / "data"), out, progress=False, max_steps=2)
    assert calls and calls[0] == 4 and (out / DATA_INDEX_NAME).exists()
    data = load_checkpoint(out / "checkpoint.pt")["data"]
    assert data["eval_resize"] == round(32 / 0.875) and len(data["mean"]) == 3 and data["std"] != [0.25] * 3

    def no_listing(*a, **k):
        raise AssertionError("listed again on resume")

    monkeypatch.setattr(folder_module, "list_tree", no_listing)
    record = train(cfg, str(tmp_path / "data"), out, progress=False)
    assert record["epoch"] == 2 and "acc" in record


def test_a_subset_of_streamed_photos_decodes_as_the_whole(tmp_path):
    """twist eval's held-out split and the semi-supervised subsets are subsets of the loaded data:
    a streamed subset must keep the release's evaluation crop (resize the shorter side to
    crop / 0.875, then the centre crop) and, for tar shards, where each image lies. (It used
    to lose both: the folder subset resized straight to the crop size, the shard one could
    not open its images.)"""
    from twist.protocols import subset_dataset

    photo_folder(tmp_path / "f")
    make_shards(tmp_path / "f", tmp_path / "shards")
    pick = [7, 0, 3, 11]
    for spec in (tmp_path / "f", str(tmp_path / "shards")):
        whole = streamed(spec, crop_size=32)
        part = subset_dataset(whole, pick, "part")
        assert part.resize_side == whole.resize_side == round(32 / 0.875) and not part.in_memory
        assert list(part.paths) == [whole.paths[i] for i in pick] and part.name == "part"
        np.testing.assert_array_equal(part.labels, whole.labels[pick])
        assert torch.equal(part.get_batch(range(len(pick))), whole.get_batch(pick))


def test_progressive_resizing_cuts_streamed_views_at_each_epochs_size(tmp_path, monkeypatch):
    """Streamed photos get their views cut at decode time: with progressive resizing the plan's
    sizes follow the epoch (16, 24, 24, 32 px for 4 epochs from 16 to 32), the crop boxes do not."""
    from twist.augment import MultiCropAugment
    from twist.presets import get_preset
    from twist.train import train

    photo_folder(tmp_path / "data", n_per_class=8)
    cfg = get_preset("cifar10")
    for key, value in (("max_memory_gb", 1e-9), ("batch_size", 8), ("epochs", 4), ("device", "cpu"),
                       ("precision", "fp32"), ("eval_every", 0)):
        setattr(cfg.train, key, value)
    cfg.augment.progressive_start = 0.5
    sizes = []
    real = MultiCropAugment.photometric
    monkeypatch.setattr(MultiCropAugment, "photometric",
                        lambda self, v, g=None: sizes.append((v[0].shape[-1], self.cfg.global_size)) or real(self, v, g))
    train(cfg, str(tmp_path / "data"), tmp_path / "run", progress=False)
    assert sizes == [(s, s) for s in (16, 16, 24, 24, 24, 24, 32, 32)]  # two steps per epoch
