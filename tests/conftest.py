"""Shared fixtures.

``trained_digits_run`` -- a run folder holding a tiny model trained on the built-in ``digits``
(2 epochs, small convnet of width 8): ``checkpoint.pt``, ``config.json`` and ``metrics.jsonl``
(one record per epoch, with cluster metrics and kNN). Trained once per test session (about
10-30 s on two CPU cores); treat it as read-only (copy it before training it further).

``digits_eval_npz`` -- ``(train.npz, test.npz)``: the deterministic stratified split of digits
that ``twist.protocols.split_for_eval('digits')`` uses, as npz files (x: (N, 16, 16, 1) uint8
at the model's image size, y: labels), for tests that need two files.

``write_random_npz`` -- a function ``(path, n) -> str`` that writes ``n`` seeded random 8x8 grey
images with labels 0-2 to ``path`` (the tiny data of the resume and pre-emption tests).

``torch_one_thread`` -- runs a test with ``torch.set_num_threads(1)`` (restored afterwards).
On this small shared machine torch's default of one thread per core is up to 20x slower when
other processes are busy (threads spin waiting for each other); the tiny models of the tests
gain nothing from more threads. Use it with ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``.
The trained-run fixture trains with one thread as well.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

@pytest.fixture(scope="session")
def write_random_npz():
    def write(path: Path, n: int) -> str:
        rng = np.random.default_rng(0)
        np.savez(path, x=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), y=rng.integers(0, 3, n))
        return str(path)

    return write


TINY_DIGITS_OVERRIDES = [
    "train.epochs=2",
    "train.batch_size=128",
    "train.eval_every=1",
    "train.precision=fp32",
    "train.device=cpu",
    "model.small_cnn_width=8",
    "model.hidden_dim=64",
    "optim.warmup_epochs=0.5",
    "optim.lr=0.01",
]


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torch_one_thread():
    """torch uses one intra-op thread during the test (see the module docstring)."""
    with _one_thread():
        yield


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory) -> Path:
    """Path of a run folder with a tiny digits model (see the module docstring)."""
    from twist.config import apply_overrides
    from twist.presets import get_preset
    from twist.train import train

    cfg = get_preset("digits")
    apply_overrides(cfg, TINY_DIGITS_OVERRIDES)
    out = tmp_path_factory.mktemp("trained_digits_run")
    with _one_thread():
        train(cfg, "digits", out, progress=False)
    assert (out / "checkpoint.pt").is_file()
    return out


@pytest.fixture(scope="session")
def digits_eval_npz(tmp_path_factory) -> tuple[Path, Path]:
    """(train.npz, test.npz) of the seeded stratified digits split, 16 x 16 px."""
    from twist.protocols import split_for_eval

    train_ds, test_ds, _ = split_for_eval("digits", image_size=16)
    folder = tmp_path_factory.mktemp("digits_npz")
    paths = []
    for name, ds in (("train", train_ds), ("test", test_ds)):
        p = folder / f"{name}.npz"
        np.savez(p, x=ds.images.permute(0, 2, 3, 1).numpy(), y=ds.labels)
        paths.append(p)
    return paths[0], paths[1]
