"""Smoke test of benchmarks/throughput.py: it runs end to end with tiny settings and ends its
stdout with one JSON line holding the documented keys. No timing is asserted (speed targets
live in the benchmark and docs/benchmarks.md, not in tests)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def test_throughput_script_tiny_run():
    cmd = [sys.executable, str(SCRIPT), "--preset", "cifar10", "--backbone", "small_cnn", "--batch-size", "8",
           "--steps", "1", "--windows", "1", "--warmup", "1", "--breakdown-steps", "1", "--num-images", "32",
           "--threads", "1", "--baseline-workers", "0", "--num-local", "1",
           "--sweep", "--sweep-batch", "8", "--sweep-classes", "10", "--sweep-local", "1"]  # one sweep point
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    for key in ("ceiling_ips", "full_ips", "baseline_ips", "peak_mem_mb", "full_over_ceiling", "full_over_baseline",
                "loss_share", "head_share", "breakdown_ms", "state_mb", "load_start", "load_end", "sweep"):
        assert key in result, key
    for key in ("ceiling_ips", "full_ips", "baseline_ips"):
        assert result[key] > 0
    assert result["views"] == 3 and result["batch_size"] == 8
    assert {"augment", "backbone_fwd", "head_fwd", "loss_fwd", "loss_bwd", "optimizer", "total"} <= set(result["breakdown_ms"])
    assert [r["varied"] for r in result["sweep"]] == ["batch_size", "num_classes", "num_local"]
    assert all((r["batch_size"], r["num_classes"], r["num_local"]) == (8, 10, 1) for r in result["sweep"])
    if sys.platform.startswith("linux"):
        assert result["peak_mem_mb"] > 0 and result["sweep"][0]["peak_mem_mb"] > 0
        if platform.libc_ver()[0] == "glibc":
            assert result["malloc_reuse"] is bool(not os.environ.get("TWIST_DEFAULT_MALLOC"))


def test_throughput_all_presets_one_row_each_and_both_phases_when_heads_are_dropped():
    cmd = [sys.executable, str(SCRIPT), "--preset", "all", "--batch-size", "8", "--num-images", "32", "--steps", "1",
           "--windows", "1", "--warmup", "1", "--breakdown-steps", "1", "--threads", "1", "--no-baseline",
           "--no-memory", "--set", "model.small_cnn_width=4", "model.drop_heads_after=1", "train.epochs=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    runs = json.loads(lines[-1])["presets"]
    assert [r["preset"] for r in runs] == ["digits", "mnist", "cifar10"]
    rows = [x for x in lines if x.startswith("| ") and not x.startswith(("| preset", "| ---"))]
    assert [x.split(" | ")[0] for x in rows] == ["| digits", "| mnist", "| cifar10"]
    for r in runs:  # every preset has several heads: the after-drop step is timed too
        assert r["full_dropped_ips"] > 0 and r["cpu"]
        before, after = r["full_over_ceiling"], r["full_dropped_over_ceiling"]
        # one epoch before the drop, two after: the run's ratio is the steps' total times' ratio
        assert abs(r["run_full_over_ceiling"] - 3 / (1 / before + 2 / after)) < 1e-3


def test_iic_baseline_gets_the_presets_over_clustering_head_and_never_promotes_it():
    """benchmarks/baselines.py: IIC is given the preset's heads, over-clustering head included
    (as IIC's paper trains one), and only the C = num_classes heads compete for promotion."""
    import numpy as np
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import baselines
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from twist.config import apply_overrides
    from twist.presets import get_preset
    from twist.data import ImageDataset

    cfg = apply_overrides(get_preset("cifar10"), ["model.small_cnn_width=4", "model.hidden_dim=16",
                                                  "model.overcluster_classes=12", "train.batch_size=8",
                                                  "train.epochs=2", "train.channels_last=false"])
    model, _ = baselines.build_objective("iic", cfg, 3)
    assert len(model.heads) == 5 and model.trained_heads[-1].num_classes == 12
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(16, 3, 32, 32), dtype=np.uint8))
    data = ImageDataset(name="tiny", channels=3, size=(32, 32), images=images, labels=np.arange(16) % 4)
    torch.set_num_threads(1)
    model, info = baselines.train_objective("iic", cfg, data, (0.5,) * 3, (0.25,) * 3, device=torch.device("cpu"),
                                            precision="fp32", log=lambda *_: None)
    assert info["steps"] == 4 and all(0 <= h < 5 for h in info["promoted_heads"])
    assert model.aux_heads[0].last_linear.weight.shape == (12, 16)


def test_contrastive_baselines_keep_a_wide_projector_when_twist_heads_are_narrow():
    """SimCLR's and Barlow Twins' projectors are at least 1024 wide whatever the TWIST preset's
    head width, so narrowing TWIST's heads cannot weaken the baselines it is compared with; an
    explicit width wins."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import baselines
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from twist.config import apply_overrides
    from twist.presets import get_preset

    cfg = apply_overrides(get_preset("cifar10"), ["model.small_cnn_width=4", "model.hidden_dim=16"])
    simclr, _ = baselines.build_objective("simclr", cfg, 3)
    assert simclr.head[0].out_features == 1024 and simclr.head[-1].out_features == 128
    barlow, crit = baselines.build_objective("barlow", cfg, 3)
    assert barlow.head[-1].out_features == 1024 and crit.dim == 1024
    wide = apply_overrides(get_preset("digits"), ["model.small_cnn_width=4", "model.hidden_dim=2048"])  # kept
    assert baselines.build_objective("simclr", wide, 1)[0].head[0].out_features == wide.model.hidden_dim == 2048
    assert baselines.build_objective("simclr", cfg, 3, projector_dim=32)[0].head[0].out_features == 32


def test_photo_loader_script_tiny_run(tmp_path):
    script = SCRIPT.parent / "photo_loader.py"
    cmd = [sys.executable, str(script), "--work", str(tmp_path), "--photos", "24", "--images", "8", "--batch", "4",
           "--workers", "0", "--tree-files", "300", "--memory-files", "150"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("multicrop_speedup", "twoview_speedup", "startup_over_scandir", "auto_startup_over_scandir"):
        assert result[key] > 0, key
    assert result["multicrop"]["twist"]["images"] == result["multicrop"]["release"]["images"] == 8
    assert result["startup"]["files"] == 300 and result["startup"]["resume_listings"] == 0
    assert result["startup"]["resume_images"] == 300
    memory = result["memory"]  # the figures of 150 extra images are noise; that they are measured is checked
    assert memory["small"]["files"] == 150 and memory["large"]["files"] == 300
    assert memory["large"]["images_read"] == 256 and memory["index_bytes_per_image"] > 0
    assert "worker_bytes_per_image" in result and memory["large"]["worker_private_peak_mb"] > 0
