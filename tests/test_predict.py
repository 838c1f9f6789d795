"""Tests of twist.predict / `twist predict`: CSV rows and embeddings equal a direct forward pass,
odd file names, streaming in batches, atomic output, channel conversion."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from twist.cli import main
from twist.data import ImageDataset, display_path, load_dataset
from twist.predict import CSV_COLUMNS, load_for_prediction, match_channels, predict, read_predictions

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ODD_NAMES = [b"\xff\xfe-not-utf8.png", 'a,b "quoted".png'.encode(), b"tab\there.png", "caf\u00e9.png".encode()]


@pytest.fixture(scope="module")
def trained(trained_digits_run):
    from twist.serving import load_trained

    return load_trained(trained_digits_run)


def _make_folder(root, n_plain=19, mode="L", size=20, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"img_{i:03d}.png".encode() for i in range(n_plain)] + ODD_NAMES
    for name in names:
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
            os.path.join(os.fsencode(root), name), format="PNG")
    return names


def _direct(trained, images: torch.Tensor):
    with torch.no_grad():
        x = trained.eval_transform(match_channels(images, trained.channels))
        f = trained.model.features(x)
        p = torch.softmax(trained.model.head(f) / trained.config.loss.tau, dim=1)
    return f.numpy(), p.numpy()


def test_predict_folder_with_odd_names_matches_direct_forward(trained, trained_digits_run, tmp_path, capsys):
    folder = tmp_path / "imgs"
    names = _make_folder(folder)
    out_csv, emb = tmp_path / "out" / "pred.csv", tmp_path / "out" / "emb.npy"
    rc = main(["predict", str(trained_digits_run), str(folder), "--out", str(out_csv), "--embeddings", str(emb),
               "--batch-size", "8", "--no-progress"])
    assert rc == 0
    assert f"{len(names)} predictions" in capsys.readouterr().out

    raw = out_csv.read_bytes()
    raw.decode("utf-8")  # strict: the CSV is valid UTF-8 even with undecodable file names
    with open(out_csv, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == CSV_COLUMNS  # no labels in a folder without class sub-folders
    assert len(rows) == len(names) + 1
    ref = load_dataset(str(folder), image_size=trained.image_size, progress=False)  # in memory, same order
    assert [r[1] for r in rows[1:]] == [display_path(p) for p in ref.paths]
    shown = {r[1] for r in rows[1:]}
    assert display_path(os.path.join(os.fsdecode(folder), os.fsdecode(ODD_NAMES[0]))) in shown
    assert any(s.endswith("\\xff\\xfe-not-utf8.png") for s in shown)
    assert any(s.endswith('a,b "quoted".png') for s in shown) and any(s.endswith("caf\u00e9.png") for s in shown)

    feats, probs = _direct(trained, ref.images)
    e = np.load(emb)
    assert e.dtype == np.float32 and e.shape == (len(names), trained.model.feature_dim)
    np.testing.assert_allclose(e, feats, rtol=1e-4, atol=1e-5)
    p = read_predictions(out_csv)
    assert np.array_equal(p["index"], np.arange(len(names)))
    assert np.array_equal(p["cluster"], probs.argmax(1))
    assert np.array_equal(p["cluster"], p["top1_cluster"])
    np.testing.assert_allclose(p["confidence"], probs.max(1), atol=1e-6)
    assert np.all(p["top1_prob"] >= p["top2_prob"]) and np.all(p["top2_prob"] >= p["top3_prob"])
    second = np.sort(probs, axis=1)[:, -2]
    np.testing.assert_allclose(p["top2_prob"], second, atol=1e-6)
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]


def test_predict_streams_in_batches(trained, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    names = _make_folder(folder, n_plain=21)
    ds = load_for_prediction(str(folder), trained)
    assert not ds.in_memory  # folders are decoded batch by batch, never all at once
    sizes = []
    original = ImageDataset.decode_batch

    def spy(self, idx, threads):
        sizes.append(len(idx))
        return original(self, idx, threads)

    monkeypatch.setattr(ImageDataset, "decode_batch", spy)
    res = predict(trained, ds, tmp_path / "p.csv", batch_size=5, progress=False)
    assert res["num_images"] == len(names) and sum(res["cluster_counts"]) == len(names)
    assert max(sizes) <= 5 and sum(sizes) == len(names)


def test_predict_interrupted_leaves_no_partial_files(trained, tmp_path, monkeypatch):
    import twist.predict as tp

    real = tp.stream_outputs

    def failing(*args, **kwargs):
        gen = real(*args, **kwargs)
        yield next(gen)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tp, "stream_outputs", failing)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="disk on fire"):
        predict(trained, "digits", out / "p.csv", embeddings=out / "e.npy", batch_size=64, progress=False)
    assert list(out.iterdir()) == []


def test_predict_digits_api_has_labels_and_rgb_folder_is_converted(trained, tmp_path):
    res = predict(trained, "digits", tmp_path / "d.csv", batch_size=512, progress=False)
    assert res["num_images"] == 1797 and sum(res["cluster_counts"]) == 1797
    p = read_predictions(tmp_path / "d.csv")
    assert np.array_equal(p["label"], load_dataset("digits", progress=False).labels)
    assert p["path"][:3] == ["0", "1", "2"]  # arrays: the index stands for the path

    folder = tmp_path / "rgb"
    _make_folder(folder, n_plain=4, mode="RGB")
    res = predict(trained, str(folder), tmp_path / "rgb.csv", progress=False)
    assert res["num_images"] == 4 + len(ODD_NAMES)
