"""train.decode=gpu (twist.data.device_decode), run on the CPU with device='cpu': the same code
as on a GPU, only the device argument differs. Checked against the CPU path (twist.data.views):
same boxes, views within rounding; non-JPEGs, files the device decoder refuses and bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import twist.data.device_decode as device_decode
from test_photo_data import PLAN, photo, photo_folder, streamed
from twist.config import ConfigError, TwistConfig
from twist.data import batch_loader
from twist.data.crops import draft_factor, image_generator, plan_boxes


def epoch_views(ds, batch, **kw):
    return list(batch_loader(ds, batch, shuffle=True, drop_last=True, seed=0, epoch=1, views=PLAN, **kw))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_on_the_tensor_equals_pil(orientation):
    a = (np.random.default_rng(orientation).random((5, 7, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", exif=exif)
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    got = device_decode.orient(torch.from_numpy(a).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == ref.shape and (got == ref).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_same_boxes_and_views_within_rounding_of_the_cpu_path(tmp_path, workers):
    photo_folder(tmp_path)
    ds = streamed(tmp_path)
    planned, failures = ds.plan_view_batch(np.arange(len(ds)), PLAN, 1, threads=1)
    assert not failures and not planned.ready_slots
    factors = []
    for j, i in enumerate(planned.indices):
        w, h = Image.open(ds.paths[i]).size
        boxes = plan_boxes(PLAN, h, w, image_generator(PLAN.seed, 1, i))
        assert list(planned.boxes[j]) == boxes  # the CPU path's boxes: same generator, same draws
        factors.append(draft_factor(boxes, PLAN.sizes))
    assert 1 in factors and max(factors) > 1  # both kinds of image are checked below
    cpu, gpu = epoch_views(ds, 4), epoch_views(ds, 4, decode_device="cpu", num_workers=workers)
    assert len(cpu) == len(gpu) == 3
    for (va, ia), (vb, ib) in zip(cpu, gpu):
        assert torch.equal(ia, ib)
        for x, y in zip(va, vb):
            assert y.dtype == torch.uint8 and y.shape == x.shape and y.device.type == "cpu"
            for slot, i in enumerate(ib.tolist()):
                diff = (x[slot].int() - y[slot].int()).abs()
                if factors[i] == 1:  # full-size decode on both: only float vs uint8 rounding differs
                    assert diff.max() <= 1, (i, diff.max())
                else:  # the CPU path shrinks by DCT scaling, the device by area averaging
                    assert diff.float().mean() < 1.5 and diff.max() <= 8, (i, diff.float().mean(), diff.max())


def test_exif_rotated_jpeg_on_the_device(tmp_path):
    (tmp_path / "c").mkdir()
    for k, o in enumerate((6, 3, 8)):
        exif = Image.Exif()
        exif[0x0112] = o
        photo(70, 50, seed=k).save(tmp_path / "c" / f"r{k}.jpg", exif=exif, quality=95)
    ds = streamed(tmp_path)
    batch = lambda **kw: list(batch_loader(ds, 3, shuffle=False, drop_last=True, seed=0, epoch=0, views=PLAN, **kw))
    (cpu, _), = batch()
    (gpu, _), = batch(decode_device="cpu")
    for x, y in zip(cpu, gpu):
        assert (x.int() - y.int()).abs().max() <= 1


def test_png_and_refused_jpegs_fall_back_to_the_cpu_path(tmp_path, monkeypatch):
    photo_folder(tmp_path)
    photo(64, 48, seed=99).save(tmp_path / "c0" / "zz.png")
    ds = streamed(tmp_path)
    png = ds.paths.index(str(tmp_path / "c0" / "zz.png"))
    planned, _ = ds.plan_view_batch(np.arange(len(ds)), PLAN, 1, threads=1)
    assert planned.ready_slots == [png]  # decoded in the worker, views ready
    cpu = epoch_views(ds, 13)
    gpu = epoch_views(ds, 13, decode_device="cpu")
    slot = cpu[0][1].tolist().index(png)
    assert all(torch.equal(x[slot], y[slot]) for x, y in zip(cpu[0][0], gpu[0][0]))
    # a device decoder that refuses everything: every image goes through the CPU path, exactly
    monkeypatch.setattr(device_decode, "decode_jpegs", lambda data, channels, device: [None] * len(data))
    refused = epoch_views(ds, 13, decode_device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(cpu[0][0], refused[0][0])) and ds.replaced == 0


def test_corrupt_jpeg_is_replaced_and_listed_like_the_cpu_path(tmp_path):
    photo_folder(tmp_path)
    good = (tmp_path / "c0" / "im1.jpg").read_bytes()
    (tmp_path / "c0" / "im0.jpg").write_bytes(good[: len(good) // 2])  # a valid header, truncated data
    (tmp_path / "c1" / "im0.jpg").write_bytes(b"not a jpeg at all")  # fails in the worker
    for device in (None, "cpu"):
        ds = streamed(tmp_path)
        (views, idx), = list(batch_loader(ds, 12, shuffle=False, drop_last=True, seed=0, epoch=0, views=PLAN,
                                          decode_device=device))
        assert ds.replaced == 2, device
        reasons = dict(ds.skipped)
        assert "truncated" in reasons[str(tmp_path / "c0" / "im0.jpg")]
        assert str(tmp_path / "c1" / "im0.jpg") in reasons
        assert torch.equal(views[0][0], views[0][1])  # the first slot got its neighbour's views
        assert torch.equal(views[0][6], views[0][5])


def test_a_batch_of_only_bad_files_goes_through_the_cpu_path(tmp_path):
    photo_folder(tmp_path)
    for i in (0, 1):
        good = (tmp_path / "c0" / f"im{i}.jpg").read_bytes()
        (tmp_path / "c0" / f"im{i}.jpg").write_bytes(good[: len(good) // 2])
    ds = streamed(tmp_path)
    batches = list(batch_loader(ds, 2, shuffle=False, drop_last=True, seed=0, epoch=0, views=PLAN, decode_device="cpu"))
    assert len(batches) == 6 and ds.replaced == 2
    ref = streamed(tmp_path)
    first = list(batch_loader(ref, 2, shuffle=False, drop_last=True, seed=0, epoch=0, views=PLAN))[0][0]
    assert all(torch.equal(x, y) for x, y in zip(first, batches[0][0]))  # the CPU path's substitutes


def test_decode_option_is_validated():
    cfg = TwistConfig()
    cfg.train.decode = "tpu"
    with pytest.raises(ConfigError, match="train.decode"):
        cfg.validate()


def test_training_with_decode_gpu_on_a_streamed_folder(tmp_path, monkeypatch):
    from twist.cli import main

    photo_folder(tmp_path / "data", n_per_class=8)
    calls = []
    real = device_decode.decode_jpegs
    monkeypatch.setattr(device_decode, "decode_jpegs", lambda *a: calls.append(len(a[0])) or real(*a))
    out = tmp_path / "run"
    sets = ["train.decode=gpu", "train.device=cpu", "train.precision=fp32", "train.max_memory_gb=1e-9",
            "train.batch_size=8", "train.epochs=1", "augment.num_local=2", "train.num_workers=0"]
    assert main(["train", str(tmp_path / "data"), "--preset", "cifar10", "--out", str(out), "--no-progress",
                 *sum((["--set", s] for s in sets), [])]) == 0
    assert calls == [8, 8] and (out / "checkpoint.pt").exists()
