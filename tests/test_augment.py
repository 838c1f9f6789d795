"""Tests of the batched augmentation (twist.augment): shapes, determinism, each operation against
torchvision's definition, and the probabilities of METHOD.md section 4."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from twist.augment import (
    EvalTransform,
    MultiCropAugment,
    _blur_planes,
    _crop_boxes,
    _gaussian_kernels,
    _sampling_grid,
    _N_RANDOM,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    dataset_stats,
    gaussian_blur,
    rgb_to_grayscale,
    solarize,
)
from twist.config import AugmentConfig

ID_MEAN, ID_STD = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]  # outputs stay in [0, 1] units


def _images(b=8, c=3, h=32, w=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def _smooth_images(b=8, c=3, h=32, w=32, seed=0) -> torch.Tensor:
    """Natural-looking images (smooth colour blobs) as uint8."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, c, 4, 4, generator=g)
    x = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def _plain(**kw) -> AugmentConfig:
    """Everything off except what kw turns on: a full-image crop, no flip, no colour."""
    base = dict(global_size=32, local_size=16, num_local=0, global_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0),
                interpolation="bilinear")
    base.update(kw)
    return AugmentConfig(**base)


def _gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- shapes and determinism
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_local", [0, 6])
def test_shapes_dtypes_devices(channels, num_local):
    cfg = AugmentConfig(global_size=32, local_size=16, num_local=num_local)
    aug = MultiCropAugment(cfg, channels)
    assert aug.num_views == 2 + num_local
    views = aug(_images(c=channels), _gen())
    assert len(views) == 2 + num_local
    for i, v in enumerate(views):
        side = 32 if i < 2 else 16
        assert v.shape == (8, channels, side, side)
        assert v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous()
        assert torch.isfinite(v).all()
        # default normalisation 0.5 / 0.5: [0, 1] -> [-1, 1]
        assert v.min() >= -1 - 1e-5 and v.max() <= 1 + 1e-5


def test_non_square_and_larger_images():
    cfg = AugmentConfig(global_size=24, local_size=12, num_local=2)
    views = MultiCropAugment(cfg, 3)(_images(h=40, w=56), _gen())
    assert [tuple(v.shape) for v in views] == [(8, 3, 24, 24)] * 2 + [(8, 3, 12, 12)] * 2


def test_same_seed_same_views_other_seed_different():
    cfg = AugmentConfig(global_size=32, local_size=16, num_local=2, blur_p=(1.0, 0.5, 0.5), solarize_p=(0, 0.5, 0))
    aug = MultiCropAugment(cfg, 3)
    x = _smooth_images()
    a, b, c = aug(x, _gen(1)), aug(x, _gen(1)), aug(x, _gen(2))
    for va, vb, vc in zip(a, b, c):
        assert torch.equal(va, vb)
        assert not torch.allclose(va, vc)
    # the generator advances: two calls in a row differ
    g = _gen(3)
    assert not torch.equal(aug(x, g)[0], aug(x, g)[0])


def test_global_generator_used_when_none():
    aug = MultiCropAugment(AugmentConfig(), 3)
    x = _smooth_images()
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    assert torch.equal(a[0], aug(x)[0])


