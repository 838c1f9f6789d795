"""Tests of the rotation and shear of the multi-crop augmentation (``AugmentConfig.rotation`` /
``shear``): validation, an unchanged random stream and output when both are 0, the geometry
against torchvision's ``rotate`` / ``affine`` (sign conventions included), its composition with
the crop box and flip, and the distribution of the drawn angles."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from test_augment import _plain as _plain_any_size
from twist.augment import _N_RANDOM, MultiCropAugment
from twist.config import AugmentConfig, ConfigError, TwistConfig

BILINEAR = InterpolationMode.BILINEAR


def _plain(**kw) -> AugmentConfig:
    """test_augment's geometry-only config (full-image crops, no flip, no colour) at 28 / 12 px."""
    return _plain_any_size(**{"global_size": 28, "local_size": 12, **kw})


def _square_images() -> torch.Tensor:
    """Black 28 x 28 digits-like images with an off-centre bright rectangle (upper right) and, in
    the second image, a grey one (lower left). The border is black, so border padding (ours) and
    zero fill (torchvision) agree."""
    x = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 4:11, 15:23] = 255
    x[1, :, 16:21, 6:9] = 128
    return x


def _augment(cfg: AugmentConfig, rotation: float | None = None, shear: float | None = None, **kw) -> MultiCropAugment:
    """A one-channel augmenter with outputs in [0, 1] units; ``rotation`` / ``shear`` pin the drawn
    angle (the draw range becomes [angle, angle])."""
    aug = MultiCropAugment(cfg, 1, mean=[0.0], std=[1.0], **kw)
    if rotation is not None:
        aug.rotation_range = (rotation, rotation)
    if shear is not None:
        aug.shear_range = (shear, shear)
    return aug


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _centroid(img: torch.Tensor) -> tuple[float, float]:
    """(x, y) centre of mass of a (H, W) image, in pixels, y pointing down."""
    h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype), indexing="ij")
    total = img.sum()
    return float((img * xs).sum() / total), float((img * ys).sum() / total)


# ---------------------------------------------------------------------------- (a) validation
@pytest.mark.parametrize("field, value", [("rotation", -1.0), ("rotation", 180.5), ("shear", -0.1), ("shear", 45.0),
                                          ("shear", 60.0)])
def test_bad_values_are_rejected_naming_the_field(field, value):
    cfg = TwistConfig()
    setattr(cfg.augment, field, value)
    with pytest.raises(ConfigError, match=f"augment.{field}"):
        cfg.validate()
    with pytest.raises(ValueError, match=field):
        MultiCropAugment(dataclasses.replace(AugmentConfig(), **{field: value}), 3)


def test_good_values_are_accepted():
    cfg = TwistConfig()
    assert cfg.augment.rotation == 0.0 and cfg.augment.shear == 0.0
    cfg.augment.rotation, cfg.augment.shear = 180.0, 44.9
    cfg.validate()


# ---------------------------------------------------------------------------- (b) off = unchanged
@pytest.mark.parametrize("resample", ["auto", "grid", "separable"])
def test_zero_rotation_and_shear_change_nothing(resample):
    old = AugmentConfig(global_size=20, local_size=12, num_local=2, interpolation="bicubic")  # fields not set
    new = dataclasses.replace(old, rotation=0.0, shear=0.0)
    images = torch.randint(0, 256, (6, 3, 28, 28), generator=_gen(1), dtype=torch.uint8)
    g_old, g_new = _gen(3), _gen(3)
    for _ in range(2):
        a = MultiCropAugment(old, 3, resample=resample)(images, g_old)
        b = MultiCropAugment(new, 3, resample=resample)(images, g_new)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(g_old.get_state(), g_new.get_state())


def test_zero_rotation_and_shear_draw_no_extra_random_numbers():
    """The stream is exactly that of the pipeline without rotation/shear: per crop resolution one
    (B, V, _N_RANDOM) float64 draw and one permutation of the 4 colour operations."""
    cfg = AugmentConfig(global_size=20, local_size=12, num_local=2)
    images = torch.randint(0, 256, (5, 3, 28, 28), generator=_gen(1), dtype=torch.uint8)
    g, expected = _gen(7), _gen(7)
    MultiCropAugment(cfg, 3)(images, g)
    for nviews in (2, 2):
        torch.rand((5, nviews, _N_RANDOM), generator=expected, dtype=torch.float64)
        torch.randperm(4, generator=expected)
    assert torch.equal(g.get_state(), expected.get_state())
    # with rotation on, two more uniforms per (view, sample) and resolution
    g_on = _gen(7)
    MultiCropAugment(dataclasses.replace(cfg, rotation=10.0), 3)(images, g_on)
    assert not torch.equal(g_on.get_state(), g.get_state())


