"""The compiled CPU colour steps (twist.fused_colour) against the tensor path they replace on a CPU.

The tensor functions of twist.augment are tested against torchvision in test_augment.py; here
the kernel must give their results (to float32 rounding, about 1e-6) operation by operation, in
the whole pipeline of every preset, for views cut in memory and at decode time, and without
depending on how a batch is split. Without numba, 'auto' must fall back to the tensor path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from test_augment_chunks import _everything_on
from twist import fused_colour
from twist.augment import (MultiCropAugment, _blur_kernels, adjust_brightness, adjust_contrast, adjust_hue,
                           adjust_saturation, gaussian_blur, rgb_to_grayscale, solarize)
from twist.presets import PRESETS, get_preset

pytestmark = pytest.mark.skipif(not fused_colour.available(), reason="numba is not installed")

GREY = (0.2989, 0.587, 0.114)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_uint8(shape, seed: int = 0) -> torch.Tensor:
    """Random images with some spatial correlation (so blur and contrast have something to do)."""
    x = torch.rand(shape, generator=_gen(seed)) * 255
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1).round().to(torch.uint8)


def _kernel(x: torch.Tensor, source=None, flip=None, factors=None, order=(), grey=None, sigma=None,
            solar=None, normalise=True) -> torch.Tensor:
    """One call of colour_views on a copy of x (mean 0, std 1, so normalising changes nothing)."""
    m, c, h, w = x.shape
    out = x.clone().numpy()
    sigma = np.zeros(m) if sigma is None else np.asarray(sigma)
    _, radius, weights = _blur_kernels(sigma, sigma > 0, h, w)
    fused_colour.colour_views(
        out, None if source is None else source.numpy(), np.zeros(m, bool) if flip is None else flip,
        np.tile(np.array([[1.0], [1.0], [1.0], [0.0]], np.float32), (1, m)) if factors is None else factors,
        np.array(order, np.int64), np.zeros(m, bool) if grey is None else grey, weights, radius,
        np.zeros(m, bool) if solar is None else solar, np.zeros(c, np.float32), np.ones(c, np.float32),
        normalise, GREY)
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------- operation by operation
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_each_jitter_operation_equals_its_tensor_function(kind, channels):
    x = torch.rand(6, channels, 9, 37, generator=_gen(kind))  # 37 px rows: tiles of whole rows, a ragged end
    f = torch.tensor([0.0, 0.6, 1.0, 1.3, 1.4, 2.0]) if kind < 3 else torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.1, 0.5])
    factors = np.tile(np.array([[1.0], [1.0], [1.0], [0.0]], np.float32), (1, 6))
    factors[kind] = f.numpy()
    fn = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)[kind]
    torch.testing.assert_close(_kernel(x, factors=factors, order=[kind]), fn(x, f), atol=1e-6, rtol=0)


def test_hue_on_special_colours():
    vals = torch.tensor([[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0],
                         [0, 1, 1], [1, 0, 1], [0.2, 0.2, 0.7], [0.7, 0.7, 0.2], [0.3, 0.8, 0.8], [1e-8, 0, 0]])
    x = vals.T.reshape(1, 3, 1, -1).repeat(6, 1, 1, 1)
    shift = torch.tensor([-0.5, -0.25, 0.0, 1 / 3, 0.45, 0.5])
    factors = np.zeros((4, 6), np.float32)
    factors[3] = shift.numpy()
    torch.testing.assert_close(_kernel(x, factors=factors, order=[3]), adjust_hue(x, shift), atol=1e-6, rtol=0)


def test_jitter_order_grey_solarize_in_sequence():
    x = torch.rand(5, 3, 12, 10, generator=_gen(1))
    factors = np.array([[1.3, 0.7, 1.0, 1.2, 0.9], [0.6, 1.4, 1.0, 0.8, 1.1], [0.5, 1.5, 1.0, 0.0, 2.0],
                        [0.1, -0.2, 0.0, 0.4, -0.05]], np.float32)
    grey, solar = np.array([0, 1, 0, 0, 1], bool), np.array([1, 0, 1, 0, 1], bool)
    f = torch.from_numpy(factors)
    for order in ([3, 1, 0, 2], [0, 1, 2, 3], [1, 3], [2, 0]):
        ref = x.clone()
        for k in order:
            ref = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)[k](ref, f[k])
        ref = torch.where(torch.from_numpy(grey).view(-1, 1, 1, 1), rgb_to_grayscale(ref).expand_as(ref), ref)
        ref = solarize(ref, torch.from_numpy(solar))
        out = _kernel(x, factors=factors, order=order, grey=grey, solar=solar)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=0, msg=f"order {order}")


@pytest.mark.parametrize("channels", [1, 3])
def test_blur_each_image_with_its_own_radius(channels):
    # radii 0 (not blurred), 1, 3, 6 and 4 = the most a 5 px side allows (reflect padding)
    x = torch.rand(5, channels, 5, 23, generator=_gen(2))
    sigma = [0.0, 0.3, 1.0, 2.0, 9.0]
    out = _kernel(x, sigma=sigma)
    for i, s in enumerate(sigma):
        ref = x[i:i + 1] if s == 0 else gaussian_blur(x[i:i + 1], s, min(2 * int(np.ceil(3 * s)) + 1, 9))
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-6, rtol=0, msg=f"sigma {s}")


def test_fill_from_uint8_with_flips_and_normalising():
    src = _smooth_uint8((4, 3, 7, 30))
    flip = np.array([0, 1, 1, 0], bool)
    out = _kernel(torch.empty(4, 3, 7, 30), source=src, flip=flip)
    ref = src.float() / 255
    ref[1:3] = ref[1:3].flip(-1)
    assert torch.equal(out, ref)
    x = ref.clone().numpy()
    mean, inv_std = np.array([0.4, 0.5, 0.6], np.float32), np.array([2.0, 4.0, 5.0], np.float32)
    fused_colour.colour_views(x, None, np.ones(4, bool), np.tile([[1.0], [1.0], [1.0], [0.0]], (1, 4)), [],
                              np.zeros(4, bool), np.zeros((4, 1)), np.zeros(4, np.int64), np.zeros(4, bool),
                              mean, inv_std, True, GREY)  # without a source the flips are ignored
    torch.testing.assert_close(torch.from_numpy(x), (ref - torch.from_numpy(mean).view(1, 3, 1, 1))
                               * torch.from_numpy(inv_std).view(1, 3, 1, 1), atol=1e-6, rtol=0)


def test_images_are_independent_of_the_split():
    src = _smooth_uint8((6, 3, 16, 16), seed=3)
    rng = np.random.default_rng(0)
    factors = np.stack([rng.uniform(0.6, 1.4, 6), rng.uniform(0.6, 1.4, 6), rng.uniform(0.6, 1.4, 6),
                        rng.uniform(-0.1, 0.1, 6)]).astype(np.float32)
    kw = dict(flip=rng.random(6) < 0.5, factors=factors, order=[2, 1, 3, 0], grey=rng.random(6) < 0.3,
              sigma=list(rng.uniform(0, 2, 6)), solar=rng.random(6) < 0.5)
    whole = _kernel(torch.empty(6, 3, 16, 16), source=src, **kw)
    for i in range(6):
        one = {k: (v[:, i:i + 1] if k == "factors" else v if k == "order" else v[i:i + 1]) for k, v in kw.items()}
        assert torch.equal(_kernel(torch.empty(1, 3, 16, 16), source=src[i:i + 1], **one), whole[i:i + 1])


def test_bad_output_array_is_refused():
    with pytest.raises(ValueError, match="C-contiguous float32"):
        _kernel(torch.rand(2, 3, 8, 8).transpose(2, 3))


# ---------------------------------------------------------------------------- the whole pipeline
def _both_paths(cfg, channels: int, images: torch.Tensor | None, views: list[torch.Tensor] | None):
    out = []
    for colour in ("tensor", "fused"):
        aug = MultiCropAugment(cfg, channels, [0.4] * channels, [0.25] * channels, colour=colour)
        out.append(aug(images, _gen(5)) if images is not None else aug.photometric(views, _gen(5)))
    return out


def _assert_paths_agree(tensor_views, fused_views):
    assert len(tensor_views) == len(fused_views)
    for a, b in zip(tensor_views, fused_views):
        assert b.is_contiguous() and b.dtype == torch.float32
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)  # 4x the std 0.25 scaling of ~1e-6


@pytest.mark.parametrize("channels", [1, 3])
def test_every_step_on_in_memory_and_at_decode_time(channels):
    cfg = _everything_on()
    _assert_paths_agree(*_both_paths(cfg, channels, _smooth_uint8((11, channels, 40, 36), 1), None))
    views = [_smooth_uint8((11, channels, s, s), 10 + i) for i, s in enumerate([24, 24, 12, 12, 12])]
    tensor_views, fused_views = _both_paths(cfg, channels, None, views)
    _assert_paths_agree(tensor_views, fused_views)
    # the steps really ran: without them most images come out different
    off = dataclasses.replace(cfg, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
                              solarize_p=(0.0, 0.0, 0.0), erase_p=0.0)
    plain = MultiCropAugment(off, channels, [0.4] * channels, [0.25] * channels, colour="fused").photometric(
        views, _gen(5))
    for a, b in zip(fused_views, plain):
        assert ((a - b).abs().flatten(1).amax(1) > 1e-3).float().mean() > 0.5


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_agrees_with_the_tensor_path(name):
    cfg = get_preset(name).augment
    for channels in (1, 3):
        _assert_paths_agree(*_both_paths(cfg, channels, _smooth_uint8((4, channels, 40, 48), 1), None))
        if not (cfg.rotation or cfg.shear):  # views cut at decode time cannot be rotated
            sizes = [cfg.global_size] * 2 + [cfg.local_size] * cfg.num_local
            views = [_smooth_uint8((3, channels, s, s), 20 + i) for i, s in enumerate(sizes)]
            _assert_paths_agree(*_both_paths(cfg, channels, None, views))


def test_colour_path_by_device_and_option():
    cfg = _everything_on()
    assert MultiCropAugment(cfg, 3).colour_path(torch.device("cpu")) == "fused"
    assert MultiCropAugment(cfg, 3, colour="tensor").colour_path(torch.device("cpu")) == "tensor"
    for device in ("cuda", "meta"):  # only CPUs run the kernel
        assert MultiCropAugment(cfg, 3, colour="fused").colour_path(torch.device(device)) == "tensor"


# ---------------------------------------------------------------------------- without numba
def test_without_numba_auto_is_the_tensor_path(monkeypatch):
    cfg = _everything_on()
    images = _smooth_uint8((5, 3, 30, 30), 4)
    tensor = MultiCropAugment(cfg, 3, colour="tensor")(images, _gen(5))
    monkeypatch.setattr(fused_colour, "numba", None)
    assert not fused_colour.available()
    for a, b in zip(tensor, MultiCropAugment(cfg, 3)(images, _gen(5))):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="numba"):
        MultiCropAugment(cfg, 3, colour="fused")
    with pytest.raises(ValueError, match="colour must be"):
        MultiCropAugment(cfg, 3, colour="numba")


def test_kernels_compile_without_a_writable_cache(monkeypatch):
    """A read-only install without a writable home: numba refuses cache=True when decorating
    (checked for real as an unprivileged user with HOME=/nonexistent: import twist.augment
    failed before); the kernels are then compiled uncached. numba stands in here, because as
    root every folder is writable."""
    calls = []

    class NoCacheNumba:
        @staticmethod
        def njit(**options):
            calls.append(options)
            if options.get("cache"):
                raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
            return lambda fn: ("compiled", fn)

    def f():
        return None

    monkeypatch.setattr(fused_colour, "numba", NoCacheNumba)
    assert fused_colour._jit(inline="always")(f) == ("compiled", f)
    assert calls == [{"cache": True, "inline": "always"}, {"inline": "always"}]