def test_input_checks():
    aug = MultiCropAugment(AugmentConfig(), 3)
    with pytest.raises(ValueError):
        aug(_images(c=1), _gen())
    with pytest.raises(ValueError):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.int64), _gen())
    with pytest.raises(ValueError):
        MultiCropAugment(AugmentConfig(), 2)
    with pytest.raises(ValueError):
        MultiCropAugment(AugmentConfig(), 3, std=[0.0, 1.0, 1.0])
    # float input in [0, 1] is accepted and gives the same result as uint8
    x = _smooth_images()
    cfg = AugmentConfig(num_local=1)
    a = MultiCropAugment(cfg, 3)(x, _gen())
    b = MultiCropAugment(cfg, 3)(x.float() / 255, _gen())
    for va, vb in zip(a, b):
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- crop and flip
@pytest.mark.parametrize("resample", ["grid", "separable"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_flip_only_equals_torch_flip(interpolation, resample):
    cfg = _plain(flip_p=1.0, interpolation=interpolation, ratio=(3 / 4, 4 / 3))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    x = _images()
    views = MultiCropAugment(cfg, 3, mean, std, resample=resample)(x, _gen())
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    for v in views:
        torch.testing.assert_close(v, torch.flip(ref, dims=[-1]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("resample", ["grid", "separable"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_full_crop_equals_plain_resize(interpolation, resample):
    cfg = _plain(interpolation=interpolation, global_size=28)  # 48 -> 28: below 2x, no pyramid
    x = _images(h=48, w=48)
    views = MultiCropAugment(cfg, 3, ID_MEAN, ID_STD, resample=resample)(x, _gen())
    ref = F.interpolate(x.float() / 255, size=(28, 28), mode=interpolation, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(views[0], ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(views[1], ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_separable_resampling_equals_grid_sample(interpolation):
    # the CPU default (two 1-D gather passes) and grid_sample give the same crops, flips included,
    # for up- and down-scaling, non-square images and mixed pyramid levels
    cfg = AugmentConfig(global_size=24, local_size=12, num_local=3, global_scale=(0.05, 1.0), flip_p=0.5,
                        interpolation=interpolation)
    for h, w in ((32, 32), (40, 56), (100, 100)):
        x = _images(b=16, h=h, w=w)
        a = MultiCropAugment(cfg, 3, resample="grid")(x, _gen())
        b = MultiCropAugment(cfg, 3, resample="separable")(x, _gen())
        for va, vb in zip(a, b):
            torch.testing.assert_close(va, vb, atol=5e-5, rtol=0)


def test_sampling_grid_equals_affine_grid():
    b, v, s = 3, 2, 7
    g = _gen()
    p = torch.zeros(11, v, b)  # parameter rows are view-major
    p[0] = torch.rand(v, b, generator=g) * 2 - 1  # ax (negative = flip)
    p[1] = torch.rand(v, b, generator=g) - 0.5  # tx
    p[2] = torch.rand(v, b, generator=g)  # ay
    p[3] = torch.rand(v, b, generator=g) - 0.5  # ty
    theta = torch.zeros(b * v, 2, 3)  # sample-major, as the grid stacks views along the height
    theta[:, 0, 0], theta[:, 0, 2] = p[0].t().reshape(-1), p[1].t().reshape(-1)
    theta[:, 1, 1], theta[:, 1, 2] = p[2].t().reshape(-1), p[3].t().reshape(-1)
    ref = F.affine_grid(theta, [b * v, 1, s, s], align_corners=False).view(b, v * s, s, 2)
    torch.testing.assert_close(_sampling_grid(p, b, v, s), ref, atol=1e-6, rtol=0)


def test_crop_boxes_follow_random_resized_crop():
    g = _gen()
    u = torch.rand(4000, 1, _N_RANDOM, generator=g, dtype=torch.float64).numpy()
    top, left, h, w = _crop_boxes(u, 40, 50, (0.08, 1.0), (3 / 4, 4 / 3))
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 40).all() and (left + w <= 50).all()
    assert (np.round(h) == h).all() and (np.round(top) == top).all()
    frac = h * w / (40 * 50)
    assert frac.min() > 0.05 and frac.max() <= 1.0
    assert 0.25 < np.median(frac) < 0.65  # uniform area in [0.08, 1] -> median ~0.54, minus rejections
    ratio = w / h
    assert ratio.min() > 3 / 4 * 0.8 and ratio.max() < 4 / 3 * 1.25
    # impossible boxes fall back to a centre crop with the ratio clamped to the range
    top, left, h, w = _crop_boxes(u[:5], 30, 30, (1.0, 1.0), (2.0, 3.0))
    assert (w == 30).all() and (h == 15).all() and (top == 7).all() and (left == 0).all()


def test_local_crops_are_zoomed_in_parts():
    # with scale (0.25, 0.25) and ratio 1, a local crop is a 16x16 window of a 32x32 image,
    # sampled 1:1 at 16 px: every output equals a window of the input
    cfg = _plain(num_local=3, local_size=16, local_scale=(0.25, 0.25))
    x = _images(b=4)
    views = MultiCropAugment(cfg, 3, ID_MEAN, ID_STD)(x, _gen())
    xf = x.float() / 255
    for v in views[2:]:
        for i in range(4):
            windows = xf[i].unfold(1, 16, 1).unfold(2, 16, 1)  # (3, 17, 17, 16, 16)
            err = (windows - v[i][:, None, None]).abs().amax(dim=(0, 3, 4))
            assert err.min() < 1e-5


def test_antialiasing_pyramid_for_large_images():
    # a 128 px noise image shrunk to 16 px: point sampling keeps the full noise variance,
    # the mip-map reduces it like an anti-aliased resize does
    cfg = _plain(global_size=16)
    x = _images(b=4, h=128, w=128)
    out = MultiCropAugment(cfg, 3, ID_MEAN, ID_STD)(x, _gen())[0]
    aa = F.interpolate(x.float() / 255, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    point = F.interpolate(x.float() / 255, size=(16, 16), mode="bilinear", antialias=False, align_corners=False)
    assert out.std() < 0.5 * point.std()
    assert out.std() < 2.0 * aa.std()
    torch.testing.assert_close(out.mean(), aa.mean(), atol=0.02, rtol=0)
    # random crops of large images mix pyramid levels in one batch
    cfg = AugmentConfig(global_size=16, local_size=8, num_local=2, global_scale=(0.05, 1.0))
    views = MultiCropAugment(cfg, 3)(_smooth_images(b=16, h=128, w=128), _gen())
    assert all(torch.isfinite(v).all() and v.abs().max() <= 1 + 1e-5 for v in views)


def test_flip_probability():
    cfg = _plain(flip_p=0.5, global_scale=(0.3, 0.6))
    aug = MultiCropAugment(cfg, 3)
    d = aug._draw(2000, 2, 32, 32, 32, (0.3, 0.6), (0, 0), (0, 0), _gen())
    flipped = (d["params"][0] < 0).mean()
    assert 0.45 < flipped < 0.55


# ---------------------------------------------------------------------------- colour operations vs torchvision
def _float_images(b=6, c=3, h=9, w=11, seed=0):
    return torch.rand(b, c, h, w, generator=_gen(seed))


def test_grayscale_matches_torchvision():
    x = _float_images()
    torch.testing.assert_close(rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
@pytest.mark.parametrize("channels", [1, 3])
def test_colour_ops_match_torchvision(name, channels):
    if channels == 1 and name in ("saturation", "hue"):
        x = _float_images(c=1)
        fn = adjust_saturation if name == "saturation" else adjust_hue
        assert torch.equal(fn(x, torch.full((6,), 0.3)), x)  # identity on one-channel images
        return
    x = _float_images(c=channels)
    ours, ref_fn = {"brightness": (adjust_brightness, TF.adjust_brightness),
                    "contrast": (adjust_contrast, TF.adjust_contrast),
                    "saturation": (adjust_saturation, TF.adjust_saturation),
                    "hue": (adjust_hue, TF.adjust_hue)}[name]
    factors = torch.tensor([0.0, 0.6, 1.0, 1.3, 1.4, 2.0]) if name != "hue" else \
        torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.1, 0.5])
    out = ours(x, factors)
    for i in range(len(factors)):
        ref = ref_fn(x[i:i + 1], float(factors[i]))
        torch.testing.assert_close(out[i:i + 1], ref, atol=2e-6, rtol=0, msg=f"{name} factor {float(factors[i])}")
    # a python number applies to every sample; inplace modifies the argument
    if name != "hue":
        y = x.clone()
        assert ours(y, 1.2, inplace=True) is y
        torch.testing.assert_close(y, ref_fn(x, 1.2), atol=2e-6, rtol=0)


@pytest.mark.parametrize("per_channel", [True, False])
def test_hue_and_solarize_variants_agree(per_channel):
    # the channel-by-channel form (CPU default) and the three-channel form (GPU default)
    x = _float_images()
    shift = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.1, 0.5])
    ref = torch.cat([TF.adjust_hue(x[i:i + 1], float(shift[i])) for i in range(6)])
    torch.testing.assert_close(adjust_hue(x, shift, per_channel=per_channel), ref, atol=2e-6, rtol=0)
    y = x.clone()
    assert adjust_hue(y, shift, inplace=True, per_channel=per_channel) is y
    torch.testing.assert_close(y, ref, atol=2e-6, rtol=0)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    out = solarize(x, mask, per_channel=per_channel)
    torch.testing.assert_close(out, torch.where(mask.bool().view(-1, 1, 1, 1), TF.solarize(x, 0.5), x),
                               atol=0, rtol=0)


def test_hue_on_special_colours():
    # greys, primaries, secondaries, ties between channels, black and white
    vals = torch.tensor([[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0],
                         [0, 1, 1], [1, 0, 1], [0.2, 0.2, 0.7], [0.7, 0.7, 0.2], [0.3, 0.8, 0.8], [1e-8, 0, 0]])
    x = vals.T.reshape(1, 3, 1, -1).repeat(4, 1, 1, 1)
    for shift in (-0.5, -0.25, 0.0, 1 / 3, 0.45, 0.5):
        out = adjust_hue(x, shift)
        torch.testing.assert_close(out, TF.adjust_hue(x, shift), atol=2e-6, rtol=0)


def test_hue_and_saturation_on_five_dim_layout():
    # the pipeline works on (B, C, V, S, S) with (B, 1, V, 1, 1) factors
    x = torch.rand(3, 3, 2, 5, 5, generator=_gen())
    f = torch.rand(3, 1, 2, 1, 1, generator=_gen(1)) - 0.5
    out = adjust_hue(x, f)
    for i in range(3):
        for v in range(2):
            ref = TF.adjust_hue(x[i:i + 1, :, v], float(f[i, 0, v]))
            torch.testing.assert_close(out[i:i + 1, :, v], ref, atol=2e-6, rtol=0)
    s = f + 1.0
    out = adjust_contrast(x.clone(), s, inplace=True)
    torch.testing.assert_close(out[1:2, :, 1], TF.adjust_contrast(x[1:2, :, 1], float(s[1, 0, 1])),
                               atol=2e-6, rtol=0)


def test_solarize_matches_torchvision():
    x = torch.cat([_float_images(b=4), torch.tensor([0.0, 0.5, 1.0, 0.49999997, 127 / 255, 128 / 255]).view(1, 3, 1, 2)
                   .expand(4, 3, 9, 2)], dim=-1)
    torch.testing.assert_close(solarize(x), TF.solarize(x, 0.5), atol=0, rtol=0)
    mask = torch.tensor([True, False, True, False])
    out = solarize(x, mask)
    assert torch.equal(out[mask], TF.solarize(x[mask], 0.5))
    assert torch.equal(out[~mask], x[~mask])


# ---------------------------------------------------------------------------- blur
def test_blur_tiny_sigma_is_identity_and_mean_preserved():
    x = _float_images(b=4, h=32, w=32)
    torch.testing.assert_close(gaussian_blur(x, 1e-3), x, atol=0, rtol=0)
    torch.testing.assert_close(gaussian_blur(x, 0.05), x, atol=1e-6, rtol=0)
    y = gaussian_blur(x, torch.tensor([0.5, 1.0, 2.0, 4.0]))
    torch.testing.assert_close(y.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), atol=5e-3, rtol=0)
    assert (y.std(dim=(-2, -1)) < x.std(dim=(-2, -1))).all()
    # a constant image stays constant
    c = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(c, 3.0), c, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigma", [0.4, 1.0, 2.5])  # radius 2, 3, 8
def test_blur_matches_torchvision(sigma):
    x = _float_images(b=3, h=24, w=20)
    k = 2 * int(np.ceil(3 * sigma)) + 1
    ref = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    torch.testing.assert_close(gaussian_blur(x, sigma), ref, atol=1e-5, rtol=0)
    # per-sample sigmas
    sig = torch.tensor([0.3, sigma, 0.8])
    out = gaussian_blur(x, sig, kernel_size=k)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], TF.gaussian_blur(x[i:i + 1], [k, k], [float(sig[i])] * 2),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("fraction", [0.25, 0.75, 1.0])  # gathered subset / all planes in place
def test_pipeline_blur_selects_images_each_with_its_own_kernel(fraction):
    n, c, s = 12, 3, 12
    x = torch.rand(n, c, s, s, generator=_gen())
    sel = np.random.default_rng(0).random(n) < fraction
    sigma = (torch.rand(n, generator=_gen(1)) * 1.5 + 0.2).numpy()  # radii 1-6 (ceil(3 sigma))
    out = MultiCropAugment._blur(x.clone(), sigma, sel)
    for i in range(n):
        # each image's kernel is its own 2 * ceil(3 sigma) + 1 taps, whatever the others' sigmas
        ref = gaussian_blur(x[i:i + 1], float(sigma[i])) if sel[i] else x[i:i + 1]
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("radius", [2, 6, 9])
def test_blur_taps_equal_the_convolution(radius):
    planes = torch.rand(5, 23, 19, generator=_gen())
    weights = _gaussian_kernels(torch.rand(5, generator=_gen(1)) + 0.5, 2 * radius + 1)
    by_taps = _blur_planes(planes.clone(), weights, taps=True)
    by_conv = _blur_planes(planes.clone(), weights, taps=False)
    torch.testing.assert_close(by_taps, by_conv, atol=1e-6, rtol=0)


def test_gaussian_kernels_with_their_own_radius():
    sigma = torch.tensor([0.3, 1.0, 2.0])
    k = _gaussian_kernels(sigma, 13, radius=torch.tensor([1, 3, 6]))
    for row, r in zip(k, (1, 3, 6)):
        assert torch.equal(row[:6 - r], torch.zeros(6 - r)) and torch.equal(row[7 + r:], torch.zeros(6 - r))
    for i, r in enumerate((1, 3, 6)):
        torch.testing.assert_close(k[i, 6 - r:7 + r], _gaussian_kernels(sigma[i:i + 1], 2 * r + 1)[0])


def test_gaussian_kernel_rows():
    k = _gaussian_kernels(torch.tensor([0.5, 1.0, 1e-3]), 5)
    torch.testing.assert_close(k.sum(-1), torch.ones(3))
    assert torch.equal(k[2], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))
    ref = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / 2)
    torch.testing.assert_close(k[1], ref / ref.sum())
    # _blur_planes with an exact identity kernel is exact
    planes = torch.rand(4, 6, 6)
    assert torch.equal(_blur_planes(planes.clone(), k[2:3].expand(4, 5)), planes)


# ---------------------------------------------------------------------------- probabilities in the pipeline
def _run(cfg, x, seed=0, channels=3):
    return MultiCropAugment(cfg, channels, ID_MEAN[:channels], ID_STD[:channels])(x, _gen(seed))


def test_zero_probabilities_change_nothing():
    cfg = _plain(global_scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), num_local=2, local_scale=(0.1, 0.3))
    x = _smooth_images()
    base = _run(cfg, x)
    # changing the amounts of disabled operations changes nothing (same random stream)
    other = dataclasses.replace(cfg, brightness=0.9, hue=0.4, blur_sigma=(3.0, 5.0))
    for a, b in zip(base, _run(other, x)):
        assert torch.equal(a, b)


def test_jitter_probability_one_and_identity_factors():
    cfg = _plain(jitter_p=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    x = _smooth_images(b=16)
    plain = _run(_plain(), x)[0]
    out = _run(cfg, x)[0]
    ratio = (out / plain.clamp_min(1e-3)).flatten(1)
    # one brightness factor per sample, in [0.6, 1.4], and not all the same
    mask = plain.flatten(1) > 0.05
    per_sample = torch.stack([r[m].median() for r, m in zip(ratio, mask)])
    assert (per_sample > 0.6 - 1e-3).all() and (per_sample < 1.4 + 1e-3).all()
    assert per_sample.std() > 0.05
    # all four colour ops with p=1 change every image; p=0 none
    full = _run(_plain(jitter_p=1.0), x)[0]
    assert ((full - plain).abs().flatten(1).amax(1) > 1e-3).all()


def test_grayscale_probability():
    x = _smooth_images(b=16)
    out = _run(_plain(grayscale_p=1.0), x)[0]
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)
    torch.testing.assert_close(out[:, :1], rgb_to_grayscale(_run(_plain(), x)[0]), atol=1e-6, rtol=0)
    out = _run(_plain(grayscale_p=0.5), _smooth_images(b=64))[0]
    is_gray = ((out[:, 0] - out[:, 1]).abs().flatten(1).amax(1) < 1e-6).float().mean()
    assert 0.3 < is_gray < 0.7
    # one-channel data: grayscale is a no-op
    x1 = _smooth_images(c=1)
    assert torch.equal(_run(_plain(grayscale_p=1.0), x1, channels=1)[0], _run(_plain(), x1, channels=1)[0])


def test_per_view_blur_and_solarize_probabilities():
    x = _smooth_images()
    plain = _run(_plain(num_local=2, local_scale=(0.5, 0.5)), x)
    # blur: sigma is given at 224 px and scaled by global_size / 224 (here 32 / 224)
    cfg = _plain(num_local=2, local_scale=(0.5, 0.5), blur_p=(1.0, 0.0, 1.0), blur_sigma=(7.0, 7.0))
    out = _run(cfg, x)
    assert MultiCropAugment(cfg, 3).sigma_scale == pytest.approx(32 / 224)
    torch.testing.assert_close(out[0], gaussian_blur(plain[0], 1.0), atol=1e-5, rtol=0)
    assert torch.equal(out[1], plain[1])
    torch.testing.assert_close(out[2], gaussian_blur(plain[2], 1.0), atol=1e-5, rtol=0)
    # solarize: only the second global view
    out = _run(_plain(num_local=2, local_scale=(0.5, 0.5), solarize_p=(0.0, 1.0, 0.0)), x)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[2], plain[2])
    torch.testing.assert_close(out[1], TF.solarize(plain[1], 0.5), atol=0, rtol=0)