# ---------------------------------------------------------------------------- (c, d) geometry
@pytest.mark.parametrize("resample", ["auto", "grid", "separable"])  # affine maps always go through grid_sample
@pytest.mark.parametrize("angle", [90.0, 30.0, -17.5])
def test_rotation_matches_torchvision_rotate(angle, resample):
    """Positive angles rotate counter-clockwise, as ``torchvision.transforms.functional.rotate``."""
    images = _square_images()
    view = _augment(_plain(rotation=45.0), rotation=angle, resample=resample)(images, _gen())[0]
    ref = TF.rotate(images.float() / 255, angle, interpolation=BILINEAR)
    torch.testing.assert_close(view, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(view, images.float() / 255, atol=0.1)  # it did rotate


def test_rotation_sign_convention_is_counter_clockwise():
    """Independent of torchvision: +90 degrees takes the upper-right rectangle to the upper left."""
    images = _square_images()[:1]
    x0, y0 = _centroid(images[0, 0].float())
    view = _augment(_plain(rotation=90.0), rotation=90.0)(images, _gen())[0][0, 0]
    x1, y1 = _centroid(view)
    c = 14.0 - 0.5  # the image centre in pixel indices
    assert x0 > c and y0 < c  # upper right
    assert x1 < c and y1 < c  # upper left
    # a quarter turn counter-clockwise (y down): (dx, dy) -> (dy, -dx)
    assert x1 - c == pytest.approx(y0 - c, abs=1e-3) and y1 - c == pytest.approx(-(x0 - c), abs=1e-3)


@pytest.mark.parametrize("shear", [20.0, -30.0])
def test_shear_matches_torchvision_affine(shear):
    images = _square_images()
    view = _augment(_plain(shear=40.0), shear=shear)(images, _gen())[0]
    ref = TF.affine(images.float() / 255, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0],
                    interpolation=BILINEAR)
    torch.testing.assert_close(view, ref, atol=1e-5, rtol=0)
    # horizontal shear: rows keep their height, and the rows below the centre move the other way
    # than the rows above it
    assert _centroid(view[0, 0])[1] == pytest.approx(_centroid(images[0, 0].float())[1], abs=1e-3)


def test_rotation_then_shear_order_matches_torchvision_affine():
    """The view is sheared, then rotated: torchvision's affine(angle=-rotation, shear=[shear, 0])
    (its affine angle is clockwise)."""
    images = _square_images()
    view = _augment(_plain(rotation=45.0, shear=30.0), rotation=35.0, shear=-20.0)(images, _gen())[0]
    ref = TF.affine(images.float() / 255, angle=-35.0, translate=[0, 0], scale=1.0, shear=[-20.0, 0.0],
                    interpolation=BILINEAR)
    torch.testing.assert_close(view, ref, atol=1e-5, rtol=0)


def test_bicubic_rotation_and_shear_match_an_affine_grid_reference():
    """torchvision has no bicubic affine for tensors: the reference is grid_sample on the
    ``F.affine_grid`` of the inverse of the forward map (y down): rotate counter-clockwise after a
    horizontal shear, ``[[c, s], [-s, c]] @ [[1, -tan(shear)], [0, 1]]``."""
    rotation, shear = 25.0, 15.0
    images = _square_images()
    view = _augment(_plain(rotation=45.0, shear=30.0, interpolation="bicubic"), rotation=rotation,
                    shear=shear)(images, _gen())[0]
    r, t = np.radians(rotation), np.tan(np.radians(shear))
    forward = np.array([[np.cos(r), np.sin(r)], [-np.sin(r), np.cos(r)]]) @ np.array([[1.0, -t], [0.0, 1.0]])
    theta = torch.zeros(2, 2, 3)
    theta[:, :, :2] = torch.from_numpy(np.linalg.inv(forward)).float()
    x = images.float() / 255
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    ref = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(view, ref, atol=1e-5, rtol=0)


