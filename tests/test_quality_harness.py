"""benchmarks/quality.py end to end on a tiny split folder: every method it runs takes the same
number of optimiser steps, a preset's self-labeling epochs included (the baselines then train
train.epochs + selflabel.epochs epochs), and the report lists every method it ran. Figures are
not checked here (tests/test_quality_digits.py checks that TWIST learns)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def test_baselines_get_the_self_labeling_epochs_too(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny"
    data.mkdir()
    for split, n in (("train", 32), ("test", 16)):
        np.savez(data / f"{split}.npz", x=rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8),
                 y=np.arange(n) % 4)
    out = tmp_path / "out"
    sets = ["model.small_cnn_width=4", "model.hidden_dim=16", "model.num_classes=4", "model.num_heads=2",
            "model.overcluster_classes=0", "train.batch_size=8", "train.image_size=16",
            "augment.global_size=16", "train.precision=fp32", "selflabel.epochs=1", "selflabel.warmup_epochs=0"]
    cmd = [sys.executable, str(SCRIPT), str(data), "--preset", "cifar10", "--epochs", "1", "--out", str(out),
           "--methods", "twist,simclr,kmeans_raw", "--threads", "1", "--probe-epochs", "2", "--kmeans-init", "1",
           "--projector-dim", "16", "--no-progress", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    twist = json.loads((out / "twist.json").read_text())
    simclr = json.loads((out / "simclr.json").read_text())
    assert twist["meta"]["steps"] == 8 and twist["meta"]["epochs"] == 2  # 4 steps of TWIST + 4 of self-labeling
    assert twist["steps"] == simclr["steps"] == 8
    assert simclr["projector_dim"] == 16
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["results"]} == {"twist", "twist_kmeans", "simclr", "kmeans_raw"}
    assert "= 8 steps" in (out / "results.md").read_text()