def test_self_labeling_scale_override():
    cfg = AugmentConfig(num_local=2)
    aug = MultiCropAugment(cfg, 3, global_scale=(0.14, 1.0), local_scale=(0.05, 0.14))
    assert aug.global_scale == (0.14, 1.0) and aug.local_scale == (0.05, 0.14)
    d = aug._draw(500, 2, 16, 32, 32, aug.local_scale, (0, 0), (0, 0), _gen())
    area = d["params"][0] * d["params"][2]  # |ax| * ay = crop area fraction
    assert np.abs(area).max() < 0.14 * 1.3


# ---------------------------------------------------------------------------- eval transform and stats
def test_eval_transform():
    x = _images(h=32, w=32)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.4, 0.3]
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(EvalTransform(32, 3, mean, std)(x), ref, atol=1e-5, rtol=0)
    # shrinking: anti-aliased bilinear; growing: plain bilinear
    small = EvalTransform(16, 3, ID_MEAN, ID_STD)(x)
    torch.testing.assert_close(small, F.interpolate(x.float() / 255, size=(16, 16), mode="bilinear",
                                                    antialias=True, align_corners=False), atol=1e-6, rtol=0)
    big = EvalTransform(40, 3, ID_MEAN, ID_STD)(x)
    torch.testing.assert_close(big, F.interpolate(x.float() / 255, size=(40, 40), mode="bilinear",
                                                  align_corners=False), atol=1e-6, rtol=0)
    # a float input is not modified
    xf = x.float() / 255
    keep = xf.clone()
    EvalTransform(32, 3)(xf)
    assert torch.equal(xf, keep)
    assert EvalTransform(16, 1)(_images(c=1)).shape == (8, 1, 16, 16)


