"""The release's recipes: each preset holds METHOD.md's (and the release's) hyperparameters, and
each one trains for a few optimiser steps on a CPU at a tiny size through ``twist.train.train``.
Plus the ``--dry-run`` schedule summary."""

import math

import numpy as np
import pytest
import torch

from twist.config import apply_overrides

# recipe: (optimizer, base lr, wd start, wd end, warm-up epochs, TWIST epochs, self-label epochs,

from twist.presets import IMAGENET_TRAIN_IMAGES, RECIPE_WORLD_SIZE, get_preset

# recipe: (optimizer, base lr, wd start, wd end, warm-up epochs, TWIST epochs, self-label epochs,
#          global batch, C, local crops, global scale, local scale, alpha, beta, EMA, clip, backbone)
TABLE = {
    "rn50-multicrop": ("lars", 0.5, 1.5e-6, 1.5e-6, 10, 800, 50, 2048, 4096, 12, (0.4, 1.0), (0.05, 0.4),
                       1.0, 1.0, False, 0.0, "resnet50"),
    "rn50-twoview": ("lars", 0.5, 1.5e-6, 1.5e-6, 10, 800, 0, 2048, 32768, 0, (0.08, 1.0), (0.05, 0.4),
                     1.0, 1.0, False, 0.0, "resnet50"),
    "rn50w2": ("lars", 0.5, 1.5e-6, 1.5e-6, 10, 200, 50, 1920, 4096, 12, (0.4, 1.0), (0.05, 0.4),
               1.0, 1.0, False, 0.0, "resnet50w2"),
    "vit-small": ("adamw", 3e-4, 0.06, 0.12, 10, 300, 0, 1024, 4096, 6, (0.4, 1.0), (0.05, 0.4),
                  0.4, 1.0, True, 3.0, "vit_small"),
    "vit-base": ("adamw", 7.5e-4, 0.06, 0.06, 10, 300, 0, 1024, 4096, 10, (0.4, 1.0), (0.05, 0.4),
                 0.4, 1.0, True, 3.0, "vit_base"),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_recipe_matches_method(name):
    (opt, lr, wd, wd_end, warmup, epochs, sl_epochs, batch, classes, local, gscale, lscale, alpha, beta, ema, clip,
     backbone) = TABLE[name]
    c = get_preset(name).validate()
    o = c.optim
    assert (o.name, o.lr, o.weight_decay, o.warmup_epochs, o.min_lr_ratio, o.clip_grad) == (opt, lr, wd, warmup, 0.001, clip)
    assert (o.weight_decay if o.weight_decay_end is None else o.weight_decay_end) == wd_end
    assert (c.train.epochs, c.selflabel.epochs) == (epochs, sl_epochs)
    assert c.train.batch_size * RECIPE_WORLD_SIZE[name] == batch
    assert (c.model.backbone, c.model.num_classes, c.model.hidden_dim) == (backbone, classes, 4096)
    a = c.augment
    assert (a.global_size, a.local_size, a.num_local, a.global_scale, a.local_scale) == (224, 96, local, gscale, lscale)
    assert (a.interpolation, a.blur_p, a.solarize_p) == ("bicubic", (1.0, 0.1, 0.5), (0.0, 0.2, 0.0))
    assert (c.loss.alpha, c.loss.beta, c.loss.tau, c.loss.eps) == (alpha, beta, 1.0, 1e-5)
    assert c.ema.enabled is ema
    if ema:
        assert (c.ema.momentum, c.ema.momentum_end) == (0.996, 1.0)
    vit = backbone.startswith("vit")
    assert c.model.activation == ("gelu" if vit else "relu")
    if vit:
        assert c.model.patch_size == 16 and c.model.drop_path == (0.1 if name == "vit-base" else 0.0)
    else:
        assert (o.momentum, o.lars_eta) == (0.9, 1e-3)
    if sl_epochs:
        s = c.selflabel
        assert (s.lr, s.warmup_epochs, s.quantile_start, s.quantile_end) == (0.05, 5, 0.5, 0.6)
        assert (s.global_scale, s.local_scale) == ((0.14, 1.0), (0.05, 0.14))


# ---------------------------------------------------------------------- a few steps each
@pytest.fixture(scope="module")
def tiny_rgb(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8), y=np.arange(8) % 4)
    return str(path)