def test_rotation_and_shear_compose_with_crop_and_flip():
    """Each view is affine(flip(crop)) about the view's centre, with its own angles per (view,
    sample): where the sample points stay inside the crop, the view equals torchvision's affine
    applied to the same view without rotation and shear. 20 px crops of 28 px images read to
    20 px views are exact pixel copies, so bilinear resampling makes both the same."""
    scale = (400 / 784, 400 / 784)
    cfg = _plain(global_size=20, global_scale=scale, flip_p=0.5, rotation=40.0, shear=25.0)
    images = torch.randint(0, 256, (6, 1, 28, 28), generator=_gen(2), dtype=torch.uint8)
    aug = _augment(cfg)
    d = aug._draw(6, 2, 20, 28, 28, scale, (0.0, 0.0), (0.0, 0.0), _gen(5))
    rot, shear = d["rotation"], d["shear"]  # (V, B) degrees
    assert np.ptp(rot) > 20 and np.ptp(shear) > 10  # the angles really vary per (view, sample)
    views = aug(images, _gen(5))
    plain = _augment(dataclasses.replace(cfg, rotation=0.0, shear=0.0))(images, _gen(5))  # same crops and flips
    assert not all(torch.equal(v, p) for v, p in zip(views, plain))
    for v in range(2):
        for i in range(6):
            kw = dict(angle=-float(rot[v, i]), translate=[0, 0], scale=1.0, shear=[float(shear[v, i]), 0.0],
                      interpolation=BILINEAR)
            ref = TF.affine(plain[v][i], **kw)
            inside = TF.affine(torch.ones_like(plain[v][i]), **kw) > 1 - 1e-5  # all taps inside the crop
            assert inside.float().mean() > 0.4
            torch.testing.assert_close(views[v][i][inside], ref[inside], atol=1e-4, rtol=0)


def test_large_images_use_the_pyramid_with_rotation():
    """Anti-aliasing levels still apply to rotated views (96 px images into 12 px crops)."""
    cfg = _plain(global_size=12, rotation=30.0, shear=10.0, interpolation="bicubic")
    images = torch.randint(0, 256, (3, 1, 96, 96), generator=_gen(4), dtype=torch.uint8)
    d = _augment(cfg)._draw(3, 2, 12, 96, 96, (1.0, 1.0), (0.0, 0.0), (0.0, 0.0), _gen(0))
    assert (d["levels"] >= 2).all()
    views = _augment(cfg)(images, _gen(0))
    assert all(v.shape == (3, 1, 12, 12) and 0 <= v.min() and v.max() <= 1 for v in views)
    # an anti-aliased image has far less pixel-to-pixel variance than one that aliases noise
    assert float(views[0].diff(dim=-1).abs().mean()) < 0.1


# ---------------------------------------------------------------------------- (e) statistics
def test_drawn_angles_are_uniform_in_range():
    aug = MultiCropAugment(_plain(rotation=30.0, shear=10.0), 1)
    d = aug._draw(5000, 2, 28, 28, 28, (1.0, 1.0), (0.0, 0.0), (0.0, 0.0), _gen(11))
    for angles, m in ((d["rotation"], 30.0), (d["shear"], 10.0)):
        assert angles.shape == (2, 5000)
        assert angles.min() >= -m and angles.max() <= m
        assert angles.min() < -0.98 * m and angles.max() > 0.98 * m
        assert abs(angles.mean()) < 0.03 * m
        assert angles.std() == pytest.approx(m / 3 ** 0.5, rel=0.03)
        hist = np.histogram(angles, bins=6, range=(-m, m))[0] / angles.size
        assert np.all(np.abs(hist - 1 / 6) < 0.02)
    assert abs(np.corrcoef(d["rotation"].ravel(), d["shear"].ravel())[0, 1]) < 0.05
    off = MultiCropAugment(_plain(), 1)._draw(4, 2, 28, 28, 28, (1.0, 1.0), (0.0, 0.0), (0.0, 0.0), _gen(11))
    assert off["rotation"] is None and not off["affine"]