def test_dataset_stats():
    x = _images(b=37, h=5, w=7)
    mean, std = dataset_stats(x, chunk_elements=300)  # many small chunks
    xf = x.double() / 255
    ref_std = xf.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), xf.mean(dim=(0, 2, 3)), atol=1e-9, rtol=0)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), ref_std, atol=1e-9, rtol=0)
    m2, s2 = dataset_stats(x.numpy())
    assert np.allclose(m2, mean) and np.allclose(s2, std)
    m3, s3 = dataset_stats(torch.full((4, 1, 3, 3), 7, dtype=torch.uint8))
    assert m3 == [pytest.approx(7 / 255)] and s3 == [1.0]  # constant channel: harmless std
    with pytest.raises(ValueError):
        dataset_stats(x.float())


# ---------------------------------------------------------------------------- device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    cfg = AugmentConfig(global_size=32, local_size=16, num_local=4, blur_p=(1.0, 0.1, 0.5),
                        blur_sigma=(3.0, 14.0), solarize_p=(0.0, 0.2, 0.0))
    x = _smooth_images(b=64)
    cpu = MultiCropAugment(cfg, 3)(x, _gen())
    gpu = MultiCropAugment(cfg, 3)(x.cuda(), _gen())
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda" and b.is_contiguous()
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
    ev = EvalTransform(16, 3)
    torch.testing.assert_close(ev(x.cuda()).cpu(), ev(x), atol=1e-5, rtol=0)
