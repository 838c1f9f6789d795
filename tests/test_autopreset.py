"""The default recipe without --preset (twist.autopreset) and the report's photo thumbnails.

choose_preset is a pure function: it is checked on made-up summaries of data and devices. The
end-to-end test trains on a folder of 100 JPEGs of varied sizes with no --preset (only the
number of epochs cut down), then writes the report and checks that the gallery's thumbnails
follow each ORIGINAL photo's size and aspect, not the 64 px training copy.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from twist import autopreset
from twist.autopreset import DataSummary, DeviceInfo, choose_preset, fit_batch, summarize_data
from twist.cli import main
from twist.presets import get_preset

CPU = DeviceInfo("cpu", threads=2)
GPU = DeviceInfo("cuda", gpus=1, gpu_memory_gb=80.0, bf16=True, threads=16)


def test_cpu_photos_get_the_photo_cpu_recipe_with_c_from_the_class_folders():
    cfg, reasons = choose_preset(DataSummary("folder", 10_000, 3, 375, 5), CPU)
    assert cfg.preset == "photo-cpu" and cfg.model.backbone == "small_cnn" and cfg.model.num_classes == 5
    assert cfg.model.small_cnn_stride == 2 and cfg.augment.global_size == 64 and cfg.train.batch_size == 128
    assert len(reasons) == 2 and "'photo-cpu'" in reasons[0] and "photos on a CPU" in reasons[1]
    grey, _ = choose_preset(DataSummary("folder", 10_000, 1, 300, 0), CPU)
    assert grey.preset == "photo-cpu" and grey.model.num_classes == 10  # no class folders: the preset's C


def test_gpu_photos_get_the_release_resnet50_recipe():
    cfg, reasons = choose_preset(DataSummary("folder", 50_000, 3, 400, 100), GPU)
    assert cfg.preset == "photo-gpu" and cfg.model.backbone == "resnet50"
    assert cfg.augment.global_size == 224 and cfg.augment.num_local == 12 and cfg.optim.name == "lars"
    assert cfg.train.batch_size == 128 and cfg.model.num_classes == 100 and cfg.model.overcluster_classes == 4096
    assert 20 <= cfg.train.epochs <= 800 and cfg.selflabel.epochs >= 1 and "GPU" in reasons[1]
    small_gpu, _ = choose_preset(DataSummary("folder", 50_000, 3, 400, 0), DeviceInfo("cuda", 1, 12.0, False))
    assert small_gpu.train.batch_size == 32 and small_gpu.model.num_classes == 4096


@pytest.mark.parametrize("summary, device, preset", [
    (DataSummary("digits", 1797, 1, 8), CPU, "digits"),
    (DataSummary("array", 60_000, 1, 28), CPU, "mnist"),
    (DataSummary("array", 50_000, 3, 32), CPU, "cifar10"),
    (DataSummary("array", 50_000, 3, 32), GPU, "cifar10-gpu"),
    (DataSummary("folder", 500, 1, 10, 3), CPU, "digits"),
    (DataSummary("folder", 5_000, 3, 24, 3), CPU, "cifar10"),
])
def test_small_arrays_keep_the_array_presets(summary, device, preset):
    cfg, _ = choose_preset(summary, device)
    assert cfg.preset == preset


def test_batch_fits_small_data():
    assert fit_batch(256, 100) == 32 and fit_batch(256, 3446) == 256 and fit_batch(256, None) == 256
    assert fit_batch(128, 100, world=4) == 8 and fit_batch(64, 3) == 2
    cfg, reasons = choose_preset(DataSummary("folder", 100, 3, 150, 2), CPU)
    assert cfg.train.batch_size == 32 and "32 per process" in reasons[1]


def test_budget_epochs_fill_the_minutes_at_the_measured_rate():
    # 20 min x 60 x 100 images/s x 0.85 = 102,000 images: 10 epochs of 10,000
    assert autopreset.budget_epochs(10_000, 100.0, minutes=20) == 10
    assert autopreset.budget_epochs(10_000, 100.0, minutes=20) * 10_000 <= 20 * 60 * 100 * autopreset.STEP_EFFICIENCY
    assert autopreset.budget_epochs(1_281_167, 100.0) == 1  # never 0
    assert autopreset.budget_epochs(100, 1000.0, max_epochs=50) == 50


def test_measured_rate_is_a_positive_images_per_second():
    from twist.config import apply_overrides

    cfg = apply_overrides(get_preset("photo-cpu"), ["model.small_cnn_width=4", "model.hidden_dim=16",
                                                    "train.batch_size=4"])
    rate = autopreset.measure_images_per_s(cfg, channels=3, steps=1)
    assert 0 < rate < float("inf")


def test_spaced_evaluations_never_score_two_epochs_in_a_row():
    for epochs in range(1, 120):
        every = autopreset.spaced_evaluations(epochs, 5)
        scored = sorted({e for e in range(1, epochs + 1) if e % every == 0} | {epochs})
        gaps = [b - a for a, b in zip([0, *scored], scored)]
        assert min(gaps) * 2 >= min(every, epochs), (epochs, every, scored)
        assert abs(every - 5) <= 3 or epochs < 5, (epochs, every)
    assert autopreset.spaced_evaluations(16, 5) == 4  # 4, 8, 12, 16 rather than 5, 10, 15, 16
    assert autopreset.spaced_evaluations(20, 5) == 5 and autopreset.spaced_evaluations(16, 0) == 0


def test_auto_preset_sets_the_cpu_photo_epochs_from_the_measured_speed(tmp_path, monkeypatch):
    make_photos(tmp_path / "photos")
    monkeypatch.setattr(autopreset, "device_info", lambda name="auto": CPU)
    measured = []  # the configurations timed: the recipe with the caller's overrides
    monkeypatch.setattr(autopreset, "measure_images_per_s",
                        lambda cfg, channels, steps=2: measured.append(cfg.model.small_cnn_width) or 5.0)
    cfg, reasons = autopreset.auto_preset(str(tmp_path / "photos"), ["model.small_cnn_width=48"])
    assert measured == [48] and cfg.model.small_cnn_width == get_preset("photo-cpu").model.small_cnn_width
    expected = int(autopreset.CPU_BUDGET_MIN * 60 * 5.0 * autopreset.STEP_EFFICIENCY / 100)  # 40 <= 61 < 100
    assert cfg.preset == "photo-cpu" and cfg.train.epochs == autopreset.budget_epochs(100, 5.0) == expected
    assert "5 images/s" in reasons[-1] and f"{expected} epochs" in reasons[-1] and len(reasons) == 3
    assert cfg.train.eval_every == autopreset.spaced_evaluations(expected, get_preset("photo-cpu").train.eval_every)
    monkeypatch.setattr(autopreset, "measure_images_per_s", lambda *a, **k: pytest.fail("measured with fixed epochs"))
    fixed, reasons = autopreset.auto_preset(str(tmp_path / "photos"), ["train.epochs=3"])
    assert fixed.train.epochs == get_preset("photo-cpu").train.epochs and len(reasons) == 2
    # read as apply_overrides reads them: spaces around the key and its value do not hide it
    spaced, _ = autopreset.auto_preset(str(tmp_path / "photos"), [" train.epochs = 3"])
    assert spaced.train.epochs == fixed.train.epochs


def test_a_slow_cpu_narrows_the_convnet_to_fit_more_epochs(tmp_path, monkeypatch):
    make_photos(tmp_path / "photos")
    monkeypatch.setattr(autopreset, "device_info", lambda name="auto": CPU)
    wide, narrow = get_preset("photo-cpu").model.small_cnn_width, autopreset.CPU_NARROW_WIDTH
    rates = {(wide, 64): 2.0, (narrow, 64): 5.0, (24, 64): 1.0}  # images/s on 100 photos: 24, 61 and 12 epochs
    measured = []
    monkeypatch.setattr(autopreset, "measure_images_per_s", lambda cfg, channels, steps=2: measured.append(
        (cfg.model.small_cnn_width, cfg.augment.global_size)) or rates[measured[-1]])
    assert autopreset.budget_epochs(100, 2.0) < autopreset.CPU_MIN_EPOCHS <= autopreset.budget_epochs(100, 5.0)
    cfg, reasons = autopreset.auto_preset(str(tmp_path / "photos"))
    assert measured == [(wide, 64), (narrow, 64)] and cfg.model.small_cnn_width == narrow
    assert cfg.train.epochs == autopreset.budget_epochs(100, 5.0) and "5 images/s" in reasons[-1]
    assert f"width {wide} -> {narrow}" in reasons[-2] and f"only {autopreset.budget_epochs(100, 2.0)} epochs" in reasons[-2]
    assert cfg.augment.progressive_start == 0  # the views keep their size (results.md: no gain over three seeds)
    # a CPU fast enough for CPU_MIN_EPOCHS at the recipe's width keeps it, measured once
    measured.clear()
    rates[wide, 64] = 4.0
    kept, reasons = autopreset.auto_preset(str(tmp_path / "photos"))
    assert measured == [(wide, 64)] and kept.model.small_cnn_width == wide and len(reasons) == 3
    # a width the user gives is never changed, however slow (the caller applies it)
    measured.clear()
    given, _ = autopreset.auto_preset(str(tmp_path / "photos"), ["model.small_cnn_width=24"])
    assert measured == [(24, 64)] and given.model.small_cnn_width == wide
    # growing views asked for: both widths are measured at every side the run trains at
    measured.clear()
    rates[wide, 64] = 2.0
    rates.update({(w, side): rates[w, 64] * (64 / side) ** 2 for w in (wide, narrow) for side in (40, 48, 56)})
    grown, reasons = autopreset.auto_preset(str(tmp_path / "photos"), ["augment.progressive_start=0.625"])
    assert measured == [(w, side) for w in (wide, narrow) for side in (40, 48, 56, 64)]
    assert grown.model.small_cnn_width == narrow and "5 images/s here at 64 px (measured just now; 13 at 40 px" in reasons[-1]


def test_progressive_resizing_charges_each_epoch_at_its_view_side():
    """With the views growing from 40 to 64 px the budget charges every epoch at the rate measured
    at its own side, so it holds more epochs than at 64 px throughout, and the predicted time
    fits the budget."""
    aug = dataclasses.replace(get_preset("photo-cpu").augment, progressive_start=0.625)
    assert autopreset.view_sides(aug) == [40, 48, 56, 64] and autopreset.view_sides(get_preset("photo-cpu").augment) == [64]
    rates = {40: 900.0, 48: 700.0, 56: 520.0, 64: 400.0}
    epochs = autopreset.budget_epochs(10_000, rates, augment=aug)
    assert autopreset.training_seconds(10_000, rates, epochs, aug) <= autopreset.CPU_BUDGET_MIN * 60
    assert autopreset.training_seconds(10_000, rates, epochs + 1, aug) > autopreset.CPU_BUDGET_MIN * 60
    assert epochs > 1.2 * autopreset.budget_epochs(10_000, 400.0)  # 57 > 1.2 x 40
    by_hand = sum(10_000 / (rates[aug.view_sizes(e, epochs)[0]] * autopreset.STEP_EFFICIENCY) for e in range(epochs))
    assert autopreset.training_seconds(10_000, rates, epochs, aug) == pytest.approx(by_hand)


def make_photos(root, n_per_class: int = 50, seed: int = 0) -> None:
    """JPEGs of varied sizes and aspects (90-300 px a side) in two class folders."""
    rng = np.random.default_rng(seed)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n_per_class):
            w, h = int(rng.integers(90, 300)), int(rng.integers(90, 300))
            base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * (1 if c else -1) % 256
            img = (base + rng.normal(0, 30, (h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i:03d}.jpg", quality=85)


def test_summarize_data_reads_only_a_sample_of_headers(tmp_path, monkeypatch):
    make_photos(tmp_path / "photos")
    from twist.data import decode

    calls = []
    real = decode.probe_image
    monkeypatch.setattr(decode, "probe_image", lambda *a: calls.append(a) or real(*a))
    s = summarize_data(str(tmp_path / "photos"))
    assert (s.kind, s.count, s.channels, s.classes) == ("folder", 100, 3, 2) and 90 <= s.side <= 300
    assert len(calls) == autopreset.SAMPLE_FILES


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    make_photos(root / "photos")
    return root


def test_auto_preset_trains_on_100_photos_and_the_gallery_shows_the_originals(photo_run, capsys, monkeypatch):
    from twist.data import folder, listing

    data, out = photo_run / "photos", photo_run / "run"
    walks = []
    for module in (listing, folder):  # the recipe's look and the loader: one walk between them
        real = module.list_tree
        monkeypatch.setattr(module, "list_tree", lambda *a, real=real: walks.append(a[0]) or real(*a))
    rc = main(["train", str(data), "--out", str(out), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert rc == 0, err
    assert walks == [str(data)], "the folder is listed once, by the look that chose the recipe"
    assert "auto preset 'photo-cpu'" in err and "batch 128 -> 32 per process" in err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "photo-cpu" and cfg["train"]["batch_size"] <= 100
    assert (out / "metrics.jsonl").read_text().strip()

    rep = photo_run / "report"
    assert main(["report", str(out), "--out", str(rep), "--per-cluster", "6", "--no-progress"]) == 0
    page = (rep / "index.html").read_text(encoding="utf-8")
    figs = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)" class="photo"[^>]*title="([^"]+) \(p=', page)
    assert figs
    for b64, where in figs:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as thumb, Image.open(html.unescape(where)) as orig:
            expected = orig.copy()
            expected.thumbnail((128, 128))
            # the original's size and aspect (within the DCT draft's rounding), not the 64 x 64 training copy
            assert abs(thumb.size[0] - expected.size[0]) <= 1 and abs(thumb.size[1] - expected.size[1]) <= 1


def test_auto_preset_dry_run_looks_at_the_folder_once(photo_run, capsys, monkeypatch):
    from twist.data import listing

    walks = []
    real = listing.list_tree
    monkeypatch.setattr(listing, "list_tree", lambda *a: walks.append(a[0]) or real(*a))
    rc = main(["train", str(photo_run / "photos"), "--epochs", "1", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "100 images" in err
    assert walks == [str(photo_run / "photos")], "the dry run's count reuses the look that chose the recipe"


def test_auto_preset_says_what_the_settings_change(photo_run, capsys):
    """The reasons describe the recipe as chosen (C=5 + 100 over-clustering); a --set that changes
    it is printed next to them, so the log does not claim a head the run does not train."""
    rc = main(["train", str(photo_run / "photos"), "--epochs", "1", "--dry-run",
               "--set", "model.overcluster_classes=0", "--set", "model.small_cnn_width=8"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "+ 100 over-clustering" in err
    line = next(x for x in err.splitlines() if "your settings change the recipe" in x)
    assert "model.overcluster_classes 100 -> 0" in line and "model.small_cnn_width 32 -> 8" in line
    assert "train.epochs" in line and "model.num_classes" not in line
    assert main(["train", str(photo_run / "photos"), "--dry-run", "--preset", "photo-cpu", "--epochs", "1"]) == 0
    assert "your settings change" not in capsys.readouterr().err, "a named preset is not the auto recipe"