TINY = ["model.hidden_dim=64", "model.num_classes=16", "model.bunch_size=4", "train.batch_size=4",
        "train.epochs=1", "train.image_size=32", "augment.global_size=32", "augment.local_size=16",
        "train.precision=fp32", "train.device=cpu", "train.eval_every=0", "train.channels_last=false"]
PER_RECIPE = {
    "rn50-multicrop": ["augment.num_local=2"],
    "rn50-twoview": [],
    "rn50w2": ["augment.num_local=2"],
    "vit-small": ["augment.num_local=2", "model.patch_size=8"],
    "vit-base": ["augment.num_local=2", "model.patch_size=16"],
}


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small, busy CPU the big recipes' many small ops run faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(PER_RECIPE))
def test_recipe_trains_a_few_steps(name, tiny_rgb, tmp_path, monkeypatch, one_thread):
    import twist.stage
    import twist.train

    saved = []  # keep the (large) checkpoints in memory instead of on disk
    monkeypatch.setattr(twist.stage, "save_checkpoint", lambda state, path: saved.append(state))
    cfg = apply_overrides(get_preset(name), TINY + PER_RECIPE[name])
    record = twist.train.train(cfg, tiny_rgb, tmp_path / name, progress=False, max_steps=2)
    assert record["step"] == 2 and math.isfinite(record["loss"]) and record["skipped_steps"] == 0
    ckpt = saved[-1]
    assert ckpt["state"]["global_step"] == 2
    opt_state = next(iter(ckpt["optimizer"]["state"].values()))
    assert ("exp_avg" in opt_state) == (cfg.optim.name == "adamw")  # the recipe's optimiser took the steps
    if cfg.ema.enabled:
        teacher, student = ckpt["teacher"], ckpt["model"]
        key = next(k for k in student if k.endswith("blocks.0.attn.qkv.weight"))
        gap = (teacher[key] - student[key]).abs().max().item()
        assert 0 < gap < 1  # the teacher lags the student
    else:
        assert ckpt["teacher"] is None


# ---------------------------------------------------------------------- dry run
def test_dry_run_prints_batches_and_schedules(capsys, monkeypatch):
    import json

    from twist.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--preset", "rn50-multicrop", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["preset"] == "rn50-multicrop"  # stdout stays a loadable config
    steps = IMAGENET_TRAIN_IMAGES // 16 // 128
    assert "128 per process x 16 = 2048 global" in err
    assert f"steps/epoch: {steps:,}" in err
    assert "0.5 x 2048/256 = 4 peak" in err and "cosine to 0.004" in err
    assert "self-labeling stage: 50 epochs" in err and "0.05 x 2048/256 = 0.4 peak" in err

    assert main(["train", "--preset", "vit-small", "--dry-run", "--world-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "64 per process x 8 = 512 global" in err and "0.06 -> 0.12 cosine" in err
    assert "momentum 0.996 -> 1 cosine" in err and "self-labeling stage: none" in err

    assert main(["train", "digits", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "1,797 images" in err and "steps/epoch: 28" in err  # batch 64
    assert "views: 2 x 16 px (scale (0.7, 1.0)) + 2 x 12 px (scale (0.5, 1.0))\n" in err

    assert main(["train", "--preset", "photo-cpu", "--dry-run", "--set", "augment.progressive_start=0.625"]) == 0
    assert "views: 2 x 64 px (scale (0.5, 1.0)); growing from 40 px over the first 75% of the epochs" \
        in capsys.readouterr().err
